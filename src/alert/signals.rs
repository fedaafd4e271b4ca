//! Signals other subsystems measure and hand to the alert rules and the status page: the
//! database and the cache count their queries and lookups here, the health checks report
//! pool and memory usage and each dependency's state. Until something feeds a signal it is
//! "no data": its rules stay quiet and the status page says so.
//!
//! Cheap to feed from a hot path (relaxed atomics; the few values behind a mutex change
//! once per probe interval).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use crate::metrics::series::FedTotals;

/// A dependency's state as the health checks last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependencyState {
    Up,
    Down,
    /// Configured but not checked yet.
    Unknown,
}

impl DependencyState {
    pub fn as_str(self) -> &'static str {
        match self {
            DependencyState::Up => "up",
            DependencyState::Down => "down",
            DependencyState::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dependency {
    pub name: String,
    /// postgres, redis, http, memory...
    pub kind: String,
    pub state: DependencyState,
    /// Readiness depends on it.
    pub critical: bool,
    /// The last error or a short note.
    pub detail: String,
    pub checked_at: Option<SystemTime>,
}

#[derive(Debug, Default)]
pub struct Signals {
    db_queries: AtomicU64,
    db_errors: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    pool_usage: Mutex<Option<f64>>,
    memory_usage: Mutex<Option<f64>>,
    /// None: no health checks configured (the status page says "not configured").
    dependencies: Mutex<Option<Vec<Dependency>>>,
    /// Active health of upstream endpoints by URL, when checks are configured.
    endpoints: Mutex<HashMap<String, DependencyState>>,
}

/// Shares only: 0..=1, and never NaN.
fn share(v: Option<f64>) -> Option<f64> {
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

    /// The busiest pool's connections in use / its maximum (None: no pool).
    pub fn set_pool_usage(&self, usage: Option<f64>) {
        *self
            .pool_usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = share(usage);
    }

    /// Resident memory / the cgroup (or machine) limit.
    pub fn set_memory_usage(&self, usage: Option<f64>) {
        *self
            .memory_usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = share(usage);
    }

    pub fn set_dependencies(&self, deps: Option<Vec<Dependency>>) {
        *self
            .dependencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = deps;
    }

    pub fn set_endpoint_health(&self, url: &str, state: DependencyState) {
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(url.to_owned(), state);
    }

    /// None: no active check of this endpoint ("no data").
    pub fn endpoint_health(&self, url: &str) -> Option<DependencyState> {
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(url)
            .copied()
    }

    pub fn totals(&self) -> FedTotals {
        FedTotals {
            db_queries: self.db_queries.load(Ordering::Relaxed),
            db_errors: self.db_errors.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
        }
    }

    pub fn pool_usage(&self) -> Option<f64> {
        *self
            .pool_usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn memory_usage(&self) -> Option<f64> {
        *self
            .memory_usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn dependencies(&self) -> Option<Vec<Dependency>> {
        self.dependencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfed_signals_are_no_data_and_fed_ones_are_clean_shares() {
        let s = Signals::default();
        assert_eq!((s.pool_usage(), s.memory_usage()), (None, None));
        assert_eq!(s.dependencies(), None);
        s.set_pool_usage(Some(f64::NAN));
        assert_eq!(s.pool_usage(), None);
        s.set_memory_usage(Some(1.7));
        assert_eq!(s.memory_usage(), Some(1.0));
        s.db_query(true);
        s.db_query(false);
        s.cache_lookup(true);
        let t = s.totals();
        assert_eq!(
            (t.db_queries, t.db_errors, t.cache_hits, t.cache_misses),
            (2, 1, 1, 0)
        );
    }
}
