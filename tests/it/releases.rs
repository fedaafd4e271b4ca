//! `/admin/releases` through a real admin listener, and `releases:` from the file, as far
//! as they go without endpoint groups (the groups API is another branch: until it is
//! merged every upstream is one without groups, and a release is refused with that
//! reason). Promotion and rollback with real groups are the lead's process test.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::assert_eventually;
use crate::support::process::temp_dir;
use crate::support::{self, raw};

const TOKEN: &str = "t0ken-for-the-release-api-123";

fn config(admin: &str, extra: &str) -> String {
    format!(
        r#"admin: {admin}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes: [{{ upstream: up }}]
upstreams:
  up: {{ endpoints: ["http://127.0.0.1:1"], connect_timeout: 1s }}
{extra}"#
    )
}

/// One request on a fresh connection: status and body.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let text = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = raw(addr, text.as_bytes(), Duration::from_secs(5)).await;
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

const GOOD: &str = r#"{"upstream":"up","to":"green","steps":[5,25,50,100],"step_for":"2m","gate":{"max_error_rate":"1%","max_p95":"500ms","min_requests":100}}"#;

#[tokio::test]
async fn the_release_api_validates_and_refuses_with_reasons() {
    let r = support::start(&config("{ listen: \"127.0.0.1:0\" }", "")).await;
    let a = r.admin_addr;
    let (status, body) = call(a, "GET", "/admin/releases", "", "").await;
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["driver"], "this replica");
    assert_eq!(v["releases"], serde_json::json!([]));

    // Not a release document: 400, every problem said.
    let (status, body) = call(a, "POST", "/admin/releases", "", "").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        json(&body)["message"]
            .as_str()
            .unwrap()
            .starts_with("expected a JSON object")
    );
    let bad = r#"{"upstream":"nope","to":"green","steps":[50,25],"step_for":"2m","gate":{"max_error_rate":"1%","max_p95":"500ms"}}"#;
    let (status, body) = call(a, "POST", "/admin/releases", "", bad).await;
    assert_eq!(status, 400, "{body}");
    let v = json(&body);
    assert_eq!(v["code"], "BAD_REQUEST");
    assert_eq!(
        v["problems"],
        serde_json::json!([
            "upstream: unknown upstream \"nope\" (known: up)",
            "steps: steps must rise, got [50, 25]",
            "gate: missing required key \"min_requests\"",
        ]),
        "{body}"
    );
    let (status, body) = call(a, "POST", "/admin/releases", "", "{\"upstream\": ").await;
    assert_eq!(status, 400, "{body}");

    // A valid document for an upstream without endpoint groups: refused, and why.
    let (status, body) = call(a, "POST", "/admin/releases", "", GOOD).await;
    assert_eq!(status, 422, "{body}");
    let v = json(&body);
    assert_eq!(v["code"], "REFUSED");
    assert_eq!(v["message"], "upstream up has no endpoint groups");

    // The same rules as /admin/reload: POST only, never cross-origin.
    let (status, _) = call(
        a,
        "POST",
        "/admin/releases",
        "Origin: https://evil.example\r\n",
        GOOD,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(
        a,
        "POST",
        "/admin/releases/up-1/abort",
        "Origin: https://evil.example\r\n",
        "",
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(a, "PUT", "/admin/releases", "", GOOD).await;
    assert_eq!(status, 405);
    let (status, _) = call(a, "GET", "/admin/releases/up-1/pause", "", "").await;
    assert_eq!(status, 405);

    // Unknown releases and actions.
    let (status, body) = call(a, "POST", "/admin/releases/up-1/pause", "", "").await;
    assert_eq!(
        (status, json(&body)["message"].as_str()),
        (404, Some("no release up-1"))
    );
    let (status, body) = call(a, "POST", "/admin/releases/up-1/explode", "", "").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("pause, resume, abort, promote"), "{body}");
    assert!(r.shutdown().await);
}

#[tokio::test]
async fn the_release_api_needs_the_token_when_there_is_one() {
    let admin = format!("{{ listen: \"127.0.0.1:0\", token: \"{TOKEN}\" }}");
    let r = support::start(&config(&admin, "")).await;
    let a = r.admin_addr;
    for (method, path) in [
        ("GET", "/admin/releases"),
        ("POST", "/admin/releases"),
        ("POST", "/admin/releases/x/abort"),
    ] {
        let (status, _) = call(a, method, path, "", GOOD).await;
        assert_eq!(status, 401, "{method} {path}");
    }
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let (status, body) = call(a, "POST", "/admin/releases", &auth, GOOD).await;
    assert_eq!(status, 422, "{body}");
    assert!(r.shutdown().await);
}

/// A release in the file waits while it cannot start (here: no groups), is listed with
/// why, is kept in the state file, is not duplicated by a reload, and comes back after a
/// restart under the same id.
#[tokio::test]
async fn a_config_release_waits_is_kept_across_reloads_and_restarts() {
    let dir = temp_dir("releases-config");
    let state = dir.join("releases.json");
    let _ = std::fs::remove_file(&state);
    let extra = format!(
        "releases_state: {}\nreleases:\n  - {{ upstream: up, to: green, steps: [10, 100], step_for: 1m, gate: {{ max_error_rate: 1%, max_p95: 1s, min_requests: 10 }} }}\n",
        state.display()
    );
    let yaml = config("{ listen: \"127.0.0.1:0\" }", &extra);
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let cfg = rampart::config::Config::load(&path).unwrap();
    let r = rampart::app::start_with_file(cfg.clone(), Some(path.clone()))
        .await
        .unwrap();
    let list = |addr| async move { json(&call(addr, "GET", "/admin/releases", "", "").await.1) };
    let v = list(r.admin_addr).await;
    let rel = &v["releases"][0];
    assert_eq!(rel["state"], "waiting", "{v}");
    assert_eq!(rel["origin"], "config");
    assert_eq!(rel["reason"], "upstream up has no endpoint groups");
    assert_eq!(rel["gate"]["max_error_rate"], "1%");
    let id = rel["id"].as_str().unwrap().to_owned();
    assert_eventually!(state.exists(), "no state file at {}", state.display());
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["releases"][0]["id"], id.as_str());

    let report = r.reload().await;
    assert!(report.is_ok(), "{report:?}");
    let v = list(r.admin_addr).await;
    assert_eq!(v["releases"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["releases"][0]["id"], id.as_str());
    assert!(r.shutdown().await);

    let r = rampart::app::start_with_file(cfg, Some(path))
        .await
        .unwrap();
    let v = list(r.admin_addr).await;
    assert_eq!(v["releases"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["releases"][0]["id"], id.as_str());
    assert_eq!(v["releases"][0]["state"], "waiting");
    assert!(r.shutdown().await);
    std::fs::remove_dir_all(&dir).unwrap();
}
