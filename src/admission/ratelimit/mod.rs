//! Rate limiting: named policies (`rate_limits:`), checked right after routing by one call,
//! [`check`]. A policy counts requests per key (client IP or a header, optionally per
//! route) in Redis, shared by every replica, or in memory. Redis policies fall back to
//! memory per request (fallback.rs).
//!
//! The counts live in a [`Registry`] keyed by policy name, outside the config snapshot, so
//! a reload keeps them for the names it keeps.

pub(crate) mod fallback;
pub(crate) mod memory;
pub(crate) mod redis;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as PromRegistry;
use tokio::time::Instant;

use crate::config::{Config, KeySource, RateLimitConfig, RateLimitStore, RedisConfig};
use fallback::{RedisStore, Transition};
use memory::Table;

/// Keys one policy tracks in memory (per table); beyond, new keys are let through and
/// counted as fail_open. About 100 bytes each.
const MAX_KEYS: usize = 100_000;

/// What a store applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub points: u64,
    pub window: Duration,
    pub block: Option<Duration>,
}

/// One store's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub remaining: u64,
    /// Until the window ends.
    pub reset: Duration,
    /// When refused: until a request may be allowed again.
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Redis,
    Memory,
    FailOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Allowed,
    Limited,
}

/// Label values in snake case, as Prometheus labels usually are.
macro_rules! label_values {
    ($ty:ty { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(match self {
                    $(<$ty>::$variant => $text),+
                })
            }
        }
    };
}

label_values!(Source { Redis => "redis", Memory => "memory", FailOpen => "fail_open" });
label_values!(Outcome { Allowed => "allowed", Limited => "limited" });
label_values!(FallbackTo { Memory => "memory", Redis => "redis" });

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    policy: String,
    result: Outcome,
    source: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FallbackTo {
    Memory,
    Redis,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransitionLabels {
    to: FallbackTo,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

/// `rampart_ratelimit_*`. Labels: policy names from the config, small enums.
#[derive(Clone, Debug)]
pub struct Metrics {
    decisions: Family<DecisionLabels, Counter>,
    transitions: Family<TransitionLabels, Counter>,
    /// 1 while Redis is skipped (breaker open).
    fallback_active: Gauge,
    redis_seconds: Histogram,
    redis_errors: Family<ErrorLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut PromRegistry) -> Metrics {
        let reg = registry.sub_registry_with_prefix("ratelimit");
        let m = Metrics {
            decisions: Family::default(),
            transitions: Family::default(),
            fallback_active: Gauge::default(),
            redis_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
            ]),
            redis_errors: Family::default(),
        };
        // No `_total` suffix: the encoder adds it to counters.
        reg.register(
            "decisions",
            "Rate-limit decisions by policy, result (allowed|limited) and source (redis|memory|fail_open)",
            m.decisions.clone(),
        );
        reg.register(
            "fallback_transitions",
            "Switches of the Redis policies between Redis and the memory fallback",
            m.transitions.clone(),
        );
        reg.register(
            "fallback_active",
            "1 while Redis is skipped and Redis policies are decided in memory",
            m.fallback_active.clone(),
        );
        reg.register(
            "redis_call_seconds",
            "Duration of rate-limit calls to Redis, check-out included",
            m.redis_seconds.clone(),
        );
        reg.register(
            "redis_errors",
            "Failed rate-limit calls to Redis by kind (timeout|error)",
            m.redis_errors.clone(),
        );
        m
    }

    fn transition(&self, t: Transition) {
        let (to, active) = match t {
            Transition::ToMemory => (FallbackTo::Memory, 1),
            Transition::ToRedis => (FallbackTo::Redis, 0),
        };
        self.transitions
            .get_or_create(&TransitionLabels { to })
            .inc();
        self.fallback_active.set(active);
    }

    fn redis_errors(&self, kind: &'static str) -> Counter {
        self.redis_errors
            .get_or_create(&ErrorLabels { kind })
            .clone()
    }

    /// Handles for one policy, made once so a decision does not allocate labels.
    fn counters(&self, policy: &str) -> DecisionCounters {
        let get = |result, source| {
            self.decisions
                .get_or_create(&DecisionLabels {
                    policy: policy.to_owned(),
                    result,
                    source,
                })
                .clone()
        };
        DecisionCounters {
            redis: [
                get(Outcome::Allowed, Source::Redis),
                get(Outcome::Limited, Source::Redis),
            ],
            memory: [
                get(Outcome::Allowed, Source::Memory),
                get(Outcome::Limited, Source::Memory),
            ],
            fail_open: get(Outcome::Allowed, Source::FailOpen),
        }
    }
}

