//! A small in-memory time series of the request counters: one sample of every route's
//! cumulative totals every few seconds, kept for a bounded time. The alert rules read
//! windowed rates from it (error rate, P95, average over the last 5 minutes) and the status
//! page draws its charts from it, without a Prometheus server.
//!
//! Pure data: the sampler task in `app` pushes samples; nothing here reads a clock.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::histogram::{HistogramSnapshot, REQUEST_BUCKETS};
use super::http::RouteLabels;

/// How often the sampler records (the charts' resolution).
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// What the status page shows.
pub(crate) const CHART_SPAN: Duration = Duration::from_secs(15 * 60);

/// Cumulative values of one route at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    /// 5xx answers (rampart's own 502/503/504 included).
    pub errors: u64,
    pub latency: HistogramSnapshot,
}

impl Totals {
    fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self.latency.since(&earlier.latency),
        }
    }

    fn add_since(&mut self, now: &Totals, before: Option<&Totals>) {
        match before {
            Some(b) => self.add(&now.since(b)),
            None => self.add(now),
        }
    }

    fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency.add(&other.latency);
    }

    /// Share of 5xx answers; None without requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    pub fn p95(&self) -> Option<f64> {
        self.latency.quantile(REQUEST_BUCKETS, 0.95)
    }

    pub fn mean(&self) -> Option<f64> {
        self.latency.mean()
    }
}

/// Cumulative counts other subsystems feed (see `alert::signals`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FedTotals {
    pub db_queries: u64,
    pub db_errors: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

impl FedTotals {
    fn since(&self, e: &FedTotals) -> FedTotals {
        FedTotals {
            db_queries: self.db_queries.saturating_sub(e.db_queries),
            db_errors: self.db_errors.saturating_sub(e.db_errors),
            cache_hits: self.cache_hits.saturating_sub(e.cache_hits),
            cache_misses: self.cache_misses.saturating_sub(e.cache_misses),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub wall: SystemTime,
    pub routes: Vec<(Arc<RouteLabels>, Totals)>,
    pub fed: FedTotals,
}

impl Sample {
    /// The totals of route `labels`, found at index `i` in `self`. Samples of one snapshot
    /// list the routes in the same order with the same `Arc`s, so this is one pointer
    /// comparison; after a reload it falls back to a search.
    fn find(&self, i: usize, labels: &Arc<RouteLabels>) -> Option<&Totals> {
        match self.routes.get(i) {
            Some((l, t)) if Arc::ptr_eq(l, labels) => Some(t),
            _ => self
                .routes
                .iter()
                .find(|(l, _)| **l == **labels)
                .map(|(_, t)| t),
        }
    }
}

/// Which routes a question is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub route: Option<String>,
    pub upstream: Option<String>,
}

impl Filter {
    pub fn matches(&self, l: &RouteLabels) -> bool {
        self.route.as_ref().is_none_or(|r| *r == l.route)
            && self.upstream.as_ref().is_none_or(|u| *u == l.upstream)
    }
}

/// One point of a chart: what happened between two samples.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartPoint {
    /// Unix milliseconds at the end of the interval.
    pub t_ms: u64,
    pub rate_per_s: f64,
    pub error_rate: Option<f64>,
    pub p95_s: Option<f64>,
}

#[derive(Debug)]
pub struct Series {
    keep: Duration,
    samples: VecDeque<Sample>,
}

impl Series {
    /// Keeps samples for `keep` (at least the chart span).
    pub fn new(keep: Duration) -> Self {
        Series {
            keep: keep.max(CHART_SPAN),
            samples: VecDeque::new(),
        }
    }

    pub fn keep(&self) -> Duration {
        self.keep
    }

    /// Makes sure windows up to `window` can be answered (a reload may add longer ones).
    pub fn keep_at_least(&mut self, window: Duration) {
        self.keep = self.keep.max(window + SAMPLE_EVERY);
    }

