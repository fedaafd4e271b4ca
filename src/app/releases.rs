//! Where releases (`upstream::release`) meet the process: the groups they drive, the
//! alert sinks they notify, the Redis client and state file they keep their state in, and
//! the reload that brings new `releases:`.

use std::sync::Arc;

use super::state::Shared;
use crate::config::Config;
use crate::reload::KeyedState;
use crate::shutdown::Background;
use crate::upstream::release::{self, Groups, NoGroups, Releases};
use crate::upstream::resilience::UpstreamStates;

/// THE WIRING POINT for the groups API (issue 20, branch `groups`): what releases read and
/// drive. Until it is merged no upstream has groups, so every release is refused with
/// "upstream X has no endpoint groups". At merge, return an adapter over `states`:
/// `weights` = `group_weights`, `set_weights` = `set_group_weights`, `totals` =
/// `group_totals`, `health` = `group_health`, and `breaker_open` = any breaker of the
/// upstream not closed (as the `breaker_open` alert rule reads it).
pub(crate) fn release_groups(states: &Arc<UpstreamStates>) -> Arc<dyn Groups> {
    let _ = states;
    Arc::new(NoGroups)
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
