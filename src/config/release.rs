//! `releases:` (issue 20): releases started by the configuration, the same document
//! `POST /admin/releases` takes, and `releases_state:`, where their state is kept.

use std::time::Duration;

use serde::Serialize;

/// One release: move `upstream`'s weight to the group `to` in `steps`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReleaseConfig {
    pub upstream: String,
    /// The group that gets the weight (the one with the most weight now gives it up).
    pub to: String,
    /// The target's share in percent at each step, rising, the last 100.
    pub steps: Vec<u32>,
    /// How long each step runs before it is judged.
    #[serde(serialize_with = "super::serialize::duration")]
    pub step_for: Duration,
    pub gate: ReleaseGate,
}

/// What the target group must show over a step to go on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReleaseGate {
    /// A share 0..=1, written "1%".
    #[serde(serialize_with = "super::serialize::percent")]
    pub max_error_rate: f64,
    #[serde(serialize_with = "super::serialize::duration")]
    pub max_p95: Duration,
    /// Fewer requests than this in a step: the step is extended, not judged.
    pub min_requests: u64,
}

impl ReleaseConfig {
    pub const MAX_STEPS: usize = 20;
    pub const MIN_STEP_FOR: Duration = Duration::from_secs(1);
    pub const MAX_STEP_FOR: Duration = Duration::from_secs(24 * 3600);
    pub const MAX_MIN_REQUESTS: u64 = 1_000_000_000;

    /// The steps' rules, shared by the file and the admin API: 1..=100 each, strictly
    /// rising, ending at 100.
    pub(crate) fn check_steps(steps: &[u32]) -> Result<(), String> {
        if steps.is_empty() || steps.len() > Self::MAX_STEPS {
            return Err(format!(
                "expected 1 to {} steps (percentages), got {}",
                Self::MAX_STEPS,
                steps.len()
            ));
        }
        if let Some(bad) = steps.iter().find(|s| !(1..=100).contains(*s)) {
            return Err(format!("each step is a percentage 1..100, got {bad}"));
        }
        if steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("steps must rise, got {steps:?}"));
        }
        if steps.last() != Some(&100) {
            return Err(format!(
                "the last step must be 100 (the target gets all the weight), got {steps:?}"
            ));
        }
        Ok(())
    }

    /// Names the release by what it does: a config release with the same key is not
    /// started twice (see `upstream::release::manager`).
    pub(crate) fn key(&self) -> String {
        format!(
            "{}->{} {:?} {}ms err<={} p95<={}ms min={}",
            self.upstream,
            self.to,
            self.steps,
            self.step_for.as_millis(),
            self.gate.max_error_rate,
            self.gate.max_p95.as_millis(),
            self.gate.min_requests
        )
    }
}
