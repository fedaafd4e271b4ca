//! Health of what rampart depends on: Postgres, Redis, memory, and every upstream with a
//! `health_check`. Each check is a background task on its own interval and timeout, fed
//! through a consecutive success/failure [`counter`]; its latest result is cached in a slot
//! that `/health`, `/readyz` and the metrics read. A request never runs a probe, so no number
//! of probe calls reaches a dependency, and a slow check never delays another one.
//!
//! The checks follow the configuration: a reload keeps the slots (and so the verdicts) of
//! checks it keeps, restarts the tasks of checks whose settings changed, and drops the rest.
//! The tasks stop at the end of a drain (the `Background` tasks); the Postgres pool is closed
//! after them (`close_pools`).

pub(crate) mod aggregate;
pub(crate) mod counter;
pub(crate) mod memory;
pub(crate) mod postgres;
pub(crate) mod redis;
pub(crate) mod upstream;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admission::ratelimit;
use crate::config::{CheckConfig, Config, MemoryCheck, PostgresDependency, UpstreamConfig};
use crate::observe::signals::Signals;
use crate::reload::KeyedState;
use crate::route::Snapshot;
use crate::shutdown::Background;
use crate::upstream::resilience::UpstreamStates;
use counter::{Counter, Transition, Verdict};

/// Share of the interval by which each wait is jittered, so replicas (and the endpoints of
/// one upstream) do not probe in step.
const JITTER: f64 = 0.1;

// === what a check reports ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Healthy,
    /// Passing with a warning (memory or connections above their threshold), or a
    /// non-critical check failing (only in the aggregate).
    Degraded,
    Unhealthy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }

    /// The gauge value: 2 healthy, 1 degraded, 0 unhealthy.
    pub fn as_gauge(self) -> i64 {
        match self {
            Status::Healthy => 2,
            Status::Degraded => 1,
            Status::Unhealthy => 0,
        }
    }
}

/// A value in a check's JSON report.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    /// Written with one decimal.
    Num(f64),
    Bool(bool),
    Object(Vec<(String, Value)>),
}

/// What one probe found.
#[derive(Debug, Clone, Default)]
pub(crate) struct Probe {
    pub ok: bool,
    /// Passing but above a warning threshold: the check reads degraded.
    pub warning: Option<String>,
    pub error: Option<String>,
    /// No connection could be made, and at once (refused, most often; not a timeout):
    /// nothing reached the probed thing, so probing it again soon costs it nothing.
    pub refused: bool,
    /// Check-specific fields (role, connections_used_pct, ...).
    pub details: Vec<(&'static str, Value)>,
}

impl Probe {
    pub(crate) fn failed(error: impl Into<String>) -> Probe {
        Probe {
            ok: false,
            error: Some(error.into()),
            ..Probe::default()
        }
    }
}

/// The cached state of one probed thing: what `/health` shows.
#[derive(Debug, Clone)]
pub struct View {
    pub verdict: Verdict,
    pub status: Status,
    pub latency: Option<Duration>,
    /// Why the last probe failed (shown while it keeps failing), or the warning.
    pub error: Option<String>,
    pub details: Vec<(&'static str, Value)>,
    pub checked_at: Option<Instant>,
    /// Consecutive failed probes.
    pub failures: u32,
}

impl View {
    fn pending() -> View {
        View {
            verdict: Verdict::Unknown,
            status: Status::Unhealthy,
            latency: None,
            error: Some("not checked yet".into()),
            details: Vec::new(),
            checked_at: None,
            failures: 0,
        }
    }
}

pub(crate) type Slot = Arc<ArcSwap<View>>;

fn new_slot() -> Slot {
    Arc::new(ArcSwap::from_pointee(View::pending()))
}

/// One named check (`postgres`, `redis`, `memory`, `upstream:<name>`) and its cached
/// results: one slot, or one per endpoint for an upstream.
pub struct Check {
    pub name: String,
    pub critical: bool,
    pub slots: Vec<(String, Slot)>,
}

impl Check {
    /// The check's own status: an upstream is healthy when every endpoint is, degraded
    /// when some are, unhealthy when none is.
    pub fn status(&self) -> Status {
        let statuses: Vec<Status> = self.slots.iter().map(|(_, s)| s.load().status).collect();
        aggregate::combine_endpoints(&statuses)
    }
}

// === metrics ===

type CheckLabels = Vec<(&'static str, String)>;

#[derive(Clone)]
pub struct HealthMetrics {
    status: Family<CheckLabels, Gauge>,
    overall: Gauge,
    latency: Family<CheckLabels, Histogram, fn() -> Histogram>,
    transitions: Family<CheckLabels, prometheus_client::metrics::counter::Counter>,
}

impl HealthMetrics {
    /// `rampart_health_*`, and the pool gauges (`rampart_pool_*`) read at scrape time.
    pub fn register(registry: &mut Registry, pools: &Arc<PoolSources>) -> HealthMetrics {
        fn latency_histogram() -> Histogram {
            Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ])
        }
        let m = HealthMetrics {
            status: Family::default(),
            overall: Gauge::default(),
            latency: Family::new_with_constructor(latency_histogram),
            transitions: Family::default(),
        };
        let reg = registry.sub_registry_with_prefix("health");
        reg.register(
            "check_status",
            "Status of each check: 2 healthy, 1 degraded, 0 unhealthy",
            m.status.clone(),
        );
        reg.register(
            "status",
            "Aggregate status as /health reports it: 2 healthy, 1 degraded, 0 unhealthy",
            m.overall.clone(),
        );
        reg.register(
            "check_duration_seconds",
            "Duration of each probe, timeouts included",
            m.latency.clone(),
        );
        // No `_total` suffix: the encoder adds it to counters.
        reg.register(
            "check_transitions",
            "Verdict changes of each check, by the verdict entered (up|down)",
            m.transitions.clone(),
        );
        registry.register_collector(Box::new(postgres::PoolCollector(pools.clone())));
        m
    }

