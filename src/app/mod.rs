//! Wiring: build the snapshot, bind every listener (all or nothing), serve. One supervisor
//! task owns the running listeners and carries out what changes them, one thing at a time:
//! reloads (SIGHUP, `POST /admin/reload`) and the drain (`shutdown.rs`). Signals are handled
//! in `run` only, so tests can start rampart in-process without them.

mod releases;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::admin::control::{Command, Control, gone};
use crate::alert::{AlertMetrics, Alerting};
use crate::config::Config;
use crate::health::{Health, HealthInputs, HealthMetrics, PoolSources};
use crate::listener::{self, Server, prepare_tls};
use crate::observe::certs::CertExpiry;
use crate::observe::http::HttpMetrics;
use crate::observe::signals::Signals as FedSignals;
use crate::reload::{self, ReloadMetrics, ReloadReport};
use crate::route::Snapshot;
use crate::shutdown::{self, DrainReport, Signal, Signals};
use crate::upstream::resilience::{UpstreamMetrics, UpstreamStates};
use crate::workers::Workers;
use arc_swap::ArcSwap;
use state::{Parts, Shared};
use std::sync::atomic::AtomicBool;

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

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{signal}: exited at once, {requests} request(s) in flight cut")]
    Forced {
        signal: &'static str,
        requests: usize,
    },
}

/// How long background tasks get to stop at the end of a drain.
const BACKGROUND_STOP: Duration = Duration::from_secs(2);

/// A started proxy. Dropping it does not stop it; call `shutdown` or `drain`.
#[derive(Debug)]
pub struct Running {
    pub(crate) shared: Arc<Shared>,
    /// The admin listener's address at start (a reload may move it).
    pub admin_addr: SocketAddr,
    control: Control,
    addrs: Addrs,
    done: watch::Receiver<Option<DrainReport>>,
}

type Addrs = Arc<Mutex<Vec<(String, SocketAddr)>>>;

impl Running {
    /// The configuration being served (it follows reloads).
    pub fn config(&self) -> Arc<Config> {
        self.shared.snapshot.load().config.clone()
    }

    /// `/metrics` as the admin listener would answer it now.
    pub fn encode_metrics(&self) -> String {
        crate::observe::encode_registry(&self.shared.registry)
    }

    /// Where the TLS listeners record the certificates they serve (`/metrics`, the
    /// `certificate_expiry` alert rule).
    pub fn certs(&self) -> &CertExpiry {
        &self.shared.certs
    }

    /// Takes a sample of the request counters, as the sampler task does every few seconds.
    pub fn record_sample(&self) {
        self.shared.record_sample();
    }

    /// The bound address of a listener (useful with port 0); follows reloads.
    pub fn addr(&self, listener: &str) -> Option<SocketAddr> {
        crate::sync::lock(&self.addrs)
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
    }

    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Re-reads the configuration file, as SIGHUP does.
    pub async fn reload(&self) -> ReloadReport {
        self.control.reload().await
    }

    /// Applies an already validated configuration, as a reload would (for in-process use).
    pub async fn apply(&self, config: Config) -> ReloadReport {
        self.control.request_reload(Some(config)).await
    }

    /// The whole drain sequence, as SIGTERM starts it; returns when it is over.
    pub async fn drain(&self) -> DrainReport {
        self.control.drain_and_wait(false).await
    }

    /// Stops accepting now (no accept grace), lets connections finish (at most the drain
    /// timeout), and returns whether everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.control.drain_and_wait(true).await.finished
    }

    /// Waits until a drain, however started, is over.
    pub async fn drained(&self) -> DrainReport {
        let mut done = self.done.clone();
        wait_done(&mut done).await
    }
}

async fn wait_done(done: &mut watch::Receiver<Option<DrainReport>>) -> DrainReport {
    match done.wait_for(Option::is_some).await {
        Ok(r) => r.clone().unwrap_or_else(gone),
        // The supervisor is gone without a report: nothing is left running.
        Err(_) => gone(),
    }
}

