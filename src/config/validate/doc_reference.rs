//! Holds `docs/configuration.md` to the reader: every key a `MapReader` asks for must be in
//! the reference, and every key the reference lists must be one the reader asks for. The
//! reader is the truth; the test prints both differences.

use std::cell::RefCell;
use std::collections::BTreeSet;

use crate::config::raw::child_path;

/// Maps whose keys are names the user chose, written `<name>` in the reference.
const USER_NAMED: &[&str] = &["upstreams", "rate_limits", "caches"];

thread_local! {
    /// Keys asked for on this thread (each test runs on its own).
    static KEYS_READ: RefCell<BTreeSet<String>> = const { RefCell::new(BTreeSet::new()) };
}

/// Called by `MapReader` for each key it asks for in a mapping that is present.
pub(super) fn record(path: &str, key: &str) {
    let path = reference_path(&child_path(path, key));
    KEYS_READ.with(|k| k.borrow_mut().insert(path));
}

/// `listeners[0].routes[2].timeouts` -> `listeners[].routes[].timeouts`,
/// `upstreams.backend.pool` -> `upstreams.<name>.pool`.
fn reference_path(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        out.push_str("[]");
        rest = rest[open..]
            .find(']')
            .map_or("", |close| &rest[open + close + 1..]);
    }
    out.push_str(rest);
    for map in USER_NAMED {
        if let Some(tail) = out.strip_prefix(&format!("{map}.")) {
            let after = tail.find('.').map_or("", |dot| &tail[dot..]);
            // An upstream's groups are named by the user too.
            if let Some(group) = after.strip_prefix(".groups.") {
                let rest = group.find('.').map_or("", |dot| &group[dot..]);
                return format!("{map}.<name>.groups.<group>{rest}");
            }
            return format!("{map}.<name>{after}");
        }
    }
    out
}

/// The keys `path` implies: itself and each parent key, without list brackets and without
/// the user-named entries (`upstreams.<name>` is not a key the reader asks for).
fn with_parents(path: &str, out: &mut BTreeSet<String>) {
    let mut prefix = String::new();
    for segment in path.split('.') {
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(segment);
        if !segment.starts_with('<') {
            out.insert(prefix.trim_end_matches("[]").to_owned());
        }
    }
}

/// Every key the reference lists: each ``## `PATH` `` heading (`## Top level` is the root),
/// and the backticked first cell of each row of a `| Key |` table under it (a dotted cell is a path below
/// the heading). Other headings end the key sections.
fn reference_keys(doc: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut section: Option<String> = None;
    // Only tables whose header starts with `Key` list keys (not `| Signal |`, `| Written |`).
    let (mut in_table, mut key_table) = (false, false);
    for line in doc.lines() {
        if !line.starts_with('|') {
            in_table = false;
        } else if !in_table {
            in_table = true;
            key_table = line.starts_with("| Key |");
            continue;
        }
        if let Some(heading) = line.strip_prefix("## ") {
            section = if heading == "Top level" {
                Some(String::new())
            } else {
                heading
                    .strip_prefix('`')
                    .and_then(|h| h.strip_suffix('`'))
                    .map(str::to_owned)
            };
            if let Some(s) = section.as_deref().filter(|s| !s.is_empty()) {
                with_parents(s, &mut keys);
            }
            continue;
        }
        let Some(section) = section.as_ref().filter(|_| key_table) else {
            continue;
        };
        let Some(cell) = line.strip_prefix("| `") else {
            continue;
        };
        let Some(key) = cell
            .split('|')
            .next()
            .and_then(|c| c.trim().strip_suffix('`'))
        else {
            continue;
        };
        with_parents(&child_path(section, key), &mut keys);
    }
    keys
}

