//! The process-wide state, owned here at the top: each subsystem below `app` gets a narrow
//! handle of what it reads and writes (`pipeline::Traffic`, `health::HealthInputs`,
//! `alert::AlertInputs`, `admin::AdminCtx`), never this struct.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::admin::{AdminCtx, Control};
use crate::admission::ratelimit;
use crate::alert::{AlertInputs, Alerting};
use crate::health::Health;
use crate::observe::certs::CertExpiry;
use crate::observe::http::HttpMetrics;
use crate::observe::series::Series;
use crate::observe::signals::Signals;
use crate::pipeline::Traffic;
use crate::reload::KeyedState;
use crate::route::Snapshot;
use crate::shutdown::{Background, InFlight};
use crate::upstream::resilience::UpstreamStates;

/// State shared by every listener and the admin endpoints. It outlives every snapshot:
/// state kept by name (limiters, breakers, endpoint health, caches) lives here, not in the
/// `Snapshot`, so a reload keeps it for the names that still exist (see `keyed_state`).
#[derive(Debug)]
pub struct Shared {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Frozen after start-up; `/metrics` encodes it.
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// Breakers, retry budgets, endpoint health: survive reloads, keyed by name.
    pub upstream_states: Arc<UpstreamStates>,
    /// Rate-limit state by policy name; `Snapshot::build` takes the policies from here.
    pub limiters: Arc<ratelimit::Registry>,
    /// Cache policies by name (their memory tiers survive reloads).
    pub caches: Arc<crate::cache::Registry>,
    /// Set when a drain starts: `/readyz` answers 503 (traffic is still served during the
    /// accept grace; connections told to close answer 503 themselves, see `listener`).
    pub draining: Arc<AtomicBool>,
    /// Requests and SSE streams in flight, for the drain.
    pub in_flight: Arc<InFlight>,
    /// Stopped at the end of a drain, before the pools close.
    pub background: Background,
    /// Cached results of the dependency and upstream checks (`/health`, `/readyz`).
    pub health: Arc<Health>,
    /// The request metrics' families; each snapshot makes its route handles from them.
    pub http: HttpMetrics,
    /// Samples of the request counters for the alert rules and the status page.
    pub series: Arc<Mutex<Series>>,
    /// Alert rules, their state and notifications.
    pub alerts: Arc<Alerting>,
    /// What other subsystems feed (database queries, cache lookups); read by the rules.
    pub signals: Arc<Signals>,
    /// The loaded TLS certificates' expiry: the TLS listeners record, `/metrics` and the
    /// `certificate_expiry` rule read.
    pub certs: CertExpiry,
    /// The request path's handle, shared by every listener.
    pub traffic: Arc<Traffic>,
    /// Releases (issue 20): kept here, outside the snapshot, so a reload keeps them.
    pub(crate) releases: Arc<crate::upstream::release::Releases>,
}

/// What `Shared` is made of; `app` builds the parts in the order their metrics register.
#[derive(Debug)]
pub struct Parts {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub registry: prometheus_client::registry::Registry,
    pub upstream_states: Arc<UpstreamStates>,
    pub limiters: Arc<ratelimit::Registry>,
    pub caches: Arc<crate::cache::Registry>,
    pub draining: Arc<AtomicBool>,
    pub health: Arc<Health>,
    pub http: HttpMetrics,
    pub alerts: Alerting,
    pub signals: Arc<Signals>,
    pub certs: CertExpiry,
    pub(crate) releases: Arc<crate::upstream::release::Releases>,
}

impl Shared {
    pub fn new(p: Parts) -> Arc<Shared> {
        let mut series = Series::new(crate::observe::series::CHART_SPAN);
        series.keep_at_least(p.alerts.longest_window());
        let in_flight = Arc::new(InFlight::default());
        let traffic = Arc::new(Traffic {
            snapshot: p.snapshot.clone(),
            upstream_states: p.upstream_states.clone(),
            in_flight: in_flight.clone(),
            http: p.http.clone(),
            health: p.health.clone(),
        });
        Arc::new(Shared {
            http: p.http,
            series: Arc::new(Mutex::new(series)),
            alerts: Arc::new(p.alerts),
            snapshot: p.snapshot,
            registry: Arc::new(p.registry),
            upstream_states: p.upstream_states,
            draining: p.draining,
            limiters: p.limiters,
            caches: p.caches,
            in_flight,
            background: Background::default(),
            health: p.health,
            signals: p.signals,
            certs: p.certs,
            traffic,
            releases: p.releases,
        })
    }

    /// The alert rules' handle.
    pub fn alert_inputs(&self) -> AlertInputs {
        AlertInputs {
            snapshot: self.snapshot.clone(),
            health: self.health.clone(),
            limiters: self.limiters.clone(),
            series: self.series.clone(),
            signals: self.signals.clone(),
            certs: self.certs.clone(),
        }
    }

    /// The admin listener's handle.
    pub fn admin_ctx(&self, control: Control) -> AdminCtx {
        AdminCtx {
            inputs: self.alert_inputs(),
            registry: self.registry.clone(),
            alerts: self.alerts.clone(),
            draining: self.draining.clone(),
            control,
            caches: self.caches.clone(),
            upstreams: self.upstream_states.clone(),
            releases: self.releases.clone(),
        }
    }

    /// Every registry of state kept by name that is not already reconciled by
    /// `Snapshot::build` (which takes upstream state and rate limiters by name). A reload
    /// calls `reconcile` on each with the new configuration before the new snapshot is
    /// swapped in.
    pub fn keyed_state(&self) -> Vec<&dyn KeyedState> {
        vec![&*self.health, &*self.alerts, &*self.releases]
    }

    /// Takes a sample and keeps it in the series.
    pub fn record_sample(&self) {
        let s = self.alert_inputs().sample();
        let mut series = crate::sync::lock(&self.series);
        // A reload may have brought longer rule windows.
        series.keep_at_least(self.alerts.longest_window());
        series.push(s);
    }
}
