//! A fixed-bucket histogram of durations on plain atomics.
//!
//! prometheus-client's own histogram takes a mutex on every observation and offers no way to
//! read its buckets back; the request path observes on every request, and the alert rules
//! and the status page need the buckets (P95) and the sum (average) between scrapes. One
//! `fetch_add` per bucket hit and one for the sum, readable at any time. Each worker thread
//! writes its own copy of the counts (its own cache lines); reads add the copies up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Request latency: from 100 µs, where a proxy's own answers (and a cached or local
/// backend's) live, and dense below 1 s, where the users' P95 < 500 ms target lives. 18
/// bounds: with the +Inf bucket and the sum, still 20 cells, the same cache lines per shard
/// as the 16 of before; a scrape writes two more lines per series.
pub(crate) const REQUEST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0,
];
/// Time to the first byte of an event stream: an LLM may think for a while first.
pub(crate) const STREAM_TTFB_BUCKETS: &[f64] =
    &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0];
/// Whole event streams: LLM answers run for minutes.
pub(crate) const STREAM_DURATION_BUCKETS: &[f64] =
    &[0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0];
/// Silence between events of a stream: tokens come every few ms, a thinking model pauses
/// for seconds.
pub(crate) const STREAM_GAP_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug)]
struct Inner {
    bounds: &'static [f64],
    /// The bounds in whole nanoseconds, for the observation's search: an integer compare
    /// per bound, not a float conversion and compare (an SSE stream observes every event).
    bounds_nanos: Box<[u64]>,
    /// `shards` blocks of `stride` cells: per bucket counts (not cumulative; the last one
    /// is +Inf), then the sum in microseconds. `stride` is a whole number of cache lines.
    cells: Box<[AtomicU64]>,
    stride: usize,
    shards: usize,
}

/// Cells per cache line.
const LINE: usize = 64 / std::mem::size_of::<AtomicU64>();

/// Clones share the counts (a handle, like prometheus-client's metrics).
#[derive(Debug, Clone)]
pub struct DurationHistogram(Arc<Inner>);

/// The histogram's values at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistogramSnapshot {
    /// Per bucket, not cumulative; the last one is +Inf.
    pub counts: Vec<u64>,
    pub sum_secs: f64,
}

