//! State that protects each upstream and lives across requests AND reloads: the breakers,
//! the retry budget, endpoint health and in-flight counts, kept in a registry keyed by
//! upstream name (and route name, endpoint URL), so a reload keeps them for names that
//! still exist. Transitions are where metrics and logs hook in.
//!
//! Breakers are per route by default (`circuit_breaker.scope`): five failed chat calls say
//! the chat route fails, not that every route of the backend does. The retry budget,
//! in-flight cap and ejection stay per upstream and endpoint: they are about the upstream's
//! capacity and its machines, which every route shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{BreakerConfig, BreakerScope, Resilience, UpstreamConfig};
use crate::upstream::balance::{EndpointHealth, HealthEvent};
use crate::upstream::breaker::{Admit, Breaker, Outcome, State, Transition};
use crate::upstream::groups::{GroupMetrics, GroupsShared};
use crate::upstream::retry::{Budget, ConnectGate};

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Default, Debug)]
pub struct UpstreamMetrics {
    breaker_state: Family<Labels, Gauge>,
    breaker_transitions: Family<Labels, Counter>,
    pub breaker_rejections: Family<Labels, Counter>,
    pub retries: Family<Labels, Counter>,
    pub retry_budget_exhausted: Family<Labels, Counter>,
    endpoint_ejections: Family<Labels, Counter>,
    pub shed: Family<Labels, Counter>,
    pub(crate) groups: GroupMetrics,
}

impl UpstreamMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = UpstreamMetrics::default();
        registry.register(
            "circuit_breaker_state",
            "Breaker state per upstream and route (empty with scope: upstream): 0 closed, 1 open, 2 half-open",
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
        m.groups.register(registry);
        m
    }

    pub fn upstream(name: &str) -> Labels {
        vec![("upstream", name.to_string())]
    }

    /// A breaker's labels: `route` is empty for the breaker an upstream's routes share
    /// (an empty label is no label to Prometheus).
    fn breaker(upstream: &str, route: Option<&str>) -> Labels {
        vec![
            ("upstream", upstream.to_string()),
            ("route", route.unwrap_or_default().to_string()),
        ]
    }
}

#[derive(Debug)]
pub struct EndpointState {
    pub url: String,
    pub in_flight: AtomicUsize,
    /// Passive: ejection after consecutive failed requests.
    pub health: Mutex<EndpointHealth>,
    /// Active: false while the upstream's `health_check` says the endpoint is down
    /// (`health/upstream.rs`); true when unchecked.
    pub active_ok: AtomicBool,
    /// Active checks passed in a row (reset by a failed one): a group's endpoints are
    /// ready for traffic after `healthy_after` of them (`upstream::groups`).
    pub active_passes: AtomicU32,
    /// Paces the connects of requests waiting for the endpoint to listen again
    /// (`retry.connect_wait`); told of every successful connect.
    pub connect_gate: ConnectGate,
}

#[derive(Debug)]
pub struct UpstreamState {
    pub name: String,
    /// By route name ("" for the shared breaker of `scope: upstream`). Weak: the routes of
    /// the snapshots hold them, so a breaker lives as long as a route uses it, and a reload
    /// finds it here while the old snapshot still holds it.
    breakers: Mutex<HashMap<String, Weak<RouteBreaker>>>,
    pub budget: Mutex<Budget>,
    pub in_flight: AtomicUsize,
    endpoints: Mutex<HashMap<String, Arc<EndpointState>>>,
    metrics: UpstreamMetrics,
    /// Bumped when a breaker opens or an endpoint is ejected: the upstream's active check
    /// wakes and goes on at its `unhealthy_interval` (`health/upstream.rs`).
    attention: Arc<watch::Sender<u64>>,
    /// Weights set at run time and each group's figures, kept across reloads.
    pub(crate) groups: GroupsShared,
}

impl UpstreamState {
    pub fn endpoint(&self, url: &str) -> Arc<EndpointState> {
        let mut map = crate::sync::lock(&self.endpoints);
        map.entry(url.to_string())
            .or_insert_with(|| {
                Arc::new(EndpointState {
                    url: url.to_string(),
                    in_flight: AtomicUsize::new(0),
                    health: Mutex::new(EndpointHealth::default()),
                    active_ok: AtomicBool::new(true),
                    active_passes: AtomicU32::new(0),
                    connect_gate: ConnectGate::default(),
                })
            })
            .clone()
    }