/// Configurations that between them open every mapping and take every branch that asks
/// for keys; problems do not matter, only what the reader asked for.
const RICH: &[&str] = &[
    r#"
admin: { listen: "127.0.0.1:9901", token: "0123456789abcdef", insecure_no_token: false, allowed_hosts: [a.example] }
logging: { level: info, format: text, access_log: true }
trusted_proxies: ["10.0.0.0/8"]
replicas: 1
readiness: { breaker_open: ignore }
drain: { accept_grace: 5s, timeout: 30s }
redis:
  url: "redis://127.0.0.1:6379"
  timeout: 50ms
  connect_timeout: 1s
  pool: { max_size: 16 }
rate_limits:
  api: { points: 100, per: 60s, block_for: 60s, key: client_ip, store: redis, ipv6_prefix: 64, lease: { max: 64 } }
caches:
  agents: { ttl: 1h, max_entry_size: 1MiB, stale_if_error: 10m, store: redis, vary: [accept], memory_max: 64MiB, lock_timeout: 5s }
listeners:
  - name: inbound
    listen: "0.0.0.0:8080"
    max_connections: 10
    header_read_timeout: 10s
    max_header_bytes: 64KiB
    max_headers: 100
    max_in_flight: 10
    drain: inbound
    health_path: /health
    normalize_path: match
    merge_slashes: true
    escaped_slashes: keep
    http2: { max_concurrent_streams: 100, max_pending_accept_reset_streams: 20, max_local_error_reset_streams: 1024, idle_timeout: 3m }
    routes:
      - name: r
        match: { path_prefix: /, case_insensitive: false, host: a.example, methods: [GET] }
        upstream: backend
        timeouts: { connect: 1s, first_byte: 30s, idle: 60s, total: off, body: 60s, min_body_rate: 500B/s }
        max_body: 10MiB
        rate_limits: [api]
        cache: agents
        upgrades: [websocket]
        stream: { first_event: 60s, between_events: 45s, max_duration: 10m, heartbeat: 15s, comments_are_activity: false, error_events: [error], partial_event_buffer: 64KiB }
        tokens: streams
upstreams:
  backend:
    endpoints: ["http://127.0.0.1:3001"]
    connect_timeout: 5s
    client: rampart
    load_balancing: round_robin
    max_in_flight: 10
    tls: { ca_file: /nonexistent.pem }
    pool: { idle_timeout: 4s, max_idle_per_endpoint: 10000 }
    circuit_breaker:
      scope: route
      failures: 5
      open_for: 60s
      max_open_for: 5m
      half_open_successes: 2
      half_open_max_probes: 2
      failure_rate: { threshold: 50%, window: 30s, min_calls: 20 }
      count_500: false
      count_backoff: false
    ejection: { consecutive_failures: 3, base_ejection: 10s, max_ejection: 5m }
    retry:
      attempts: 2
      backoff: { base: 50ms, max: 1s }
      on: [connect_error]
      budget: { ratio: 0.2, min_per_s: 3 }
      max_body: 64KiB
      connect_wait: 5s
    health_check:
      path: /health
      interval: 5s
      unhealthy_interval: 1s
      fast_interval: 250ms
      timeout: 2s
      unhealthy_after: 3
      healthy_after: 2
      critical: false
  canary:
    groups:
      blue: { endpoints: ["http://127.0.0.1:3002"], weight: 95 }
      green: { endpoints: ["http://127.0.0.1:3003"], weight: 5 }
    sticky: client_ip
dependencies:
  postgres:
    url: "postgres://u@127.0.0.1/db"
    tls: { ca_file: /nonexistent.pem }
    pool: { min_idle: 0, max_size: 4, connect_timeout: 5s, idle_timeout: 30s, max_lifetime: 30m }
    check: { interval: 10s, unhealthy_interval: 1s, fast_interval: 250ms, timeout: 2s, critical: false, unhealthy_after: 1, healthy_after: 1, warn_connections_above: 80% }
  redis:
    check: { interval: 10s, unhealthy_interval: 1s, fast_interval: 250ms, timeout: 2s, critical: false, unhealthy_after: 1, healthy_after: 1 }
  memory:
    check: { interval: 10s, unhealthy_interval: 1s, fast_interval: 250ms, critical: false, unhealthy_after: 1, healthy_after: 1, warn_above: 80% }
releases_state: /var/lib/rampart/releases.json
releases:
  - { upstream: backend, to: green, steps: [5, 25, 50, 100], step_for: 2m, gate: { max_error_rate: 1%, max_p95: 500ms, min_requests: 100 } }
alerts:
  interval: 60s
  rules:
    - { name: R, signal: error_rate, comparison: above, threshold: 0.05, window: 5m, for: 0s, severity: critical, route: r, upstream: backend, min_samples: 10 }
  sinks:
    - { type: webhook, url: "http://127.0.0.1:9/hook", timeout: 5s, max_attempts: 5 }
"#,
    r#"
redis:
  sentinel: { master: m, addresses: ["127.0.0.1:26379"] }
"#,
    r#"
redis:
  cluster: { nodes: ["127.0.0.1:7000"], username: u, password: p }
"#,
    r#"
listeners:
  - name: t
    listen: "127.0.0.1:0"
    tls: { cert: /a.crt, key: /a.key, certificates: [{ cert: /b.crt, key: /b.key }], client_ca: /ca.pem, handshake_timeout: 5s, watch: 10s }
    routes: [{ upstream: u }]
"#,
];

#[test]
fn the_reference_lists_exactly_the_keys_the_reader_reads() {
    KEYS_READ.with(|k| k.borrow_mut().clear());
    for text in RICH {
        let _ = super::parse_str(text, "proxy.yaml", &|_| None);
    }
    let read = KEYS_READ.with(|k| k.borrow().clone());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let listed = reference_keys(&doc);
    let missing: Vec<_> = read.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&read).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/configuration.md and the reader disagree\n\
         read by the reader, missing from the reference: {missing:#?}\n\
         in the reference, never read: {stale:#?}"
    );
}

#[test]
fn reference_paths_name_lists_and_user_named_entries() {
    assert_eq!(
        reference_path("listeners[0].routes[12].timeouts"),
        "listeners[].routes[].timeouts"
    );
    assert_eq!(
        reference_path("upstreams.backend.pool"),
        "upstreams.<name>.pool"
    );
    assert_eq!(reference_path("rate_limits.api"), "rate_limits.<name>");
    assert_eq!(reference_path("caches.agents.vary"), "caches.<name>.vary");
    assert_eq!(reference_path("upstreams"), "upstreams");
    assert_eq!(
        reference_path("upstreams.backend.groups.blue.weight"),
        "upstreams.<name>.groups.<group>.weight"
    );
}
