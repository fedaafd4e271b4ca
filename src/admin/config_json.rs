//! `/admin/config`: the configuration in force, as JSON. The document is the config types'
//! `#[derive(Serialize)]` (each type in `config/` says how it is written): secrets are
//! redacted by their type ([`crate::config::Secret`]), so a new secret field cannot leak, and
//! durations are written the way the file takes them ("30s", "5m").

use serde_json::{Value, json};

use crate::config::Config;

pub(crate) fn to_json(c: &Config) -> Value {
    // Cannot fail: every map key is a string and every path is shown as text. Should it
    // anyway, the endpoint says so instead of panicking.
    serde_json::to_value(c).unwrap_or_else(|e| json!({ "error": e.to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BreakerScope, Comparison, Severity, Signal, SinkKind};

    /// Every section and every enum spelling, with a secret in each field that holds one.
    const RICH: &str = r#"
admin:
  listen: "0.0.0.0:9901"
  token: "admintoken-0123456789-zzadmin"
  allowed_hosts: [rampart.internal, ops.example.com]
logging: { level: "rampart=debug,info", format: json, access_log: false }
trusted_proxies: ["10.0.0.0/8", "::1", "fd00::/8"]
replicas: 3
listeners:
  - name: inbound
    listen: "0.0.0.0:8080"
    max_connections: 5000
    header_read_timeout: 15s
    max_header_bytes: 32KiB
    max_headers: 50
    http2: { max_concurrent_streams: 50, max_pending_accept_reset_streams: 10, max_local_error_reset_streams: 500, idle_timeout: 90s }
    max_in_flight: 1000
    health_path: /healthz
    normalize_path: forward
    merge_slashes: false
    escaped_slashes: reject
    routes:
      - name: chat
        match: { path_prefix: /api/chat, host: api.example.com, methods: [GET, POST], case_insensitive: true }
        upstream: backend
        timeouts: { connect: 2s, first_byte: 45s, idle: 2m, total: 10m, body: 20s, min_body_rate: 1KiB/s }
        max_body: 1MiB
        rate_limits: [api, per_user]
        cache: agents
        upgrades: [websocket, "foo/2"]
        stream: { first_event: 2m, between_events: off, max_duration: 30m, heartbeat: 20s, comments_are_activity: true, error_events: [error, failed], partial_event_buffer: 128KiB }
      - upstream: fallback
        timeouts: { min_body_rate: off }
        upgrades: []
  - name: egress
    listen: "127.0.0.1:8081"
    drain: egress
    normalize_path: "off"
    routes: [{ upstream: backend }]
  - name: plain
    listen: "[::1]:8082"
    normalize_path: match
    escaped_slashes: keep
    routes: [{ upstream: backend, match: { path_prefix: /x/ } }]
upstreams:
  backend:
    endpoints: ["http://127.0.0.1:3001", "https://backend.internal:8443"]
    connect_timeout: 3s
    pool: { idle_timeout: 3s, max_idle_per_endpoint: 64 }
    client: hyper
    load_balancing: least_outstanding
    max_in_flight: 200
    circuit_breaker:
      scope: upstream
      failures: 7
      open_for: 30s
      max_open_for: 10m
      half_open_successes: 3
      half_open_max_probes: 4
      failure_rate: { threshold: 25%, window: 1m, min_calls: 40 }
      count_500: true
      count_backoff: true
    ejection: { consecutive_failures: 4, base_ejection: 15s, max_ejection: 2m }
    retry:
      attempts: 3
      backoff: { base: 100ms, max: 2s }
      on: [connect_error, timeout, reset, 503, 429]
      budget: { ratio: 0.5, min_per_s: 7 }
      max_body: 128KiB
      connect_wait: "off"
    health_check: { path: /ready, interval: 7s, unhealthy_interval: 2s, fast_interval: 500ms, timeout: 1500ms, unhealthy_after: 4, healthy_after: 5, critical: true }
  fallback:
    endpoints: ["http://127.0.0.1:3002"]
  canary:
    groups:
      blue: { endpoints: ["http://127.0.0.1:3003", "http://127.0.0.1:3004"], weight: 9500 }
      green: { endpoints: ["http://127.0.0.1:3005"], weight: 500 }
    sticky: "cookie:session"
redis:
  url: "redis://app:zzredis@10.0.0.5:6380/2"
  timeout: 80ms
  connect_timeout: 1s
  pool: { max_size: 8 }
rate_limits:
  api: { points: 100, per: 1m, block_for: 2m, key: client_ip, store: redis, ipv6_prefix: 56 }
  per_user: { points: 10, per: 10s, block_for: "off", key: "route+header:x-user-id", store: memory }
  by_key: { key: "header:x-api-key" }
  per_route_ip: { key: "route+client_ip" }
  chat_streams: { max_streams: 3, stream_lease: 45s, key: "header:x-user-id" }
  llm_tokens: { points: 100000, per: 1m, cost: tokens, max_streams: 2, store: memory }
caches:
  agents: { ttl: 30s, max_entry_size: 256KiB, stale_if_error: 1h, store: memory, vary: [Accept-Language, authorization], memory_max: 32MiB, lock_timeout: 2s }
  shared: { stale_if_error: "off" }
drain: { accept_grace: 2s, timeout: 45s }
readiness: { breaker_open: not_ready }
releases_state: /var/lib/rampart/releases.json
releases:
  - { upstream: backend, to: green, steps: [5, 25, 50, 100], step_for: 2m, gate: { max_error_rate: 1%, max_p95: 500ms, min_requests: 100 } }
dependencies:
  postgres:
    url: "postgres://app:zzpostgres@db1:5432,db2:5433/app?target_session_attrs=read-write&sslmode=require&connect_timeout=3&application_name=rampart-golden"
    pool: { min_idle: 1, max_size: 6, connect_timeout: 4s, idle_timeout: 40s, max_lifetime: 1h }
    check: { interval: 12s, unhealthy_interval: 3s, fast_interval: 300ms, timeout: 3s, critical: true, unhealthy_after: 2, healthy_after: 3, warn_connections_above: 75% }
  redis:
    check: { interval: 11s, timeout: 1s, critical: true }
  memory:
    check: { interval: 20s, warn_above: 90% }
alerts:
  interval: 30s
  rules:
    - { name: Errors, signal: error_rate, threshold: 5%, window: 10m, for: 1m, severity: critical, route: chat, upstream: backend, min_samples: 50 }
    - { name: P95, signal: latency_p95, comparison: ">=", threshold: 750ms }
    - { name: Avg, signal: latency_avg, comparison: "<", threshold: 2s, severity: info }
    - { name: Db, signal: db_error_rate, comparison: "<=", threshold: 1% }
    - { name: Cache, signal: cache_hit_rate, threshold: 50% }
    - { name: Pool, signal: pool_usage, threshold: 0.9 }
    - { name: Memory, signal: memory_usage, threshold: 85% }
    - { name: Breaker, signal: breaker_open, upstream: backend }
    - { name: Fallback, signal: ratelimit_fallback_active, for: 30s }
  sinks:
    - { type: slack, url: "https://hooks.slack.com/services/T000/B000/zzslack", timeout: 3s, max_attempts: 2 }
    - { type: webhook, url: "https://ops.example.com/hooks/rampart?token=zzwebhook" }
    - { type: alertmanager, url: "http://user:zzalertmanager@alertmanager.monitoring:9093" }
"#;

    /// The secrets [`RICH`] holds, one per field that is a [`Secret`].
    const RICH_SECRETS: &[&str] = &[
        "zzadmin",
        "zzredis",
        "zzpostgres",
        "zzslack",
        "services/T000",
        "zzwebhook",
        "zzalertmanager",
    ];

    /// The same file with Redis behind sentinels, and a file of defaults only.
    const SENTINEL: &str = r#"
listeners: [{ name: m, listen: "127.0.0.1:0", routes: [{ upstream: u }] }]
upstreams: { u: { endpoints: ["http://127.0.0.1:1"] } }
redis: { sentinel: { master: mymaster, addresses: ["10.0.0.1:26379", "10.0.0.2:26379"] } }
rate_limits: { r: {} }
caches: { c: {} }
"#;
    /// Redis Cluster, with credentials (the password shown redacted).
    const CLUSTER: &str = r#"
listeners: [{ name: m, listen: "127.0.0.1:0", routes: [{ upstream: u }] }]
upstreams: { u: { endpoints: ["http://127.0.0.1:1"] } }
redis: { cluster: { nodes: ["10.0.0.1:7000", "10.0.0.2:7000"], username: app, password: zzclusterpw } }
rate_limits: { r: {} }
"#;
    const MINIMAL: &str = r#"
listeners: [{ name: m, listen: "127.0.0.1:0", routes: [{ upstream: u }] }]
upstreams: { u: { endpoints: ["http://127.0.0.1:1"] } }
"#;

    fn golden_documents() -> Value {
        let parse = |yaml: &str| {
            crate::config::parse_str(yaml, "golden.yaml", &|_| None)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let mut rich = parse(RICH);
        // `tls.ca_file` is read when validated: set after, so the document names no temp dir.
        let ca = std::path::PathBuf::from("/etc/rampart/ca.pem");
        if let Some(u) = rich.upstreams.get_mut("backend") {
            u.tls.ca_file = Some(ca.clone());
        }
        if let Some(p) = rich.dependencies.postgres.as_mut() {
            p.tls_ca_file = Some(ca);
        }
        json!({
            "rich": to_json(&rich),
            "sentinel": to_json(&parse(SENTINEL)),
            "cluster": to_json(&parse(CLUSTER)),
            "minimal": to_json(&parse(MINIMAL)),
        })
    }

    /// `/admin/config` is a document operators and scripts read: the same configuration
    /// gives the same JSON, key for key (`config_json.golden.json`).
    #[test]
    fn the_document_is_the_golden_one() {
        let golden: Value = serde_json::from_str(include_str!("config_json.golden.json")).unwrap();
        let now = golden_documents();
        assert!(
            now == golden,
            "/admin/config changed; now:\n{}",
            serde_json::to_string_pretty(&now).unwrap()
        );
    }

    #[test]
    fn no_secret_field_shows_its_secret() {
        let c = crate::config::parse_str(RICH, "golden.yaml", &|_| None).unwrap();
        let text = to_json(&c).to_string();
        for secret in RICH_SECRETS {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        // Each secret field is there, shown without its secret.
        for shown in [
            "\"token\":\"[redacted]\"",
            "redis://app:[redacted]@10.0.0.5:6380/2",
            "https://hooks.slack.com/[redacted]",
            "https://ops.example.com/[redacted]",
            "http://alertmanager.monitoring/[redacted]",
            "\"password\":\"[redacted]\"",
        ] {
            assert!(text.contains(shown), "{shown} missing: {text}");
        }
    }

    /// The enums the alert and breaker code spell with `as_str` are serialized under the
    /// same names (the golden document holds one config, not every variant).
    #[test]
    fn enums_are_written_as_they_are_spelled() {
        let name = |v: Value| v.as_str().unwrap_or_default().to_owned();
        for s in Signal::ALL {
            assert_eq!(name(json!(s)), s.as_str());
        }
        for c in [
            Comparison::Above,
            Comparison::AtLeast,
            Comparison::Below,
            Comparison::AtMost,
        ] {
            assert_eq!(name(json!(c)), c.as_str());
        }
        for s in [Severity::Info, Severity::Warning, Severity::Critical] {
            assert_eq!(name(json!(s)), s.as_str());
        }
        for k in [SinkKind::Webhook, SinkKind::Slack, SinkKind::Alertmanager] {
            assert_eq!(name(json!(k)), k.as_str());
        }
        for b in [BreakerScope::Route, BreakerScope::Upstream] {
            assert_eq!(name(json!(b)), b.as_str());
        }
    }

    #[test]
    fn secrets_never_appear() {
        let yaml = r#"
admin: { listen: "127.0.0.1:0", token: "s3cr3t-admin-token-0123" }
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes: [{ upstream: up }]
upstreams:
  up: { endpoints: ["http://127.0.0.1:1"] }
redis: { url: "redis://:hunter2@127.0.0.1:6379" }
dependencies:
  postgres: { url: "postgres://app:pgsecret@127.0.0.1:1/app" }
alerts:
  sinks:
    - { type: slack, url: "https://hooks.example.com/services/T0/B0/XYZSECRET" }
"#;
        let c = crate::config::parse_str(yaml, "t.yaml", &|_| None).unwrap();
        let text = to_json(&c).to_string();
        for secret in ["s3cr3t", "hunter2", "XYZSECRET", "services/T0", "pgsecret"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(text.contains("hooks.example.com"), "{text}");
        assert!(text.contains("\"HighErrorRate\""), "{text}");
    }

    #[test]
    fn path_keys_are_shown() {
        let yaml = r#"
listeners:
  - name: main
    listen: "127.0.0.1:0"
    normalize_path: forward
    merge_slashes: false
    escaped_slashes: keep
    health_path: /healthz
    routes:
      - { upstream: up, match: { path_prefix: /api, case_insensitive: true } }
upstreams:
  up: { endpoints: ["http://127.0.0.1:1"] }
"#;
        let c = crate::config::parse_str(yaml, "t.yaml", &|_| None).unwrap();
        let v = to_json(&c);
        let l = &v["listeners"][0];
        assert_eq!(l["normalize_path"], "forward");
        assert_eq!(l["merge_slashes"], false);
        assert_eq!(l["escaped_slashes"], "keep");
        assert_eq!(l["health_path"], "/healthz");
        assert_eq!(l["routes"][0]["match"]["case_insensitive"], true);
    }

    #[test]
    fn slow_client_timeouts_are_shown() {
        let yaml = r#"
listeners:
  - name: main
    listen: "127.0.0.1:0"
    http2: { idle_timeout: 90s }
    routes:
      - { upstream: up, timeouts: { body: 20s, min_body_rate: 1KiB/s } }
      - { upstream: up, timeouts: { min_body_rate: off } }
upstreams:
  up: { endpoints: ["http://127.0.0.1:1"] }
"#;
        let c = crate::config::parse_str(yaml, "t.yaml", &|_| None).unwrap();
        let v = to_json(&c);
        let l = &v["listeners"][0];
        assert_eq!(l["http2"]["idle_timeout"], "1m 30s");
        assert_eq!(l["routes"][0]["timeouts"]["body"], "20s");
        assert_eq!(l["routes"][0]["timeouts"]["min_body_rate"], "1024B/s");
        assert_eq!(l["routes"][1]["timeouts"]["body"], "1m");
        assert_eq!(l["routes"][1]["timeouts"]["min_body_rate"], "off");
    }

    #[test]
    fn upgrades_are_shown() {
        let yaml = r#"
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes:
      - { upstream: up }
      - { upstream: up, upgrades: [] }
upstreams:
  up: { endpoints: ["http://127.0.0.1:1"] }
"#;
        let c = crate::config::parse_str(yaml, "t.yaml", &|_| None).unwrap();
        let v = to_json(&c);
        let routes = &v["listeners"][0]["routes"];
        assert_eq!(routes[0]["upgrades"], json!(["websocket"]));
        assert_eq!(routes[1]["upgrades"], json!([]));
    }
}
