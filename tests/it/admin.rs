//! The admin listener against hostile callers: who may drive it (a token, or loopback and an
//! explicit opt-out), which Host names it answers without a token (DNS rebinding), what the
//! public `/health` may say, and that no secret of the file ever shows.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::assert_eventually;
use crate::support::process::temp_dir;
use crate::support::{self, Upstream, logs, raw};

const TOKEN: &str = "t0ken-for-the-admin-api-123";

fn base(admin: &str, up: &str) -> String {
    format!(
        r#"admin: {admin}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes: [{{ upstream: up }}]
upstreams:
  up: {{ endpoints: ["{up}"], connect_timeout: 1s }}
"#
    )
}

fn parse(yaml: &str) -> Result<rampart::config::Config, String> {
    rampart::config::parse_str(yaml, "test.yaml", &|_| None).map_err(|e| e.to_string())
}

/// One request on a fresh connection, written by hand so the Host is exactly ours.
async fn with_host(addr: SocketAddr, target: &str, host: &str, extra: &str) -> (u16, String) {
    let text = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    let answer = raw(addr, text.as_bytes(), Duration::from_secs(5)).await;
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"));
    (status, answer)
}

// === who may drive it ===

#[test]
fn a_non_loopback_admin_listener_needs_a_token_or_an_explicit_opt_out() {
    let up = "http://127.0.0.1:1";
    for open in ["\"0.0.0.0:0\"", "\"[::]:0\"", "\"10.1.2.3:9901\""] {
        let err = parse(&base(&format!("{{ listen: {open} }}"), up)).unwrap_err();
        assert!(
            err.starts_with("test.yaml:1:18: admin.listen: ")
                && err.contains("is not a loopback address and admin.token is not set")
                && err.contains("admin.insecure_no_token: true"),
            "{open}: {err}"
        );
    }
    // A token, or the explicit opt-out, or loopback: accepted.
    let c = parse(&base(
        &format!("{{ listen: \"0.0.0.0:0\", token: \"{TOKEN}\" }}"),
        up,
    ))
    .unwrap();
    assert!(c.admin.token.is_some());
    let c = parse(&base(
        "{ listen: \"0.0.0.0:0\", insecure_no_token: true }",
        up,
    ))
    .unwrap();
    assert!(c.admin.insecure_no_token && c.admin.token.is_none());
    for local in ["\"127.0.0.1:0\"", "\"127.9.9.9:0\"", "\"[::1]:0\""] {
        parse(&base(&format!("{{ listen: {local} }}"), up)).unwrap();
    }
    // Both at once is a contradiction, refused rather than guessed.
    let err = parse(&base(
        &format!("{{ listen: \"0.0.0.0:0\", token: \"{TOKEN}\", insecure_no_token: true }}"),
        up,
    ))
    .unwrap_err();
    assert!(
        err.contains("admin.insecure_no_token: ") && err.contains("admin.token is set"),
        "{err}"
    );
    // An empty token (an unset variable through `${VAR:-}`) is no token.
    let err = parse(&base("{ listen: \"0.0.0.0:0\", token: \"\" }", up)).unwrap_err();
    assert!(err.contains("admin.token is not set"), "{err}");
}

#[test]
fn the_shipped_config_takes_its_token_from_the_environment_in_the_container() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.yaml")).unwrap();
    let parse_with = |vars: &[(&str, &str)]| {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        rampart::config::parse_str(&text, "proxy.yaml", &move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    };
    // A fresh machine: loopback, no token, fine.
    let c = parse_with(&[]).unwrap();
    assert!(c.admin.listen.ip().is_loopback() && c.admin.token.is_none());
    // The container's address without a token: refused, saying what to set.
    let err = parse_with(&[("RAMPART_ADMIN_LISTEN", "0.0.0.0:9901")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin.listen: \"0.0.0.0:9901\" is not a loopback address")
            && err.contains("RAMPART_ADMIN_TOKEN"),
        "{err}"
    );
    // With the token from the environment (a Kubernetes Secret): accepted, never shown.
    let c = parse_with(&[
        ("RAMPART_ADMIN_LISTEN", "0.0.0.0:9901"),
        ("RAMPART_ADMIN_TOKEN", TOKEN),
    ])
    .unwrap();
    assert_eq!(
        c.admin.token.as_ref().map(|t| t.expose().as_str()),
        Some(TOKEN)
    );
    assert!(!format!("{c:?}").contains(TOKEN));
    // The image sets the open address, and no token: that must come from the deployment.
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert!(dockerfile.contains("RAMPART_ADMIN_LISTEN=0.0.0.0:9901"));
    assert!(
        !dockerfile
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains("RAMPART_ADMIN_TOKEN")),
        "a token baked into the image"
    );
}

