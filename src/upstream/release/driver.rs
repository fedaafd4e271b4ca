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
        if let Some(shared) = self.store.redis()
            && let Err(e) = shared.save(p).await
        {
            tracing::warn!(error = %e, "release state not written to Redis");
        }
    }

    /// One round of the driver. With Redis: take or renew the lease; the holder ticks and
    /// saves, the others follow the saved state (`last` is the state they last applied).
    /// Redis unreachable: a driver goes on driving (its file still keeps the state), a
    /// follower keeps the weights it has.
    pub(crate) async fn drive_once(&self, last: &mut Option<Vec<u8>>) {
        if let Some(shared) = self.store.redis() {
            match shared.lease().await {
                Ok(holder) if holder == shared.instance => {
                    if self.driver().is_some() {
                        // Taking over: from where the last driver left it.
                        if let Ok(Some(p)) = shared.load().await {
                            self.restore(p);
                        }
                        self.set_driver(None);
                        tracing::info!(instance = %shared.instance, "this replica drives the releases");
                    }
                }
                Ok(holder) => {
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
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "release lease not renewed");
                    if self.driver().is_some() {
                        return;
                    }
                }
            }
        } else {
            self.set_driver(None);
        }
        self.tick();
        self.save().await;
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
