//! One `caches:` policy at run time: its memory tier, its Redis tier, the misses in flight,
//! and the steps a request takes through it (find, then fill on the way back).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::control::{self, StaleRule, Storable};
use super::entry::Entry;
use super::flight::{self, Flights, Lead, Turn};
use super::memory::MemoryTier;
use super::metrics::PolicyCounters;
use super::purge::Purges;
use crate::admission::ratelimit::fallback::RedisStore;
use crate::admission::ratelimit::fallback::{Breaker, Route as RedisRoute};
use crate::config::{CacheConfig, CacheStore};
use crate::redis::Budget;

/// What a lookup found.
#[derive(Debug)]
pub(crate) enum Found {
    /// A fresh entry: the answer.
    Fresh(Arc<Entry>),
    /// Go upstream. `stale` answers instead if the upstream fails; `lead` is held by the
    /// request the others wait for.
    Miss {
        stale: Option<Arc<Entry>>,
        lead: Option<Lead>,
    },
}

/// A lookup that must wait (Redis, or another request's fetch).
#[derive(Debug)]
pub(crate) struct Pending {
    key: String,
    stale: Option<Arc<Entry>>,
    kind: PendingKind,
}

#[derive(Debug)]
enum PendingKind {
    /// This request leads: it asks Redis, then goes upstream on a miss.
    Redis(Lead),
    Wait(tokio::sync::watch::Receiver<()>),
}

/// What the request asked for, as the cache sees it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Asked {
    /// Not for the cache: passed on, `X-Cache: BYPASS`.
    Bypass,
    Cacheable {
        key: String,
        head: bool,
        /// The client said `no-cache`: fetch anew (and store what comes).
        refresh: bool,
    },
}

