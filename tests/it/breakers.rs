//! Breakers scoped to routes, health-informed recovery, `unhealthy_interval`, and what the
//! probes say about breakers (issue 13).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// Two routes on one upstream: `chat` (`/status/...`, which the scripted upstream answers
/// with the status asked for) and `agents` (everything else).
fn two_routes(url: &str, upstream_extra: &str, top_extra: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes:
      - name: chat
        match: {{ path_prefix: /status }}
        upstream: up
      - name: agents
        match: {{ path_prefix: / }}
        upstream: up
upstreams:
  up:
    endpoints: ["{url}"]
    connect_timeout: 1s
    retry: {{ attempts: 1 }}
{upstream_extra}
{top_extra}
"#
    )
}

async fn code_of(addr: std::net::SocketAddr, path: &str) -> (u16, Option<String>) {
    let (resp, body) = send(&http1(), get(addr, path)).await;
    let body = String::from_utf8_lossy(&body).to_string();
    (
        resp.status().as_u16(),
        json_field(&body, "code").map(str::to_owned),
    )
}

async fn text(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let (resp, body) = send(&http1(), get(addr, path)).await;
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).to_string(),
    )
}

fn open_circuit() -> (u16, Option<String>) {
    (503, Some("CIRCUIT_OPEN".to_owned()))
}

/// Five failed calls on the chat route.
async fn fail_chat(addr: std::net::SocketAddr) {
    for _ in 0..5 {
        assert_eq!(code_of(addr, "/status/502").await.0, 502);
    }
}

