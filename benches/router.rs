//! Routing per request: the request's path in the listener's normal form, then the first
//! of the listener's routes that matches, with 5 and 50 routes on path prefixes and on
//! exact hosts (with methods); the first route, the last, and no route (404).
//! `cargo bench --bench router`; figures in docs/benchmarks.md.

// A bench is not a test, but its set-up may fail loudly as a test's does.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use rampart::bench::Proxy;

fn request(method: &str, host: &str, target: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(target)
        .header("host", host)
        .header("user-agent", "node-fetch/3.3")
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .body(())
        .expect("a valid request")
}

fn routes(c: &mut Criterion) {
    let proxy = Proxy::from_yaml(&rampart::bench::config()).expect("the bench config loads");
    let mut g = c.benchmark_group("router");
    for n in [5, 50] {
        let prefixes = proxy.router(&format!("r{n}")).expect("listener");
        let last = n - 1;
        let cases = [
            (
                "first",
                "/api/v1/svc0/chat/completions?stream=true".to_owned(),
            ),
            (
                "last",
                format!("/api/v1/svc{last}/chat/completions?stream=true"),
            ),
            ("none", "/v2/unknown/path".to_owned()),
            // Not in normal form: normalised (a copy) before matching.
            ("last_unnormal", format!("/api//v1/./svc{last}/%7echat")),
        ];
        for (case, target) in cases {
            let req = request("POST", "chat.example.com", &target);
            g.bench_function(format!("prefix_{n}/{case}"), |b| {
                b.iter(|| prefixes.route(black_box(&req)).map(str::len))
            });
        }
        let hosts = proxy.router(&format!("h{n}")).expect("listener");
        let cases = [
            ("first", "POST", "svc0.example.com".to_owned()),
            ("last", "POST", format!("svc{last}.example.com:8080")),
            ("method_none", "DELETE", format!("svc{last}.example.com")),
        ];
        for (case, method, host) in cases {
            let req = request(method, &host, "/api/chat/completions");
            g.bench_function(format!("host_{n}/{case}"), |b| {
                b.iter(|| hosts.route(black_box(&req)).map(str::len))
            });
        }
    }
    g.finish();
}

fn config() -> Criterion {
    // Shorter than the defaults (3 s + 5 s a function); `--measurement-time` overrides it.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = routes }
criterion_main!(benches);
