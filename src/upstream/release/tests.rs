//! The state machine and the manager over in-memory groups, with time passed in: no test
//! sleeps. Traffic is simulated by adding to the groups' totals in the split the weights
//! say.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::machine::{MAX_EXTENSIONS, State};
use super::manager::{ActionError, Notice, Notify, ReleaseMetrics, Releases, StartError};
use super::{GroupHealth, GroupTotals, Groups};
use crate::config::{ReleaseConfig, ReleaseGate};

#[derive(Default)]
struct Mem {
    s: Mutex<MemState>,
}

#[derive(Default)]
struct MemState {
    weights: BTreeMap<String, Vec<(String, u32)>>,
    totals: BTreeMap<String, GroupTotals>,
    health: BTreeMap<String, GroupHealth>,
    breaker: bool,
    /// Every set_weights call, as green's share.
    log: Vec<u32>,
}

const HEALTHY: GroupHealth = GroupHealth {
    endpoints: 2,
    available: 2,
    checks_passing: Some(true),
};

impl Mem {
    /// backend: blue 100, green 0, both healthy.
    fn new() -> Arc<Mem> {
        let m = Mem::default();
        {
            let mut s = m.s.lock().unwrap();
            s.weights.insert(
                "backend".into(),
                vec![("blue".into(), 100), ("green".into(), 0)],
            );
            for g in ["blue", "green"] {
                s.health.insert(g.into(), HEALTHY);
                s.totals.insert(g.into(), GroupTotals::default());
            }
        }
        Arc::new(m)
    }

    fn set_health(&self, g: &str, h: GroupHealth) {
        self.s.lock().unwrap().health.insert(g.into(), h);
    }

    fn green_share(&self) -> u32 {
        let s = self.s.lock().unwrap();
        s.weights["backend"]
            .iter()
            .find(|(g, _)| g == "green")
            .map_or(0, |(_, w)| *w)
    }

    fn log(&self) -> Vec<u32> {
        self.s.lock().unwrap().log.clone()
    }

    /// `n` requests split by the weights; green fails `green_errors` of its share,
    /// blue `blue_errors`; green's take `green_ms`, blue's 40 ms.
    fn traffic(&self, n: u64, green_errors: f64, blue_errors: f64, green_ms: u64) {
        let share = u64::from(self.green_share());
        let mut s = self.s.lock().unwrap();
        for (g, count, rate) in [
            ("green", n * share / 100, green_errors),
            ("blue", n - n * share / 100, blue_errors),
        ] {
            let t = s.totals.get_mut(g).unwrap();
            t.requests += count;
            t.errors += (count as f64 * rate).round() as u64;
            let ms = if g == "green" { green_ms } else { 40 };
            let bucket = GroupTotals::BOUNDS_MS
                .iter()
                .position(|b| ms <= *b)
                .unwrap();
            t.latency.resize(GroupTotals::BOUNDS_MS.len(), 0);
            t.latency[bucket] += count;
        }
    }
}

impl Groups for Mem {
    fn weights(&self, upstream: &str) -> Option<Vec<(String, u32)>> {
        self.s.lock().unwrap().weights.get(upstream).cloned()
    }
    fn set_weights(&self, upstream: &str, weights: &[(String, u32)]) -> Result<(), String> {
        let mut s = self.s.lock().unwrap();
        let Some(w) = s.weights.get_mut(upstream) else {
            return Err(format!("no upstream {upstream}"));
        };
        *w = weights.to_vec();
        let green = weights
            .iter()
            .find(|(g, _)| g == "green")
            .map_or(0, |(_, w)| *w);
        s.log.push(green);
        Ok(())
    }
    fn totals(&self, upstream: &str, group: &str) -> Option<GroupTotals> {
        let s = self.s.lock().unwrap();
        s.weights.get(upstream)?;
        s.totals.get(group).cloned()
    }
    fn health(&self, upstream: &str, group: &str) -> Option<GroupHealth> {
        let s = self.s.lock().unwrap();
        s.weights.get(upstream)?;
        s.health.get(group).cloned()
    }
    fn breaker_open(&self, _: &str) -> bool {
        self.s.lock().unwrap().breaker
    }
}

