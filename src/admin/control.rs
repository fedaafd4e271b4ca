//! The channel through which the admin endpoints (and signals, and tests) ask the supervisor
//! in `app` for reloads and drains.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::reload::ReloadReport;
use crate::shutdown::DrainReport;

/// Asks the supervisor for reloads and drains (admin endpoints, signals, tests).
#[derive(Clone, Debug)]
pub struct Control {
    tx: mpsc::Sender<Command>,
}

impl Control {
    pub(crate) fn new(tx: mpsc::Sender<Command>) -> Self {
        Control { tx }
    }
}

/// What the supervisor in `app` is asked to do.
pub(crate) enum Command {
    Reload {
        /// None: read the file again.
        config: Option<Box<Config>>,
        reply: oneshot::Sender<ReloadReport>,
    },
    Drain {
        skip_grace: bool,
        reply: Option<oneshot::Sender<DrainReport>>,
    },
}

impl Control {
    pub async fn reload(&self) -> ReloadReport {
        self.request_reload(None).await
    }

    pub(crate) async fn request_reload(&self, config: Option<Config>) -> ReloadReport {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Reload {
                config: config.map(Box::new),
                reply,
            })
            .await
            .is_err()
        {
            return ReloadReport::refused("rampart has shut down");
        }
        rx.await
            .unwrap_or_else(|_| ReloadReport::refused("rampart has shut down"))
    }

    /// Starts the drain unless one is running; returns at once.
    pub async fn start_drain(&self) {
        let _ = self
            .tx
            .send(Command::Drain {
                skip_grace: false,
                reply: None,
            })
            .await;
    }

    pub(crate) async fn drain_and_wait(&self, skip_grace: bool) -> DrainReport {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Drain {
            skip_grace,
            reply: Some(reply),
        };
        if self.tx.send(cmd).await.is_err() {
            return gone();
        }
        rx.await.unwrap_or_else(|_| gone())
    }
}

/// The report when the supervisor is gone without one: nothing is left running.
pub(crate) fn gone() -> DrainReport {
    DrainReport {
        finished: false,
        elapsed: Duration::ZERO,
        requests_cut: 0,
        streams_ended: 0,
    }
}
