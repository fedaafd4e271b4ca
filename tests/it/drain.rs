//! Draining the built binary under load: SIGTERM, rolling restart on one port
//! (SO_REUSEPORT), egress listeners, the second signal. Figures are printed; run with
//! `cargo test --test it -- drain --nocapture` to read them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::load::{self, Attempt, Http1Conn, LoadPlan, LoadStats};
use crate::support::process::{Proc, admin_get, free_port, one_shot, temp_dir};
use crate::support::*;

const GRACE: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(3);

fn config(port: u16, admin: u16, upstream: &str, extra_listeners: &str) -> String {
    format!(
        r#"admin: {{ listen: "127.0.0.1:{admin}" }}
logging: {{ level: info, access_log: false }}
drain: {{ accept_grace: {}s, timeout: {}s }}
listeners:
  - name: main
    listen: "127.0.0.1:{port}"
    routes:
      - name: all
        match: {{ path_prefix: / }}
        upstream: up
{extra_listeners}
upstreams:
  up:
    endpoints: ["{upstream}"]
    connect_timeout: 1s
"#,
        GRACE.as_secs(),
        TIMEOUT.as_secs()
    )
}

fn spawn(test: &str, name: &str, text: &str, admin: u16) -> Proc {
    let path = temp_dir(test).join(name);
    std::fs::write(&path, text).unwrap();
    Proc::spawn(&path, addr(admin))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Keep-alive load: mostly quick requests, some that take 200 ms so that requests are in
/// flight whenever a listener closes.
fn plan(port: u16, stop_on_refused: bool) -> LoadPlan {
    let mut paths = vec!["/ok".to_string(); 15];
    paths.push("/delay/200".into());
    LoadPlan {
        addr: addr(port),
        paths,
        pace: Duration::from_millis(10),
        max_requests: 5_000,
        max_time: Duration::from_secs(20),
        stop_on_refused,
    }
}

/// The rate is over the time responses kept coming (workers stop once the port is gone).
fn print_load(what: &str, stats: &LoadStats, start: Instant) {
    let span = stats
        .ok_times
        .iter()
        .max()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(start));
    println!(
        "{what}: {} ok in {:.1} s ({:.0} req/s), {} failed, {} retried (no response byte on a closed connection), {} refused",
        stats.ok,
        span.as_secs_f64(),
        stats.ok as f64 / span.as_secs_f64().max(0.001),
        stats.failures.len(),
        stats.retries,
        stats.refused
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_loses_nothing_and_ends_long_streams_with_a_final_event() {
    let up = Upstream::start().await;
    let (port, admin) = (free_port(), free_port());
    let mut px = spawn(
        "drain",
        "proxy.yaml",
        &config(port, admin, &up.url(), ""),
        admin,
    );
    px.wait_ready().await;

    // SSE: two short streams (end 1.1 s after the signal, inside the drain) and two long
    // ones (20 s, far past the 3 s deadline).
    let short: Vec<_> = (0..2)
        .map(|_| tokio::spawn(load::sse(addr(port), "/sse?n=8&gap=200")))
        .collect();
    let long: Vec<_> = (0..2)
        .map(|_| tokio::spawn(load::sse(addr(port), "/sse?n=100&gap=200")))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let load_start = Instant::now();
    let workers = load::start_load(plan(port, true), 12, &stop);

    // Readiness, polled from before the signal.
    let ready_stop = stop.clone();
    let admin_addr = px.admin;
    let readyz = tokio::spawn(async move {
        let mut first_503 = None;
        while !ready_stop.load(Ordering::Relaxed) && first_503.is_none() {
            if let Some((503, _)) = admin_get(admin_addr, "/readyz").await {
                first_503 = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first_503
    });

    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    px.signal("TERM");
    let status = px.wait_exit(TIMEOUT + Duration::from_secs(2)).await;
    let exit_after = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let stderr = px.stderr();
    let stats = load::collect(workers).await;
    let first_503 = readyz.await.unwrap();
    let mut shorts = Vec::new();
    for h in short {
        shorts.push(h.await.unwrap());
    }
    let mut longs = Vec::new();
    for h in long {
        longs.push(h.await.unwrap());
    }

    let during_grace = stats
        .ok_times
        .iter()
        .filter(|t| **t >= t0 && **t < t0 + GRACE)
        .count();
    let ready_after = first_503.map(|t| t.saturating_duration_since(t0));
    print_load("drain", &stats, load_start);
    println!(
        "drain: /readyz 503 after {:?}; {during_grace} responses (all 200) during the {GRACE:?} grace; \
         port refused from {:?} after the signal; exit {:?} after {:?} (timeout {TIMEOUT:?})",
        ready_after,
        stats.first_refused.map(|t| t.saturating_duration_since(t0)),
        status.and_then(|s| s.code()),
        exit_after
    );
    for (kind, list) in [("short", &shorts), ("long", &longs)] {
        for s in list.iter() {
            println!(
                "drain: {kind} stream: {} data events, clean end {}, last event {:?}",
                s.data_events(),
                s.clean_end,
                s.last()
            );
        }
    }

    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
    assert!(exit_after < TIMEOUT + Duration::from_secs(2));
    assert!(
        stats.failures.is_empty(),
        "failed requests: {:?}\n{stderr}",
        stats.failures
    );
    assert!(
        ready_after.is_some_and(|d| d < Duration::from_secs(1)),
        "/readyz did not turn 503 within 1 s: {ready_after:?}"
    );
    assert!(during_grace > 0, "nothing was served during the grace");
    assert!(
        stats
            .first_refused
            .is_some_and(|t| t.saturating_duration_since(t0) >= GRACE),
        "the port was released before the grace ended"
    );
    for s in &shorts {
        assert!(s.clean_end && s.error.is_none(), "{s:?}");
        assert_eq!(s.data_events(), 8, "short stream intact: {s:?}");
    }
    for s in &longs {
        assert!(s.clean_end, "long stream ended cleanly: {s:?}");
        assert!(s.data_events() >= 5, "{s:?}");
        let last = s.last();
        assert!(last.starts_with("event: error\n"), "{last:?}");
        assert!(
            last.contains("\"code\":\"SERVICE_UNAVAILABLE\""),
            "{last:?}"
        );
        let retry: u64 = last
            .lines()
            .find_map(|l| l.strip_prefix("retry: "))
            .and_then(|r| r.parse().ok())
            .expect("retry field");
        assert!((1_000..5_000).contains(&retry), "{retry}");
    }
    assert!(stderr.contains("drain timed out"), "{stderr}");
    assert!(
        stderr.contains("streams_ended_with_final_event=2"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_on_one_port_loses_nothing() {
    let up = Upstream::start().await;
    let (port, admin_a, admin_b) = (free_port(), free_port(), free_port());
    let mut a = spawn(
        "rolling",
        "a.yaml",
        &config(port, admin_a, &up.url(), ""),
        admin_a,
    );
    a.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let load_start = Instant::now();
    let workers = load::start_load(plan(port, false), 12, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // B binds the same port while A still serves.
    let mut b = spawn(
        "rolling",
        "b.yaml",
        &config(port, admin_b, &up.url(), ""),
        admin_b,
    );
    b.wait_ready().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    a.signal("TERM");
    let status = a.wait_exit(TIMEOUT + Duration::from_secs(2)).await;
    let a_exit = t0.elapsed();
    let served_before = up.requests();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let stats = load::collect(workers).await;
    let served_by_b_alone = up.requests() - served_before;
    print_load("rolling restart", &stats, load_start);
    println!(
        "rolling restart: A exited {:?} after SIGTERM in {a_exit:?}; B alone served {served_by_b_alone} requests after",
        status.and_then(|s| s.code())
    );

    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", a.stderr());
    assert!(
        stats.failures.is_empty(),
        "failed requests: {:?}\nA:\n{}\nB:\n{}",
        stats.failures,
        a.stderr(),
        b.stderr()
    );
    assert!(served_by_b_alone > 0);
    b.signal("TERM");
    assert_eq!(
        b.wait_exit(TIMEOUT + Duration::from_secs(2))
            .await
            .and_then(|s| s.code()),
        Some(0)
    );
}

/// `POST /admin/drain` starts the drain (a preStop hook); the SIGTERM that follows joins it
/// instead of counting as a second signal. The egress listener keeps accepting through the
/// grace and the drain, and the process exits once the inbound side is done and nothing is
/// connected to the egress listener, before the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_listener_serves_through_the_grace_and_the_drain() {
    let up = Upstream::start().await;
    let (port, egress, admin) = (free_port(), free_port(), free_port());
    let egress_listener = format!(
        r#"  - name: out
    listen: "127.0.0.1:{egress}"
    drain: egress
    routes:
      - match: {{ path_prefix: / }}
        upstream: up
"#
    );
    let mut px = spawn(
        "egress",
        "proxy.yaml",
        &config(port, admin, &up.url(), &egress_listener),
        admin,
    );
    px.wait_ready().await;
    // Keeps the inbound side busy until 1.9 s after the drain starts.
    let long = tokio::spawn(async move {
        match Http1Conn::new(addr(port))
            .request("GET", "/delay/2000", b"")
            .await
        {
            Attempt::Response(r) => Some((r.status, r.header("connection").map(str::to_owned))),
            _ => None,
        }
    });
    // An idle keep-alive connection, to be closed when the listener closes.
    let mut idle = TcpStream::connect(addr(port)).await.unwrap();
    idle.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"ok") {
        let mut buf = [0u8; 1024];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let t0 = Instant::now();
    let (status, body) = one_shot(px.admin, "POST", "/admin/drain", b"")
        .await
        .unwrap();
    assert_eq!((status, body.trim()), (202, "{\"result\":\"draining\"}"));
    assert_eq!(admin_get(px.admin, "/readyz").await.map(|r| r.0), Some(503));
    px.signal("TERM");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let in_grace = (
        one_shot(addr(port), "GET", "/ok", b"").await.map(|r| r.0),
        one_shot(addr(egress), "GET", "/ok", b"").await.map(|r| r.0),
    );
    tokio::time::sleep_until((t0 + GRACE + Duration::from_millis(300)).into()).await;
    // Closed by now: EOF, no bytes.
    let idle_closed = matches!(
        tokio::time::timeout(Duration::from_millis(100), idle.read(&mut [0u8; 64])).await,
        Ok(Ok(0))
    );
    let after_grace = (
        one_shot(addr(port), "GET", "/ok", b"").await.map(|r| r.0),
        one_shot(addr(egress), "GET", "/ok", b"").await.map(|r| r.0),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = one_shot(addr(egress), "GET", "/ok", b"").await.map(|r| r.0);
    let long = long.await.unwrap();
    let status = px.wait_exit(TIMEOUT + Duration::from_secs(2)).await;
    let exit_after = t0.elapsed();
    println!(
        "egress: during grace inbound {:?} egress {:?}; after grace inbound {:?} (port released) egress {:?}, then {:?}; \
         in-flight inbound {:?}; idle keep-alive closed {idle_closed}; exit {:?} after {exit_after:?} (deadline {TIMEOUT:?})",
        in_grace.0,
        in_grace.1,
        after_grace.0,
        after_grace.1,
        later,
        long,
        status.and_then(|s| s.code())
    );
    let stderr = px.stderr();
    assert_eq!(in_grace, (Some(200), Some(200)), "{stderr}");
    assert_eq!(after_grace, (None, Some(200)), "{stderr}");
    assert_eq!(later, Some(200), "{stderr}");
    // The response in flight when the listener closed says the connection closes after it.
    assert_eq!(long, Some((200, Some("close".to_string()))), "{stderr}");
    assert!(idle_closed, "the idle keep-alive connection was not closed");
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
    assert!(
        exit_after < TIMEOUT,
        "the drain should end when the inbound side is done and egress is unused"
    );
    assert!(stderr.contains("drain finished"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let up = Upstream::start().await;
    let (port, admin) = (free_port(), free_port());
    let mut px = spawn(
        "second",
        "proxy.yaml",
        &config(port, admin, &up.url(), ""),
        admin,
    );
    px.wait_ready().await;
    let hanging = tokio::spawn(one_shot(addr(port), "GET", "/hang", b""));
    tokio::time::sleep(Duration::from_millis(100)).await;
    px.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    px.signal("INT");
    let status = px.wait_exit(Duration::from_secs(2)).await;
    println!(
        "second signal: exit {:?} after {:?}",
        status.and_then(|s| s.code()),
        t0.elapsed()
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", px.stderr());
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(
        px.stderr()
            .contains("SIGINT: exited at once, 1 request(s) in flight cut"),
        "{}",
        px.stderr()
    );
    assert_eq!(hanging.await.unwrap(), None);
}

/// In-process: a stream that is silent at the deadline still gets its final event then (the
/// phase change wakes it), and the access log says `drained`.
#[tokio::test]
async fn a_silent_stream_gets_its_final_event_at_the_deadline() {
    logs::capture();
    let up = Upstream::start().await;
    let yaml = one_route(&up.url(), "", "") + "drain: { accept_grace: 0s, timeout: 1s }\n";
    let px = start(&yaml).await;
    let a = px.addr("main").unwrap();
    // One event, then ten seconds of silence.
    let stream = tokio::spawn(load::sse_with(
        a,
        "/sse?n=2&gap=10000",
        "x-request-id: silent-stream-1\r\n",
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let report = px.drain().await;
    let s = stream.await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(!report.finished, "{report:?}");
    assert_eq!((report.streams_ended, report.requests_cut), (1, 0));
    assert!(s.clean_end && s.data_events() == 1, "{s:?}");
    assert!(s.last().starts_with("event: error\n"), "{s:?}");
    crate::assert_eventually!(
        logs::lines_with("silent-stream-1").len() == 1,
        "no access line"
    );
    let line = &logs::lines_with("silent-stream-1")[0];
    assert!(line.contains("outcome=\"drained\""), "{line}");
    let m = px.encode_metrics();
    assert_eq!(
        sample(
            &m,
            "rampart_http_streams_ended_total{listener=\"main\",route=\"all\",reason=\"drain\"}"
        ),
        Some(1.0),
        "{m}"
    );
}
