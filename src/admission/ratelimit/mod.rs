//! Rate limiting: named policies (`rate_limits:`), checked right after routing by one call,
//! [`check`]. A policy counts requests (or, `cost: tokens`, the tokens exchanges used) per
//! key (client IP or a header, optionally per route), and may cap the exchanges a key has
//! open at once (`max_streams`), in Redis, shared by every replica, or in memory. Redis
//! policies fall back to memory per request (fallback.rs).
//!
//! What an admitted request owes the limiter later is a [`Hold`], kept by the request's
//! `Tail` until its response body is done: its stream permits (released on drop) and the
//! `cost: tokens` policies to charge once the tokens are known.
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

use crate::config::{
    Config, KeySource, RateLimitConfig, RateLimitCost, RateLimitStore, RedisConfig,
};
use fallback::{RedisStore, Stream, Transition};
use memory::{Acquired, StreamTable, Table};

/// Keys one policy tracks in memory (per table); beyond, new keys are let through and
/// counted as fail_open. About 100 bytes each.
const MAX_KEYS: usize = 100_000;

/// `Retry-After` of a request refused for its open streams: when one ends is unknown, and
/// a chat client that retries each second costs nothing.
const STREAM_RETRY_AFTER: Duration = Duration::from_secs(1);

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
struct PolicyLabels {
    policy: String,
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
    /// `max_streams` decisions, with the labels of `decisions`.
    stream_decisions: Family<DecisionLabels, Counter>,
    streams_held: Family<PolicyLabels, Gauge>,
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
            stream_decisions: Family::default(),
            streams_held: Family::default(),
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
            "stream_decisions",
            "max_streams decisions by policy, result (allowed|limited) and source (redis|memory|fail_open)",
            m.stream_decisions.clone(),
        );
        reg.register(
            "streams_held",
            "Stream permits this replica holds, by policy",
            m.streams_held.clone(),
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
    fn counters(&self, family: &Family<DecisionLabels, Counter>, policy: &str) -> DecisionCounters {
        let get = |result, source| {
            family
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
    /// `store: memory` open streams: a reload keeps the permits held.
    streams: Arc<StreamTable>,
    /// `store: redis`: streams admitted in memory while Redis failed.
    fallback_streams: Arc<StreamTable>,
}

/// `max_streams` of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamLimit {
    max: u64,
    /// `max / replicas` rounded up, at least 1: the memory fallback's share.
    fallback_max: u64,
    lease: Duration,
}

/// One policy as the current config defines it, with its state.
pub struct Policy {
    pub name: Arc<str>,
    /// None: the policy only limits streams.
    limits: Option<Limits>,
    /// `points / replicas` (at least 1), for the memory fallback.
    fallback_limits: Option<Limits>,
    cost: RateLimitCost,
    streams: Option<StreamLimit>,
    per_route: bool,
    by: KeySource,
    ipv6_prefix: u8,
    store: Store,
    /// `"name";q=100;w=60`, the RateLimit-Policy item(s).
    policy_item: String,
    counters: DecisionCounters,
    stream_counters: DecisionCounters,
    streams_held: Gauge,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .field("fallback_limits", &self.fallback_limits)
            .field("cost", &self.cost)
            .field("streams", &self.streams)
            .field("per_route", &self.per_route)
            .field("by", &self.by)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .finish_non_exhaustive()
    }
}

