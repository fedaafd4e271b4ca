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

mod probe;
mod report;

pub(crate) use probe::{Hooks, Runner};
pub(crate) use report::*;

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

// === metrics ===

type CheckLabels = Vec<(&'static str, String)>;

#[derive(Clone, Debug)]
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

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("started", &self.started)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

/// What the checks and the probe endpoints read of the process-wide state: a narrow
/// handle `app` builds.
#[derive(Debug)]
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
