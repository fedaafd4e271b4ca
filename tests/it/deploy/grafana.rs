//! examples/grafana/rampart.json: a dashboard Grafana loads, querying only what a real
//! rampart exports.

use std::collections::HashSet;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

use super::read;
use crate::support::{self, Upstream, get, http1, send};

fn dashboard() -> Value {
    serde_json::from_str(&read("examples/grafana/rampart.json")).expect("valid JSON")
}

/// Every panel, rows' nested ones included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// (panel title, expr) for every query of every panel.
fn queries(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"].as_array().into_iter().flatten().map(move |t| {
                (
                    title.clone(),
                    t["expr"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect()
}

/// The `rampart_*` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("rampart_") {
        let len = rest[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len() - i);
        out.push(&rest[i..i + len]);
        rest = &rest[i + len..];
    }
    out
}

/// What Grafana needs to load and import it: a schema version, a uid and title, unique
/// panel ids, panels inside the 24-column grid and not overlapping, every panel and query on
/// the `datasource` variable (a Prometheus data source chosen at import), every query with
/// a refId unique in its panel, and every series filtered by the job and instance variables.
#[test]
fn the_grafana_dashboard_is_a_valid_dashboard() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    for name in ["job", "instance"] {
        let v = vars.iter().find(|v| v["name"] == name).expect(name);
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}");
    }

    let mut ids = HashSet::new();
    let mut boxes: Vec<(&str, [u64; 4])> = Vec::new();
    for p in panels(&d) {
        let title = p["title"].as_str().expect("a title");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "panel id {id} twice ({title})");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(w >= 1 && h >= 1 && x + w <= 24, "{title}: {g}");
        for (other, [ox, oy, ow, oh]) in &boxes {
            let apart = x + w <= *ox || *ox + ow <= x || y + h <= *oy || *oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((title, [x, y, w, h]));
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}");
        let mut refs = HashSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "{title}: refId twice"
            );
            let expr = t["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: {expr}");
            // Each selector is filtered by the dashboard's variables.
            for (i, _) in expr.match_indices("rampart_") {
                let after = &expr[i..];
                let sel = after
                    .find('{')
                    .filter(|b| !after[..*b].contains([' ', ')']))
                    .map(|b| &after[b..after[b..].find('}').unwrap() + b]);
                let sel = sel.unwrap_or_else(|| panic!("{title}: unfiltered series in {expr}"));
                assert!(
                    sel.contains(r#"job=~"$job""#) && sel.contains(r#"instance=~"$instance""#),
                    "{title}: {sel}"
                );
            }
        }
    }
    assert!(ids.len() >= 15, "{} panels", ids.len());
}

/// The issue's list: each of these is queried by some panel.
#[test]
fn the_grafana_dashboard_covers_the_runbook_signals() {
    let d = dashboard();
    let used: HashSet<String> = queries(&d)
        .iter()
        .flat_map(|(_, e)| {
            metric_names(e)
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    for name in [
        "rampart_http_requests_total",
        "rampart_http_request_duration_seconds_bucket",
        "rampart_http_stream_first_byte_seconds_bucket",
        "rampart_http_streams_active",
        "rampart_circuit_breaker_state",
        "rampart_ratelimit_decisions_total",
        "rampart_ratelimit_fallback_active",
        "rampart_health_check_status",
        "rampart_draining",
        "rampart_cache_lookups_total",
    ] {
        assert!(used.contains(name), "no panel queries {name}");
    }
}

/// Every name the dashboard queries (panels and variables) is in a real scrape of a rampart
/// that served some of everything: a cached route, a rate-limited one (Redis down: the
/// memory fallback), an SSE stream, a shed request, a dead upstream whose breaker opened,
/// dependency checks.
#[tokio::test]
async fn the_grafana_dashboard_queries_only_exported_metrics() {
    let up = Upstream::start().await;
    let (dead_socket, dead) = support::refusing_addr();
    // Redis down (a refused port): the rate limits' fallback and the Redis errors.
    let (dead_redis_socket, dead_redis) = support::refusing_addr();
    let r = support::start(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: false }}
redis: {{ url: "redis://{dead_redis}", timeout: 50ms }}
rate_limits:
  per_ip: {{ points: 1000, per: 60s, store: memory }}
  shared: {{ points: 1000, per: 60s, store: redis }}
caches:
  agents: {{ ttl: 30s, store: memory }}
dependencies:
  memory: {{ check: {{ interval: 10s }} }}
  redis: {{ check: {{ interval: 10s, timeout: 1s }} }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    max_in_flight: 1
    routes:
      - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: fastgpt }}
      - {{ name: agents, match: {{ path_prefix: /agents }}, upstream: backend, cache: agents }}
      - {{ name: api, match: {{ path_prefix: / }}, upstream: backend, rate_limits: [per_ip, shared] }}
upstreams:
  backend:
    endpoints: ["{}"]
  fastgpt:
    endpoints: ["http://{dead}"]
    connect_timeout: 1s
    retry: {{ attempts: 2, connect_wait: off }}
    circuit_breaker: {{ failures: 3, open_for: 1m }}
"#,
        up.url()
    ))
    .await;
    let addr = r.addr("main").unwrap();
    let c = http1();
    for _ in 0..3 {
        assert_eq!(send(&c, get(addr, "/ok")).await.0.status(), 200);
    }
    let post = Request::post(format!("http://{addr}/status/500"))
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    assert_eq!(send(&c, post).await.0.status(), 500);
    let (resp, body) = send(&c, get(addr, "/sse?n=3&gap=20")).await;
    assert_eq!(resp.status(), 200);
    assert!(body.starts_with(b"id: 0"));
    for _ in 0..2 {
        assert_eq!(send(&c, get(addr, "/agents")).await.0.status(), 200);
    }
    // One request in flight: the next is shed (503 OVERLOADED).
    let slow =
        tokio::spawn(async move { send(&http1(), get(addr, "/delay/1000")).await.0.status() });
    let mut shed = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if send(&c, get(addr, "/ok")).await.0.status() == 503 {
            shed = true;
            break;
        }
    }
    assert!(shed, "never shed with one request in flight");
    assert_eq!(slow.await.unwrap(), 200);
    // Connect errors until the breaker opens, then rejections.
    for _ in 0..5 {
        let status = send(&c, get(addr, "/chat/x")).await.0.status();
        assert!(status == 502 || status == 503, "{status}");
    }
    let (resp, body) = send(&c, get(r.admin_addr, "/metrics")).await;
    assert_eq!(resp.status(), 200);
    let m = String::from_utf8(body.to_vec()).unwrap();
    drop((dead_socket, dead_redis_socket));
    let exported: HashSet<&str> = m
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let d = dashboard();
    let mut used = queries(&d);
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            used.push((format!("variable {}", v["name"]), q.to_owned()));
        }
    }
    let mut checked = 0;
    for (title, expr) in &used {
        for name in metric_names(expr) {
            checked += 1;
            assert!(
                exported.contains(name),
                "{title} queries {name}, not in the scrape:\n{m}"
            );
        }
    }
    assert!(checked >= 30, "{checked}");
    r.shutdown().await;
}