struct DecisionCounters {
    /// [allowed, limited]
    redis: [Counter; 2],
    memory: [Counter; 2],
    fail_open: Counter,
}

impl DecisionCounters {
    fn count(&self, source: Source, allowed: bool) {
        let i = usize::from(!allowed);
        match source {
            Source::Redis => self.redis[i].inc(),
            Source::Memory => self.memory[i].inc(),
            Source::FailOpen => self.fail_open.inc(),
        };
    }
}

// === policies ===

/// State of one policy name that survives reloads.
struct PolicyState {
    /// `store: memory` counts.
    memory: Arc<Table>,
    /// `store: redis`: the fallback counts.
    fallback: Arc<Table>,
}

/// One policy as the current config defines it, with its state.
pub struct Policy {
    pub name: Arc<str>,
    limits: Limits,
    /// `points / replicas` (at least 1), for the memory fallback.
    fallback_limits: Limits,
    per_route: bool,
    by: KeySource,
    ipv6_prefix: u8,
    store: Store,
    /// `"name";q=100;w=60`, the RateLimit-Policy item.
    policy_item: String,
    counters: DecisionCounters,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .field("fallback_limits", &self.fallback_limits)
            .field("per_route", &self.per_route)
            .field("by", &self.by)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .finish_non_exhaustive()
    }
}

enum Store {
    Memory(Arc<Table>),
    Redis {
        client: Arc<RedisStore>,
        fallback: Arc<Table>,
    },
}

/// Policies by name and the Redis client, across reloads.
pub struct Registry {
    metrics: Metrics,
    states: Mutex<HashMap<String, Arc<PolicyState>>>,
    redis: Mutex<Option<(RedisConfig, Arc<RedisStore>)>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(metrics: Metrics) -> Registry {
        Registry {
            metrics,
            states: Mutex::new(HashMap::new()),
            redis: Mutex::new(None),
        }
    }

    /// The policies of `cfg`, keeping the counts of names seen before (and the Redis client
    /// when its settings did not change). Names `cfg` no longer has are forgotten.
    pub fn update(&self, cfg: &Config) -> Result<HashMap<String, Arc<Policy>>, String> {
        let redis = match &cfg.redis {
            Some(rc) => Some(self.redis_store(rc)?),
            None => {
                *crate::sync::lock(&self.redis) = None;
                None
            }
        };
        let mut states = crate::sync::lock(&self.states);
        states.retain(|name, _| cfg.rate_limits.contains_key(name));
        let mut out = HashMap::new();
        for (name, pc) in &cfg.rate_limits {
            let state = states
                .entry(name.clone())
                .or_insert_with(|| {
                    Arc::new(PolicyState {
                        memory: Arc::new(Table::new(MAX_KEYS)),
                        fallback: Arc::new(Table::new(MAX_KEYS)),
                    })
                })
                .clone();
            let store = match (pc.store, &redis) {
                (RateLimitStore::Redis, Some(client)) => Store::Redis {
                    client: client.clone(),
                    fallback: state.fallback.clone(),
                },
                (RateLimitStore::Redis, None) => {
                    return Err(format!(
                        "rate limit policy {name}: store redis without a redis section"
                    ));
                }
                (RateLimitStore::Memory, _) => Store::Memory(state.memory.clone()),
            };
            out.insert(
                name.clone(),
                Arc::new(Policy::new(pc, cfg.replicas, store, &self.metrics)),
            );
        }
        Ok(out)
    }

    fn redis_store(&self, rc: &RedisConfig) -> Result<Arc<RedisStore>, String> {
        let mut current = crate::sync::lock(&self.redis);
        if let Some((cfg, store)) = current.as_ref()
            && cfg == rc
        {
            return Ok(store.clone());
        }
        let client = crate::redis::Redis::new(rc).map_err(|e| format!("redis: {e}"))?;
        let store = Arc::new(RedisStore::new(client, self.metrics.clone()));
        *current = Some((rc.clone(), store.clone()));
        Ok(store)
    }