pub struct Policy {
    pub(crate) name: Arc<str>,
    pub(crate) cfg: CacheConfig,
    pub(crate) memory: Arc<MemoryTier>,
    pub(crate) flights: Arc<Flights>,
    /// `store: redis` (and a client): the shared tier.
    pub(crate) redis: Option<Arc<RedisStore>>,
    /// Skips Redis after failures in a row, probes it again after about a second.
    pub(crate) breaker: Arc<Mutex<Breaker>>,
    pub(crate) purges: Arc<Purges>,
    pub(crate) counters: PolicyCounters,
    pub(crate) on_lookup: Arc<dyn Fn(bool) + Send + Sync>,
    rng: AtomicU64,
    /// Bytes the answers being stored hold now: at most `memory_max` (many concurrent
    /// misses of large answers must not hold `max_entry_size` each without bound).
    filling: Arc<AtomicU64>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch; 0 for a clock before it (entries then look expired).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The response headers never stored: this exchange's, or rampart's own.
const NOT_STORED: &[&str] = &[
    "x-request-id",
    "age",
    "x-cache",
    "ratelimit",
    "ratelimit-policy",
];

impl Policy {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        cfg: CacheConfig,
        memory: Arc<MemoryTier>,
        redis: Option<Arc<RedisStore>>,
        breaker: Arc<Mutex<Breaker>>,
        purges: Arc<Purges>,
        counters: PolicyCounters,
        on_lookup: Arc<dyn Fn(bool) + Send + Sync>,
    ) -> Policy {
        let redis = match cfg.store {
            CacheStore::Redis => redis,
            CacheStore::Memory => None,
        };
        Policy {
            name: Arc::from(name),
            cfg,
            memory,
            flights: Arc::new(Flights::default()),
            redis,
            breaker,
            purges,
            counters,
            on_lookup,
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            filling: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The key and what the client's headers allow. `scope` is the listener and route,
    /// `host` the request's host (lowercased here), `target` its path and query.
    pub(crate) fn ask(
        &self,
        scope: (&str, &str),
        method: &Method,
        host: Option<&str>,
        target: &str,
        headers: &HeaderMap,
    ) -> Asked {
        let head = *method == Method::HEAD;
        if !(head || *method == Method::GET) {
            return Asked::Bypass;
        }
        let d = control::request_directives(headers);
        if d.no_store
            || headers.contains_key(http::header::RANGE)
            || (headers.contains_key(http::header::AUTHORIZATION)
                && !self.cfg.vary.iter().any(|v| v == "authorization"))
        {
            return Asked::Bypass;
        }
        Asked::Cacheable {
            key: key(scope, host, target, &self.cfg.vary, headers),
            head,
            refresh: d.no_cache,
        }
    }

    /// Without waiting: the memory tier, and the turn among misses. `Err` when Redis must
    /// be asked or another request's fetch awaited. `join: false` (a HEAD, which stores
    /// nothing) neither leads nor waits.
    pub(crate) fn find_now(
        self: &Arc<Self>,
        key: &str,
        refresh: bool,
        join: bool,
    ) -> Result<Found, Pending> {
        let now = unix_ms(SystemTime::now());
        let held = self.memory.get(key, now);
        if let Some(e) = &held
            && !refresh
            && now < e.fresh_until
        {
            return Ok(Found::Fresh(e.clone()));
        }
        let stale = held.filter(|e| now < e.stale_until);
        if refresh || !join {
            // The client wants the upstream's answer, not another's.
            return Ok(Found::Miss { stale, lead: None });
        }
        match self.flights.join(key) {
            Turn::Lead(lead) => {
                if self.redis.is_some() {
                    Err(Pending {
                        key: key.to_owned(),
                        stale,
                        kind: PendingKind::Redis(lead),
                    })
                } else {
                    Ok(Found::Miss {
                        stale,
                        lead: Some(lead),
                    })
                }
            }
            Turn::Wait(rx) => Err(Pending {
                key: key.to_owned(),
                stale,
                kind: PendingKind::Wait(rx),
            }),
        }
    }

    /// The waiting part of a lookup.
    pub(crate) async fn find(self: &Arc<Self>, p: Pending, budget: &mut Budget) -> Found {
        let Pending { key, stale, kind } = p;
        match kind {
            PendingKind::Redis(lead) => {
                let now = unix_ms(SystemTime::now());
                match self.redis_get(&key, budget).await {
                    Some(e) if now < e.fresh_until => {
                        self.memory.put(e.clone());
                        self.counters.memory_changed(&self.memory);
                        drop(lead);
                        Found::Fresh(e)
                    }
                    Some(e) if now < e.stale_until => {
                        let newer = match stale {
                            Some(s) if s.stored_at >= e.stored_at => s,
                            _ => e,
                        };
                        Found::Miss {
                            stale: Some(newer),
                            lead: Some(lead),
                        }
                    }
                    _ => Found::Miss {
                        stale,
                        lead: Some(lead),
                    },
                }
            }
            PendingKind::Wait(rx) => {
                self.counters.coalesced.inc();
                if flight::wait(rx, self.cfg.lock_timeout).await {
                    let now = unix_ms(SystemTime::now());
                    if let Some(e) = self.memory.get(&key, now)
                        && now < e.fresh_until
                    {
                        return Found::Fresh(e);
                    }
                    // Not in memory (too large for the tier, or pushed out already): the
                    // leader may have found or stored it in Redis.
                    if let Some(e) = self.redis_get(&key, budget).await
                        && unix_ms(SystemTime::now()) < e.fresh_until
                    {
                        return Found::Fresh(e);
                    }
                }
                // The leader stored nothing (or took too long): this one goes itself.
                Found::Miss { stale, lead: None }
            }
        }
    }

    pub(crate) fn flights_len(&self) -> usize {
        self.flights.len()
    }

    /// Counts a lookup's result (metrics, the hit-rate signal).
    pub(crate) fn count(&self, result: XCache) {
        let c = match result {
            XCache::Hit => &self.counters.hit,
            XCache::Miss => &self.counters.miss,
            XCache::Stale => &self.counters.stale,
            XCache::Bypass => &self.counters.bypass,
        };
        c.inc();
        match result {
            XCache::Hit | XCache::Stale => (self.on_lookup)(true),
            XCache::Miss => (self.on_lookup)(false),
            XCache::Bypass => {}
        }
    }

    fn jitter(&self) -> Duration {
        // xorshift: enough to spread the replicas' probes.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        Duration::from_millis(x % 250)
    }

    fn redis_route(&self) -> RedisRoute {
        crate::sync::lock(&self.breaker).route(tokio::time::Instant::now(), self.jitter())
    }

    fn redis_result(&self, ok: bool, op: &'static str) {
        let mut b = crate::sync::lock(&self.breaker);
        if ok {
            b.success();
        } else {
            b.failure(tokio::time::Instant::now(), self.jitter());
            drop(b);
            self.counters.store_error(op);
        }
    }

    fn redis_key(&self, key: &str) -> String {
        format!("rc:{}:{key}", self.name)
    }

    /// The entry Redis holds for `key`, if it is this key's, not purged, and not past its
    /// stale limit. A Redis that fails answers None (the memory tier already missed).
    /// Within what is left of the request's `budget` (shared with its rate limits): a
    /// spent budget skips Redis, and is not counted against it.
    async fn redis_get(&self, key: &str, budget: &mut Budget) -> Option<Arc<Entry>> {
        let store = self.redis.as_ref()?;
        let timeout = store.redis.timeout();
        if budget.left(timeout).is_zero() || self.redis_route() == RedisRoute::Memory {
            return None;
        }
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.redis_key(key));
        let r = budget
            .within(timeout, store.redis.query::<Option<Vec<u8>>>(&cmd))
            .await;
        self.redis_result(r.is_ok(), "get");
        let bytes = r.ok()??;
        let e = Entry::decode(&bytes)?;
        let now = unix_ms(SystemTime::now());
        if e.key != key || now >= e.stale_until || self.purges.covers(&self.name, &e) {
            return None;
        }
        Some(Arc::new(e))
    }

    /// Writes an entry to Redis, in a task of its own (the client has its answer already).
    fn redis_set(self: &Arc<Self>, e: &Arc<Entry>) {
        let Some(store) = self.redis.clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.redis_route() == RedisRoute::Memory {
            return;
        }
        let now = unix_ms(SystemTime::now());
        let ttl = e.stale_until.saturating_sub(now).max(1);
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.redis_key(&e.key))
            .arg(e.encode())
            .arg("PX")
            .arg(ttl);
        let me = self.clone();
        rt.spawn(async move {
            let r = store.redis.query::<()>(&cmd).await;
            me.redis_result(r.is_ok(), "set");
        });
    }