/// As the container starts it: `rampart run` with the image's environment and no token
/// exits 2 with the reason, before binding anything.
#[test]
fn the_container_without_a_token_refuses_to_start() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--config", "proxy.yaml"])
        // Its own admin port, so a start that wrongly succeeds clashes with nothing.
        .env("RAMPART_ADMIN_LISTEN", "0.0.0.0:0")
        .env_remove("RAMPART_ADMIN_TOKEN")
        .env_remove("RAMPART_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rampart started with an open admin listener and no token");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("proxy.yaml:")
            && stderr.contains("admin.listen: \"0.0.0.0:0\" is not a loopback address"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_reload_that_opens_the_admin_listener_without_a_token_is_refused() {
    let up = Upstream::start().await;
    let path = temp_dir("admin-reload").join("proxy.yaml");
    std::fs::write(&path, base("{ listen: \"127.0.0.1:0\" }", &up.url())).unwrap();
    let config = rampart::config::Config::load(&path).unwrap();
    let r = rampart::app::start_with_file(config, Some(path.clone()))
        .await
        .unwrap();
    std::fs::write(&path, base("{ listen: \"0.0.0.0:0\" }", &up.url())).unwrap();
    let report = r.reload().await;
    assert!(!report.is_ok(), "{report:?}");
    assert!(
        report.errors.iter().any(|e| e.contains("admin.listen")
            && e.contains("is not a loopback address and admin.token is not set")),
        "{report:?}"
    );
    // Still where it was, and still answering.
    assert_eq!(
        support::send(&support::http1(), support::get(r.admin_addr, "/livez"))
            .await
            .0
            .status(),
        200
    );
    r.shutdown().await;
}

#[tokio::test]
async fn an_admin_listener_open_without_a_token_is_logged_loudly_at_every_start() {
    logs::capture();
    let up = Upstream::start().await;
    let yaml = base(
        "{ listen: \"0.0.0.0:0\", insecure_no_token: true }",
        &up.url(),
    );
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let r = support::start(&yaml).await;
        addrs.push(r.admin_addr);
        r.shutdown().await;
    }
    for addr in addrs {
        let lines = logs::lines_with(&format!("admin listener on {addr} has no token"));
        assert_eq!(lines.len(), 1, "{addr}: {lines:#?}");
        assert!(
            lines[0].contains("WARN") || lines[0].contains("ERROR"),
            "{lines:#?}"
        );
        assert!(lines[0].contains("insecure_no_token"), "{lines:#?}");
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let up = Upstream::start().await;
    let r = support::start(&base(
        &format!("{{ listen: \"127.0.0.1:0\", token: \"{TOKEN}\" }}"),
        &up.url(),
    ))
    .await;
    let local = r.admin_addr.to_string();
    for (authorization, want) in [
        (format!("Bearer {TOKEN}"), 200),
        (format!("bearer {TOKEN}"), 200),
        (format!("BEARER {TOKEN}"), 200),
        (format!("bEaReR {TOKEN}"), 200),
        (format!("Bearer   {TOKEN}"), 200),
        (format!("Basic {TOKEN}"), 401),
        (format!("Bearer{TOKEN}"), 401),
        (format!("Bearer {TOKEN}x"), 401),
        ("Bearer".to_owned(), 401),
        (format!("Token {TOKEN}"), 401),
    ] {
        let (status, answer) = with_host(
            r.admin_addr,
            "/admin/config",
            &local,
            &format!("Authorization: {authorization}\r\n"),
        )
        .await;
        assert_eq!(status, want, "{authorization:?}: {answer}");
    }
    r.shutdown().await;
}

// === DNS rebinding ===

#[tokio::test]
async fn without_a_token_admin_data_answers_only_local_and_listed_host_names() {
    let up = Upstream::start().await;
    let r = support::start(&base(
        "{ listen: \"127.0.0.1:0\", allowed_hosts: [rampart.internal] }",
        &up.url(),
    ))
    .await;
    let port = r.admin_addr.port();
    let data = [
        "/admin/config",
        "/admin/status",
        "/admin/upstreams",
        "/metrics",
    ];
    let local_names = [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        format!("[::1]:{port}"),
        "10.0.0.7".to_owned(),
        format!("localhost:{port}"),
        "LocalHost".to_owned(),
        "rampart.internal".to_owned(),
        format!("RAMPART.internal:{port}"),
    ];
    for path in data {
        for host in &local_names {
            let (status, answer) = with_host(r.admin_addr, path, host, "").await;
            assert_eq!(status, 200, "{path} Host {host}: {answer}");
        }
        for host in [
            "attacker.example".to_owned(),
            format!("attacker.example:{port}"),
            "localhost.attacker.example".to_owned(),
            "127.0.0.1.attacker.example".to_owned(),
            "rampart.internal.attacker.example".to_owned(),
        ] {
            let (status, answer) = with_host(r.admin_addr, path, &host, "").await;
            assert_eq!(status, 421, "{path} Host {host}: {answer}");
            assert!(
                answer.contains("application/json")
                    && answer.contains("\"code\":\"MISDIRECTED_REQUEST\""),
                "{answer}"
            );
            assert!(!answer.contains("rampart_"), "{answer}");
        }
        // An absolute target naming another host is judged by that host too.
        let (status, _) = with_host(
            r.admin_addr,
            &format!("http://attacker.example{path}"),
            &format!("127.0.0.1:{port}"),
            "",
        )
        .await;
        assert_eq!(status, 421, "{path}");
    }
    // Drains and reloads too; the probes and the static page stay open for anyone.
    let text = "POST /admin/drain HTTP/1.1\r\nHost: attacker.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let answer = raw(r.admin_addr, text.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    for path in ["/livez", "/readyz", "/health", "/"] {
        let (status, answer) = with_host(r.admin_addr, path, "attacker.example", "").await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    r.shutdown().await;

    // With a token, the token is what protects: any Host that brings it is served.
    let r = support::start(&base(
        &format!("{{ listen: \"127.0.0.1:0\", token: \"{TOKEN}\" }}"),
        &up.url(),
    ))
    .await;
    let (status, answer) = with_host(
        r.admin_addr,
        "/admin/config",
        "rampart.example.com",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    r.shutdown().await;
}

// === what /health tells anyone ===

#[tokio::test]
async fn public_health_carries_no_error_text_or_addresses() {
    let (_hold, dead) = support::refusing_addr();
    let (_hold_pg, dead_pg) = support::refusing_addr();
    let yaml = format!(
        r#"admin: {{ listen: "127.0.0.1:0", token: "{TOKEN}" }}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    health_path: /healthz
    routes: [{{ upstream: up }}]
upstreams:
  up:
    endpoints: ["http://{dead}"]
    connect_timeout: 1s
    health_check: {{ interval: 200ms, timeout: 500ms, unhealthy_after: 1, critical: false }}
dependencies:
  postgres:
    url: "postgres://app:pgpass@{dead_pg}/app"
    check: {{ interval: 200ms, timeout: 500ms, critical: false }}
"#
    );
    let r = support::start(&yaml).await;
    let admin = r.admin_addr;
    let detailed = |r: &rampart::app::Running| {
        let mut req = support::get(r.admin_addr, "/admin/health");
        req.headers_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        async move {
            let (resp, body) = support::send(&support::http1(), req).await;
            (resp.status(), String::from_utf8_lossy(&body).into_owned())
        }
    };
    // The detail, for the operator who has the token: the errors, the endpoint addresses.
    assert_eventually!(
        {
            let (_, body) = detailed(&r).await;
            body.matches("refused").count() >= 2
        },
        "no errors in /admin/health: {}",
        detailed(&r).await.1
    );
    let (status, body) = detailed(&r).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&dead.to_string()), "{body}");
    // Without the token, /admin/health is closed like the rest of /admin.
    let (status, _) = with_host(admin, "/admin/health", &admin.to_string(), "").await;
    assert_eq!(status, 401);

    let main = r.addr("main").unwrap();
    for (addr, path) in [(admin, "/health"), (main, "/healthz")] {
        let (resp, body) = support::send(&support::http1(), support::get(addr, path)).await;
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(resp.status() == 200 || resp.status() == 503, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["checks"]["postgres"]["status"], "unhealthy", "{body}");
        assert_eq!(v["checks"]["upstream:up"]["status"], "unhealthy", "{body}");
        assert_eq!(v["checks"]["upstream:up"]["total_endpoints"], 1, "{body}");
        for leak in [
            "error",
            "refused",
            "127.0.0.1",
            &dead.port().to_string(),
            &dead_pg.port().to_string(),
            "pgpass",
        ] {
            assert!(!body.contains(leak), "{path} shows {leak:?}: {body}");
        }
    }
    r.shutdown().await;
}

