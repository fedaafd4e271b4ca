//! Quota leasing (`lease:`) with two real rampart instances sharing one real Redis: never
//! more than `points` admitted per window, nearly all of them when the demand is there,
//! across several windows and their edges; a key seen once decided as without leasing;
//! and Redis calls per request well below one for a busy key.
//!
//! Windows are read from Redis itself: a side task polls the key's window end (`w`, ms of
//! Redis's clock, the same machine's wall clock as `SystemTime`) and each request is
//! stamped with the wall clock when sent and answered. A request whose [sent, answered]
//! lies inside a window was decided in it; one straddling a window's start or end is
//! counted apart (ambiguous), so "never over" is checked on the certain ones and "nearly
//! all" with the ambiguous ones added.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::redis::{self, RedisServer, unique};
use crate::support::*;

fn config(up: &str, policy: &str, redis_url: &str, body: &str) -> String {
    let mut s = one_route(up, &format!("        rate_limits: [{policy}]"), "");
    s.push_str(&format!(
        "\nredis:\n  url: \"{redis_url}\"\n  timeout: 1s\nreplicas: 2\nrate_limits:\n  {policy}: {body}\n"
    ));
    s
}

fn wall_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

async fn metrics(admin: SocketAddr) -> String {
    let (_, body) = send(&http1(), get(admin, "/metrics")).await;
    String::from_utf8_lossy(&body).into_owned()
}

/// Rate-limit calls this instance made to Redis (each LEASE, script, give-back).
async fn redis_calls(admin: SocketAddr) -> f64 {
    sample(
        &metrics(admin).await,
        "rampart_ratelimit_redis_call_seconds_count",
    )
    .unwrap_or(0.0)
}

async fn decided_in_memory(admin: SocketAddr, policy: &str) -> f64 {
    let m = metrics(admin).await;
    ["allowed", "limited"]
        .iter()
        .map(|r| {
            sample(
                &m,
                &format!(
                    "rampart_ratelimit_decisions_total{{policy=\"{policy}\",result=\"{r}\",source=\"memory\"}}"
                ),
            )
            .unwrap_or(0.0)
        })
        .sum()
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    sent: u64,
    answered: u64,
    ok: bool,
}

