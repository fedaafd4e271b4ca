//! Wiring: build the snapshot, bind every listener (all or nothing), serve, and shut down
//! in order on a signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::proxy::resilience::{UpstreamMetrics, UpstreamStates};
use crate::proxy::{ListenerCtx, Shared, Snapshot};
use crate::server;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (listener {name}): {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

/// Connections still open this long after shutdown starts are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A started proxy. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub shared: Arc<Shared>,
    listeners: Vec<(String, SocketAddr)>,
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: JoinSet<bool>,
}

impl Running {
    /// The bound address of a listener (useful with port 0).
    pub fn addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
    }

    /// Stops accepting, lets connections finish (at most the drain timeout), and returns
    /// whether everything finished in time.
    pub async fn shutdown(mut self) -> bool {
        self.shared.draining.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let mut clean = true;
        while let Some(r) = self.tasks.join_next().await {
            clean &= r.unwrap_or(false);
        }
        clean
    }
}

/// Binds everything first so a port conflict refuses the start with nothing served.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let mut registry = crate::metrics::new_registry();
    // Subsystems register their metrics here, before the registry is frozen in `Shared`.
    let upstream_states = Arc::new(UpstreamStates::new(UpstreamMetrics::register(
        &mut registry,
    )));
    let limiters =
        crate::ratelimit::Registry::new(crate::ratelimit::Metrics::register(&mut registry));
    let snapshot =
        Snapshot::build(&config, &upstream_states, &limiters).map_err(StartError::Tls)?;
    let shared = Shared::new(snapshot, registry, upstream_states, limiters);
    let mut bound = Vec::new();
    for l in &config.listeners {
        let listener = server::bind(l.listen).map_err(|source| StartError::Bind {
            name: l.name.clone(),
            addr: l.listen,
            source,
        })?;
        bound.push((l.clone(), listener));
    }
    let admin = server::bind(config.admin.listen).map_err(|source| StartError::Bind {
        name: "admin".into(),
        addr: config.admin.listen,
        source,
    })?;
    let admin_addr = admin.local_addr().unwrap_or(config.admin.listen);

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut listeners = Vec::new();
    for (cfg, listener) in bound {
        let addr = listener.local_addr().unwrap_or(cfg.listen);
        tracing::info!(listener = %cfg.name, %addr, "listening");
        listeners.push((cfg.name.clone(), addr));
        let ctx = Arc::new(ListenerCtx {
            name: Arc::from(cfg.name.as_str()),
            shared: shared.clone(),
            proto: "http",
            in_flight: Arc::default(),
        });
        let stop_rx = stop_rx.clone();
        tasks
            .spawn(async move { server::serve(listener, ctx, &cfg, stop_rx, DRAIN_TIMEOUT).await });
    }
    tracing::info!(addr = %admin_addr, "admin listening");
    let admin_shared = shared.clone();
    let admin_stop = stop_rx.clone();
    tasks.spawn(async move {
        crate::admin::serve(admin, admin_shared, admin_stop).await;
        true
    });
    Ok(Running {
        shared,
        listeners,
        admin_addr,
        stop,
        tasks,
    })
}

/// Runs until SIGTERM or SIGINT, then shuts down. A second signal exits at once.
pub async fn run(config: Config) -> Result<(), StartError> {
    let running = start(config).await?;
    wait_for_signal().await;
    tracing::info!("shutdown signal received, draining");
    let shutdown = running.shutdown();
    tokio::select! {
        clean = shutdown => {
            if clean {
                tracing::info!("drained, exiting");
            } else {
                tracing::warn!("drain timed out, remaining connections cut");
            }
        }
        _ = wait_for_signal() => tracing::warn!("second signal, exiting at once"),
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
