//! Alert rules over the signals rampart measures, for deployments without a Prometheus
//! server (those get the same rules as PromQL in `examples/prometheus/`).
//!
//! - `rules.rs`: the pure state machine (pending -> firing -> resolved);
//! - `signals.rs`: what the request counters do not give (database, cache, pools, memory,
//!   from the health checks or fed by other subsystems);
//! - `sinks.rs`: webhook, Slack and Alertmanager deliveries with retries;
//! - here: the shell that reads each rule's signal every `alerts.interval`, feeds the state
//!   machine, logs every change, keeps the last hour for `/admin/alerts`, and queues
//!   notifications. Queueing never waits: a full queue drops (and counts) a notification.

mod release;
pub(crate) mod rules;
pub(crate) mod signals;
pub(crate) mod sinks;

mod certs;
use certs::certificate_expiry;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::admission::ratelimit;
use crate::config::{
    AlertRule, AlertsConfig, Comparison, Config, Severity, Signal, SignalUnit, SinkKind,
};
use crate::health::Health;
use crate::observe::certs::CertExpiry;
use crate::observe::series::{Filter, Sample, Series};
use crate::reload::KeyedState;
use crate::route::Snapshot;
use crate::shutdown::Background;
use crate::upstream::breaker::State as BreakerState;
use arc_swap::ArcSwap;
use rules::{Change, Evaluator, Phase, Reading, Transition};
use signals::Signals;
use sinks::Delivery;

/// `/admin/alerts` lists the changes of this last stretch.
pub(crate) const HISTORY: Duration = Duration::from_secs(3600);
/// Notifications waiting for delivery; past this they are dropped (and counted).
const QUEUE: usize = 256;
/// Deliveries running at once.
const CONCURRENT_DELIVERIES: usize = 16;

/// One change of one alert, as logged, listed and sent.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEvent {
    pub rule: String,
    pub signal: Signal,
    pub severity: Severity,
    pub status: Change,
    pub value: Option<f64>,
    pub threshold: f64,
    pub comparison: Comparison,
    pub window: Duration,
    pub route: Option<String>,
    pub upstream: Option<String>,
    pub detail: Option<String>,
    /// When the condition started holding.
    pub started_at: SystemTime,
    /// When this change happened.
    pub at: SystemTime,
    pub summary: String,
}

impl AlertEvent {
    fn new(t: &Transition, now: Instant, wall: SystemTime) -> Self {
        let r = &t.rule;
        let ago = now.saturating_duration_since(t.since);
        let started_at = wall.checked_sub(ago).unwrap_or(wall);
        AlertEvent {
            rule: r.name.clone(),
            signal: r.signal,
            severity: r.severity,
            status: t.change,
            value: t.reading.value,
            threshold: r.threshold,
            comparison: r.comparison,
            window: r.window,
            route: r.route.clone(),
            upstream: r.upstream.clone(),
            detail: t.reading.detail.clone(),
            started_at,
            at: wall,
            summary: summary(r, t.change, t.reading.value, t.reading.detail.as_deref()),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "alert": self.rule,
            "status": self.status.as_str(),
            "severity": self.severity.as_str(),
            "signal": self.signal.as_str(),
            "value": self.value,
            "value_text": Signal::format_value(self.signal, self.value),
            "comparison": self.comparison.as_str(),
            "threshold": self.threshold,
            "threshold_text": Signal::format_value(self.signal, Some(self.threshold)),
            "window_s": self.window.as_secs(),
            "route": self.route,
            "upstream": self.upstream,
            "detail": self.detail,
            "started_at": sinks::rfc3339(self.started_at),
            "at": sinks::rfc3339(self.at),
            "summary": self.summary,
        })
    }
}

/// `breaker_open`, or `error_rate > 5.0%`.
pub(crate) fn condition(r: &AlertRule) -> String {
    if r.signal.unit() == SignalUnit::YesNo {
        return r.signal.as_str().to_owned();
    }
    format!(
        "{} {} {}",
        r.signal.as_str(),
        r.comparison.as_str(),
        Signal::format_value(r.signal, Some(r.threshold))
    )
}