/// `per_instance` clients on each of `addrs`, each sending in turn (after `pace` between
/// requests) until `until`, at most `max_each` requests each. Every response must be 200
/// or 429.
async fn load(
    addrs: &[SocketAddr],
    per_instance: usize,
    until: Instant,
    pace: Duration,
    max_each: usize,
) -> Vec<Sample> {
    let mut tasks = Vec::new();
    for i in 0..per_instance * addrs.len() {
        let addr = addrs[i % addrs.len()];
        tasks.push(tokio::spawn(async move {
            let client = http1();
            let mut out = Vec::new();
            for _ in 0..max_each {
                if Instant::now() >= until {
                    break;
                }
                let sent = wall_ms();
                let req = Request::get(format!("http://{addr}/ok"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let (resp, _) = send(&client, req).await;
                let answered = wall_ms();
                let status = resp.status().as_u16();
                assert!(status == 200 || status == 429, "status {status}");
                out.push(Sample {
                    sent,
                    answered,
                    ok: status == 200,
                });
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Reads one RESP reply to HGET: Some(value) or None (nil).
async fn hget(conn: &mut TcpStream, key: &str, field: &str) -> Option<u64> {
    let req = format!(
        "*3\r\n$4\r\nHGET\r\n${}\r\n{key}\r\n${}\r\n{field}\r\n",
        key.len(),
        field.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    // "$-1\r\n" or "$N\r\nVALUE\r\n": read the header line, then the value line.
    let mut lines = 0;
    while lines < 2 {
        conn.read_exact(&mut byte).await.unwrap();
        buf.push(byte[0]);
        if buf.ends_with(b"\r\n") {
            lines += 1;
            if buf.starts_with(b"$-1") {
                return None;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.lines().nth(1)?.trim().parse().ok()
}

/// Polls the key's window end every 5 ms until `stop`: the windows seen, by their end.
fn watch_windows(
    port: u16,
    key: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut ends: Vec<u64> = Vec::new();
        // Bounded: 60 s at most.
        for _ in 0..12_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Some(w) = hget(&mut conn, &key, "w").await
                && ends.last() != Some(&w)
            {
                ends.push(w);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ends
    })
}

/// One window's count: admitted and asked surely inside it, and straddling its edges.
#[derive(Debug, Default)]
struct WindowCount {
    end: u64,
    admitted: usize,
    asked: usize,
    admitted_at_edges: usize,
}

fn per_window(samples: &[Sample], ends: &[u64], window_ms: u64) -> Vec<WindowCount> {
    ends.iter()
        .map(|&end| {
            let start = end - window_ms;
            let mut c = WindowCount {
                end,
                ..WindowCount::default()
            };
            for s in samples {
                if s.sent >= start && s.answered < end {
                    c.asked += 1;
                    c.admitted += usize::from(s.ok);
                } else if s.ok
                    && ((s.sent < start && s.answered >= start)
                        || (s.sent < end && s.answered >= end))
                {
                    c.admitted_at_edges += 1;
                }
            }
            c
        })
        .collect()
}

/// Two instances, `per_instance` clients each, for `secs` on one key (the client IP), with
/// `points` per `window_ms`: every whole window admits at most `points`, and at least
/// `min(points, asked) - margin`. Returns the windows and Redis calls per request.
async fn accuracy(test: &str, points: u64, window_ms: u64, pace: Duration, margin: usize) {
    let Some(redis) = RedisServer::any(test).await else {
        return;
    };
    let up = Upstream::start().await;
    let p = unique("lease");
    let yaml = config(
        &up.url(),
        &p,
        &redis.url,
        &format!("{{ points: {points}, per: {window_ms}ms, block_for: off }}"),
    );
    let a = start(&yaml).await;
    let b = start(&yaml).await;
    let addrs = [a.addr("main").unwrap(), b.addr("main").unwrap()];
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_windows(redis.port, format!("rl:{{{p}:ip:127.0.0.1}}"), stop.clone());
    let load_start = wall_ms();
    let samples = load(
        &addrs,
        3,
        Instant::now() + Duration::from_millis(window_ms * 5 + window_ms / 2),
        pace,
        20_000,
    )
    .await;
    let load_end = wall_ms();
    stop.store(true, Ordering::Relaxed);
    let ends = watcher.await.unwrap();
    let calls = redis_calls(a.admin_addr).await + redis_calls(b.admin_addr).await;
    let in_memory =
        decided_in_memory(a.admin_addr, &p).await + decided_in_memory(b.admin_addr, &p).await;
    let windows = per_window(&samples, &ends, window_ms);
    let admitted: usize = samples.iter().filter(|s| s.ok).count();
    eprintln!(
        "{test}: {} requests, {admitted} admitted, {calls} Redis calls ({:.4} per request), points {points} per {window_ms} ms",
        samples.len(),
        calls / samples.len() as f64
    );
    for w in &windows {
        eprintln!("{test}: window {w:?}");
    }
    assert_eq!(in_memory, 0.0, "Redis answered every call");
    let whole: Vec<&WindowCount> = windows
        .iter()
        .filter(|w| w.end - window_ms >= load_start && w.end <= load_end)
        .collect();
    assert!(whole.len() >= 3, "{windows:?}");
    for w in &whole {
        let points = usize::try_from(points).unwrap();
        assert!(w.admitted <= points, "over-admitted: {w:?}");
        assert!(
            w.admitted + w.admitted_at_edges + margin >= points.min(w.asked),
            "under-admitted beyond {margin}: {w:?}"
        );
    }
    // Every admission falls in a window Redis opened, and the watcher saw each (a window
    // lasts far longer than its 5 ms poll): at most `points` per window, edges included.
    let total_bound = usize::try_from(points).unwrap() * ends.len();
    assert!(admitted <= total_bound, "{admitted} > {total_bound}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Hammered far beyond its points: the slices run out at the start of each window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_admit_at_most_points_per_window_and_nearly_all_of_them() {
    accuracy(
        "two_instances_admit_at_most_points_per_window_and_nearly_all_of_them",
        40,
        1000,
        Duration::from_millis(1),
        2,
    )
    .await;
}

/// Paced so the points last about the whole window: slices are held when windows end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_edges_with_slices_held_by_both_instances() {
    accuracy(
        "window_edges_with_slices_held_by_both_instances",
        120,
        1000,
        Duration::from_millis(30),
        6,
    )
    .await;
}

/// A busy key far below its limit: one Redis call per slice, not per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_key_costs_far_less_than_one_redis_call_per_request() {
    let Some(redis) =
        RedisServer::any("a_busy_key_costs_far_less_than_one_redis_call_per_request").await
    else {
        return;
    };
    let up = Upstream::start().await;
    let p = unique("busy");
    let yaml = config(&up.url(), &p, &redis.url, "{ points: 1000000, per: 60s }");
    let a = start(&yaml).await;
    let b = start(&yaml).await;
    let addrs = [a.addr("main").unwrap(), b.addr("main").unwrap()];
    let samples = load(
        &addrs,
        3,
        Instant::now() + Duration::from_secs(20),
        Duration::ZERO,
        500,
    )
    .await;
    let calls = redis_calls(a.admin_addr).await + redis_calls(b.admin_addr).await;
    let per_request = calls / samples.len() as f64;
    eprintln!(
        "a busy key: {} requests, {calls} Redis calls, {per_request:.4} per request",
        samples.len()
    );
    assert_eq!(samples.len(), 3000);
    assert!(samples.iter().all(|s| s.ok));
    assert!(per_request < 0.2, "{per_request} calls per request");
    // Redis counted what was reserved: every admitted request, plus slices still held.
    let key = format!("rl:{{{p}:ip:127.0.0.1}}");
    let c = redis::command(redis.port, &["HGET", &key, "c"]).await;
    let c: u64 = c.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!((3000..=3000 + 2 * 64).contains(&c), "c = {c}");
    a.shutdown().await;
    b.shutdown().await;
}

/// `lease: off` keeps one script per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_off_keeps_one_redis_call_per_request() {
    let Some(redis) = RedisServer::any("lease_off_keeps_one_redis_call_per_request").await else {
        return;
    };
    let up = Upstream::start().await;
    let p = unique("off");
    let yaml = config(
        &up.url(),
        &p,
        &redis.url,
        "{ points: 1000000, per: 60s, lease: off }",
    );
    let a = start(&yaml).await;
    let samples = load(
        &[a.addr("main").unwrap()],
        2,
        Instant::now() + Duration::from_secs(20),
        Duration::ZERO,
        100,
    )
    .await;
    assert_eq!(samples.len(), 200);
    assert_eq!(redis_calls(a.admin_addr).await, 200.0);
    a.shutdown().await;
}

/// A key seen once costs one call and is decided as without leasing: one point reserved,
/// no slice out, the headers and the refusal (with its block) as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_seen_once_is_decided_as_without_leasing() {
    let Some(redis) = RedisServer::any("a_key_seen_once_is_decided_as_without_leasing").await
    else {
        return;
    };
    let up = Upstream::start().await;
    let p = unique("once");
    let yaml = config(
        &up.url(),
        &p,
        &redis.url,
        "{ points: 2, per: 60s, block_for: 90s }",
    );
    let a = start(&yaml).await;
    let b = start(&yaml).await;
    let client = http1();
    let key = format!("rl:{{{p}:ip:127.0.0.1}}");
    let (resp, _) = send(&client, get(a.addr("main").unwrap(), "/ok")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["ratelimit"],
        format!("\"{p}\";r=1;t=60").as_str()
    );
    assert_eq!(redis_calls(a.admin_addr).await, 1.0);
    let c = redis::command(redis.port, &["HMGET", &key, "c", "d"]).await;
    assert_eq!(
        c.lines().collect::<Vec<_>>(),
        ["*2", "$1", "1", "$1", "0"],
        "{c:?}"
    );
    // The other instance spends the last point, then refuses with the block.
    let (resp, _) = send(&client, get(b.addr("main").unwrap(), "/ok")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
    for addr in [a.addr("main").unwrap(), b.addr("main").unwrap()] {
        let (resp, _) = send(&client, get(addr, "/ok")).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "90");
        assert_eq!(
            resp.headers()["ratelimit"],
            format!("\"{p}\";r=0;t=90").as_str()
        );
    }
    assert_eq!(up.requests(), 2);
    a.shutdown().await;
    b.shutdown().await;
}

/// A slice left unused by an instance whose traffic stopped comes back to Redis when its
/// lease ends, and the other instance gets it within the window: under-admission is a delay
/// of about a lease, not a loss. Meanwhile the other is told to retry soon, not at the
/// window's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_left_unused_comes_back_to_the_other_instance() {
    let Some(redis) =
        RedisServer::any("a_slice_left_unused_comes_back_to_the_other_instance").await
    else {
        return;
    };
    let up = Upstream::start().await;
    let p = unique("idle");
    // A 10 s window: leases of 1 s.
    let yaml = config(
        &up.url(),
        &p,
        &redis.url,
        "{ points: 100, per: 10s, block_for: off }",
    );
    let a = start(&yaml).await;
    let b = start(&yaml).await;
    let client = http1();
    let key = format!("rl:{{{p}:ip:127.0.0.1}}");
    let began = Instant::now();
    // A's slices grow 1, 2, 4, 8, 16 while its requests come quickly.
    for _ in 0..20 {
        let (resp, _) = send(&client, get(a.addr("main").unwrap(), "/ok")).await;
        assert_eq!(resp.status(), 200);
    }
    let c = redis::command(redis.port, &["HGET", &key, "c"]).await;
    let reserved: u64 = c.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(
        reserved > 20,
        "A holds an unused slice: reserved {reserved}"
    );
    // A's traffic stops; B asks until all 100 are admitted, within the window.
    let mut admitted = 20;
    let mut refusals = Vec::new();
    for _ in 0..5000 {
        if admitted == 100 || began.elapsed() > Duration::from_secs(9) {
            break;
        }
        let (resp, _) = send(&client, get(b.addr("main").unwrap(), "/ok")).await;
        match resp.status().as_u16() {
            200 => admitted += 1,
            429 => refusals.push(resp.headers()["retry-after"].to_str().unwrap().to_owned()),
            s => panic!("status {s}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!(
        "idle holder: A reserved {reserved} for 20 requests; all 100 admitted after {:?}, B refused {} times meanwhile",
        began.elapsed(),
        refusals.len()
    );
    assert_eq!(admitted, 100, "A's unused points came back");
    assert!(began.elapsed() < Duration::from_secs(9));
    // B spent the rest quickly and was refused while A held points: told to come back
    // when A's lease ends (1 s, and 200 ms for the points to come back), not at the
    // window's end (10 s).
    assert!(!refusals.is_empty(), "B was never refused");
    assert!(
        refusals.iter().all(|r| r == "1" || r == "2"),
        "{refusals:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}