/// Starts from a configuration with no file behind it: a reload can only `apply`.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with_file(config, None).await
}

/// Binds everything first so a port conflict refuses the start with nothing served. `path`
/// is the file SIGHUP and `POST /admin/reload` read again.
pub async fn start_with_file(config: Config, path: Option<PathBuf>) -> Result<Running, StartError> {
    start_on(config, path, Workers::current()).await
}

/// As [`start_with_file`], with the traffic listeners on `workers` (each listener gets a
/// socket and an accept loop per worker).
pub async fn start_on(
    config: Config,
    path: Option<PathBuf>,
    workers: Workers,
) -> Result<Running, StartError> {
    let mut registry = crate::observe::new_registry();
    // Subsystems register their metrics here, before the registry is frozen in `Shared`.
    let reload_metrics = ReloadMetrics::register(&mut registry);
    let upstream_states = Arc::new(UpstreamStates::new(UpstreamMetrics::register(
        &mut registry,
    )));
    let limiters = Arc::new(crate::admission::ratelimit::Registry::new(
        crate::admission::ratelimit::Metrics::register(&mut registry),
    ));
    let pools = Arc::new(PoolSources::new(limiters.clone()));
    let health_metrics = HealthMetrics::register(&mut registry, &pools);
    let http = HttpMetrics::register(&mut registry);
    let alert_metrics = AlertMetrics::register(&mut registry);
    let certs = CertExpiry::register(&mut registry);
    let caches = crate::cache::Registry::new(crate::cache::CacheMetrics::register(&mut registry));
    let release_metrics = crate::upstream::release::ReleaseMetrics::register(&mut registry);
    let signals = Arc::new(FedSignals::default());
    let fed = signals.clone();
    caches.on_lookup(move |hit| fed.cache_lookup(hit));
    let snapshot = Snapshot::build(&config, &upstream_states, &limiters, &caches, &http)
        .map_err(StartError::Tls)?;
    let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
    let draining = Arc::new(AtomicBool::new(false));
    let health = Health::new(
        health_metrics,
        pools,
        HealthInputs {
            snapshot: snapshot.clone(),
            draining: draining.clone(),
            upstream_states: upstream_states.clone(),
            signals: signals.clone(),
        },
    );
    let alerts = Alerting::new(&config.alerts, alert_metrics, signals.clone());
    let releases = Arc::new(crate::upstream::release::Releases::new(
        releases::release_groups(&upstream_states),
        release_metrics,
    ));
    let shared = Shared::new(Parts {
        releases,
        snapshot,
        registry,
        upstream_states,
        limiters,
        caches,
        draining,
        health,
        http,
        alerts,
        signals,
        certs,
    });
    let mut bound = Vec::new();
    for l in &config.listeners {
        let tls = prepare_tls(l).map_err(StartError::Tls)?;
        let listener = listener::bind_listener(l.listen, workers.count()).map_err(|source| {
            StartError::Bind {
                name: l.name.clone(),
                addr: l.listen,
                source,
            }
        })?;
        bound.push((l.clone(), tls, listener));
    }
    let admin = listener::bind(config.admin.listen).map_err(|source| StartError::Bind {
        name: "admin".into(),
        addr: config.admin.listen,
        source,
    })?;
    let admin_addr = admin.local_addr().unwrap_or(config.admin.listen);
    // Once everything is bound: a refused start leaves no probe running. A dependency that
    // is down does not stop the start; the checks report it.
    shared.health.start(&shared.background, &config);
    // Boxed: the future of `start_on` is deep enough already.
    Box::pin(releases::start(&shared, &config, &shared.background)).await;

    let (tx, rx) = mpsc::channel(16);
    let control = Control::new(tx);
    let servers: Vec<Arc<Server>> = bound
        .into_iter()
        .map(|(cfg, tls, listener)| {
            let s = Server::start(
                listener,
                cfg,
                tls,
                shared.traffic.clone(),
                &shared.certs,
                &workers,
            );
            tracing::info!(listener = &*s.name, addr = %s.addr, "listening");
            Arc::new(s)
        })
        .collect();
    tracing::info!(addr = %admin_addr, "admin listening");
    warn_if_open(&config.admin, admin_addr);
    let admin_stop = spawn_admin(admin, &shared, &control);
    spawn_sampler(&shared);
    shared
        .alerts
        .spawn(shared.alert_inputs(), &shared.background);
    let addrs: Addrs = Arc::new(Mutex::new(Vec::new()));
    let supervisor = Supervisor {
        shared: shared.clone(),
        path,
        config,
        servers,
        retiring: Vec::new(),
        admin_stop,
        admin_addr,
        addrs: addrs.clone(),
        metrics: reload_metrics,
        control: control.clone(),
        workers,
    };
    supervisor.publish_addrs();
    let (done_tx, done) = watch::channel(None);
    tokio::spawn(supervisor.run(rx, done_tx));
    Ok(Running {
        shared,
        admin_addr,
        control,
        addrs,
        done,
    })
}

