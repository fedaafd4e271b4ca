//! The upstream connection pool under many client connections: with the defaults, a peak of
//! concurrent requests keeps its upstream connections for the next peak (no connect storm),
//! and what a burst left idle is closed after `idle_timeout` even when no request comes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::support::upstream::Upstream;
use crate::support::{get, http1, one_route, sample, send, start};

/// Concurrent requests per round: above the old per-worker idle cap (256), below what a
/// test process's descriptors allow (each request holds four sockets here).
const CONCURRENT: usize = 400;
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peak_of_concurrent_requests_keeps_its_upstream_connections() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let client = http1();
    for round in 0..ROUNDS {
        // Every round is a peak: all requests in flight at once, all connections idle after.
        let mut set = JoinSet::new();
        for _ in 0..CONCURRENT {
            let client = client.clone();
            // /delay holds each request long enough for all of them to overlap.
            set.spawn(async move { send(&client, get(addr, "/delay/50")).await.0.status() });
        }
        let all = tokio::time::timeout(Duration::from_secs(60), set.join_all())
            .await
            .unwrap_or_else(|_| panic!("round {round} did not end within 60 s"));
        assert!(
            all.iter().all(|s| s.as_u16() == 200),
            "round {round}: {all:?}"
        );
    }
    let (_, metrics) = send(&client, get(px.admin_addr, "/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    let opened = sample(
        &metrics,
        "rampart_upstream_connections_opened_total{upstream=\"up\"}",
    )
    .expect("the metric is exported");
    let requests = CONCURRENT * ROUNDS;
    // The first peak opens one connection per request in flight; later ones open none
    // (the target: new connections < 1% of requests beyond that). Counted by
    // rampart: the upstream may accept a few more, connects that rampart's 1 s
    // connect_timeout gave up on while 400 went at once on a loaded machine (the kernel
    // completes them later). A CI run failed on those (424 accepted). In 10 instrumented runs
    // rampart's count stayed 400; over ~40 the upstream's reached 437, each extra closed unused.
    assert!(
        opened <= (CONCURRENT + requests / 100) as f64,
        "{opened} upstream connections opened for {requests} requests at {CONCURRENT} at once: \
         the pool closed connections the next peak needed"
    );
    // At most what the upstream accepted.
    let accepted = up.counters.connections.load(Ordering::SeqCst) as f64;
    assert!(
        opened >= CONCURRENT as f64 / 2.0 && opened <= accepted,
        "the metric ({opened}) counts the connections the upstream accepted ({accepted})"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn connections_left_idle_by_a_burst_are_closed_without_traffic() {
    let up = Upstream::start().await;
    let yaml = one_route(&up.url(), "", "").replace(
        "    connect_timeout: 1s\n",
        "    connect_timeout: 1s\n    pool: { idle_timeout: 300ms }\n",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let client = http1();
    let mut set = JoinSet::new();
    for _ in 0..50 {
        let client = client.clone();
        set.spawn(async move { send(&client, get(addr, "/delay/50")).await.0.status() });
    }
    let all = set.join_all().await;
    assert!(all.iter().all(|s| s.as_u16() == 200), "{all:?}");
    let opened = up.counters.connections.load(Ordering::SeqCst);
    assert!(opened >= 10, "the burst overlapped: {opened} connections");
    // No request comes to take them: the pool's own sweep must close them (the upstream's
    // server would keep them for 30 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let closed = up.counters.closed.load(Ordering::SeqCst);
        if closed == opened {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{closed} of {opened} idle upstream connections closed 5 s after a 300ms idle_timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the pool still serves afterwards.
    let (resp, _) = send(&client, get(addr, "/")).await;
    assert_eq!(resp.status(), 200);
    px.shutdown().await;
}
