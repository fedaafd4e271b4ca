//! `/admin/config`: the configuration in force, as JSON, with every secret redacted (the
//! admin token, Redis and Postgres credentials, webhook URLs). Durations are written the way the
//! file takes them ("30s", "5m").

use std::str::FromStr;
use std::time::Duration;

use bb8_postgres::tokio_postgres;
use serde_json::{Value, json};
use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};

use crate::config::{
    BreakerReadiness, CheckConfig, Config, DrainMode, EscapedSlashes, KeySource, LoadBalancing,
    LogFormat, NormalizePath, REDACTED, RateLimitStore, RedisTarget, RetryOn, Secret,
    UpstreamClient, postgres_url_for_driver, redis_url_shown, sink_url_shown,
};

fn d(x: Duration) -> String {
    humantime::format_duration(x).to_string()
}

fn opt_d(x: Option<Duration>) -> Value {
    x.map_or(json!("off"), |x| json!(d(x)))
}

/// A libpq URL or key=value string, read by tokio-postgres' own parser (the one that
/// connects), shown field by field with the password left out. Searching the text for
/// `password=` misses `password = x`, `'quoted values'`, `\'` escapes and `?pass%77ord=x`;
/// the parser does not. A value that does not parse is shown as `[redacted]` whole.
pub(crate) fn postgres_shown(url: &Secret<String>) -> Value {
    let driver = postgres_url_for_driver(url.expose());
    let Ok(c) = tokio_postgres::Config::from_str(&driver) else {
        return json!(REDACTED);
    };
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    json!({
        "hosts": hosts,
        "hostaddrs": c.get_hostaddrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ports": c.get_ports(),
        "dbname": c.get_dbname(),
        "user": c.get_user(),
        "password": c.get_password().map(|_| REDACTED),
        "application_name": c.get_application_name(),
        "sslmode": match c.get_ssl_mode() {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            // rampart's require verifies the certificate and the name (verify-full).
            _ => "require",
        },
        "target_session_attrs": match c.get_target_session_attrs() {
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            _ => "any",
        },
        "connect_timeout": c.get_connect_timeout().map(|t| d(*t)),
    })
}

fn check(c: &CheckConfig) -> Value {
    json!({
        "interval": d(c.interval),
        "unhealthy_interval": d(c.unhealthy_interval),
        "fast_interval": d(c.fast_interval),
        "timeout": d(c.timeout),
        "critical": c.critical,
        "unhealthy_after": c.unhealthy_after,
        "healthy_after": c.healthy_after,
    })
}