/// Said at every start (and every reload that opens it): an admin listener anyone on the
/// network can drive is a decision someone must keep seeing.
fn warn_if_open(admin: &crate::config::AdminConfig, addr: SocketAddr) {
    if admin.token.is_none() && !crate::config::is_loopback(addr.ip()) {
        tracing::warn!(
            "admin listener on {addr} has no token (admin.insecure_no_token: true): anyone who \
             can reach it can drain, reload and read the configuration"
        );
    }
}

fn spawn_admin(
    listener: tokio::net::TcpListener,
    shared: &Arc<Shared>,
    control: &Control,
) -> watch::Sender<bool> {
    let (stop, stop_rx) = watch::channel(false);
    let ctx = Arc::new(shared.admin_ctx(control.clone()));
    tokio::spawn(crate::admin::serve(listener, ctx, stop_rx));
    stop
}

/// Records the request counters every few seconds for the alert rules and the status page
/// (as often as the rules are evaluated, when that is more often: a window must be able to
/// move past what it saw).
fn spawn_sampler(shared: &Arc<Shared>) {
    let s = shared.clone();
    shared
        .background
        .spawn("metrics-sampler", move |mut stop| async move {
            loop {
                s.record_sample();
                let every = crate::observe::series::SAMPLE_EVERY.min(s.alerts.interval());
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = crate::shutdown::stopped(&mut stop) => return,
                }
            }
        });
}

/// Runs until the drain that SIGTERM, SIGINT or `POST /admin/drain` starts is over. SIGHUP
/// reloads the file. During the drain, SIGTERM, SIGINT or SIGQUIT exits at once; SIGQUIT
/// before it, too.
pub async fn run(config: Config, path: Option<PathBuf>, workers: Workers) -> Result<(), RunError> {
    run_then(config, path, workers, |_| {}).await
}

/// As [`run`], calling `started` once every listener is bound (the demo prints its "Try:"
/// lines there, so none is printed for a start that fails).
pub async fn run_then(
    config: Config,
    path: Option<PathBuf>,
    workers: Workers,
    started: impl FnOnce(&Running),
) -> Result<(), RunError> {
    let mut signals = Signals::install().map_err(RunError::Signals)?;
    let running = start_on(config, path, workers).await?;
    started(&running);
    let mut done = running.done.clone();
    let mut draining = false;
    loop {
        let signal = tokio::select! {
            report = wait_done(&mut done) => {
                log_exit(&report);
                return Ok(());
            }
            s = signals.recv() => s,
        };
        let forced = || RunError::Forced {
            signal: signal.name(),
            requests: running.shared.in_flight.requests(),
        };
        match signal {
            Signal::Hangup if draining || running.shared.draining.load(Ordering::Relaxed) => {
                tracing::info!("SIGHUP ignored: draining");
            }
            Signal::Hangup => {
                tracing::info!("SIGHUP: reloading the configuration");
                running.reload().await;
            }
            Signal::Quit => {
                let e = forced();
                tracing::warn!("{e}");
                return Err(e);
            }
            Signal::Terminate | Signal::Interrupt if draining => {
                let e = forced();
                tracing::warn!("second signal: {e}");
                return Err(e);
            }
            Signal::Terminate | Signal::Interrupt => {
                draining = true;
                tracing::info!(signal = signal.name(), "shutdown signal received");
                // Joins a drain `POST /admin/drain` already started.
                running.control.start_drain().await;
            }
        }
    }
}

