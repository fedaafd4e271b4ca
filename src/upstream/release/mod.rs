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

pub(crate) use crate::upstream::groups::{GroupHealth, GroupTotals};
