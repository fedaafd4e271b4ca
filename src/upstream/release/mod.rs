//! Releases (issue 20): weight moved from one endpoint group of an upstream to another in
//! steps, each step held for `step_for` and judged by the target's own figures, with an
//! automatic rollback.
//!
//! - `machine.rs`: one release as a pure state machine; time is passed in (ms since the
//!   Unix epoch), so tests never sleep;
//! - `manager.rs`: every release of the process, the operator's actions, config-started
//!   releases, metrics, notifications, and the driver task;
//! - `store.rs`: the state file and the Redis key (which replica drives);
//! - here: what a release needs of the upstreams ([`Groups`]).

mod driver;
mod machine;
mod manager;
mod store;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub(crate) use driver::spawn;
pub(crate) use manager::{ActionError, Notice, Notify, ReleaseMetrics, Releases, StartError};

/// What a release reads and drives of the upstreams' endpoint groups. `app` implements it
/// over `UpstreamStates` (see `app::release_groups`); tests over memory.
pub(crate) trait Groups: Send + Sync {
    /// Group names and their weights now; None for an unknown upstream or one without groups.
    fn weights(&self, upstream: &str) -> Option<Vec<(String, u32)>>;
    fn set_weights(&self, upstream: &str, weights: &[(String, u32)]) -> Result<(), String>;
    fn totals(&self, upstream: &str, group: &str) -> Option<GroupTotals>;
    fn health(&self, upstream: &str, group: &str) -> Option<GroupHealth>;
    /// Whether any breaker of the upstream is open (half-open counts: not recovered yet).
    fn breaker_open(&self, upstream: &str) -> bool;
}

/// Until the groups API is merged: no upstream has groups, so every start is refused with
/// the reason. `app::release_groups` returns this.
#[derive(Debug, Default)]
pub(crate) struct NoGroups;

impl Groups for NoGroups {
    fn weights(&self, _: &str) -> Option<Vec<(String, u32)>> {
        None
    }
    fn set_weights(&self, upstream: &str, _: &[(String, u32)]) -> Result<(), String> {
        Err(format!("upstream {upstream} has no endpoint groups"))
    }
    fn totals(&self, _: &str, _: &str) -> Option<GroupTotals> {
        None
    }
    fn health(&self, _: &str, _: &str) -> Option<GroupHealth> {
        None
    }
    fn breaker_open(&self, _: &str) -> bool {
        false
    }
}

// replaced by crate::upstream::groups at merge
/// Cumulative figures of one group since start (never reset; a window is the difference
/// of two snapshots).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct GroupTotals {
    pub requests: u64,
    pub errors: u64,
    /// Cumulative counts per bucket (upper bounds in `GroupTotals::BOUNDS_MS`).
    pub latency: Vec<u64>,
}

// replaced by crate::upstream::groups at merge
impl GroupTotals {
    pub(crate) const BOUNDS_MS: &'static [u64] = &[
        5,
        10,
        25,
        50,
        100,
        250,
        500,
        1000,
        2500,
        5000,
        10000,
        u64::MAX,
    ];

    pub(crate) fn since(&self, earlier: &GroupTotals) -> GroupTotals {
        GroupTotals {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self
                .latency
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.latency.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    pub(crate) fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    pub(crate) fn p95(&self) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = total.saturating_mul(95).div_ceil(100);
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let ms = Self::BOUNDS_MS.get(i).copied().unwrap_or(u64::MAX);
                return Some(Duration::from_millis(ms));
            }
        }
        None
    }
}

// replaced by crate::upstream::groups at merge
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupHealth {
    pub endpoints: usize,
    pub available: usize,
    pub checks_passing: Option<bool>,
}