#[tokio::test]
async fn five_failures_on_one_route_open_that_routes_breaker_only() {
    let up = Upstream::start().await;
    let px = start(&two_routes(
        &up.url(),
        "    circuit_breaker: { failures: 5, open_for: 60s }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    fail_chat(addr).await;
    assert_eq!(code_of(addr, "/status/200").await, open_circuit());
    // The same upstream through the other route still flows.
    for _ in 0..3 {
        assert_eq!(code_of(addr, "/api/agents").await, (200, None));
    }

    let (_, m) = text(px.admin_addr, "/metrics").await;
    assert_eq!(
        sample(
            &m,
            r#"rampart_circuit_breaker_state{upstream="up",route="chat"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"rampart_circuit_breaker_state{upstream="up",route="agents"}"#
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"rampart_circuit_breaker_transitions_total{upstream="up",route="chat",to="open"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"rampart_circuit_breaker_rejections_total{upstream="up",route="chat"}"#
        ),
        Some(1.0),
        "{m}"
    );

    // /admin/upstreams: each breaker with its route, state and since when.
    let (_, body) = text(px.admin_addr, "/admin/upstreams").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let u = &v["upstreams"][0];
    assert_eq!(u["name"], "up", "{v}");
    assert_eq!(u["breaker"], "open", "the worst of its breakers: {v}");
    let breakers = u["breakers"].as_array().expect("breakers listed");
    let find = |route: &str| {
        breakers
            .iter()
            .find(|b| b["route"] == route)
            .unwrap_or_else(|| panic!("no breaker for {route}: {v}"))
    };
    assert_eq!(find("chat")["state"], "open", "{v}");
    assert_eq!(find("agents")["state"], "closed", "{v}");
    assert!(
        find("chat")["since"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z')),
        "{v}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn with_scope_upstream_one_breaker_is_shared_by_every_route() {
    let up = Upstream::start().await;
    let px = start(&two_routes(
        &up.url(),
        "    circuit_breaker: { failures: 5, open_for: 60s, scope: upstream }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    fail_chat(addr).await;
    assert_eq!(code_of(addr, "/status/200").await, open_circuit());
    assert_eq!(code_of(addr, "/api/agents").await, open_circuit());
    let (_, m) = text(px.admin_addr, "/metrics").await;
    assert_eq!(
        sample(
            &m,
            r#"rampart_circuit_breaker_state{upstream="up",route=""}"#
        ),
        Some(1.0),
        "{m}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn a_reload_keeps_an_open_route_breaker() {
    let up = Upstream::start().await;
    let yaml = two_routes(
        &up.url(),
        "    circuit_breaker: { failures: 5, open_for: 60s }",
        "",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    fail_chat(addr).await;
    assert_eq!(code_of(addr, "/status/200").await, open_circuit());
    let report = px
        .apply(parse(
            &yaml.replace("connect_timeout: 1s", "connect_timeout: 2s"),
        ))
        .await;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(code_of(addr, "/status/200").await, open_circuit());
    assert_eq!(code_of(addr, "/api/agents").await, (200, None));
    px.shutdown().await;
}

/// The users' drill: the backend fails five calls and is healthy again at once; its active
/// check passes the whole time. Before: 503 CIRCUIT_OPEN for the whole `open_for` (60 s).
#[tokio::test]
async fn a_passing_health_check_half_opens_an_open_breaker() {
    let up = Upstream::start().await;
    let px = start(&two_routes(
        &up.url(),
        "    circuit_breaker: { failures: 5, open_for: 60s }\n    \
         health_check: { path: /ok, interval: 5s, healthy_after: 2 }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    // Let the check see the upstream healthy first, as in the drill.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fail_chat(addr).await;
    let opened = Instant::now();
    assert_eq!(code_of(addr, "/status/200").await, open_circuit());
    let mut flowing = None;
    for _ in 0..100 {
        if code_of(addr, "/status/200").await.0 == 200 {
            flowing = Some(opened.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flowing = flowing.expect("requests flow again within 5 s");
    eprintln!("health-informed recovery: requests flow again {flowing:?} after the breaker opened");
    // The opening wakes the check (within unhealthy_interval, 1 s, jittered 10 %); the
    // confirming pass follows at fast_interval (250 ms).
    assert!(flowing < Duration::from_millis(2600), "{flowing:?}");
    // The second successful probe closes it.
    assert_eq!(code_of(addr, "/status/200").await.0, 200);
    let (_, m) = text(px.admin_addr, "/metrics").await;
    assert_eq!(
        sample(
            &m,
            r#"rampart_circuit_breaker_state{upstream="up",route="chat"}"#
        ),
        Some(0.0),
        "two successful probes closed it: {m}"
    );
    px.shutdown().await;
}

/// The chat route fails while its upstream is healthy (the LLM behind it is down): the
/// check's passes half-open the breaker once; when the probe fails too, the breaker waits
/// out `open_for` rather than letting probes through every two seconds.
#[tokio::test]
async fn a_route_that_fails_while_its_upstream_is_healthy_gets_one_health_informed_probe() {
    let up = Upstream::start().await;
    let px = start(&two_routes(
        &up.url(),
        "    circuit_breaker: { failures: 5, open_for: 60s, half_open_max_probes: 1 }\n    \
         health_check: { path: /ok, interval: 5s, healthy_after: 2 }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    fail_chat(addr).await;
    let mut probed = false;
    for _ in 0..100 {
        match code_of(addr, "/status/502").await.0 {
            502 => {
                probed = true;
                break;
            }
            503 => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("{other}"),
        }
    }
    assert!(probed, "a probe within 5 s");
    let seen = up.requests();
    // Four more checks pass in the next 4 s: the breaker stays open.
    for _ in 0..40 {
        assert_eq!(code_of(addr, "/status/200").await, open_circuit());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let checks = up.requests() - seen;
    assert!(checks >= 3, "the checks went on ({checks})");
    assert_eq!(code_of(addr, "/api/agents").await, (200, None));
    px.shutdown().await;
}

/// An endpoint ejected for 60 s (its answers failed) comes back once its check passes
/// `healthy_after` times in a row, as Envoy's `successful_active_health_check_uneject_host`.
#[tokio::test]
async fn an_ejected_endpoint_returns_when_its_check_passes() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let px = start(&two_routes(
        &format!("{}\", \"{}", a.url(), b.url()),
        "    ejection: { consecutive_failures: 2, base_ejection: 60s }\n    \
         health_check: { path: /ok, interval: 5s, healthy_after: 2 }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    // Round robin: a, b, a: the second failure in a row on `a` ejects it.
    for _ in 0..3 {
        assert_eq!(code_of(addr, "/status/502").await.0, 502);
    }
    let ejected = Instant::now();
    let mut returned = None;
    for _ in 0..100 {
        assert_eq!(code_of(addr, "/echo").await.0, 200);
        if a.counters.last_head.lock().unwrap().is_some() {
            returned = Some(ejected.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let returned = returned.expect("the endpoint gets traffic again within 5 s");
    eprintln!("ejected endpoint back in {returned:?}");
    assert!(returned < Duration::from_millis(2600), "{returned:?}");
    px.shutdown().await;
}

/// A failing upstream check is re-run at `unhealthy_interval` (default 1 s) while
/// `interval` is 5 s.
#[tokio::test]
async fn a_failing_upstream_check_runs_at_the_unhealthy_interval() {
    let up = Upstream::start().await;
    let px = start(&two_routes(
        &up.url(),
        "    health_check: { path: /status/503, interval: 5s, unhealthy_after: 1 }",
        "",
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let probes = up.requests();
    eprintln!("upstream check probes in 3.5 s while down: {probes}");
    assert!((3..=5).contains(&probes), "{probes}");
    px.shutdown().await;
}

#[tokio::test]
async fn a_failing_dependency_check_runs_at_the_unhealthy_interval() {
    let up = Upstream::start().await;
    let (_refusing, dead) = refusing_addr();
    let px = start(&two_routes(
        &up.url(),
        "",
        &format!(
            "dependencies:\n  postgres:\n    url: \"postgres://postgres@127.0.0.1:{}/postgres\"\n    \
             check: {{ interval: 5s, timeout: 500ms, unhealthy_interval: 500ms }}",
            dead.port()
        ),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (_, m) = text(px.admin_addr, "/metrics").await;
    let probes = sample(
        &m,
        r#"rampart_health_check_duration_seconds_count{check="postgres"}"#,
    )
    .unwrap_or(0.0);
    eprintln!("postgres probes in 2.2 s while down: {probes}");
    assert!((4.0..=6.0).contains(&probes), "{probes}: {m}");
    let (_, cfg) = text(px.admin_addr, "/admin/config").await;
    let v: Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(
        v["dependencies"]["postgres"]["check"]["unhealthy_interval"], "500ms",
        "{v}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn health_is_degraded_and_lists_the_open_breaker_readyz_stays_ready() {
    let up = Upstream::start().await;
    let px = start(&two_routes(
        &up.url(),
        "    circuit_breaker: { failures: 5, open_for: 60s }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    assert_eq!(text(px.admin_addr, "/readyz").await.0, 200);
    fail_chat(addr).await;
    for path in ["/health", "/admin/health"] {
        let (code, body) = text(px.admin_addr, path).await;
        assert_eq!(code, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "degraded", "{path}: {body}");
        let b = &v["breakers"][0];
        assert_eq!(
            (&b["upstream"], &b["route"], &b["state"]),
            (&"up".into(), &"chat".into(), &"open".into()),
            "{path}: {body}"
        );
        assert!(
            b["since"].as_str().is_some_and(|s| s.ends_with('Z')),
            "{body}"
        );
        assert_eq!(v["breakers"].as_array().map(Vec::len), Some(1), "{body}");
    }
    assert_eq!(
        text(px.admin_addr, "/readyz").await,
        (200, "ready\n".into())
    );
    px.shutdown().await;
}

#[tokio::test]
async fn readiness_breaker_open_not_ready_takes_the_replica_out() {
    let up = Upstream::start().await;
    let px = start(&two_routes(
        &up.url(),
        "    circuit_breaker: { failures: 5, open_for: 60s }",
        "readiness: { breaker_open: not_ready }",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    assert_eq!(text(px.admin_addr, "/readyz").await.0, 200);
    fail_chat(addr).await;
    let (code, body) = text(px.admin_addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("circuit breaker up/chat open"), "{body}");
    let (_, cfg) = text(px.admin_addr, "/admin/config").await;
    let v: Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(v["readiness"]["breaker_open"], "not_ready", "{v}");
    assert_eq!(
        v["upstreams"]["up"]["circuit_breaker"]["scope"], "route",
        "{v}"
    );
    px.shutdown().await;
}

/// The slow restart (issue 13): the only endpoint refuses connections long enough for the
/// breaker to open (open_for 60 s), then listens again on the same port. Requests flow
/// within 1 s of it listening: while the breaker is open a refused probe is followed by
/// the next one after `fast_interval` (250 ms), and so is the pass that confirms the
/// first one (HAProxy's `fastinter`). Before: both at `unhealthy_interval` (1 s), so
/// 1 to 2.2 s. Several runs, each listening at another point of the check's cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_by_refused_connects_lets_requests_through_within_a_second_of_the_listener()
 {
    let mut figures = Vec::new();
    for run in 0..5u64 {
        let (socket, dead) = refusing_addr();
        let px = start(&two_routes(
            &format!("http://{dead}"),
            "    circuit_breaker: { failures: 5, open_for: 60s }\n    \
             health_check: { path: /ok, interval: 5s, healthy_after: 2 }",
            "",
        ))
        .await;
        let addr = px.addr("main").unwrap();
        for _ in 0..5 {
            assert_eq!(code_of(addr, "/api/agents").await.0, 502);
        }
        assert_eq!(code_of(addr, "/api/agents").await, open_circuit());
        tokio::time::sleep(Duration::from_millis(1200 + 230 * run)).await;
        let listening = Instant::now();
        let up = Upstream::start_on(socket.listen(1024).unwrap());
        let mut flowing = None;
        for _ in 0..150 {
            match code_of(addr, "/api/agents").await {
                (200, _) => {
                    flowing = Some(listening.elapsed());
                    break;
                }
                other => assert_eq!(other, open_circuit()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let flowing = flowing.expect("requests flow again within 3 s");
        figures.push(flowing);
        drop(up);
        px.shutdown().await;
    }
    eprintln!("requests flow again after the listener returned: {figures:?}");
    let slowest = figures.iter().max().unwrap();
    assert!(*slowest < Duration::from_secs(1), "{figures:?}");
}

/// `fast_interval` only while a breaker or ejection of the upstream is open: with nothing
/// open, a refused check runs at `unhealthy_interval` (so the only endpoint restarting in
/// 0.4 s is never seen by three quick probes and marked down), and a passing one at
/// `interval`. Only the pass that confirms a DOWN endpoint's first pass comes quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_open_breaker_a_refused_check_is_not_probed_fast() {
    let (socket, dead) = refusing_addr();
    let px = start(&two_routes(
        &format!("http://{dead}"),
        "    health_check: { path: /ok, interval: 5s, healthy_after: 2 }",
        "",
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let probes = |m: &str| {
        sample(
            m,
            r#"rampart_health_check_duration_seconds_count{check="upstream:up"}"#,
        )
        .unwrap_or(0.0)
    };
    let (_, m) = text(px.admin_addr, "/metrics").await;
    let refused = probes(&m);
    eprintln!("refused probes in 3.5 s with nothing open: {refused}");
    assert!((3.0..=5.0).contains(&refused), "{refused}");
    // Listening: a pass within unhealthy_interval, the confirming one fast, then `interval`.
    let up = Upstream::start_on(socket.listen(1024).unwrap());
    let listening = Instant::now();
    let mut up_at = None;
    for _ in 0..100 {
        let (_, h) = text(px.admin_addr, "/admin/health").await;
        if h.contains(r#""upstream:up":{"status":"healthy""#) {
            up_at = Some(listening.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let up_at = up_at.expect("healthy within 2 s");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let passes = up.requests();
    eprintln!("healthy {up_at:?} after listening; {passes} probes in the next 3 s and before");
    assert_eq!(passes, 2, "{passes}");
    let (_, cfg) = text(px.admin_addr, "/admin/config").await;
    let v: Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(
        v["upstreams"]["up"]["health_check"]["check"]["fast_interval"], "250ms",
        "{v}"
    );
    px.shutdown().await;
}
