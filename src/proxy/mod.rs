//! The request path: a `Snapshot` built from one config, and the pipeline that walks a
//! request through it.

pub mod access_log;
pub mod body;
pub mod client;
pub mod forward;
pub mod headers;
pub mod pipeline;
pub mod pool;
pub mod resilience;
pub mod route;
pub mod tail;
mod upgrade;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::{Cidr, Config};
use crate::health::Health;
use crate::metrics::http::{HttpMetrics, RouteMetrics};
use crate::metrics::series::{Sample, Series};
use crate::ratelimit;
use crate::reload::KeyedState;
use crate::shutdown::{Background, InFlight};
use forward::Upstream;
use resilience::UpstreamStates;
use route::Route;

/// Everything the request path reads from one configuration, immutable. A reload builds a
/// new one and swaps it in; requests in flight finish on the one they started with.
pub struct Snapshot {
    pub listeners: HashMap<String, ListenerRoutes>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub trusted_proxies: Vec<Cidr>,
    pub access_log: bool,
    /// The configuration this snapshot was built from (`/admin/config`).
    pub config: Arc<Config>,
}

impl Snapshot {
    /// Fails only on TLS material that cannot be loaded (a CA file named in the config) or
    /// a Redis client that cannot be made. State that must outlive a snapshot comes from
    /// `states` (breakers, budgets, endpoint health) and `limiters` (rate-limit counts), so
    /// names that existed in the previous snapshot keep theirs.
    pub fn build(
        cfg: &Config,
        states: &UpstreamStates,
        limiters: &ratelimit::Registry,
        metrics: &HttpMetrics,
    ) -> Result<Snapshot, String> {
        let policies = limiters.update(cfg)?;
        // TLS settings per distinct CA file: loading the system store is not free.
        let mut tls_by_ca = HashMap::new();
        let mut upstreams = HashMap::new();
        for (name, u) in &cfg.upstreams {
            if !tls_by_ca.contains_key(&u.tls_ca_file) {
                let tls = forward::tls_config(u.tls_ca_file.as_deref())?;
                tls_by_ca.insert(u.tls_ca_file.clone(), tls);
            }
            let Some(tls) = tls_by_ca.get(&u.tls_ca_file) else {
                continue;
            };
            let errors = metrics.upstream_errors(name);
            upstreams.insert(
                name.clone(),
                Arc::new(Upstream::new(u, tls, states, errors)?),
            );
        }
        let mut listeners = HashMap::new();
        for l in &cfg.listeners {
            let routes = l
                .routes
                .iter()
                // Validation guarantees the upstream and policy names exist.
                .filter_map(|r| {
                    let rate_limits = r
                        .rate_limits
                        .iter()
                        .filter_map(|name| policies.get(name).cloned())
                        .collect();
                    let upstream = upstreams.get(&r.upstream)?.clone();
                    let m =
                        metrics.route(&l.name, &r.name, &r.upstream, Some(upstream.errors.clone()));
                    Some(Route::new(r, upstream, rate_limits, m))
                })
                .collect();
            listeners.insert(
                l.name.clone(),
                ListenerRoutes {
                    routes,
                    path: l.path,
                    max_in_flight: l.max_in_flight,
                    unrouted: metrics.route(&l.name, "", "", None),
                },
            );
        }
        Ok(Snapshot {
            listeners,
            upstreams,
            trusted_proxies: cfg.trusted_proxies.clone(),
            access_log: cfg.logging.access_log,
            config: Arc::new(cfg.clone()),
        })
    }
}

pub struct ListenerRoutes {
    pub routes: Vec<Route>,
    /// How request paths are read before matching (`normalize_path` and friends).
    pub path: crate::config::PathConfig,
    pub max_in_flight: Option<usize>,
    /// For the requests no route takes (404, shed, refused framing).
    pub unrouted: Arc<RouteMetrics>,
}

impl Snapshot {
    /// Every route's metric handles (and each listener's unrouted ones), for the sampler.
    pub fn route_metrics(&self) -> impl Iterator<Item = &Arc<RouteMetrics>> {
        self.listeners.values().flat_map(|l| {
            l.routes
                .iter()
                .map(|r| &r.metrics)
                .chain(std::iter::once(&l.unrouted))
        })
    }
}