// === secrets ===

#[tokio::test]
async fn admin_config_shows_no_secret_of_a_file_full_of_them() {
    let up = Upstream::start().await;
    let (_hold, dead) = support::refusing_addr();
    let port = dead.port();
    let yaml = format!(
        r#"admin: {{ listen: "127.0.0.1:0", token: "{TOKEN}" }}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes: [{{ upstream: up }}]
upstreams:
  up: {{ endpoints: ["{url}"] }}
redis: {{ url: "redis://cacheuser:redis%20pa55@127.0.0.1:{port}/2" }}
dependencies:
  postgres:
    url: "host=127.0.0.1 port={port} user=app password = 'pg pa\\'ss' dbname=app"
alerts:
  sinks:
    - {{ type: slack, url: "https://hooks.example.com/services/T0/B0/SLACKSECRET" }}
    - {{ type: webhook, url: "https://hookuser:hookpass@ops.example.com/x?key=QUERYSECRET" }}
"#,
        url = up.url()
    );
    let r = support::start(&yaml).await;
    let config = rampart::config::Config::clone(&r.config());
    let debug = format!("{config:?} {config:#?}");
    let mut req = support::get(r.admin_addr, "/admin/config");
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (resp, body) = support::send(&support::http1(), req).await;
    assert_eq!(resp.status(), 200);
    let shown = String::from_utf8_lossy(&body).into_owned();
    for secret in [
        TOKEN,
        "t0ken",
        "pa55",
        "redis%20",
        "pg pa",
        "pa\\'ss",
        "'ss",
        "SLACKSECRET",
        "services/T0",
        "hookpass",
        "QUERYSECRET",
    ] {
        assert!(
            !shown.contains(secret),
            "/admin/config shows {secret:?}: {shown}"
        );
        assert!(!debug.contains(secret), "Debug shows {secret:?}: {debug}");
    }
    // What is not secret is still there to read.
    let v: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["admin"]["token"], "[redacted]");
    assert_eq!(
        v["redis"]["url"],
        format!("redis://cacheuser:[redacted]@127.0.0.1:{port}/2")
    );
    let pg = &v["dependencies"]["postgres"]["url"];
    assert_eq!(pg["hosts"], serde_json::json!(["127.0.0.1"]), "{pg}");
    assert_eq!(pg["ports"], serde_json::json!([port]), "{pg}");
    assert_eq!(
        (pg["user"].as_str(), pg["dbname"].as_str()),
        (Some("app"), Some("app"))
    );
    assert_eq!(pg["password"], "[redacted]");
    assert_eq!(
        v["alerts"]["sinks"][0]["url"],
        "https://hooks.example.com/[redacted]"
    );
    r.shutdown().await;
}

