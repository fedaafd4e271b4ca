//! The circuit breaker per request: the admission and the report of how the request went,
//! as the pipeline makes them (`RouteBreaker`: a lock, the clock, a ticket holding the
//! breaker), a closed breaker's and an open one's, and the state machine alone.
//! `cargo bench --bench breaker`; figures in docs/benchmarks.md.

// A bench is not a test, but its set-up may fail loudly as a test's does.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rampart::bench::Proxy;
use tokio::time::Instant;

fn route_breaker(c: &mut Criterion) {
    let proxy = Proxy::from_yaml(&rampart::bench::config()).expect("the bench config loads");
    let mut g = c.benchmark_group("breaker/route");
    let closed = proxy.route("breakers", "closed").expect("route");
    g.bench_function("admit_success", |b| {
        b.iter(|| {
            if let Ok(t) = closed.admit() {
                t.succeeded();
            }
        })
    });
    // Two requests: one failure (below `failures`, so the breaker stays closed), then a
    // success that resets the count.
    g.bench_function("admit_failure_then_success", |b| {
        b.iter(|| {
            if let Ok(t) = closed.admit() {
                t.failed();
            }
            if let Ok(t) = closed.admit() {
                t.succeeded();
            }
        })
    });
    // With `failure_rate`: each report also goes into the sliding window.
    let rated = proxy.route("breakers", "rated").expect("route");
    g.bench_function("admit_success_failure_rate", |b| {
        b.iter(|| {
            if let Ok(t) = rated.admit() {
                t.succeeded();
            }
        })
    });
    // Open for an hour: every request is failed fast (503 CIRCUIT_OPEN).
    let open = proxy.route("breakers", "open").expect("route");
    if let Ok(t) = open.admit() {
        t.failed();
    }
    assert!(open.admit().is_err(), "the breaker opened");
    g.bench_function("admit_rejected", |b| {
        b.iter(|| black_box(open.admit()).is_err())
    });
    g.finish();

    let mut g = c.benchmark_group("breaker/machine");
    let now = Instant::now();
    let mut machine = closed.breaker_machine(now);
    g.bench_function("admit_success", |b| {
        b.iter(|| {
            if let Some(probe) = machine.admit(black_box(now)) {
                machine.report(now, true, probe);
            }
        })
    });
    let mut machine = open.breaker_machine(now);
    if let Some(probe) = machine.admit(now) {
        machine.report(now, false, probe);
    }
    g.bench_function("admit_rejected", |b| {
        b.iter(|| machine.admit(black_box(now)))
    });
    g.finish();
}

fn config() -> Criterion {
    // Shorter than the defaults (3 s + 5 s a function); `--measurement-time` overrides it.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = route_breaker }
criterion_main!(benches);