    /// The program's Redis client, when the configuration has one (health check, pool
    /// gauges).
    pub fn redis_client(&self) -> Option<Arc<RedisStore>> {
        crate::sync::lock(&self.redis)
            .as_ref()
            .map(|(_, s)| s.clone())
    }

    /// Whether a Redis client is configured (policies with `store: redis`).
    pub fn uses_redis(&self) -> bool {
        crate::sync::lock(&self.redis).is_some()
    }

    /// Whether Redis policies are being decided in memory right now.
    pub fn fallback_active(&self) -> bool {
        crate::sync::lock(&self.redis)
            .as_ref()
            .is_some_and(|(_, s)| s.fallback_active())
    }
}

impl Policy {
    fn new(pc: &RateLimitConfig, replicas: u32, store: Store, metrics: &Metrics) -> Policy {
        let limits = Limits {
            points: pc.points,
            window: pc.per,
            block: pc.block_for,
        };
        let fallback_limits = Limits {
            points: (pc.points / u64::from(replicas.max(1))).max(1),
            ..limits
        };
        let mut policy_item = String::new();
        push_sf_string(&mut policy_item, &pc.name);
        let _ = write!(policy_item, ";q={};w={}", pc.points, ceil_secs(pc.per));
        Policy {
            name: Arc::from(pc.name.as_str()),
            limits,
            fallback_limits,
            per_route: pc.key.per_route,
            by: pc.key.by.clone(),
            ipv6_prefix: pc.ipv6_prefix,
            store,
            policy_item,
            counters: metrics.counters(&pc.name),
        }
    }

    /// The key within this policy: `[route/]ip:ADDR` or `[route/]h:VALUE`.
    fn key(&self, route: &str, headers: &HeaderMap, client: IpAddr) -> String {
        let mut key = String::with_capacity(48);
        if self.per_route {
            key.push_str(route);
            key.push('/');
        }
        let header = match &self.by {
            KeySource::Header(name) => headers.get(name),
            KeySource::ClientIp => None,
        };
        match header {
            Some(v) => {
                key.push_str("h:");
                push_header_key(&mut key, v.as_bytes());
            }
            // A request without the header is counted by its address.
            None => {
                key.push_str("ip:");
                crate::text::push_ip(&mut key, mask(client, self.ipv6_prefix));
            }
        }
        key
    }

    async fn decide(&self, key: &str) -> (Option<Decision>, Source) {
        match &self.store {
            Store::Memory(table) => match table.check(key, Instant::now(), &self.limits) {
                Some(d) => (Some(d), Source::Memory),
                None => (None, Source::FailOpen),
            },
            Store::Redis { client, fallback } => {
                // The policy in braces: Redis Cluster keeps a policy's keys in one slot.
                let mut redis_key = String::with_capacity(self.name.len() + key.len() + 6);
                redis_key.push_str("rl:{");
                redis_key.push_str(&self.name);
                redis_key.push_str("}:");
                redis_key.push_str(key);
                client
                    .check(
                        &redis_key,
                        &self.limits,
                        fallback,
                        key,
                        &self.fallback_limits,
                    )
                    .await
            }
        }
    }
}

// === the pipeline step ===

