//! One release as a state machine. Nothing here sleeps or reads a clock: every call is
//! given `now` (ms since the Unix epoch) and the [`Groups`] it reads and drives.
//!
//! The rules (docs/releases.md says the same to operators):
//! - start: refused unless the target group's health checks pass (`checks_passing ==
//!   Some(true)`, at least one endpoint available); an upstream without `health_check` is
//!   refused, since nothing would tell a dead target from a live one;
//! - every tick, running or paused: roll back at once (all weight to the old group) when
//!   the target's health fails or the upstream's breaker is open;
//! - at the end of a step, over the step's window: fewer than `min_requests` extends the
//!   step by `step_for` (at most [`MAX_EXTENSIONS`] times, then the release pauses: it never
//!   promotes blind); the gate (error rate, P95) passes: next step (after 100 %: promoted);
//!   it fails: roll back, unless the old group, with at least `min_requests` in the same
//!   window, misses the gate too and the target is no more than twice as bad on what
//!   failed: then the trouble is shared (a database, the network), rolling back would not
//!   cure it, and the step is extended like a quiet one.

use serde::{Deserialize, Serialize};

use super::{GroupTotals, Groups};
use crate::config::ReleaseConfig;

/// A step without enough requests (or with shared trouble) is extended at most this many
/// times, so a step lasts at most `(1 + MAX_EXTENSIONS) * step_for`.
pub(crate) const MAX_EXTENSIONS: u32 = 3;
/// How much worse than the old group the target may be when both miss the gate.
const SHARED_TROUBLE_FACTOR: f64 = 2.0;

/// Where a release is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(crate) enum State {
    /// A release from the configuration that cannot start yet (the target is not healthy
    /// yet, or another release runs on the upstream); tried again every tick.
    Waiting {
        reason: String,
    },
    /// At `steps[step]`.
    Running {
        step: usize,
    },
    /// Holding `steps[step]`'s weights; health and breaker still roll back.
    Paused {
        step: usize,
        reason: String,
    },
    Promoted,
    RolledBack {
        reason: String,
    },
    Aborted,
}

impl State {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            State::Waiting { .. } => "waiting",
            State::Running { .. } => "running",
            State::Paused { .. } => "paused",
            State::Promoted => "promoted",
            State::RolledBack { .. } => "rolled_back",
            State::Aborted => "aborted",
        }
    }

    pub(crate) const ALL: &'static [&'static str] = &[
        "waiting",
        "running",
        "paused",
        "promoted",
        "rolled_back",
        "aborted",
    ];

    /// Running or paused: the release holds the upstream's weights.
    pub(crate) fn active(&self) -> bool {
        matches!(self, State::Running { .. } | State::Paused { .. })
    }

    pub(crate) fn finished(&self) -> bool {
        matches!(
            self,
            State::Promoted | State::RolledBack { .. } | State::Aborted
        )
    }

    fn step(&self) -> Option<usize> {
        match self {
            State::Running { step } | State::Paused { step, .. } => Some(*step),
            _ => None,
        }
    }
}

/// What a window measured: the target's figures and, where it had traffic, the old
/// group's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Figures {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: Option<f64>,
    pub p95_ms: Option<u64>,
    pub baseline_requests: u64,
    pub baseline_error_rate: Option<f64>,
    pub baseline_p95_ms: Option<u64>,
}

impl Figures {
    fn of(target: &GroupTotals, old: &GroupTotals) -> Figures {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Figures {
            requests: target.requests,
            errors: target.errors,
            error_rate: target.error_rate(),
            p95_ms: target.p95().map(ms),
            baseline_requests: old.requests,
            baseline_error_rate: old.error_rate(),
            baseline_p95_ms: old.p95().map(ms),
        }
    }

    fn text(&self) -> String {
        let pct = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{:.2}%", r * 100.0));
        let ms = |m: Option<u64>| m.map_or("-".to_owned(), |m| format!("{m}ms"));
        let mut s = format!(
            "{} requests, error rate {}, p95 {}",
            self.requests,
            pct(self.error_rate),
            ms(self.p95_ms)
        );
        if self.baseline_requests > 0 {
            s.push_str(&format!(
                "; old group {} requests, error rate {}, p95 {}",
                self.baseline_requests,
                pct(self.baseline_error_rate),
                ms(self.baseline_p95_ms)
            ));
        }
        s
    }
}