/// `error_rate 12.5% > 5.0% over 5m (upstream backend)`, `breaker_open yes: open: fastgpt`;
/// resolved: `error_rate back under 5.0% (0.0%) over 5m (upstream backend)` ("back over"
/// for `<` rules). A rule resolved because it was removed may still meet its condition:
/// then it reads `resolved: error_rate 12.5% (threshold 5.0%) ...`, claiming no comparison.
pub(super) fn summary(
    r: &AlertRule,
    change: Change,
    value: Option<f64>,
    detail: Option<&str>,
) -> String {
    let mut s = String::new();
    let threshold = Signal::format_value(r.signal, Some(r.threshold));
    let shown = Signal::format_value(r.signal, value);
    let signal = r.signal.as_str();
    if r.signal.unit() == SignalUnit::YesNo {
        if change == Change::Resolved {
            s.push_str("resolved: ");
        }
        s.push_str(&format!("{signal} {shown}"));
    } else if change != Change::Resolved {
        s.push_str(&format!(
            "{signal} {shown} {} {threshold}",
            r.comparison.as_str()
        ));
    } else if value.is_some_and(|v| !r.comparison.holds(v, r.threshold)) {
        let back = match r.comparison {
            Comparison::Above | Comparison::AtLeast => "under",
            Comparison::Below | Comparison::AtMost => "over",
        };
        s.push_str(&format!("{signal} back {back} {threshold} ({shown})"));
    } else {
        s.push_str(&format!(
            "resolved: {signal} {shown} (threshold {threshold})"
        ));
    }
    if r.signal.windowed() {
        s.push_str(&format!(" over {}", humantime::format_duration(r.window)));
    }
    if let Some(route) = &r.route {
        s.push_str(&format!(" (route {route})"));
    }
    if let Some(u) = &r.upstream {
        s.push_str(&format!(" (upstream {u})"));
    }
    if let Some(d) = detail {
        s.push_str(&format!(": {d}"));
    }
    s
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    alert: String,
    severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotificationLabels {
    sink: &'static str,
    result: &'static str,
}

#[derive(Clone, Default, Debug)]
pub struct AlertMetrics {
    firing: Family<AlertLabels, Gauge>,
    notifications: Family<NotificationLabels, Counter>,
}

impl AlertMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = AlertMetrics::default();
        registry.register(
            "alert_firing",
            "1 while the alert rule fires, by rule and severity",
            m.firing.clone(),
        );
        registry.register(
            "alert_notifications",
            "Alert notifications by sink and result (delivered, failed, dropped)",
            m.notifications.clone(),
        );
        m
    }

    fn notification(&self, sink: SinkKind, result: &'static str) {
        self.notifications
            .get_or_create(&NotificationLabels {
                sink: sink.as_str(),
                result,
            })
            .inc();
    }
}

// === the shell ===

struct Inner {
    config: AlertsConfig,
    evaluator: Evaluator,
    /// Changes of the last hour, oldest first.
    history: VecDeque<AlertEvent>,
    /// The firing alerts, as they started firing.
    active: Vec<AlertEvent>,
    /// When the rules were last evaluated (`/admin/alerts`).
    last_eval: Option<SystemTime>,
}

/// What the rules read of the process-wide state: a narrow handle `app` builds.
#[derive(Clone, Debug)]
pub struct AlertInputs {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub health: Arc<Health>,
    pub limiters: Arc<ratelimit::Registry>,
    /// Samples of the request counters (the sampler task in `app` records them).
    pub series: Arc<Mutex<Series>>,
    pub signals: Arc<Signals>,
    /// The loaded TLS certificates' expiry (`certificate_expiry`).
    pub certs: CertExpiry,
}

impl AlertInputs {
    /// Every route's cumulative totals now (not stored: the sampler keeps them).
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
                        crate::observe::series::Totals {
                            requests,
                            errors,
                            latency,
                        },
                    )
                })
                .collect(),
            fed: self.signals.totals(),
        }
    }
}

pub struct Alerting {
    /// What other subsystems feed; read by the rules and the status page.
    pub signals: Arc<Signals>,
    inner: Mutex<Inner>,
    queue: mpsc::Sender<Delivery>,
    /// Taken by the delivery task when it starts.
    receiver: Mutex<Option<mpsc::Receiver<Delivery>>>,
    metrics: AlertMetrics,
    /// Names this process in notifications.
    instance: String,
}

