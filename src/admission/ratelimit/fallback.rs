//! The per-request switch between Redis and memory for `store: redis` policies.
//!
//! Each request goes to Redis; on an error or a timeout THAT request is decided by the
//! memory limiter (at `points / replicas`). A small breaker counts consecutive failures:
//! after 3 it opens and later requests skip Redis entirely, so an outage costs no latency;
//! after about a second (jittered, so replicas do not probe in step) one request probes
//! Redis, and a success closes the breaker: decisions return to Redis by themselves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::memory::{Acquired, StreamTable, Table};
use super::redis::{Ask, Grant, RedisLimiter};
use super::{Decision, Limits, Metrics, Source};
use crate::redis::{Budget, Redis, RedisError};

/// How often the renewal task looks for leases due (a third of the shortest lease allowed).
const RENEW_TICK: Duration = Duration::from_secs(1);

const FAILURES_TO_OPEN: u32 = 3;
const PROBE_AFTER: Duration = Duration::from_secs(1);
const MAX_JITTER_MS: u64 = 250;

/// Where one request's decision is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Redis,
    /// Redis, as the one request that checks whether it is back.
    Probe,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Redis is skipped from now on.
    ToMemory,
    ToRedis,
}

/// Pure: time and jitter are passed in.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    failures: u32,
    /// Some while open: when the next probe may go.
    probe_at: Option<Instant>,
}

impl Breaker {
    pub(crate) fn route(&mut self, now: Instant, jitter: Duration) -> Route {
        match self.probe_at {
            None => Route::Redis,
            Some(at) if now >= at => {
                // Push the next probe out now: if this one never reports (its request was
                // cancelled), another goes after the same delay; meanwhile others skip.
                self.probe_at = Some(now + PROBE_AFTER + jitter);
                Route::Probe
            }
            Some(_) => Route::Memory,
        }
    }

    pub(crate) fn success(&mut self) -> Option<Transition> {
        self.failures = 0;
        self.probe_at.take().map(|_| Transition::ToRedis)
    }

    pub(crate) fn failure(&mut self, now: Instant, jitter: Duration) -> Option<Transition> {
        self.failures = self.failures.saturating_add(1);
        let was_open = self.probe_at.is_some();
        if was_open || self.failures >= FAILURES_TO_OPEN {
            self.probe_at = Some(now + PROBE_AFTER + jitter);
        }
        (!was_open && self.probe_at.is_some()).then_some(Transition::ToMemory)
    }

    pub(crate) fn is_open(&self) -> bool {
        self.probe_at.is_some()
    }
}

/// One Redis client with its breaker, shared by every `store: redis` policy.
pub struct RedisStore {
    pub redis: Redis,
    limiter: RedisLimiter,
    breaker: Mutex<Breaker>,
    rng: AtomicU64,
    metrics: Metrics,
    /// Stream permits this replica holds in Redis, renewed by one task.
    leases: Mutex<HashMap<u64, Lease>>,
    next_id: AtomicU64,
    renewer_started: AtomicBool,
}

/// One permit held in Redis.
struct Lease {
    key: Arc<str>,
    length: Duration,
    renewed: Instant,
}