/// One entry of a release's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Event {
    /// ms since the Unix epoch.
    pub at: u64,
    /// started, step, extended, paused, resumed, promoted, rolled_back, aborted, waiting.
    pub what: String,
    /// The target's percentage after the event.
    pub percent: u32,
    pub detail: String,
    pub figures: Option<Figures>,
}

/// What a call changed, for the manager's notifications and log lines.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Nothing,
    /// Weights or state moved; nothing to notify.
    Changed,
    Promoted,
    RolledBack(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Release {
    pub id: String,
    pub spec: ReleaseConfig,
    /// Started by the configuration (`releases:`), not the admin API.
    pub from_config: bool,
    /// The group that had the most weight at the start.
    pub from: String,
    pub state: State,
    pub started_at: u64,
    pub step_started: u64,
    pub extensions: u32,
    /// The weights this release last set.
    pub weights: Vec<(String, u32)>,
    pub history: Vec<Event>,
    /// The current step's figures so far (refreshed each tick).
    pub current: Option<Figures>,
    /// The groups' totals when the step started: a window is now minus these. Not
    /// persisted: a restart starts the step's window again.
    base_to: GroupTotals,
    base_from: GroupTotals,
}

/// Why the target cannot take traffic now, if it cannot.
fn unhealthy(spec: &ReleaseConfig, groups: &dyn Groups) -> Option<String> {
    let (u, g) = (&spec.upstream, &spec.to);
    let Some(h) = groups.health(u, g) else {
        return Some(format!("upstream {u} has no endpoint group {g}"));
    };
    match h.checks_passing {
        None => Some(format!(
            "upstream {u} has no health_check: a release needs one to know that group {g} is up"
        )),
        Some(false) => Some(format!(
            "group {g} has not passed its health check ({} of {} endpoints available)",
            h.available, h.endpoints
        )),
        Some(true) if h.available == 0 => Some(format!("group {g} has no endpoint available")),
        Some(true) => None,
    }
}

/// The group that gives up its weight: the one with the most now (the first by name on a
/// tie), which must not be the target.
fn old_group(spec: &ReleaseConfig, groups: &dyn Groups) -> Result<String, String> {
    let u = &spec.upstream;
    let Some(weights) = groups.weights(u) else {
        return Err(format!("upstream {u} has no endpoint groups"));
    };
    if !weights.iter().any(|(g, _)| *g == spec.to) {
        let names: Vec<&str> = weights.iter().map(|(g, _)| g.as_str()).collect();
        return Err(format!(
            "upstream {u} has no endpoint group {} (groups: {})",
            spec.to,
            names.join(", ")
        ));
    }
    let mut best: Option<&(String, u32)> = None;
    for w in &weights {
        if best.is_none_or(|b| w.1 > b.1 || (w.1 == b.1 && w.0 < b.0)) {
            best = Some(w);
        }
    }
    match best {
        Some((g, _)) if *g == spec.to => Err(format!(
            "group {} already has the most weight of upstream {u}: nothing to release",
            spec.to
        )),
        Some((g, _)) => Ok(g.clone()),
        None => Err(format!("upstream {u} has no endpoint groups")),
    }
}

impl Release {
    /// Checks that the release can start and moves the first step's weight; on refusal
    /// nothing was changed.
    pub(crate) fn start(
        id: String,
        spec: ReleaseConfig,
        from_config: bool,
        groups: &dyn Groups,
        now: u64,
    ) -> Result<Release, String> {
        let from = old_group(&spec, groups)?;
        if let Some(reason) = unhealthy(&spec, groups) {
            return Err(reason);
        }
        let mut r = Release {
            id,
            spec,
            from_config,
            from,
            state: State::Running { step: 0 },
            started_at: now,
            step_started: now,
            extensions: 0,
            weights: Vec::new(),
            history: Vec::new(),
            current: None,
            base_to: GroupTotals::default(),
            base_from: GroupTotals::default(),
        };
        r.enter_step(0, groups, now)?;
        let p = r.percent();
        r.record(
            now,
            "started",
            format!("{} -> {}: {p}% to {}", r.from, r.spec.to, r.spec.to),
            None,
        );
        Ok(r)
    }

    /// A configuration release that cannot start yet; `start` replaces it.
    pub(crate) fn waiting(id: String, spec: ReleaseConfig, reason: String, now: u64) -> Release {
        let mut r = Release {
            id,
            spec,
            from_config: true,
            from: String::new(),
            state: State::Waiting {
                reason: reason.clone(),
            },
            started_at: now,
            step_started: now,
            extensions: 0,
            weights: Vec::new(),
            history: Vec::new(),
            current: None,
            base_to: GroupTotals::default(),
            base_from: GroupTotals::default(),
        };
        r.record(now, "waiting", reason, None);
        r
    }

    /// Still waiting, for another reason (recorded).
    pub(crate) fn wait(&mut self, reason: String, now: u64) {
        self.state = State::Waiting {
            reason: reason.clone(),
        };
        self.record(now, "waiting", reason, None);
    }

    /// Rebuilt from the persisted fields (`store.rs`); the step's window starts again now.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn restored(
        id: String,
        spec: ReleaseConfig,
        from_config: bool,
        from: String,
        state: State,
        started_at: u64,
        weights: Vec<(String, u32)>,
        history: Vec<Event>,
        groups: &dyn Groups,
        now: u64,
    ) -> Release {
        let mut r = Release {
            id,
            spec,
            from_config,
            from,
            state,
            started_at,
            step_started: now,
            extensions: 0,
            weights,
            history,
            current: None,
            base_to: GroupTotals::default(),
            base_from: GroupTotals::default(),
        };
        r.snapshot_bases(groups);
        r
    }

    /// The target's share now, in percent.
    pub(crate) fn percent(&self) -> u32 {
        match &self.state {
            State::Promoted => 100,
            State::Waiting { .. } | State::RolledBack { .. } | State::Aborted => 0,
            State::Running { step } | State::Paused { step, .. } => {
                self.spec.steps.get(*step).copied().unwrap_or(100)
            }
        }
    }

    pub(crate) fn step_index(&self) -> Option<usize> {
        self.state.step()
    }

    /// `percent` to the target, the rest to the old group, 0 to any other group.
    fn weights_for(&self, percent: u32, groups: &dyn Groups) -> Vec<(String, u32)> {
        let names: Vec<String> = groups
            .weights(&self.spec.upstream)
            .map(|w| w.into_iter().map(|(g, _)| g).collect())
            .unwrap_or_else(|| vec![self.from.clone(), self.spec.to.clone()]);
        names
            .into_iter()
            .map(|g| {
                let w = if g == self.spec.to {
                    percent
                } else if g == self.from {
                    100 - percent.min(100)
                } else {
                    0
                };
                (g, w)
            })
            .collect()
    }

    fn apply(&mut self, percent: u32, groups: &dyn Groups) -> Result<(), String> {
        let weights = self.weights_for(percent, groups);
        groups.set_weights(&self.spec.upstream, &weights)?;
        self.weights = weights;
        Ok(())
    }

    /// Re-applies the weights this release set (a restart, a follower replica).
    pub(crate) fn reapply(&self, groups: &dyn Groups) -> Result<(), String> {
        if self.weights.is_empty() {
            return Ok(());
        }
        groups.set_weights(&self.spec.upstream, &self.weights)
    }

    fn snapshot_bases(&mut self, groups: &dyn Groups) {
        let u = &self.spec.upstream;
        self.base_to = groups.totals(u, &self.spec.to).unwrap_or_default();
        self.base_from = groups.totals(u, &self.from).unwrap_or_default();
    }

    fn enter_step(&mut self, step: usize, groups: &dyn Groups, now: u64) -> Result<(), String> {
        let percent = self.spec.steps.get(step).copied().unwrap_or(100);
        self.apply(percent, groups)?;
        self.state = State::Running { step };
        self.step_started = now;
        self.extensions = 0;
        self.current = None;
        self.snapshot_bases(groups);
        Ok(())
    }

    fn record(&mut self, at: u64, what: &str, detail: String, figures: Option<Figures>) {
        let percent = self.percent();
        self.history.push(Event {
            at,
            what: what.to_owned(),
            percent,
            detail,
            figures,
        });
    }

    /// The window since the step started.
    fn window(&self, groups: &dyn Groups) -> (GroupTotals, GroupTotals) {
        let u = &self.spec.upstream;
        let to = groups.totals(u, &self.spec.to).unwrap_or_default();
        let from = groups.totals(u, &self.from).unwrap_or_default();
        (to.since(&self.base_to), from.since(&self.base_from))
    }

    /// All weight back to the old group; the reason is kept.
    pub(crate) fn roll_back(&mut self, reason: String, groups: &dyn Groups, now: u64) -> Outcome {
        let figures = self.current.clone();
        let applied = self.apply(0, groups);
        self.state = State::RolledBack {
            reason: reason.clone(),
        };
        let detail = match applied {
            Ok(()) => reason.clone(),
            Err(e) => format!("{reason} (the weights could not be set: {e})"),
        };
        self.record(now, "rolled_back", detail, figures);
        Outcome::RolledBack(reason)
    }

    /// One evaluation. Health and breaker every time; the gate when the step is over.
    pub(crate) fn tick(&mut self, groups: &dyn Groups, now: u64) -> Outcome {
        let Some(step) = self.state.step() else {
            return Outcome::Nothing;
        };
        if let Some(reason) = unhealthy(&self.spec, groups) {
            return self.roll_back(reason, groups, now);
        }
        if groups.breaker_open(&self.spec.upstream) {
            let reason = format!("the breaker of upstream {} opened", self.spec.upstream);
            return self.roll_back(reason, groups, now);
        }
        let (to, from) = self.window(groups);
        let figures = Figures::of(&to, &from);
        self.current = Some(figures.clone());
        if matches!(self.state, State::Paused { .. }) {
            return Outcome::Nothing;
        }
        let step_for = u64::try_from(self.spec.step_for.as_millis()).unwrap_or(u64::MAX);
        let ends = self
            .step_started
            .saturating_add(step_for.saturating_mul(u64::from(self.extensions) + 1));
        if now < ends {
            return Outcome::Nothing;
        }
        let gate = &self.spec.gate;
        if to.requests < gate.min_requests {
            let why = format!(
                "{} requests of the {} the gate needs",
                to.requests, gate.min_requests
            );
            return self.extend(why, figures, now);
        }
        let failed = self.gate_failures(&to, &from);
        if failed.is_empty() {
            return self.advance(step, figures, groups, now);
        }
        let text = failed.iter().map(|f| f.text.as_str()).collect::<Vec<_>>();
        let text = text.join(", ");
        if from.requests >= gate.min_requests && failed.iter().all(|f| f.shared) {
            let why = format!("{text}, but the old group misses the gate too (shared trouble)");
            return self.extend(why, figures, now);
        }
        let reason = format!(
            "gate failed at {}%: {text} ({})",
            self.percent(),
            figures.text()
        );
        self.roll_back(reason, groups, now)
    }

    /// What of the gate the target misses, each said with its figures; `shared` when the
    /// old group misses the same limit and the target is at most twice as bad.
    fn gate_failures(&self, to: &GroupTotals, from: &GroupTotals) -> Vec<Failure> {
        let gate = &self.spec.gate;
        let mut out = Vec::new();
        if let Some(rate) = to.error_rate().filter(|r| *r > gate.max_error_rate) {
            let old = from.error_rate().unwrap_or(0.0);
            out.push(Failure {
                text: format!(
                    "error rate {:.2}% > {:.2}%",
                    rate * 100.0,
                    gate.max_error_rate * 100.0
                ),
                shared: old > gate.max_error_rate && rate <= old * SHARED_TROUBLE_FACTOR,
            });
        }
        if let Some(p95) = to.p95().filter(|p| *p > gate.max_p95) {
            let shared = from.p95().is_some_and(|old| {
                old > gate.max_p95 && p95.as_secs_f64() <= old.as_secs_f64() * SHARED_TROUBLE_FACTOR
            });
            out.push(Failure {
                text: format!("p95 {}ms > {}ms", p95.as_millis(), gate.max_p95.as_millis()),
                shared,
            });
        }
        out
    }

    fn extend(&mut self, why: String, figures: Figures, now: u64) -> Outcome {
        let Some(step) = self.state.step() else {
            return Outcome::Nothing;
        };
        if self.extensions < MAX_EXTENSIONS {
            self.extensions += 1;
            let detail = format!(
                "{why}: step extended by {} ({} of {MAX_EXTENSIONS})",
                humantime::format_duration(self.spec.step_for),
                self.extensions
            );
            self.record(now, "extended", detail, Some(figures));
            return Outcome::Changed;
        }
        let reason = format!(
            "{why} after {MAX_EXTENSIONS} extensions: paused at {}% (resume, promote or abort)",
            self.percent()
        );
        self.state = State::Paused {
            step,
            reason: reason.clone(),
        };
        self.record(now, "paused", reason, Some(figures));
        Outcome::Changed
    }

    fn advance(&mut self, step: usize, figures: Figures, groups: &dyn Groups, now: u64) -> Outcome {
        let passed = format!("gate passed at {}%: {}", self.percent(), figures.text());
        if step + 1 >= self.spec.steps.len() {
            self.state = State::Promoted;
            self.current = None;
            self.record(now, "promoted", passed, Some(figures));
            return Outcome::Promoted;
        }
        if let Err(e) = self.enter_step(step + 1, groups, now) {
            let reason = format!("{passed}; the next step's weights could not be set: {e}");
            return self.roll_back(reason, groups, now);
        }
        let detail = format!("{passed}; now {}%", self.percent());
        self.record(now, "step", detail, Some(figures));
        Outcome::Changed
    }

    // === the operator's actions ===

    pub(crate) fn pause(&mut self, now: u64) -> Result<(), String> {
        let State::Running { step } = self.state else {
            return Err(format!(
                "release {} is {}, not running",
                self.id,
                self.state.as_str()
            ));
        };
        let reason = "paused by the operator".to_owned();
        self.state = State::Paused {
            step,
            reason: reason.clone(),
        };
        self.record(now, "paused", reason, self.current.clone());
        Ok(())
    }

    /// Back to running; the step starts again (its window too).
    pub(crate) fn resume(&mut self, groups: &dyn Groups, now: u64) -> Result<(), String> {
        let State::Paused { step, .. } = self.state else {
            return Err(format!(
                "release {} is {}, not paused",
                self.id,
                self.state.as_str()
            ));
        };
        if let Some(reason) = unhealthy(&self.spec, groups) {
            return Err(format!("not resumed: {reason}"));
        }
        self.enter_step(step, groups, now)?;
        self.record(
            now,
            "resumed",
            "resumed by the operator: the step starts again".into(),
            None,
        );
        Ok(())
    }

    /// Err for an action on a release that has ended.
    fn still_active(&self, verb: &str) -> Result<(), String> {
        if self.state.active() {
            return Ok(());
        }
        Err(format!(
            "release {} is {}: nothing to {verb}",
            self.id,
            self.state.as_str()
        ))
    }

    /// All weight back to the old group, by the operator's decision.
    pub(crate) fn abort(&mut self, groups: &dyn Groups, now: u64) -> Result<(), String> {
        self.still_active("abort")?;
        let applied = self.apply(0, groups);
        self.state = State::Aborted;
        let detail = match applied {
            Ok(()) => format!("aborted by the operator: all weight back to {}", self.from),
            Err(e) => format!("aborted by the operator; the weights could not be set: {e}"),
        };
        self.record(now, "aborted", detail, self.current.clone());
        Ok(())
    }

    /// All weight to the target now, skipping the remaining steps.
    pub(crate) fn promote(&mut self, groups: &dyn Groups, now: u64) -> Result<(), String> {
        self.still_active("promote")?;
        self.apply(100, groups)?;
        self.state = State::Promoted;
        let detail = format!("promoted by the operator: all weight to {}", self.spec.to);
        let figures = self.current.take();
        self.record(now, "promoted", detail, figures);
        Ok(())
    }
}

struct Failure {
    text: String,
    shared: bool,
}
