//! Metrics, alert rules and the admin API, against a running rampart: real sockets, an
//! in-process webhook receiver, headless Chromium for the status page.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rampart::app::Running;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::assert_eventually;
use crate::support::{self, Upstream, get, http1, sample, send};

/// A port nothing listens on: connections to it are refused.
/// A port that refuses connections for the rest of the test run: the socket is bound (so no
/// other test gets the port) and never listens; it is leaked on purpose.
async fn closed_port() -> SocketAddr {
    let (socket, addr) = support::refusing_addr();
    std::mem::forget(socket);
    addr
}

async fn admin_get(r: &Running, path: &str, token: Option<&str>) -> (Response<()>, Bytes) {
    let mut req = get(r.admin_addr, path);
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    send(&http1(), req).await
}

async fn scrape(r: &Running) -> String {
    let (resp, body) = admin_get(r, "/metrics", None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    String::from_utf8(body.to_vec()).unwrap()
}

fn two_routes(up: &str, dead: SocketAddr, extra: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes:
      - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: fastgpt }}
      - {{ name: api, match: {{ path_prefix: /, methods: [GET, HEAD, POST] }}, upstream: backend }}
upstreams:
  backend:
    endpoints: ["{up}"]
  fastgpt:
    endpoints: ["http://{dead}"]
    connect_timeout: 1s
    retry: {{ attempts: 1 }}
    circuit_breaker: {{ failures: 3, open_for: 1m }}
{extra}
"#
    )
}

/// Some of everything: 2xx, 5xx, a no-route 404, an SSE stream, connect errors.
async fn traffic(r: &Running) {
    let addr = r.addr("main").unwrap();
    let c = http1();
    for _ in 0..3 {
        let (resp, _) = send(&c, get(addr, "/ok")).await;
        assert_eq!(resp.status(), 200);
    }
    let post = Request::post(format!("http://{addr}/status/500"))
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    assert_eq!(send(&c, post).await.0.status(), 500);
    let delete = Request::delete(format!("http://{addr}/x"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, delete).await.0.status(), 404);
    let (resp, body) = send(&c, get(addr, "/sse?n=3&gap=20")).await;
    assert_eq!(resp.status(), 200);
    assert!(body.starts_with(b"id: 0"));
    assert_eq!(send(&c, get(addr, "/chat/x")).await.0.status(), 502);
}