/// What [`RedisStore::acquire`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    /// A member of the key's set in Redis, renewed until released.
    Redis { id: u64, remaining: u64 },
    /// In the memory fallback: released there.
    Memory(Acquired),
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    pub fn new(redis: Redis, metrics: Metrics) -> RedisStore {
        use std::hash::{BuildHasher, RandomState};
        metrics.fallback_active.set(0);
        RedisStore {
            redis,
            limiter: RedisLimiter::default(),
            breaker: Mutex::new(Breaker::default()),
            rng: AtomicU64::new(RandomState::new().hash_one(std::process::id()) | 1),
            metrics,
            leases: Mutex::new(HashMap::new()),
            // Ids unique across replicas: a random start (the high half) per process.
            next_id: AtomicU64::new(RandomState::new().hash_one("ids") & !0xffff_ffff),
            renewer_started: AtomicBool::new(false),
        }
    }

    /// Decides one request for one policy. `memory` holds the fallback counts, checked
    /// against `fallback` limits. None (counted as fail_open by the caller) only when
    /// neither Redis nor memory could decide.
    pub async fn check(
        &self,
        redis_key: &str,
        limits: &Limits,
        memory: &Table,
        memory_key: &str,
        fallback: &Limits,
        budget: &mut Budget,
    ) -> (Option<Decision>, Source) {
        let in_redis = self
            .call(self.limiter.check(&self.redis, redis_key, limits), budget)
            .await;
        Self::or_memory(in_redis, || {
            memory.check(memory_key, Instant::now(), fallback)
        })
    }

    /// Quota leasing (lease.rs): one LEASE call through the breaker; None when Redis failed
    /// or is being skipped (the caller decides in memory).
    pub(crate) async fn lease(
        &self,
        redis_key: &str,
        limits: &Limits,
        ask: &Ask,
        budget: &mut Budget,
    ) -> Option<Grant> {
        self.call(
            self.limiter.lease(&self.redis, redis_key, limits, ask),
            budget,
        )
        .await
    }

    /// `cost: tokens` admission, as `check` but counting nothing.
    pub(crate) async fn peek(
        &self,
        redis_key: &str,
        limits: &Limits,
        memory: &Table,
        memory_key: &str,
        fallback: &Limits,
        budget: &mut Budget,
    ) -> (Option<Decision>, Source) {
        let in_redis = self
            .call(self.limiter.peek(&self.redis, redis_key, limits), budget)
            .await;
        Self::or_memory(in_redis, || {
            memory.peek(memory_key, Instant::now(), fallback)
        })
    }

    /// Charges `cost` tokens to the key: in Redis, or in memory when Redis fails.
    pub(crate) async fn charge(
        &self,
        keys: (&str, &str),
        limits: (&Limits, &Limits),
        memory: &Table,
        cost: u64,
    ) {
        let (redis_key, memory_key) = keys;
        let (limits, fallback) = limits;
        // After the exchange, on its own: a budget of its own.
        let in_redis = self
            .call(
                self.limiter.charge(&self.redis, redis_key, limits, cost),
                &mut Budget::default(),
            )
            .await;
        if in_redis.is_none() {
            memory.charge(memory_key, Instant::now(), fallback, cost);
        }
    }

    /// Takes a stream permit: a lease in Redis (renewed by this replica until released),
    /// or, when Redis fails, one in memory at `fallback_max`.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        redis_key: &str,
        (max, lease): (u64, Duration),
        memory: &StreamTable,
        memory_key: &str,
        fallback_max: u64,
        budget: &mut Budget,
    ) -> (Stream, Source) {
        self.start_renewer();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A call cut short (the client left, a timeout) may still have added the id: it is
        // renewed by no one and expires with its lease.
        let in_redis = self
            .call(
                self.limiter.acquire(&self.redis, redis_key, max, lease, id),
                budget,
            )
            .await;
        match in_redis {
            Some(Some(remaining)) => {
                crate::sync::lock(&self.leases).insert(
                    id,
                    Lease {
                        key: Arc::from(redis_key),
                        length: lease,
                        renewed: Instant::now(),
                    },
                );
                (Stream::Redis { id, remaining }, Source::Redis)
            }
            Some(None) => (Stream::Memory(Acquired::No), Source::Redis),
            None => match memory.acquire(memory_key, fallback_max) {
                Acquired::Untracked => (Stream::Memory(Acquired::Untracked), Source::FailOpen),
                a => (Stream::Memory(a), Source::Memory),
            },
        }
    }

    /// Gives a Redis permit back: no longer renewed, and removed from Redis by a task of
    /// its own (the caller is a Drop). If that fails, the lease runs out by itself.
    pub(crate) fn release(self: &Arc<Self>, key: Arc<str>, id: u64) {
        crate::sync::lock(&self.leases).remove(&id);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.clone();
        handle.spawn(async move {
            if let Err(e) = store.limiter.release(&store.redis, &key, id).await {
                tracing::debug!(error = %e, "rate limit: releasing a stream permit failed; its lease will expire");
            }
        });
    }

    /// Permits this replica holds in Redis.
    #[cfg(test)]
    pub(crate) fn leases_held(&self) -> usize {
        crate::sync::lock(&self.leases).len()
    }

    /// One task per store renews the leases it holds, each every third of its length,
    /// batched by key. It ends with the store.
    fn start_renewer(self: &Arc<Self>) {
        if self.renewer_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.renewer_started.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<RedisStore> = Arc::downgrade(self);
        handle.spawn(async move {
            loop {
                tokio::time::sleep(RENEW_TICK).await;
                let Some(store) = weak.upgrade() else { return };
                store.renew_due().await;
            }
        });
    }

    async fn renew_due(&self) {
        // Redis is being skipped: each renewal would only wait out the timeout. Leases
        // that run out meanwhile are not brought back (XX); the breaker's probes find
        // Redis again.
        if self.fallback_active() {
            return;
        }
        let now = Instant::now();
        let mut due: HashMap<(Arc<str>, Duration), Vec<u64>> = HashMap::new();
        {
            let leases = crate::sync::lock(&self.leases);
            for (id, l) in leases.iter() {
                // Half a tick early: renewals land on the tick before the third is over.
                if now + RENEW_TICK / 2 >= l.renewed + l.length / 3 {
                    due.entry((l.key.clone(), l.length)).or_default().push(*id);
                }
            }
        }
        for ((key, length), ids) in due {
            let renewed = self.limiter.renew(&self.redis, &key, length, &ids).await;
            match renewed {
                Ok(()) => {
                    let mut leases = crate::sync::lock(&self.leases);
                    for id in &ids {
                        if let Some(l) = leases.get_mut(id) {
                            l.renewed = now;
                        }
                    }
                }
                // Tried again on the next tick, while the lease still runs.
                Err(e) => tracing::debug!(error = %e, "rate limit: renewing stream leases failed"),
            }
        }
    }

    /// One call to Redis through the breaker, within what is left of the request's
    /// `budget`: None when skipped or failed (the caller decides in memory). A request
    /// whose budget is spent skips Redis without counting against it: Redis was not asked.
    async fn call<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, RedisError>>,
        budget: &mut Budget,
    ) -> Option<T> {
        let timeout = self.redis.timeout();
        if budget.left(timeout).is_zero() {
            return None;
        }
        let route = self.with_breaker(|b, now, jitter| (b.route(now, jitter), None));
        if route == Route::Memory {
            return None;
        }
        let start = Instant::now();
        let result = budget.within(timeout, work).await;
        self.metrics
            .redis_seconds
            .observe(start.elapsed().as_secs_f64());
        match result {
            Ok(v) => {
                self.with_breaker(|b, _, _| ((), b.success()));
                Some(v)
            }
            Err(e) => {
                let kind = match e {
                    RedisError::Timeout(_) => "timeout",
                    _ => "error",
                };
                self.metrics.redis_errors(kind).inc();
                tracing::debug!(error = %e, "rate limit: redis failed, deciding in memory");
                self.with_breaker(|b, now, jitter| ((), b.failure(now, jitter)));
                None
            }
        }
    }

    fn or_memory(
        in_redis: Option<Decision>,
        memory: impl FnOnce() -> Option<Decision>,
    ) -> (Option<Decision>, Source) {
        if let Some(d) = in_redis {
            return (Some(d), Source::Redis);
        }
        match memory() {
            Some(d) => (Some(d), Source::Memory),
            None => (None, Source::FailOpen),
        }
    }

    pub fn fallback_active(&self) -> bool {
        crate::sync::lock(&self.breaker).is_open()
    }

    /// Runs `f` on the breaker and publishes the transition it returns.
    fn with_breaker<T>(
        &self,
        f: impl FnOnce(&mut Breaker, Instant, Duration) -> (T, Option<Transition>),
    ) -> T {
        let jitter = self.jitter();
        let (out, transition) = {
            let mut b = crate::sync::lock(&self.breaker);
            f(&mut b, Instant::now(), jitter)
        };
        if let Some(t) = transition {
            self.metrics.transition(t);
            match t {
                Transition::ToMemory => {
                    tracing::warn!("rate limit: redis failing, deciding in memory until it answers")
                }
                Transition::ToRedis => tracing::info!("rate limit: redis answers again"),
            }
        }
        out
    }

    /// xorshift64: only needs to differ between replicas and probes, not be unpredictable.
    fn jitter(&self) -> Duration {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        Duration::from_millis(x % MAX_JITTER_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_JITTER: Duration = Duration::ZERO;

    #[test]
    fn opens_after_three_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert_eq!(b.route(t0, NO_JITTER), Route::Redis);
        assert_eq!(b.failure(t0, NO_JITTER), None);
        assert_eq!(b.failure(t0, NO_JITTER), None);
        // A success in between starts the count again.
        assert_eq!(b.success(), None);
        assert_eq!(b.failure(t0, NO_JITTER), None);
        assert_eq!(b.failure(t0, NO_JITTER), None);
        assert_eq!(b.failure(t0, NO_JITTER), Some(Transition::ToMemory));
        assert!(b.is_open());
        assert_eq!(b.route(t0, NO_JITTER), Route::Memory);
        assert_eq!(
            b.route(t0 + Duration::from_millis(999), NO_JITTER),
            Route::Memory
        );
    }

    #[test]
    fn one_probe_per_interval_and_a_success_closes() {
        let t0 = Instant::now();
        let jitter = Duration::from_millis(100);
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.failure(t0, jitter);
        }
        let t1 = t0 + Duration::from_millis(1100);
        assert_eq!(
            b.route(t1 - Duration::from_millis(1), NO_JITTER),
            Route::Memory
        );
        assert_eq!(b.route(t1, NO_JITTER), Route::Probe);
        // While the probe is out, the others still skip Redis.
        assert_eq!(b.route(t1, NO_JITTER), Route::Memory);
        // A failed probe keeps it open, with no new transition.
        assert_eq!(b.failure(t1, NO_JITTER), None);
        assert_eq!(
            b.route(t1 + Duration::from_millis(500), NO_JITTER),
            Route::Memory
        );
        let t2 = t1 + PROBE_AFTER;
        assert_eq!(b.route(t2, NO_JITTER), Route::Probe);
        assert_eq!(b.success(), Some(Transition::ToRedis));
        assert!(!b.is_open());
        assert_eq!(b.route(t2, NO_JITTER), Route::Redis);
    }

    #[test]
    fn a_lost_probe_does_not_wedge_the_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.failure(t0, NO_JITTER);
        }
        assert_eq!(b.route(t0 + PROBE_AFTER, NO_JITTER), Route::Probe);
        // That probe's request was cancelled and never reported: another goes later.
        assert_eq!(b.route(t0 + PROBE_AFTER * 2, NO_JITTER), Route::Probe);
    }
}