    pub fn push(&mut self, s: Sample) {
        let cutoff = s.at.checked_sub(self.keep);
        self.samples.push_back(s);
        if let Some(cutoff) = cutoff {
            // Keep one sample older than the cutoff: it is the start of the longest window.
            while self.samples.len() > 2 && self.samples.get(1).is_some_and(|x| x.at <= cutoff) {
                self.samples.pop_front();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The sample a window ending at `now` starts from: the newest one at or before
    /// `now - window`, else the oldest one (a window longer than the history so far).
    fn start_of(&self, now: Instant, window: Duration) -> Option<&Sample> {
        let from = now.checked_sub(window);
        let mut best = self.samples.front()?;
        for s in &self.samples {
            match from {
                Some(f) if s.at <= f => best = s,
                _ => break,
            }
        }
        Some(best)
    }

    /// What happened on the matching routes during `window` before `current` (a sample
    /// taken now, not necessarily pushed). Requests of routes that appeared in between
    /// count from zero.
    pub fn over(&self, current: &Sample, window: Duration, filter: &Filter) -> Totals {
        let start = self.start_of(current.at, window);
        let mut out = Totals::default();
        for (i, (labels, now)) in current.routes.iter().enumerate() {
            if filter.matches(labels) {
                out.add_since(now, start.and_then(|s| s.find(i, labels)));
            }
        }
        out
    }

    /// How much time `over` really covers: less than `window` while the history is short.
    pub fn span(&self, current: &Sample, window: Duration) -> Duration {
        self.start_of(current.at, window)
            .map_or(Duration::ZERO, |s| {
                current.at.saturating_duration_since(s.at)
            })
    }

    pub fn fed_over(&self, current: &Sample, window: Duration) -> FedTotals {
        match self.start_of(current.at, window) {
            Some(s) => current.fed.since(&s.fed),
            None => current.fed,
        }
    }

    /// Per interval between consecutive samples over the last `span`, for the routes that
    /// match: request rate, error rate and P95.
    pub fn chart(&self, span: Duration, filter: &Filter) -> Vec<ChartPoint> {
        let Some(last) = self.samples.back() else {
            return Vec::new();
        };
        let from = last.at.checked_sub(span);
        let mut out = Vec::new();
        for (a, b) in self.samples.iter().zip(self.samples.iter().skip(1)) {
            if from.is_some_and(|f| a.at < f) {
                continue;
            }
            let secs = (b.at - a.at).as_secs_f64();
            if secs <= 0.0 {
                continue;
            }
            let mut t = Totals::default();
            for (i, (labels, now)) in b.routes.iter().enumerate() {
                if filter.matches(labels) {
                    t.add_since(now, a.find(i, labels));
                }
            }
            out.push(ChartPoint {
                t_ms: unix_ms(b.wall),
                rate_per_s: t.requests as f64 / secs,
                error_rate: t.error_rate(),
                p95_s: t.p95(),
            });
        }
        out
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(route: &str, upstream: &str) -> Arc<RouteLabels> {
        Arc::new(RouteLabels {
            listener: "main".into(),
            route: route.into(),
            upstream: upstream.into(),
        })
    }

    fn sample(at: Instant, routes: &[(&Arc<RouteLabels>, u64, u64)]) -> Sample {
        Sample {
            at,
            wall: SystemTime::UNIX_EPOCH,
            routes: routes
                .iter()
                .map(|(l, r, e)| {
                    (
                        (*l).clone(),
                        Totals {
                            requests: *r,
                            errors: *e,
                            latency: HistogramSnapshot::default(),
                        },
                    )
                })
                .collect(),
            fed: FedTotals::default(),
        }
    }

    #[test]
    fn windows_subtract_the_sample_at_their_start() {
        let t0 = Instant::now();
        let (api, chat) = (labels("api", "backend"), labels("chat", "fastgpt"));
        let mut s = Series::new(Duration::from_secs(3600));
        s.push(sample(t0, &[(&api, 0, 0), (&chat, 0, 0)]));
        s.push(sample(
            t0 + Duration::from_secs(60),
            &[(&api, 100, 1), (&chat, 10, 0)],
        ));
        s.push(sample(
            t0 + Duration::from_secs(120),
            &[(&api, 200, 11), (&chat, 20, 0)],
        ));
        let now = sample(
            t0 + Duration::from_secs(125),
            &[(&api, 200, 11), (&chat, 20, 10)],
        );
        // 65 s back lands between samples: the window starts at the one at 60 s.
        let all = s.over(&now, Duration::from_secs(65), &Filter::default());
        assert_eq!((all.requests, all.errors), (110, 20));
        let only = Filter {
            upstream: Some("backend".into()),
            route: None,
        };
        let api_only = s.over(&now, Duration::from_secs(65), &only);
        assert_eq!(api_only.error_rate(), Some(0.1));
        // Longer than the history: from the first sample.
        assert_eq!(s.over(&now, Duration::from_secs(3600), &only).requests, 200);
    }

    #[test]
    fn no_requests_is_no_data() {
        let t0 = Instant::now();
        let api = labels("api", "backend");
        let mut s = Series::new(Duration::from_secs(60));
        s.push(sample(t0, &[(&api, 5, 5)]));
        let now = sample(t0 + Duration::from_secs(10), &[(&api, 5, 5)]);
        let t = s.over(&now, Duration::from_secs(60), &Filter::default());
        assert_eq!((t.error_rate(), t.p95(), t.mean()), (None, None, None));
    }

    #[test]
    fn old_samples_are_dropped_but_one_before_the_window_is_kept() {
        let t0 = Instant::now();
        let mut s = Series::new(CHART_SPAN);
        for i in 0..200u64 {
            s.push(sample(t0 + Duration::from_secs(i * 10), &[]));
        }
        let newest = t0 + Duration::from_secs(1990);
        assert!(
            s.samples
                .front()
                .is_some_and(|f| newest - f.at >= CHART_SPAN)
        );
        assert!(
            s.len() <= (CHART_SPAN.as_secs() / 10 + 2) as usize,
            "{}",
            s.len()
        );
    }

    #[test]
    fn charts_rate_per_interval() {
        let t0 = Instant::now();
        let api = labels("api", "backend");
        let mut s = Series::new(CHART_SPAN);
        s.push(sample(t0, &[(&api, 0, 0)]));
        s.push(sample(t0 + Duration::from_secs(10), &[(&api, 50, 5)]));
        let c = s.chart(CHART_SPAN, &Filter::default());
        assert_eq!(c.len(), 1);
        assert!((c[0].rate_per_s - 5.0).abs() < 1e-9);
        assert_eq!(c[0].error_rate, Some(0.1));
    }
}
