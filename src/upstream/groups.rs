//! Endpoint groups of one upstream sharing its traffic by weight (`groups:`): the choice of
//! a group (smooth weighted round robin, or a sticky key hashed onto the weights), the
//! weights as changed at run time (kept in `UpstreamStates`, across reloads), and each
//! group's figures (requests, errors, latency) and health for `/admin/upstreams`, the
//! metrics and releases.
//!
//! The request path reads one `ArcSwap` (no lock, no allocation) and one atomic counter;
//! an upstream with plain `endpoints` has no `GroupRuntime` at all.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::Sticky;
use crate::observe::histogram::DurationHistogram;

mod weights;
pub(crate) use weights::{GroupsShared, group_health};

type Labels = Vec<(&'static str, String)>;

/// The group latency buckets, in seconds (`GroupTotals::BOUNDS_MS` without +Inf).
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Cumulative figures of one group since start (never reset; a window is the difference
/// of two snapshots).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct GroupTotals {
    pub requests: u64,
    /// Requests that got no answer (connect error, timeout, reset: what the breaker counts
    /// as failures without a status) plus those answered 5xx.
    pub errors: u64,
    /// Request latency (until the answer's head) per bucket since start: `latency[i]`
    /// counts the requests above `BOUNDS_MS[i - 1]` and up to `BOUNDS_MS[i]` (not
    /// cumulative across buckets; the last bucket is +Inf).
    pub latency: Vec<u64>,
}

impl GroupTotals {
    pub(crate) const BOUNDS_MS: &'static [u64] = &[
        5,
        10,
        25,
        50,
        100,
        250,
        500,
        1000,
        2500,
        5000,
        10000,
        u64::MAX,
    ];

    /// `self - earlier`, figure by figure.
    pub(crate) fn since(&self, earlier: &GroupTotals) -> GroupTotals {
        GroupTotals {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self
                .latency
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(earlier.latency.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Errors over requests; None with 0 requests.
    pub(crate) fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// The upper bound of the bucket holding the 95th percentile (`Duration::MAX`-like
    /// `u64::MAX` ms for the +Inf bucket); None without requests.
    pub(crate) fn p95(&self) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        // The smallest bucket with at least 95 % of the requests at or below it.
        let rank = total.saturating_mul(95).div_ceil(100);
        let mut seen = 0u64;
        for (i, c) in self.latency.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let ms = Self::BOUNDS_MS.get(i).copied().unwrap_or(u64::MAX);
                return Some(Duration::from_millis(ms));
            }
        }
        Some(Duration::from_millis(u64::MAX))
    }
}

/// The state of a group's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupHealth {
    pub endpoints: usize,
    /// Not ejected and not failing an active check.
    pub available: usize,
    /// Every endpoint has passed `healthy_after` active checks in a row; None: the upstream
    /// has no `health_check`.
    pub checks_passing: Option<bool>,
}

/// The group metric families (`rampart_upstream_group_*`).
#[derive(Debug, Clone)]
pub(crate) struct GroupMetrics {
    requests: Family<Labels, Counter>,
    duration: Family<Labels, DurationHistogram, fn() -> DurationHistogram>,
    weight: Family<Labels, Gauge>,
    fallbacks: Family<Labels, Counter>,
}

fn group_histogram() -> DurationHistogram {
    DurationHistogram::new(BUCKETS)
}

impl Default for GroupMetrics {
    fn default() -> Self {
        GroupMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(group_histogram),
            weight: Family::default(),
            fallbacks: Family::default(),
        }
    }
}

impl GroupMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "upstream_group_requests",
            "Requests per endpoint group, by class (1xx to 5xx by status, error: no answer)",
            self.requests.clone(),
        );
        registry.register(
            "upstream_group_request_duration_seconds",
            "Time to the answer's head per endpoint group",
            self.duration.clone(),
        );
        registry.register(
            "upstream_group_weight",
            "The weight of each endpoint group now",
            self.weight.clone(),
        );
        registry.register(
            "upstream_group_fallbacks",
            "Requests sent to another group because no endpoint of this one was available",
            self.fallbacks.clone(),
        );
    }
}