    /// Starts storing an answer on its way to the client, if it may be stored.
    pub(crate) fn fill(
        self: &Arc<Self>,
        key: String,
        lead: Option<Lead>,
        status: u16,
        headers: &HeaderMap,
    ) -> Option<Box<Fill>> {
        let now = SystemTime::now();
        let (fresh_for, stale) =
            match control::storable(status, headers, self.cfg.ttl, &self.cfg.vary, now) {
                Storable::No(why) => {
                    tracing::trace!(cache = %self.name, why, "answer not stored");
                    return None;
                }
                Storable::Yes {
                    fresh_for,
                    stale_if_error,
                } => (fresh_for, stale_if_error),
            };
        let stale_for = match (self.cfg.stale_if_error, stale) {
            (None, _) | (_, StaleRule::Never) => Duration::ZERO,
            (Some(d), StaleRule::Policy) => d,
            (Some(_), StaleRule::For(d)) => d,
        };
        let limit = self.cfg.max_entry_size;
        let declared = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return None;
        }
        let mut kept = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            if !NOT_STORED.contains(&name.as_str()) {
                kept.append(name.clone(), value.clone());
            }
        }
        let stored_at = unix_ms(now);
        let fresh_until = stored_at.saturating_add(ms(fresh_for));
        Some(Box::new(Fill {
            policy: self.clone(),
            key,
            status,
            headers: kept,
            body: BytesMut::with_capacity(
                usize::try_from(declared.unwrap_or(0))
                    .unwrap_or(0)
                    .min(64 * 1024),
            ),
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            over: false,
            stored_at,
            fresh_until,
            stale_until: fresh_until.saturating_add(ms(stale_for)),
            age: control::age_secs(headers),
            lead,
            filling: self.filling.clone(),
            budget: self.cfg.memory_max,
        }))
    }
}

