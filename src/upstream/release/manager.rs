//! Every release of the process: started by the admin API or the configuration, driven by
//! one task ticking every [`TICK`], reported in metrics, notified through the alert sinks
//! (through [`Notify`], which `alert` implements: it comes after `upstream`), and kept in
//! the state file / Redis (`store.rs`). Lives in `app::Shared`, outside the snapshot, so a
//! reload keeps it.
//!
//! A release in the configuration starts when the configuration is loaded or reloaded
//! (while its target is not healthy yet, or another release runs on the upstream, it
//! waits and is tried every tick). It starts once: the same entry (upstream, to, steps,
//! step_for, gate) does not start again while it stays in the configuration, whatever
//! became of it; removing the entry forgets it (a running release goes on; abort it
//! through the API), and writing it again starts it again.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use super::Groups;
use super::machine::{Outcome, Release, State};
use super::store::{Persisted, Store};
use crate::config::ReleaseConfig;

/// How often running releases are evaluated (health and breaker every tick; the gate at
/// the end of each step).
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// Finished releases kept for `/admin/releases` and the state file, newest first.
const KEEP_FINISHED: usize = 20;

/// A release's change worth telling people about.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Notice {
    pub id: String,
    pub upstream: String,
    /// started, promoted, rolled_back or aborted.
    pub kind: &'static str,
    pub summary: String,
    pub at: SystemTime,
}

/// Where notices go (`alert::Alerting` sends them to the sinks).
pub(crate) trait Notify: Send + Sync {
    fn release_notice(&self, notice: &Notice);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    upstream: String,
    state: &'static str,
}

#[derive(Clone, Default, Debug)]
pub(crate) struct ReleaseMetrics {
    step: Family<UpstreamLabel, Gauge>,
    state: Family<StateLabels, Gauge>,
}

impl ReleaseMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = ReleaseMetrics::default();
        registry.register(
            "release_step",
            "The target group's share in percent in the upstream's latest release",
            m.step.clone(),
        );
        registry.register(
            "release_state",
            "1 for the state of the upstream's latest release, 0 for the others",
            m.state.clone(),
        );
        m
    }
}

/// Why a release was not started.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StartError {
    /// Another release runs on the upstream, or another replica drives releases.
    Conflict(String),
    /// The target cannot take traffic, or the upstream has no such group.
    Refused(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ActionError {
    NotFound(String),
    Conflict(String),
}

struct Inner {
    /// Newest last.
    releases: Vec<Release>,
    seq: u64,
    /// Keys of the configuration's releases that started while in the configuration.
    config_done: BTreeSet<String>,
    /// The configuration's releases now.
    config: Vec<ReleaseConfig>,
    /// Changed since the last save.
    dirty: bool,
    /// Another replica drives the releases (Redis): its name. Actions are refused here.
    driver: Option<String>,
}

pub(crate) struct Releases {
    groups: Arc<dyn Groups>,
    inner: Mutex<Inner>,
    notify: Mutex<Option<Arc<dyn Notify>>>,
    metrics: ReleaseMetrics,
    pub(crate) store: Store,
    /// The wall clock when `clock` was taken: `now` is this plus tokio's elapsed time, so
    /// tests that pause tokio's clock move release time too.
    wall: u64,
    clock: tokio::time::Instant,
}

impl std::fmt::Debug for Releases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releases").finish_non_exhaustive()
    }
}

