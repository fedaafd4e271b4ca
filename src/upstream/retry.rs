//! Retries: which failures may be retried for which requests, full-jitter backoff, and the
//! budget that caps retries at a share of live traffic so they cannot storm an upstream
//! that is already struggling (style: linkerd/finagle retry budgets).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

use crate::config::{RetryConfig, RetryOn};

/// How an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection was made: the request provably never reached the upstream.
    Connect,
    ConnectTimeout,
    /// The TLS handshake failed (a certificate refused, either way): nothing reached the
    /// upstream, as with `Connect`, but waiting for it to listen again would not help.
    Tls,
    /// Sent, but no response head in time.
    FirstByteTimeout,
    /// The connection failed after the request went out.
    Reset,
    /// A complete response with this status.
    Status(u16),
}

impl Failure {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Failure::Connect | Failure::Tls => "connect_error",
            Failure::ConnectTimeout | Failure::FirstByteTimeout => "timeout",
            Failure::Reset => "reset",
            Failure::Status(_) => "status",
        }
    }

    /// Whether the request may have reached the upstream.
    fn reached_upstream(self) -> bool {
        !matches!(
            self,
            Failure::Connect | Failure::ConnectTimeout | Failure::Tls
        )
    }
}

/// GET, HEAD, OPTIONS, PUT, DELETE (and TRACE): repeating them changes nothing more.
pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether some failure after this request was sent (timeout, reset, status) may be
/// retried under `cfg`: only then must a copy of what was sent be kept.
pub(crate) fn may_retry_once_sent(cfg: &RetryConfig, method: &Method) -> bool {
    idempotent(method)
        && cfg
            .on
            .iter()
            .any(|on| matches!(on, RetryOn::Timeout | RetryOn::Reset | RetryOn::Status(_)))
}

/// Whether this failure of this request may be retried under `cfg` (budget aside).
/// Non-idempotent requests only when nothing reached the upstream.
pub(crate) fn retryable(
    cfg: &RetryConfig,
    failure: Failure,
    method: &Method,
    replayable: bool,
) -> bool {
    let listed = cfg.on.iter().any(|on| match (on, failure) {
        (RetryOn::ConnectError, Failure::Connect | Failure::Tls) => true,
        // A connect timeout never reached the upstream either.
        (RetryOn::ConnectError | RetryOn::Timeout, Failure::ConnectTimeout) => true,
        (RetryOn::Timeout, Failure::FirstByteTimeout) => true,
        (RetryOn::Reset, Failure::Reset) => true,
        (RetryOn::Status(a), Failure::Status(b)) => *a == b,
        _ => false,
    });
    if !listed {
        return false;
    }
    if failure.reached_upstream() {
        idempotent(method) && replayable
    } else {
        true
    }
}

/// Full jitter: uniform in [0, min(max, base * 2^(retry-1))] (AWS architecture blog).
pub(crate) fn backoff(cfg: &RetryConfig, retry: u32) -> Duration {
    let exp = cfg
        .backoff_base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
    exp.min(cfg.backoff_max).mul_f64(crate::jitter::unit())
}

/// Longest pause between two wake-ups of a waiting request: once the endpoint accepts a
/// connect again, each waiting request goes within this, however long it was down.
pub(crate) const CONNECT_WAIT_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Fewest milliseconds of `connect_wait` per wake-up of a waiting request: a bound on
/// wake-ups (40 per second of wait) whatever the jitter draws.
const CONNECT_WAIT_MS_PER_CHECK: u128 = 25;