#[derive(Default)]
struct Heard(Mutex<Vec<Notice>>);

impl Notify for Heard {
    fn release_notice(&self, n: &Notice) {
        self.0.lock().unwrap().push(n.clone());
    }
}

impl Heard {
    fn kinds(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().iter().map(|n| n.kind).collect()
    }
}

fn spec() -> ReleaseConfig {
    ReleaseConfig {
        upstream: "backend".into(),
        to: "green".into(),
        steps: vec![5, 25, 50, 100],
        step_for: Duration::from_secs(120),
        gate: ReleaseGate {
            max_error_rate: 0.01,
            max_p95: Duration::from_millis(500),
            min_requests: 100,
        },
    }
}

const T0: u64 = 1_700_000_000_000;
const SECOND: u64 = 1000;

fn manager(groups: &Arc<Mem>) -> (Releases, Arc<Heard>) {
    let r = Releases::new(groups.clone(), ReleaseMetrics::default());
    let heard = Arc::new(Heard::default());
    r.set_notify(heard.clone());
    (r, heard)
}

/// Ticks every second from `from` for `secs`, `traffic` before each tick; stops early
/// when the release is finished. Returns the time of the last tick.
fn run(r: &Releases, id: &str, from: u64, secs: u64, mut traffic: impl FnMut(u64)) -> u64 {
    let mut now = from;
    for i in 1..=secs {
        now = from + i * SECOND;
        traffic(now);
        r.tick_at(now);
        if r.get(id).unwrap().state.finished() {
            break;
        }
    }
    now
}

#[test]
fn a_healthy_target_is_promoted_through_every_step() {
    let g = Mem::new();
    let (r, heard) = manager(&g);
    let id = r.start_at(spec(), T0).unwrap();
    assert_eq!(g.green_share(), 5);
    let end = run(&r, &id, T0, 20 * 60, |_| g.traffic(100, 0.0, 0.0, 40));
    let rel = r.get(&id).unwrap();
    assert_eq!(rel.state, State::Promoted);
    assert_eq!(g.log(), vec![5, 25, 50, 100]);
    assert_eq!(g.green_share(), 100);
    // Four steps of 2 minutes, each judged on its last tick.
    assert_eq!(end, T0 + 4 * 120 * SECOND);
    let what: Vec<&str> = rel.history.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(what, ["started", "step", "step", "step", "promoted"]);
    assert!(
        rel.history[1].detail.contains("gate passed at 5%"),
        "{:?}",
        rel.history[1]
    );
    assert_eq!(heard.kinds(), ["started", "promoted"]);
}

#[test]
fn errors_at_the_25_percent_step_roll_back_within_one_evaluation() {
    let g = Mem::new();
    let (r, heard) = manager(&g);
    let id = r.start_at(spec(), T0).unwrap();
    let end = run(&r, &id, T0, 20 * 60, |_| {
        // 5 % of green's answers fail once it has 25 %.
        let errors = if g.green_share() == 25 { 0.05 } else { 0.0 };
        g.traffic(400, errors, 0.0, 40);
    });
    let rel = r.get(&id).unwrap();
    let State::RolledBack { reason } = &rel.state else {
        panic!("{:?}", rel.state)
    };
    assert!(reason.contains("gate failed at 25%"), "{reason}");
    assert!(reason.contains("error rate 5.00% > 1.00%"), "{reason}");
    // The 25 % step started at 2m; its first evaluation, at 4m, rolled it back.
    assert_eq!(end, T0 + 240 * SECOND);
    assert_eq!(g.log(), vec![5, 25, 0]);
    let last = rel.history.last().unwrap();
    assert_eq!(last.what, "rolled_back");
    assert_eq!(last.percent, 0);
    assert_eq!(last.figures.as_ref().unwrap().errors, 120 * 5);
    // Later ticks move nothing: every weight after the rollback is blue 100, green 0.
    for i in 1..=600 {
        g.traffic(200, 0.0, 0.0, 40);
        r.tick_at(end + i * SECOND);
        assert_eq!(g.green_share(), 0);
    }
    assert_eq!(g.log(), vec![5, 25, 0]);
    assert_eq!(heard.kinds(), ["started", "rolled_back"]);
    assert!(
        heard.0.lock().unwrap()[1]
            .summary
            .contains("error rate 5.00%")
    );
}

