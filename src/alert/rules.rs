//! The rule state machine, pure: it is given `now` and each rule's reading and returns the
//! transitions. Nothing here reads a clock, the network or the metrics.
//!
//! ```text
//!  inactive ──condition──► pending ──held `for`──► firing ──condition false──► inactive
//!      ▲                      │                                (resolved)
//!      └──false or no data────┘
//! ```
//! A rule with `for: 0s` goes from inactive to firing in one evaluation. An alert fires
//! once and resolves once: staying true, or staying false, says nothing. "No data" (no
//! traffic in the window, a signal nobody feeds) never starts an alert and never resolves
//! one: without evidence, the state stays as it is (a pending one starts over).

use tokio::time::Instant;

use crate::config::AlertRule;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Phase {
    Inactive,
    Pending { since: Instant },
    Firing { since: Instant },
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Inactive => "inactive",
            Phase::Pending { .. } => "pending",
            Phase::Firing { .. } => "firing",
        }
    }
}

/// A rule's signal at one evaluation.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Reading {
    /// None: no data. Never NaN (the readers return None instead).
    pub value: Option<f64>,
    /// What the number alone does not say ("open: fastgpt").
    pub detail: Option<String>,
}

impl Reading {
    pub(crate) fn of(value: Option<f64>) -> Self {
        Reading {
            value: value.filter(|v| v.is_finite()),
            detail: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Pending,
    Firing,
    Resolved,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Pending => "pending",
            Change::Firing => "firing",
            Change::Resolved => "resolved",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Transition {
    pub rule: AlertRule,
    pub change: Change,
    pub reading: Reading,
    /// When the condition started holding (for Resolved: when the alert had started).
    pub since: Instant,
}

/// One step of one rule.
pub(crate) fn step(
    rule: &AlertRule,
    phase: Phase,
    value: Option<f64>,
    now: Instant,
) -> (Phase, Option<Change>) {
    let Some(v) = value.filter(|v| v.is_finite()) else {
        return match phase {
            Phase::Pending { .. } => (Phase::Inactive, None),
            other => (other, None),
        };
    };
    let holds = rule.comparison.holds(v, rule.threshold);
    match (phase, holds) {
        (Phase::Inactive, true) if rule.for_.is_zero() => {
            (Phase::Firing { since: now }, Some(Change::Firing))
        }
        (Phase::Inactive, true) => (Phase::Pending { since: now }, Some(Change::Pending)),
        (Phase::Pending { since }, true) if now.saturating_duration_since(since) >= rule.for_ => {
            (Phase::Firing { since }, Some(Change::Firing))
        }
        (Phase::Pending { .. } | Phase::Inactive, false) => (Phase::Inactive, None),
        (Phase::Firing { .. }, false) => (Phase::Inactive, Some(Change::Resolved)),
        (held, true) => (held, None),
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RuleState {
    pub rule: AlertRule,
    pub phase: Phase,
    /// The last evaluation's reading (None before the first).
    pub last: Option<Reading>,
}

#[derive(Debug, Default)]
pub(crate) struct Evaluator {
    pub rules: Vec<RuleState>,
}

impl Evaluator {
    pub(crate) fn new(rules: &[AlertRule]) -> Self {
        let mut e = Evaluator::default();
        // Nothing is firing yet, so nothing can resolve.
        let _ = e.reconfigure(rules, None);
        e
    }

    /// Takes a new rule list: a rule whose name and definition did not change keeps its
    /// state; one that fired and was removed or changed is resolved (so receivers are not
    /// left with an alert nobody will ever resolve).
    pub(crate) fn reconfigure(
        &mut self,
        rules: &[AlertRule],
        now: Option<Instant>,
    ) -> Vec<Transition> {
        let mut old = std::mem::take(&mut self.rules);
        let mut out = Vec::new();
        for rule in rules {
            let kept = old
                .iter()
                .position(|s| s.rule == *rule)
                .map(|i| old.remove(i));
            self.rules.push(kept.unwrap_or_else(|| RuleState {
                rule: rule.clone(),
                phase: Phase::Inactive,
                last: None,
            }));
        }
        for gone in old {
            if let (Phase::Firing { since }, Some(_)) = (gone.phase, now) {
                out.push(Transition {
                    reading: gone.last.unwrap_or_default(),
                    rule: gone.rule,
                    change: Change::Resolved,
                    since,
                });
            }
        }
        out
    }

    pub(crate) fn evaluate(
        &mut self,
        now: Instant,
        mut read: impl FnMut(&AlertRule) -> Reading,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        for s in &mut self.rules {
            let reading = read(&s.rule);
            let before = s.phase;
            let (phase, change) = step(&s.rule, s.phase, reading.value, now);
            s.phase = phase;
            s.last = Some(reading.clone());
            if let Some(change) = change {
                let since = match (change, before, phase) {
                    (Change::Resolved, Phase::Firing { since }, _) => since,
                    (_, _, Phase::Pending { since } | Phase::Firing { since }) => since,
                    _ => now,
                };
                out.push(Transition {
                    rule: s.rule.clone(),
                    change,
                    reading,
                    since,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{AlertsConfig, Comparison, Signal};

    fn rule(signal: Signal, threshold: f64, for_secs: u64) -> AlertRule {
        let mut r = AlertsConfig::default_rules()[0].clone();
        r.name = "r".into();
        r.signal = signal;
        r.threshold = threshold;
        r.for_ = Duration::from_secs(for_secs);
        r
    }

    /// Runs one evaluation a minute over `values`, returning each minute's change.
    fn run(rule: &AlertRule, values: &[Option<f64>]) -> Vec<Option<&'static str>> {
        let t0 = Instant::now();
        let mut e = Evaluator::new(std::slice::from_ref(rule));
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let now = t0 + Duration::from_secs(60 * i as u64);
                let t = e.evaluate(now, |_| Reading::of(*v));
                assert!(t.len() <= 1);
                t.first().map(|t| t.change.as_str())
            })
            .collect()
    }

    #[test]
    fn fires_once_and_resolves_once() {
        let r = rule(Signal::ErrorRate, 0.05, 0);
        let got = run(
            &r,
            &[
                Some(0.01),
                Some(0.2),
                Some(0.3),
                Some(0.25),
                Some(0.01),
                Some(0.0),
                Some(0.02),
            ],
        );
        assert_eq!(
            got,
            [
                None,
                Some("firing"),
                None,
                None,
                Some("resolved"),
                None,
                None
            ]
        );
    }

    #[test]
    fn for_holds_the_alert_pending_and_a_dip_starts_it_over() {
        let r = rule(Signal::BreakerOpen, 0.0, 120);
        let got = run(
            &r,
            &[
                Some(1.0),
                Some(1.0),
                Some(0.0),
                Some(1.0),
                Some(1.0),
                Some(1.0),
                Some(0.0),
            ],
        );
        // Pending at 0, cleared at 2; pending again at 3, firing 2 minutes later at 5.
        assert_eq!(
            got,
            [
                Some("pending"),
                None,
                None,
                Some("pending"),
                None,
                Some("firing"),
                Some("resolved")
            ]
        );
    }

    #[test]
    fn no_data_neither_fires_nor_resolves() {
        let r = rule(Signal::LatencyAvg, 1.0, 0);
        let got = run(&r, &[None, None, Some(2.0), None, None, Some(0.1), None]);
        assert_eq!(
            got,
            [
                None,
                None,
                Some("firing"),
                None,
                None,
                Some("resolved"),
                None
            ]
        );
        // NaN is treated as no data, never as a value.
        assert_eq!(
            run(&r, &[Some(f64::NAN), Some(f64::INFINITY)]),
            [None, None]
        );
    }

    #[test]
    fn no_data_restarts_a_pending_rule() {
        let r = rule(Signal::ErrorRate, 0.05, 120);
        let got = run(&r, &[Some(0.5), None, Some(0.5), Some(0.5), Some(0.5)]);
        assert_eq!(
            got,
            [Some("pending"), None, Some("pending"), None, Some("firing")]
        );
    }

    #[test]
    fn below_comparisons() {
        let mut r = rule(Signal::CacheHitRate, 0.5, 0);
        r.comparison = Comparison::Below;
        assert_eq!(
            run(&r, &[Some(0.9), Some(0.3), Some(0.6)]),
            [None, Some("firing"), Some("resolved")]
        );
    }

    #[test]
    fn reconfiguring_keeps_unchanged_rules_and_resolves_removed_ones() {
        let t0 = Instant::now();
        let a = rule(Signal::ErrorRate, 0.05, 0);
        let mut b = rule(Signal::LatencyAvg, 1.0, 0);
        b.name = "b".into();
        let mut e = Evaluator::new(&[a.clone(), b.clone()]);
        let t = e.evaluate(t0, |_| Reading::of(Some(5.0)));
        assert_eq!(t.len(), 2);
        let t = e.reconfigure(std::slice::from_ref(&a), Some(t0));
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].rule.name.as_str(), t[0].change),
            ("b", Change::Resolved)
        );
        assert!(matches!(e.rules[0].phase, Phase::Firing { .. }));
        // Still firing: nothing new.
        assert!(
            e.evaluate(t0 + Duration::from_secs(60), |_| Reading::of(Some(5.0)))
                .is_empty()
        );
    }

    #[test]
    fn resolved_carries_when_the_alert_started() {
        let t0 = Instant::now();
        let r = rule(Signal::ErrorRate, 0.05, 60);
        let mut e = Evaluator::new(std::slice::from_ref(&r));
        e.evaluate(t0, |_| Reading::of(Some(1.0)));
        let fired = e.evaluate(t0 + Duration::from_secs(60), |_| Reading::of(Some(1.0)));
        assert_eq!(fired[0].since, t0);
        let resolved = e.evaluate(t0 + Duration::from_secs(120), |_| Reading::of(Some(0.0)));
        assert_eq!(
            (resolved[0].change, resolved[0].since),
            (Change::Resolved, t0)
        );
    }
}