/// What the rate-limit step concluded for one request.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    /// Refused: `Retry-After` in whole seconds, at least 1.
    pub retry_after_secs: Option<u64>,
    /// RateLimit-Policy, RateLimit and X-RateLimit-*: for every response on the route.
    pub headers: Option<HeaderMap>,
    /// Where the (last) decision came from, for the access log: `redis`, `memory`,
    /// `fallback` (memory standing in for Redis) or `fail_open`.
    pub source: Option<&'static str>,
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Checks every policy of a route (all count the request; all must allow it).
pub(crate) async fn check(
    policies: &[Arc<Policy>],
    route: &str,
    headers: &HeaderMap,
    client: impl FnOnce() -> IpAddr,
) -> Verdict {
    // No path is exempt: a traffic listener's probe (`health_path`) is answered before
    // routing and never gets here; any other path, `/health` included, is traffic.
    if policies.is_empty() {
        return Verdict::default();
    }
    let client = client();
    let mut policy_field = String::new();
    // Room for one policy's `"name";r=N;t=N` without growing.
    let mut limit_field = String::with_capacity(64);
    let mut retry: Option<Duration> = None;
    // The policy closest to refusing speaks for the X-RateLimit-* headers.
    let mut tightest: Option<(u64, u64, Duration)> = None;
    let mut last_source = None;
    for policy in policies {
        let key = policy.key(route, headers, client);
        let (decision, source) = policy.decide(&key).await;
        policy
            .counters
            .count(source, decision.is_none_or(|d| d.allowed));
        last_source = Some(match source {
            Source::Redis => "redis",
            Source::Memory if matches!(policy.store, Store::Redis { .. }) => "fallback",
            Source::Memory => "memory",
            Source::FailOpen => "fail_open",
        });
        if !policy_field.is_empty() {
            policy_field.push_str(", ");
        }
        policy_field.push_str(&policy.policy_item);
        let Some(d) = decision else { continue };
        let points = match source {
            Source::Memory if matches!(policy.store, Store::Redis { .. }) => {
                policy.fallback_limits.points
            }
            _ => policy.limits.points,
        };
        let reset = if d.allowed { d.reset } else { d.retry_after };
        if !d.allowed {
            retry = Some(retry.map_or(d.retry_after, |r| r.max(d.retry_after)));
        }
        if !limit_field.is_empty() {
            limit_field.push_str(", ");
        }
        // By hand: the formatting machinery costs more than the rest of the decision.
        push_sf_string(&mut limit_field, &policy.name);
        limit_field.push_str(";r=");
        push_decimal(&mut limit_field, d.remaining);
        limit_field.push_str(";t=");
        push_decimal(&mut limit_field, ceil_secs(reset));
        let tighter = tightest.is_none_or(|(_, remaining, _)| d.remaining < remaining);
        if tighter {
            tightest = Some((points, d.remaining, reset));
        }
    }
    let mut out = HeaderMap::with_capacity(5);
    insert(&mut out, &RATELIMIT_POLICY, &policy_field);
    if !limit_field.is_empty() {
        insert(&mut out, &RATELIMIT, &limit_field);
    }
    if let Some((points, remaining, reset)) = tightest {
        out.insert(X_LIMIT.clone(), HeaderValue::from(points));
        out.insert(X_REMAINING.clone(), HeaderValue::from(remaining));
        out.insert(X_RESET.clone(), HeaderValue::from(ceil_secs(reset)));
    }
    Verdict {
        retry_after_secs: retry.map(|r| ceil_secs(r).max(1)),
        headers: Some(out),
        source: last_source,
    }
}

fn insert(map: &mut HeaderMap, name: &HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        map.insert(name.clone(), v);
    }
}