    /// The breaker `route` uses: its own with `scope: route`, the upstream's shared one
    /// with `scope: upstream`. Kept by name: an existing one takes `cfg` and keeps its
    /// state (a reload must not close an open breaker).
    pub fn breaker_for(&self, route: &str, cfg: &BreakerConfig) -> Arc<RouteBreaker> {
        let now = Instant::now();
        let route = match cfg.scope {
            BreakerScope::Route => Some(route.to_owned()),
            BreakerScope::Upstream => None,
        };
        let key = route.clone().unwrap_or_default();
        let mut map = crate::sync::lock(&self.breakers);
        if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
            crate::sync::lock(&existing.breaker).reconfigure(cfg.clone(), now);
            return existing;
        }
        map.retain(|_, b| b.strong_count() > 0);
        let rejections = self
            .metrics
            .breaker_rejections
            .get_or_create(&UpstreamMetrics::breaker(&self.name, route.as_deref()))
            .clone();
        let breaker = Arc::new(RouteBreaker {
            upstream: self.name.clone(),
            route,
            breaker: Mutex::new(Breaker::new(cfg.clone(), now)),
            metrics: self.metrics.clone(),
            rejections,
            attention: self.attention.clone(),
        });
        breaker
            .metrics
            .breaker_state
            .get_or_create(&breaker.labels())
            .set(State::Closed.as_gauge());
        map.insert(key, Arc::downgrade(&breaker));
        breaker
    }

    /// Every breaker a route of the current configuration uses, by route name.
    pub fn breakers(&self) -> Vec<Arc<RouteBreaker>> {
        let map = crate::sync::lock(&self.breakers);
        let mut list: Vec<Arc<RouteBreaker>> = map.values().filter_map(Weak::upgrade).collect();
        list.sort_by(|a, b| a.route.cmp(&b.route));
        list
    }

    /// The worst state among the upstream's breakers (open, then half-open, then closed).
    pub fn breaker_state(&self) -> State {
        let states: Vec<State> = self.breakers().iter().map(|b| b.state()).collect();
        [State::Open, State::HalfOpen]
            .into_iter()
            .find(|s| states.contains(s))
            .unwrap_or(State::Closed)
    }

    /// The upstream's active check passed (one endpoint, `needed` = its `healthy_after`):
    /// open breakers count it toward health-informed recovery (`Breaker::health_passed`).
    pub fn health_passed(&self, needed: u32) {
        let now = Instant::now();
        for b in self.breakers() {
            let t = crate::sync::lock(&b.breaker).health_passed(now, needed);
            if let Some(t) = t {
                b.transitioned(t, "the active health check passes");
            }
        }
    }

    /// The upstream's active check failed: open breakers count passes afresh. With several
    /// endpoints, any one failing does: recovery then waits for `open_for` as before.
    pub fn health_failed(&self) {
        for b in self.breakers() {
            crate::sync::lock(&b.breaker).health_failed();
        }
    }

    /// A breaker of this upstream or one of its endpoints is not back to normal: its
    /// active check runs at `unhealthy_interval`.
    pub fn needs_attention(&self) -> bool {
        let now = Instant::now();
        let ejected = {
            let map = crate::sync::lock(&self.endpoints);
            map.values()
                .any(|e| !crate::sync::lock(&e.health).available(now))
        };
        ejected || self.breaker_state() != State::Closed
    }

    /// Changes when a breaker opens or an endpoint is ejected.
    pub fn attention(&self) -> watch::Receiver<u64> {
        self.attention.subscribe()
    }

    /// Feeds an attempt's result to its endpoint's ejection counter.
    pub fn endpoint_result(&self, ep: &EndpointState, ok: bool, cfg: &Resilience) {
        let event = crate::sync::lock(&ep.health).on_result(crate::clock::now(), ok, &cfg.ejection);
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
            self.attention.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The endpoint's active check passed (`needed` = `healthy_after`): an ejection ends
    /// after that many passes in a row.
    pub fn endpoint_check(&self, ep: &EndpointState, ok: bool, needed: u32) {
        if ok {
            let _ = ep
                .active_passes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add(1))
                });
        } else {
            ep.active_passes.store(0, Ordering::Relaxed);
        }
        let mut h = crate::sync::lock(&ep.health);
        if !ok {
            h.health_failed();
        } else if h.health_passed(Instant::now(), needed) {
            drop(h);
            tracing::info!(
                upstream = %self.name,
                endpoint = %ep.url,
                "ejection ended: the active health check passes"
            );
        }
    }

    pub fn metrics(&self) -> &UpstreamMetrics {
        &self.metrics
    }
}

/// The registry of upstream state, keyed by name; lives in `Shared`, outside snapshots.
#[derive(Debug)]
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

    /// The state for this upstream, kept if the name existed before (its budget takes the
    /// new settings but keeps its state; breakers do the same in `breaker_for`).
    pub fn get_or_create(&self, cfg: &UpstreamConfig) -> Arc<UpstreamState> {
        let now = Instant::now();
        let mut map = crate::sync::lock(&self.map);
        if let Some(existing) = map.get(&cfg.name) {
            crate::sync::lock(&existing.budget).reconfigure(&cfg.resilience.retry);
            return existing.clone();
        }
        let state = Arc::new(UpstreamState {
            name: cfg.name.clone(),
            breakers: Mutex::new(HashMap::new()),
            budget: Mutex::new(Budget::new(&cfg.resilience.retry, now)),
            in_flight: AtomicUsize::new(0),
            endpoints: Mutex::new(HashMap::new()),
            metrics: self.metrics.clone(),
            attention: Arc::new(watch::Sender::new(0)),
            groups: GroupsShared::default(),
        });
        map.insert(cfg.name.clone(), state.clone());
        state
    }

    pub fn get(&self, name: &str) -> Option<Arc<UpstreamState>> {
        crate::sync::lock(&self.map).get(name).cloned()
    }
}