impl DurationHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        // Buckets, +Inf, sum; and one line of slack, since the allocation itself need not
        // start on a line.
        let stride = (bounds.len() + 2).div_ceil(LINE) * LINE + LINE;
        let shards = crate::workers::slots();
        let cells = (0..stride * shards).map(|_| AtomicU64::new(0)).collect();
        DurationHistogram(Arc::new(Inner {
            bounds,
            bounds_nanos: bounds.iter().map(|b| (b * 1e9).round() as u64).collect(),
            cells,
            stride,
            shards,
        }))
    }

    /// This thread's block of cells.
    fn shard(&self) -> &[AtomicU64] {
        let i = crate::workers::slot_in(self.0.shards);
        self.0
            .cells
            .get(i * self.0.stride..(i + 1) * self.0.stride)
            .unwrap_or_default()
    }

    pub fn request() -> Self {
        Self::new(REQUEST_BUCKETS)
    }

    pub fn stream_ttfb() -> Self {
        Self::new(STREAM_TTFB_BUCKETS)
    }

    pub fn stream_duration() -> Self {
        Self::new(STREAM_DURATION_BUCKETS)
    }

    pub fn stream_gap() -> Self {
        Self::new(STREAM_GAP_BUCKETS)
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.0.bounds
    }

    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bound at or above (`bounds.len()`, +Inf, when none is): a binary search,
        // as an event stream's gaps land in the middle of its bounds.
        let i = self.0.bounds_nanos.partition_point(|&b| b < nanos);
        let shard = self.shard();
        if let Some(c) = shard.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        // From the u64 of nanoseconds: `as_micros` divides a u128 (a call, on x86-64).
        let micros = nanos / 1_000;
        if let Some(sum) = shard.get(self.0.bounds.len() + 1) {
            sum.fetch_add(micros, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let n = self.0.bounds.len() + 1;
        let mut counts = vec![0u64; n];
        let mut sum_micros = 0u64;
        for shard in self.0.cells.chunks(self.0.stride.max(1)) {
            for (total, c) in counts.iter_mut().zip(shard) {
                *total += c.load(Ordering::Relaxed);
            }
            if let Some(s) = shard.get(n) {
                sum_micros = sum_micros.saturating_add(s.load(Ordering::Relaxed));
            }
        }
        HistogramSnapshot {
            counts,
            sum_secs: sum_micros as f64 / 1e6,
        }
    }
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `self - earlier`, bucket by bucket (saturating: a series that restarted reads as new).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        let counts = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
            .collect();
        HistogramSnapshot {
            counts,
            sum_secs: (self.sum_secs - earlier.sum_secs).max(0.0),
        }
    }

    pub fn add(&mut self, other: &HistogramSnapshot) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_secs += other.sum_secs;
    }

    /// Mean in seconds; None without observations (never NaN).
    pub fn mean(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_secs / n as f64)
    }

    /// The q-quantile in seconds, interpolated inside its bucket as Prometheus'
    /// `histogram_quantile` does; a quantile in the +Inf bucket reads as the highest finite
    /// bound. None without observations.
    pub fn quantile(&self, bounds: &[f64], q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            let upto = below + c;
            if c > 0 && upto as f64 >= rank {
                let Some(&upper) = bounds.get(i) else {
                    return bounds.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
                let within = (rank - below as f64) / c as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            below = upto;
        }
        bounds.last().copied()
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.snapshot();
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(snap.counts.iter().copied())
            .collect();
        // The count is the buckets' sum, so `_count` always equals the `+Inf` bucket even
        // while observations race the scrape.
        encoder.encode_histogram::<NoLabelSet>(snap.sum_secs, snap.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let h = DurationHistogram::new(&[0.1, 0.5, 1.0]);
        for _ in 0..90 {
            h.observe(Duration::from_millis(50));
        }
        for _ in 0..10 {
            h.observe(Duration::from_millis(700));
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        // Rank 95 falls in (0.5, 1.0], half-way through its 10 observations.
        let p95 = s.quantile(h.bounds(), 0.95).unwrap();
        assert!((p95 - 0.75).abs() < 1e-9, "{p95}");
        let mean = s.mean().unwrap();
        assert!((mean - 0.115).abs() < 1e-6, "{mean}");
    }

    /// Prometheus' `le`: a value equal to a bound counts in that bound's bucket, a
    /// nanosecond more in the next; past the last, +Inf.
    #[test]
    fn a_value_on_a_bound_is_in_that_bounds_bucket() {
        let h = DurationHistogram::new(STREAM_GAP_BUCKETS);
        h.observe(Duration::ZERO);
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_nanos(1_000_001));
        h.observe(Duration::from_micros(250_000));
        h.observe(Duration::from_secs(60));
        h.observe(Duration::from_nanos(60_000_000_001));
        h.observe(Duration::MAX);
        let c = h.snapshot().counts;
        assert_eq!(c.len(), STREAM_GAP_BUCKETS.len() + 1);
        let at = |b: f64| STREAM_GAP_BUCKETS.iter().position(|x| *x == b).unwrap();
        assert_eq!(c[0], 2, "0 and 1 ms: le 0.001");
        assert_eq!(c[1], 1, "1 ms + 1 ns: le 0.005");
        assert_eq!(c[at(0.25)], 1);
        assert_eq!(c[at(60.0)], 1);
        assert_eq!(c[STREAM_GAP_BUCKETS.len()], 2, "+Inf");
        assert_eq!(c.iter().sum::<u64>(), 7);
    }

    #[test]
    fn no_observations_is_no_data_not_nan() {
        let s = DurationHistogram::request().snapshot();
        assert_eq!(s.quantile(REQUEST_BUCKETS, 0.95), None);
        assert_eq!(s.mean(), None);
    }

    /// A proxy's own latency lives under a millisecond: the status page must not read
    /// 0.3 ms requests as 4.8 ms (interpolated inside a 0-5 ms first bucket).
    #[test]
    fn sub_millisecond_requests_read_as_sub_millisecond() {
        let h = DurationHistogram::request();
        for _ in 0..100 {
            h.observe(Duration::from_micros(300));
        }
        let p95 = h.snapshot().quantile(h.bounds(), 0.95).unwrap();
        assert!(p95 <= 0.0005, "{p95}");
        // Still a bound at the users' P95 < 500 ms target, and no more cells per shard.
        assert!(REQUEST_BUCKETS.contains(&0.5));
        assert!(REQUEST_BUCKETS.len() <= 18, "{}", REQUEST_BUCKETS.len());
    }

    #[test]
    fn the_overflow_bucket_reads_as_the_highest_bound() {
        let h = DurationHistogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_secs(30));
        assert_eq!(h.snapshot().quantile(h.bounds(), 0.95), Some(1.0));
    }

    #[test]
    fn observations_from_worker_threads_add_up() {
        let workers = crate::workers::Workers::start(2).unwrap();
        let h = DurationHistogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(10));
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..2 {
            let (h, tx) = (h.clone(), tx.clone());
            workers.spawn_on(i, async move {
                h.observe(Duration::from_millis(500));
                h.observe(Duration::from_secs(3));
                let _ = tx.send(());
            });
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        let s = h.snapshot();
        assert_eq!(s.counts, vec![1, 2, 2]);
        assert!((s.sum_secs - 7.01).abs() < 1e-6, "{}", s.sum_secs);
    }

    #[test]
    fn deltas_between_snapshots() {
        let h = DurationHistogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(10));
        let a = h.snapshot();
        h.observe(Duration::from_millis(500));
        let d = h.snapshot().since(&a);
        assert_eq!(d.counts, vec![0, 1, 0]);
        assert!((d.sum_secs - 0.5).abs() < 1e-6);
    }
}
