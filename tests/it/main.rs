//! rampart's integration tests: one binary (one link step), a module per concern.

// Test code throughout (clippy's test exemption covers only `#[test]` functions).
#![allow(clippy::unwrap_used, clippy::expect_used)]
// A test binary has no public API: `pub` here only opens a module to its siblings.
#![allow(unreachable_pub)]

mod support;

mod admin;
mod benches_smoke;
mod bounds;
mod breakers;
mod cache;
mod certs;
mod cli;
mod config;
mod deploy;
mod drain;
mod drills;
mod fuzz_corpus;
mod groups;
mod h1_server;
mod h2;
mod h2_floods;
mod health;
mod hygiene;
mod metrics;
mod pool;
mod proxy;
mod ratelimit;
mod ratelimit_lease;
mod redis_cluster;
mod release_flow;
mod releases;
mod reload;
mod resilience;
mod slow_clients;
mod smuggling;
mod smuggling_upstream;
mod sse_streams;
mod stream_limits;
mod tls;
mod tokens_limits;
mod tunnels;
mod upstream_tls;
mod upstream_wire;
mod zz_summary;
