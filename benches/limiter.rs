//! The rate limiter per request: the memory store's decision for one key (a hot key, 10,000
//! distinct keys, a blocked key), and the whole rate-limit step of a route (client address,
//! key, every policy's decision, the RateLimit headers), as `ratelimit::check` runs it.
//! `cargo bench --bench limiter`; figures in docs/benchmarks.md.

// A bench is not a test, but its set-up may fail loudly as a test's does.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use rampart::bench::{MemoryTable, Proxy};
use tokio::time::Instant;

/// Points no bench spends: every decision is an admission.
const PLENTY: u64 = 1_000_000_000_000_000;
const HOUR: Duration = Duration::from_secs(3600);
/// What a policy's table holds (`ratelimit::MAX_KEYS`).
const MAX_KEYS: usize = 100_000;

/// The headers of a browser's chat request, with the user id the header policies key on.
fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("host", "chat.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        ),
        ("accept", "text/event-stream"),
        ("accept-language", "de-DE,de;q=0.9,en;q=0.8"),
        ("accept-encoding", "gzip, deflate, br"),
        ("content-type", "application/json"),
        ("content-length", "512"),
        (
            "authorization",
            "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1LTQyIn0.sig",
        ),
        ("cookie", "session=8f3a2c9e; theme=dark"),
        ("x-user-id", "u-8f3a2c9e-4b1d"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h
}

/// `n` distinct client addresses.
fn clients(n: u32) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::from([198, 18, (i >> 8) as u8, i as u8]))
        .collect()
}

fn table(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter/table");
    let now = Instant::now();
    let table = MemoryTable::new(MAX_KEYS, PLENTY, HOUR, None);
    g.bench_function("check_hot_key", |b| {
        b.iter(|| table.check(black_box("ip:203.0.113.7"), now))
    });
    g.bench_function("peek_hot_key", |b| {
        b.iter(|| table.peek(black_box("h:u-8f3a2c9e-4b1d"), now))
    });
    let keys: Vec<String> = clients(10_000)
        .iter()
        .map(|ip| format!("ip:{ip}"))
        .collect();
    for k in &keys {
        table.check(k, now);
    }
    let mut i = 0;
    g.bench_function("check_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            table.check(&keys[i], now)
        })
    });
    let blocked = MemoryTable::new(MAX_KEYS, 3, HOUR, Some(HOUR));
    for _ in 0..4 {
        blocked.check("ip:203.0.113.7", now);
    }
    g.bench_function("check_blocked_key", |b| {
        b.iter(|| blocked.check(black_box("ip:203.0.113.7"), now))
    });
    // What `decide` reads before each decision (tokio's clock; the benches build tokio
    // with `test-util`, whose paused clock is looked up first).
    g.bench_function("clock_now", |b| b.iter(Instant::now));
    g.finish();
}

fn step(c: &mut Criterion) {
    let proxy = Proxy::from_yaml(&rampart::bench::config()).expect("the bench config loads");
    let headers = headers();
    let peer = IpAddr::from([203, 0, 113, 7]);
    let mut g = c.benchmark_group("limiter/step");
    for name in ["ip", "user", "chat", "tokens"] {
        let route = proxy.route("limits", name).expect("route");
        g.bench_function(name, |b| {
            b.iter(|| route.rate_limit(&headers, black_box(peer)))
        });
    }
    let route = proxy.route("limits", "ip").expect("route");
    let peers = clients(10_000);
    let mut i = 0;
    g.bench_function("ip_10k_clients", |b| {
        b.iter(|| {
            i = (i + 1) % peers.len();
            route.rate_limit(&headers, peers[i])
        })
    });
    // Behind a trusted load balancer: the client is read from X-Forwarded-For.
    let mut forwarded = headers.clone();
    forwarded.insert(
        "x-forwarded-for",
        HeaderValue::from_static("198.51.100.9, 10.1.2.3"),
    );
    let lb = IpAddr::from([10, 0, 0, 1]);
    g.bench_function("client_ip_forwarded", |b| {
        b.iter(|| proxy.client_ip(black_box(lb), &forwarded))
    });
    g.bench_function("ip_forwarded", |b| {
        b.iter(|| route.rate_limit(&forwarded, black_box(lb)))
    });
    g.finish();
}

fn config() -> Criterion {
    // Shorter than the defaults (3 s + 5 s a function): a whole run in about a minute;
    // `--measurement-time` on the command line overrides it.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = table, step }
criterion_main!(benches);
