//! `rampart_cache_*`: lookups by policy and result, entries stored, requests that waited for
//! another's fetch, store errors, and the memory tier's size. Handles are made once per
//! policy, so a lookup only increments.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use super::memory::MemoryTier;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LookupLabels {
    cache: String,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CacheLabels {
    cache: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    cache: String,
    op: &'static str,
}

#[derive(Debug, Clone)]
pub struct CacheMetrics {
    lookups: Family<LookupLabels, Counter>,
    stored: Family<CacheLabels, Counter>,
    coalesced: Family<CacheLabels, Counter>,
    store_errors: Family<ErrorLabels, Counter>,
    memory_bytes: Family<CacheLabels, Gauge>,
    memory_entries: Family<CacheLabels, Gauge>,
    purged: Family<CacheLabels, Counter>,
}

/// One policy's handles.
#[derive(Debug, Clone)]
pub(crate) struct PolicyCounters {
    pub(crate) hit: Counter,
    pub(crate) miss: Counter,
    pub(crate) stale: Counter,
    pub(crate) bypass: Counter,
    pub(crate) stored: Counter,
    pub(crate) coalesced: Counter,
    pub(crate) purged: Counter,
    memory_bytes: Gauge,
    memory_entries: Gauge,
    metrics: CacheMetrics,
    name: String,
}

impl CacheMetrics {
    pub fn register(registry: &mut PromRegistry) -> CacheMetrics {
        let reg = registry.sub_registry_with_prefix("cache");
        let m = CacheMetrics {
            lookups: Family::default(),
            stored: Family::default(),
            coalesced: Family::default(),
            store_errors: Family::default(),
            memory_bytes: Family::default(),
            memory_entries: Family::default(),
            purged: Family::default(),
        };
        // No `_total` suffix: the encoder adds it to counters.
        reg.register(
            "lookups",
            "Requests on cached routes by policy and result (hit|miss|stale|bypass)",
            m.lookups.clone(),
        );
        reg.register("stored", "Answers stored, by policy", m.stored.clone());
        reg.register(
            "coalesced",
            "Misses that waited for another request's fetch of the same key, by policy",
            m.coalesced.clone(),
        );
        reg.register(
            "store_errors",
            "Failed or timed-out Redis calls of the cache, by policy and operation (get|set)",
            m.store_errors.clone(),
        );
        reg.register(
            "memory_bytes",
            "Bytes the memory tier holds, by policy",
            m.memory_bytes.clone(),
        );
        reg.register(
            "memory_entries",
            "Entries the memory tier holds, by policy",
            m.memory_entries.clone(),
        );
        reg.register(
            "purged",
            "Entries removed from the memory tier by purges, by policy",
            m.purged.clone(),
        );
        m
    }

    pub(crate) fn policy(&self, name: &str) -> PolicyCounters {
        let lookup = |result| {
            self.lookups
                .get_or_create(&LookupLabels {
                    cache: name.to_owned(),
                    result,
                })
                .clone()
        };
        let labels = CacheLabels {
            cache: name.to_owned(),
        };
        PolicyCounters {
            hit: lookup("hit"),
            miss: lookup("miss"),
            stale: lookup("stale"),
            bypass: lookup("bypass"),
            stored: self.stored.get_or_create(&labels).clone(),
            coalesced: self.coalesced.get_or_create(&labels).clone(),
            purged: self.purged.get_or_create(&labels).clone(),
            memory_bytes: self.memory_bytes.get_or_create(&labels).clone(),
            memory_entries: self.memory_entries.get_or_create(&labels).clone(),
            metrics: self.clone(),
            name: name.to_owned(),
        }
    }
}

impl PolicyCounters {
    pub(crate) fn store_error(&self, op: &'static str) {
        self.metrics
            .store_errors
            .get_or_create(&ErrorLabels {
                cache: self.name.clone(),
                op,
            })
            .inc();
    }

    pub(crate) fn memory_changed(&self, memory: &MemoryTier) {
        self.memory_bytes
            .set(i64::try_from(memory.bytes()).unwrap_or(i64::MAX));
        self.memory_entries
            .set(i64::try_from(memory.len()).unwrap_or(i64::MAX));
    }
}