enum Store {
    Memory {
        table: Arc<Table>,
        streams: Arc<StreamTable>,
    },
    Redis {
        client: Arc<RedisStore>,
        fallback: Arc<Table>,
        fallback_streams: Arc<StreamTable>,
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
                        streams: Arc::new(StreamTable::new(MAX_KEYS)),
                        fallback_streams: Arc::new(StreamTable::new(MAX_KEYS)),
                    })
                })
                .clone();
            let store = match (pc.store, &redis) {
                (RateLimitStore::Redis, Some(client)) => Store::Redis {
                    client: client.clone(),
                    fallback: state.fallback.clone(),
                    fallback_streams: state.fallback_streams.clone(),
                },
                (RateLimitStore::Redis, None) => {
                    return Err(format!(
                        "rate limit policy {name}: store redis without a redis section"
                    ));
                }
                (RateLimitStore::Memory, _) => Store::Memory {
                    table: state.memory.clone(),
                    streams: state.streams.clone(),
                },
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
    /// `cost: tokens`: charged what the answers report (`Tail::tokens_used`).
    pub(crate) fn charges_tokens(&self) -> bool {
        self.cost == RateLimitCost::Tokens
    }

    fn new(pc: &RateLimitConfig, replicas: u32, store: Store, metrics: &Metrics) -> Policy {
        let replicas = u64::from(replicas.max(1));
        let limits = pc.points.map(|points| Limits {
            points,
            window: pc.per,
            block: pc.block_for,
        });
        let fallback_limits = limits.map(|l| Limits {
            points: (l.points / replicas).max(1),
            ..l
        });
        let streams = pc.max_streams.map(|max| StreamLimit {
            max,
            fallback_max: max.div_ceil(replicas).max(1),
            lease: pc.stream_lease,
        });
        let mut policy_item = String::new();
        if let Some(points) = pc.points {
            push_sf_string(&mut policy_item, &pc.name);
            let _ = write!(policy_item, ";q={points};w={}", ceil_secs(pc.per));
        }
        if let Some(max) = pc.max_streams {
            if !policy_item.is_empty() {
                policy_item.push_str(", ");
            }
            push_sf_string(&mut policy_item, &pc.name);
            let _ = write!(policy_item, ";q={max};qu=\"concurrent-requests\"");
        }
        Policy {
            name: Arc::from(pc.name.as_str()),
            limits,
            fallback_limits,
            cost: pc.cost,
            streams,
            per_route: pc.key.per_route,
            by: pc.key.by.clone(),
            ipv6_prefix: pc.ipv6_prefix,
            store,
            policy_item,
            counters: metrics.counters(&metrics.decisions, &pc.name),
            // Series only for the policies that limit streams.
            stream_counters: if streams.is_some() {
                metrics.counters(&metrics.stream_decisions, &pc.name)
            } else {
                metrics.counters(&Family::default(), &pc.name)
            },
            streams_held: match streams {
                Some(_) => metrics
                    .streams_held
                    .get_or_create(&PolicyLabels {
                        policy: pc.name.clone(),
                    })
                    .clone(),
                None => Gauge::default(),
            },
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

    /// `rl:{policy}:KEY`, or `rl:{policy}:s:KEY` for the streams. The policy in braces:
    /// Redis Cluster keeps a policy's keys in one slot.
    fn redis_key(&self, infix: &str, key: &str) -> String {
        let mut redis_key = String::with_capacity(self.name.len() + key.len() + 8);
        redis_key.push_str("rl:{");
        redis_key.push_str(&self.name);
        redis_key.push_str("}:");
        redis_key.push_str(infix);
        redis_key.push_str(key);
        redis_key
    }

    /// The points decision: a request counted, or (`cost: tokens`) whether any are left.
    async fn decide(&self, limits: &Limits, key: &str) -> (Option<Decision>, Source) {
        let tokens = self.cost == RateLimitCost::Tokens;
        match &self.store {
            Store::Memory { table, .. } => {
                let now = Instant::now();
                let d = if tokens {
                    table.peek(key, now, limits)
                } else {
                    table.check(key, now, limits)
                };
                match d {
                    Some(d) => (Some(d), Source::Memory),
                    None => (None, Source::FailOpen),
                }
            }
            Store::Redis {
                client, fallback, ..
            } => {
                let redis_key = self.redis_key("", key);
                let fallback_limits = self.fallback_limits.as_ref().unwrap_or(limits);
                if tokens {
                    client
                        .peek(&redis_key, limits, fallback, key, fallback_limits)
                        .await
                } else {
                    client
                        .check(&redis_key, limits, fallback, key, fallback_limits)
                        .await
                }
            }
        }
    }

    /// Takes a stream permit for `key`: Ok(Some) taken, Ok(None) not tracked (a full
    /// memory table), Err(()) refused.
    async fn acquire(
        &self,
        streams: &StreamLimit,
        key: &str,
    ) -> (Result<Option<Permit>, ()>, Source) {
        let (table, acquired, source) = match &self.store {
            Store::Memory { streams: table, .. } => {
                let a = table.acquire(key, streams.max);
                let source = match a {
                    Acquired::Untracked => Source::FailOpen,
                    _ => Source::Memory,
                };
                (table, a, source)
            }
            Store::Redis {
                client,
                fallback_streams,
                ..
            } => {
                let redis_key = self.redis_key("s:", key);
                let (got, source) = client
                    .acquire(
                        &redis_key,
                        (streams.max, streams.lease),
                        fallback_streams,
                        key,
                        streams.fallback_max,
                    )
                    .await;
                match got {
                    Stream::Redis { id, remaining } => {
                        let permit = Permit::new(
                            Release::Redis {
                                store: client.clone(),
                                key: Arc::from(redis_key),
                                id,
                            },
                            remaining,
                            self.streams_held.clone(),
                        );
                        return (Ok(Some(permit)), source);
                    }
                    Stream::Memory(a) => (fallback_streams, a, source),
                }
            }
        };
        let out = match acquired {
            Acquired::Yes { remaining } => Ok(Some(Permit::new(
                Release::Memory {
                    table: table.clone(),
                    key: key.into(),
                },
                remaining,
                self.streams_held.clone(),
            ))),
            Acquired::No => Err(()),
            Acquired::Untracked => Ok(None),
        };
        (out, source)
    }

    /// Charges `cost` tokens to `key` (`cost: tokens`): at once in memory; in Redis by a
    /// task of its own, falling back to memory when Redis fails.
    fn charge(self: &Arc<Self>, key: &str, cost: u64) {
        let Some(limits) = self.limits else { return };
        match &self.store {
            Store::Memory { table, .. } => {
                table.charge(key, Instant::now(), &limits, cost);
            }
            Store::Redis { .. } => {
                let Ok(handle) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let policy = self.clone();
                let key = key.to_owned();
                handle.spawn(async move {
                    let Store::Redis {
                        client, fallback, ..
                    } = &policy.store
                    else {
                        return;
                    };
                    let redis_key = policy.redis_key("", &key);
                    let fallback_limits = policy.fallback_limits.unwrap_or(limits);
                    client
                        .charge(
                            (&redis_key, &key),
                            (&limits, &fallback_limits),
                            fallback,
                            cost,
                        )
                        .await;
                });
            }
        }
    }
}

// === what an admitted request holds ===

/// One stream permit; dropping it gives it back.
pub(crate) struct Permit {
    release: Release,
    /// Left for the key when taken (for the RateLimit header).
    remaining: u64,
    held: Gauge,
}

enum Release {
    Memory {
        table: Arc<StreamTable>,
        key: Box<str>,
    },
    Redis {
        store: Arc<RedisStore>,
        key: Arc<str>,
        id: u64,
    },
}

impl Permit {
    fn new(release: Release, remaining: u64, held: Gauge) -> Permit {
        held.inc();
        Permit {
            release,
            remaining,
            held,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.held.dec();
        match &self.release {
            Release::Memory { table, key } => table.release(key),
            Release::Redis { store, key, id } => store.release(key.clone(), *id),
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

/// What an admitted request owes its policies until the exchange ends: its stream permits
/// (released when this is dropped) and the `cost: tokens` policies it passed.
#[derive(Debug, Default)]
pub(crate) struct Hold {
    permits: Vec<Permit>,
    charges: Vec<(Arc<Policy>, String)>,
}

impl Hold {
    /// Charges `tokens` to the key of every `cost: tokens` policy the request passed. Each
    /// call charges what it is given: call it once per usage report.
    pub(crate) fn tokens_used(&self, tokens: u64) {
        if tokens == 0 {
            return;
        }
        for (policy, key) in &self.charges {
            policy.charge(key, tokens);
        }
    }

    #[cfg(test)]
    pub(crate) fn permits(&self) -> usize {
        self.permits.len()
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
    /// Admitted: what the request holds until its exchange ends.
    pub hold: Hold,
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The RateLimit and X-RateLimit-* fields as the decisions of one request fill them.
#[derive(Default)]
struct Fields {
    policy: String,
    limit: String,
    /// The policy closest to refusing speaks for the X-RateLimit-* headers.
    tightest: Option<(u64, u64, Duration)>,
    retry: Option<Duration>,
}

impl Fields {
    fn add(&mut self, name: &str, points: u64, remaining: u64, reset: Duration) {
        if !self.limit.is_empty() {
            self.limit.push_str(", ");
        }
        // By hand: the formatting machinery costs more than the rest of the decision.
        push_sf_string(&mut self.limit, name);
        self.limit.push_str(";r=");
        push_decimal(&mut self.limit, remaining);
        self.limit.push_str(";t=");
        push_decimal(&mut self.limit, ceil_secs(reset));
        let tighter = self.tightest.is_none_or(|(_, least, _)| remaining < least);
        if tighter {
            self.tightest = Some((points, remaining, reset));
        }
    }

    fn refuse(&mut self, retry_after: Duration) {
        self.retry = Some(self.retry.map_or(retry_after, |r| r.max(retry_after)));
    }

    fn headers(&self) -> HeaderMap {
        let mut out = HeaderMap::with_capacity(5);
        insert(&mut out, &RATELIMIT_POLICY, &self.policy);
        if !self.limit.is_empty() {
            insert(&mut out, &RATELIMIT, &self.limit);
        }
        if let Some((points, remaining, reset)) = self.tightest {
            out.insert(X_LIMIT.clone(), HeaderValue::from(points));
            out.insert(X_REMAINING.clone(), HeaderValue::from(remaining));
            out.insert(X_RESET.clone(), HeaderValue::from(ceil_secs(reset)));
        }
        out
    }
}

fn source_name(policy: &Policy, source: Source) -> &'static str {
    match source {
        Source::Redis => "redis",
        Source::Memory if matches!(policy.store, Store::Redis { .. }) => "fallback",
        Source::Memory => "memory",
        Source::FailOpen => "fail_open",
    }
}

/// Checks every policy of a route (all count the request; all must allow it). Stream
/// permits are taken only once every points limit allowed the request, and all given back
/// when one policy has none left.
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
    // Room for one policy's `"name";r=N;t=N` without growing.
    let mut fields = Fields {
        limit: String::with_capacity(64),
        ..Fields::default()
    };
    let mut last_source = None;
    let mut hold = Hold::default();
    let mut stream_keys = Vec::new();
    for policy in policies {
        let key = policy.key(route, headers, client);
        if !fields.policy.is_empty() {
            fields.policy.push_str(", ");
        }
        fields.policy.push_str(&policy.policy_item);
        if policy.streams.is_some() {
            stream_keys.push((policy, key.clone()));
        }
        let Some(limits) = &policy.limits else {
            continue;
        };
        let (decision, source) = policy.decide(limits, &key).await;
        policy
            .counters
            .count(source, decision.is_none_or(|d| d.allowed));
        last_source = Some(source_name(policy, source));
        let Some(d) = decision else { continue };
        let points = match (source, &policy.fallback_limits) {
            (Source::Memory, Some(f)) if matches!(policy.store, Store::Redis { .. }) => f.points,
            _ => limits.points,
        };
        let reset = if d.allowed { d.reset } else { d.retry_after };
        if d.allowed {
            if policy.cost == RateLimitCost::Tokens {
                hold.charges.push((policy.clone(), key));
            }
        } else {
            fields.refuse(d.retry_after);
        }
        fields.add(&policy.name, points, d.remaining, reset);
    }
    if fields.retry.is_none() {
        for (policy, key) in stream_keys {
            let Some(streams) = &policy.streams else {
                continue;
            };
            let (taken, source) = policy.acquire(streams, &key).await;
            policy.stream_counters.count(source, taken.is_ok());
            last_source = Some(source_name(policy, source));
            let max = match source {
                Source::Memory if matches!(policy.store, Store::Redis { .. }) => {
                    streams.fallback_max
                }
                _ => streams.max,
            };
            match taken {
                Ok(Some(permit)) => {
                    fields.add(&policy.name, max, permit.remaining, Duration::ZERO);
                    hold.permits.push(permit);
                }
                Ok(None) => {}
                Err(()) => {
                    fields.add(&policy.name, max, 0, STREAM_RETRY_AFTER);
                    fields.refuse(STREAM_RETRY_AFTER);
                    break;
                }
            }
        }
    }
    if fields.retry.is_some() {
        // Refused: nothing is held, nothing will be charged.
        hold = Hold::default();
    }
    Verdict {
        retry_after_secs: fields.retry.map(|r| ceil_secs(r).max(1)),
        headers: Some(fields.headers()),
        source: last_source,
        hold,
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
    use crate::stream::tail::Tail;

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

    fn memory_store() -> Store {
        Store::Memory {
            table: Arc::new(Table::new(10)),
            streams: Arc::new(StreamTable::new(10)),
        }
    }

    impl Policy {
        /// A request counted against `key`.
        async fn decide_key(&self, key: &str) -> (Option<Decision>, Source) {
            let limits = self.limits.expect("a points limit");
            self.decide(&limits, key).await
        }
    }

    fn policy(by: KeySource, per_route: bool) -> Policy {
        let mut reg = PromRegistry::default();
        let metrics = Metrics::register(&mut reg);
        let pc = RateLimitConfig {
            name: "api".into(),
            points: Some(10),
            per: Duration::from_millis(1500),
            block_for: None,
            key: RateLimitKey { per_route, by },
            store: RateLimitStore::Memory,
            ipv6_prefix: 64,
            cost: RateLimitCost::Requests,
            max_streams: None,
            stream_lease: Duration::from_secs(30),
        };
        Policy::new(&pc, 3, memory_store(), &metrics)
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
        assert_eq!(p.fallback_limits.unwrap().points, 3);
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
            assert!(policies[name].decide_key("k").await.0.unwrap().allowed);
        }
        // Same names, another limit for a: its count is kept (and now allows one more).
        let two = "  a: { points: 2, store: memory }\n  b: { points: 1, store: memory }\n";
        let policies = registry.update(&config_with(two)).unwrap();
        assert!(policies["a"].decide_key("k").await.0.unwrap().allowed);
        assert!(!policies["a"].decide_key("k").await.0.unwrap().allowed);
        assert!(!policies["b"].decide_key("k").await.0.unwrap().allowed);
        // A name dropped and added back starts afresh.
        registry
            .update(&config_with("  a: { points: 2, store: memory }\n"))
            .unwrap();
        let policies = registry.update(&config_with(two)).unwrap();
        assert!(policies["b"].decide_key("k").await.0.unwrap().allowed);
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

    // === streams and tokens ===

    fn registry() -> Registry {
        let mut reg = PromRegistry::default();
        Registry::new(Metrics::register(&mut reg))
    }

    /// A Tail holding what `check` let `key` through with (as the pipeline keeps it).
    async fn admit(policy: &Arc<Policy>, key: &str) -> Result<Tail, Verdict> {
        let h: HeaderMap = [(
            HeaderName::from_static("x-user"),
            HeaderValue::from_str(key).unwrap(),
        )]
        .into_iter()
        .collect();
        let v = check(std::slice::from_ref(policy), "r", &h, || ip("192.0.2.1")).await;
        if v.retry_after_secs.is_some() {
            return Err(v);
        }
        Ok(Tail {
            rate_limit_hold: v.hold,
            ..Tail::default()
        })
    }

    async fn refuse(policy: &Arc<Policy>, key: &str) -> Verdict {
        match admit(policy, key).await {
            Err(v) => v,
            Ok(_) => panic!("{key} admitted"),
        }
    }

    /// The shared Redis of the tests (`RAMPART_TEST_REDIS_URL`, else 127.0.0.1:6379); None
    /// (a visible skip) when it does not answer, except under CI, where that fails.
    async fn shared_redis(test: &str) -> Option<String> {
        let url = std::env::var("RAMPART_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let addr = url.trim_start_matches("redis://").trim_end_matches('/');
        let up = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(addr.to_owned()),
        )
        .await
        .is_ok_and(|c| c.is_ok());
        if !up {
            assert!(
                std::env::var("CI").is_err(),
                "{test}: no Redis at {url} under CI"
            );
            eprintln!("SKIPPED {test}: no Redis at {url}");
            return None;
        }
        Some(url)
    }

    fn redis_config(url: &str, replicas: u32, policies: &str) -> Config {
        let yaml = format!(
            "listeners:\n  - name: l\n    listen: 127.0.0.1:0\n    routes: [{{upstream: u}}]\nupstreams:\n  u:\n    endpoints: [\"http://127.0.0.1:1\"]\nredis: {{ url: \"{url}\", timeout: 1s }}\nreplicas: {replicas}\nrate_limits:\n{policies}"
        );
        crate::config::parse_str(&yaml, "t.yaml", &|_| None).unwrap()
    }

    fn unique(prefix: &str) -> String {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        format!(
            "{prefix}{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_used_in_memory_refuses_the_key_until_the_window_ends() {
        let registry = registry();
        let policies = registry
            .update(&config_with(
                "  t: { points: 100, per: 10s, block_for: off, cost: tokens, key: \"header:x-user\", store: memory }\n",
            ))
            .unwrap();
        let p = &policies["t"];
        // Admission charges nothing: many requests pass while no tokens are reported.
        for _ in 0..5 {
            admit(p, "alice").await.unwrap();
        }
        let mut tail = admit(p, "alice").await.unwrap();
        tail.tokens_used(40, 70);
        let refused = refuse(p, "alice").await;
        assert!(
            matches!(refused.retry_after_secs, Some(9 | 10)),
            "{refused:?}"
        );
        let headers = refused.headers.unwrap();
        assert_eq!(headers["ratelimit-policy"], "\"t\";q=100;w=10");
        assert!(
            headers["ratelimit"]
                .to_str()
                .unwrap()
                .starts_with("\"t\";r=0;"),
            "{headers:?}"
        );
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        // Another key is unaffected.
        let bob = admit(p, "bob").await.unwrap();
        drop(bob);
        tokio::time::advance(Duration::from_secs(10)).await;
        admit(p, "alice").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_below_the_budget_leave_the_rest() {
        let registry = registry();
        let policies = registry
            .update(&config_with(
                "  t: { points: 100, per: 10s, cost: tokens, key: \"header:x-user\", store: memory }\n",
            ))
            .unwrap();
        let p = &policies["t"];
        let mut tail = admit(p, "alice").await.unwrap();
        tail.tokens_used(30, 10);
        let tail = admit(p, "alice").await.unwrap();
        drop(tail);
        let v = check(
            std::slice::from_ref(p),
            "r",
            &[(
                HeaderName::from_static("x-user"),
                HeaderValue::from_static("alice"),
            )]
            .into_iter()
            .collect(),
            || ip("192.0.2.1"),
        )
        .await;
        assert_eq!(v.headers.unwrap()["x-ratelimit-remaining"], "60");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_used_in_redis_refuses_the_key_until_the_window_ends() {
        let test = "tokens_used_in_redis_refuses_the_key_until_the_window_ends";
        let Some(url) = shared_redis(test).await else {
            return;
        };
        let name = unique("tok");
        let registry = registry();
        let policies = registry
            .update(&redis_config(
                &url,
                1,
                &format!(
                    "  {name}: {{ points: 100, per: 2s, block_for: off, cost: tokens, key: \"header:x-user\" }}\n"
                ),
            ))
            .unwrap();
        let p = &policies[&name];
        let mut tail = admit(p, "alice").await.unwrap();
        tail.tokens_used(40, 70);
        // Charged by a task of its own: refused within a bounded wait.
        let deadline = Instant::now() + Duration::from_secs(5);
        let refused = loop {
            match admit(p, "alice").await {
                Err(v) => break v,
                Ok(_) => {
                    assert!(Instant::now() < deadline, "the charge never landed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        assert!(
            matches!(refused.retry_after_secs, Some(1 | 2)),
            "{refused:?}"
        );
        assert_eq!(refused.source, Some("redis"));
        admit(p, "bob").await.unwrap();
        // The window ends in Redis's time: allowed again within it and a margin.
        let deadline = Instant::now() + Duration::from_secs(4);
        while admit(p, "alice").await.is_err() {
            assert!(Instant::now() < deadline, "still refused after the window");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn streams_in_memory_are_held_until_dropped_and_a_reload_keeps_them() {
        let registry = registry();
        let one = "  s: { max_streams: 2, key: \"header:x-user\", store: memory }\n";
        let policies = registry.update(&config_with(one)).unwrap();
        let p = &policies["s"];
        assert!(p.limits.is_none(), "max_streams alone limits no requests");
        let a = admit(p, "alice").await.unwrap();
        let b = admit(p, "alice").await.unwrap();
        assert_eq!(a.rate_limit_hold.permits(), 1);
        let refused = refuse(p, "alice").await;
        assert_eq!(refused.retry_after_secs, Some(1));
        let h = refused.headers.unwrap();
        assert_eq!(
            h["ratelimit-policy"],
            "\"s\";q=2;qu=\"concurrent-requests\""
        );
        assert_eq!(h["ratelimit"], "\"s\";r=0;t=1");
        assert_eq!(h["x-ratelimit-limit"], "2");
        // Another key has its own.
        let _c = admit(p, "bob").await.unwrap();
        drop(a);
        let a = admit(p, "alice").await.unwrap();

        // Lowered to 1 by a reload: the 2 held stay until released; new ones count
        // against 1.
        let lower = "  s: { max_streams: 1, key: \"header:x-user\", store: memory }\n";
        let policies = registry.update(&config_with(lower)).unwrap();
        let p = &policies["s"];
        refuse(p, "alice").await;
        drop(a);
        refuse(p, "alice").await;
        drop(b);
        let _d = admit(p, "alice").await.unwrap();
        refuse(p, "alice").await;
    }

    #[tokio::test(start_paused = true)]
    async fn streams_and_points_both_apply_and_a_refusal_holds_nothing() {
        let registry = registry();
        let policies = registry
            .update(&config_with(
                "  b: { points: 3, per: 60s, max_streams: 2, key: \"header:x-user\", store: memory }\n",
            ))
            .unwrap();
        let p = &policies["b"];
        let a = admit(p, "alice").await.unwrap();
        let b = admit(p, "alice").await.unwrap();
        // Third: a point is left, no stream.
        let v = refuse(p, "alice").await;
        assert_eq!(v.retry_after_secs, Some(1));
        drop(a);
        drop(b);
        // The points are spent (3 requests counted): refused for the window, and the
        // refusal took no permit.
        let v = refuse(p, "alice").await;
        assert!(v.retry_after_secs.unwrap() > 1, "{v:?}");
        let Store::Memory { streams, .. } = &p.store else {
            panic!("memory store")
        };
        assert_eq!(streams.held("h:alice"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_in_redis_are_shared_renewed_and_released() {
        let test = "streams_in_redis_are_shared_renewed_and_released";
        let Some(url) = shared_redis(test).await else {
            return;
        };
        let name = unique("st");
        let policy =
            format!("  {name}: {{ max_streams: 3, stream_lease: 3s, key: \"header:x-user\" }}\n");
        // Two replicas: two registries, two Redis clients.
        let (ra, rb) = (registry(), registry());
        let pa = ra.update(&redis_config(&url, 2, &policy)).unwrap();
        let pb = rb.update(&redis_config(&url, 2, &policy)).unwrap();
        let (pa, pb) = (&pa[&name], &pb[&name]);
        let a1 = admit(pa, "alice").await.unwrap();
        let a2 = admit(pa, "alice").await.unwrap();
        let b1 = admit(pb, "alice").await.unwrap();
        let refused = refuse(pb, "alice").await;
        assert_eq!(refused.source, Some("redis"));
        refuse(pa, "alice").await;
        let Store::Redis { client, .. } = &pa.store else {
            panic!("redis store")
        };
        assert_eq!(client.leases_held(), 2);
        // Held past two leases: renewed by their replicas, still counted.
        tokio::time::sleep(Duration::from_secs(7)).await;
        refuse(pa, "alice").await;
        // Released: the next is admitted (the release is a task: bounded wait).
        drop(b1);
        let deadline = Instant::now() + Duration::from_secs(3);
        let a3 = loop {
            match admit(pa, "alice").await {
                Ok(t) => break t,
                Err(_) => {
                    assert!(Instant::now() < deadline, "the release never landed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        assert_eq!(client.leases_held(), 3);
        drop((a1, a2, a3));
        assert_eq!(client.leases_held(), 0);
    }
}