#[test]
fn an_unhealthy_target_is_refused_before_any_traffic_moves() {
    let g = Mem::new();
    let (r, heard) = manager(&g);
    g.set_health(
        "green",
        GroupHealth {
            endpoints: 2,
            available: 1,
            checks_passing: Some(false),
        },
    );
    let Err(StartError::Refused(why)) = r.start_at(spec(), T0) else {
        panic!("started")
    };
    assert_eq!(
        why,
        "group green has not passed its health check (1 of 2 endpoints available)"
    );
    g.set_health(
        "green",
        GroupHealth {
            endpoints: 2,
            available: 2,
            checks_passing: None,
        },
    );
    let Err(StartError::Refused(why)) = r.start_at(spec(), T0) else {
        panic!("started")
    };
    assert!(why.contains("has no health_check"), "{why}");
    let mut other = spec();
    other.to = "purple".into();
    let Err(StartError::Refused(why)) = r.start_at(other, T0) else {
        panic!("started")
    };
    assert_eq!(
        why,
        "upstream backend has no endpoint group purple (groups: blue, green)"
    );
    let mut same = spec();
    same.to = "blue".into();
    assert!(
        matches!(r.start_at(same, T0), Err(StartError::Refused(w)) if w.contains("already has the most weight"))
    );
    assert!(g.log().is_empty());
    assert!(r.list().is_empty());
    assert!(heard.kinds().is_empty());
}

#[test]
fn health_or_breaker_failing_mid_step_rolls_back_at_the_next_tick() {
    for cause in ["health", "breaker"] {
        let g = Mem::new();
        let (r, _) = manager(&g);
        let id = r.start_at(spec(), T0).unwrap();
        g.traffic(100, 0.0, 0.0, 40);
        r.tick_at(T0 + 10 * SECOND);
        assert_eq!(r.get(&id).unwrap().state, State::Running { step: 0 });
        if cause == "health" {
            g.set_health(
                "green",
                GroupHealth {
                    endpoints: 2,
                    available: 0,
                    checks_passing: Some(false),
                },
            );
        } else {
            g.s.lock().unwrap().breaker = true;
        }
        // Long before the step's end.
        r.tick_at(T0 + 11 * SECOND);
        let State::RolledBack { reason } = r.get(&id).unwrap().state else {
            panic!("{cause}: not rolled back")
        };
        let expected = if cause == "health" {
            "group green has not passed its health check (0 of 2 endpoints available)"
        } else {
            "the breaker of upstream backend opened"
        };
        assert_eq!(reason, expected);
        assert_eq!(g.log(), vec![5, 0]);
    }
}