/// Classes of `rampart_upstream_group_requests_total`, in `GroupStats::classes` order.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// One group's counters, kept by name across reloads. The metric handles are looked up
/// once, so recording a request builds no labels.
#[derive(Debug)]
pub(crate) struct GroupStats {
    classes: [Counter; 6],
    latency: DurationHistogram,
    weight: Gauge,
    fallbacks: Counter,
}

impl GroupStats {
    fn new(metrics: &GroupMetrics, upstream: &str, group: &str) -> GroupStats {
        let labels = || {
            vec![
                ("upstream", upstream.to_owned()),
                ("group", group.to_owned()),
            ]
        };
        let classes = CLASSES.map(|class| {
            let mut l = labels();
            l.push(("class", class.to_owned()));
            metrics.requests.get_or_create(&l).clone()
        });
        GroupStats {
            classes,
            latency: metrics.duration.get_or_create(&labels()).clone(),
            weight: metrics.weight.get_or_create(&labels()).clone(),
            fallbacks: metrics.fallbacks.get_or_create(&labels()).clone(),
        }
    }

    /// One request's end: its status, or None when no answer came.
    pub(crate) fn record(&self, status: Option<u16>, elapsed: Duration) {
        let class = match status {
            Some(s) => usize::from((s / 100).clamp(1, 5)) - 1,
            None => 5,
        };
        if let Some(c) = self.classes.get(class) {
            c.inc();
        }
        self.latency.observe(elapsed);
    }

    fn totals(&self) -> GroupTotals {
        let count = |i: usize| self.classes.get(i).map_or(0, Counter::get);
        GroupTotals {
            requests: (0..CLASSES.len()).map(count).sum(),
            errors: count(4) + count(5),
            latency: self.latency.snapshot().counts,
        }
    }
}

/// The order in which the groups take requests for the current weights: nginx's smooth
/// weighted round robin, run once over a whole cycle (the weights divided by their common
/// divisor), and a request's hash placed on the weights' cumulative ranges.
#[derive(Debug)]
pub(crate) struct Schedule {
    weights: Vec<u32>,
    sequence: Vec<u8>,
    /// `cumulative[i]` = the sum of the weights up to and including group i.
    cumulative: Vec<u64>,
}

impl Schedule {
    pub(crate) fn new(weights: &[u32]) -> Schedule {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|w| {
                sum += u64::from(*w);
                sum
            })
            .collect();
        Schedule {
            weights: weights.to_vec(),
            sequence: smooth_sequence(weights),
            cumulative,
        }
    }

    /// The group of the n-th request without a sticky key.
    fn by_round(&self, n: usize) -> usize {
        match self.sequence.len() {
            0 => 0,
            len => usize::from(self.sequence[n % len]),
        }
    }

    /// The group of a sticky key's hash: the hash as a point in [0, total) (scaled, not
    /// taken modulo, so a point keeps its place when the total changes), in the range of
    /// the group whose weight covers it. Moving weight between neighbours moves only the
    /// points in the moved range.
    fn by_hash(&self, hash: u64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        let point = ((u128::from(hash) * u128::from(total)) >> 64) as u64;
        self.cumulative.iter().position(|&c| point < c).unwrap_or(0)
    }
}

