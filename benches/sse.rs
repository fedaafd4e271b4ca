//! Event streams per chunk: the scanner that finds where events begin and end
//! (`stream::sse`), alone and with the token meter it feeds on routes that count tokens (the
//! default), over an OpenAI chat completion (small events, in one chunk and one chunk per
//! event) and over one large FastGPT `flowResponses` event cut into 16 KiB chunks.
//! `cargo bench --bench sse`; figures (ns per stream, bytes per second) in
//! docs/benchmarks.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rampart::bench::{Sse, flow_event, openai_stream, split_events};

fn scan(c: &mut Criterion) {
    let small = openai_stream(64);
    // As an upstream flushes them: one event per chunk.
    let events = split_events(&small);
    let large = flow_event(100);
    let pieces: Vec<&[u8]> = large.chunks(16 * 1024).collect();

    let mut g = c.benchmark_group("sse");
    for tokens in [false, true] {
        let what = if tokens { "scan+tokens" } else { "scan" };
        g.throughput(Throughput::Bytes(small.len() as u64));
        let mut s = Sse::new(tokens);
        g.bench_function(format!("{what}/openai_64_events_one_chunk"), |b| {
            b.iter(|| s.feed(black_box(&small)))
        });
        let mut s = Sse::new(tokens);
        g.bench_function(format!("{what}/openai_64_events_chunk_each"), |b| {
            b.iter(|| {
                for e in &events {
                    s.feed(black_box(e));
                }
            })
        });
        g.throughput(Throughput::Bytes(large.len() as u64));
        let mut s = Sse::new(tokens);
        g.bench_function(format!("{what}/flow_event_16k_chunks"), |b| {
            b.iter(|| {
                for p in &pieces {
                    s.feed(black_box(p));
                }
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    // Shorter than the defaults (3 s + 5 s a function); `--measurement-time` overrides it.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = scan }
criterion_main!(benches);
