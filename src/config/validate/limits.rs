//! `redis:` and `rate_limits.<name>`: the one Redis client and the policies routes refer to.

use std::collections::BTreeMap;
use std::time::Duration;

use super::reader::{Ctx, Field, MapReader, Unique};
use super::values::{parse_duration, parse_host_port, parse_rate_limit_key, parse_redis_url};
use crate::config::raw::{Kind, child_path};
use crate::config::{
    KeySource, RateLimitConfig, RateLimitCost, RateLimitKey, RateLimitStore, RedisConfig,
    RedisTarget, Secret,
};

/// Every rate-limited request waits up to this while Redis is down (until the fallback
/// takes over): a hard limit meant in milliseconds.
pub(super) const MAX_REDIS_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const MAX_REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Counts travel through Lua numbers (doubles): stay far below 2^53.
pub(super) const MAX_RATE_LIMIT_POINTS: u64 = 1_000_000_000_000_000;
/// Open streams per key: far beyond any real client, small enough for a Lua number.
pub(super) const MAX_STREAMS: u64 = 1_000_000;
pub(super) const MIN_STREAM_LEASE: Duration = Duration::from_secs(3);
pub(super) const MAX_STREAM_LEASE: Duration = Duration::from_secs(600);
/// `lease.max`: beyond this a slice held by an idle replica would strand too many points.
pub(super) const MAX_LEASE: u64 = 1_000_000;

/// `redis:`: exactly one of `url`, `sentinel` and `cluster`, plus timeouts and the pool. Returns Some
/// whenever the section is written, even with problems, so `store: redis` is not reported
/// as lacking it.
pub(super) fn redis(ctx: &mut Ctx, f: Option<Field>) -> Option<RedisConfig> {
    let f = f?;
    let mut m = MapReader::open(ctx, Some(f));
    let url_field = m.optional("url");
    let sentinel_field = m.optional("sentinel");
    let cluster_field = m.optional("cluster");
    let url = url_field
        .as_ref()
        .and_then(|f| ctx.parse_secret(f, "a redis:// URL", parse_redis_url));
    let sentinel = sentinel_field.clone().map(|f| sentinel(ctx, f));
    let cluster = cluster_field
        .clone()
        .map(|f| super::redis_cluster::cluster(ctx, f));
    let timeout = m
        .read(ctx, "timeout", |ctx, f| {
            ctx.duration_at_most(f, MAX_REDIS_TIMEOUT)
        })
        .unwrap_or(RedisConfig::DEFAULT_TIMEOUT);
    let connect_timeout = m
        .read(ctx, "connect_timeout", |ctx, f| {
            ctx.duration_at_most(f, MAX_REDIS_CONNECT_TIMEOUT)
        })
        .unwrap_or(timeout);
    let pool_max_size = redis_pool(ctx, m.optional("pool"));
    // Reported at each choice after the first, in the file's order.
    let mut written: Vec<&Field> = [&url_field, &sentinel_field, &cluster_field]
        .into_iter()
        .flatten()
        .collect();
    written.sort_by_key(|f| f.pos());
    for extra in written.iter().skip(1) {
        let path = extra.path.clone();
        ctx.report(
            extra.pos(),
            &path,
            "give one of `url`, `sentinel` and `cluster`, not several",
        );
    }
    let target = match (&url_field, &sentinel_field, &cluster_field) {
        (None, None, None) => {
            if !m.quiet {
                ctx.report(
                    m.pos,
                    &m.path,
                    "missing `url` (\"redis://host:port\"), `sentinel` ({ master, addresses }) \
                     or `cluster` ({ nodes })",
                );
            }
            None
        }
        (Some(_), None, None) => url.map(RedisTarget::Url),
        (None, Some(_), None) => sentinel
            .flatten()
            .map(|(master, addresses)| RedisTarget::Sentinel { master, addresses }),
        (None, None, Some(_)) => cluster.flatten(),
        _ => None,
    };
    m.finish(ctx);
    Some(RedisConfig {
        // A stand-in when broken: the file is refused anyway.
        target: target
            .unwrap_or_else(|| RedisTarget::Url(Secret::new("redis://127.0.0.1:6379".into()))),
        timeout,
        connect_timeout,
        pool_max_size,
    })
}

