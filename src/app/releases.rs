//! Where releases (`upstream::release`) meet the process: the groups they drive, the
//! alert sinks they notify, the Redis client and state file they keep their state in, and
//! the reload that brings new `releases:`.

use std::sync::Arc;

use super::state::Shared;
use crate::config::Config;
use crate::reload::KeyedState;
use crate::shutdown::Background;
use crate::upstream::release::{self, Groups, Releases};
use crate::upstream::resilience::UpstreamStates;

/// What releases read and drive: the upstreams' endpoint groups (`upstream::groups`), their
/// weights, figures and health, and whether any breaker of the upstream is not closed (as
/// the `breaker_open` alert rule reads it).
pub(crate) fn release_groups(states: &Arc<UpstreamStates>) -> Arc<dyn Groups> {
    Arc::new(StateGroups(states.clone()))
}

struct StateGroups(Arc<UpstreamStates>);

impl Groups for StateGroups {
    fn weights(&self, upstream: &str) -> Option<Vec<(String, u32)>> {
        self.0.group_weights(upstream)
    }

    fn set_weights(&self, upstream: &str, weights: &[(String, u32)]) -> Result<(), String> {
        self.0.set_group_weights(upstream, weights)
    }

    fn totals(&self, upstream: &str, group: &str) -> Option<release::GroupTotals> {
        self.0.group_totals(upstream, group)
    }

    fn health(&self, upstream: &str, group: &str) -> Option<release::GroupHealth> {
        self.0.group_health(upstream, group)
    }

    fn breaker_open(&self, upstream: &str) -> bool {
        self.0
            .get(upstream)
            .is_some_and(|s| s.breaker_state() != crate::upstream::breaker::State::Closed)
    }
}

/// Before the listeners start: notifications go to the alert sinks, state to the file and
/// Redis; the saved state is taken back (weights set again), the configuration's releases
/// start or wait; then the driver ticks.
pub(crate) async fn start(shared: &Arc<Shared>, config: &Config, background: &Background) {
    let releases = &shared.releases;
    releases.set_notify(shared.alerts.clone());
    let limiters = shared.limiters.clone();
    releases
        .store
        .set_redis_source(Arc::new(move || limiters.redis_client()));
    releases.store.set_file(config.releases_state.clone());
    releases.resume(&config.releases).await;
    release::spawn(releases.clone(), background);
}

impl KeyedState for Releases {
    /// Release state is kept (it lives here, not in the snapshot); the new `releases:`
    /// start if new, and `releases_state:` may move.
    fn reconcile(&self, config: &Config) {
        self.store.set_file(config.releases_state.clone());
        self.configure(&config.releases);
    }
}
