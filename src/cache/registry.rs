//! The policies by name across reloads: a policy keeps its memory tier while its
//! `memory_max` stays the same, so a reload does not empty the cache. One task per process
//! sweeps expired entries out of the memory tiers and reads the purge log in Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use super::memory::MemoryTier;
use super::metrics::CacheMetrics;
use super::policy::{Policy, unix_ms};
use super::purge::{self, Purge, Purges};
use crate::admission::ratelimit::fallback::{Breaker, RedisStore};
use crate::config::Config;

/// How often expired entries leave the memory tiers (the users' cache service: every
/// minute).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

type Hook = Arc<dyn Fn(bool) + Send + Sync>;

pub struct Registry {
    metrics: CacheMetrics,
    memories: Mutex<HashMap<String, (u64, Arc<MemoryTier>)>>,
    current: Mutex<HashMap<String, Arc<Policy>>>,
    redis: Mutex<Option<Arc<RedisStore>>>,
    breaker: Arc<Mutex<Breaker>>,
    purges: Arc<Purges>,
    on_lookup: Mutex<Hook>,
    task_started: AtomicBool,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// What a purge did.
#[derive(Debug, serde::Serialize)]
pub struct PurgeReport {
    /// Entries removed from this replica's memory tiers.
    pub removed: usize,
    /// Logged in Redis for the other replicas (its sequence number), or why not.
    pub propagated: Result<u64, String>,
}

impl Registry {
    pub fn new(metrics: CacheMetrics) -> Arc<Registry> {
        Arc::new(Registry {
            metrics,
            memories: Mutex::new(HashMap::new()),
            current: Mutex::new(HashMap::new()),
            redis: Mutex::new(None),
            breaker: Arc::new(Mutex::new(Breaker::default())),
            purges: Arc::new(Purges::default()),
            on_lookup: Mutex::new(Arc::new(|_| {})),
            task_started: AtomicBool::new(false),
        })
    }

    /// Told of every lookup's result (hit or stale: true; miss: false): the hit-rate signal.
    pub fn on_lookup(&self, hook: impl Fn(bool) + Send + Sync + 'static) {
        *crate::sync::lock(&self.on_lookup) = Arc::new(hook);
    }

    /// The policies of `cfg`. `redis` is the program's Redis client (the rate limiter's).
    pub fn update(
        self: &Arc<Self>,
        cfg: &Config,
        redis: Option<Arc<RedisStore>>,
    ) -> HashMap<String, Arc<Policy>> {
        let hook = crate::sync::lock(&self.on_lookup).clone();
        let mut memories = crate::sync::lock(&self.memories);
        memories
            .retain(|name, (max, _)| cfg.caches.get(name).is_some_and(|c| c.memory_max == *max));
        let mut out = HashMap::new();
        for (name, c) in &cfg.caches {
            let memory = memories
                .entry(name.clone())
                .or_insert_with(|| (c.memory_max, Arc::new(MemoryTier::new(c.memory_max))))
                .1
                .clone();
            let counters = self.metrics.policy(name);
            counters.memory_changed(&memory);
            out.insert(
                name.clone(),
                Arc::new(Policy::new(
                    name,
                    c.clone(),
                    memory,
                    redis.clone(),
                    self.breaker.clone(),
                    self.purges.clone(),
                    counters,
                    hook.clone(),
                )),
            );
        }
        drop(memories);
        *crate::sync::lock(&self.redis) = redis;
        *crate::sync::lock(&self.current) = out.clone();
        if !cfg.caches.is_empty() {
            self.start_task();
        }
        out
    }

    fn start_task(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.task_started.swap(true, Ordering::AcqRel) {
            return;
        }
        rt.spawn(background(Arc::downgrade(self)));
    }

    fn policies(&self) -> Vec<Arc<Policy>> {
        crate::sync::lock(&self.current).values().cloned().collect()
    }

    /// Applies a purge here: the memory tiers now, the Redis reads from now on.
    fn apply(&self, p: &Purge) -> usize {
        self.purges.add(p.clone());
        let mut removed = 0;
        for policy in self.policies() {
            let n = policy.memory.remove_if(|e| p.matches(&policy.name, e));
            if n > 0 {
                policy.counters.purged.inc_by(n as u64);
                policy.counters.memory_changed(&policy.memory);
            }
            removed += n;
        }
        removed
    }

    /// `POST /admin/cache/purge`: here at once, and through Redis on every replica.
    pub async fn purge(&self, mut p: Purge) -> PurgeReport {
        p.at = unix_ms(SystemTime::now());
        let removed = self.apply(&p);
        let redis = crate::sync::lock(&self.redis).clone();
        let propagated = match redis {
            Some(store) => purge::publish(&store.redis, &p).await,
            None => Err("no redis section: this replica only".to_owned()),
        };
        PurgeReport {
            removed,
            propagated,
        }
    }

    /// `GET /admin/cache`: each policy's settings and memory tier.
    pub fn describe(&self) -> serde_json::Value {
        let mut policies: Vec<_> = self.policies();
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let list: Vec<_> = policies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": &*p.name,
                    "store": if p.redis.is_some() { "redis" } else { "memory" },
                    "memory": {
                        "entries": p.memory.len(),
                        "bytes": p.memory.bytes(),
                        "max_bytes": p.memory.max_bytes(),
                    },
                    "in_flight": p.flights_len(),
                })
            })
            .collect();
        serde_json::json!({
            "caches": list,
            "redis_skipped": crate::sync::lock(&self.breaker).is_open(),
            "purges_known": self.purges.len(),
        })
    }

    /// One pass of the background task: sweep (when due), read the purge log.
    async fn tick(&self, sweep: bool) {
        if sweep {
            let now = unix_ms(SystemTime::now());
            for p in self.policies() {
                if p.memory.sweep(now) > 0 {
                    p.counters.memory_changed(&p.memory);
                }
            }
        }
        let redis = crate::sync::lock(&self.redis).clone();
        if let Some(store) = redis {
            match purge::read_since(&store.redis, self.purges.seen()).await {
                Ok(rows) => {
                    for (seq, p) in rows {
                        self.apply(&p);
                        self.purges.seen.fetch_max(seq, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cache: purge log not read"),
            }
        }
    }
}

async fn background(registry: Weak<Registry>) {
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(purge::POLL).await;
        let Some(r) = registry.upgrade() else {
            return;
        };
        let sweep = last_sweep.elapsed() >= SWEEP_EVERY;
        if sweep {
            last_sweep = tokio::time::Instant::now();
        }
        r.tick(sweep).await;
    }
}