#[tokio::test]
async fn metrics_count_requests_streams_bytes_and_errors() {
    let up = Upstream::start().await;
    let r = support::start(&two_routes(&up.url(), closed_port().await, "")).await;
    traffic(&r).await;
    let m = scrape(&r).await;
    let api = r#"listener="main",route="api",upstream="backend""#;
    let cases = [
        (format!(r#"rampart_http_requests_total{{{api},method="GET",status="2xx"}}"#), 4.0),
        (format!(r#"rampart_http_requests_total{{{api},method="POST",status="5xx"}}"#), 1.0),
        (
            r#"rampart_http_requests_total{listener="main",route="",upstream="",method="DELETE",status="4xx"}"#.to_owned(),
            1.0,
        ),
        (
            r#"rampart_http_requests_total{listener="main",route="chat",upstream="fastgpt",method="GET",status="5xx"}"#.to_owned(),
            1.0,
        ),
        (format!(r#"rampart_http_request_duration_seconds_count{{{api}}}"#), 5.0),
        (format!(r#"rampart_http_stream_duration_seconds_count{{{api}}}"#), 1.0),
        (format!(r#"rampart_http_stream_first_byte_seconds_count{{{api}}}"#), 1.0),
        (r#"rampart_http_streams_active{listener="main",route="api"}"#.to_owned(), 0.0),
        (format!(r#"rampart_http_request_bytes_total{{{api}}}"#), 5.0),
        (
            r#"rampart_upstream_errors_total{upstream="fastgpt",kind="connect_error"}"#.to_owned(),
            1.0,
        ),
        (r#"rampart_http_requests_in_flight{listener="main"}"#.to_owned(), 0.0),
        ("rampart_draining".to_owned(), 0.0),
    ];
    for (series, want) in &cases {
        assert_eq!(sample(&m, series), Some(*want), "{series} in\n{m}");
    }
    // An open client connection is counted.
    let _conn = tokio::net::TcpStream::connect(r.addr("main").unwrap())
        .await
        .unwrap();
    let open = r#"rampart_listener_connections_open{listener="main"}"#;
    assert_eventually!(
        sample(&scrape(&r).await, open) == Some(1.0),
        "{open} is not 1"
    );
    assert!(
        sample(
            &m,
            &format!(r#"rampart_http_response_bytes_total{{{api}}}"#)
        )
        .is_some_and(|v| v > 0.0)
    );
    // Streams are timed to their first byte in the latency histogram, so one slow
    // stream does not read as a slow request.
    let buckets: Vec<&str> = m
        .lines()
        .filter(|l| {
            l.starts_with("rampart_http_request_duration_seconds_bucket{")
                && l.contains(r#"route="api""#)
        })
        .collect();
    assert!(
        buckets.len() == 19 && buckets[0].contains(r#"le="0.0001""#),
        "{buckets:#?}\n{m}"
    );
    // Labels stay bounded: no paths, no addresses.
    assert!(!m.contains("/ok") && !m.contains("127.0.0.1:"), "{m}");
    r.shutdown().await;
}

/// Every `rampart_*` name the shipped Prometheus rules use is in a real scrape.
#[tokio::test]
async fn prometheus_rules_use_only_exported_metrics() {
    let up = Upstream::start().await;
    let r = support::start(&two_routes(&up.url(), closed_port().await, "")).await;
    traffic(&r).await;
    // What a TLS listener records of the certificates it serves.
    let cert = rcgen::generate_simple_self_signed(vec!["example.test".to_owned()]).unwrap();
    r.certs()
        .record("main", &[(String::new(), cert.cert.der().to_vec())])
        .unwrap();
    let m = scrape(&r).await;
    let exported: Vec<&str> = m
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for file in [
        "prometheus/rampart-alerts.yaml",
        "kubernetes/monitoring/prometheusrule.yaml",
    ] {
        let path = format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR"));
        let rules = std::fs::read_to_string(&path).unwrap();
        let mut used = Vec::new();
        for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let mut rest = line;
            while let Some(i) = rest.find("rampart_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                used.push(name);
            }
        }
        assert!(used.len() >= 8, "{file}: {used:?}");
        for name in &used {
            assert!(
                exported.contains(&name.as_str()),
                "{file} uses {name}, not in the scrape:\n{m}"
            );
        }
        // promtool, where installed, checks the PromQL itself.
        if let Ok(out) = std::process::Command::new("promtool")
            .args(["check", "rules", &path])
            .output()
            && file == "prometheus/rampart-alerts.yaml"
        {
            assert!(
                out.status.success(),
                "promtool: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    r.shutdown().await;
}

// === alerts ===

/// An in-process receiver for webhooks: records every POST body by path; the first
/// `fail_first` requests get 503 (to exercise the retries).
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let failures = Arc::new(Mutex::new(fail_first));
        let g = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (g, failures) = (g.clone(), failures.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (g, failures) = (g.clone(), failures.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        {
                            let mut f = failures.lock().unwrap();
                            if *f > 0 {
                                *f -= 1;
                                let mut r = Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                return Ok::<_, Infallible>(r);
                            }
                        }
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        g.lock().unwrap().push((path, v));
                        Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                tokio::spawn(
                    auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .into_owned(),
                );
            }
        });
        Receiver { addr, got, task }
    }

    fn on(&self, path: &str) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

#[tokio::test]
async fn alerts_fire_once_and_resolve_once_at_every_sink() {
    let up = Upstream::start().await;
    // The first delivery fails: it must be retried, not lost.
    let rx = Receiver::start(1).await;
    let hook = rx.addr;
    let alerts = format!(
        r#"
alerts:
  interval: 1s
  rules:
    - {{ name: BackendErrors, signal: error_rate, threshold: 50%, window: 3s, min_samples: 3, upstream: backend, severity: critical }}
  sinks:
    - {{ type: webhook, url: "http://{hook}/hook" }}
    - {{ type: slack, url: "http://{hook}/slack/T000/B000/secret" }}
    - {{ type: alertmanager, url: "http://{hook}" }}
"#
    );
    let r = support::start(&two_routes(&up.url(), closed_port().await, &alerts)).await;
    let addr = r.addr("main").unwrap();
    let c = http1();

    // No traffic: no data, nothing sent, however many evaluations pass.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(rx.got.lock().unwrap().is_empty());
    let (_, body) = admin_get(&r, "/admin/alerts", None).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["rules"][0]["state"], "inactive");
    assert_eq!(v["rules"][0]["value_text"], "no data");

    // Errors: it fires, once.
    for _ in 0..6 {
        send(&c, get(addr, "/status/500")).await;
    }
    assert_eventually!(
        rx.on("/hook").len() == 1,
        "webhook got {:?}",
        rx.on("/hook")
    );
    let fired = &rx.on("/hook")[0];
    assert_eq!(fired["alert"], "BackendErrors");
    assert_eq!(fired["status"], "firing");
    assert_eq!(fired["severity"], "critical");
    assert_eq!(fired["value_text"], "100.0%");
    assert_eq!(fired["upstream"], "backend");
    assert_eventually!(rx.on("/slack/T000/B000/secret").len() == 1, "slack");
    let slack = &rx.on("/slack/T000/B000/secret")[0];
    assert!(
        slack["text"]
            .as_str()
            .unwrap()
            .contains("BackendErrors firing"),
        "{slack}"
    );
    assert_eventually!(!rx.on("/api/v2/alerts").is_empty(), "alertmanager");
    let am = &rx.on("/api/v2/alerts")[0][0];
    assert_eq!(am["labels"]["alertname"], "BackendErrors");
    assert_eq!(am["labels"]["severity"], "critical");
    assert!(am["startsAt"].as_str().unwrap().ends_with('Z'));
    let (_, body) = admin_get(&r, "/admin/alerts", None).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["firing"][0]["alert"], "BackendErrors", "{v}");
    let m = scrape(&r).await;
    assert_eq!(
        sample(
            &m,
            r#"rampart_alert_firing{alert="BackendErrors",severity="critical"}"#
        ),
        Some(1.0)
    );

    // Still failing for a few evaluations: no storm.
    for _ in 0..3 {
        send(&c, get(addr, "/status/500")).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(rx.on("/hook").len(), 1);

    // Healthy again: the window moves past the errors and it resolves, once.
    let healthy = async {
        loop {
            send(&c, get(addr, "/ok")).await;
            if rx.on("/hook").len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), healthy)
        .await
        .expect("resolved within 15 s");
    assert_eq!(rx.on("/hook")[1]["status"], "resolved");
    // A resolved alert states its value against the threshold, never a comparison that
    // no longer holds ("0.0% > 50.0%").
    let resolved = rx.on("/hook")[1]["summary"].as_str().unwrap().to_owned();
    assert!(
        resolved.starts_with("error_rate back under 50.0% (")
            && resolved.ends_with("%) over 3s (upstream backend)")
            && !resolved.contains(" > "),
        "{resolved}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(rx.on("/hook").len(), 2, "{:?}", rx.on("/hook"));
    assert_eq!(rx.on("/slack/T000/B000/secret").len(), 2);
    let am_last = rx.on("/api/v2/alerts").last().cloned().unwrap();
    assert_eq!(am_last[0]["endsAt"], rx.on("/hook")[1]["at"], "{am_last}");

    let (_, body) = admin_get(&r, "/admin/alerts", None).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["firing"].as_array().unwrap().len(), 0);
    let recent: Vec<&str> = v["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(recent, ["resolved", "firing"]);
    let m = scrape(&r).await;
    assert!(
        sample(
            &m,
            r#"rampart_alert_notifications_total{sink="webhook",result="delivered"}"#
        ) == Some(2.0),
        "{m}"
    );
    r.shutdown().await;
}

// === admin API ===

#[tokio::test]
async fn admin_api_token_config_and_upstreams() {
    let up = Upstream::start().await;
    let token = "t0ken-for-the-admin-api-123";
    let extra = r#"
alerts:
  sinks: [{ type: slack, url: "https://hooks.example.com/services/T0/B0/XYZSECRET" }]
"#;
    let yaml = two_routes(&up.url(), closed_port().await, extra).replace(
        r#"admin: { listen: "127.0.0.1:0" }"#,
        &format!(r#"admin: {{ listen: "127.0.0.1:0", token: "{token}" }}"#),
    );
    let r = support::start(&yaml).await;

    // Probes and the (static) page stay open; the data needs the token.
    for open in ["/livez", "/readyz", "/"] {
        assert_eq!(admin_get(&r, open, None).await.0.status(), 200, "{open}");
    }
    for closed in [
        "/metrics",
        "/admin/config",
        "/admin/upstreams",
        "/admin/alerts",
        "/admin/status",
    ] {
        let (resp, _) = admin_get(&r, closed, None).await;
        assert_eq!(resp.status(), 401, "{closed}");
        assert!(resp.headers().contains_key("www-authenticate"));
        assert_eq!(
            admin_get(&r, closed, Some("wrong-token-wrong-token"))
                .await
                .0
                .status(),
            401
        );
        assert_eq!(
            admin_get(&r, closed, Some(token)).await.0.status(),
            200,
            "{closed}"
        );
    }
    let (resp, page) = admin_get(&r, "/", None).await;
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = String::from_utf8_lossy(&page);
    // Self-contained: nothing is loaded from elsewhere.
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("src="),
        "page loads something"
    );

    let (_, body) = admin_get(&r, "/admin/config", Some(token)).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    for secret in [token, "XYZSECRET", "services/T0"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["admin"]["token"], "[redacted]");
    assert_eq!(v["upstreams"]["fastgpt"]["circuit_breaker"]["failures"], 3);
    assert_eq!(v["alerts"]["rules"][0]["name"], "HighErrorRate");

    // Break fastgpt: its breaker opens after 3 failures.
    let addr = r.addr("main").unwrap();
    for _ in 0..4 {
        send(&http1(), get(addr, "/chat/x")).await;
    }
    let (_, body) = admin_get(&r, "/admin/upstreams", Some(token)).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    let ups = v["upstreams"].as_array().unwrap();
    let fastgpt = ups.iter().find(|u| u["name"] == "fastgpt").unwrap();
    assert_eq!(fastgpt["breaker"], "open", "{v}");
    assert_eq!(fastgpt["endpoints"][0]["ejected"], true, "{v}");
    assert_eq!(fastgpt["endpoints"][0]["health"], "no data");
    let backend = ups.iter().find(|u| u["name"] == "backend").unwrap();
    assert_eq!(
        (backend["breaker"].as_str(), backend["in_flight"].as_u64()),
        (Some("closed"), Some(0))
    );

    let (_, body) = admin_get(&r, "/admin/status", Some(token)).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    // As /health sees it: an open breaker degrades (readiness.breaker_open is ignore).
    assert_eq!(v["overall"]["status"], "degraded", "{v}");
    assert!(
        v["overall"]["reasons"]
            .as_array()
            .unwrap()
            .contains(&Value::from("circuit breaker fastgpt/chat is open")),
        "{v}"
    );
    assert_eq!(v["dependencies"], Value::Null);
    assert_eq!(v["ratelimit"]["source"], "none");
    r.shutdown().await;
}

// === the status page in a browser ===

fn chromium() -> Option<String> {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(c.to_owned());
        }
    }
    None
}

/// Runs headless Chromium on `url` with `extra` arguments; returns (stdout, stderr).
async fn run_chromium(bin: &str, url: &str, extra: &[&str]) -> (String, String) {
    let profile = std::env::temp_dir().join(format!(
        "rampart-chromium-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,900",
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finished within 90 s")
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn status_page_in_chromium_shows_the_breaker_open() {
    let Some(bin) = chromium() else {
        crate::support::skip::skip(
            "status_page_in_chromium_shows_the_breaker_open",
            crate::support::skip::Need::Chromium,
            "chromium is not installed",
            "install chromium (.ci/run does)",
        );
        return;
    };
    let up = Upstream::start().await;
    // With the health checks the page also shows: memory, and the backend's own check.
    let yaml = two_routes(
        &up.url(),
        closed_port().await,
        "alerts: { interval: 1s }\ndependencies: { memory: { check: { interval: 1s } } }",
    )
    .replace(
        &format!(r#"endpoints: ["{}"]"#, up.url()),
        &format!(
            r#"endpoints: ["{}"]
    health_check: {{ path: /ok, interval: 1s }}"#,
            up.url()
        ),
    );
    let r = support::start(&yaml).await;
    let addr = r.addr("main").unwrap();
    let c = http1();
    let url = format!("http://{}/", r.admin_addr);

    // Healthy first: fastgpt's breaker is closed on the page.
    for _ in 0..5 {
        send(&c, get(addr, "/ok")).await;
    }
    let (dom, _) = run_chromium(&bin, &url, &["--dump-dom"]).await;
    assert!(
        dom.contains(r#"data-loaded="1""#),
        "the page did not load its data:\n{dom}"
    );
    assert!(
        dom.contains(r#"data-dependency="memory""#) && dom.contains("of its limit"),
        "{dom}"
    );
    assert!(dom.contains(r#"data-breaker="closed""#), "{dom}");
    assert!(!dom.contains(r#"data-breaker="open""#), "{dom}");

    // fastgpt fails until its breaker opens; the page shows it.
    for _ in 0..4 {
        send(&c, get(addr, "/chat/x")).await;
    }
    if let Ok(path) = std::env::var("RAMPART_SCREENSHOT") {
        // For docs/: a little more history so the charts have a shape.
        for i in 0..40u64 {
            send(&c, get(addr, &format!("/delay/{}", (i * 7) % 60))).await;
            if i % 10 == 0 {
                send(&c, get(addr, "/status/502")).await;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let shot = format!("--screenshot={path}");
        run_chromium(&bin, &url, &[shot.as_str()]).await;
    }
    let (dom, log) = run_chromium(&bin, &url, &["--dump-dom"]).await;
    assert!(dom.contains(r#"data-loaded="1""#), "{dom}");
    let row = dom
        .split("<tr ")
        .find(|r| r.starts_with(r#"data-upstream="fastgpt""#))
        .unwrap_or_else(|| panic!("no fastgpt row:\n{dom}"));
    assert!(
        row.contains(r#"data-breaker="open""#) && row.contains(">OPEN<"),
        "{row}"
    );
    // An open breaker degrades the page; the CircuitBreakerOpen alert (severity critical,
    // `for: 0s`, evaluated every second here) makes it critical once it fires.
    assert!(
        dom.contains(r#"data-status="degraded""#) || dom.contains(r#"data-status="critical""#),
        "{dom}"
    );
    // No script errors: the page records them in data-error; Chromium logs every console
    // message (console.error, uncaught exceptions) as a CONSOLE line, and the page writes none.
    assert!(!dom.contains("data-error=\"page error"), "{dom}");
    let console: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
        .collect();
    assert!(console.is_empty(), "console output: {console:#?}");
    r.shutdown().await;
}

// === Redis: the rate-limit source on the status page, the fallback alert ===

#[tokio::test]
async fn rate_limit_source_and_fallback_alert_follow_redis() {
    let test = "rate_limit_source_and_fallback_alert_follow_redis";
    let Some(mut redis) = crate::support::redis::RedisServer::own(test).await else {
        return;
    };
    let up = Upstream::start().await;
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: false }}
redis: {{ url: "{url}", timeout: 100ms, pool: {{ max_size: 4 }} }}
rate_limits:
  api: {{ points: 1000, per: 60s, store: redis }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes:
      - {{ upstream: backend, rate_limits: [api] }}
upstreams:
  backend: {{ endpoints: ["{up}"] }}
alerts:
  interval: 1s
  rules:
    - {{ name: RedisDown, signal: ratelimit_fallback_active, severity: warning }}
"#,
        url = redis.url,
        up = up.url()
    );
    let r = support::start(&yaml).await;
    let addr = r.addr("main").unwrap();
    let c = http1();
    for _ in 0..5 {
        assert_eq!(send(&c, get(addr, "/ok")).await.0.status(), 200);
    }
    // The pool gauges come from the health work (`rampart_pool_*`).
    let m = scrape(&r).await;
    let idle = sample(&m, r#"rampart_pool_connections{pool="redis",state="idle"}"#).unwrap();
    let in_use = sample(
        &m,
        r#"rampart_pool_connections{pool="redis",state="in_use"}"#,
    )
    .unwrap();
    assert!(idle + in_use >= 1.0 && idle + in_use <= 4.0, "{m}");
    let status = |r: &Running| {
        let admin = r.admin_addr;
        async move {
            let (_, body) = send(&http1(), get(admin, "/admin/status")).await;
            serde_json::from_slice::<Value>(&body).unwrap()
        }
    };
    assert_eq!(status(&r).await["ratelimit"]["source"], "redis");

    // Redis gone: decisions move to memory, the page says so, the rule fires.
    redis.kill();
    let flood = async {
        loop {
            send(&c, get(addr, "/ok")).await;
            if status(&r).await["ratelimit"]["source"] == "memory" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), flood)
        .await
        .expect("the fallback shows within 10 s");
    assert_eventually!(
        {
            let (_, body) = admin_get(&r, "/admin/alerts", None).await;
            let v: Value = serde_json::from_slice(&body).unwrap();
            v["firing"][0]["alert"] == "RedisDown"
        },
        "RedisDown fires"
    );
    let s = status(&r).await;
    assert_eq!(s["overall"]["status"], "degraded", "{s}");
    r.shutdown().await;
}

/// The default CircuitBreakerOpen rule fires at the first evaluation that sees a breaker
/// open: with `for: 2m` it never fired for an opening of 60 s (the users' `open_for`).
#[tokio::test]
async fn default_breaker_alert_fires_as_the_breaker_opens() {
    let up = Upstream::start().await;
    let r = support::start(&two_routes(
        &up.url(),
        closed_port().await,
        "alerts: { interval: 1s }\n",
    ))
    .await;
    let addr = r.addr("main").unwrap();
    let alerts = |r: &Running| {
        let admin = r.admin_addr;
        async move {
            let (_, body) = send(&http1(), get(admin, "/admin/alerts")).await;
            serde_json::from_slice::<Value>(&body).unwrap()
        }
    };
    let breaker = |v: &Value| {
        v["firing"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["alert"] == "CircuitBreakerOpen")
            .cloned()
    };
    // Three connect failures open fastgpt's breaker (open_for 1m).
    for _ in 0..3 {
        send(&http1(), get(addr, "/chat/x")).await;
    }
    let opened = std::time::Instant::now();
    assert_eq!(send(&http1(), get(addr, "/chat/x")).await.0.status(), 503);
    assert_eventually!(
        breaker(&alerts(&r).await).is_some(),
        "CircuitBreakerOpen not firing {:?} after the breaker opened: {}",
        opened.elapsed(),
        alerts(&r).await
    );
    let took = opened.elapsed();
    eprintln!("alerts: CircuitBreakerOpen firing {took:?} after the breaker opened (interval 1s)");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let fired = breaker(&alerts(&r).await).unwrap();
    assert_eq!(fired["severity"], "critical");
    assert_eq!(
        fired["summary"], "breaker_open yes: open: fastgpt/chat",
        "{fired}"
    );
    r.shutdown().await;
}

#[tokio::test]
async fn alert_rules_follow_a_reload() {
    let up = Upstream::start().await;
    let dead = closed_port().await;
    let rules = |name: &str, interval: &str| {
        format!(
            "alerts:\n  interval: {interval}\n  rules:\n    - {{ name: {name}, signal: breaker_open, upstream: fastgpt }}\n"
        )
    };
    let r = support::start(&two_routes(&up.url(), dead, &rules("Before", "1s"))).await;
    let addr = r.addr("main").unwrap();
    for _ in 0..4 {
        send(&http1(), get(addr, "/chat/x")).await;
    }
    let alerts = |r: &Running| {
        let admin = r.admin_addr;
        async move {
            let (_, body) = send(&http1(), get(admin, "/admin/alerts")).await;
            serde_json::from_slice::<Value>(&body).unwrap()
        }
    };
    assert_eventually!(
        alerts(&r).await["firing"][0]["alert"] == "Before",
        "Before fires"
    );
    let report = r
        .apply(support::parse(&two_routes(
            &up.url(),
            dead,
            &rules("After", "2s"),
        )))
        .await;
    assert!(report.is_ok(), "{report:?}");
    // The removed rule is resolved at once; the new one takes over with the new interval.
    let v = alerts(&r).await;
    assert_eq!(v["interval_s"], 2);
    assert_eq!(v["rules"].as_array().unwrap().len(), 1);
    assert_eq!(v["rules"][0]["name"], "After");
    assert_eq!(v["recent"][0]["alert"], "Before");
    assert_eq!(v["recent"][0]["status"], "resolved");
    assert_eventually!(
        alerts(&r).await["firing"][0]["alert"] == "After",
        "After fires"
    );
    r.shutdown().await;
}

// === signals from the health checks ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_feed_database_memory_and_pool_signals() {
    let test = "health_checks_feed_database_memory_and_pool_signals";
    let Some(mut pg) = crate::support::postgres::PgServer::own(test).await else {
        return;
    };
    let up = Upstream::start().await;
    let extra = format!(
        r#"
dependencies:
  postgres: {{ url: "{url}", check: {{ interval: 200ms, timeout: 1s }} }}
  memory: {{ check: {{ interval: 200ms }} }}
alerts:
  interval: 1s
  rules:
    - {{ name: DbErrors, signal: db_error_rate, threshold: 1%, window: 3s, min_samples: 3, severity: critical }}
    - {{ name: Memory, signal: memory_usage, threshold: 99% }}
    - {{ name: Pool, signal: pool_usage, threshold: 99% }}
"#,
        url = pg.url
    );
    let r = support::start(&two_routes(&up.url(), closed_port().await, &extra)).await;
    let alerts = |r: &Running| {
        let admin = r.admin_addr;
        async move {
            let (_, body) = send(&http1(), get(admin, "/admin/alerts")).await;
            serde_json::from_slice::<Value>(&body).unwrap()
        }
    };
    let value = |v: &Value, rule: &str| {
        v["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == rule)
            .map(|r| r["value_text"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    // Healthy: every signal has data, nothing fires.
    assert_eventually!(
        {
            let v = alerts(&r).await;
            ["DbErrors", "Memory", "Pool"]
                .iter()
                .all(|n| value(&v, n).ends_with('%'))
        },
        "signals without data: {}",
        alerts(&r).await
    );
    let v = alerts(&r).await;
    assert_eq!(value(&v, "DbErrors"), "0.0%", "{v}");
    assert!(v["firing"].as_array().unwrap().is_empty(), "{v}");
    let (_, body) = send(&http1(), get(r.admin_addr, "/admin/status")).await;
    let s: Value = serde_json::from_slice(&body).unwrap();
    let deps: Vec<&str> = s["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(deps, ["memory", "postgres"], "{s}");
    assert!(
        s["usage"]["memory"].as_f64().is_some_and(|m| m > 0.0),
        "{s}"
    );

    // The database goes away: its probes fail, the database error rate fires.
    pg.kill();
    assert_eventually!(
        alerts(&r).await["firing"][0]["alert"] == "DbErrors",
        "DbErrors did not fire: {}",
        alerts(&r).await
    );
    let (_, body) = send(&http1(), get(r.admin_addr, "/admin/status")).await;
    let s: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(s["overall"]["status"], "critical", "{s}");
    let pgdep = s["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "postgres")
        .cloned()
        .unwrap();
    assert_eq!(pgdep["state"], "unhealthy", "{s}");
    r.shutdown().await;
}
