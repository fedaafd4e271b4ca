//! State that protects each upstream and lives across requests AND reloads: the breaker,
//! the retry budget, endpoint health and in-flight counts, kept in a registry keyed by
//! upstream name (and endpoint URL), so a reload keeps them for names that still exist.
//! Transitions are where metrics and logs hook in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::balance::{EndpointHealth, HealthEvent};
use crate::breaker::{Admit, Breaker, Outcome, State, Transition};
use crate::config::{Resilience, UpstreamConfig};
use crate::retry::Budget;

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Default)]
pub struct UpstreamMetrics {
    breaker_state: Family<Labels, Gauge>,
    breaker_transitions: Family<Labels, Counter>,
    pub breaker_rejections: Family<Labels, Counter>,
    pub retries: Family<Labels, Counter>,
    pub retry_budget_exhausted: Family<Labels, Counter>,
    endpoint_ejections: Family<Labels, Counter>,
    pub shed: Family<Labels, Counter>,
}

impl UpstreamMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = UpstreamMetrics::default();
        registry.register(
            "circuit_breaker_state",
            "Breaker state per upstream: 0 closed, 1 open, 2 half-open",
            m.breaker_state.clone(),
        );
        registry.register(
            "circuit_breaker_transitions",
            "Breaker state changes, by the state entered",
            m.breaker_transitions.clone(),
        );
        registry.register(
            "circuit_breaker_rejections",
            "Requests failed fast because the breaker was open",
            m.breaker_rejections.clone(),
        );
        registry.register(
            "upstream_retries",
            "Retries sent, by the reason of the failure retried",
            m.retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the upstream's retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        registry.register(
            "endpoint_ejections",
            "Endpoints set aside after consecutive failures",
            m.endpoint_ejections.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests refused with 503 OVERLOADED, by scope (listener or upstream)",
            m.shed.clone(),
        );
        m
    }

    pub fn upstream(name: &str) -> Labels {
        vec![("upstream", name.to_string())]
    }
}

pub struct EndpointState {
    pub url: String,
    pub in_flight: AtomicUsize,
    /// Passive: ejection after consecutive failed requests.
    pub health: Mutex<EndpointHealth>,
    /// Active: false while the upstream's `health_check` says the endpoint is down
    /// (`health/upstream.rs`); true when unchecked.
    pub active_ok: AtomicBool,
}

pub struct UpstreamState {
    pub name: String,
    pub breaker: Mutex<Breaker>,
    pub budget: Mutex<Budget>,
    pub in_flight: AtomicUsize,
    endpoints: Mutex<HashMap<String, Arc<EndpointState>>>,
    metrics: UpstreamMetrics,
}

impl UpstreamState {
    pub fn endpoint(&self, url: &str) -> Arc<EndpointState> {
        let mut map = match self.endpoints.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(url.to_string())
            .or_insert_with(|| {
                Arc::new(EndpointState {
                    url: url.to_string(),
                    in_flight: AtomicUsize::new(0),
                    health: Mutex::new(EndpointHealth::default()),
                    active_ok: AtomicBool::new(true),
                })
            })
            .clone()
    }

    /// Asks the breaker; counts a rejection.
    pub fn admit(&self) -> Admit {
        let now = Instant::now();
        let (admit, transition) = match self.breaker.lock() {
            Ok(mut b) => b.admit(now),
            Err(_) => (Admit::Allowed { probe: None }, None),
        };
        if let Some(t) = transition {
            self.transitioned(t);
        }
        if let Admit::Rejected { .. } = admit {
            self.metrics
                .breaker_rejections
                .get_or_create(&UpstreamMetrics::upstream(&self.name))
                .inc();
        }
        admit
    }

    pub fn report(&self, outcome: Outcome, probe: Option<u64>) {
        let now = Instant::now();
        let transition = match self.breaker.lock() {
            Ok(mut b) => b.on_result(now, outcome, probe),
            Err(_) => None,
        };
        if let Some(t) = transition {
            self.transitioned(t);
        }
    }

    pub fn breaker_state(&self) -> State {
        self.breaker
            .lock()
            .map(|b| b.state())
            .unwrap_or(State::Closed)
    }

    fn transitioned(&self, t: Transition) {
        let labels = UpstreamMetrics::upstream(&self.name);
        self.metrics
            .breaker_state
            .get_or_create(&labels)
            .set(t.to().as_gauge());
        let mut with_state = labels;
        with_state.push(("to", t.to().as_str().to_string()));
        self.metrics
            .breaker_transitions
            .get_or_create(&with_state)
            .inc();
        match t {
            Transition::Opened { open_for } => tracing::warn!(
                upstream = %self.name,
                open_for_ms = open_for.as_millis() as u64,
                "circuit breaker OPEN"
            ),
            Transition::HalfOpened => {
                tracing::info!(upstream = %self.name, "circuit breaker HALF_OPEN")
            }
            Transition::Closed => tracing::info!(upstream = %self.name, "circuit breaker CLOSED"),
        }
    }