/// State shared by every listener and the admin endpoints. It outlives every snapshot:
/// state kept by name (limiters, breakers, endpoint health, caches) lives here, not in the
/// `Snapshot`, so a reload keeps it for the names that still exist (see `keyed_state`).
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Frozen after start-up; `/metrics` encodes it.
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// Breakers, retry budgets, endpoint health: survive reloads, keyed by name.
    pub upstream_states: Arc<UpstreamStates>,
    /// Rate-limit state by policy name; `Snapshot::build` takes the policies from here.
    pub limiters: ratelimit::Registry,
    /// Set when a drain starts: `/readyz` answers 503 (traffic is still served during the
    /// accept grace; connections told to close answer 503 themselves, see server.rs).
    pub draining: AtomicBool,
    /// Requests and SSE streams in flight, for the drain.
    pub in_flight: Arc<InFlight>,
    /// Stopped at the end of a drain, before the pools close.
    pub background: Background,
    /// Cached results of the dependency and upstream checks (`/health`, `/readyz`).
    pub health: Arc<Health>,
    /// The request metrics' families; each snapshot makes its route handles from them.
    pub http: HttpMetrics,
    /// Samples of the request counters for the alert rules and the status page.
    pub series: Mutex<Series>,
    /// Alert rules, their state and notifications; also holds the fed signals.
    pub alerts: Arc<crate::alert::Alerting>,
}

impl Shared {
    pub fn new(
        snapshot: Snapshot,
        registry: prometheus_client::registry::Registry,
        upstream_states: Arc<UpstreamStates>,
        limiters: ratelimit::Registry,
        health: Arc<Health>,
        http: HttpMetrics,
        alerts: crate::alert::Alerting,
    ) -> Arc<Shared> {
        let mut series = Series::new(crate::metrics::series::CHART_SPAN);
        series.keep_at_least(alerts.longest_window());
        Arc::new(Shared {
            http,
            series: Mutex::new(series),
            alerts: Arc::new(alerts),
            snapshot: ArcSwap::from_pointee(snapshot),
            registry: Arc::new(registry),
            upstream_states,
            draining: AtomicBool::new(false),
            limiters,
            in_flight: Arc::new(InFlight::default()),
            background: Background::default(),
            health,
        })
    }

    /// Every registry of state kept by name that is not already reconciled by
    /// `Snapshot::build` (which takes upstream state and rate limiters by name). A reload
    /// calls `reconcile` on each with the new configuration before the new snapshot is
    /// swapped in.
    pub fn keyed_state(&self) -> Vec<&dyn KeyedState> {
        vec![&*self.health, &*self.alerts]
    }

    /// Every route's cumulative totals now (not stored: see `record_sample`).
    pub fn sample(&self) -> Sample {
        let snapshot = self.snapshot.load();
        Sample {
            at: tokio::time::Instant::now(),
            wall: SystemTime::now(),
            routes: snapshot
                .route_metrics()
                .map(|m| {
                    let (requests, errors, latency) = m.totals();
                    (
                        m.labels.clone(),
                        crate::metrics::series::Totals {
                            requests,
                            errors,
                            latency,
                        },
                    )
                })
                .collect(),
            fed: self.alerts.signals.totals(),
        }
    }

    /// Takes a sample and keeps it in the series.
    pub fn record_sample(&self) {
        let s = self.sample();
        let mut series = crate::sync::lock(&self.series);
        // A reload may have brought longer rule windows.
        series.keep_at_least(self.alerts.longest_window());
        series.push(s);
    }
}

/// What a connection's service needs: which listener it belongs to, and the shared state.
#[derive(Clone)]
pub struct ListenerCtx {
    pub name: Arc<str>,
    pub shared: Arc<Shared>,
    /// "http" or "https", for X-Forwarded-Proto.
    pub proto: &'static str,
    /// Requests in flight on this listener (load shedding, drain).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
}