impl std::fmt::Debug for Alerting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerting")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Alerting {
    pub fn new(config: &AlertsConfig, metrics: AlertMetrics, signals: Arc<Signals>) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let alerting = Alerting {
            signals,
            inner: Mutex::new(Inner {
                config: config.clone(),
                evaluator: Evaluator::new(&config.rules),
                history: VecDeque::new(),
                active: Vec::new(),
                last_eval: None,
            }),
            queue,
            receiver: Mutex::new(Some(receiver)),
            metrics,
            instance: instance_name(),
        };
        alerting.publish_firing();
        alerting
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    pub fn interval(&self) -> Duration {
        self.inner().config.interval
    }

    /// The longest rule window, so the series keeps enough history.
    pub fn longest_window(&self) -> Duration {
        self.inner()
            .config
            .rules
            .iter()
            .map(|r| r.window)
            .max()
            .unwrap_or_default()
    }

    /// One evaluation of every rule against the current state of `shared`.
    pub fn evaluate(&self, shared: &AlertInputs) -> Vec<AlertEvent> {
        let current = shared.sample();
        let now = current.at;
        let wall = current.wall;
        let transitions = {
            let series = crate::sync::lock(&shared.series);
            let mut inner = self.inner();
            inner.last_eval = Some(wall);
            inner
                .evaluator
                .evaluate(now, |rule| read(rule, shared, &current, &series))
        };
        self.apply(&transitions, now, wall)
    }

    /// Logs, records and queues what changed.
    fn apply(&self, transitions: &[Transition], now: Instant, wall: SystemTime) -> Vec<AlertEvent> {
        let events: Vec<AlertEvent> = transitions
            .iter()
            .map(|t| AlertEvent::new(t, now, wall))
            .collect();
        let (sinks, interval) = {
            let mut inner = self.inner();
            for e in &events {
                match e.status {
                    Change::Pending => continue,
                    Change::Firing => {
                        inner.active.retain(|a| a.rule != e.rule);
                        inner.active.push(e.clone());
                    }
                    Change::Resolved => inner.active.retain(|a| a.rule != e.rule),
                }
                inner.history.push_back(e.clone());
            }
            let cutoff = wall.checked_sub(HISTORY);
            while inner
                .history
                .front()
                .is_some_and(|e| cutoff.is_some_and(|c| e.at < c))
            {
                inner.history.pop_front();
            }
            (inner.config.sinks.clone(), inner.config.interval)
        };
        for e in &events {
            log(e);
        }
        self.publish_firing();
        // Alertmanager forgets an alert not re-sent within its resolve timeout: re-send
        // the firing ones every evaluation (it deduplicates; that is its job). The other
        // sinks hear of each change once.
        let resend_within = interval.saturating_mul(3).max(Duration::from_secs(180));
        for sink in &sinks {
            for e in events.iter().filter(|e| e.status != Change::Pending) {
                self.enqueue(sinks::delivery(sink, e, &self.instance, resend_within));
            }
            if sink.kind == SinkKind::Alertmanager {
                for e in self.firing() {
                    if !events.iter().any(|n| n.rule == e.rule) {
                        let mut again = e.clone();
                        again.at = wall;
                        self.enqueue(sinks::delivery(sink, &again, &self.instance, resend_within));
                    }
                }
            }
        }
        events
    }

    fn enqueue(&self, d: Delivery) {
        let kind = d.sink.kind;
        if let Err(e) = self.queue.try_send(d) {
            let d = match e {
                mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => d,
            };
            self.metrics.notification(kind, "dropped");
            tracing::warn!(sink = kind.as_str(), alert = %d.what, "alert notification dropped: delivery queue full");
        }
    }

    fn publish_firing(&self) {
        let inner = self.inner();
        for s in &inner.evaluator.rules {
            self.metrics
                .firing
                .get_or_create(&AlertLabels {
                    alert: s.rule.name.clone(),
                    severity: s.rule.severity.as_str(),
                })
                .set(i64::from(matches!(s.phase, Phase::Firing { .. })));
        }
    }

    /// The alerts firing now, as events (their `at` is when they started firing).
    pub fn firing(&self) -> Vec<AlertEvent> {
        self.inner().active.clone()
    }

    /// `/admin/alerts`: firing now, every rule's state, and the last hour's changes.
    pub fn to_json(&self) -> Value {
        let firing: Vec<Value> = self.firing().iter().map(AlertEvent::to_json).collect();
        let inner = self.inner();
        let rules: Vec<Value> = inner
            .evaluator
            .rules
            .iter()
            .map(|s| {
                let value = s.last.as_ref().and_then(|r| r.value);
                json!({
                    "name": s.rule.name,
                    "signal": s.rule.signal.as_str(),
                    "severity": s.rule.severity.as_str(),
                    "state": s.phase.as_str(),
                    "value": value,
                    "value_text": if s.last.is_some() { Signal::format_value(s.rule.signal, value) } else { "not evaluated yet".into() },
                    "condition": condition(&s.rule),
                    "window_s": s.rule.window.as_secs(),
                    "for_s": s.rule.for_.as_secs(),
                    "route": s.rule.route,
                    "upstream": s.rule.upstream,
                })
            })
            .collect();
        let recent: Vec<Value> = inner
            .history
            .iter()
            .rev()
            .map(AlertEvent::to_json)
            .collect();
        json!({
            "interval_s": inner.config.interval.as_secs(),
            "evaluated_at": inner.last_eval.map(sinks::rfc3339),
            "firing": firing,
            "rules": rules,
            "recent": recent,
        })
    }

    /// Starts the evaluation timer and the delivery task (stopped by the drain).
    pub fn spawn(self: &Arc<Self>, inputs: AlertInputs, background: &Background) {
        let (alerting, s) = (self.clone(), inputs);
        background.spawn("alerts", move |mut stop| async move {
            loop {
                let interval = alerting.interval();
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = crate::shutdown::stopped(&mut stop) => return,
                }
                alerting.evaluate(&s);
            }
        });
        let receiver = crate::sync::lock(&self.receiver).take();
        let Some(mut rx) = receiver else { return };
        let alerting = self.clone();
        background.spawn("alert-delivery", move |mut stop| async move {
                let mut running = JoinSet::new();
                loop {
                    tokio::select! {
                        Some(d) = rx.recv(), if running.len() < CONCURRENT_DELIVERIES => {
                            let stop = stop.clone();
                            let metrics = alerting.metrics.clone();
                            running.spawn(async move {
                                let kind = d.sink.kind;
                                let what = d.what.clone();
                                match sinks::deliver(d, stop).await {
                                    Ok(attempts) => {
                                        metrics.notification(kind, "delivered");
                                        tracing::debug!(sink = kind.as_str(), alert = %what, attempts, "alert delivered");
                                    }
                                    Err(e) => {
                                        metrics.notification(kind, "failed");
                                        tracing::warn!(sink = kind.as_str(), alert = %what, error = %e, "alert delivery failed");
                                    }
                                }
                            });
                        }
                        Some(_) = running.join_next(), if !running.is_empty() => {}
                        _ = crate::shutdown::stopped(&mut stop) => {
                            running.abort_all();
                            return;
                        }
                    }
                }
            });
    }
}