/// One request's wait for an upstream that refuses connections (`retry.connect_wait`): a
/// restart of the only endpoint. Nothing reached the upstream, so any method may wait. The
/// wait starts at the request's first connect failure and lasts at most `connect_wait`,
/// never past the route's total deadline. The request sleeps with full jitter under
/// [`CONNECT_WAIT_BACKOFF_MAX`], then asks the endpoint's [`ConnectGate`] whether it may
/// connect; the gate, not each request, paces the connects to a down endpoint.
///
/// A wait spends no retry budget: the budget exists so that retries cannot multiply the
/// load that reaches the upstream, and a refused connect reaches nothing. With a charge
/// per waiting request, 80 requests a second spent the budget in the first second of a
/// restart and the rest failed at once. Waiting requests stay bounded by `connect_wait`,
/// the route's deadline and the upstream's `max_in_flight` (a waiting request keeps its
/// place), and wake-ups per request are bounded too.
#[derive(Debug, Default)]
pub(crate) struct ConnectWait {
    since: Option<Instant>,
    /// Sleeps so far (each followed by a look at the gate).
    checks: u32,
    /// The one connect after the wait was over (see `stale`) was made.
    stale_tried: bool,
}

/// What to do after a connect failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitStep {
    /// Sleep this long, then ask the endpoint's gate for a connect. `last`: the sleep ends
    /// the wait, so connect then whatever the gate says (a restart that takes just under
    /// `connect_wait` is still caught; one extra connect per waiting request at most).
    Again { after: Duration, last: bool },
    /// The wait does not apply, or is over: the failure is the answer.
    Over,
}

impl ConnectWait {
    /// Whether `failure` is one a connect wait handles under `cfg`: a connect failure, retries
    /// on (`attempts` > 1) and listed for it, and `connect_wait` not `off`.
    pub(crate) fn applies(cfg: &RetryConfig, failure: Failure) -> bool {
        cfg.connect_wait.is_some()
            && failure != Failure::Tls
            && cfg.attempts > 1
            && !failure.reached_upstream()
            && retryable(cfg, failure, &Method::POST, false)
    }

    /// At `now`, after a connect failure or a look at the gate that gave no connect: sleep
    /// again, or give up. `unit` is the jitter draw in [0, 1).
    pub(crate) fn next(
        &mut self,
        cfg: &RetryConfig,
        failure: Failure,
        now: Instant,
        deadline: Option<Instant>,
        unit: f64,
    ) -> WaitStep {
        let Some(wait) = cfg.connect_wait.filter(|_| Self::applies(cfg, failure)) else {
            return WaitStep::Over;
        };
        let since = *self.since.get_or_insert(now);
        let end = since + wait;
        let max_checks = (wait.as_millis() / CONNECT_WAIT_MS_PER_CHECK).max(1);
        if now >= end || u128::from(self.checks) >= max_checks {
            return WaitStep::Over;
        }
        self.checks += 1;
        let cap = cfg.backoff_max.min(CONNECT_WAIT_BACKOFF_MAX);
        let exp = cfg
            .backoff_base
            .saturating_mul(1u32 << (self.checks - 1).min(20));
        // The last connect is made when the wait ends, so a restart that takes just under
        // `connect_wait` is still caught.
        let after = exp.min(cap).mul_f64(unit.clamp(0.0, 1.0)).min(end - now);
        // A connect that could only start at the deadline would end in a 504 for nothing.
        if deadline.is_some_and(|d| now + after >= d) {
            return WaitStep::Over;
        }
        WaitStep::Again {
            after,
            last: now + after >= end,
        }
    }

    /// Once the wait is over: whether to connect once more because the endpoint accepted a
    /// connect after this request's failed one began (`connected_since`). That failure is
    /// stale, as a connect timeout that began before the upstream was reachable again. Once
    /// per request, and not at or past the deadline.
    pub(crate) fn stale(
        &mut self,
        connected_since: bool,
        now: Instant,
        deadline: Option<Instant>,
    ) -> bool {
        if !connected_since || self.stale_tried || deadline.is_some_and(|d| now >= d) {
            return false;
        }
        self.stale_tried = true;
        true
    }
}

