//! Dependency health against real servers: Postgres killed, restarted and frozen; Redis
//! killed; active upstream checks steering traffic; and the probe endpoints answering from
//! cache (1,000 concurrent calls, zero queries). The switch-over to a replica is a drill
//! (tests/it/drills.rs).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::assert_eventually;
use crate::support::postgres::{CountingRelay, PgServer};
use crate::support::redis::RedisServer;
use crate::support::*;

/// (status, body) of one admin call.
async fn probe(admin: SocketAddr, path: &str) -> (u16, String) {
    let (resp, body) = send(&http1(), get(admin, path)).await;
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The text of `"key":` inside the object of check `check` in a `/health` body (a string
/// without its quotes, or a number). Dependency checks are flat objects, so the object ends
/// at the first `}`.
pub(crate) fn field(body: &str, check: &str, key: &str) -> Option<String> {
    let start = body.find(&format!("\"{check}\":{{"))?;
    let obj = &body[start..];
    let obj = &obj[..obj.find('}')?];
    let at = obj.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &obj[at..];
    Some(match rest.strip_prefix('"') {
        Some(s) => s[..s.find('"')?].to_owned(),
        None => rest.split([',', '}']).next().unwrap_or_default().to_owned(),
    })
}

pub(crate) fn status_of(body: &str, check: &str) -> String {
    field(body, check, "status").unwrap_or_default()
}

/// `one_route` to `up` plus `extra` top-level sections.
fn config(up: &str, extra: &str) -> String {
    format!("{}{extra}", one_route(up, "", ""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_postgres_killed_then_restarted_redis_still_reported() {
    let test = "health_postgres_killed_then_restarted_redis_still_reported";
    let Some(mut pg) = PgServer::own(test).await else {
        return;
    };
    let Some(redis) = RedisServer::any(test).await else {
        return;
    };
    let up = Upstream::start().await;
    let interval = Duration::from_millis(500);
    let px = start(&config(
        &up.url(),
        &format!(
            "redis: {{ url: \"{}\", timeout: 500ms }}\n\
             dependencies:\n\
             \x20 postgres:\n\
             \x20   url: \"{}\"\n\
             \x20   check: {{ interval: 500ms, timeout: 1s, critical: true }}\n\
             \x20 redis: {{ check: {{ interval: 500ms, timeout: 1s }} }}\n\
             \x20 memory: {{ check: {{ interval: 500ms }} }}\n",
            redis.url, pg.url
        ),
    ))
    .await;
    let admin = px.admin_addr;
    assert_eventually!(
        probe(admin, "/health").await.0 == 200,
        "never healthy: {}",
        probe(admin, "/health").await.1
    );
    let (_, body) = probe(admin, "/admin/health").await;
    assert_eq!(status_of(&body, "postgres"), "healthy", "{body}");
    assert_eq!(field(&body, "postgres", "role").as_deref(), Some("primary"));
    assert_eq!(
        field(&body, "postgres", "server"),
        Some(format!("127.0.0.1:{}", pg.port))
    );
    assert_eq!(status_of(&body, "redis"), "healthy", "{body}");
    assert_eq!(field(&body, "redis", "role").as_deref(), Some("primary"));
    assert!(field(&body, "memory", "used_pct").is_some(), "{body}");
    assert_eq!(probe(admin, "/readyz").await, (200, "ready\n".into()));

    pg.kill();
    assert_eventually!(
        probe(admin, "/health").await.0 == 503,
        "still 200 with Postgres killed: {}",
        probe(admin, "/health").await.1
    );
    let (_, body) = probe(admin, "/admin/health").await;
    assert!(body.starts_with("{\"status\":\"unhealthy\""), "{body}");
    assert_eq!(status_of(&body, "postgres"), "unhealthy", "{body}");
    assert!(field(&body, "postgres", "error").is_some(), "{body}");
    // The dead database does not hide Redis's state.
    assert_eq!(status_of(&body, "redis"), "healthy", "{body}");
    let (code, text) = probe(admin, "/readyz").await;
    assert_eq!(
        (code, text.as_str()),
        (503, "not ready: postgres unhealthy\n")
    );
    assert_eq!(probe(admin, "/livez").await.0, 200);

    pg.restart();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(10);
    loop {
        if probe(admin, "/health").await.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not healthy after the restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = back.elapsed();
    eprintln!("health: Postgres back -> /health 200 in {took:?} (interval {interval:?})");
    assert!(
        took <= interval * 2,
        "healthy {took:?} after the restart, more than two intervals"
    );
    let metrics = probe(admin, "/metrics").await.1;
    assert!(
        metrics.contains("rampart_health_check_status{check=\"postgres\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("rampart_health_check_transitions_total{check=\"postgres\",to=\"down\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rampart_pool_connections{pool=\"postgres\",state=\"idle\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rampart_pool_waiting{pool=\"redis\"} 0"),
        "{metrics}"
    );
    assert!(px.shutdown().await);
}

/// Postgres is shared by every replica: by default its failure degrades `/health` (200)
/// and leaves `/readyz` ready, so a database blip does not take every replica out of the
/// Service at once. `critical: true` opts back into 503 and not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_postgres_down_degrades_by_default_and_is_unready_only_when_critical() {
    let test = "health_postgres_down_degrades_by_default_and_is_unready_only_when_critical";
    let Some(mut pg) = PgServer::own(test).await else {
        return;
    };
    let up = Upstream::start().await;
    let yaml = |critical: &str| {
        config(
            &up.url(),
            &format!(
                "dependencies:\n\
                 \x20 postgres:\n\
                 \x20   url: \"{}\"\n\
                 \x20   check: {{ interval: 200ms, timeout: 1s{critical} }}\n",
                pg.url
            ),
        )
    };
    let default = start(&yaml("")).await;
    let critical = start(&yaml(", critical: true")).await;
    for px in [&default, &critical] {
        assert_eventually!(
            probe(px.admin_addr, "/health").await.0 == 200,
            "never healthy: {}",
            probe(px.admin_addr, "/health").await.1
        );
    }
    pg.kill();
    for px in [&default, &critical] {
        assert_eventually!(
            status_of(&probe(px.admin_addr, "/health").await.1, "postgres") == "unhealthy",
            "Postgres killed but reported {}",
            probe(px.admin_addr, "/health").await.1
        );
    }
    let (code, body) = probe(default.admin_addr, "/health").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("{\"status\":\"degraded\""), "{body}");
    assert_eq!(
        field(&body, "postgres", "critical").as_deref(),
        Some("false")
    );
    assert_eq!(
        probe(default.admin_addr, "/readyz").await,
        (200, "ready\n".into())
    );

    let (code, body) = probe(critical.admin_addr, "/health").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("{\"status\":\"unhealthy\""), "{body}");
    assert_eq!(
        field(&body, "postgres", "critical").as_deref(),
        Some("true")
    );
    assert_eq!(
        probe(critical.admin_addr, "/readyz").await,
        (503, "not ready: postgres unhealthy\n".into())
    );
    assert!(default.shutdown().await);
    assert!(critical.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_redis_killed_is_degraded_not_unready() {
    let test = "health_redis_killed_is_degraded_not_unready";
    let Some(mut redis) = RedisServer::own(test).await else {
        return;
    };
    let up = Upstream::start().await;
    let yaml = format!(
        "{}    health_check: {{ path: /health, interval: 300ms, critical: true }}\n\
         redis: {{ url: \"{}\", timeout: 300ms }}\n\
         dependencies:\n\
         \x20 redis: {{ check: {{ interval: 300ms, timeout: 500ms }} }}\n\
         \x20 memory: {{}}\n",
        one_route(&up.url(), "", ""),
        redis.url
    );
    let px = start(&yaml).await;
    let admin = px.admin_addr;
    assert_eventually!(
        probe(admin, "/health")
            .await
            .1
            .starts_with("{\"status\":\"healthy\""),
        "never healthy: {}",
        probe(admin, "/health").await.1
    );
    let (_, body) = probe(admin, "/health").await;
    assert_eq!(status_of(&body, "upstream:up"), "healthy", "{body}");

    redis.kill();
    assert_eventually!(
        status_of(&probe(admin, "/health").await.1, "redis") == "unhealthy",
        "Redis killed but reported {}",
        probe(admin, "/health").await.1
    );
    let (code, body) = probe(admin, "/health").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("{\"status\":\"degraded\""), "{body}");
    assert_eq!(field(&body, "redis", "critical").as_deref(), Some("false"));
    assert_eq!(probe(admin, "/readyz").await, (200, "ready\n".into()));

    redis.restart().await;
    assert_eventually!(
        probe(admin, "/health")
            .await
            .1
            .starts_with("{\"status\":\"healthy\""),
        "not healthy after Redis came back: {}",
        probe(admin, "/health").await.1
    );
    assert!(px.shutdown().await);
}

/// A Redis restart that lasts ~0.2 s, twice, each just after a check: the pooled
/// connections are stale afterwards (broken pipe, EOF). The check reconnects and asks
/// again within the same probe, so the checks that run once Redis is back (all of them
/// here) pass: at most one failed check per restart, and none in this timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_redis_restart_costs_at_most_one_failed_check() {
    let test = "health_redis_restart_costs_at_most_one_failed_check";
    let Some(mut redis) = RedisServer::own(test).await else {
        return;
    };
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        &format!(
            "redis: {{ url: \"{}\", timeout: 300ms }}\n\
             dependencies:\n\
             \x20 redis: {{ check: {{ interval: 1s, timeout: 1s }} }}\n",
            redis.url
        ),
    ))
    .await;
    let admin = px.admin_addr;
    assert_eventually!(
        status_of(&probe(admin, "/admin/health").await.1, "redis") == "healthy",
        "never healthy: {}",
        probe(admin, "/admin/health").await.1
    );
    let down = |m: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("rampart_health_check_transitions_total{check=\"redis\",to=\"down\"}")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = down(&probe(admin, "/metrics").await.1);
    let mut longest = 0u32;
    let mut errors = Vec::new();
    let mut took = Vec::new();
    for _ in 0..2 {
        // Right after a check (jitter is 10 % of 1 s): Redis is back long before the next.
        assert_eventually!(
            field(
                &probe(admin, "/admin/health").await.1,
                "redis",
                "checked_ms_ago"
            )
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n < 50),
            "no fresh check: {}",
            probe(admin, "/admin/health").await.1
        );
        let restarted = Instant::now();
        redis.kill();
        tokio::time::sleep(Duration::from_millis(200)).await;
        redis.restart().await;
        took.push(restarted.elapsed());
        // Watch three checks: the longest failing streak and the errors seen.
        let deadline = Instant::now() + Duration::from_millis(3200);
        while Instant::now() < deadline {
            let body = probe(admin, "/admin/health").await.1;
            let n = field(&body, "redis", "consecutive_failures")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            longest = longest.max(n);
            if let Some(e) = field(&body, "redis", "error")
                && !errors.contains(&e)
            {
                errors.push(e);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let downs = down(&probe(admin, "/metrics").await.1) - before;
    eprintln!(
        "health: Redis restarts took {took:?}; failed checks: {downs} streak(s), longest \
         {longest}; errors {errors:?}"
    );
    assert!(
        downs == 0 && longest == 0,
        "restarts of {took:?} cost {downs} failing streak(s), the longest {longest} checks: \
         {errors:?}"
    );
    assert_eq!(
        status_of(&probe(admin, "/admin/health").await.1, "redis"),
        "healthy"
    );
    assert!(px.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_postgres_frozen_times_out_and_health_answers_fast() {
    let test = "health_postgres_frozen_times_out_and_health_answers_fast";
    let Some(mut pg) = PgServer::own(test).await else {
        return;
    };
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        &format!(
            "dependencies:\n\
             \x20 postgres:\n\
             \x20   url: \"{}\"\n\
             \x20   check: {{ interval: 300ms, timeout: 700ms, critical: true }}\n\
             \x20 memory: {{}}\n",
            pg.url
        ),
    ))
    .await;
    let admin = px.admin_addr;
    assert_eventually!(
        probe(admin, "/health").await.0 == 200,
        "never healthy: {}",
        probe(admin, "/health").await.1
    );

    pg.freeze();
    let mut slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let t = Instant::now();
        let (code, body) = probe(admin, "/health").await;
        slowest = slowest.max(t.elapsed());
        if code == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still healthy while frozen: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The cause, for the operator (the public /health never shows it).
    let detail = probe(admin, "/admin/health").await.1;
    let error = field(&detail, "postgres", "error").unwrap_or_default();
    assert_eq!(error, "no answer within 700ms", "{detail}");
    let latency: f64 = field(&body, "postgres", "latency_ms")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    assert!(
        (690.0..1500.0).contains(&latency),
        "the probe should end at its 700 ms timeout, took {latency} ms"
    );
    // Every /health call meanwhile answered from the cache.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(probe(admin, "/health").await.0, 503);
        slowest = slowest.max(t.elapsed());
    }
    eprintln!(
        "health: Postgres frozen, probe timed out at {latency} ms, slowest /health {slowest:?}"
    );
    assert!(
        slowest < Duration::from_millis(200),
        "slowest /health {slowest:?}"
    );

    pg.thaw();
    assert_eventually!(
        probe(admin, "/health").await.0 == 200,
        "not healthy after thawing: {}",
        probe(admin, "/health").await.1
    );
    assert!(px.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_thousand_concurrent_calls_send_no_query() {
    let test = "health_thousand_concurrent_calls_send_no_query";
    let Some(pg) = PgServer::any(test).await else {
        return;
    };
    // Every query rampart sends goes through the relay, which counts them.
    let relay = CountingRelay::start(SocketAddr::from(([127, 0, 0, 1], pg.port))).await;
    let url = pg.url.replace(
        &format!(":{}/", pg.port),
        &format!(":{}/", relay.addr.port()),
    );
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        &format!(
            "dependencies:\n\
             \x20 postgres:\n\
             \x20   url: \"{url}\"\n\
             \x20   check: {{ interval: 1h, timeout: 2s, critical: true }}\n"
        ),
    ))
    .await;
    let admin = px.admin_addr;
    assert_eventually!(
        probe(admin, "/health").await.0 == 200,
        "never healthy: {}",
        probe(admin, "/health").await.1
    );
    let before = relay.queries();
    assert!(before >= 1, "the probe's own query went through the relay");

    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let ok = ok.clone();
        tasks.push(tokio::spawn(async move {
            let r = crate::support::process::admin_get(admin, "/health").await;
            if matches!(r, Some((200, _))) {
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(ok.load(Ordering::Relaxed), 1000);
    // Anything sent would have arrived by now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        relay.queries(),
        before,
        "/health calls reached the database"
    );
    eprintln!(
        "health: 1000 concurrent /health -> 1000 x 200, {} queries before and after",
        before
    );
    assert!(px.shutdown().await);
}

/// An HTTP server whose `/hc` answers 200 or 503 as `healthy` says; anything else 200.
struct Flaky {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    /// Requests other than `/hc`.
    traffic: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Flaky {
    async fn start(healthy: bool) -> Flaky {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let flag = Arc::new(AtomicBool::new(healthy));
        let traffic = Arc::new(AtomicUsize::new(0));
        let (f, t) = (flag.clone(), traffic.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (f, t) = (f.clone(), t.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (f, t) = (f.clone(), t.clone());
                        async move {
                            let status = if req.uri().path() == "/hc" {
                                if f.load(Ordering::SeqCst) {
                                    StatusCode::OK
                                } else {
                                    StatusCode::SERVICE_UNAVAILABLE
                                }
                            } else {
                                t.fetch_add(1, Ordering::SeqCst);
                                StatusCode::OK
                            };
                            let mut r = Response::new(Full::new(Bytes::from_static(b"x")));
                            *r.status_mut() = status;
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Flaky {
            addr,
            healthy: flag,
            traffic,
            task,
        }
    }
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn two_endpoints(a: SocketAddr, b: SocketAddr, health_check: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes: [{{ upstream: up }}]
upstreams:
  up:
    endpoints: ["http://{a}", "http://{b}"]
{health_check}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_upstream_check_takes_a_failing_endpoint_out_of_rotation() {
    let a = Flaky::start(true).await;
    let b = Flaky::start(false).await;
    let check = "    health_check: { path: /hc, interval: 100ms, timeout: 500ms, unhealthy_after: 2, healthy_after: 2, critical: true }";
    let px = start(&two_endpoints(a.addr, b.addr, check)).await;
    let admin = px.admin_addr;
    let addr = px.addr("main").unwrap();
    assert_eventually!(
        status_of(&probe(admin, "/health").await.1, "upstream:up") == "degraded",
        "B not seen failing: {}",
        probe(admin, "/health").await.1
    );
    let (code, body) = probe(admin, "/health").await;
    // One endpoint of a critical upstream is enough to serve: degraded, still ready.
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"healthy_endpoints\":1,\"total_endpoints\":2"),
        "{body}"
    );
    assert_eq!(probe(admin, "/readyz").await.0, 200);

    let client = http1();
    for _ in 0..20 {
        let (resp, _) = send(&client, get(addr, "/work")).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(a.traffic.load(Ordering::SeqCst), 20);
    assert_eq!(b.traffic.load(Ordering::SeqCst), 0, "B failed its checks");

    // B recovers: after two good checks it is back in rotation.
    b.healthy.store(true, Ordering::SeqCst);
    assert_eventually!(
        status_of(&probe(admin, "/health").await.1, "upstream:up") == "healthy",
        "B not back: {}",
        probe(admin, "/health").await.1
    );
    for _ in 0..20 {
        send(&client, get(addr, "/work")).await;
    }
    assert!(b.traffic.load(Ordering::SeqCst) >= 5, "B back in rotation");

    // Both fail: the upstream is unhealthy, and as critical, the process unready. Requests
    // still go somewhere (better a suspect endpoint than none).
    a.healthy.store(false, Ordering::SeqCst);
    b.healthy.store(false, Ordering::SeqCst);
    assert_eventually!(
        probe(admin, "/health").await.0 == 503,
        "not unhealthy: {}",
        probe(admin, "/health").await.1
    );
    assert_eq!(
        probe(admin, "/readyz").await,
        (503, "not ready: upstream:up unhealthy\n".into())
    );
    assert_eq!(send(&client, get(addr, "/work")).await.0.status(), 200);

    // A reload without the check: its verdicts no longer steer traffic, and it is gone
    // from /health.
    b.healthy.store(false, Ordering::SeqCst);
    a.healthy.store(true, Ordering::SeqCst);
    assert_eventually!(
        probe(admin, "/health").await.0 == 200,
        "A not back: {}",
        probe(admin, "/health").await.1
    );
    let before = b.traffic.load(Ordering::SeqCst);
    let report = px.apply(parse(&two_endpoints(a.addr, b.addr, ""))).await;
    assert!(report.is_ok(), "{report:?}");
    let (code, body) = probe(admin, "/health").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"checks\":{}"), "{body}");
    for _ in 0..20 {
        send(&client, get(addr, "/work")).await;
    }
    assert!(
        b.traffic.load(Ordering::SeqCst) > before,
        "B unchecked, back in rotation"
    );
    assert!(px.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reload_keeps_verdicts_and_starts_with_dependencies_down() {
    // Nothing listens on this port: rampart starts anyway and reports it.
    let dead = crate::support::process::free_port();
    let up = Upstream::start().await;
    let yaml = |interval: &str| {
        config(
            &up.url(),
            &format!(
                "dependencies:\n\
                 \x20 postgres:\n\
                 \x20   url: \"postgres://postgres@127.0.0.1:{dead}/postgres\"\n\
                 \x20   check: {{ interval: {interval}, timeout: 500ms, critical: true }}\n"
            ),
        )
    };
    let px = start(&yaml("200ms")).await;
    let admin = px.admin_addr;
    // 503 comes at once ("not checked yet"); the probe's own error follows.
    assert_eventually!(
        field(&probe(admin, "/admin/health").await.1, "postgres", "error")
            .unwrap_or_default()
            .contains("refused"),
        "dead Postgres not reported: {}",
        probe(admin, "/admin/health").await.1
    );
    assert_eq!(probe(admin, "/health").await.0, 503);
    // Traffic is served all the same.
    let addr = px.addr("main").unwrap();
    assert_eq!(send(&http1(), get(addr, "/ok")).await.0.status(), 200);
    // A reload that changes the check keeps its verdict: no flap to "not checked yet".
    let report = px.apply(parse(&yaml("1h"))).await;
    assert!(report.is_ok(), "{report:?}");
    let body = probe(admin, "/admin/health").await.1;
    assert_eq!(status_of(&body, "postgres"), "unhealthy", "{body}");
    assert!(!body.contains("not checked yet"), "{body}");
    assert!(px.shutdown().await);
}

/// proxy.yaml on a fresh machine: nothing on the backend's port, no environment. rampart
/// starts and serves (the fastgpt listener is unaffected), and readiness reports the
/// backend. Ports are made free ones so this runs beside the demo test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_shipped_config_starts_with_the_backend_down_and_reports_it() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.yaml")).unwrap();
    let mut cfg = rampart::config::parse_str(&text, "proxy.yaml", &|_| None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = any;
    for l in &mut cfg.listeners {
        l.listen = any;
    }
    let dead = crate::support::process::free_port();
    let backend = cfg.upstreams.get_mut("backend").unwrap();
    backend.endpoints = vec![format!("http://127.0.0.1:{dead}/").parse().unwrap()];
    let px = rampart::app::start(cfg)
        .await
        .expect("starts with the backend down");
    let admin = px.admin_addr;
    assert_eq!(probe(admin, "/livez").await.0, 200);
    assert_eventually!(
        probe(admin, "/readyz").await == (503, "not ready: upstream:backend unhealthy\n".into()),
        "readiness: {:?}",
        probe(admin, "/readyz").await
    );
    let (code, body) = probe(admin, "/health").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(status_of(&body, "upstream:backend"), "unhealthy", "{body}");
    assert_eq!(status_of(&body, "memory"), "healthy", "{body}");
    // Traffic still gets the proxy's own answer.
    let inbound = px.addr("inbound").unwrap();
    assert_eq!(
        send(&http1(), get(inbound, "/api/agents")).await.0.status(),
        502
    );
    assert!(px.shutdown().await);
}

/// `health_path` on a traffic listener: the /health JSON before routing, and 503 once a
/// drain starts (a load balancer that only sees this port stops sending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_path_on_a_traffic_listener_fails_when_draining() {
    let up = Upstream::start().await;
    let yaml = format!(
        "{}    health_check: {{ path: /ok, interval: 200ms }}\n\
         dependencies:\n  memory: {{}}\n\
         drain: {{ accept_grace: 1s, timeout: 3s }}\n",
        one_route(&up.url(), "", "    health_path: /healthz")
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    assert_eventually!(
        probe(addr, "/healthz")
            .await
            .1
            .starts_with("{\"status\":\"healthy\""),
        "traffic-port health: {:?}",
        probe(addr, "/healthz").await
    );
    let (code, body) = probe(addr, "/healthz").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("\"upstream:up\":{\"status\":\"healthy\""),
        "{body}"
    );
    // Answered by rampart itself: the upstream only sees its own health checks.
    let before = up.requests();
    probe(addr, "/healthz").await;
    assert!(up.requests() <= before + 1, "health_path was forwarded");
    assert_eq!(probe(addr, "/ok").await.0, 200);

    px.control().start_drain().await;
    assert_eventually!(
        probe(addr, "/healthz").await.0 == 503,
        "still 200 while draining"
    );
    let (_, body) = probe(addr, "/healthz").await;
    assert!(body.contains("\"draining\":true"), "{body}");
    assert!(px.drained().await.finished);
}

/// `sslmode=require`: TLS through rustls, the server's certificate verified against
/// `tls.ca_file`; without it (system store only) the check fails on the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_postgres_over_tls_verifies_the_certificate() {
    let test = "health_postgres_over_tls_verifies_the_certificate";
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let files = [
        ("server.crt", cert.cert.pem()),
        ("server.key", cert.signing_key.serialize_pem()),
    ];
    let Some(pg) = PgServer::own_with(
        test,
        "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key",
        &files,
    )
    .await
    else {
        return;
    };
    let dir = crate::support::process::temp_dir("pg-tls");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let up = Upstream::start().await;
    let yaml = |tls: &str| {
        config(
            &up.url(),
            &format!(
                "dependencies:\n\
                 \x20 postgres:\n\
                 \x20   url: \"postgres://postgres@127.0.0.1:{}/postgres?sslmode=require\"\n\
                 {tls}\
                 \x20   check: {{ interval: 200ms, timeout: 2s, critical: true }}\n",
                pg.port
            ),
        )
    };
    let px = start(&yaml(&format!(
        "    tls: {{ ca_file: \"{}\" }}\n",
        ca.display()
    )))
    .await;
    let admin = px.admin_addr;
    assert_eventually!(
        probe(admin, "/health").await.0 == 200,
        "not healthy over TLS: {}",
        probe(admin, "/health").await.1
    );
    let body = probe(admin, "/health").await.1;
    assert_eq!(
        field(&body, "postgres", "tls").as_deref(),
        Some("true"),
        "{body}"
    );
    // The server agrees: our session is encrypted.
    let ssl = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'rampart-health'",
        )
        .await;
    assert_eq!(ssl.as_deref(), Some("1"));
    assert!(px.shutdown().await);

    // Not trusted without the CA file: the check fails, naming the certificate.
    let px = start(&yaml("")).await;
    let admin = px.admin_addr;
    assert_eventually!(
        probe(admin, "/health").await.0 == 503
            && probe(admin, "/admin/health")
                .await
                .1
                .contains("certificate"),
        "an unknown CA was accepted: {}",
        probe(admin, "/admin/health").await.1
    );
    assert!(px.shutdown().await);
}