fn log_exit(report: &DrainReport) {
    if report.finished {
        tracing::info!("exiting");
    } else {
        tracing::warn!(
            requests_cut = report.requests_cut,
            streams_ended_with_final_event = report.streams_ended,
            "exiting after a drain that timed out"
        );
    }
}

/// Re-reads the certificates of every TLS listener in `servers` (off the runtime: it reads
/// files). Returns the listeners whose new files were refused, each with a line saying why.
async fn reload_certs(servers: Vec<Arc<Server>>) -> Vec<(Arc<str>, String)> {
    let reread = tokio::task::spawn_blocking(move || {
        servers
            .iter()
            .filter_map(|s| {
                s.reload_certs().err().map(|e| {
                    let line = format!(
                        "listener {}: TLS certificates not reloaded (still serving the previous ones): {e}",
                        s.name
                    );
                    (s.name.clone(), line)
                })
            })
            .collect()
    });
    match reread.await {
        Ok(refused) => refused,
        Err(e) => vec![(
            Arc::from(""),
            format!("reloading TLS certificates failed: {e}"),
        )],
    }
}

// === the supervisor ===

struct Supervisor {
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    config: Config,
    /// The current listeners, in configuration order.
    servers: Vec<Arc<Server>>,
    /// Listeners replaced by a reload that may still be draining.
    retiring: Vec<Arc<Server>>,
    admin_stop: watch::Sender<bool>,
    /// Where the admin listener is bound now.
    admin_addr: SocketAddr,
    addrs: Addrs,
    metrics: ReloadMetrics,
    /// Handed to a new admin listener when a reload moves it.
    control: Control,
    /// Where new listeners run.
    workers: Workers,
}