/// A request's way through its route's cache, carried by the request's tail: what the
/// lookup found, and the answer being stored on its way back.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub(crate) policy: Arc<Policy>,
    pub(crate) key: String,
    pub(crate) head: bool,
    pub(crate) how: XCache,
    /// Answers instead of an upstream failure (`stale_if_error`).
    pub(crate) stale: Option<Arc<Entry>>,
    pub(crate) lead: Option<Lead>,
    pub(crate) fill: Option<Box<Fill>>,
}

impl Exchange {
    pub(crate) fn new(policy: Arc<Policy>, key: String, head: bool, how: XCache) -> Exchange {
        Exchange {
            policy,
            key,
            head,
            how,
            stale: None,
            lead: None,
            fill: None,
        }
    }

    /// A body frame on its way to the client.
    pub(crate) fn data(&mut self, d: &[u8]) {
        if let Some(f) = &mut self.fill {
            f.data(d);
        }
    }

    /// The body ended whole.
    pub(crate) fn complete(&mut self) {
        if let Some(f) = self.fill.take() {
            f.complete();
        }
    }

    /// Starts storing the answer the upstream gave (a GET's), if it may be stored. The
    /// lead goes with it: the waiters wake when it is stored, or at once if it is not.
    pub(crate) fn answered(&mut self, status: u16, headers: &HeaderMap) {
        let lead = self.lead.take();
        if self.head {
            return;
        }
        self.fill = self
            .policy
            .fill(std::mem::take(&mut self.key), lead, status, headers);
    }
}

/// `X-Cache` on every answer of a cached route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XCache {
    Hit,
    Miss,
    Stale,
    Bypass,
}

impl XCache {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            XCache::Hit => "HIT",
            XCache::Miss => "MISS",
            XCache::Stale => "STALE",
            XCache::Bypass => "BYPASS",
        }
    }

    pub(crate) fn value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

pub(crate) static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The head of an answer from the cache: the stored headers, `Age`, `X-Cache`.
pub(crate) fn answer_head(e: &Entry, how: XCache) -> (http::StatusCode, HeaderMap) {
    let now = unix_ms(SystemTime::now());
    let age = e
        .age_at_store
        .saturating_add(now.saturating_sub(e.stored_at) / 1000);
    let mut headers = e.headers.clone();
    headers.insert(http::header::AGE, HeaderValue::from(age));
    headers.insert(X_CACHE.clone(), how.value());
    let status = http::StatusCode::from_u16(e.status).unwrap_or(http::StatusCode::OK);
    (status, headers)
}

/// Whether the client's `If-None-Match` matches the entry's `ETag` (weak comparison, RFC
/// 9110 13.1.2): the answer is then a 304.
pub(crate) fn not_modified(request: &HeaderMap, e: &Entry) -> bool {
    let Some(etag) = e.headers.get(http::header::ETAG).map(HeaderValue::as_bytes) else {
        return false;
    };
    let weak = |t: &[u8]| -> Vec<u8> { t.strip_prefix(b"W/").unwrap_or(t).to_vec() };
    let mine = weak(etag);
    request
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| t.trim_ascii())
        .any(|t| t == b"*" || (!t.is_empty() && weak(t) == mine))
}