impl KeyedState for Alerting {
    /// New rules and sinks; rules that did not change keep their state.
    fn reconcile(&self, config: &Config) {
        let now = Instant::now();
        let transitions = {
            let mut inner = self.inner();
            inner.config = config.alerts.clone();
            inner.evaluator.reconfigure(&config.alerts.rules, Some(now))
        };
        self.apply(&transitions, now, SystemTime::now());
    }
}

fn log(e: &AlertEvent) {
    let (alert, severity, summary) = (e.rule.as_str(), e.severity.as_str(), e.summary.as_str());
    match (e.status, e.severity) {
        (Change::Pending, _) => {
            tracing::info!(target: "rampart::alert", alert, severity, summary, "alert pending")
        }
        (Change::Firing, Severity::Critical) => {
            tracing::error!(target: "rampart::alert", alert, severity, summary, "alert FIRING")
        }
        (Change::Firing, _) => {
            tracing::warn!(target: "rampart::alert", alert, severity, summary, "alert FIRING")
        }
        (Change::Resolved, _) => {
            tracing::info!(target: "rampart::alert", alert, severity, summary, "alert resolved")
        }
    }
}

/// The host name (pods: the pod name), else "rampart".
fn instance_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rampart".into())
}

// === reading the signals ===

/// A rule's signal now. Rates and latencies come from the series (the window before
/// `current`); states are read live.
fn read(rule: &AlertRule, shared: &AlertInputs, current: &Sample, series: &Series) -> Reading {
    let filter = Filter {
        route: rule.route.clone(),
        upstream: rule.upstream.clone(),
    };
    let enough = |n: u64| n >= rule.min_samples;
    match rule.signal {
        Signal::ErrorRate | Signal::LatencyP95 | Signal::LatencyAvg => {
            let t = series.over(current, rule.window, &filter);
            let value = match rule.signal {
                Signal::ErrorRate => t.error_rate().filter(|_| enough(t.requests)),
                Signal::LatencyP95 => t.p95().filter(|_| enough(t.latency.count())),
                _ => t.mean().filter(|_| enough(t.latency.count())),
            };
            Reading::of(value)
        }
        Signal::DbErrorRate => {
            let f = series.fed_over(current, rule.window);
            Reading::of(enough(f.db_queries).then(|| f.db_errors as f64 / f.db_queries as f64))
        }
        Signal::CacheHitRate => {
            let f = series.fed_over(current, rule.window);
            let lookups = f.cache_hits + f.cache_misses;
            Reading::of(enough(lookups).then(|| f.cache_hits as f64 / lookups as f64))
        }
        Signal::PoolUsage => Reading::of(signals::pool_usage(&shared.health, &shared.signals)),
        Signal::MemoryUsage => Reading::of(signals::memory_usage(&shared.health, &shared.signals)),
        Signal::BreakerOpen => {
            let snapshot = shared.snapshot.load();
            let mut names: Vec<&str> = snapshot
                .upstreams
                .keys()
                .map(String::as_str)
                .filter(|n| rule.upstream.as_deref().is_none_or(|u| u == *n))
                .collect();
            if names.is_empty() {
                return Reading::default();
            }
            names.sort_unstable();
            // Half-open is not closed yet: the upstream has not shown it recovered. Any
            // breaker of the upstream counts (one per route with `scope: route`).
            let open: Vec<String> = names
                .into_iter()
                .filter_map(|n| snapshot.upstreams.get(n))
                .flat_map(|u| u.state.breakers())
                .filter(|b| b.state() != BreakerState::Closed)
                .map(|b| b.display_name())
                .collect();
            Reading {
                value: Some(if open.is_empty() { 0.0 } else { 1.0 }),
                detail: (!open.is_empty()).then(|| format!("open: {}", open.join(", "))),
            }
        }
        Signal::RatelimitFallbackActive => {
            if !shared.limiters.uses_redis() {
                return Reading::default();
            }
            let on = shared.limiters.fallback_active();
            Reading {
                value: Some(f64::from(u8::from(on))),
                detail: on.then(|| "Redis policies are decided in memory".to_owned()),
            }
        }
        Signal::CertificateExpiry => certificate_expiry(rule, &shared.certs, current.wall),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AlertsConfig;

    #[test]
    fn a_resolved_summary_states_no_comparison() {
        let mut r = AlertsConfig::default_rules()[0].clone();
        r.threshold = 0.01;
        r.upstream = Some("backend".into());
        assert_eq!(
            summary(&r, Change::Firing, Some(0.125), None),
            "error_rate 12.5% > 1.0% over 5m (upstream backend)"
        );
        assert_eq!(
            summary(&r, Change::Resolved, Some(0.0), None),
            "error_rate back under 1.0% (0.0%) over 5m (upstream backend)"
        );
        // A rule resolved because it was removed may still meet its condition: no claim.
        assert_eq!(
            summary(&r, Change::Resolved, Some(0.125), None),
            "resolved: error_rate 12.5% (threshold 1.0%) over 5m (upstream backend)"
        );
        let mut low = r.clone();
        low.comparison = Comparison::Below;
        low.threshold = 0.5;
        assert_eq!(
            summary(&low, Change::Resolved, Some(0.9), None),
            "error_rate back over 50.0% (90.0%) over 5m (upstream backend)"
        );
        let b = AlertsConfig::default_rules()
            .into_iter()
            .find(|r| r.signal == Signal::BreakerOpen)
            .unwrap();
        assert_eq!(b.for_, Duration::ZERO);
        assert_eq!(
            summary(&b, Change::Resolved, Some(0.0), None),
            "resolved: breaker_open no"
        );
    }
}
