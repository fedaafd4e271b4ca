//! A pure consecutive success/failure counter (style: rust-rpxy's health-check counter):
//! fed one probe result at a time, it says when the verdict changes, and only then.

/// The verdict of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No probe has finished yet.
    Unknown,
    Up,
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Unknown or Down -> Up.
    Up,
    /// Unknown or Up -> Down.
    Down,
}

#[derive(Debug, Clone)]
pub(crate) struct Counter {
    verdict: Verdict,
    successes: u32,
    failures: u32,
    /// Consecutive failures that turn Up into Down.
    fall: u32,
    /// Consecutive successes that turn Down into Up.
    rise: u32,
}

impl Counter {
    /// `fall` and `rise` below 1 count as 1.
    pub(crate) fn new(verdict: Verdict, fall: u32, rise: u32) -> Counter {
        Counter {
            verdict,
            successes: 0,
            failures: 0,
            fall: fall.max(1),
            rise: rise.max(1),
        }
    }

    pub(crate) fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Consecutive failures so far (0 after a success).
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Records one probe. The first result decides at once: nothing is known before it,
    /// and waiting for a streak would keep a fresh process unready for no reason.
    pub(crate) fn record(&mut self, ok: bool) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
        }
        let next = match (self.verdict, ok) {
            (Verdict::Unknown, true) => Verdict::Up,
            (Verdict::Unknown, false) => Verdict::Down,
            (Verdict::Up, false) if self.failures >= self.fall => Verdict::Down,
            (Verdict::Down, true) if self.successes >= self.rise => Verdict::Up,
            (v, _) => v,
        };
        if next == self.verdict {
            return None;
        }
        self.verdict = next;
        Some(match next {
            Verdict::Up => Transition::Up,
            _ => Transition::Down,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides() {
        let mut c = Counter::new(Verdict::Unknown, 3, 2);
        assert_eq!(c.record(false), Some(Transition::Down));
        let mut c = Counter::new(Verdict::Unknown, 3, 2);
        assert_eq!(c.record(true), Some(Transition::Up));
        assert_eq!(c.record(true), None);
    }

    #[test]
    fn streaks_are_needed_to_change_an_established_verdict() {
        let mut c = Counter::new(Verdict::Up, 3, 2);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        // A success in between starts the count again.
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), Some(Transition::Down));
        assert_eq!(c.verdict(), Verdict::Down);
        assert_eq!(c.record(false), None);
        assert_eq!(c.failures(), 4);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(Transition::Up));
        assert_eq!(c.failures(), 0);
    }

    #[test]
    fn thresholds_of_one_follow_every_result() {
        let mut c = Counter::new(Verdict::Up, 0, 0);
        assert_eq!(c.record(false), Some(Transition::Down));
        assert_eq!(c.record(true), Some(Transition::Up));
        assert_eq!(c.record(false), Some(Transition::Down));
    }
}