/// The Kubernetes examples: the token from a Secret, the probes on the admin port and
/// without credentials (deploy.rs checks the rest of each pod).
#[test]
fn the_kubernetes_example_takes_the_token_from_a_secret_and_keeps_the_probes_open() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/kubernetes");
    for file in [
        "sidecar/deployment.yaml",
        "sidecar-legacy/deployment.yaml",
        "edge/deployment.yaml",
    ] {
        let deployment = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        marked_yaml::parse_yaml(0, &deployment).unwrap_or_else(|e| panic!("{file}: {e}"));
        let token_env = deployment
            .split("- name: RAMPART_ADMIN_TOKEN")
            .nth(1)
            .expect("RAMPART_ADMIN_TOKEN set");
        let token_env: String = token_env.lines().take(5).collect::<Vec<_>>().join("\n");
        assert!(
            token_env.contains("valueFrom:") && token_env.contains("secretKeyRef:"),
            "{file}: {token_env}"
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            let block: String = deployment
                .split(&format!("{probe}:"))
                .nth(1)
                .unwrap_or_else(|| panic!("{file}: no {probe}"))
                .lines()
                .take(4)
                .collect::<Vec<_>>()
                .join("\n");
            assert!(block.contains("port: admin"), "{file} {probe}: {block}");
            assert!(
                !block.contains("httpHeaders"),
                "{file}: {probe} sends credentials"
            );
        }
        assert!(deployment.contains("path: /readyz") && deployment.contains("path: /livez"));
        assert!(deployment.contains("containerPort: 9901"), "{file}");
    }
}