/// An in-flight count held for as long as a request uses it.
pub(crate) struct InFlight(Arc<dyn Counted>);

pub(crate) trait Counted: Send + Sync {
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
    pub(crate) fn try_acquire(of: Arc<dyn Counted>, max: Option<usize>) -> Option<InFlight> {
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

/// One breaker: a route's, or the one the routes of an upstream share.
#[derive(Debug)]
pub struct RouteBreaker {
    pub upstream: String,
    /// None: shared by every route of the upstream (`scope: upstream`).
    pub route: Option<String>,
    breaker: Mutex<Breaker>,
    metrics: UpstreamMetrics,
    /// Its series of `rampart_circuit_breaker_rejections_total`, looked up once: an open
    /// breaker counts every request it fails fast, and building the labels each time cost
    /// three allocations per rejection.
    rejections: Counter,
    attention: Arc<watch::Sender<u64>>,
}

impl RouteBreaker {
    fn labels(&self) -> Labels {
        UpstreamMetrics::breaker(&self.upstream, self.route.as_deref())
    }

    /// "backend" or "backend/chat": how logs and reasons name it.
    pub fn display_name(&self) -> String {
        match &self.route {
            Some(r) => format!("{}/{r}", self.upstream),
            None => self.upstream.clone(),
        }
    }

    /// Asks the breaker; counts a rejection.
    pub fn admit(&self) -> Admit {
        let now = crate::clock::now();
        let (admit, transition) = crate::sync::lock(&self.breaker).admit(now);
        if let Some(t) = transition {
            self.transitioned(t, "open_for is over");
        }
        if let Admit::Rejected { .. } = admit {
            self.rejections.inc();
        }
        admit
    }

    pub fn report(&self, outcome: Outcome, probe: Option<u64>) {
        let now = crate::clock::now();
        let transition = crate::sync::lock(&self.breaker).on_result(now, outcome, probe);
        if let Some(t) = transition {
            self.transitioned(t, "");
        }
    }

    pub fn state(&self) -> State {
        crate::sync::lock(&self.breaker).state()
    }

    /// The state, since when, and whether it fails requests fast right now.
    pub fn status(&self, now: Instant) -> (State, Instant, bool) {
        let b = crate::sync::lock(&self.breaker);
        (b.state(), b.since(), b.blocks(now))
    }

    fn transitioned(&self, t: Transition, why: &str) {
        let labels = self.labels();
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
        let route = self.route.as_deref().unwrap_or("");
        match t {
            Transition::Opened { open_for } => {
                tracing::warn!(
                    upstream = %self.upstream,
                    route,
                    open_for_ms = open_for.as_millis() as u64,
                    "circuit breaker OPEN"
                );
                self.attention.send_modify(|n| *n = n.wrapping_add(1));
            }
            Transition::HalfOpened => {
                tracing::info!(upstream = %self.upstream, route, why, "circuit breaker HALF_OPEN")
            }
            Transition::Closed => {
                tracing::info!(upstream = %self.upstream, route, "circuit breaker CLOSED")
            }
        }
    }
}

impl Drop for RouteBreaker {
    /// A breaker no route uses any more leaves no gauge behind.
    fn drop(&mut self) {
        self.metrics.breaker_state.remove(&self.labels());
    }
}

/// The breaker's verdict on one request, reported exactly once: explicitly, or as
/// "ignored" when dropped (the client went away), so a probe slot is never leaked.
pub(crate) struct BreakerTicket {
    state: Arc<RouteBreaker>,
    probe: Option<u64>,
    reported: bool,
}

impl BreakerTicket {
    pub(crate) fn new(state: Arc<RouteBreaker>, probe: Option<u64>) -> Self {
        BreakerTicket {
            state,
            probe,
            reported: false,
        }
    }

    /// Admitted as one of a half-open breaker's probes.
    pub(crate) fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    pub(crate) fn report(&mut self, outcome: Outcome) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while the breaker was held must not leave it failing open for good: it
    /// still counts failures and opens.
    #[test]
    fn a_poisoned_breaker_still_opens() {
        let cfg = BreakerConfig::default();
        let b = Arc::new(RouteBreaker {
            upstream: "backend".into(),
            route: None,
            breaker: Mutex::new(Breaker::new(cfg.clone(), Instant::now())),
            metrics: UpstreamMetrics::default(),
            rejections: Counter::default(),
            attention: Arc::new(watch::Sender::new(0)),
        });
        let held = b.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = crate::sync::lock(&held.breaker);
            panic!("a panic while the breaker is held");
        })
        .join();
        assert!(panicked.is_err());
        assert!(b.breaker.is_poisoned());
        for _ in 0..cfg.failures {
            assert!(matches!(b.admit(), Admit::Allowed { .. }));
            b.report(Outcome::Failure, None);
        }
        assert_eq!(b.state(), State::Open);
        assert!(matches!(b.admit(), Admit::Rejected { .. }));
    }
}