#[test]
fn pause_resume_abort_promote() {
    let g = Mem::new();
    let (r, heard) = manager(&g);
    let id = r.start_at(spec(), T0).unwrap();
    // A second release on the same upstream: conflict.
    assert!(
        matches!(r.start_at(spec(), T0), Err(StartError::Conflict(m)) if m.contains("one release per upstream"))
    );
    r.act_at(&id, "pause", T0 + SECOND).unwrap();
    assert!(matches!(
        r.act_at(&id, "pause", T0 + SECOND),
        Err(ActionError::Conflict(_))
    ));
    // Paused: the step's end passes and nothing moves.
    let end = run(&r, &id, T0, 600, |_| g.traffic(100, 0.0, 0.0, 40));
    assert_eq!(g.green_share(), 5);
    assert!(matches!(
        r.get(&id).unwrap().state,
        State::Paused { step: 0, .. }
    ));
    r.act_at(&id, "resume", end).unwrap();
    // The step starts again at the resume.
    let next = run(&r, &id, end, 119, |_| g.traffic(100, 0.0, 0.0, 40));
    assert_eq!(g.green_share(), 5);
    r.tick_at(next + SECOND);
    assert_eq!(g.green_share(), 25);
    r.act_at(&id, "promote", next + 2 * SECOND).unwrap();
    assert_eq!(r.get(&id).unwrap().state, State::Promoted);
    assert_eq!(g.green_share(), 100);
    assert!(
        matches!(r.act_at(&id, "abort", next), Err(ActionError::Conflict(m)) if m.contains("promoted: nothing to abort"))
    );
    assert!(matches!(
        r.act_at("nope", "abort", next),
        Err(ActionError::NotFound(_))
    ));

    // Abort: all weight back to blue.
    let g = Mem::new();
    let (r2, _) = manager(&g);
    let id = r2.start_at(spec(), T0).unwrap();
    r2.act_at(&id, "abort", T0 + SECOND).unwrap();
    assert_eq!(r2.get(&id).unwrap().state, State::Aborted);
    assert_eq!(g.log(), vec![5, 0]);
    assert_eq!(heard.kinds(), ["started", "promoted"]);
}

#[test]
fn too_few_requests_extend_the_step_then_pause_never_promote() {
    let g = Mem::new();
    let (r, _) = manager(&g);
    let id = r.start_at(spec(), T0).unwrap();
    // 20 requests a second at 5 %: one for green per second, 120 in the 2 minute step
    // would pass; here green gets none.
    run(&r, &id, T0, 3600, |_| g.traffic(10, 0.0, 0.0, 40));
    let rel = r.get(&id).unwrap();
    let State::Paused { step: 0, reason } = &rel.state else {
        panic!("{:?}", rel.state)
    };
    assert!(
        reason.contains("0 requests of the 100 the gate needs"),
        "{reason}"
    );
    assert_eq!(g.log(), vec![5]);
    let what: Vec<&str> = rel.history.iter().map(|e| e.what.as_str()).collect();
    let mut expected = vec!["started"];
    expected.extend(std::iter::repeat_n("extended", MAX_EXTENSIONS as usize));
    expected.push("paused");
    assert_eq!(what, expected);
    // Paused at 4 x step_for.
    assert_eq!(rel.history.last().unwrap().at, T0 + 4 * 120 * SECOND);

    // Enough traffic arriving during an extension: judged at the extended end.
    let g = Mem::new();
    let (r, _) = manager(&g);
    let id = r.start_at(spec(), T0).unwrap();
    run(&r, &id, T0, 121, |now| {
        let n = if now > T0 + 120 * SECOND { 2000 } else { 10 };
        g.traffic(n, 0.0, 0.0, 40);
    });
    run(&r, &id, T0 + 121 * SECOND, 119, |_| {
        g.traffic(20, 0.0, 0.0, 40)
    });
    assert_eq!(g.green_share(), 25);
}

#[test]
fn an_old_group_failing_alike_extends_rather_than_rolls_back() {
    let g = Mem::new();
    let (r, _) = manager(&g);
    let id = r.start_at(spec(), T0).unwrap();
    run(&r, &id, T0, 120, |_| g.traffic(1000, 0.03, 0.03, 40));
    let rel = r.get(&id).unwrap();
    assert_eq!(rel.state, State::Running { step: 0 });
    let last = rel.history.last().unwrap();
    assert_eq!(last.what, "extended");
    assert!(last.detail.contains("shared trouble"), "{}", last.detail);
    // Green three times as bad as blue: its own fault.
    run(&r, &id, T0 + 120 * SECOND, 120, |_| {
        g.traffic(1000, 0.09, 0.03, 40)
    });
    assert!(matches!(
        r.get(&id).unwrap().state,
        State::RolledBack { .. }
    ));
}

#[test]
fn slow_answers_fail_the_p95_gate() {
    let g = Mem::new();
    let (r, _) = manager(&g);
    let id = r.start_at(spec(), T0).unwrap();
    run(&r, &id, T0, 200, |_| g.traffic(100, 0.0, 0.0, 900));
    let State::RolledBack { reason } = r.get(&id).unwrap().state else {
        panic!()
    };
    assert!(reason.contains("p95 1000ms > 500ms"), "{reason}");
}

