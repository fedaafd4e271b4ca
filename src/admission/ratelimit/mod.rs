//! Rate limiting: named policies (`rate_limits:`), checked right after routing by one call,
//! [`check`]. A policy counts requests (or, `cost: tokens`, the tokens exchanges used) per
//! key (client IP or a header, optionally per route), and may cap the exchanges a key has
//! open at once (`max_streams`), in Redis, shared by every replica, or in memory. Redis
//! policies fall back to memory per request (fallback.rs), and by default decide most
//! requests locally from slices of points leased from Redis (lease.rs).
//!
//! What an admitted request owes the limiter later is a [`Hold`], kept by the request's
//! `Tail` until its response body is done: its stream permits (released on drop) and the
//! `cost: tokens` policies to charge once the tokens are known.
//!
//! The counts live in a [`Registry`] keyed by policy name, outside the config snapshot, so
//! a reload keeps them for the names it keeps.

pub(crate) mod fallback;
mod fields;
mod hold;
mod lease;
pub(crate) mod memory;
mod metrics;
pub(crate) mod redis;

pub(crate) use hold::Hold;
use hold::{Permit, Release};
pub(crate) use metrics::Metrics;
use metrics::{DecisionCounters, PolicyLabels};

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as PromRegistry;

use crate::config::{
    Config, KeySource, RateLimitConfig, RateLimitCost, RateLimitStore, RedisConfig,
};
use crate::redis::Budget;
use fallback::{RedisStore, Stream, Transition};
pub(crate) use fields::RateLimitHeaders;
use fields::{Fields, ceil_secs, push_sf_string};
use lease::{LeaseTable, Lessee};
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
    /// `store: redis`: the slices of points this replica holds (lease.rs).
    leases: Arc<LeaseTable>,
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
    /// `replicas:`, at least 1: slices are at most `remaining / (2 * replicas)`.
    replicas: u64,
    per_route: bool,
    by: KeySource,
    ipv6_prefix: u8,
    store: Store,
    /// `"name";q=100;w=60`, the RateLimit-Policy item(s), and as a header value (a route
    /// with one policy sends it as it is).
    policy_item: String,
    policy_header: HeaderValue,
    /// The name as a structured-field string, for the RateLimit field.
    quoted_name: Box<[u8]>,
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
        /// `lease: { max }`, when on (and `cost: requests`).
        lease: Option<(Arc<LeaseTable>, u64)>,
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
                        leases: Arc::new(LeaseTable::new(MAX_KEYS)),
                    })
                })
                .clone();
            let store = match (pc.store, &redis) {
                (RateLimitStore::Redis, Some(client)) => Store::Redis {
                    client: client.clone(),
                    fallback: state.fallback.clone(),
                    fallback_streams: state.fallback_streams.clone(),
                    lease: match (pc.lease, pc.cost) {
                        (Some(max), RateLimitCost::Requests) => Some((state.leases.clone(), max)),
                        _ => None,
                    },
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
            replicas,
            per_route: pc.key.per_route,
            by: pc.key.by.clone(),
            ipv6_prefix: pc.ipv6_prefix,
            store,
            policy_header: HeaderValue::from_str(&policy_item)
                .unwrap_or_else(|_| HeaderValue::from_static("")),
            policy_item,
            quoted_name: fields::quoted_name(&pc.name),
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

    /// `rl:{policy:KEY}`, or `rl:{policy:KEY}:s` for the streams (`infix` "s:"). Policy and
    /// key in the hash tag: Redis Cluster spreads a policy's keys over all masters, and the
    /// two keys of one client share a slot. A header value may hold braces, which would end
    /// the tag early: inside it `%`, `{` and `}` are written `%25`, `%7B` and `%7D` (the
    /// tag is then the whole of it, and two keys never share a name).
    fn redis_key(&self, infix: &str, key: &str) -> String {
        let mut redis_key = String::with_capacity(self.name.len() + key.len() + 10);
        redis_key.push_str("rl:{");
        redis_key.push_str(&self.name);
        redis_key.push(':');
        for c in key.chars() {
            match c {
                '%' => redis_key.push_str("%25"),
                '{' => redis_key.push_str("%7B"),
                '}' => redis_key.push_str("%7D"),
                c => redis_key.push(c),
            }
        }
        redis_key.push('}');
        if let Some(kind) = infix.strip_suffix(':').filter(|k| !k.is_empty()) {
            redis_key.push(':');
            redis_key.push_str(kind);
        }
        redis_key
    }

    /// The points decision: a request counted, or (`cost: tokens`) whether any are left.
    async fn decide(
        &self,
        limits: &Limits,
        key: &str,
        budget: &mut Budget,
    ) -> (Option<Decision>, Source) {
        let tokens = self.cost == RateLimitCost::Tokens;
        match &self.store {
            Store::Memory { table, .. } => {
                let now = crate::clock::now();
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
                client,
                fallback,
                lease: Some((leases, max)),
                ..
            } if !tokens => {
                let lessee = Lessee {
                    policy: self,
                    client,
                    fallback,
                    limits,
                    max: *max,
                };
                leases.decide(&lessee, key, budget).await
            }
            Store::Redis {
                client, fallback, ..
            } => {
                let redis_key = self.redis_key("", key);
                let fallback_limits = self.fallback_limits.as_ref().unwrap_or(limits);
                // Boxed: the Redis call's future stays out of the memory path's.
                if tokens {
                    let f = client.peek(&redis_key, limits, fallback, key, fallback_limits, budget);
                    Box::pin(f).await
                } else {
                    let f =
                        client.check(&redis_key, limits, fallback, key, fallback_limits, budget);
                    Box::pin(f).await
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
        budget: &mut Budget,
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
                let (got, source) = Box::pin(client.acquire(
                    &redis_key,
                    (streams.max, streams.lease),
                    fallback_streams,
                    key,
                    streams.fallback_max,
                    budget,
                ))
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
                table.charge(key, crate::clock::now(), &limits, cost);
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

// === the pipeline step ===

/// What the rate-limit step concluded for one request.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    /// Refused: `Retry-After` in whole seconds, at least 1.
    pub retry_after_secs: Option<u64>,
    /// RateLimit-Policy, RateLimit and X-RateLimit-*: for every response on the route.
    pub headers: Option<RateLimitHeaders>,
    /// Where the (last) decision came from, for the access log: `redis`, `memory`,
    /// `fallback` (memory standing in for Redis) or `fail_open`.
    pub source: Option<&'static str>,
    /// Admitted: what the request holds until its exchange ends.
    pub hold: Hold,
}

fn source_name(policy: &Policy, source: Source) -> &'static str {
    match source {
        Source::Redis => "redis",
        Source::Memory if matches!(policy.store, Store::Redis { .. }) => "fallback",
        Source::Memory => "memory",
        Source::FailOpen => "fail_open",
    }
}

/// The verdict at once when every policy of the route keeps its counts in memory: the
/// request then goes on without the boxed wait step (whose future, sized for the Redis
/// calls, costs a copy of several KiB per request). None when a policy asks Redis.
pub(crate) fn check_now(
    policies: &[Arc<Policy>],
    route: &str,
    headers: &HeaderMap,
    client: impl FnOnce() -> IpAddr,
) -> Option<Verdict> {
    if !policies
        .iter()
        .all(|p| matches!(p.store, Store::Memory { .. }))
    {
        return None;
    }
    // The memory store never waits: `check` is ready at its first poll, no waker is kept.
    let mut budget = Budget::default();
    let check = std::pin::pin!(check(policies, route, headers, client, &mut budget));
    match check.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(verdict) => Some(verdict),
        // Not reachable; were it, the request would go unlimited (fail open), as when the
        // memory table is full.
        Poll::Pending => Some(Verdict::default()),
    }
}

/// Checks every policy of a route (all count the request; all must allow it). Stream
/// permits are taken only once every points limit allowed the request, and all given back
/// when one policy has none left. Their Redis calls share the request's `budget`.
pub(crate) async fn check(
    policies: &[Arc<Policy>],
    route: &str,
    headers: &HeaderMap,
    client: impl FnOnce() -> IpAddr,
    budget: &mut Budget,
) -> Verdict {
    // No path is exempt: a traffic listener's probe (`health_path`) is answered before
    // routing and never gets here; any other path, `/health` included, is traffic.
    if policies.is_empty() {
        return Verdict::default();
    }
    let client = client();
    let mut fields = Fields::new();
    let mut last_source = None;
    let mut hold = Hold::default();
    let mut stream_keys = Vec::new();
    for policy in policies {
        let key = policy.key(route, headers, client);
        fields.add_policy(&policy.policy_item, &policy.policy_header);
        if policy.streams.is_some() {
            stream_keys.push((policy, key.clone()));
        }
        let Some(limits) = &policy.limits else {
            continue;
        };
        let (decision, source) = policy.decide(limits, &key, budget).await;
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
        fields.add(&policy.quoted_name, points, d.remaining, reset);
    }
    if fields.retry.is_none() {
        for (policy, key) in stream_keys {
            let Some(streams) = &policy.streams else {
                continue;
            };
            let (taken, source) = policy.acquire(streams, &key, budget).await;
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
                    fields.add(&policy.quoted_name, max, permit.remaining, Duration::ZERO);
                    hold.permits.push(permit);
                }
                Ok(None) => {}
                Err(()) => {
                    fields.add(&policy.quoted_name, max, 0, STREAM_RETRY_AFTER);
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
mod tests;