/// The cache key: listener, route, host, path and query, and the policy's `vary` headers,
/// one per line ('\n' cannot appear in any of them).
fn key(
    (listener, route): (&str, &str),
    host: Option<&str>,
    target: &str,
    vary: &[String],
    headers: &HeaderMap,
) -> String {
    let host = host.unwrap_or("").to_ascii_lowercase();
    let mut k = String::with_capacity(listener.len() + route.len() + host.len() + target.len() + 8);
    for part in [listener, route, &host, target] {
        k.push_str(part);
        k.push('\n');
    }
    for name in vary {
        let mut values = headers.get_all(name.as_str()).iter().peekable();
        if values.peek().is_none() {
            // Absent, which differs from present and empty.
            k.push('-');
        } else {
            k.push('=');
            for (i, v) in values.enumerate() {
                if i > 0 {
                    k.push_str(", ");
                }
                k.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
        }
        k.push('\n');
    }
    k
}

/// The parts of a key a purge matches on: (route, path and query).
pub(crate) fn key_route_target(key: &str) -> (&str, &str) {
    let mut parts = key.split('\n');
    let _listener = parts.next();
    let route = parts.next().unwrap_or("");
    let _host = parts.next();
    let target = parts.next().unwrap_or("");
    (route, target)
}

/// An answer being stored as it passes to the client: the body is kept (up to
/// `max_entry_size`, then given up) and stored when it ended whole. Dropped before that (a
/// failure, a client gone), it stores nothing; either way the waiters wake.
pub(crate) struct Fill {
    policy: Arc<Policy>,
    key: String,
    status: u16,
    headers: HeaderMap,
    body: BytesMut,
    limit: usize,
    over: bool,
    stored_at: u64,
    fresh_until: u64,
    stale_until: u64,
    age: u64,
    lead: Option<Lead>,
    /// The policy's bytes being filled (see `Policy::filling`), and its bound.
    filling: Arc<AtomicU64>,
    budget: u64,
}

impl Drop for Fill {
    fn drop(&mut self) {
        self.filling
            .fetch_sub(self.body.len() as u64, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fill")
            .field("key", &self.key)
            .field("kept", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl Fill {
    pub(crate) fn data(&mut self, d: &[u8]) {
        if self.over {
            return;
        }
        let n = d.len() as u64;
        let held = self.filling.fetch_add(n, Ordering::Relaxed);
        if self.body.len() + d.len() > self.limit || held.saturating_add(n) > self.budget {
            self.filling
                .fetch_sub(n + self.body.len() as u64, Ordering::Relaxed);
            self.over = true;
            self.body = BytesMut::new();
            // Nothing will be stored: the waiters need not wait for the end.
            self.lead = None;
            return;
        }
        self.body.extend_from_slice(d);
    }

    /// The body ended whole: into the memory tier (the waiters find it there when they
    /// wake), and to Redis.
    pub(crate) fn complete(mut self: Box<Self>) {
        if self.over {
            return;
        }
        let body: Bytes = std::mem::take(&mut self.body).freeze();
        self.filling.fetch_sub(body.len() as u64, Ordering::Relaxed);
        let e = Arc::new(Entry {
            key: std::mem::take(&mut self.key),
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            body,
            stored_at: self.stored_at,
            fresh_until: self.fresh_until,
            stale_until: self.stale_until,
            age_at_store: self.age,
        });
        let p = &self.policy;
        p.memory.put(e.clone());
        p.counters.memory_changed(&p.memory);
        p.counters.stored.inc();
        p.redis_set(&e);
        // `lead` goes with `self`, after the entry is in place.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn keys_split_on_host_target_and_vary_values_and_absence() {
        let vary = vec!["accept-language".to_owned()];
        let k = |host, target, hs: &[(&str, &str)]| key(("l", "r"), host, target, &vary, &h(hs));
        let base = k(Some("a.example"), "/x?q=1", &[]);
        assert_eq!(base, k(Some("A.Example"), "/x?q=1", &[]));
        assert_ne!(base, k(Some("b.example"), "/x?q=1", &[]));
        assert_ne!(base, k(Some("a.example"), "/x?q=2", &[]));
        assert_ne!(
            base,
            k(Some("a.example"), "/x?q=1", &[("accept-language", "")])
        );
        assert_ne!(
            k(Some("a"), "/", &[("accept-language", "de")]),
            k(Some("a"), "/", &[("accept-language", "fr")])
        );
        assert_eq!(key_route_target(&base), ("r", "/x?q=1"));
    }

    #[test]
    fn if_none_match_compares_weakly_and_takes_lists_and_star() {
        let e = Entry {
            key: String::new(),
            status: 200,
            headers: h(&[("etag", "\"v1\"")]),
            body: Bytes::new(),
            stored_at: 0,
            fresh_until: 0,
            stale_until: 0,
            age_at_store: 0,
        };
        assert!(not_modified(&h(&[("if-none-match", "\"v1\"")]), &e));
        assert!(not_modified(&h(&[("if-none-match", "W/\"v1\"")]), &e));
        assert!(not_modified(&h(&[("if-none-match", "\"x\", \"v1\"")]), &e));
        assert!(not_modified(&h(&[("if-none-match", "*")]), &e));
        assert!(!not_modified(&h(&[("if-none-match", "\"v2\"")]), &e));
        assert!(!not_modified(&h(&[]), &e));
    }
}
