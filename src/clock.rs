//! The time on the request path, read once per poll of a connection's task.
//!
//! A proxied request asked the clock about twelve times (its start, the limiter, the
//! breaker before and after, the attempt, the pool, the endpoint's health, the metrics), and
//! each `clock_gettime` in a VM costs tens of nanoseconds: 1.7% of a pinned worker's time
//! under load, against nginx's 0.07% (nginx reads it once per turn of its event loop). Inside
//! a poll of a connection's task, [`now`] reads the clock the first time it is asked and
//! returns that reading until the poll ends (a poll that never asks reads nothing);
//! everywhere else it reads the clock. A reading is then at most one poll old: a poll ends
//! at the first socket or timer that is not ready, and tokio's cooperative budget bounds how
//! much it does before that. Timers armed from it fire that much early at most, and
//! durations measured with it are that much short at most.
//!
//! It is tokio's clock (`tokio::time::Instant`), so tests that pause time see it paused.

use std::cell::Cell;

use tokio::time::Instant;

/// Where this thread is: outside a connection's poll (None), in one that has not asked
/// the time yet (Some(None)), or in one that has (its reading).
type Poll = Option<Option<Instant>>;

thread_local! {
    static POLL: Cell<Poll> = const { Cell::new(None) };
}

/// Now: the running connection poll's reading, else the clock's.
pub(crate) fn now() -> Instant {
    match POLL.get() {
        Some(Some(read)) => read,
        Some(None) => {
            let read = Instant::now();
            POLL.set(Some(Some(read)));
            read
        }
        None => Instant::now(),
    }
}

/// Runs one poll of a connection's task: the clock is read at most once in it.
pub(crate) fn in_poll<T>(poll: impl FnOnce() -> T) -> T {
    // Restored however `poll` ends, a panic included (tokio catches a task's panic and the
    // thread goes on): a reading left behind would stop this thread's clock.
    struct Restore(Poll);
    impl Drop for Restore {
        fn drop(&mut self) {
            POLL.set(self.0);
        }
    }
    let _restore = Restore(POLL.replace(Some(None)));
    poll()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_reading_per_poll_and_the_clock_outside() {
        let outside = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > outside, "outside a poll, now() reads the clock");
        let (a, b) = in_poll(|| {
            std::thread::sleep(Duration::from_millis(2));
            let a = now();
            std::thread::sleep(Duration::from_millis(2));
            (a, now())
        });
        assert_eq!(a, b, "one reading for the whole poll");
        // 2 ms slept before the poll, 2 more in it before asking.
        assert!(
            a >= outside + Duration::from_millis(4),
            "read when first asked, not when the poll began"
        );
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > b, "after the poll, the clock again");
    }

    #[test]
    fn nested_polls_restore_the_outer_reading_and_a_panic_restores_the_clock() {
        in_poll(|| {
            let outer = now();
            std::thread::sleep(Duration::from_millis(2));
            let inner = in_poll(now);
            assert!(inner > outer);
            assert_eq!(now(), outer);
        });
        let panicked = std::panic::catch_unwind(|| in_poll(|| panic!("a task panics")));
        assert!(panicked.is_err());
        let before = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > before, "the panic left no reading behind");
    }

    #[tokio::test(start_paused = true)]
    async fn it_is_tokios_clock() {
        let t0 = now();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(now() - t0, Duration::from_secs(5));
        assert_eq!(in_poll(now) - t0, Duration::from_secs(5));
    }
}