    fn labels(check: &str) -> CheckLabels {
        vec![("check", check.to_owned())]
    }
}

// === the registry of checks ===

/// Where the pool gauges come from at scrape time: the health-check Postgres pool, and the
/// program's Redis client (owned by the rate limiter registry).
pub struct PoolSources {
    postgres: Mutex<Option<Arc<postgres::PgPool>>>,
    limiters: Arc<ratelimit::Registry>,
}

impl std::fmt::Debug for PoolSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolSources")
    }
}

impl PoolSources {
    fn postgres(&self) -> Option<Arc<postgres::PgPool>> {
        crate::sync::lock(&self.postgres).clone()
    }

    pub fn new(limiters: Arc<ratelimit::Registry>) -> Self {
        PoolSources {
            postgres: Mutex::new(None),
            limiters,
        }
    }

    fn redis(&self) -> Option<Arc<crate::admission::ratelimit::fallback::RedisStore>> {
        self.limiters.redis_client()
    }
}

/// What started a check; a reload restarts it when this changes.
#[derive(Clone, PartialEq)]
enum Spec {
    Postgres(PostgresDependency),
    Redis(CheckConfig),
    Memory(MemoryCheck),
    Upstream(Box<UpstreamConfig>),
}

struct Running {
    check: Arc<Check>,
    spec: Spec,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

pub struct Health {
    started: Instant,
    metrics: HealthMetrics,
    pools: Arc<PoolSources>,
    /// What `/health` reads: a list swapped whole, so a request never waits on a lock.
    checks: ArcSwap<Vec<Arc<Check>>>,
    running: Mutex<BTreeMap<String, Running>>,
    /// Set once the drain has stopped the checks: a late reload starts nothing.
    stopped: std::sync::atomic::AtomicBool,
    inputs: HealthInputs,
    /// Handed to the check tasks, which must not keep `Health` alive.
    me: Weak<Health>,
}

/// What the checks and the probe endpoints read of the process-wide state: a narrow
/// handle `app` builds.
pub struct HealthInputs {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Set when a drain starts: `/readyz` answers 503.
    pub draining: Arc<AtomicBool>,
    pub upstream_states: Arc<UpstreamStates>,
    /// The alert signals: each Postgres probe counts as a database query there
    /// (`db_error_rate`).
    pub signals: Arc<Signals>,
}

impl Health {
    pub fn new(
        metrics: HealthMetrics,
        pools: Arc<PoolSources>,
        inputs: HealthInputs,
    ) -> Arc<Health> {
        Arc::new_cyclic(|me| Health {
            started: Instant::now(),
            metrics,
            pools,
            checks: ArcSwap::from_pointee(Vec::new()),
            running: Mutex::new(BTreeMap::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
            inputs,
            me: me.clone(),
        })
    }

    /// Starts the checks of `config` and registers their stop with the drain.
    pub fn start(self: &Arc<Self>, background: &Background, config: &Config) {
        self.apply(config);
        let health = self.clone();
        background.spawn("health checks", move |mut stop| async move {
            crate::shutdown::stopped(&mut stop).await;
            health.stop_all(Duration::from_secs(1)).await;
        });
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The checks as they are now, in name order.
    pub fn checks(&self) -> Arc<Vec<Arc<Check>>> {
        self.checks.load_full()
    }

    /// Sets the aggregate gauge; called by `/health` and after every probe.
    fn publish_overall(&self) {
        let summary = aggregate::summarize(&self.checks());
        self.metrics.overall.set(summary.status.as_gauge());
    }

    /// Starts, restarts and stops checks to match `config`; results of checks kept (by
    /// name) are kept.
    fn apply(&self, config: &Config) {
        if self.stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut wanted: BTreeMap<String, (Spec, CheckConfig, Vec<String>)> = BTreeMap::new();
        let deps = &config.dependencies;
        if let Some(pg) = &deps.postgres {
            wanted.insert(
                "postgres".into(),
                (
                    Spec::Postgres(pg.clone()),
                    pg.check.clone(),
                    vec![String::new()],
                ),
            );
        }
        if let Some(c) = &deps.redis
            && config.redis.is_some()
        {
            wanted.insert(
                "redis".into(),
                (Spec::Redis(c.clone()), c.clone(), vec![String::new()]),
            );
        }
        if let Some(m) = &deps.memory {
            wanted.insert(
                "memory".into(),
                (
                    Spec::Memory(m.clone()),
                    m.check.clone(),
                    vec![String::new()],
                ),
            );
        }
        for u in config.upstreams.values() {
            if let Some(hc) = &u.resilience.health_check {
                let urls = u.endpoints.iter().map(|e| e.to_string()).collect();
                wanted.insert(
                    format!("upstream:{}", u.name),
                    (Spec::Upstream(Box::new(u.clone())), hc.check.clone(), urls),
                );
            }
        }

        let mut running = crate::sync::lock(&self.running);
        // Stop what is gone or changed; keep the slots of what changed.
        let mut kept_slots: BTreeMap<String, Vec<(String, Slot)>> = BTreeMap::new();
        let names: Vec<String> = running.keys().cloned().collect();
        for name in names {
            let same = wanted
                .get(&name)
                .is_some_and(|(spec, _, _)| running.get(&name).is_some_and(|r| &r.spec == spec));
            if same {
                continue;
            }
            if let Some(r) = running.remove(&name) {
                r.stop.send_replace(true);
                // Their tasks see the flag at their next wait; a probe in flight is cut.
                for t in &r.tasks {
                    t.abort();
                }
                if let Spec::Upstream(u) = &r.spec {
                    let still_checked = wanted.contains_key(&name);
                    upstream::forget(&self.inputs.upstream_states, u, still_checked);
                }
                if !wanted.contains_key(&name) {
                    self.metrics.status.remove(&HealthMetrics::labels(&name));
                }
                kept_slots.insert(name, r.check.slots.clone());
            }
        }
        if !wanted.contains_key("postgres") {
            *crate::sync::lock(&self.pools.postgres) = None;
        }
        for (name, (spec, cfg, keys)) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let old = kept_slots.remove(&name).unwrap_or_default();
            let slots: Vec<(String, Slot)> = keys
                .into_iter()
                .map(|k| {
                    let slot = old
                        .iter()
                        .find(|(key, _)| *key == k)
                        .map(|(_, s)| s.clone())
                        .unwrap_or_else(new_slot);
                    (k, slot)
                })
                .collect();
            let check = Arc::new(Check {
                name: name.clone(),
                critical: cfg.critical,
                slots,
            });
            let (stop, stop_rx) = watch::channel(false);
            let tasks = self.spawn_check(&check, &spec, &cfg, &stop_rx);
            running.insert(
                name,
                Running {
                    check,
                    spec,
                    stop,
                    tasks,
                },
            );
        }
        let list: Vec<Arc<Check>> = running.values().map(|r| r.check.clone()).collect();
        self.checks.store(Arc::new(list));
        drop(running);
        self.publish_overall();
    }

    fn spawn_check(
        &self,
        check: &Arc<Check>,
        spec: &Spec,
        cfg: &CheckConfig,
        stop: &watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let ctx = |slot: &Slot| Runner {
            name: check.name.clone(),
            cfg: cfg.clone(),
            slot: slot.clone(),
            stop: stop.clone(),
            metrics: self.metrics.clone(),
            health: self.me.clone(),
        };
        let Some((_, first)) = check.slots.first() else {
            return Vec::new();
        };
        match spec {
            Spec::Postgres(pg) => {
                let (pg, pools, first) = (pg.clone(), self.pools.clone(), first.clone());
                let runner = ctx(&first);
                vec![tokio::spawn(async move {
                    // Building the pool may read the trust store (TLS): off the runtime.
                    let built = tokio::task::spawn_blocking({
                        let pg = pg.clone();
                        move || postgres::PgPool::new(&pg)
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                    let pool = match built {
                        Ok(p) => Arc::new(p),
                        Err(e) => {
                            // Validation accepted the URL, so this is unexpected: show it.
                            first.store(Arc::new(View {
                                error: Some(e),
                                ..View::pending()
                            }));
                            return;
                        }
                    };
                    *crate::sync::lock(&pools.postgres) = Some(pool.clone());
                    let warn = pg.warn_connections_above;
                    runner
                        .run(
                            move || {
                                let pool = pool.clone();
                                async move { pool.probe(warn).await }
                            },
                            |_| {},
                        )
                        .await;
                })]
            }
            Spec::Redis(_) => {
                let pools = self.pools.clone();
                let timeout = cfg.timeout;
                vec![tokio::spawn(ctx(first).run(
                    move || {
                        let store = pools.redis();
                        async move {
                            match store {
                                Some(s) => redis::probe(&s.redis, timeout).await,
                                None => Probe::failed("no Redis client configured"),
                            }
                        }
                    },
                    |_| {},
                ))]
            }
            Spec::Memory(m) => {
                let warn = m.warn_above;
                vec![tokio::spawn(
                    ctx(first).run(move || async move { memory::probe(warn) }, |_| {}),
                )]
            }
            Spec::Upstream(u) => {
                upstream::spawn(&self.inputs.upstream_states, u, &check.slots, ctx)
            }
        }
    }

    /// Stops every check and waits for them at most `wait`.
    async fn stop_all(&self, wait: Duration) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let all: Vec<Running> = {
            let mut running = crate::sync::lock(&self.running);
            std::mem::take(&mut *running).into_values().collect()
        };
        let deadline = Instant::now() + wait;
        for r in all {
            r.stop.send_replace(true);
            for mut t in r.tasks {
                if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                    t.abort();
                }
            }
        }
    }

    /// Closes the Postgres pool (after the checks stopped): its idle connections end, and
    /// their sessions with them.
    pub async fn close_pools(&self) {
        let pool = crate::sync::lock(&self.pools.postgres).take();
        if let Some(pool) = pool {
            pool.close().await;
        }
    }
}

impl KeyedState for Health {
    fn reconcile(&self, config: &Config) {
        self.apply(config);
    }
}

// === the probe loop ===

/// Runs one probed thing: probe, count, publish, wait; until stopped.
pub(crate) struct Runner {
    pub name: String,
    pub cfg: CheckConfig,
    pub slot: Slot,
    pub stop: watch::Receiver<bool>,
    pub metrics: HealthMetrics,
    pub health: Weak<Health>,
}

/// What the owner of a check adds to the probe loop (upstream checks use it; a dependency
/// check runs with `()`).
pub(crate) trait Hooks {
    /// After every probe: whether it passed, and the verdict change it made, if any.
    fn probed(&mut self, _ok: bool, _change: Option<Transition>) {}
    /// Something outside the check wants it at `unhealthy_interval` (an open breaker or
    /// ejection of the upstream), and at `fast_interval` after a refused connect or a pass
    /// that does not yet make `healthy_after` in a row.
    fn needs_attention(&self) -> bool {
        false
    }
    /// Changes when `needs_attention` may have turned true: the wait is cut short.
    fn attention(&mut self) -> Option<&mut watch::Receiver<u64>> {
        None
    }
}

impl Hooks for () {}

/// `run`'s verdict-change callback as hooks.
struct OnChange<F>(F);

impl<F: FnMut(Transition)> Hooks for OnChange<F> {
    fn probed(&mut self, _ok: bool, change: Option<Transition>) {
        if let Some(t) = change {
            (self.0)(t);
        }
    }
}

impl Runner {
    /// `probe` makes one probe; the runner bounds it by the check's timeout. `on_change` is
    /// called on every verdict change.
    pub(crate) async fn run<P, Fut>(self, probe: P, on_change: impl FnMut(Transition))
    where
        P: FnMut() -> Fut,
        Fut: Future<Output = Probe>,
    {
        self.run_with(probe, OnChange(on_change)).await
    }