fn push_decimal(out: &mut String, n: u64) {
    let mut buf = [0u8; 20];
    out.push_str(crate::text::digits(n, 10, &mut buf));
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A structured-field string (RFC 8941): policy names are `[A-Za-z0-9_-]`, so quoting
/// is all it takes, but escape anyway.
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Header values as keys: short printable ones as they are; others hashed (FNV-1a, the
/// same in every replica) so a key stays small whatever the client sends.
fn push_header_key(out: &mut String, v: &[u8]) {
    if v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic()) {
        out.extend(v.iter().map(|b| char::from(*b)));
    } else {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in v {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let _ = write!(out, "#{h:016x}-{}", v.len());
    }
}

/// IPv6 clients get a whole /64 (or the configured prefix): one host can pick any of its
/// 2^64 addresses.
fn mask(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u32::from(v6_prefix.min(128));
            let m = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & m).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimitKey;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_is_masked() {
        assert_eq!(mask(ip("2001:db8:1:2:3:4:5:6"), 64), ip("2001:db8:1:2::"));
        assert_eq!(
            mask(ip("2001:db8:1:2:3:4:5:6"), 128),
            ip("2001:db8:1:2:3:4:5:6")
        );
        assert_eq!(mask(ip("192.0.2.1"), 64), ip("192.0.2.1"));
    }

    fn policy(by: KeySource, per_route: bool) -> Policy {
        let mut reg = PromRegistry::default();
        let metrics = Metrics::register(&mut reg);
        let pc = RateLimitConfig {
            name: "api".into(),
            points: 10,
            per: Duration::from_millis(1500),
            block_for: None,
            key: RateLimitKey { per_route, by },
            store: RateLimitStore::Memory,
            ipv6_prefix: 64,
        };
        Policy::new(&pc, 3, Store::Memory(Arc::new(Table::new(10))), &metrics)
    }

    #[test]
    fn keys() {
        let h: HeaderMap = [(
            HeaderName::from_static("x-user"),
            HeaderValue::from_static("alice"),
        )]
        .into_iter()
        .collect();
        let c = ip("2001:db8::1");
        let by_ip = policy(KeySource::ClientIp, false);
        assert_eq!(by_ip.key("chat", &h, c), "ip:2001:db8::");
        let by_user = policy(KeySource::Header(HeaderName::from_static("x-user")), true);
        assert_eq!(by_user.key("chat", &h, c), "chat/h:alice");
        // Without the header: by address.
        assert_eq!(
            by_user.key("chat", &HeaderMap::new(), c),
            "chat/ip:2001:db8::"
        );
        let long = "x".repeat(200);
        let h: HeaderMap = [(
            HeaderName::from_static("x-user"),
            HeaderValue::from_str(&long).unwrap(),
        )]
        .into_iter()
        .collect();
        let k = by_user.key("chat", &h, c);
        assert!(k.starts_with("chat/h:#") && k.ends_with("-200"), "{k}");
        assert!(k.len() < 40);
    }

    #[test]
    fn policy_header_item_and_fallback_share() {
        let p = policy(KeySource::ClientIp, false);
        assert_eq!(p.policy_item, "\"api\";q=10;w=2");
        // 10 points over 3 replicas.
        assert_eq!(p.fallback_limits.points, 3);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
    }

    fn config_with(policies: &str) -> Config {
        let yaml = format!(
            "listeners:\n  - name: l\n    listen: 127.0.0.1:0\n    routes: [{{upstream: u}}]\nupstreams:\n  u:\n    endpoints: [\"http://127.0.0.1:1\"]\nrate_limits:\n{policies}"
        );
        crate::config::parse_str(&yaml, "t.yaml", &|_| None).unwrap()
    }

    #[tokio::test]
    async fn a_reload_keeps_the_counts_of_the_names_it_keeps() {
        let mut reg = PromRegistry::default();
        let registry = Registry::new(Metrics::register(&mut reg));
        let one = "  a: { points: 1, store: memory }\n  b: { points: 1, store: memory }\n";
        let policies = registry.update(&config_with(one)).unwrap();
        for name in ["a", "b"] {
            assert!(policies[name].decide("k").await.0.unwrap().allowed);
        }
        // Same names, another limit for a: its count is kept (and now allows one more).
        let two = "  a: { points: 2, store: memory }\n  b: { points: 1, store: memory }\n";
        let policies = registry.update(&config_with(two)).unwrap();
        assert!(policies["a"].decide("k").await.0.unwrap().allowed);
        assert!(!policies["a"].decide("k").await.0.unwrap().allowed);
        assert!(!policies["b"].decide("k").await.0.unwrap().allowed);
        // A name dropped and added back starts afresh.
        registry
            .update(&config_with("  a: { points: 2, store: memory }\n"))
            .unwrap();
        let policies = registry.update(&config_with(two)).unwrap();
        assert!(policies["b"].decide("k").await.0.unwrap().allowed);
    }

    #[tokio::test]
    async fn check_sets_headers_and_retry_after() {
        let p = Arc::new(policy(KeySource::ClientIp, false));
        let h = HeaderMap::new();
        let peer = ip("192.0.2.1");
        for i in 0..10u64 {
            let v = check(std::slice::from_ref(&p), "r", &h, || peer).await;
            assert_eq!(v.retry_after_secs, None);
            let headers = v.headers.unwrap();
            assert_eq!(headers["ratelimit-policy"], "\"api\";q=10;w=2");
            assert_eq!(
                headers["ratelimit"],
                format!("\"api\";r={};t=2", 9 - i).as_str()
            );
            assert_eq!(headers["x-ratelimit-limit"], "10");
            assert_eq!(
                headers["x-ratelimit-remaining"],
                (9 - i).to_string().as_str()
            );
        }
        let v = check(std::slice::from_ref(&p), "r", &h, || peer).await;
        assert!(matches!(v.retry_after_secs, Some(1 | 2)), "{v:?}");
    }
}
