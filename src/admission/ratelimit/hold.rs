//! What an admitted request holds until its exchange ends: its stream permits, given back
//! when dropped, and the `cost: tokens` policies its token counts are charged to.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;

use super::Policy;
use super::fallback::RedisStore;
use super::memory::StreamTable;

/// One stream permit; dropping it gives it back.
pub(super) struct Permit {
    release: Release,
    /// Left for the key when taken (for the RateLimit header).
    pub(super) remaining: u64,
    held: Gauge,
}

pub(super) enum Release {
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
    pub(super) fn new(release: Release, remaining: u64, held: Gauge) -> Permit {
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
    pub(super) permits: Vec<Permit>,
    pub(super) charges: Vec<(Arc<Policy>, String)>,
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
