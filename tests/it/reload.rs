//! Configuration hot reload: through the built binary under load (SIGHUP and
//! `POST /admin/reload`), and in-process for listener moves and all-or-nothing binding.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::assert_eventually;
use crate::support::load::{self, LoadPlan};
use crate::support::process::{Proc, admin_get, free_port, one_shot, temp_dir};
use crate::support::*;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The route `all` is on line 10 (upstream, column 19) and line 11 (max_body, column 19).
fn two_upstreams(
    port: u16,
    admin: u16,
    upstream: &str,
    max_body: &str,
    u1: &str,
    u2: &str,
) -> String {
    format!(
        r#"admin: {{ listen: "127.0.0.1:{admin}" }}
logging: {{ level: info, access_log: false }}
drain: {{ accept_grace: 1s, timeout: 3s }}
listeners:
  - name: main
    listen: "127.0.0.1:{port}"
    routes:
      - name: all
        match: {{ path_prefix: / }}
        upstream: {upstream}
        max_body: {max_body}
upstreams:
  one: {{ endpoints: ["{u1}"], connect_timeout: 1s }}
  two: {{ endpoints: ["{u2}"], connect_timeout: 1s }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_switches_upstream_and_limit_and_refuses_a_bad_file() {
    let (u1, u2) = (Upstream::start().await, Upstream::start().await);
    let (port, admin) = (free_port(), free_port());
    let path = temp_dir("reload").join("proxy.yaml");
    let write = |upstream: &str, max_body: &str| {
        std::fs::write(
            &path,
            two_upstreams(port, admin, upstream, max_body, &u1.url(), &u2.url()),
        )
        .unwrap()
    };
    write("one", "1KiB");
    let mut px = Proc::spawn(&path, addr(admin));
    px.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let load_start = Instant::now();
    let workers = load::start_load(
        LoadPlan {
            addr: addr(port),
            paths: vec!["/ok".into()],
            pace: Duration::from_millis(10),
            max_requests: 5_000,
            max_time: Duration::from_secs(20),
            stop_on_refused: false,
        },
        6,
        &stop,
    );
    let body = [b'x'; 500];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = one_shot(addr(port), "POST", "/echo", &body)
        .await
        .map(|r| r.0);
    assert!(u1.requests() > 0 && u2.requests() == 0);

    // SIGHUP: new upstream, smaller body limit.
    write("two", "100B");
    px.signal("HUP");
    assert_eventually!(u2.requests() > 0, "the new upstream never saw a request");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let u1_after = u1.requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        u1.requests(),
        u1_after,
        "the old upstream still gets requests"
    );
    let after = one_shot(addr(port), "POST", "/echo", &body)
        .await
        .map(|r| r.0);

    // The same file through the admin API: ok, with a JSON report.
    let (status, ok_json) = one_shot(px.admin, "POST", "/admin/reload", b"")
        .await
        .unwrap();
    assert_eq!(status, 200, "{ok_json}");
    assert!(ok_json.starts_with("{\"result\":\"ok\""), "{ok_json}");

    // An invalid file: reported, counted, and nothing changes.
    write("nope", "0");
    let (status, err_json) = one_shot(px.admin, "POST", "/admin/reload", b"")
        .await
        .unwrap();
    let p = path.display().to_string();
    let unknown = format!(
        "{p}:10:19: listeners[0].routes[0].upstream: unknown upstream \\\"nope\\\" (known: one, two)"
    );
    let zero = format!("{p}:11:19: listeners[0].routes[0].max_body: must be greater than 0");
    assert_eq!(status, 422, "{err_json}");
    assert!(err_json.starts_with("{\"result\":\"error\""), "{err_json}");
    assert!(err_json.contains(&unknown), "{err_json}");
    assert!(err_json.contains(&zero), "{err_json}");
    px.signal("HUP");
    // Logged once for the admin reload above, once for this one.
    let logged = unknown.replace("\\\"", "\"");
    assert_eventually!(
        px.stderr().matches(&logged).count() == 2,
        "the SIGHUP reload error is not logged with its position:\n{}",
        px.stderr()
    );
    let metrics = admin_get(px.admin, "/metrics").await.unwrap().1;
    let u2_before = u2.requests();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let still = one_shot(addr(port), "POST", "/echo", &body)
        .await
        .map(|r| r.0);
    let u2_grew = u2.requests() > u2_before;

    stop.store(true, Ordering::Relaxed);
    let stats = load::collect(workers).await;
    println!(
        "reload: {} ok in {:.1} s, {} failed, {} retried; 500-byte POST before {before:?}, after {after:?}, \
         after the bad file {still:?}; upstream one {} requests, two {}",
        stats.ok,
        load_start.elapsed().as_secs_f64(),
        stats.failures.len(),
        stats.retries,
        u1.requests(),
        u2.requests()
    );
    println!("reload: admin report for the bad file: {}", err_json.trim());
    assert!(stats.failures.is_empty(), "{:?}", stats.failures);
    assert_eq!((before, after, still), (Some(200), Some(413), Some(413)));
    assert!(u2_grew, "traffic stopped after the bad file");
    assert!(
        metrics.contains("rampart_config_reloads_total{result=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rampart_config_reloads_total{result=\"error\"} 2"),
        "{metrics}"
    );
    px.signal("TERM");
    assert_eq!(
        px.wait_exit(Duration::from_secs(5))
            .await
            .and_then(|s| s.code()),
        Some(0)
    );
}

fn one_listener(port: u16, upstream: &str) -> String {
    format!(
        r#"admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: false }}
drain: {{ accept_grace: 1s, timeout: 3s }}
listeners:
  - name: main
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{ path_prefix: / }}
        upstream: up
upstreams:
  up: {{ endpoints: ["{upstream}"] }}
"#
    )
}

async fn start_from(path: &Path) -> rampart::app::Running {
    let cfg = rampart::config::Config::load(path).unwrap();
    rampart::app::start_with_file(cfg, Some(path.to_path_buf()))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_changed_listen_address_is_bound_anew_and_the_old_listener_drained() {
    let up = Upstream::start().await;
    let path = temp_dir("reload-move").join("proxy.yaml");
    let (p1, p2) = (free_port(), free_port());
    std::fs::write(&path, one_listener(p1, &up.url())).unwrap();
    let px = start_from(&path).await;
    assert_eq!(px.addr("main"), Some(addr(p1)));
    let in_flight = tokio::spawn(one_shot(addr(p1), "GET", "/delay/600", b""));
    tokio::time::sleep(Duration::from_millis(100)).await;

    std::fs::write(&path, one_listener(p2, &up.url())).unwrap();
    let report = px.reload().await;
    assert!(report.is_ok(), "{report:?}");
    let moved = format!("listener main: now on 127.0.0.1:{p2} (was 127.0.0.1:{p1})");
    assert!(report.changes.contains(&moved), "{report:?}");
    assert_eq!(px.addr("main"), Some(addr(p2)));
    assert_eq!(
        one_shot(addr(p2), "GET", "/ok", b"").await.map(|r| r.0),
        Some(200)
    );
    // The old port is released at once; its request in flight still completes.
    assert_eventually!(
        one_shot(addr(p1), "GET", "/ok", b"").await.is_none(),
        "the old listener still accepts"
    );
    assert_eq!(in_flight.await.unwrap().map(|r| r.0), Some(200));

    // Same port, other connection settings: a new socket beside the old one, no gap.
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load::start_load(
        LoadPlan {
            addr: addr(p2),
            paths: vec!["/ok".into()],
            pace: Duration::from_millis(5),
            max_requests: 2_000,
            max_time: Duration::from_secs(10),
            stop_on_refused: false,
        },
        4,
        &stop,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = one_listener(p2, &up.url()).replace("routes:", "max_connections: 500\n    routes:");
    std::fs::write(&path, text).unwrap();
    let report = px.reload().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let stats = load::collect(workers).await;
    let rebound = format!("listener main: settings changed, bound anew on 127.0.0.1:{p2}");
    assert!(report.changes.contains(&rebound), "{report:?}");
    assert!(stats.failures.is_empty(), "{:?}", stats.failures);
    assert!(stats.ok > 0);
    assert!(px.shutdown().await);
}

#[tokio::test]
async fn a_listener_that_cannot_bind_fails_the_reload_and_changes_nothing() {
    let (u1, u2) = (Upstream::start().await, Upstream::start().await);
    let path = temp_dir("reload-bind").join("proxy.yaml");
    let p1 = free_port();
    std::fs::write(&path, one_listener(p1, &u1.url())).unwrap();
    let px = start_from(&path).await;
    // Held without SO_REUSEPORT: nobody else can bind it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p2 = taken.local_addr().unwrap().port();
    std::fs::write(&path, one_listener(p2, &u2.url())).unwrap();
    let report = px.reload().await;
    assert!(!report.is_ok());
    assert!(
        report.errors[0].starts_with(&format!("cannot listen on 127.0.0.1:{p2} (listener main)")),
        "{report:?}"
    );
    // Neither the address nor the routes changed.
    assert_eq!(px.addr("main"), Some(addr(p1)));
    assert_eq!(
        one_shot(addr(p1), "GET", "/ok", b"").await.map(|r| r.0),
        Some(200)
    );
    assert_eq!((u1.requests(), u2.requests()), (1, 0));
    drop(taken);
    assert!(px.shutdown().await);
}

#[tokio::test]
async fn a_stream_started_before_a_reload_finishes_on_the_old_snapshot() {
    let (u1, u2) = (Upstream::start().await, Upstream::start().await);
    let px = start(&one_route(&u1.url(), "", "")).await;
    let a = px.addr("main").unwrap();
    let stream = tokio::spawn(load::sse(a, "/sse?n=5&gap=150"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = px.apply(parse(&one_route(&u2.url(), "", ""))).await;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(one_shot(a, "GET", "/ok", b"").await.map(|r| r.0), Some(200));
    let s = stream.await.unwrap();
    assert!(s.clean_end && s.data_events() == 5, "{s:?}");
    // The stream came from the old upstream, the request after the reload from the new one.
    assert_eq!((u1.requests(), u2.requests()), (1, 1));
    // No file behind an in-process start: a reload from disk is an error, not a panic.
    let r = px.reload().await;
    assert!(
        !r.is_ok() && r.errors[0].contains("no configuration file"),
        "{r:?}"
    );
    assert!(px.shutdown().await);
}