/// nginx's smooth weighted round robin over one cycle: each turn every group gains its
/// weight, the one with the most goes and loses the total. Weights 5, 1, 1 give
/// a a b a c a a. The weights are first divided by their greatest common divisor, so 95/5
/// is a cycle of 20, not 100.
pub(crate) fn smooth_sequence(weights: &[u32]) -> Vec<u8> {
    let divisor = weights
        .iter()
        .copied()
        .filter(|w| *w > 0)
        .fold(0u32, gcd)
        .max(1);
    let weights: Vec<i64> = weights.iter().map(|w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(u8::try_from(best).unwrap_or(0));
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A stable 64-bit hash of a sticky key (FNV-1a, then a finalizer that spreads short keys
/// over the whole range): the same key lands in the same group on every replica and after
/// a restart.
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The request's sticky key, hashed; None when it has none (it then goes by round robin).
/// `client` gives the client address as the rate limiter finds it.
pub(crate) fn sticky_hash(
    sticky: &Sticky,
    headers: &HeaderMap,
    client: impl FnOnce() -> std::net::IpAddr,
) -> Option<u64> {
    match sticky {
        Sticky::Header(name) => headers
            .get(name)
            .filter(|v| !v.is_empty())
            .map(|v| key_hash(v.as_bytes())),
        Sticky::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let (k, v) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
                (k == name.as_bytes()).then(|| key_hash(&v[1..]))
            }),
        // The address's bytes: no text to build per request.
        Sticky::ClientIp => Some(match client() {
            std::net::IpAddr::V4(v4) => key_hash(&v4.octets()),
            std::net::IpAddr::V6(v6) => key_hash(&v6.octets()),
        }),
    }
}

/// The groups of one configuration snapshot's upstream: which endpoints each holds, and
/// the schedule for the weights now (replaced when they change at run time).
#[derive(Debug)]
pub(crate) struct GroupRuntime {
    pub(crate) names: Vec<String>,
    /// Into `Upstream::endpoints`, group after group.
    ranges: Vec<Range<usize>>,
    stats: Vec<Arc<GroupStats>>,
    pub(crate) sticky: Option<Sticky>,
    schedule: ArcSwap<Schedule>,
    next: AtomicUsize,
}

impl GroupRuntime {
    /// The group of the next request: by the sticky key's hash when it has one, else the
    /// next turn of the smooth sequence.
    pub(crate) fn choose(&self, hash: Option<u64>) -> usize {
        let schedule = self.schedule.load();
        match hash {
            Some(h) => schedule.by_hash(h),
            None => schedule.by_round(self.next.fetch_add(1, Ordering::Relaxed)),
        }
    }

    pub(crate) fn range(&self, group: usize) -> Range<usize> {
        self.ranges.get(group).cloned().unwrap_or(0..0)
    }

    /// The group an endpoint index belongs to.
    pub(crate) fn group_of(&self, endpoint: usize) -> usize {
        self.ranges
            .iter()
            .position(|r| r.contains(&endpoint))
            .unwrap_or(0)
    }

    /// Another group with weight above 0 that `has_endpoint` accepts, the heaviest first;
    /// counted as a fallback of `from`.
    pub(crate) fn fallback(
        &self,
        from: usize,
        has_endpoint: impl Fn(Range<usize>) -> bool,
    ) -> Option<usize> {
        let schedule = self.schedule.load();
        let mut order: Vec<usize> = (0..self.ranges.len())
            .filter(|&g| g != from && schedule.weights.get(g).is_some_and(|w| *w > 0))
            .collect();
        order.sort_by_key(|&g| std::cmp::Reverse(schedule.weights.get(g).copied()));
        let to = order.into_iter().find(|&g| has_endpoint(self.range(g)))?;
        if let Some(s) = self.stats.get(from) {
            s.fallbacks.inc();
        }
        Some(to)
    }

    /// One request of `endpoint`'s group ended.
    pub(crate) fn record(&self, endpoint: usize, status: Option<u16>, elapsed: Duration) {
        if let Some(s) = self.stats.get(self.group_of(endpoint)) {
            s.record(status, elapsed);
        }
    }

    /// The weights in force, by group.
    pub(crate) fn weights(&self) -> Vec<u32> {
        self.schedule.load().weights.clone()
    }

    pub(crate) fn totals(&self, group: usize) -> GroupTotals {
        self.stats
            .get(group)
            .map(|s| s.totals())
            .unwrap_or_default()
    }

    fn set_weights(&self, by_name: &HashMap<&str, u32>) {
        let old = self.schedule.load();
        let weights: Vec<u32> = self
            .names
            .iter()
            .zip(&old.weights)
            .map(|(n, w)| by_name.get(n.as_str()).copied().unwrap_or(*w))
            .collect();
        if weights.iter().all(|w| *w == 0) || weights == old.weights {
            return;
        }
        for (s, w) in self.stats.iter().zip(&weights) {
            s.weight.set(i64::from(*w));
        }
        self.schedule.store(Arc::new(Schedule::new(&weights)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_round_robin_is_nginx_sequence() {
        let names = |seq: Vec<u8>| -> String { seq.iter().map(|g| (b'a' + g) as char).collect() };
        assert_eq!(names(smooth_sequence(&[5, 1, 1])), "aabacaa");
        // Divided by the common divisor: 95/5 is a cycle of 20 with one green turn.
        let seq = smooth_sequence(&[95, 5]);
        assert_eq!(seq.len(), 20);
        assert_eq!(seq.iter().filter(|g| **g == 1).count(), 1);
        // A group of weight 0 never takes a turn; one group takes them all.
        assert_eq!(names(smooth_sequence(&[0, 3])), "b");
        assert_eq!(names(smooth_sequence(&[100, 0])), "a");
        assert_eq!(names(smooth_sequence(&[2, 2, 1])), "abcab");
        // Smooth: at 1/4, green's turns are spread, never two in a row.
        let s = names(smooth_sequence(&[75, 25]));
        assert_eq!(s, "aaba");
        let schedule = Schedule::new(&[5, 1, 1]);
        let picked: String = (0..14)
            .map(|n| (b'a' + schedule.by_round(n) as u8) as char)
            .collect();
        assert_eq!(picked, "aabacaaaabacaa");
    }

    #[test]
    fn hash_ranges_follow_the_weights_and_move_only_the_moved_share() {
        let keys: Vec<u64> = (0..20_000u32)
            .map(|i| key_hash(format!("user-{i}").as_bytes()))
            .collect();
        let at = |w: &[u32]| -> Vec<usize> {
            let s = Schedule::new(w);
            keys.iter().map(|h| s.by_hash(*h)).collect()
        };
        let before = at(&[95, 5]);
        let green = before.iter().filter(|g| **g == 1).count();
        assert!((800..1200).contains(&green), "{green} of 20000 at 5%");
        // The same weights give the same groups.
        assert_eq!(before, at(&[95, 5]));
        let after = at(&[75, 25]);
        let green = after.iter().filter(|g| **g == 1).count();
        assert!((4600..5400).contains(&green), "{green} of 20000 at 25%");
        // Only blue keys from the moved share move, and only to green.
        for (b, a) in before.iter().zip(&after) {
            assert!(b == a || (*b == 0 && *a == 1), "a key moved {b} -> {a}");
        }
        // Scaled weights (a different total) keep every key where it was.
        assert_eq!(at(&[950, 50]), before);
        // A group of weight 0 has no range.
        assert!(at(&[100, 0]).iter().all(|g| *g == 0));
    }

    #[test]
    fn totals_give_error_rate_and_p95() {
        let mut t = GroupTotals {
            requests: 100,
            errors: 5,
            latency: vec![0; GroupTotals::BOUNDS_MS.len()],
        };
        t.latency[2] = 90; // <= 25 ms
        t.latency[6] = 10; // <= 500 ms
        assert_eq!(t.error_rate(), Some(0.05));
        assert_eq!(t.p95(), Some(Duration::from_millis(500)));
        t.latency[6] = 5;
        t.latency[2] = 95;
        assert_eq!(t.p95(), Some(Duration::from_millis(25)));
        let earlier = GroupTotals {
            requests: 40,
            errors: 5,
            latency: vec![0, 0, 40, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let w = t.since(&earlier);
        assert_eq!((w.requests, w.errors), (60, 0));
        assert_eq!(w.error_rate(), Some(0.0));
        assert_eq!(w.p95(), Some(Duration::from_millis(500)));
        assert_eq!(GroupTotals::default().error_rate(), None);
        assert_eq!(GroupTotals::default().p95(), None);
    }

    #[test]
    fn sticky_keys_come_from_headers_cookies_or_the_client() {
        let mut h = HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        h.append(http::header::COOKIE, "a=1; sid=abc".parse().unwrap());
        let ip = || std::net::IpAddr::from([10, 0, 0, 9]);
        let header = Sticky::Header("x-user".parse().unwrap());
        assert_eq!(sticky_hash(&header, &h, ip), Some(key_hash(b"alice")));
        let cookie = Sticky::Cookie("sid".into());
        assert_eq!(sticky_hash(&cookie, &h, ip), Some(key_hash(b"abc")));
        assert_eq!(sticky_hash(&Sticky::Cookie("s".into()), &h, ip), None);
        assert_eq!(
            sticky_hash(&Sticky::ClientIp, &h, ip),
            Some(key_hash(&[10, 0, 0, 9]))
        );
        assert_eq!(sticky_hash(&header, &HeaderMap::new(), ip), None);
    }
}