    /// Feeds an attempt's result to its endpoint's ejection counter.
    pub fn endpoint_result(&self, ep: &EndpointState, ok: bool, cfg: &Resilience) {
        let event = match ep.health.lock() {
            Ok(mut h) => h.on_result(Instant::now(), ok, &cfg.ejection),
            Err(_) => None,
        };
        if let Some(HealthEvent::Ejected(period)) = event {
            let mut labels = UpstreamMetrics::upstream(&self.name);
            labels.push(("endpoint", ep.url.clone()));
            self.metrics.endpoint_ejections.get_or_create(&labels).inc();
            tracing::warn!(
                upstream = %self.name,
                endpoint = %ep.url,
                ejected_for_ms = period.as_millis() as u64,
                "endpoint ejected after consecutive failures"
            );
        }
    }

    pub fn metrics(&self) -> &UpstreamMetrics {
        &self.metrics
    }
}

/// The registry of upstream state, keyed by name; lives in `Shared`, outside snapshots.
pub struct UpstreamStates {
    map: Mutex<HashMap<String, Arc<UpstreamState>>>,
    pub metrics: UpstreamMetrics,
}

impl UpstreamStates {
    pub fn new(metrics: UpstreamMetrics) -> Self {
        UpstreamStates {
            map: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The state for this upstream, kept if the name existed before (its breaker and
    /// budget take the new settings but keep their state).
    pub fn get_or_create(&self, cfg: &UpstreamConfig) -> Arc<UpstreamState> {
        let now = Instant::now();
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(existing) = map.get(&cfg.name) {
            if let Ok(mut b) = existing.breaker.lock() {
                b.reconfigure(cfg.resilience.circuit_breaker.clone(), now);
            }
            if let Ok(mut b) = existing.budget.lock() {
                b.reconfigure(&cfg.resilience.retry);
            }
            return existing.clone();
        }
        let state = Arc::new(UpstreamState {
            name: cfg.name.clone(),
            breaker: Mutex::new(Breaker::new(cfg.resilience.circuit_breaker.clone(), now)),
            budget: Mutex::new(Budget::new(&cfg.resilience.retry, now)),
            in_flight: AtomicUsize::new(0),
            endpoints: Mutex::new(HashMap::new()),
            metrics: self.metrics.clone(),
        });
        self.metrics
            .breaker_state
            .get_or_create(&UpstreamMetrics::upstream(&cfg.name))
            .set(State::Closed.as_gauge());
        map.insert(cfg.name.clone(), state.clone());
        state
    }

    pub fn get(&self, name: &str) -> Option<Arc<UpstreamState>> {
        self.map.lock().ok()?.get(name).cloned()
    }
}

/// An in-flight count held for as long as a request uses it.
pub struct InFlight(Arc<dyn Counted>);

pub trait Counted: Send + Sync {
    fn counter(&self) -> &AtomicUsize;
}

impl Counted for UpstreamState {
    fn counter(&self) -> &AtomicUsize {
        &self.in_flight
    }
}

impl Counted for EndpointState {
    fn counter(&self) -> &AtomicUsize {
        &self.in_flight
    }
}

impl Counted for AtomicUsize {
    fn counter(&self) -> &AtomicUsize {
        self
    }
}

impl InFlight {
    /// Takes a slot unless `max` are taken.
    pub fn try_acquire(of: Arc<dyn Counted>, max: Option<usize>) -> Option<InFlight> {
        let c = of.counter();
        let before = c.fetch_add(1, Ordering::AcqRel);
        if max.is_some_and(|m| before >= m) {
            c.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlight(of))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.counter().fetch_sub(1, Ordering::AcqRel);
    }
}

/// The breaker's verdict on one request, reported exactly once: explicitly, or as
/// "ignored" when dropped (the client went away), so a probe slot is never leaked.
pub struct BreakerTicket {
    state: Arc<UpstreamState>,
    probe: Option<u64>,
    reported: bool,
}

impl BreakerTicket {
    pub fn new(state: Arc<UpstreamState>, probe: Option<u64>) -> Self {
        BreakerTicket {
            state,
            probe,
            reported: false,
        }
    }

    /// Admitted as one of a half-open breaker's probes.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    pub fn report(&mut self, outcome: Outcome) {
        if !self.reported {
            self.reported = true;
            self.state.report(outcome, self.probe);
        }
    }
}

impl Drop for BreakerTicket {
    fn drop(&mut self) {
        self.report(Outcome::Ignored);
    }
}
