//! The micro-benchmarks' entry points (`rampart::bench`, driven by `benches/`), each once on
//! the benches' own configuration and streams, with what they must answer: `cargo test`
//! does not build the benches, so this keeps what they measure compiling and meaningful (a
//! bench timing a 404 or a refused request instead of the path it names measures nothing).

use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request};
use rampart::bench::{self, MemoryTable, Proxy, Sse};
use tokio::time::Instant;

fn proxy() -> Proxy {
    Proxy::from_yaml(&bench::config()).unwrap()
}

fn request(method: &str, host: &str, target: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(target)
        .header("host", host)
        .body(())
        .unwrap()
}

#[test]
fn the_router_finds_the_route_each_bench_names() {
    let p = proxy();
    for n in [5, 50] {
        let r = p.router(&format!("r{n}")).unwrap();
        let last = n - 1;
        let route = |target: &str| r.route(&request("POST", "chat.example.com", target));
        assert_eq!(
            route("/api/v1/svc0/chat/completions?stream=true"),
            Some(format!("r{n}-0").as_str())
        );
        assert_eq!(
            route(&format!("/api/v1/svc{last}/chat/completions?stream=true")),
            Some(format!("r{n}-{last}").as_str())
        );
        assert_eq!(route("/v2/unknown/path"), None);
        assert_eq!(
            route(&format!("/api//v1/./svc{last}/%7echat")),
            Some(format!("r{n}-{last}").as_str())
        );
        // Whole segments: svc1 is not svc10's prefix.
        assert_eq!(route("/api/v1/svc10x"), None);

        let h = p.router(&format!("h{n}")).unwrap();
        let route =
            |method: &str, host: &str| h.route(&request(method, host, "/api/chat/completions"));
        assert_eq!(
            route("POST", "svc0.example.com"),
            Some(format!("h{n}-0").as_str())
        );
        assert_eq!(
            route("POST", &format!("svc{last}.example.com:8080")),
            Some(format!("h{n}-{last}").as_str())
        );
        assert_eq!(route("DELETE", &format!("svc{last}.example.com")), None);
        assert_eq!(route("GET", "other.example.com"), None);
    }
}

#[test]
fn the_limiter_admits_the_benched_requests_and_refuses_past_its_points() {
    let p = proxy();
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", HeaderValue::from_static("u-8f3a2c9e-4b1d"));
    let peer = IpAddr::from([203, 0, 113, 7]);
    for name in ["ip", "user", "chat", "tokens"] {
        let d = p
            .route("limits", name)
            .unwrap()
            .rate_limit(&headers, peer)
            .unwrap();
        assert!(d.allowed, "{name}: {d:?}");
        assert_eq!(d.source, Some("memory"), "{name}");
        // RateLimit-Policy, RateLimit and the three X-RateLimit-* fields.
        assert_eq!(d.headers, 5, "{name}");
    }
    let tight = p.route("limits", "tight").unwrap();
    for _ in 0..3 {
        assert!(tight.rate_limit(&headers, peer).unwrap().allowed);
    }
    assert!(!tight.rate_limit(&headers, peer).unwrap().allowed);
    // Another client has its own points; behind the trusted balancer, the one it names.
    let other = IpAddr::from([198, 51, 100, 9]);
    assert!(tight.rate_limit(&headers, other).unwrap().allowed);
    let lb = IpAddr::from([10, 0, 0, 1]);
    let mut forwarded = headers.clone();
    forwarded.insert(
        "x-forwarded-for",
        HeaderValue::from_static("198.51.100.9, 10.1.2.3"),
    );
    assert_eq!(p.client_ip(lb, &forwarded), other);
    assert_eq!(p.client_ip(peer, &forwarded), peer);
    for _ in 0..2 {
        assert!(tight.rate_limit(&forwarded, lb).unwrap().allowed);
    }
    assert!(!tight.rate_limit(&forwarded, lb).unwrap().allowed);
    assert!(!tight.rate_limit(&headers, other).unwrap().allowed);

    let now = Instant::now();
    let hour = Duration::from_secs(3600);
    let t = MemoryTable::new(100_000, 3, hour, Some(hour));
    assert!(t.is_empty());
    assert_eq!(t.peek("k", now), Some(true));
    for _ in 0..3 {
        assert_eq!(t.check("k", now), Some(true));
    }
    assert_eq!(t.check("k", now), Some(false));
    assert_eq!(t.peek("k", now), Some(false));
    assert_eq!(t.check("k2", now), Some(true));
    assert_eq!(t.len(), 2);
    // Full of live keys: a new one cannot be decided (the step lets it through).
    let small = MemoryTable::new(1, 3, hour, None);
    let decided = (0..64)
        .filter(|i| small.check(&format!("k{i}"), now).is_some())
        .count();
    assert!(decided < 64, "{decided}");
}

#[test]
fn the_breakers_admit_and_fail_fast_as_benched() {
    let p = proxy();
    for name in ["closed", "rated"] {
        let r = p.route("breakers", name).unwrap();
        for _ in 0..100 {
            r.admit().unwrap().succeeded();
            r.admit().unwrap().failed();
            r.admit().unwrap().succeeded();
        }
        assert!(r.admit().is_ok(), "{name}");
    }
    let open = p.route("breakers", "open").unwrap();
    open.admit().unwrap().failed();
    let retry_after = open.admit().unwrap_err();
    assert!(retry_after > Duration::from_secs(3500), "{retry_after:?}");

    let now = Instant::now();
    let mut m = p.route("breakers", "closed").unwrap().breaker_machine(now);
    let probe = m.admit(now).unwrap();
    assert_eq!(probe, None);
    assert!(!m.report(now, true, probe));
    let mut m = open.breaker_machine(now);
    let probe = m.admit(now).unwrap();
    assert!(m.report(now, false, probe), "opened");
    assert_eq!(m.admit(now), None);
}

#[test]
fn the_scanner_and_token_meter_read_the_benched_streams() {
    let small = bench::openai_stream(64);
    let events = bench::split_events(&small);
    assert_eq!(events.len(), 66);
    let large = bench::flow_event(100);
    // About 2 KiB a node: larger than the 16 KiB chunks it is fed in, many times over.
    assert!(large.len() > 150 * 1024, "{}", large.len());
    for tokens in [false, true] {
        // One chunk, twice (the benches feed one scanner over and over).
        let mut s = Sse::new(tokens);
        for _ in 0..2 {
            let scan = s.feed(&small);
            assert_eq!(scan.events, 66);
            assert_eq!(scan.errors, 0);
            assert_eq!(scan.boundary, Some(small.len()));
        }
        let want = |u| tokens.then_some(u);
        assert_eq!(s.tokens(), want((12, 64)));
        // One chunk per event.
        let mut s = Sse::new(tokens);
        let n: usize = events.iter().map(|e| s.feed(e).events).sum();
        assert_eq!(n, 66);
        assert_eq!(s.tokens(), want((12, 64)));
        // One large event in 16 KiB chunks: dispatched by the last.
        let mut s = Sse::new(tokens);
        let pieces: Vec<&[u8]> = large.chunks(16 * 1024).collect();
        let (last, head) = pieces.split_last().unwrap();
        for p in head {
            assert_eq!(s.feed(p).events, 0);
        }
        assert_eq!(s.feed(last).events, 1);
        assert_eq!(s.tokens(), want((1000, 2000)));
    }
}
