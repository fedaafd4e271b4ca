//! One request's share of `redis.timeout`, across every step that asks Redis.

use std::time::Duration;

use tokio::time::Instant;

use super::RedisError;

/// What is left of one request's wait for Redis. A request may ask Redis in several steps
/// (each `store: redis` rate-limit policy, its stream permits, the cache lookup); together
/// they wait at most `redis.timeout`, the bound the configuration promises, not that once
/// per step: with Redis silent, four steps held a request four timeouts. The clock starts
/// with the request's first call.
#[derive(Debug, Default)]
pub struct Budget {
    until: Option<Instant>,
}

impl Budget {
    /// How long the next call may take, for a client whose calls time out after
    /// `timeout`: all of it for the first call, what is left of it after. Zero: the
    /// caller decides without Redis, as when Redis fails.
    pub fn left(&mut self, timeout: Duration) -> Duration {
        let now = Instant::now();
        let until = *self
            .until
            .get_or_insert_with(|| now.checked_add(timeout).unwrap_or(now));
        until.saturating_duration_since(now)
    }

    /// `work` (a call already under `timeout`) cut at what is left: a timeout if it ran
    /// out, before or during the call.
    pub async fn within<T>(
        &mut self,
        timeout: Duration,
        work: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let left = self.left(timeout);
        if left >= timeout {
            return work.await;
        }
        match tokio::time::timeout(left, work).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::Timeout(left)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls of one request share one timeout: the first gets all of it, the next what is
    /// left, and a call that would outlast it is cut there.
    #[tokio::test(start_paused = true)]
    async fn a_request_waits_one_timeout_over_all_its_calls() {
        let timeout = Duration::from_secs(5);
        let mut budget = Budget::default();
        let silent = || std::future::pending::<Result<(), RedisError>>();
        assert_eq!(budget.left(timeout), timeout);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(budget.left(timeout), Duration::from_secs(3));
        let start = Instant::now();
        let r = budget.within(timeout, silent()).await;
        assert!(matches!(r, Err(RedisError::Timeout(_))), "{r:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(budget.left(timeout), Duration::ZERO);
        let r = budget.within(timeout, silent()).await;
        assert!(matches!(r, Err(RedisError::Timeout(_))), "{r:?}");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(3),
            "nothing left: no wait"
        );
        // A fresh request has all of it again; an answer in time is the answer.
        let mut next = Budget::default();
        let r = next.within(timeout, async { Ok::<_, RedisError>(7) }).await;
        assert_eq!(r.ok(), Some(7));
    }
}