/// Mean pause between two connects of the requests waiting on one endpoint; each pause is
/// drawn in [0.5, 1.5) times this, so replicas waiting on the same host do not connect in
/// step.
const CONNECT_SLOT: Duration = Duration::from_millis(50);

/// The connects of an endpoint's connect waits, shared: while the endpoint refuses, at most
/// one waiting request connects per slot, whatever the number waiting (a thousand waiting
/// requests connecting on their own would send a restarting host thousands of SYNs a
/// second). A successful connect to the endpoint (by anyone) opens the gate for every
/// request that failed before it: the endpoint listens again, and each waiter goes at its
/// next wake-up, within [`CONNECT_WAIT_BACKOFF_MAX`].
#[derive(Debug, Default)]
pub struct ConnectGate(Mutex<Gate>);

#[derive(Debug, Default)]
struct Gate {
    /// When a waiting request may next connect (None: at once).
    next_slot: Option<Instant>,
    /// The last successful connect to the endpoint.
    connected: Option<Instant>,
}

impl ConnectGate {
    fn gate(&self) -> MutexGuard<'_, Gate> {
        // The state is two instants, valid whatever a panicking holder left.
        crate::sync::lock(&self.0)
    }

    /// A connect to the endpoint succeeded at `now`.
    pub fn connected(&self, now: Instant) {
        let mut g = self.gate();
        if g.connected.is_none_or(|c| c < now) {
            g.connected = Some(now);
        }
    }

    /// Whether a connect to the endpoint succeeded after `t`.
    pub fn connected_since(&self, t: Instant) -> bool {
        self.gate().connected.is_some_and(|c| c > t)
    }

    /// Whether a waiting request whose last connect began at `tried_at` (and failed) may
    /// connect at `now`: yes when some connect succeeded since, or when the slot is free
    /// (the request then takes it; `unit` in [0, 1) draws the slot's length).
    pub fn turn(&self, now: Instant, tried_at: Instant, unit: f64) -> bool {
        let mut g = self.gate();
        if g.connected.is_some_and(|c| c > tried_at) {
            return true;
        }
        if g.next_slot.is_some_and(|next| now < next) {
            return false;
        }
        g.next_slot = Some(now + CONNECT_SLOT.mul_f64(0.5 + unit.clamp(0.0, 1.0)));
        true
    }
}

/// Requests and retries over the last 10 seconds, in one-second buckets.
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    min_per_s: u32,
    buckets: [(u32, u32); 10],
    current: usize,
    current_start: Instant,
}

impl Budget {
    pub fn new(cfg: &RetryConfig, now: Instant) -> Self {
        Budget {
            ratio: cfg.budget_ratio,
            min_per_s: cfg.budget_min_per_s,
            buckets: [(0, 0); 10],
            current: 0,
            current_start: now,
        }
    }

    pub fn reconfigure(&mut self, cfg: &RetryConfig) {
        self.ratio = cfg.budget_ratio;
        self.min_per_s = cfg.budget_min_per_s;
    }

    fn advance(&mut self, now: Instant) {
        let mut steps = 0;
        while now.duration_since(self.current_start) >= Duration::from_secs(1) && steps < 10 {
            self.current = (self.current + 1) % 10;
            self.buckets[self.current] = (0, 0);
            self.current_start += Duration::from_secs(1);
            steps += 1;
        }
        if steps == 10 {
            self.current_start = now;
        }
    }

