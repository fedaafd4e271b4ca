//! Signals the request counters do not give, for the alert rules and the status page.
//!
//! - Counted here: database queries and their failures (each Postgres health probe is one;
//!   code that runs queries of its own adds to them), cache hits and misses (the cache, when
//!   it exists). Windowed like the request counters (the time series samples them).
//! - Read from the health checks' cached results (in `alert::signals`): memory use against its
//!   limit, Postgres connections against `max_connections`, each dependency's state.
//! - Fed by hand (`set_pool_usage`, `set_memory_usage`): for sources without a health check;
//!   a health check's value wins when both exist.
//!
//! Until something feeds a signal it is "no data": its rules stay quiet, the page says so.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::observe::series::FedTotals;

#[derive(Debug, Default)]
pub struct Signals {
    db_queries: AtomicU64,
    db_errors: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    pool_usage: Mutex<Option<f64>>,
    memory_usage: Mutex<Option<f64>>,
}

/// Shares only: 0..=1, and never NaN.
pub(crate) fn share(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite()).map(|v| v.clamp(0.0, 1.0))
}

impl Signals {
    pub fn db_query(&self, ok: bool) {
        self.db_queries.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.db_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn cache_lookup(&self, hit: bool) {
        let c = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections in use / the pool's maximum, for a pool no health check reports.
    pub fn set_pool_usage(&self, usage: Option<f64>) {
        *crate::sync::lock(&self.pool_usage) = share(usage);
    }

    /// Resident memory / its limit, when the memory health check is not configured.
    pub fn set_memory_usage(&self, usage: Option<f64>) {
        *crate::sync::lock(&self.memory_usage) = share(usage);
    }

    pub fn totals(&self) -> FedTotals {
        FedTotals {
            db_queries: self.db_queries.load(Ordering::Relaxed),
            db_errors: self.db_errors.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
        }
    }

    pub fn fed_pool_usage(&self) -> Option<f64> {
        *crate::sync::lock(&self.pool_usage)
    }

    pub fn fed_memory_usage(&self) -> Option<f64> {
        *crate::sync::lock(&self.memory_usage)
    }
}
