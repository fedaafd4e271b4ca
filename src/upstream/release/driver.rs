//! The task that evaluates releases every [`TICK`] on tokio's clock (tests pause it), and
//! saves what changed: to the state file, and with Redis to the shared key (see
//! `store.rs` for which replica drives).

use std::sync::Arc;

use super::manager::{Releases, TICK};
use super::store::{self, Persisted};
use crate::config::ReleaseConfig;
use crate::shutdown::Background;

impl Releases {
    /// At start-up, before the first tick: the saved state (Redis when configured and it
    /// has one, else the file), then the configuration's releases.
    pub(crate) async fn resume(&self, config: &[ReleaseConfig]) {
        let mut saved = None;
        if let Some(shared) = self.store.redis() {
            match shared.load().await {
                Ok(p) => saved = p,
                Err(e) => tracing::warn!(error = %e, "release state not read from Redis"),
            }
        }
        if saved.is_none()
            && let Some(path) = self.store.file()
        {
            match store::load_file(&path) {
                Ok(p) => saved = p,
                Err(e) => tracing::warn!(error = %e, "release state file not read"),
            }
        }
        if let Some(p) = saved {
            tracing::info!(releases = p.releases.len(), "release state restored");
            self.restore(p);
        }
        self.configure(config);
        self.save().await;
    }

    /// Saves the state if it changed since the last save.
    pub(crate) async fn save(&self) {
        let Some(p) = self.take_dirty() else { return };
        self.save_state(&p).await;
    }

    async fn save_state(&self, p: &Persisted) {
        if let Some(path) = self.store.file()
            && let Err(e) = store::save_file(&path, p)
        {
            tracing::warn!(path = %path.display(), error = %e, "release state file not written");
        }
        if let Some(shared) = self.store.redis() {
            match shared.save(p).await {
                Ok(()) => self.store.set_last_saved(Some(p.to_bytes())),
                Err(e) => tracing::warn!(error = %e, "release state not written to Redis"),
            }
        }
    }

    /// One round of the driver. With Redis, see `coordinate`; the driver ticks and saves.
    pub(crate) async fn drive_once(&self, last: &mut Option<Vec<u8>>) {
        let shared = self.store.redis();
        match &shared {
            Some(shared) => {
                if !self.coordinate(shared, last).await {
                    return;
                }
            }
            None => self.set_driver(None),
        }
        self.tick();
        self.save().await;
        if let Some(shared) = shared
            && !self.has_work()
            && let Err(e) = shared.unlease().await
        {
            tracing::debug!(error = %e, "release lease not given up");
        }
    }

    /// Whether this replica drives this round. Another holds the lease: follow it (set
    /// the weights its saved state says). Free: take it if anything is to be driven here
    /// or in the saved state (taking over from where the saved state is). Ours: renew it.
    /// Redis unreachable: a driver goes on driving (its file still keeps the state), a
    /// follower keeps the weights it has.
    async fn coordinate(&self, shared: &store::Shared, last: &mut Option<Vec<u8>>) -> bool {
        let following = self.driver().is_some();
        let holder = match shared.holder().await {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "release lease not read");
                return !following;
            }
        };
        if let Some(h) = holder.as_ref().filter(|h| **h != shared.instance) {
            self.follow(shared, h.clone(), last).await;
            return false;
        }
        // Taking a free lease: the saved state is the truth unless it is what this replica
        // saved last (restoring that would only restart the step's window).
        let mut adopt = None;
        if holder.is_none() {
            let raw = shared.load_raw().await.ok().flatten();
            let remote = raw.as_deref().and_then(|r| Persisted::from_bytes(r).ok());
            let remote_work = remote.as_ref().is_some_and(Persisted::has_work);
            if !self.has_work() && !remote_work && !following {
                return true;
            }
            if raw.is_some() && raw != self.store.last_saved() {
                adopt = remote;
            }
        }
        match shared.lease().await {
            Ok(h) if h == shared.instance => {}
            Ok(h) => {
                self.follow(shared, h, last).await;
                return false;
            }
            Err(e) => {
                tracing::debug!(error = %e, "release lease not taken");
                return !following;
            }
        }
        if let Some(p) = adopt {
            self.adopt(p, true);
        }
        if following {
            tracing::info!(instance = %shared.instance, "this replica drives the releases");
        }
        self.set_driver(None);
        *last = None;
        true
    }

    async fn follow(&self, shared: &store::Shared, holder: String, last: &mut Option<Vec<u8>>) {
        self.set_driver(Some(holder));
        if let Ok(Some(raw)) = shared.load_raw().await
            && last.as_ref() != Some(&raw)
        {
            match Persisted::from_bytes(&raw) {
                Ok(p) => self.restore(p),
                Err(e) => tracing::warn!(error = %e, "release state in Redis not read"),
            }
            *last = Some(raw);
        }
    }
}

/// Starts the driver (stopped by the drain).
pub(crate) fn spawn(releases: Arc<Releases>, background: &Background) {
    background.spawn("releases", move |mut stop| async move {
        let mut last = None;
        loop {
            releases.drive_once(&mut last).await;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    });
}