#[test]
fn a_config_release_waits_for_health_starts_once_and_again_after_removal() {
    let g = Mem::new();
    let (r, heard) = manager(&g);
    g.set_health(
        "green",
        GroupHealth {
            endpoints: 2,
            available: 0,
            checks_passing: Some(false),
        },
    );
    r.configure_at(&[spec()], T0);
    let rel = r.list().pop().unwrap();
    assert!(matches!(&rel.state, State::Waiting { reason } if reason.contains("health check")));
    assert!(g.log().is_empty());
    r.tick_at(T0 + SECOND);
    assert_eq!(r.list().len(), 1);
    g.set_health("green", HEALTHY);
    r.tick_at(T0 + 2 * SECOND);
    let rel = r.get(&rel.id).unwrap();
    assert_eq!(rel.state, State::Running { step: 0 });
    assert!(rel.from_config);
    assert_eq!(g.log(), vec![5]);
    // A reload with the same entry: nothing new, even after it finished.
    r.configure_at(&[spec()], T0 + 3 * SECOND);
    r.act_at(&rel.id, "abort", T0 + 4 * SECOND).unwrap();
    r.configure_at(&[spec()], T0 + 5 * SECOND);
    assert_eq!(r.list().len(), 1);
    assert_eq!(g.log(), vec![5, 0]);
    // Removed, then written again: a new release.
    r.configure_at(&[], T0 + 6 * SECOND);
    r.configure_at(&[spec()], T0 + 7 * SECOND);
    assert_eq!(r.list().len(), 2);
    assert_eq!(g.log(), vec![5, 0, 5]);
    assert_eq!(heard.kinds(), ["started", "aborted", "started"]);
}

#[test]
fn metrics_show_the_step_and_the_state() {
    let g = Mem::new();
    let mut registry = prometheus_client::registry::Registry::with_prefix("rampart");
    let metrics = ReleaseMetrics::register(&mut registry);
    let registry = Arc::new(registry);
    let r = Releases::new(g.clone(), metrics);
    let id = r.start_at(spec(), T0).unwrap();
    let text = crate::observe::encode_registry(&registry);
    assert!(
        text.contains("rampart_release_step{upstream=\"backend\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("rampart_release_state{upstream=\"backend\",state=\"running\"} 1"),
        "{text}"
    );
    r.act_at(&id, "abort", T0 + SECOND).unwrap();
    let text = crate::observe::encode_registry(&registry);
    assert!(
        text.contains("rampart_release_step{upstream=\"backend\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("rampart_release_state{upstream=\"backend\",state=\"aborted\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("rampart_release_state{upstream=\"backend\",state=\"running\"} 0"),
        "{text}"
    );
}

/// The driver on tokio's clock, paused: eight minutes of steps pass without waiting, and
/// each change is saved to the state file.
#[tokio::test(start_paused = true)]
async fn the_driver_ticks_on_tokio_time_and_saves_each_change() {
    let g = Mem::new();
    let r = Arc::new(Releases::new(g.clone(), ReleaseMetrics::default()));
    let dir = std::env::temp_dir().join(format!("rampart-driver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("releases.json");
    r.store.set_file(Some(path.clone()));
    let background = crate::shutdown::Background::default();
    super::spawn(r.clone(), &background);
    let id = r.start(spec()).unwrap();
    let mut seen = Vec::new();
    for _ in 0..(9 * 60) {
        g.traffic(100, 0.0, 0.0, 40);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(Some(p)) = super::store::load_file(&path) {
            let state = p.releases[0].state.as_str();
            if seen.last() != Some(&state) {
                seen.push(state);
            }
        }
    }
    assert_eq!(r.get(&id).unwrap().state, State::Promoted);
    assert_eq!(g.log(), vec![5, 25, 50, 100]);
    assert_eq!(seen, ["running", "promoted"]);
    background.stop(Duration::from_secs(1)).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[path = "tests_store.rs"]
mod store;