impl Supervisor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        done: watch::Sender<Option<DrainReport>>,
    ) {
        let (skip_grace, mut waiters) = loop {
            match rx.recv().await {
                Some(Command::Reload { config, reply }) => {
                    let report = self.reload(config.map(|c| *c)).await;
                    let _ = reply.send(report);
                }
                Some(Command::Drain { skip_grace, reply }) => {
                    break (skip_grace, reply.into_iter().collect::<Vec<_>>());
                }
                None => return,
            }
        };

        // Step 1: readiness fails before anything else changes.
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shared.http.set_draining(true);
        self.retiring.retain(|s| !s.is_finished());
        let servers = self.servers.iter().chain(&self.retiring).cloned().collect();
        let drain = shutdown::drain(
            servers,
            self.shared.in_flight.clone(),
            self.config.drain.clone(),
            skip_grace,
        );
        tokio::pin!(drain);
        let report = loop {
            tokio::select! {
                r = &mut drain => break r,
                Some(cmd) = rx.recv() => match cmd {
                    Command::Reload { reply, .. } => {
                        let r = ReloadReport::refused("a drain is in progress");
                        r.log();
                        let _ = reply.send(r);
                    }
                    Command::Drain { reply, .. } => waiters.extend(reply),
                },
            }
        };
        // Step 5: background tasks stop, then the pools close (Postgres, then Redis, as the
        // users' shutdown does), once no request can use them any more.
        self.shared.background.stop(BACKGROUND_STOP).await;
        // Redis's pool belongs to the rate limiter's client, dropped with the last snapshot.
        self.shared.health.close_pools().await;
        report.log();
        self.admin_stop.send_replace(true);
        for w in waiters {
            let _ = w.send(report.clone());
        }
        done.send_replace(Some(report));
    }

    async fn reload(&mut self, given: Option<Config>) -> ReloadReport {
        // The commit below undoes itself on a panic; this is for anything else that would
        // panic, so that a reload can never end the process.
        let report = match reload::catch_async(self.try_reload(given)).await {
            Ok(report) => report,
            Err(panic) => ReloadReport::error(vec![format!("reload failed: {panic}")]),
        };
        self.metrics.record(&report);
        report.log();
        report
    }

    async fn try_reload(&mut self, given: Option<Config>) -> ReloadReport {
        let config = match given {
            Some(c) => c,
            None => {
                let Some(path) = self.path.clone() else {
                    return ReloadReport::error(vec![
                        "no configuration file to reload: started from a configuration string"
                            .into(),
                    ]);
                };
                // Reading the file (and CA files it names) blocks.
                match tokio::task::spawn_blocking(move || Config::load(&path)).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        // The certificates are re-read all the same: a pair that cannot be
                        // served (the likely reason) is refused, said and counted per
                        // listener, and a good one is not held up by a mistake elsewhere.
                        reload_certs(self.servers.clone()).await;
                        return ReloadReport::invalid(&e);
                    }
                    Err(e) => return ReloadReport::error(vec![format!("reload failed: {e}")]),
                }
            }
        };
        let for_build = config.clone();
        let shared = self.shared.clone();
        // Building reads CA files and reconfigures the state kept by name (breakers, limiters)
        // for the names that remain.
        let snapshot = match tokio::task::spawn_blocking(move || {
            Snapshot::build(
                &for_build,
                &shared.upstream_states,
                &shared.limiters,
                &shared.caches,
                &shared.http,
            )
        })
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return ReloadReport::error(vec![format!("{}: TLS: {e}", config.source)]),
            // A panic in the build: the running configuration was not touched.
            Err(e) => {
                return ReloadReport::error(vec![format!(
                    "reload failed: building the new configuration: {e}"
                )]);
            }
        };

        // Bind every new or changed listener before anything changes: all or nothing.
        let mut fresh = Vec::new();
        for l in &config.listeners {
            if self
                .servers
                .iter()
                .any(|s| reload::same_server(&s.config, l))
            {
                continue;
            }
            let tls = match prepare_tls(l) {
                Ok(t) => t,
                Err(e) => {
                    return ReloadReport::error(vec![format!("listener {}: TLS: {e}", l.name)]);
                }
            };
            match listener::bind_listener(l.listen, self.workers.count()) {
                Ok(listener) => fresh.push((l.clone(), tls, listener)),
                Err(e) => {
                    return ReloadReport::error(vec![format!(
                        "cannot listen on {} (listener {}): {e}",
                        l.listen, l.name
                    )]);
                }
            }
        }
        let admin = if config.admin.listen == self.config.admin.listen {
            None
        } else {
            match listener::bind(config.admin.listen) {
                Ok(l) => Some(l),
                Err(e) => {
                    return ReloadReport::error(vec![format!(
                        "cannot listen on {} (admin): {e}",
                        config.admin.listen
                    )]);
                }
            }
        };

        // Commit. State kept by name follows first, so the new snapshot finds its names;
        // then the new listeners start. A panic in any of it is undone: the listeners just
        // started stop (dropped), the old snapshot and state come back, the reload fails.
        let old_snapshot = self.shared.snapshot.load_full();
        let shared = &self.shared;
        let workers = &self.workers;
        let started = reload::catch(|| {
            for state in shared.keyed_state() {
                state.reconcile(&config);
            }
            shared.snapshot.store(Arc::new(snapshot));
            fresh
                .into_iter()
                .map(|(cfg, tls, listener)| {
                    Server::start(
                        listener,
                        cfg,
                        tls,
                        shared.traffic.clone(),
                        &shared.certs,
                        workers,
                    )
                })
                .collect::<Vec<_>>()
        });
        let started = match started {
            Ok(s) => s,
            Err(panic) => {
                self.shared.snapshot.store(old_snapshot);
                let restored = reload::catch(|| {
                    for state in self.shared.keyed_state() {
                        state.reconcile(&self.config);
                    }
                });
                let mut errors = vec![format!("reload failed while applying it: {panic}")];
                if let Err(again) = restored {
                    errors.push(format!("restoring the previous state also failed: {again}"));
                }
                return ReloadReport::error(errors);
            }
        };
        let mut changes = vec![format!(
            "routes and upstreams replaced ({} listeners, {} upstreams)",
            config.listeners.len(),
            config.upstreams.len()
        )];
        let (kept, replaced): (Vec<_>, Vec<_>) = std::mem::take(&mut self.servers)
            .into_iter()
            .partition(|s| {
                config
                    .listeners
                    .iter()
                    .any(|l| reload::same_server(&s.config, l))
            });
        self.servers = kept;
        // A TLS listener kept as it was serves its certificate files as they are now (a
        // changed `tls` section is a changed listener, started anew above).
        let refused = reload_certs(self.servers.clone()).await;
        for s in &self.servers {
            if s.cert_store().is_some() && !refused.iter().any(|(name, _)| *name == s.name) {
                changes.push(format!("listener {}: TLS certificates reloaded", s.name));
            }
        }
        let mut warnings: Vec<String> = refused.into_iter().map(|(_, w)| w).collect();
        for s in started {
            let old = replaced.iter().find(|o| o.config.name == s.config.name);
            changes.push(match old {
                Some(old) if old.config.listen != s.config.listen => {
                    format!("listener {}: now on {} (was {})", s.name, s.addr, old.addr)
                }
                Some(_) => format!(
                    "listener {}: settings changed, bound anew on {}",
                    s.name, s.addr
                ),
                None => format!("listener {}: added on {}", s.name, s.addr),
            });
            tracing::info!(listener = &*s.name, addr = %s.addr, "listening");
            self.servers.push(Arc::new(s));
        }
        for old in replaced {
            if !config.listeners.iter().any(|l| l.name == old.config.name) {
                changes.push(format!("listener {}: removed", old.name));
            }
            changes.push(format!("listener {} on {}: draining", old.name, old.addr));
            tokio::spawn(shutdown::retire(old.clone(), config.drain.timeout));
            self.retiring.push(old);
        }
        self.retiring.retain(|s| !s.is_finished());
        // The expiry of certificates no listener serves any more is no longer shown.
        let serving: Vec<Arc<str>> = self
            .servers
            .iter()
            .filter(|s| s.cert_store().is_some())
            .map(|s| s.name.clone())
            .collect();
        self.shared
            .certs
            .retain(|l| serving.iter().any(|n| &**n == l));
        self.servers.sort_by_key(|s| {
            config
                .listeners
                .iter()
                .position(|l| l.name == s.config.name)
        });
        self.publish_addrs();

        if let Some(listener) = admin {
            let addr = listener.local_addr().unwrap_or(config.admin.listen);
            let stop = spawn_admin(listener, &self.shared, &self.control);
            // The old admin listener stops accepting; its open connections finish.
            std::mem::replace(&mut self.admin_stop, stop).send_replace(true);
            changes.push(format!("admin: now on {addr}"));
            self.admin_addr = addr;
            warn_if_open(&config.admin, addr);
        } else if self.config.admin.token.is_some() && config.admin.token.is_none() {
            warn_if_open(&config.admin, self.admin_addr);
        }
        warnings.extend(reload::restart_only_changes(&self.config, &config));
        self.config = config;
        ReloadReport::ok(changes, warnings)
    }

    fn publish_addrs(&self) {
        let addrs = self
            .servers
            .iter()
            .map(|s| (s.config.name.clone(), s.addr))
            .collect();
        *crate::sync::lock(&self.addrs) = addrs;
    }
}