pub(crate) fn wall_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn wall_of(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

impl Releases {
    pub(crate) fn new(groups: Arc<dyn Groups>, metrics: ReleaseMetrics) -> Releases {
        Releases {
            groups,
            inner: Mutex::new(Inner {
                releases: Vec::new(),
                seq: 0,
                config_done: BTreeSet::new(),
                config: Vec::new(),
                dirty: false,
                driver: None,
            }),
            notify: Mutex::new(None),
            metrics,
            store: Store::default(),
            wall: wall_ms(SystemTime::now()),
            clock: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn set_notify(&self, n: Arc<dyn Notify>) {
        *crate::sync::lock(&self.notify) = Some(n);
    }

    /// ms since the Unix epoch, on tokio's clock.
    pub(crate) fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.wall.saturating_add(elapsed)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    fn send(&self, notices: Vec<Notice>) {
        let n = crate::sync::lock(&self.notify).clone();
        for notice in &notices {
            match notice.kind {
                "rolled_back" => {
                    tracing::warn!(release = %notice.id, upstream = %notice.upstream, summary = %notice.summary, "release rolled back")
                }
                kind => {
                    tracing::info!(release = %notice.id, upstream = %notice.upstream, kind, summary = %notice.summary, "release")
                }
            }
            if let Some(n) = &n {
                n.release_notice(notice);
            }
        }
    }

    fn notice(r: &Release, kind: &'static str, summary: String, now: u64) -> Notice {
        Notice {
            id: r.id.clone(),
            upstream: r.spec.upstream.clone(),
            kind,
            summary,
            at: wall_of(now),
        }
    }

    fn refuse_follower(inner: &Inner) -> Option<String> {
        inner.driver.as_ref().map(|d| {
            format!(
                "replica {d} drives the releases (Redis lease): send this to its admin listener"
            )
        })
    }

    /// `POST /admin/releases`: starts at once or says why not; nothing moves on refusal.
    pub(crate) fn start(&self, spec: ReleaseConfig) -> Result<String, StartError> {
        self.start_at(spec, self.now())
    }

    pub(crate) fn start_at(&self, spec: ReleaseConfig, now: u64) -> Result<String, StartError> {
        let (id, notice) = {
            let mut inner = self.inner();
            if let Some(m) = Self::refuse_follower(&inner) {
                return Err(StartError::Conflict(m));
            }
            if let Some(r) = inner
                .releases
                .iter()
                .find(|r| r.spec.upstream == spec.upstream && r.state.active())
            {
                return Err(StartError::Conflict(format!(
                    "release {} is {} on upstream {}: one release per upstream at a time",
                    r.id,
                    r.state.as_str(),
                    spec.upstream
                )));
            }
            inner.seq += 1;
            let id = format!("{}-{}", spec.upstream, inner.seq);
            let r = Release::start(id.clone(), spec, false, &*self.groups, now)
                .map_err(StartError::Refused)?;
            let notice = Self::started(&r, now);
            inner.releases.push(r);
            inner.dirty = true;
            self.publish(&inner);
            (id, notice)
        };
        self.send(vec![notice]);
        Ok(id)
    }

    fn started(r: &Release, now: u64) -> Notice {
        let summary = format!(
            "release {} of upstream {} started: {} -> {}, steps {:?} of {}",
            r.id,
            r.spec.upstream,
            r.from,
            r.spec.to,
            r.spec.steps,
            humantime::format_duration(r.spec.step_for)
        );
        Self::notice(r, "started", summary, now)
    }

    /// `POST /admin/releases/{id}/{action}`.
    pub(crate) fn act(&self, id: &str, action: &str) -> Result<(), ActionError> {
        self.act_at(id, action, self.now())
    }

    pub(crate) fn act_at(&self, id: &str, action: &str, now: u64) -> Result<(), ActionError> {
        let notice = {
            let mut inner = self.inner();
            if let Some(m) = Self::refuse_follower(&inner) {
                return Err(ActionError::Conflict(m));
            }
            let Some(r) = inner.releases.iter_mut().find(|r| r.id == id) else {
                return Err(ActionError::NotFound(format!("no release {id}")));
            };
            let groups = &*self.groups;
            let done = match action {
                "pause" => r.pause(now),
                "resume" => r.resume(groups, now),
                "abort" => r.abort(groups, now),
                "promote" => r.promote(groups, now),
                other => {
                    return Err(ActionError::NotFound(format!(
                        "no action {other} (pause, resume, abort, promote)"
                    )));
                }
            };
            done.map_err(ActionError::Conflict)?;
            let notice = match action {
                "abort" => Some(Self::notice(
                    r,
                    "aborted",
                    format!(
                        "release {} of upstream {} aborted by the operator: all weight back to {}",
                        r.id, r.spec.upstream, r.from
                    ),
                    now,
                )),
                "promote" => Some(Self::notice(
                    r,
                    "promoted",
                    format!(
                        "release {} of upstream {} promoted by the operator: all weight to {}",
                        r.id, r.spec.upstream, r.spec.to
                    ),
                    now,
                )),
                _ => None,
            };
            inner.dirty = true;
            self.publish(&inner);
            notice
        };
        self.send(notice.into_iter().collect());
        Ok(())
    }

    /// One evaluation of every release (the driver calls it every [`TICK`]).
    pub(crate) fn tick(&self) {
        self.tick_at(self.now());
    }

    pub(crate) fn tick_at(&self, now: u64) {
        let notices = {
            let mut inner = self.inner();
            if inner.driver.is_some() {
                return;
            }
            let mut notices = self.start_waiting(&mut inner, now);
            let groups = &*self.groups;
            let mut changed = false;
            for r in inner.releases.iter_mut() {
                let outcome = r.tick(groups, now);
                match outcome {
                    Outcome::Nothing => continue,
                    Outcome::Changed => {}
                    Outcome::Promoted => notices.push(Self::notice(
                        r,
                        "promoted",
                        format!(
                            "release {} of upstream {} promoted: all weight to {}",
                            r.id, r.spec.upstream, r.spec.to
                        ),
                        now,
                    )),
                    Outcome::RolledBack(reason) => notices.push(Self::notice(
                        r,
                        "rolled_back",
                        format!(
                            "release {} of upstream {} rolled back to {}: {reason}",
                            r.id, r.spec.upstream, r.from
                        ),
                        now,
                    )),
                }
                changed = true;
            }
            inner.dirty |= changed;
            Self::prune(&mut inner);
            self.publish(&inner);
            notices
        };
        self.send(notices);
    }

    /// Starts the configuration's releases that wait, where they can.
    fn start_waiting(&self, inner: &mut Inner, now: u64) -> Vec<Notice> {
        let mut notices = Vec::new();
        for i in 0..inner.releases.len() {
            let State::Waiting { reason } = &inner.releases[i].state else {
                continue;
            };
            let old_reason = reason.clone();
            let spec = inner.releases[i].spec.clone();
            let busy = inner
                .releases
                .iter()
                .find(|o| o.spec.upstream == spec.upstream && o.state.active())
                .map(|o| format!("release {} runs on upstream {}", o.id, spec.upstream));
            let id = inner.releases[i].id.clone();
            let result = match busy {
                Some(b) => Err(b),
                None => Release::start(id, spec.clone(), true, &*self.groups, now),
            };
            match result {
                Ok(mut started) => {
                    let mut history = std::mem::take(&mut inner.releases[i].history);
                    history.append(&mut started.history);
                    started.history = history;
                    notices.push(Self::started(&started, now));
                    inner.config_done.insert(spec.key());
                    inner.releases[i] = started;
                    inner.dirty = true;
                }
                Err(reason) if reason != old_reason => {
                    inner.releases[i].wait(reason, now);
                    inner.dirty = true;
                }
                Err(_) => {}
            }
        }
        notices
    }

    /// A configuration was loaded: its releases that are new start (or wait).
    pub(crate) fn configure(&self, releases: &[ReleaseConfig]) {
        self.configure_at(releases, self.now());
    }

    pub(crate) fn configure_at(&self, releases: &[ReleaseConfig], now: u64) {
        {
            let mut inner = self.inner();
            let keys: BTreeSet<String> = releases.iter().map(ReleaseConfig::key).collect();
            inner.config_done.retain(|k| keys.contains(k));
            inner.releases.retain(|r| {
                !matches!(r.state, State::Waiting { .. }) || keys.contains(&r.spec.key())
            });
            for spec in releases {
                let key = spec.key();
                let waiting = inner
                    .releases
                    .iter()
                    .any(|r| matches!(r.state, State::Waiting { .. }) && r.spec.key() == key);
                if inner.config_done.contains(&key) || waiting {
                    continue;
                }
                inner.seq += 1;
                let id = format!("{}-{}", spec.upstream, inner.seq);
                let r = Release::waiting(id, spec.clone(), "not started yet".into(), now);
                inner.releases.push(r);
                inner.dirty = true;
            }
            inner.config = releases.to_vec();
        }
        // Start at once what can start, rather than a tick later.
        self.tick_at(now);
    }

    fn prune(inner: &mut Inner) {
        let finished = inner.releases.iter().filter(|r| r.state.finished()).count();
        let mut drop = finished.saturating_sub(KEEP_FINISHED);
        inner.releases.retain(|r| {
            if drop > 0 && r.state.finished() {
                drop -= 1;
                return false;
            }
            true
        });
    }

    fn publish(&self, inner: &Inner) {
        let mut latest: Vec<&Release> = Vec::new();
        for r in inner.releases.iter().rev() {
            if !latest.iter().any(|l| l.spec.upstream == r.spec.upstream) {
                latest.push(r);
            }
        }
        for r in latest {
            let upstream = r.spec.upstream.clone();
            self.metrics
                .step
                .get_or_create(&UpstreamLabel {
                    upstream: upstream.clone(),
                })
                .set(i64::from(r.percent()));
            for s in State::ALL {
                self.metrics
                    .state
                    .get_or_create(&StateLabels {
                        upstream: upstream.clone(),
                        state: s,
                    })
                    .set(i64::from(r.state.as_str() == *s));
            }
        }
    }

    /// The release with this id (tests).
    #[cfg(test)]
    pub(crate) fn get(&self, id: &str) -> Option<Release> {
        self.inner().releases.iter().find(|r| r.id == id).cloned()
    }

    #[cfg(test)]
    pub(crate) fn list(&self) -> Vec<Release> {
        self.inner().releases.clone()
    }

    // === persistence (store.rs does the I/O) ===

    /// The state to save, if it changed since the last call.
    pub(crate) fn take_dirty(&self) -> Option<Persisted> {
        let mut inner = self.inner();
        if !inner.dirty {
            return None;
        }
        inner.dirty = false;
        Some(Persisted::of(
            inner.seq,
            &inner.config_done,
            &inner.releases,
        ))
    }

    #[cfg(test)]
    pub(crate) fn persisted(&self) -> Persisted {
        let inner = self.inner();
        Persisted::of(inner.seq, &inner.config_done, &inner.releases)
    }

    /// Takes over a saved state (a restart, or the driving replica's state on a follower):
    /// the weights each release last set are set again, active releases start their
    /// step's window again now.
    pub(crate) fn restore(&self, p: Persisted) {
        self.adopt(p, false);
    }

    /// As `restore`; with `keep_local`, releases this replica has that the saved state
    /// does not (started here while nobody held the lease) are kept, and become part of
    /// the state saved next.
    pub(crate) fn adopt(&self, p: Persisted, keep_local: bool) {
        let now = self.now();
        let mut releases = p.releases(&*self.groups, now);
        let mut inner = self.inner();
        if keep_local {
            let local: Vec<Release> = inner
                .releases
                .iter()
                .filter(|l| !releases.iter().any(|r| r.id == l.id))
                .cloned()
                .collect();
            inner.dirty |= !local.is_empty();
            releases.extend(local);
            inner.config_done.extend(p.config_done.iter().cloned());
        } else {
            inner.config_done = p.config_done.iter().cloned().collect();
        }
        for r in &releases {
            if let Err(e) = r.reapply(&*self.groups) {
                tracing::warn!(release = %r.id, error = %e, "release weights not restored");
            }
        }
        inner.seq = inner.seq.max(p.seq);
        inner.releases = releases;
        self.publish(&inner);
    }

    /// Whether a release runs, is paused or waits.
    pub(crate) fn has_work(&self) -> bool {
        self.inner().releases.iter().any(|r| !r.state.finished())
    }

    /// Whether this replica drives (None) or follows another (its name).
    pub(crate) fn set_driver(&self, driver: Option<String>) {
        self.inner().driver = driver;
    }

    pub(crate) fn driver(&self) -> Option<String> {
        self.inner().driver.clone()
    }

    // === /admin/releases ===

    /// One release as `/admin/releases` lists it.
    pub(crate) fn json_of(&self, id: &str) -> Option<Value> {
        self.inner()
            .releases
            .iter()
            .find(|r| r.id == id)
            .map(release_json)
    }

    pub(crate) fn to_json(&self) -> Value {
        let inner = self.inner();
        let releases: Vec<Value> = inner.releases.iter().rev().map(release_json).collect();
        json!({
            "driver": inner.driver.clone().unwrap_or_else(|| "this replica".into()),
            "tick_s": TICK.as_secs(),
            "releases": releases,
        })
    }
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(wall_of(ms)).to_string()
}

fn release_json(r: &Release) -> Value {
    let g = &r.spec.gate;
    let step_for = u64::try_from(r.spec.step_for.as_millis()).unwrap_or(u64::MAX);
    let ends = r
        .step_started
        .saturating_add(step_for.saturating_mul(u64::from(r.extensions) + 1));
    let reason = match &r.state {
        State::Waiting { reason } | State::Paused { reason, .. } | State::RolledBack { reason } => {
            Some(reason.clone())
        }
        _ => None,
    };
    let figures = r.current.as_ref().map(|f| {
        json!({
            "requests": f.requests,
            "errors": f.errors,
            "error_rate": f.error_rate,
            "p95_ms": f.p95_ms,
            "baseline": {
                "requests": f.baseline_requests,
                "error_rate": f.baseline_error_rate,
                "p95_ms": f.baseline_p95_ms,
            },
            "min_requests_met": f.requests >= g.min_requests,
            "error_rate_ok": f.error_rate.is_none_or(|e| e <= g.max_error_rate),
            "p95_ok": f.p95_ms.is_none_or(|p| u128::from(p) <= g.max_p95.as_millis()),
        })
    });
    let weights: serde_json::Map<String, Value> = r
        .weights
        .iter()
        .map(|(k, w)| (k.clone(), json!(w)))
        .collect();
    let history: Vec<Value> = r
        .history
        .iter()
        .map(|e| {
            json!({
                "at": rfc3339(e.at),
                "what": e.what,
                "percent": e.percent,
                "detail": e.detail,
                "figures": e.figures,
            })
        })
        .collect();
    json!({
        "id": r.id,
        "upstream": r.spec.upstream,
        "from": r.from,
        "to": r.spec.to,
        "origin": if r.from_config { "config" } else { "api" },
        "state": r.state.as_str(),
        "reason": reason,
        "step": r.step_index().map(|s| s + 1),
        "steps": r.spec.steps,
        "percent": r.percent(),
        "weights": weights,
        "step_for": humantime::format_duration(r.spec.step_for).to_string(),
        "step_started_at": r.state.active().then(|| rfc3339(r.step_started)),
        "step_ends_at": matches!(r.state, State::Running { .. }).then(|| rfc3339(ends)),
        "extensions": r.extensions,
        "gate": {
            "max_error_rate": format!("{}%", g.max_error_rate * 100.0),
            "max_p95": humantime::format_duration(g.max_p95).to_string(),
            "min_requests": g.min_requests,
        },
        "figures": figures,
        "started_at": rfc3339(r.started_at),
        "history": history,
    })
}
