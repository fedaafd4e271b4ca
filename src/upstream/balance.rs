//! Endpoint choice inside one upstream: round-robin or power-of-two-choices on requests in
//! flight, skipping endpoints passively ejected after consecutive failures. The ejection
//! counter is a pure state machine; `pick` only reads.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{EjectionConfig, LoadBalancing};

#[derive(Debug, Default)]
pub struct EndpointHealth {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    /// Ejections without a success in between: each one lasts twice as long.
    ejections_in_a_row: u32,
    /// Active checks passed in a row while ejected.
    health_passes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEvent {
    Ejected(Duration),
}

impl EndpointHealth {
    pub fn available(&self, now: Instant) -> bool {
        self.ejected_until.is_none_or(|t| now >= t)
    }

    /// The endpoint's active check passed: after `needed` passes in a row while ejected,
    /// the ejection ends (Envoy's `successful_active_health_check_uneject_host`). The
    /// doubling is kept: an endpoint that fails again right away is set aside for longer.
    /// True when this ended an ejection.
    pub fn health_passed(&mut self, now: Instant, needed: u32) -> bool {
        if self.available(now) {
            self.health_passes = 0;
            return false;
        }
        self.health_passes = self.health_passes.saturating_add(1);
        if self.health_passes < needed.max(1) {
            return false;
        }
        self.ejected_until = None;
        self.health_passes = 0;
        self.consecutive_failures = 0;
        true
    }

    pub fn health_failed(&mut self) {
        self.health_passes = 0;
    }

    pub fn on_result(
        &mut self,
        now: Instant,
        ok: bool,
        cfg: &EjectionConfig,
    ) -> Option<HealthEvent> {
        if ok {
            self.consecutive_failures = 0;
            if self.available(now) {
                self.ejected_until = None;
                self.ejections_in_a_row = 0;
            }
            return None;
        }
        self.consecutive_failures += 1;
        if self.consecutive_failures < cfg.consecutive_failures || !self.available(now) {
            return None;
        }
        let factor = 1u32 << self.ejections_in_a_row.min(16);
        let period = cfg
            .base_ejection
            .saturating_mul(factor)
            .min(cfg.max_ejection);
        self.ejected_until = Some(now + period);
        self.health_passes = 0;
        self.ejections_in_a_row += 1;
        self.consecutive_failures = 0;
        Some(HealthEvent::Ejected(period))
    }
}

/// What `pick` needs to know of each endpoint.
pub(crate) struct Candidate {
    pub in_flight: usize,
    pub available: bool,
    /// Already tried by this request: prefer another one.
    pub tried: bool,
}

/// The index of the endpoint to use. Available and untried endpoints first; if every
/// endpoint is ejected, ejection is ignored (better a suspect endpoint than none).
pub(crate) fn pick(
    policy: LoadBalancing,
    candidates: &[Candidate],
    round_robin: usize,
) -> Option<usize> {
    let tiers: [&dyn Fn(&Candidate) -> bool; 3] =
        [&|c| c.available && !c.tried, &|c| !c.tried, &|c| {
            c.available
        }];
    for tier in tiers {
        let pool: Vec<usize> = (0..candidates.len())
            .filter(|&i| tier(&candidates[i]))
            .collect();
        if pool.is_empty() {
            continue;
        }
        return Some(match policy {
            LoadBalancing::RoundRobin => pool[round_robin % pool.len()],
            LoadBalancing::LeastOutstanding => {
                let a = pool[crate::jitter::below(pool.len())];
                let b = pool[crate::jitter::below(pool.len())];
                if candidates[b].in_flight < candidates[a].in_flight {
                    b
                } else {
                    a
                }
            }
        });
    }
    (!candidates.is_empty()).then(|| round_robin % candidates.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EjectionConfig {
        EjectionConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
        }
    }

    #[test]
    fn ejected_after_consecutive_failures_for_longer_each_time() {
        let t0 = Instant::now();
        let mut h = EndpointHealth::default();
        assert_eq!(h.on_result(t0, false, &cfg()), None);
        assert_eq!(h.on_result(t0, false, &cfg()), None);
        assert_eq!(
            h.on_result(t0, false, &cfg()),
            Some(HealthEvent::Ejected(Duration::from_secs(10)))
        );
        assert!(!h.available(t0 + Duration::from_secs(9)));
        let t1 = t0 + Duration::from_secs(10);
        assert!(h.available(t1));
        for _ in 0..2 {
            h.on_result(t1, false, &cfg());
        }
        assert_eq!(
            h.on_result(t1, false, &cfg()),
            Some(HealthEvent::Ejected(Duration::from_secs(20)))
        );
        // A success after it is back resets the doubling.
        let t2 = t1 + Duration::from_secs(20);
        h.on_result(t2, true, &cfg());
        for _ in 0..2 {
            h.on_result(t2, false, &cfg());
        }
        assert_eq!(
            h.on_result(t2, false, &cfg()),
            Some(HealthEvent::Ejected(Duration::from_secs(10)))
        );
    }

    #[test]
    fn passing_checks_end_an_ejection() {
        let t0 = Instant::now();
        let mut h = EndpointHealth::default();
        assert!(!h.health_passed(t0, 2), "not ejected: nothing to end");
        for _ in 0..3 {
            h.on_result(t0, false, &cfg());
        }
        assert!(!h.available(t0));
        assert!(!h.health_passed(t0, 2));
        h.health_failed();
        assert!(!h.health_passed(t0, 2));
        assert!(h.health_passed(t0, 2));
        assert!(h.available(t0));
        // The doubling is kept: failing again at once sets it aside for 20 s.
        for _ in 0..2 {
            h.on_result(t0, false, &cfg());
        }
        assert_eq!(
            h.on_result(t0, false, &cfg()),
            Some(HealthEvent::Ejected(Duration::from_secs(20)))
        );
    }

    fn c(in_flight: usize, available: bool, tried: bool) -> Candidate {
        Candidate {
            in_flight,
            available,
            tried,
        }
    }

    #[test]
    fn pick_prefers_available_untried_then_falls_back() {
        let rr = LoadBalancing::RoundRobin;
        assert_eq!(
            pick(rr, &[c(0, false, false), c(0, true, false)], 0),
            Some(1)
        );
        assert_eq!(pick(rr, &[c(0, true, true), c(0, true, false)], 0), Some(1));
        // All ejected: still pick one.
        assert!(pick(rr, &[c(0, false, false), c(0, false, false)], 5).is_some());
        assert_eq!(pick(rr, &[], 0), None);
        // Least outstanding: with one idle and one busy endpoint, the idle one wins whenever
        // it is among the two sampled.
        let lo = LoadBalancing::LeastOutstanding;
        let busy_picks = (0..1000)
            .filter(|_| pick(lo, &[c(10, true, false), c(0, true, false)], 0) == Some(0))
            .count();
        assert!(busy_picks < 400, "{busy_picks}");
    }
}
