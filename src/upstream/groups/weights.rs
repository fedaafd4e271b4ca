//! The groups' state kept in `UpstreamStates` across requests and reloads: the weights set
//! at run time, each group's figures, its health; and the API releases drive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::{GroupHealth, GroupMetrics, GroupRuntime, GroupStats, GroupTotals, Schedule};
use crate::config::UpstreamConfig;
use crate::upstream::resilience::{UpstreamState, UpstreamStates};

/// What an upstream's groups keep across requests and reloads (in `UpstreamState`).
#[derive(Debug, Default)]
pub(crate) struct GroupsShared {
    inner: Mutex<SharedInner>,
    /// `healthy_after` of the upstream's active check; 0: none.
    healthy_after: AtomicU32,
}

#[derive(Debug, Default)]
struct SharedInner {
    /// The latest configuration's groups: name, weight, endpoint URLs. Empty: plain
    /// `endpoints`.
    config: Vec<(String, u32, Vec<String>)>,
    /// Weights set at run time, by group name; kept while the group names stay.
    overrides: Option<HashMap<String, u32>>,
    stats: HashMap<String, Arc<GroupStats>>,
    /// The snapshots' runtimes (a reload may leave the old one serving for a while): each
    /// takes a weight change.
    live: Vec<Weak<GroupRuntime>>,
}

impl SharedInner {
    fn effective(&self) -> Vec<(String, u32)> {
        self.config
            .iter()
            .map(|(n, w, _)| {
                let w = self
                    .overrides
                    .as_ref()
                    .and_then(|o| o.get(n).copied())
                    .unwrap_or(*w);
                (n.clone(), w)
            })
            .collect()
    }

    fn push_weights(&mut self) {
        let weights = self.effective();
        let by_name: HashMap<&str, u32> = weights.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        self.live.retain(|r| r.strong_count() > 0);
        for r in self.live.iter().filter_map(Weak::upgrade) {
            r.set_weights(&by_name);
        }
    }
}

impl GroupsShared {
    /// The groups of `cfg` for a new snapshot's upstream (None for plain `endpoints`).
    /// Weights set at run time stay when the group names are those of before.
    pub(crate) fn runtime(
        &self,
        cfg: &UpstreamConfig,
        metrics: &GroupMetrics,
    ) -> Option<Arc<GroupRuntime>> {
        self.healthy_after.store(
            cfg.resilience
                .health_check
                .as_ref()
                .map_or(0, |h| h.check.healthy_after.max(1)),
            Ordering::Relaxed,
        );
        let mut inner = crate::sync::lock(&self.inner);
        let names = |c: &[(String, u32, Vec<String>)]| -> Vec<String> {
            c.iter().map(|g| g.0.clone()).collect()
        };
        let config: Vec<(String, u32, Vec<String>)> = cfg
            .groups
            .iter()
            .map(|g| {
                let urls = g.endpoints.iter().map(ToString::to_string).collect();
                (g.name.clone(), g.weight, urls)
            })
            .collect();
        if names(&inner.config) != names(&config) {
            inner.overrides = None;
        }
        inner.config = config;
        if cfg.groups.is_empty() {
            return None;
        }
        let mut start = 0;
        let mut ranges = Vec::new();
        let mut stats = Vec::new();
        for g in &cfg.groups {
            ranges.push(start..start + g.endpoints.len());
            start += g.endpoints.len();
            let s = inner
                .stats
                .entry(g.name.clone())
                .or_insert_with(|| Arc::new(GroupStats::new(metrics, &cfg.name, &g.name)))
                .clone();
            stats.push(s);
        }
        let weights: Vec<u32> = inner.effective().into_iter().map(|(_, w)| w).collect();
        for (s, w) in stats.iter().zip(&weights) {
            s.weight.set(i64::from(*w));
        }
        let runtime = Arc::new(GroupRuntime {
            names: cfg.groups.iter().map(|g| g.name.clone()).collect(),
            ranges,
            stats,
            sticky: cfg.sticky.clone(),
            schedule: ArcSwap::from_pointee(Schedule::new(&weights)),
            next: AtomicUsize::new(0),
        });
        inner.live.retain(|r| r.strong_count() > 0);
        inner.live.push(Arc::downgrade(&runtime));
        Some(runtime)
    }
}

impl UpstreamStates {
    /// Group names and their weights now (config weights unless overridden), None for an
    /// unknown upstream or one without groups.
    pub(crate) fn group_weights(&self, upstream: &str) -> Option<Vec<(String, u32)>> {
        let state = self.get(upstream)?;
        let inner = crate::sync::lock(&state.groups.inner);
        (!inner.config.is_empty()).then(|| inner.effective())
    }