pub(super) fn sentinel(ctx: &mut Ctx, f: Field) -> Option<(String, Vec<String>)> {
    let mut m = MapReader::open(ctx, Some(f));
    let master = m.required(ctx, "master").and_then(|f| {
        ctx.parse_with(&f, "a master name", |s| {
            if s.is_empty() || s.chars().any(char::is_whitespace) {
                Err(format!(
                    "expected the master's name as the sentinels know it, got \"{s}\""
                ))
            } else {
                Ok(s.to_owned())
            }
        })
    });
    let addresses = m.required(ctx, "addresses").and_then(|f| {
        let items = ctx.list(&f, "a list of host:port")?;
        if items.is_empty() {
            ctx.report(f.pos(), &f.path, "must list at least one sentinel");
            return None;
        }
        let mut seen = Unique::default();
        let mut out = Vec::new();
        for item in &items {
            if let Some(a) = ctx.parse_with(item, "host:port", parse_host_port)
                && seen.insert(ctx, &a, item, "sentinel address")
            {
                out.push(a);
            }
        }
        (out.len() == items.len()).then_some(out)
    });
    m.finish(ctx);
    Some((master?, addresses?))
}

pub(super) fn redis_pool(ctx: &mut Ctx, f: Option<Field>) -> u32 {
    let mut m = MapReader::open(ctx, f);
    let max_size = m
        .read(ctx, "max_size", |ctx, f| ctx.int(f, 1, 1024))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(RedisConfig::DEFAULT_POOL_MAX_SIZE);
    m.finish(ctx);
    max_size
}

/// The decoded policies, and every name written (even broken ones), like [`Upstreams`].
pub(super) struct Policies {
    pub(super) configs: BTreeMap<String, RateLimitConfig>,
    pub(super) known: Vec<String>,
}

pub(super) fn rate_limits(ctx: &mut Ctx, f: Option<Field>, redis_present: bool) -> Policies {
    let mut out = Policies {
        configs: BTreeMap::new(),
        known: Vec::new(),
    };
    let Some(f) = f else { return out };
    let Some(entries) = ctx.entries(&f) else {
        return out;
    };
    for e in entries {
        let path = child_path(&f.path, &e.key);
        ctx.check_name(&e.key, e.key_pos, &path, "rate limit policy");
        let config = rate_limit(ctx, Field::at(&e.value, path), &e.key, redis_present);
        out.configs.insert(e.key.clone(), config);
    }
    out.known = out.configs.keys().cloned().collect();
    out
}

pub(super) fn rate_limit(
    ctx: &mut Ctx,
    f: Field,
    name: &str,
    redis_present: bool,
) -> RateLimitConfig {
    let mut m = MapReader::open(ctx, Some(f));
    let points = m.read(ctx, "points", |ctx, f| ctx.int(f, 1, MAX_RATE_LIMIT_POINTS));
    let max_streams = m.read(ctx, "max_streams", |ctx, f| ctx.int(f, 1, MAX_STREAMS));
    let cost_field = m.optional("cost");
    let cost = cost_field.as_ref().and_then(|f| {
        ctx.one_of(
            f,
            &[
                ("requests", RateLimitCost::Requests),
                ("tokens", RateLimitCost::Tokens),
            ],
        )
    });
    // A policy that only limits streams says so by writing `max_streams` alone; tokens
    // always need a budget.
    if let (Some(f), Some(RateLimitCost::Tokens), None, Some(_)) =
        (&cost_field, cost, points, max_streams)
    {
        ctx.report(
            f.pos(),
            &f.path,
            "cost tokens needs `points` (the tokens allowed per window)",
        );
    }
    let points = match (points, max_streams) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => Some(RateLimitConfig::DEFAULT_POINTS),
    };
    let config = RateLimitConfig {
        name: name.to_owned(),
        points,
        per: m
            .read(ctx, "per", |ctx, f| {
                ctx.parse_with(f, "a duration", |s| {
                    let d = parse_duration(s)?;
                    // Redis and the memory limiter count in milliseconds.
                    if d < Duration::from_millis(1) {
                        return Err(format!("must be at least 1ms, got \"{s}\""));
                    }
                    Ok(d)
                })
            })
            .unwrap_or(RateLimitConfig::DEFAULT_PER),
        block_for: m
            .read(ctx, "block_for", Ctx::duration_or_off)
            .unwrap_or(Some(RateLimitConfig::DEFAULT_BLOCK_FOR)),
        key: m
            .read(ctx, "key", |ctx, f| {
                ctx.parse_with(f, "a key", parse_rate_limit_key)
            })
            .unwrap_or(RateLimitKey {
                per_route: false,
                by: KeySource::ClientIp,
            }),
        store: m
            .read(ctx, "store", |ctx, f| {
                let store = ctx.one_of(
                    f,
                    &[
                        ("redis", RateLimitStore::Redis),
                        ("memory", RateLimitStore::Memory),
                    ],
                )?;
                if store == RateLimitStore::Redis && !redis_present {
                    ctx.report(
                        f.pos(),
                        &f.path,
                        "store redis needs a top-level `redis:` section (url, sentinel or cluster)",
                    );
                    return None;
                }
                Some(store)
            })
            .unwrap_or(if redis_present {
                RateLimitStore::Redis
            } else {
                RateLimitStore::Memory
            }),
        ipv6_prefix: m
            .read(ctx, "ipv6_prefix", |ctx, f| ctx.int(f, 1, 128))
            .and_then(|n| u8::try_from(n).ok())
            .unwrap_or(RateLimitKey::DEFAULT_IPV6_PREFIX),
        cost: cost.unwrap_or_default(),
        max_streams,
        stream_lease: m
            .read(ctx, "stream_lease", stream_lease)
            .unwrap_or(RateLimitConfig::DEFAULT_STREAM_LEASE),
        lease: match m.optional("lease") {
            Some(f) => lease(ctx, &f),
            None => Some(RateLimitConfig::DEFAULT_LEASE_MAX),
        },
    };
    m.finish(ctx);
    config
}