    /// As `run`, with `hooks` told of every probe and able to ask for the faster interval.
    pub(crate) async fn run_with<P, Fut>(mut self, mut probe: P, mut hooks: impl Hooks)
    where
        P: FnMut() -> Fut,
        Fut: Future<Output = Probe>,
    {
        // A restarted check (reload) goes on from the verdict it had.
        let previous = self.slot.load().verdict;
        let mut counter = Counter::new(previous, self.cfg.unhealthy_after, self.cfg.healthy_after);
        let labels = HealthMetrics::labels(&self.name);
        // Passes in a row since the last failure or the last opening of a breaker or
        // ejection (each counts passes afresh from its opening, as `Breaker::health_passed`).
        let mut streak: u32 = 0;
        loop {
            if *self.stop.borrow() {
                return;
            }
            let started = Instant::now();
            let result = match tokio::time::timeout(self.cfg.timeout, probe()).await {
                Ok(p) => p,
                Err(_) => Probe::failed(format!(
                    "no answer within {}",
                    humantime::format_duration(self.cfg.timeout)
                )),
            };
            let latency = started.elapsed();
            self.metrics
                .latency
                .get_or_create(&labels)
                .observe(latency.as_secs_f64());
            let (ok, refused) = (result.ok, result.refused);
            if hooks
                .attention()
                .is_some_and(|rx| rx.has_changed().unwrap_or(false))
            {
                streak = 0;
            }
            streak = if ok { streak.saturating_add(1) } else { 0 };
            let transition = counter.record(ok);
            if self.name == "postgres"
                && let Some(s) = self.health.upgrade().map(|h| h.inputs.signals.clone())
            {
                s.db_query(result.ok);
            }
            let view = view_of(&counter, result, latency, started);
            if let Some(t) = transition {
                self.log_transition(t, &view);
                let to = match t {
                    Transition::Up => "up",
                    Transition::Down => "down",
                };
                let mut l = labels.clone();
                l.push(("to", to.to_owned()));
                self.metrics.transitions.get_or_create(&l).inc();
            }
            hooks.probed(ok, transition);
            self.slot.store(Arc::new(view));
            if let Some(h) = self.health.upgrade() {
                let check = h.checks().iter().find(|c| c.name == self.name).cloned();
                if let Some(c) = check {
                    self.metrics
                        .status
                        .get_or_create(&labels)
                        .set(c.status().as_gauge());
                }
                h.publish_overall();
            }
            // Envoy's unhealthy_interval: a failing check (or an upstream with an open
            // breaker or ejection) is probed often, so its recovery is seen within about a
            // second; never slower than `interval`.
            let unhealthy = self.cfg.unhealthy_interval.min(self.cfg.interval);
            // What happened before this point is seen by `needs_attention` below.
            if let Some(rx) = hooks.attention() {
                rx.borrow_and_update();
            }
            let wait = next_wait(
                &self.cfg,
                After {
                    ok,
                    refused,
                    streak,
                    down: counter.verdict() == Verdict::Down,
                    attention: hooks.needs_attention(),
                    failures: counter.failures(),
                },
            );
            let mut until = started + crate::jitter::spread(wait, JITTER);
            if wait > unhealthy
                && let Some(rx) = hooks.attention()
            {
                // A breaker that opens (or an endpoint ejected) during the long wait cuts
                // it short: health-informed recovery must not wait out `interval` first.
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => continue,
                    _ = crate::shutdown::stopped(&mut self.stop) => return,
                    changed = rx.changed() => {
                        if changed.is_ok() {
                            until = started + crate::jitter::spread(unhealthy, JITTER);
                            streak = 0;
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = crate::shutdown::stopped(&mut self.stop) => return,
            }
        }
    }

    fn log_transition(&self, t: Transition, view: &View) {
        // The endpoint for upstream checks; a dependency is its check's name.
        let key = self.slot_key();
        let what = if key.is_empty() {
            self.name.clone()
        } else {
            format!("{} {key}", self.name)
        };
        match t {
            Transition::Down => tracing::warn!(
                check = %what,
                critical = self.cfg.critical,
                error = view.error.as_deref().unwrap_or(""),
                "health check DOWN"
            ),
            Transition::Up => tracing::info!(check = %what, "health check UP"),
        }
    }

    /// The endpoint URL for upstream checks; empty otherwise.
    fn slot_key(&self) -> String {
        self.health
            .upgrade()
            .and_then(|h| {
                h.checks()
                    .iter()
                    .find(|c| c.name == self.name)
                    .and_then(|c| {
                        c.slots
                            .iter()
                            .find(|(_, s)| Arc::ptr_eq(s, &self.slot))
                            .map(|(k, _)| k.clone())
                    })
            })
            .unwrap_or_default()
    }
}

/// What the wait after a probe depends on.
#[derive(Debug, Clone, Copy)]
struct After {
    ok: bool,
    /// The probe's connect was refused.
    refused: bool,
    /// Passes in a row, this one included.
    streak: u32,
    /// The check's verdict is DOWN.
    down: bool,
    /// A breaker or ejection of the upstream is open (`Hooks::needs_attention`).
    attention: bool,
    /// Failures in a row, this one included (0 after a pass).
    failures: u32,
}

/// The wait until the next probe: `interval` while all is well, Envoy's
/// `unhealthy_interval` while the check is down or something of the upstream is open, and
/// HAProxy's `fastinter` where the next probe settles something:
/// - after a pass short of `healthy_after` in a row (the next pass may end the outage:
///   verdict, breaker, ejection), so the passes that confirm a recovery take ~0.5 s;
/// - after a refused connect while a breaker or ejection is open: known down, watched for
///   its return, and a refused connect costs it nothing. Not with nothing open: the only
///   endpoint restarting in 0.4 s must not meet three quick probes and be marked down.
///   Nor when the next failure would mark a check that is still UP down: a breaker of
///   another route (chat, with the LLM down) must not turn a 0.5 s restart of the backend
///   into a DOWN verdict (and, with `critical`, an unready fleet) that slow probes would
///   never have seen.
fn next_wait(cfg: &CheckConfig, a: After) -> Duration {
    let unhealthy = cfg.unhealthy_interval.min(cfg.interval);
    let fast = cfg.fast_interval.min(unhealthy);
    let confirming = a.ok && a.streak < cfg.healthy_after && (a.down || a.attention);
    let marks_down = !a.down && a.failures.saturating_add(1) >= cfg.unhealthy_after;
    let returning = !a.ok && a.refused && a.attention && !marks_down;
    if confirming || returning {
        fast
    } else if a.down || a.attention {
        unhealthy
    } else {
        cfg.interval
    }
}

/// The slot's new content after one probe.
fn view_of(counter: &Counter, probe: Probe, latency: Duration, at: Instant) -> View {
    let verdict = counter.verdict();
    let status = match verdict {
        Verdict::Up if probe.ok && probe.warning.is_some() => Status::Degraded,
        Verdict::Up => Status::Healthy,
        Verdict::Down | Verdict::Unknown => Status::Unhealthy,
    };
    View {
        verdict,
        status,
        latency: Some(latency),
        error: if probe.ok { probe.warning } else { probe.error },
        details: probe.details,
        checked_at: Some(at),
        failures: counter.failures(),
    }
}

/// An error and its causes, each once ("error connecting to server: Connection refused").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

pub(crate) mod respond;
pub(crate) use respond::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg() -> CheckConfig {
        CheckConfig {
            interval: ms(5000),
            unhealthy_interval: ms(1000),
            fast_interval: ms(250),
            timeout: ms(2000),
            critical: false,
            unhealthy_after: 3,
            healthy_after: 2,
        }
    }

    fn after(ok: bool, refused: bool, streak: u32, down: bool, attention: bool) -> After {
        After {
            ok,
            refused,
            streak,
            down,
            attention,
            failures: u32::from(!ok),
        }
    }

    #[test]
    fn fast_only_where_the_next_probe_settles_something() {
        let c = cfg();
        // All well: interval; a failure that is not yet DOWN (nothing open) too.
        assert_eq!(next_wait(&c, after(true, false, 9, false, false)), ms(5000));
        assert_eq!(next_wait(&c, after(false, true, 0, false, false)), ms(5000));
        // DOWN, refused, nothing open: unhealthy_interval, never fast.
        assert_eq!(next_wait(&c, after(false, true, 0, true, false)), ms(1000));
        // The first pass of a DOWN check: the confirming one comes fast, then UP: interval.
        assert_eq!(next_wait(&c, after(true, false, 1, true, false)), ms(250));
        assert_eq!(next_wait(&c, after(true, false, 2, false, false)), ms(5000));
        // A breaker open: refused probes fast, other failures at unhealthy_interval.
        assert_eq!(next_wait(&c, after(false, true, 0, true, true)), ms(250));
        assert_eq!(next_wait(&c, after(false, false, 0, true, true)), ms(1000));
        // Still UP with a breaker open (another route's): refused probes fast, except the
        // one that would mark it DOWN (unhealthy_after 3), which comes at unhealthy_interval.
        assert_eq!(next_wait(&c, after(false, true, 0, false, true)), ms(250));
        let second = After {
            failures: 2,
            ..after(false, true, 0, false, true)
        };
        assert_eq!(next_wait(&c, second), ms(1000));
        // Passes while it is open: fast until healthy_after in a row, then unhealthy_interval.
        assert_eq!(next_wait(&c, after(true, false, 1, false, true)), ms(250));
        assert_eq!(next_wait(&c, after(true, false, 2, false, true)), ms(1000));
        // healthy_after: 1 needs no confirming pass.
        let one = CheckConfig {
            healthy_after: 1,
            ..cfg()
        };
        assert_eq!(
            next_wait(&one, after(true, false, 1, false, true)),
            ms(1000)
        );
    }

    #[test]
    fn fast_interval_is_never_above_unhealthy_interval_nor_interval() {
        let c = CheckConfig {
            interval: ms(100),
            unhealthy_interval: ms(1000),
            fast_interval: ms(250),
            ..cfg()
        };
        assert_eq!(next_wait(&c, after(false, true, 0, true, true)), ms(100));
        let c = CheckConfig {
            unhealthy_interval: ms(50),
            ..cfg()
        };
        assert_eq!(next_wait(&c, after(true, false, 1, true, false)), ms(50));
    }
}