    /// Every original request deposits into the budget.
    pub fn record_request(&mut self, now: Instant) {
        self.advance(now);
        self.buckets[self.current].0 += 1;
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        self.advance(now);
        let (requests, retries) = self
            .buckets
            .iter()
            .fold((0u32, 0u32), |(a, b), x| (a + x.0, b + x.1));
        let allowed = f64::from(self.min_per_s) * 10.0 + self.ratio * f64::from(requests);
        if f64::from(retries) + 1.0 <= allowed {
            self.buckets[self.current].1 += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RetryConfig {
        RetryConfig {
            on: vec![
                RetryOn::ConnectError,
                RetryOn::Status(502),
                RetryOn::Status(503),
                RetryOn::Reset,
            ],
            ..RetryConfig::default()
        }
    }

    #[test]
    fn post_is_retried_only_when_nothing_reached_the_upstream() {
        let c = cfg();
        assert!(retryable(&c, Failure::Connect, &Method::POST, false));
        assert!(retryable(&c, Failure::ConnectTimeout, &Method::POST, false));
        assert!(!retryable(&c, Failure::Reset, &Method::POST, true));
        assert!(!retryable(&c, Failure::Status(503), &Method::POST, true));
        assert!(retryable(&c, Failure::Reset, &Method::GET, true));
        assert!(retryable(&c, Failure::Status(502), &Method::PUT, true));
        // A body that was not kept cannot be sent again.
        assert!(!retryable(&c, Failure::Status(502), &Method::PUT, false));
        // Not listed.
        assert!(!retryable(&c, Failure::Status(504), &Method::GET, true));
        assert!(!retryable(
            &c,
            Failure::FirstByteTimeout,
            &Method::GET,
            true
        ));
    }

    #[test]
    fn backoff_is_full_jitter_under_the_cap() {
        let c = cfg();
        for retry in 1..10 {
            for _ in 0..100 {
                let d = backoff(&c, retry);
                let cap = (c.backoff_base * (1 << (retry - 1))).min(c.backoff_max);
                assert!(d <= cap, "{d:?} > {cap:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_wait_retries_any_method_until_connect_wait() {
        let c = RetryConfig::default();
        let t0 = Instant::now();
        let mut w = ConnectWait::default();
        let mut now = t0;
        let mut connects = 1;
        let mut lasts = 0;
        while let WaitStep::Again { after, last } = w.next(&c, Failure::Connect, now, None, 0.5) {
            assert!(after <= CONNECT_WAIT_BACKOFF_MAX, "{after:?}");
            now += after;
            connects += 1;
            lasts += u32::from(last);
            assert!(connects < 1000, "unbounded");
        }
        // Only the sleep that ends the wait is its last.
        assert_eq!(lasts, 1);
        // It ends at connect_wait, not before (the last connect is made at its end).
        assert_eq!(now, t0 + Duration::from_secs(5));
        // Backoff 25, 50, 100, then 125 ms (half of the 250 ms cap) until 5 s.
        assert!((40..=45).contains(&connects), "{connects}");
        // A connect timeout waits too; a failure that reached the upstream never does.
        let mut w = ConnectWait::default();
        assert!(matches!(
            w.next(&c, Failure::ConnectTimeout, t0, None, 0.5),
            WaitStep::Again { .. }
        ));
        for f in [
            Failure::Reset,
            Failure::FirstByteTimeout,
            Failure::Status(502),
        ] {
            assert_eq!(
                ConnectWait::default().next(&c, f, t0, None, 0.5),
                WaitStep::Over
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_wait_is_off_with_retries_off_and_stops_before_the_deadline() {
        let t0 = Instant::now();
        let off = |f: fn(&mut RetryConfig)| {
            let mut c = RetryConfig::default();
            f(&mut c);
            ConnectWait::default().next(&c, Failure::Connect, t0, None, 0.5)
        };
        assert_eq!(off(|c| c.connect_wait = None), WaitStep::Over);
        assert_eq!(off(|c| c.attempts = 1), WaitStep::Over);
        assert_eq!(off(|c| c.on = vec![RetryOn::Status(503)]), WaitStep::Over);
        // A connect timeout waits under `timeout` as well as `connect_error`.
        let c = RetryConfig {
            on: vec![RetryOn::Timeout],
            ..RetryConfig::default()
        };
        assert_ne!(
            ConnectWait::default().next(&c, Failure::ConnectTimeout, t0, None, 0.5),
            WaitStep::Over
        );

        // Never past the route's total deadline: the wait gives up rather than connect at it.
        let c = RetryConfig::default();
        let deadline = Some(t0 + Duration::from_millis(300));
        let mut w = ConnectWait::default();
        let mut now = t0;
        while let WaitStep::Again { after, .. } = w.next(&c, Failure::Connect, now, deadline, 0.99)
        {
            now += after;
            assert!(now < t0 + Duration::from_millis(300));
        }
        // Attempts are bounded whatever the jitter draws (all zero here).
        let mut w = ConnectWait::default();
        let n = (0..10_000)
            .take_while(|_| w.next(&c, Failure::Connect, t0, None, 0.0) != WaitStep::Over)
            .count();
        assert_eq!(n, 200);
    }

    /// Many requests waiting on one refusing endpoint: one connect per slot between them,
    /// and every one of them goes once a connect succeeds after its own failed.
    #[tokio::test(start_paused = true)]
    async fn a_connect_gate_lets_one_waiter_connect_per_slot_and_all_once_one_connected() {
        let gate = ConnectGate::default();
        let t0 = Instant::now();
        // 1,000 waiters, failed at t0, each looking every millisecond for one second.
        let mut connects = 0;
        let mut now = t0;
        for _ in 0..1000 {
            now += Duration::from_millis(1);
            connects += (0..1000)
                .filter(|i| gate.turn(now, t0, f64::from(*i) / 1000.0))
                .count();
        }
        // Slots are 25 to 75 ms: 14 to 40 connects in a second, not a million.
        assert!((14..=40).contains(&connects), "{connects}");
        // A slot's holder does not stop others for longer than the slot.
        let later = now + CONNECT_SLOT.mul_f64(1.5);
        assert!(gate.turn(later, t0, 0.5));
        assert!(!gate.turn(later, t0, 0.5));
        // A connect that succeeded before a waiter's failure says nothing about now.
        gate.connected(later);
        let failed = later + Duration::from_millis(1);
        assert!(!gate.turn(failed, failed, 0.5));
        // One that succeeded after it: every waiter goes at once, slot or not.
        let up = failed + Duration::from_millis(1);
        gate.connected(up);
        assert!((0..1000).all(|_| gate.turn(up, failed, 0.5)));
        // An older success never hides a newer one.
        gate.connected(t0);
        assert!(gate.turn(up, failed, 0.5));
        assert!(gate.connected_since(failed) && !gate.connected_since(up));

        // A wait that is over connects once more when its last failure is stale.
        let c = RetryConfig::default();
        let mut w = ConnectWait::default();
        assert_ne!(w.next(&c, Failure::Connect, t0, None, 0.5), WaitStep::Over);
        let over = t0 + Duration::from_secs(5);
        assert_eq!(
            w.next(&c, Failure::Connect, over, None, 0.5),
            WaitStep::Over
        );
        assert!(!w.stale(false, over, None));
        assert!(!w.stale(true, over, Some(over)));
        assert!(w.stale(true, over, None));
        assert!(!w.stale(true, over, None));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_at_a_share_of_traffic() {
        let mut c = cfg();
        c.budget_ratio = 0.2;
        c.budget_min_per_s = 0;
        let now = Instant::now();
        let mut b = Budget::new(&c, now);
        for _ in 0..100 {
            b.record_request(now);
        }
        let granted = (0..100).filter(|_| b.try_retry(now)).count();
        assert_eq!(granted, 20);
        // The window slides: ten seconds later the budget is fresh (and empty of deposits).
        let later = now + Duration::from_secs(11);
        assert!(!b.try_retry(later));
        // The floor allows a trickle with no traffic at all.
        c.budget_min_per_s = 3;
        let mut b = Budget::new(&c, now);
        assert_eq!((0..100).filter(|_| b.try_retry(now)).count(), 30);
    }
}
