//! The circuit breaker of one upstream: a pure state machine (takes `now` and an event,
//! returns a decision or a transition); the async shell in the pipeline feeds it.
//!
//! CLOSED --(N consecutive failures, or failure rate over threshold)--> OPEN
//! OPEN --(open_for elapsed)--> HALF_OPEN, admitting at most `half_open_max_probes` at once
//! HALF_OPEN --(half_open_successes successes)--> CLOSED
//! HALF_OPEN --(a probe fails)--> OPEN again for twice as long (capped, jittered)
//! OPEN --(the upstream's active check passed `healthy_after` times in a row)--> HALF_OPEN
//!
//! The last edge is Envoy's `successful_active_health_check_uneject_host`: an upstream
//! that restarted in under a second is seen healthy by its check long before `open_for`
//! ends, and waiting it out turned a 0.4 s restart into 60 s of 503s. It goes to HALF_OPEN,
//! not CLOSED: the check's path passing does not prove the route's requests do. Once per
//! outage: if those probes fail, the route fails while its upstream is healthy (a chat
//! route whose LLM is down), and only `open_for` (doubled) ends the next opening, or the
//! breaker would let probes through every few seconds.
//!
//! Admitting every request while half-open (as the users' original did) turns a recovering
//! upstream into a dead one; here only the probes get through and everything else still
//! fails fast.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// For the state gauge: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead; `probe` is Some(generation) when this request is one of the half-open
    /// trials (the generation tells a late probe of an earlier half-open period apart).
    Allowed { probe: Option<u64> },
    /// Fail fast; come back after this long.
    Rejected { retry_after: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Says nothing about the upstream (client went away, 4xx, our own limits).
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Transition {
    Opened { open_for: Duration },
    HalfOpened,
    Closed,
}

impl Transition {
    pub(crate) fn to(self) -> State {
        match self {
            Transition::Opened { .. } => State::Open,
            Transition::HalfOpened => State::HalfOpen,
            Transition::Closed => State::Closed,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        in_flight: u32,
        successes: u32,
        generation: u64,
    },
}

/// Failure share over a sliding window of 10 buckets.
#[derive(Debug)]
struct RateWindow {
    bucket_len: Duration,
    buckets: [(u32, u32); 10],
    current: usize,
    current_start: Instant,
}

impl RateWindow {
    fn new(window: Duration, now: Instant) -> Self {
        RateWindow {
            bucket_len: (window / 10).max(Duration::from_millis(1)),
            buckets: [(0, 0); 10],
            current: 0,
            current_start: now,
        }
    }

    fn advance(&mut self, now: Instant) {
        let mut steps = 0;
        while now.duration_since(self.current_start) >= self.bucket_len && steps < 10 {
            self.current = (self.current + 1) % 10;
            self.buckets[self.current] = (0, 0);
            self.current_start += self.bucket_len;
            steps += 1;
        }
        if steps == 10 {
            // Idle for a whole window or more: start afresh from now.
            self.current_start = now;
        }
    }

    fn record(&mut self, now: Instant, failed: bool) {
        self.advance(now);
        let b = &mut self.buckets[self.current];
        b.0 += 1;
        if failed {
            b.1 += 1;
        }
    }

    fn trips(&self, threshold: f64, min_calls: u32) -> bool {
        let (calls, failures) = self
            .buckets
            .iter()
            .fold((0u32, 0u32), |(c, f), b| (c + b.0, f + b.1));
        calls >= min_calls && calls > 0 && f64::from(failures) / f64::from(calls) >= threshold
    }

    fn clear(&mut self) {
        self.buckets = [(0, 0); 10];
    }
}

#[derive(Debug)]
pub(crate) struct Breaker {
    cfg: BreakerConfig,
    inner: Inner,
    consecutive_failures: u32,
    window: Option<RateWindow>,
    /// The last open period, doubled on each re-open from half-open.
    open_for: Duration,
    /// Counts half-open periods.
    generation: u64,
    /// When the current state was entered.
    since: Instant,
    /// Active health checks passed in a row while OPEN (0 in any other state).
    health_passes: u32,
    /// Health-informed recovery was tried since the breaker was last CLOSED.
    health_tried: bool,
}

impl Breaker {
    pub(crate) fn new(cfg: BreakerConfig, now: Instant) -> Self {
        let window = cfg
            .failure_rate
            .as_ref()
            .map(|r| RateWindow::new(r.window, now));
        Breaker {
            open_for: cfg.open_for,
            cfg,
            inner: Inner::Closed,
            consecutive_failures: 0,
            window,
            generation: 0,
            since: now,
            health_passes: 0,
            health_tried: false,
        }
    }

    /// A new configuration keeps the current state (a reload must not close an open breaker).
    pub(crate) fn reconfigure(&mut self, cfg: BreakerConfig, now: Instant) {
        if cfg.failure_rate.as_ref().map(|r| r.window)
            != self.cfg.failure_rate.as_ref().map(|r| r.window)
        {
            self.window = cfg
                .failure_rate
                .as_ref()
                .map(|r| RateWindow::new(r.window, now));
        }
        self.cfg = cfg;
    }

    pub(crate) fn state(&self) -> State {
        match self.inner {
            Inner::Closed => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// When the current state was entered.
    pub(crate) fn since(&self) -> Instant {
        self.since
    }

    /// OPEN and still failing requests fast at `now` (an OPEN breaker whose `open_for` is
    /// over admits the next request as a probe, so it no longer blocks anything).
    pub(crate) fn blocks(&self, now: Instant) -> bool {
        matches!(self.inner, Inner::Open { until } if now < until)
    }

    /// The upstream's active check passed. After `needed` passes in a row while OPEN, the
    /// breaker goes HALF_OPEN at once rather than at the end of `open_for`.
    pub(crate) fn health_passed(&mut self, now: Instant, needed: u32) -> Option<Transition> {
        if !matches!(self.inner, Inner::Open { .. }) || self.health_tried {
            return None;
        }
        self.health_passes = self.health_passes.saturating_add(1);
        if self.health_passes < needed.max(1) {
            return None;
        }
        self.half_open(now, 0);
        self.health_tried = true;
        Some(Transition::HalfOpened)
    }

    /// The upstream's active check failed: passes start counting again.
    pub(crate) fn health_failed(&mut self) {
        self.health_passes = 0;
    }

    #[cfg(test)]
    /// The generation of the current half-open period, if half-open.
    pub(crate) fn current_generation(&self) -> Option<u64> {
        match self.inner {
            Inner::HalfOpen { generation, .. } => Some(generation),
            _ => None,
        }
    }

    #[cfg(test)]
    /// Probes currently admitted and not yet reported.
    pub(crate) fn probes_in_flight(&self) -> u32 {
        match self.inner {
            Inner::HalfOpen { in_flight, .. } => in_flight,
            _ => 0,
        }
    }

    pub(crate) fn admit(&mut self, now: Instant) -> (Admit, Option<Transition>) {
        match &mut self.inner {
            Inner::Closed => (Admit::Allowed { probe: None }, None),
            Inner::Open { until } => {
                if now >= *until {
                    self.half_open(now, 1);
                    (
                        Admit::Allowed {
                            probe: Some(self.generation),
                        },
                        Some(Transition::HalfOpened),
                    )
                } else {
                    let retry_after = until.duration_since(now);
                    (Admit::Rejected { retry_after }, None)
                }
            }
            Inner::HalfOpen {
                in_flight,
                generation,
                ..
            } => {
                if *in_flight < self.cfg.half_open_max_probes {
                    *in_flight += 1;
                    (
                        Admit::Allowed {
                            probe: Some(*generation),
                        },
                        None,
                    )
                } else {
                    (
                        Admit::Rejected {
                            retry_after: Duration::from_secs(1),
                        },
                        None,
                    )
                }
            }
        }
    }

    /// Reports how an admitted request went. `probe` must be what `admit` said.
    pub(crate) fn on_result(
        &mut self,
        now: Instant,
        outcome: Outcome,
        probe: Option<u64>,
    ) -> Option<Transition> {
        match (&mut self.inner, probe) {
            (
                Inner::HalfOpen {
                    in_flight,
                    successes,
                    generation,
                },
                Some(g),
            ) if g == *generation => {
                *in_flight = in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Ignored => None,
                    Outcome::Success => {
                        *successes += 1;
                        if *successes >= self.cfg.half_open_successes {
                            self.close(now);
                            Some(Transition::Closed)
                        } else {
                            None
                        }
                    }
                    Outcome::Failure => {
                        let doubled = self.open_for.saturating_mul(2).min(self.cfg.max_open_for);
                        // Jitter so that replicas re-probe at different moments.
                        let open_for =
                            crate::jitter::spread(doubled, 0.1).min(self.cfg.max_open_for);
                        Some(self.open(now, open_for))
                    }
                }
            }
            (Inner::Closed, None) => {
                match outcome {
                    Outcome::Ignored => return None,
                    Outcome::Success => self.consecutive_failures = 0,
                    Outcome::Failure => self.consecutive_failures += 1,
                }
                let by_rate = match (&mut self.window, &self.cfg.failure_rate) {
                    (Some(w), Some(r)) => {
                        w.record(now, outcome == Outcome::Failure);
                        w.trips(r.threshold, r.min_calls)
                    }
                    _ => false,
                };
                if self.consecutive_failures >= self.cfg.failures || by_rate {
                    Some(self.open(now, self.cfg.open_for))
                } else {
                    None
                }
            }
            // Results of requests admitted in an earlier state say nothing about now.
            _ => None,
        }
    }

    /// `in_flight`: 1 when the request that found `open_for` over is the first probe.
    fn half_open(&mut self, now: Instant, in_flight: u32) {
        self.generation += 1;
        self.inner = Inner::HalfOpen {
            in_flight,
            successes: 0,
            generation: self.generation,
        };
        self.since = now;
        self.health_passes = 0;
    }

    fn open(&mut self, now: Instant, open_for: Duration) -> Transition {
        self.open_for = open_for;
        self.since = now;
        self.health_passes = 0;
        self.inner = Inner::Open {
            until: now + open_for,
        };
        self.consecutive_failures = 0;
        if let Some(w) = &mut self.window {
            w.clear();
        }
        Transition::Opened { open_for }
    }

    fn close(&mut self, now: Instant) {
        self.inner = Inner::Closed;
        self.since = now;
        self.health_tried = false;
        self.consecutive_failures = 0;
        self.open_for = self.cfg.open_for;
        if let Some(w) = &mut self.window {
            w.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FailureRate;
    use proptest::prelude::*;

    /// The users' contract: 5 failures, 60 s open, 2 successes (and our defaults on top).
    fn cfg() -> BreakerConfig {
        BreakerConfig::default()
    }

    fn fail(b: &mut Breaker, now: Instant) -> Option<Transition> {
        assert_eq!(b.admit(now).0, Admit::Allowed { probe: None });
        b.on_result(now, Outcome::Failure, None)
    }

    #[test]
    fn the_users_contract() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for _ in 0..4 {
            assert_eq!(fail(&mut b, t0), None);
        }
        assert!(matches!(fail(&mut b, t0), Some(Transition::Opened { .. })));
        // Open: rejected at once, Retry-After = the time left.
        let t = t0 + Duration::from_secs(20);
        assert_eq!(
            b.admit(t).0,
            Admit::Rejected {
                retry_after: Duration::from_secs(40)
            }
        );
        // After 60 s: half-open, two probes, the third is rejected.
        let t = t0 + Duration::from_secs(60);
        let p = Some(1);
        assert_eq!(
            b.admit(t),
            (Admit::Allowed { probe: p }, Some(Transition::HalfOpened))
        );
        assert_eq!(b.admit(t).0, Admit::Allowed { probe: p });
        assert!(matches!(b.admit(t).0, Admit::Rejected { .. }));
        // Two successes close it.
        assert_eq!(b.on_result(t, Outcome::Success, p), None);
        assert_eq!(
            b.on_result(t, Outcome::Success, p),
            Some(Transition::Closed)
        );
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        let mut now = t0;
        let mut last = Duration::from_secs(60);
        for _ in 0..6 {
            now += last;
            let Admit::Allowed { probe: p @ Some(_) } = b.admit(now).0 else {
                panic!("expected a probe");
            };
            let Some(Transition::Opened { open_for }) = b.on_result(now, Outcome::Failure, p)
            else {
                panic!("probe failure must reopen");
            };
            let doubled = (last * 2).min(Duration::from_secs(300));
            assert!(
                open_for >= doubled.mul_f64(0.9),
                "{open_for:?} after {last:?}"
            );
            assert!(open_for <= Duration::from_secs(300));
            last = open_for;
        }
        assert!(last >= Duration::from_secs(270));
    }

    #[test]
    fn failure_rate_trips_without_consecutive_failures() {
        let t0 = Instant::now();
        let mut c = cfg();
        c.failure_rate = Some(FailureRate {
            threshold: 0.5,
            window: Duration::from_secs(30),
            min_calls: 20,
        });
        let mut b = Breaker::new(c, t0);
        let mut opened = false;
        for i in 0..40 {
            let now = t0 + Duration::from_millis(i * 10);
            b.admit(now);
            let outcome = if i % 2 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            if let Some(Transition::Opened { .. }) = b.on_result(now, outcome, None) {
                opened = true;
                assert!(i >= 19, "opened before min_calls at {i}");
                break;
            }
        }
        assert!(opened);
    }

    #[test]
    fn ignored_results_free_the_probe_slot_without_closing() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        let t = t0 + Duration::from_secs(60);
        b.admit(t);
        b.admit(t);
        assert_eq!(b.probes_in_flight(), 2);
        b.on_result(t, Outcome::Ignored, Some(1));
        assert_eq!(b.probes_in_flight(), 1);
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[test]
    fn passing_health_checks_half_open_an_open_breaker_at_once() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        // Passes while closed count for nothing.
        assert_eq!(b.health_passed(t0, 2), None);
        assert_eq!(b.health_passed(t0, 2), None);
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        assert_eq!(b.state(), State::Open);
        assert!(b.blocks(t0));
        // Two passes in a row while open; a failure in between starts the count again.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.health_passed(t1, 2), None);
        b.health_failed();
        assert_eq!(b.health_passed(t1, 2), None);
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(b.health_passed(t2, 2), Some(Transition::HalfOpened));
        assert_eq!(
            (b.state(), b.since(), b.blocks(t2)),
            (State::HalfOpen, t2, false)
        );
        // Only probes are admitted, and the probes close it as usual.
        let p = Some(1);
        assert_eq!(b.admit(t2), (Admit::Allowed { probe: p }, None));
        assert_eq!(b.admit(t2), (Admit::Allowed { probe: p }, None));
        assert!(matches!(b.admit(t2).0, Admit::Rejected { .. }));
        assert_eq!(b.health_passed(t2, 2), None, "nothing to do once half-open");
        b.on_result(t2, Outcome::Success, p);
        assert_eq!(
            b.on_result(t2, Outcome::Success, p),
            Some(Transition::Closed)
        );
        assert_eq!(b.since(), t2);
    }

    #[test]
    fn health_informed_recovery_is_tried_once_per_outage() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        assert_eq!(b.health_passed(t0, 1), Some(Transition::HalfOpened));
        let Admit::Allowed { probe } = b.admit(t0).0 else {
            panic!("a probe is admitted");
        };
        assert!(matches!(
            b.on_result(t0, Outcome::Failure, probe),
            Some(Transition::Opened { .. })
        ));
        assert!(b.blocks(t0));
        // The check passing did not mean the route works: no second shortcut this outage.
        for _ in 0..5 {
            assert_eq!(b.health_passed(t0, 2), None);
        }
        assert_eq!(b.state(), State::Open);
        // An OPEN breaker whose time is over no longer blocks (the next request probes).
        let later = t0 + Duration::from_secs(300);
        assert!(!b.blocks(later));
        for closes in [None, Some(Transition::Closed)] {
            let Admit::Allowed { probe } = b.admit(later).0 else {
                panic!("a probe is admitted");
            };
            assert_eq!(b.on_result(later, Outcome::Success, probe), closes);
        }
        // Closed again: the next outage may recover through the check once more.
        for _ in 0..5 {
            fail(&mut b, later);
        }
        assert_eq!(b.health_passed(later, 2), None);
        assert_eq!(b.health_passed(later, 2), Some(Transition::HalfOpened));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Admit,
        Finish(usize, u8),
        Wait(u64),
        Health(bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Admit),
            (0usize..8, 0u8..3).prop_map(|(i, o)| Step::Finish(i, o)),
            (0u64..120_000).prop_map(Step::Wait),
            any::<bool>().prop_map(Step::Health),
        ]
    }

    proptest! {
        /// Never more than `half_open_max_probes` probes at once, and never CLOSED again
        /// after OPEN without `half_open_successes` successful probes.
        #[test]
        fn invariants(steps in proptest::collection::vec(step(), 1..300)) {
            let c = cfg();
            let mut now = Instant::now();
            let mut b = Breaker::new(c.clone(), now);
            let mut admitted: Vec<Option<u64>> = Vec::new();
            let mut probe_successes_since_open = 0u32;
            let mut was_open = false;
            for s in steps {
                match s {
                    Step::Admit => {
                        let (a, t) = b.admit(now);
                        if let Some(Transition::HalfOpened) = t { probe_successes_since_open = 0; }
                        if let Admit::Allowed { probe } = a { admitted.push(probe); }
                    }
                    Step::Finish(i, o) => {
                        if admitted.is_empty() { continue; }
                        let probe = admitted.remove(i % admitted.len());
                        let outcome = [Outcome::Success, Outcome::Failure, Outcome::Ignored][o as usize];
                        let current = b.current_generation();
                        if probe.is_some() && probe == current && outcome == Outcome::Success {
                            probe_successes_since_open += 1;
                        }
                        match b.on_result(now, outcome, probe) {
                            Some(Transition::Opened { .. }) => { was_open = true; probe_successes_since_open = 0; }
                            Some(Transition::Closed) => {
                                prop_assert!(was_open);
                                prop_assert!(probe_successes_since_open >= c.half_open_successes);
                                was_open = false;
                            }
                            _ => {}
                        }
                    }
                    Step::Wait(ms) => now += Duration::from_millis(ms),
                    Step::Health(true) => {
                        if let Some(Transition::HalfOpened) = b.health_passed(now, 2) {
                            probe_successes_since_open = 0;
                        }
                    }
                    Step::Health(false) => b.health_failed(),
                }
                prop_assert!(b.probes_in_flight() <= c.half_open_max_probes);
                if let Some(g) = b.current_generation() {
                    let outstanding = admitted.iter().filter(|p| **p == Some(g)).count() as u32;
                    prop_assert_eq!(b.probes_in_flight(), outstanding);
                }
            }
        }
    }
}
