//! Retries: which failures may be retried for which requests, full-jitter backoff, and the
//! budget that caps retries at a share of live traffic so they cannot storm an upstream
//! that is already struggling (style: linkerd/finagle retry budgets).

use std::time::Duration;

use http::Method;
use tokio::time::Instant;

use crate::config::{RetryConfig, RetryOn};

/// How an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection was made: the request provably never reached the upstream.
    Connect,
    ConnectTimeout,
    /// Sent, but no response head in time.
    FirstByteTimeout,
    /// The connection failed after the request went out.
    Reset,
    /// A complete response with this status.
    Status(u16),
}

impl Failure {
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Connect => "connect_error",
            Failure::ConnectTimeout | Failure::FirstByteTimeout => "timeout",
            Failure::Reset => "reset",
            Failure::Status(_) => "status",
        }
    }

    /// Whether the request may have reached the upstream.
    fn reached_upstream(self) -> bool {
        !matches!(self, Failure::Connect | Failure::ConnectTimeout)
    }
}

/// GET, HEAD, OPTIONS, PUT, DELETE (and TRACE): repeating them changes nothing more.
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether some failure after this request was sent (timeout, reset, status) may be
/// retried under `cfg`: only then must a copy of what was sent be kept.
pub fn may_retry_once_sent(cfg: &RetryConfig, method: &Method) -> bool {
    idempotent(method)
        && cfg
            .on
            .iter()
            .any(|on| matches!(on, RetryOn::Timeout | RetryOn::Reset | RetryOn::Status(_)))
}

/// Whether this failure of this request may be retried under `cfg` (budget aside).
/// Non-idempotent requests only when nothing reached the upstream.
pub fn retryable(cfg: &RetryConfig, failure: Failure, method: &Method, replayable: bool) -> bool {
    let listed = cfg.on.iter().any(|on| match (on, failure) {
        (RetryOn::ConnectError, Failure::Connect) => true,
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
pub fn backoff(cfg: &RetryConfig, retry: u32) -> Duration {
    let exp = cfg
        .backoff_base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
    exp.min(cfg.backoff_max).mul_f64(crate::jitter::unit())
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