    /// Overrides the weights of the groups named (the others keep theirs); kept across
    /// reloads while the group names stay. An unknown group or upstream, a weight above
    /// 10000, or all weights 0 is an Err with the reason. Takes effect for the next request.
    pub(crate) fn set_group_weights(
        &self,
        upstream: &str,
        weights: &[(String, u32)],
    ) -> Result<(), String> {
        let state = self
            .get(upstream)
            .ok_or_else(|| format!("unknown upstream {upstream:?}"))?;
        let mut inner = crate::sync::lock(&state.groups.inner);
        if inner.config.is_empty() {
            return Err(format!("upstream {upstream:?} has no groups"));
        }
        let mut next: HashMap<String, u32> = inner.effective().into_iter().collect();
        for (name, w) in weights {
            let Some(slot) = next.get_mut(name) else {
                let known: Vec<&str> = inner.config.iter().map(|g| g.0.as_str()).collect();
                return Err(format!(
                    "upstream {upstream:?} has no group {name:?} (groups: {})",
                    known.join(", ")
                ));
            };
            if *w > UpstreamConfig::MAX_GROUP_WEIGHT {
                return Err(format!(
                    "weight {w} of group {name:?} is above {}",
                    UpstreamConfig::MAX_GROUP_WEIGHT
                ));
            }
            *slot = *w;
        }
        if next.values().all(|w| *w == 0) {
            return Err("every group would have weight 0: at least one must take traffic".into());
        }
        inner.overrides = Some(next);
        inner.push_weights();
        Ok(())
    }

    /// Back to the config's weights.
    pub(crate) fn clear_group_weights(&self, upstream: &str) {
        if let Some(state) = self.get(upstream) {
            let mut inner = crate::sync::lock(&state.groups.inner);
            inner.overrides = None;
            inner.push_weights();
        }
    }

    pub(crate) fn group_totals(&self, upstream: &str, group: &str) -> Option<GroupTotals> {
        let state = self.get(upstream)?;
        let inner = crate::sync::lock(&state.groups.inner);
        inner.stats.get(group).map(|s| s.totals())
    }

    /// The group's endpoints' state: how many, how many available (not ejected, active
    /// check passing), and whether every endpoint has passed `healthy_after` active checks
    /// in a row (None: the upstream has no health_check).
    pub(crate) fn group_health(&self, upstream: &str, group: &str) -> Option<GroupHealth> {
        let state = self.get(upstream)?;
        let urls = {
            let inner = crate::sync::lock(&state.groups.inner);
            inner.config.iter().find(|g| g.0 == group)?.2.clone()
        };
        Some(group_health(&state, &urls))
    }
}