pub(crate) fn to_json(c: &Config) -> Value {
    let listeners: Vec<Value> = c
        .listeners
        .iter()
        .map(|l| {
            let routes: Vec<Value> = l
                .routes
                .iter()
                .map(|r| {
                    json!({
                        "name": r.name,
                        "match": {
                            "path_prefix": r.path_prefix,
                            "host": r.host,
                            "methods": r.methods.as_ref().map(|m| m.iter().map(|m| m.as_str().to_owned()).collect::<Vec<_>>()),
                            "case_insensitive": r.case_insensitive,
                        },
                        "upstream": r.upstream,
                        "timeouts": {
                            "connect": d(r.timeouts.connect),
                            "first_byte": d(r.timeouts.first_byte),
                            "idle": d(r.timeouts.idle),
                            "total": opt_d(r.timeouts.total),
                            "body": d(r.timeouts.body),
                            "min_body_rate": r.timeouts.min_body_rate.map_or(json!("off"), |n| json!(format!("{n}B/s"))),
                        },
                        "max_body": r.max_body_bytes,
                        "rate_limits": r.rate_limits,
                        "upgrades": r.upgrades,
                    })
                })
                .collect();
            json!({
                "name": l.name,
                "listen": l.listen.to_string(),
                "max_connections": l.max_connections,
                "header_read_timeout": d(l.header_read_timeout),
                "max_header_bytes": l.max_header_bytes,
                "max_headers": l.max_headers,
                "http2": {
                    "max_concurrent_streams": l.http2.max_concurrent_streams,
                    "max_pending_accept_reset_streams": l.http2.max_pending_accept_reset_streams,
                    "max_local_error_reset_streams": l.http2.max_local_error_reset_streams,
                    "idle_timeout": d(l.http2.idle_timeout),
                },
                "max_in_flight": l.max_in_flight,
                "drain": match l.drain { DrainMode::Inbound => "inbound", DrainMode::Egress => "egress" },
                "health_path": l.health_path,
                "normalize_path": match l.path.normalize {
                    NormalizePath::Off => "off",
                    NormalizePath::Match => "match",
                    NormalizePath::Forward => "forward",
                },
                "merge_slashes": l.path.merge_slashes,
                "escaped_slashes": match l.path.escaped_slashes {
                    EscapedSlashes::Reject => "reject",
                    EscapedSlashes::Keep => "keep",
                },
                "routes": routes,
            })
        })
        .collect();
    let upstreams: serde_json::Map<String, Value> = c
        .upstreams
        .values()
        .map(|u| {
            let r = &u.resilience;
            let b = &r.circuit_breaker;
            let v = json!({
                "endpoints": u.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "connect_timeout": d(u.connect_timeout),
                "pool": {
                    "idle_timeout": d(u.pool.idle_timeout),
                    "max_idle_per_endpoint": u.pool.max_idle_per_endpoint,
                },
                "client": match u.client {
                    UpstreamClient::Rampart => "rampart",
                    UpstreamClient::Hyper => "hyper",
                },
                "tls": { "ca_file": u.tls_ca_file.as_ref().map(|p| p.display().to_string()) },
                "health_check": r.health_check.as_ref().map(|h| json!({
                    "path": h.path,
                    "check": check(&h.check),
                })),
                "load_balancing": match r.load_balancing {
                    LoadBalancing::RoundRobin => "round_robin",
                    LoadBalancing::LeastOutstanding => "least_outstanding",
                },
                "max_in_flight": r.max_in_flight,
                "circuit_breaker": {
                    "scope": b.scope.as_str(),
                    "failures": b.failures,
                    "open_for": d(b.open_for),
                    "max_open_for": d(b.max_open_for),
                    "half_open_successes": b.half_open_successes,
                    "half_open_max_probes": b.half_open_max_probes,
                    "failure_rate": b.failure_rate.as_ref().map(|f| json!({
                        "threshold": format!("{}%", f.threshold * 100.0),
                        "window": d(f.window),
                        "min_calls": f.min_calls,
                    })),
                    "count_500": b.count_500,
                    "count_backoff": b.count_backoff,
                },
                "ejection": {
                    "consecutive_failures": r.ejection.consecutive_failures,
                    "base_ejection": d(r.ejection.base_ejection),
                    "max_ejection": d(r.ejection.max_ejection),
                },
                "retry": {
                    "attempts": r.retry.attempts,
                    "backoff_base": d(r.retry.backoff_base),
                    "backoff_max": d(r.retry.backoff_max),
                    "on": r.retry.on.iter().map(|o| match o {
                        RetryOn::ConnectError => "connect_error".to_owned(),
                        RetryOn::Timeout => "timeout".to_owned(),
                        RetryOn::Reset => "reset".to_owned(),
                        RetryOn::Status(s) => s.to_string(),
                    }).collect::<Vec<_>>(),
                    "budget_ratio": r.retry.budget_ratio,
                    "budget_min_per_s": r.retry.budget_min_per_s,
                    "max_body": r.retry.max_body,
                    "connect_wait": opt_d(r.retry.connect_wait),
                },
            });
            (u.name.clone(), v)
        })
        .collect();
    let redis = c.redis.as_ref().map(|r| {
        let target = match &r.target {
            RedisTarget::Url(u) => json!({ "url": redis_url_shown(u) }),
            RedisTarget::Sentinel { master, addresses } => {
                json!({ "sentinel": { "master": master, "addresses": addresses } })
            }
        };
        let mut v = json!({
            "timeout": d(r.timeout),
            "connect_timeout": d(r.connect_timeout),
            "pool": { "max_size": r.pool_max_size },
        });
        if let (Value::Object(m), Value::Object(t)) = (&mut v, target) {
            m.extend(t);
        }
        v
    });
    let rate_limits: serde_json::Map<String, Value> = c
        .rate_limits
        .values()
        .map(|p| {
            let by = match &p.key.by {
                KeySource::ClientIp => "client_ip".to_owned(),
                KeySource::Header(h) => format!("header:{h}"),
            };
            let v = json!({
                "points": p.points,
                "per": d(p.per),
                "block_for": opt_d(p.block_for),
                "key": if p.key.per_route { format!("route+{by}") } else { by },
                "store": match p.store { RateLimitStore::Redis => "redis", RateLimitStore::Memory => "memory" },
                "ipv6_prefix": p.ipv6_prefix,
            });
            (p.name.clone(), v)
        })
        .collect();
    let rules: Vec<Value> = c
        .alerts
        .rules
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "signal": r.signal.as_str(),
                "comparison": r.comparison.as_str(),
                "threshold": crate::alert::format_value(r.signal, Some(r.threshold)),
                "window": d(r.window),
                "for": d(r.for_),
                "severity": r.severity.as_str(),
                "route": r.route,
                "upstream": r.upstream,
                "min_samples": r.min_samples,
            })
        })
        .collect();
    let sinks: Vec<Value> = c
        .alerts
        .sinks
        .iter()
        .map(|s| {
            json!({
                "type": s.kind.as_str(),
                "url": sink_url_shown(&s.url),
                "timeout": d(s.timeout),
                "max_attempts": s.max_attempts,
            })
        })
        .collect();
    json!({
        "source": c.source,
        "admin": {
            "listen": c.admin.listen.to_string(),
            "token": c.admin.token.as_ref().map(|_| REDACTED),
            "insecure_no_token": c.admin.insecure_no_token,
            "allowed_hosts": c.admin.allowed_hosts,
        },
        "logging": {
            "level": c.logging.level,
            "format": match c.logging.format { LogFormat::Text => "text", LogFormat::Json => "json" },
            "access_log": c.logging.access_log,
        },
        "trusted_proxies": c.trusted_proxies.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "listeners": listeners,
        "upstreams": upstreams,
        "redis": redis,
        "replicas": c.replicas,
        "rate_limits": rate_limits,
        "dependencies": {
            "postgres": c.dependencies.postgres.as_ref().map(|p| json!({
                "url": postgres_shown(&p.url),
                "tls": { "ca_file": p.tls_ca_file.as_ref().map(|f| f.display().to_string()) },
                "pool": {
                    "min_idle": p.pool.min_idle,
                    "max_size": p.pool.max_size,
                    "connect_timeout": d(p.pool.connect_timeout),
                    "idle_timeout": d(p.pool.idle_timeout),
                    "max_lifetime": d(p.pool.max_lifetime),
                },
                "check": check(&p.check),
                "warn_connections_above": format!("{}%", p.warn_connections_above * 100.0),
            })),
            "redis": c.dependencies.redis.as_ref().map(|r| json!({ "check": check(r) })),
            "memory": c.dependencies.memory.as_ref().map(|m| json!({
                "check": check(&m.check),
                "warn_above": format!("{}%", m.warn_above * 100.0),
            })),
        },
        "drain": {
            "accept_grace": d(c.drain.accept_grace),
            "timeout": d(c.drain.timeout),
        },
        "readiness": {
            "breaker_open": match c.readiness.breaker_open {
                BreakerReadiness::Ignore => "ignore",
                BreakerReadiness::NotReady => "not_ready",
            },
        },
        "alerts": {
            "interval": d(c.alerts.interval),
            "rules": rules,
            "sinks": sinks,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way libpq's grammar (as tokio-postgres reads it) can carry a password; each
    /// secret holds "zq", which nothing else in these strings does.
    const SPELLINGS: &[&str] = &[
        "host=db user=app password=zqsecret1 dbname=app",
        "host=db user=app password = zqsecret2 dbname=app",
        "host=db user=app password= zqsecret2b dbname=app",
        "host=db password='zq secret3' user=app",
        r"host=db password='zq\'sec\\ret4' user=app",
        r"host=db password=zq\ sec\'ret5 user=app",
        "host=db\tpassword=\tzqsecret6\nuser=app",
        "password=zqsecret7 host=db",
        "host=db password=zqfirst8 password=zqsecond8 user=app",
        "host=db1,db2 port=5432,5433 password=zqsecret9 dbname=app",
        "postgres://app:zqsecret10@db:5432/app",
        "postgresql://app:zq%20secret11@db/app",
        "postgres://app:zq%3Asec%40ret12@db/app",
        "postgres://app@db/app?password=zqsecret13",
        "postgres://db/app?pass%77ord=zqsecret14&user=app",
        "postgres://db/app?%70%61ssword=zqsecret15&user=app",
        "postgres://db/app?password=zq%26secret16&user=app",
        "postgres://app:zqfirst17@db/app?password=zqsecond17",
        "postgres://app:zqsecret18@db1:5432,db2:5433/app?target_session_attrs=read-write",
        "postgres://app:zqsecret19@[::1]:5432/app?sslmode=require",
        "postgres://app:zq:secret20@db/app",
    ];

    #[test]
    fn postgres_passwords_never_show_in_any_spelling() {
        for url in SPELLINGS {
            // A spelling rampart really runs with: validation (the driver's parser) takes it.
            let yaml = "listeners: [{ name: m, listen: \"127.0.0.1:0\", routes: [{ upstream: u }] }]\n\
                        upstreams: { u: { endpoints: [\"http://127.0.0.1:1\"] } }\n\
                        dependencies: { postgres: { url: \"${PG}\" } }\n";
            let c = crate::config::parse_str(yaml, "t.yaml", &|v| {
                (v == "PG").then(|| (*url).to_owned())
            })
            .unwrap_or_else(|e| panic!("{url}: {e}"));
            let pg = c.dependencies.postgres.as_ref().unwrap();
            let shown = postgres_shown(&pg.url);
            let whole = to_json(&c).to_string();
            let debug = format!("{c:?}");
            for text in [&shown.to_string(), &whole, &debug] {
                assert!(!text.contains("zq"), "{url} leaks: {text}");
                assert!(!text.contains("secret"), "{url} leaks: {text}");
            }
            assert_eq!(shown["password"], REDACTED, "{url}: {shown}");
            let hosts = shown["hosts"].to_string();
            assert!(
                hosts.contains("db") || hosts.contains("::1"),
                "{url}: {shown}"
            );
        }
        let multi = postgres_shown(&Secret::new(SPELLINGS[18].to_owned()));
        assert_eq!(multi["hosts"], json!(["db1", "db2"]));
        assert_eq!(multi["ports"], json!([5432, 5433]));
        assert_eq!(multi["target_session_attrs"], "read-write");
        assert_eq!(
            (multi["user"].as_str(), multi["dbname"].as_str()),
            (Some("app"), Some("app"))
        );
        // No password: nothing to hide, and nothing said.
        let plain = postgres_shown(&Secret::new("postgres://app@db/app".to_owned()));
        assert_eq!(plain["password"], Value::Null);
        // What does not parse is not shown at all.
        for bad in [
            "host=db password='zq unterminated",
            "postgres://db/app?zq=1",
        ] {
            assert_eq!(
                postgres_shown(&Secret::new(bad.to_owned())),
                json!(REDACTED)
            );
        }
    }

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
        upgrades: [websocket, "foo/2"]
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
drain: { accept_grace: 2s, timeout: 45s }
readiness: { breaker_open: not_ready }
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
            u.tls_ca_file = Some(ca.clone());
        }
        if let Some(p) = rich.dependencies.postgres.as_mut() {
            p.tls_ca_file = Some(ca);
        }
        json!({
            "rich": to_json(&rich),
            "sentinel": to_json(&parse(SENTINEL)),
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