/// `lease`: `off`, or a mapping `{ max: N }` (`{}` keeps the default max). A broken value
/// reads as the default: the file is refused anyway.
fn lease(ctx: &mut Ctx, f: &Field) -> Option<u64> {
    if let Kind::Scalar(_) = &f.node.kind {
        return ctx
            .parse_with(f, "off or { max: N }", |s| {
                if s == "off" {
                    Ok(None)
                } else {
                    Err(format!("expected off or {{ max: N }}, got \"{s}\""))
                }
            })
            .unwrap_or(Some(RateLimitConfig::DEFAULT_LEASE_MAX));
    }
    let mut m = MapReader::open(ctx, Some(f.clone()));
    let max = m
        .read(ctx, "max", |ctx, f| ctx.int(f, 1, MAX_LEASE))
        .unwrap_or(RateLimitConfig::DEFAULT_LEASE_MAX);
    m.finish(ctx);
    Some(max)
}

/// `stream_lease`: renewed every third of it, so not so short that one slow Redis call
/// loses a live stream's permit, nor so long that a dead replica's permits linger.
fn stream_lease(ctx: &mut Ctx, f: &Field) -> Option<Duration> {
    ctx.parse_with(f, "a duration", |s| {
        let d = parse_duration(s)?;
        if !(MIN_STREAM_LEASE..=MAX_STREAM_LEASE).contains(&d) {
            return Err(format!("must be between 3s and 10m, got \"{s}\""));
        }
        Ok(d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::test_support::*;
    use std::time::Duration;

    // === redis and rate limits ===

    /// MINIMAL with `extra` (dedented) appended from line 10 and `route_extra` as line 6, a
    /// key of the only route.
    fn with_limits(extra: &str, route_extra: &str) -> String {
        format!(
            "listeners:\n  - name: inbound\n    listen: 0.0.0.0:8080\n    routes:\n      - upstream: backend\n        {route_extra}\nupstreams:\n  backend:\n    endpoints: [\"http://127.0.0.1:3001\"]\n{}",
            yaml(extra)
        )
    }

    #[test]
    fn rate_limits_with_every_key_and_defaults() {
        let config = ok(&with_limits(
            r#"
            redis:
              url: redis://:secret@127.0.0.1:6380/2
              timeout: 20ms
              pool: { max_size: 4 }
            replicas: 3
            rate_limits:
              api: { points: 10, per: 1s, block_for: off, key: "route+header:X-User", store: memory, ipv6_prefix: 48 }
              chat: {}
            "#,
            "rate_limits: [api, chat]",
        ));
        let redis = config.redis.clone().unwrap();
        assert_eq!(
            redis.target,
            RedisTarget::Url(Secret::new("redis://:secret@127.0.0.1:6380/2".into()))
        );
        assert!(!format!("{redis:?}").contains("secret"));
        let summary = config.summary();
        assert!(
            summary.contains(
                "redis     redis://:[redacted]@127.0.0.1:6380/2 (timeout 20ms, pool 4, replicas 3)"
            ),
            "{summary}"
        );
        assert_eq!(redis.timeout, Duration::from_millis(20));
        assert_eq!(redis.connect_timeout, Duration::from_millis(20));
        assert_eq!(redis.pool_max_size, 4);
        assert_eq!(config.replicas, 3);
        assert_eq!(
            config.rate_limits["api"],
            RateLimitConfig {
                name: "api".into(),
                points: Some(10),
                per: secs(1),
                block_for: None,
                key: RateLimitKey {
                    per_route: true,
                    by: KeySource::Header(http::HeaderName::from_static("x-user")),
                },
                store: RateLimitStore::Memory,
                ipv6_prefix: 48,
                cost: RateLimitCost::Requests,
                max_streams: None,
                stream_lease: secs(30),
                lease: Some(64),
            }
        );
        // Defaults; the store is redis because a redis section exists.
        assert_eq!(
            config.rate_limits["chat"],
            RateLimitConfig {
                name: "chat".into(),
                points: Some(100),
                per: secs(60),
                block_for: Some(secs(60)),
                key: RateLimitKey {
                    per_route: false,
                    by: KeySource::ClientIp,
                },
                store: RateLimitStore::Redis,
                ipv6_prefix: 64,
                cost: RateLimitCost::Requests,
                max_streams: None,
                stream_lease: secs(30),
                lease: Some(64),
            }
        );
        assert_eq!(config.listeners[0].routes[0].rate_limits, ["api", "chat"]);
        assert!(
            config
                .summary()
                .contains("ratelimit api 10 per 1s (block off, store memory)")
        );

        // Without a redis section the default store is memory.
        let config = ok(&with_limits("rate_limits: { a: {} }", ""));
        assert_eq!(config.rate_limits["a"].store, RateLimitStore::Memory);
        assert_eq!(config.redis, None);
    }

    #[test]
    fn redis_sentinel() {
        let config = ok(&with_limits(
            r#"
            redis:
              sentinel:
                master: mymaster
                addresses: ["10.0.0.1:26379", "sentinel-b:26379", "[::1]:26379"]
              timeout: 40ms
              connect_timeout: 200ms
            "#,
            "",
        ));
        let redis = config.redis.unwrap();
        assert_eq!(
            redis.target,
            RedisTarget::Sentinel {
                master: "mymaster".into(),
                addresses: vec![
                    "10.0.0.1:26379".into(),
                    "sentinel-b:26379".into(),
                    "[::1]:26379".into()
                ],
            }
        );
        assert_eq!(redis.connect_timeout, Duration::from_millis(200));
        assert_eq!(redis.pool_max_size, 16);
    }

    #[test]
    fn redis_needs_exactly_one_of_url_and_sentinel() {
        only(
            &with_limits("redis: { timeout: 10ms }", ""),
            10,
            8,
            "redis",
            "missing `url` (\"redis://host:port\"), `sentinel` ({ master, addresses }) or `cluster`",
        );
        only(
            &with_limits(
                r#"
                redis:
                  url: redis://127.0.0.1
                  sentinel: { master: m, addresses: ["a:1"] }
                "#,
                "",
            ),
            12,
            13,
            "redis.sentinel",
            "give one of `url`, `sentinel` and `cluster`, not several",
        );
    }

    #[test]
    fn bad_redis_values() {
        let p = problems(&with_limits(
            r#"
            redis:
              url: "http://u:hunter2@127.0.0.1"
              timeout: 0ms
              pool: { max_size: 0 }
            "#,
            "",
        ));
        assert_eq!(p.len(), 3, "{p:#?}");
        check(
            &p[0],
            11,
            8,
            "redis.url",
            "expected a URL like \"redis://127.0.0.1:6379\", got a URL with credentials (not shown)",
        );
        assert!(!p[0].message.contains("hunter2"));
        check(&p[1], 12, 12, "redis.timeout", "must be greater than 0");
        check(
            &p[2],
            13,
            21,
            "redis.pool.max_size",
            "must be greater than 0",
        );

        only(
            &with_limits(r#"redis: { url: "rediss://h:6379" }"#, ""),
            10,
            15,
            "redis.url",
            "rediss://) is not supported",
        );
        let p = problems(&with_limits(
            r#"
            redis:
              sentinel:
                master: ""
                addresses: ["nohost", "h:0", "h:1", "h:1"]
            "#,
            "",
        ));
        assert_eq!(p.len(), 4, "{p:#?}");
        check(
            &p[0],
            12,
            13,
            "redis.sentinel.master",
            "expected the master's name",
        );
        check(
            &p[1],
            13,
            17,
            "redis.sentinel.addresses[0]",
            "expected host:port like",
        );
        check(
            &p[2],
            13,
            27,
            "redis.sentinel.addresses[1]",
            "expected host:port like",
        );
        check(
            &p[3],
            13,
            41,
            "redis.sentinel.addresses[3]",
            "duplicate sentinel address \"h:1\"",
        );
        only(
            &with_limits("redis: { sentinel: { master: m, addresses: [] } }", ""),
            10,
            44,
            "redis.sentinel.addresses",
            "must list at least one sentinel",
        );
    }

    #[test]
    fn store_redis_needs_a_redis_section() {
        only(
            &with_limits("rate_limits:\n  api: { store: redis }", ""),
            11,
            17,
            "rate_limits.api.store",
            "store redis needs a top-level `redis:` section",
        );
    }

    #[test]
    fn bad_policy_values() {
        let p = problems(&with_limits(
            r#"
            replicas: 0
            rate_limits:
              "bad name": {}
              api:
                points: 0
                per: 500us
                block_for: forever
                key: cookie:sid
                store: disk
                ipv6_prefix: 129
              h: { key: "header:bad name" }
            "#,
            "",
        ));
        let got: Vec<(usize, usize, &str)> = p
            .iter()
            .map(|p| (p.line, p.column, p.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (10, 11, "replicas"),
                (12, 3, "rate_limits.bad name"),
                (14, 13, "rate_limits.api.points"),
                (15, 10, "rate_limits.api.per"),
                (16, 16, "rate_limits.api.block_for"),
                (17, 10, "rate_limits.api.key"),
                (18, 12, "rate_limits.api.store"),
                (19, 18, "rate_limits.api.ipv6_prefix"),
                (20, 13, "rate_limits.h.key"),
            ],
            "{p:#?}"
        );
        assert!(
            p[1].message
                .contains("invalid rate limit policy name \"bad name\"")
        );
        assert!(p[3].message.contains("must be at least 1ms"));
        assert!(
            p[5].message
                .contains("expected client_ip, header:NAME, route+client_ip or route+header:NAME")
        );
        assert!(p[6].message.contains("expected one of redis, memory"));
        assert!(p[7].message.contains("must be at most 128"));
        assert!(p[8].message.contains("invalid header name \"bad name\""));
    }

    #[test]
    fn stream_and_token_policies() {
        let config = ok(&with_limits(
            r#"
            redis: { url: "redis://127.0.0.1:6379" }
            rate_limits:
              streams: { max_streams: 3, key: "header:x-user-id" }
              both: { points: 20, max_streams: 2, stream_lease: 3s, store: memory }
              tokens: { points: 100000, per: 1m, cost: tokens }
              token_streams: { points: 500, cost: tokens, max_streams: 1, stream_lease: 10m }
              requests: { cost: requests }
            "#,
            "rate_limits: [streams, both, tokens, token_streams, requests]",
        ));
        let p = &config.rate_limits;
        // `max_streams` alone: no request limit.
        assert_eq!(p["streams"].points, None);
        assert_eq!(p["streams"].max_streams, Some(3));
        assert_eq!(p["streams"].stream_lease, secs(30));
        assert_eq!(p["streams"].cost, RateLimitCost::Requests);
        assert_eq!(p["both"].points, Some(20));
        assert_eq!(p["both"].max_streams, Some(2));
        assert_eq!(p["both"].stream_lease, secs(3));
        assert_eq!(p["tokens"].cost, RateLimitCost::Tokens);
        assert_eq!(p["tokens"].points, Some(100_000));
        assert_eq!(p["tokens"].max_streams, None);
        assert_eq!(p["token_streams"].cost, RateLimitCost::Tokens);
        assert_eq!(p["token_streams"].max_streams, Some(1));
        assert_eq!(p["token_streams"].stream_lease, secs(600));
        assert_eq!(p["requests"].points, Some(100));
        let summary = config.summary();
        assert!(
            summary.contains("ratelimit streams max 3 streams (lease 30s) (store redis)"),
            "{summary}"
        );
        assert!(
            summary.contains("ratelimit tokens 100000 tokens per 1m (block 1m, store redis)"),
            "{summary}"
        );
    }

    #[test]
    fn bad_stream_and_token_values() {
        let p = problems(&with_limits(
            r#"
            rate_limits:
              a: { max_streams: 0 }
              b: { max_streams: 3, stream_lease: 2s }
              c: { max_streams: 3, stream_lease: 11m }
              d: { cost: bytes }
              e: { max_streams: 2, cost: tokens }
              f: { max_streams: many }
            "#,
            "",
        ));
        let got: Vec<(usize, usize, &str)> = p
            .iter()
            .map(|p| (p.line, p.column, p.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (11, 21, "rate_limits.a.max_streams"),
                (12, 38, "rate_limits.b.stream_lease"),
                (13, 38, "rate_limits.c.stream_lease"),
                (14, 14, "rate_limits.d.cost"),
                (15, 30, "rate_limits.e.cost"),
                (16, 21, "rate_limits.f.max_streams"),
            ],
            "{p:#?}"
        );
        assert!(p[0].message.contains("must be greater than 0"), "{p:#?}");
        assert!(
            p[1].message.contains("must be between 3s and 10m"),
            "{p:#?}"
        );
        assert!(
            p[2].message.contains("must be between 3s and 10m"),
            "{p:#?}"
        );
        assert!(
            p[3].message.contains("expected one of requests, tokens"),
            "{p:#?}"
        );
        assert!(
            p[4].message.contains("cost tokens needs `points`"),
            "{p:#?}"
        );
        assert!(p[5].message.contains("expected an integer"), "{p:#?}");
    }

    #[test]
    fn lease_off_max_and_bad_values() {
        let config = ok(&with_limits(
            r#"
            redis: { url: "redis://127.0.0.1:6379" }
            rate_limits:
              a: {}
              b: { lease: off }
              c: { lease: { max: 8 } }
              d: { lease: {} }
            "#,
            "",
        ));
        let p = &config.rate_limits;
        assert_eq!(p["a"].lease, Some(64));
        assert_eq!(p["b"].lease, None);
        assert_eq!(p["c"].lease, Some(8));
        assert_eq!(p["d"].lease, Some(64));
        let p = problems(&with_limits(
            r#"
            rate_limits:
              a: { lease: on }
              b: { lease: { max: 0 } }
              c: { lease: { maxx: 3 } }
              d: { lease: [1] }
            "#,
            "",
        ));
        let got: Vec<(usize, usize, &str)> = p
            .iter()
            .map(|p| (p.line, p.column, p.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (11, 15, "rate_limits.a.lease"),
                (12, 22, "rate_limits.b.lease.max"),
                (13, 17, "rate_limits.c.lease.maxx"),
                (14, 15, "rate_limits.d.lease"),
            ],
            "{p:#?}"
        );
        assert!(
            p[0].message
                .contains("expected off or { max: N }, got \"on\""),
            "{p:#?}"
        );
        assert!(p[1].message.contains("must be greater than 0"), "{p:#?}");
        assert!(p[2].message.contains("did you mean \"max\""), "{p:#?}");
        assert!(p[3].message.contains("expected a mapping"), "{p:#?}");
    }

    #[test]
    fn routes_refer_to_known_policies_once() {
        let p = problems(&with_limits(
            "rate_limits: { api: {}, chat: {} }",
            "rate_limits: [api, chta, api]",
        ));
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            6,
            28,
            "listeners[0].routes[0].rate_limits[1]",
            "unknown rate limit policy \"chta\" (known: api, chat)",
        );
        check(
            &p[1],
            6,
            34,
            "listeners[0].routes[0].rate_limits[2]",
            "duplicate rate limit policy \"api\"",
        );
        only(
            &with_limits("", "rate_limits: [api]"),
            6,
            23,
            "listeners[0].routes[0].rate_limits[0]",
            "unknown rate limit policy \"api\" (no `rate_limits` are defined)",
        );
    }
}