/// See `UpstreamStates::group_health`.
pub(crate) fn group_health(state: &UpstreamState, urls: &[String]) -> GroupHealth {
    let now = Instant::now();
    let needed = state.groups.healthy_after.load(Ordering::Relaxed);
    let mut available = 0;
    let mut passing = true;
    for url in urls {
        let ep = state.endpoint(url);
        if ep.active_ok.load(Ordering::Relaxed) && crate::sync::lock(&ep.health).available(now) {
            available += 1;
        }
        passing &= ep.active_passes.load(Ordering::Relaxed) >= needed;
    }
    GroupHealth {
        endpoints: urls.len(),
        available,
        checks_passing: (needed > 0).then_some(passing),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::forward::{Upstream, tls_config};
    use crate::upstream::resilience::UpstreamMetrics;

    fn config(groups: &str) -> UpstreamConfig {
        let yaml = format!(
            "listeners: [{{ name: l, listen: \"127.0.0.1:0\", routes: [{{ upstream: u }}] }}]\n\
             upstreams:\n  u:\n    groups: {groups}\n    health_check: {{ healthy_after: 2 }}\n"
        );
        let mut cfg = crate::config::parse_str(&yaml, "t.yaml", &|_| None).unwrap();
        cfg.upstreams.remove("u").unwrap()
    }

    const BLUE_GREEN: &str = "{ blue: { endpoints: [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"], weight: 100 }, \
                              green: { endpoints: [\"http://127.0.0.1:3\"], weight: 0 } }";

    fn choices(u: &Upstream, n: usize) -> Vec<usize> {
        let g = u.groups.as_deref().unwrap();
        (0..n).map(|_| g.choose(None)).collect()
    }

    #[test]
    fn weights_set_at_run_time_take_effect_and_outlive_a_reload() {
        let states = UpstreamStates::new(UpstreamMetrics::default());
        let tls = tls_config(None).unwrap();
        let cfg = config(BLUE_GREEN);
        let u = Upstream::new(&cfg, &tls, &states, Default::default()).unwrap();
        let w = |b: u32, g: u32| Some(vec![("blue".to_owned(), b), ("green".to_owned(), g)]);
        assert_eq!(states.group_weights("u"), w(100, 0));
        assert_eq!(choices(&u, 4), [0, 0, 0, 0]);

        states
            .set_group_weights("u", &[("green".into(), 100)])
            .unwrap();
        assert_eq!(states.group_weights("u"), w(100, 100));
        assert_eq!(choices(&u, 4), [0, 1, 0, 1]);
        assert_eq!(
            states.set_group_weights("u", &[("purple".into(), 1)]),
            Err("upstream \"u\" has no group \"purple\" (groups: blue, green)".into())
        );
        assert_eq!(
            states.set_group_weights("x", &[]),
            Err("unknown upstream \"x\"".into())
        );
        assert_eq!(
            states.set_group_weights("u", &[("blue".into(), 0), ("green".into(), 0)]),
            Err("every group would have weight 0: at least one must take traffic".into())
        );
        assert_eq!(
            states.set_group_weights("u", &[("blue".into(), 10_001)]),
            Err("weight 10001 of group \"blue\" is above 10000".into())
        );
        assert_eq!(
            states.group_weights("u"),
            w(100, 100),
            "refused changes change nothing"
        );

        // A reload with the same group names keeps the weights, in the new snapshot and
        // in the old one still serving.
        let reloaded = Upstream::new(&cfg, &tls, &states, Default::default()).unwrap();
        assert_eq!(reloaded.groups.as_deref().unwrap().weights(), [100, 100]);
        states
            .set_group_weights("u", &[("blue".into(), 0)])
            .unwrap();
        assert_eq!(choices(&reloaded, 3), [1, 1, 1]);
        assert_eq!(choices(&u, 3), [1, 1, 1]);
        states.clear_group_weights("u");
        assert_eq!(states.group_weights("u"), w(100, 0));
        assert_eq!(choices(&reloaded, 2), [0, 0]);

        // Other group names: the file's weights again.
        states
            .set_group_weights("u", &[("green".into(), 50)])
            .unwrap();
        let renamed = config(
            "{ blue: { endpoints: [\"http://127.0.0.1:1\"], weight: 10 }, \
               canary: { endpoints: [\"http://127.0.0.1:3\"], weight: 0 } }",
        );
        let r = Upstream::new(&renamed, &tls, &states, Default::default()).unwrap();
        assert_eq!(r.groups.as_deref().unwrap().weights(), [10, 0]);
        assert_eq!(
            states.group_weights("u"),
            Some(vec![("blue".to_owned(), 10), ("canary".to_owned(), 0)])
        );
    }

    #[test]
    fn group_health_and_totals() {
        let states = UpstreamStates::new(UpstreamMetrics::default());
        let tls = tls_config(None).unwrap();
        let u = Upstream::new(&config(BLUE_GREEN), &tls, &states, Default::default()).unwrap();
        let health = |g: &str| states.group_health("u", g).unwrap();
        assert_eq!(
            health("blue"),
            GroupHealth {
                endpoints: 2,
                available: 2,
                checks_passing: Some(false)
            }
        );
        assert_eq!(states.group_health("u", "nope"), None);
        let green = &u.endpoints[2].state;
        u.state.endpoint_check(green, true, 2);
        assert_eq!(
            health("green").checks_passing,
            Some(false),
            "one pass of two"
        );
        u.state.endpoint_check(green, true, 2);
        assert_eq!(health("green").checks_passing, Some(true));
        u.state.endpoint_check(green, false, 2);
        assert_eq!(
            health("green").checks_passing,
            Some(false),
            "a failure resets"
        );
        green.active_ok.store(false, Ordering::Relaxed);
        assert_eq!(health("green").available, 0);

        let g = u.groups.as_deref().unwrap();
        g.record(0, Some(200), Duration::from_millis(3));
        g.record(1, Some(503), Duration::from_millis(300));
        g.record(2, None, Duration::from_millis(7));
        let blue = states.group_totals("u", "blue").unwrap();
        assert_eq!((blue.requests, blue.errors), (2, 1));
        assert_eq!(blue.p95(), Some(Duration::from_millis(500)));
        assert_eq!(blue.latency.len(), GroupTotals::BOUNDS_MS.len());
        let green = states.group_totals("u", "green").unwrap();
        assert_eq!((green.requests, green.errors), (1, 1));
        assert_eq!(states.group_totals("u", "nope"), None);
    }
}
