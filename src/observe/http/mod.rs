//! `rampart_http_*` and `rampart_listener_*`: what the traffic listeners see.
//!
//! Handles are made once per route when a `Snapshot` is built ([`RouteMetrics`]); a request
//! only picks a handle by index and increments it, so the request path never builds a
//! label set. Counters per (method × status class) are created the first time a
//! combination happens, so a route that only ever answers `GET 2xx` has one series, not 40.
//! Handles for the same labels share their values (the families key by labels), so a
//! reload that keeps a route keeps its counts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use http::Method;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;

use super::sharded::ShardedCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::histogram::{DurationHistogram, HistogramSnapshot};

mod stream_end;
mod tls;
use super::tokens::Usage;
pub(crate) use stream_end::StreamEnd;
pub(crate) use tls::TlsMetrics;

/// The methods counted by name; anything else is `other` (labels stay bounded).
pub(crate) const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];
pub(crate) const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub(crate) fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// 1xx..5xx -> 0..4 (anything out of range counts as 5xx: it is not a valid answer).
pub(crate) fn status_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub listener: String,
    /// Empty for requests no route took (404, shed or refused before routing).
    pub route: String,
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    route: String,
    upstream: String,
    method: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    listener: String,
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    listener: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamEndLabels {
    listener: String,
    route: String,
    reason: &'static str,
}

/// Events in one stream: one token each, from a short answer to a long one.
fn events_histogram() -> Histogram {
    Histogram::new([1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    listener: String,
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    listener: String,
    route: String,
    upstream: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelBytesLabels {
    listener: String,
    route: String,
    direction: &'static str,
}

type HistogramFamily = Family<RouteLabels, DurationHistogram, fn() -> DurationHistogram>;

/// The families; cloning shares them.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, ShardedCounter>,
    duration: HistogramFamily,
    stream_ttfb: HistogramFamily,
    stream_duration: HistogramFamily,
    streams_active: Family<StreamLabels, Gauge>,
    stream_first_event: HistogramFamily,
    stream_gap: HistogramFamily,
    stream_events: Family<StreamLabels, Histogram, fn() -> Histogram>,
    streams_ended: Family<StreamEndLabels, Counter>,
    stream_heartbeats: Family<StreamLabels, Counter>,
    bytes_in: Family<RouteLabels, ShardedCounter>,
    bytes_out: Family<RouteLabels, ShardedCounter>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    upstream_connections: Family<UpstreamLabels, Counter>,
    /// Per-route counters and stream handles by labels, shared by every snapshot's handles
    /// for that route (a reload must not lose the combinations already seen).
    cells: Arc<Mutex<HashMap<RouteLabels, Arc<RouteCells>>>>,
    live: Arc<Live>,
    draining: Gauge,
    worker_connections: Family<WorkerLabels, Counter>,
    tunnels_active: Family<StreamLabels, Gauge>,
    tunnels: Family<TunnelLabels, Counter>,
    tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    llm_tokens: Family<TokenLabels, Counter>,
    /// The TLS listeners' handshakes and certificate reloads.
    pub(crate) tls: TlsMetrics,
}

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetrics")
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(DurationHistogram::request),
            stream_ttfb: Family::new_with_constructor(DurationHistogram::stream_ttfb),
            stream_duration: Family::new_with_constructor(DurationHistogram::stream_duration),
            streams_active: Family::default(),
            stream_first_event: Family::new_with_constructor(DurationHistogram::stream_ttfb),
            stream_gap: Family::new_with_constructor(DurationHistogram::stream_gap),
            stream_events: Family::new_with_constructor(events_histogram),
            streams_ended: Family::default(),
            stream_heartbeats: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            upstream_errors: Family::default(),
            upstream_connections: Family::default(),
            cells: Arc::default(),
            live: Arc::new(Live::default()),
            draining: Gauge::default(),
            worker_connections: Family::default(),
            tunnels_active: Family::default(),
            tunnels: Family::default(),
            tunnel_bytes: Family::default(),
            llm_tokens: Family::default(),
            tls: TlsMetrics::default(),
        };
        // Counters without `_total`: the encoder adds it (and panics in debug builds if the
        // name already has it).
        registry.register(
            "http_requests",
            "Requests answered, by listener, route, upstream, method and status class",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Request latency as the client sees it: until the response body ends, or until the first byte for event streams",
            m.duration.clone(),
        );
        registry.register(
            "http_stream_first_byte_seconds",
            "Event streams (text/event-stream): time until the response started",
            m.stream_ttfb.clone(),
        );
        registry.register(
            "http_stream_duration_seconds",
            "Event streams (text/event-stream): time until the stream ended",
            m.stream_duration.clone(),
        );
        registry.register(
            "http_streams_active",
            "Event streams open now",
            m.streams_active.clone(),
        );
        registry.register(
            "http_stream_first_event_seconds",
            "Event streams: time from the response headers to the first complete event",
            m.stream_first_event.clone(),
        );
        registry.register(
            "http_stream_event_gap_seconds",
            "Event streams: silence before each event (events read together count 0)",
            m.stream_gap.clone(),
        );
        registry.register(
            "http_stream_events",
            "Event streams: complete events per stream",
            m.stream_events.clone(),
        );
        registry.register(
            "http_streams_ended",
            "Event streams by how they ended: complete, client_gone, first_event_timeout, stalled, max_duration, drain, upstream_error, in_band_error",
            m.streams_ended.clone(),
        );
        registry.register(
            "http_stream_heartbeats",
            "Keep-alive comments rampart wrote into quiet event streams",
            m.stream_heartbeats.clone(),
        );
        registry.register(
            "http_request_bytes",
            "Request body bytes received from clients",
            m.bytes_in.clone(),
        );
        registry.register(
            "http_response_bytes",
            "Response body bytes sent to clients",
            m.bytes_out.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed upstream attempts by kind: connect_error, connect_timeout, first_byte_timeout, reset, idle_timeout, total_timeout",
            m.upstream_errors.clone(),
        );
        registry.register(
            "upstream_connections_opened",
            "Upstream connections opened (TCP connects that succeeded); against requests, how well the pools keep connections",
            m.upstream_connections.clone(),
        );
        registry.register(
            "draining",
            "1 once a drain has started (readiness is off)",
            m.draining.clone(),
        );
        registry.register(
            "worker_connections",
            "Connections accepted, by listener and worker thread (how evenly the kernel spreads them)",
            m.worker_connections.clone(),
        );
        registry.register(
            "tunnels_active",
            "Upgraded connections (WebSocket tunnels) open now, by listener and route",
            m.tunnels_active.clone(),
        );
        registry.register(
            "tunnels",
            "Tunnels closed, by how they ended: client_closed, upstream_closed, idle_timeout, drained, client_aborted, upstream_reset",
            m.tunnels.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes carried through tunnels, by direction: from_client, from_upstream",
            m.tunnel_bytes.clone(),
        );
        registry.register(
            "llm_tokens",
            "Tokens of LLM answers as the upstream counted them (OpenAI usage, FastGPT node responses), by kind: prompt, completion",
            m.llm_tokens.clone(),
        );
        m.tls.register(registry);
        registry.register_collector(Box::new(m.live.clone()));
        m
    }

    /// Handles for one route (or, with empty `route` and `upstream`, for the requests of a
    /// listener that no route took).
    pub fn route(
        &self,
        listener: &str,
        route: &str,
        upstream: &str,
        upstream_errors: Option<UpstreamErrors>,
    ) -> Arc<RouteMetrics> {
        let labels = RouteLabels {
            listener: listener.to_owned(),
            route: route.to_owned(),
            upstream: upstream.to_owned(),
        };
        let cells = crate::sync::lock(&self.cells)
            .entry(labels.clone())
            .or_default()
            .clone();
        Arc::new(RouteMetrics {
            duration: self.duration.get_or_create(&labels).clone(),
            bytes_in: self.bytes_in.get_or_create(&labels).clone(),
            bytes_out: self.bytes_out.get_or_create(&labels).clone(),
            labels: Arc::new(labels),
            families: self.clone(),
            cells,
            upstream_errors,
        })
    }

    /// One upstream's error counters, made once per snapshot.
    pub fn upstream_errors(&self, upstream: &str) -> UpstreamErrors {
        UpstreamErrors {
            kinds: UpstreamErrorKind::ALL.map(|kind| {
                self.upstream_errors
                    .get_or_create(&UpstreamErrorLabels {
                        upstream: upstream.to_owned(),
                        kind: kind.as_str(),
                    })
                    .clone()
            }),
            opened: self
                .upstream_connections
                .get_or_create(&UpstreamLabels {
                    upstream: upstream.to_owned(),
                })
                .clone(),
        }
    }

    /// Counts a listener's open connections and requests in flight, read at scrape time
    /// from the counters the server keeps anyway (nothing more on the request path).
    pub fn track_listener(
        &self,
        listener: &str,
        connections: &Arc<AtomicUsize>,
        in_flight: &Arc<AtomicUsize>,
    ) {
        let mut l = crate::sync::lock(&self.live.listeners);
        // Servers that are gone leave dead entries behind: drop them here.
        l.retain(|e| e.connections.strong_count() > 0);
        l.push(LiveListener {
            name: listener.to_owned(),
            connections: Arc::downgrade(connections),
            in_flight: Arc::downgrade(in_flight),
        });
    }

    /// The accepted-connections counter of one worker's accept loop on `listener`.
    pub fn worker_connections(&self, listener: &str, worker: usize) -> Counter {
        self.worker_connections
            .get_or_create(&WorkerLabels {
                listener: listener.to_owned(),
                worker: worker.to_string(),
            })
            .clone()
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.set(i64::from(on));
    }
}

/// A route's handles.
pub struct RouteMetrics {
    /// Shared with every sample of the time series (no copy per sample).
    pub labels: Arc<RouteLabels>,
    families: HttpMetrics,
    cells: Arc<RouteCells>,
    pub duration: DurationHistogram,
    bytes_in: ShardedCounter,
    bytes_out: ShardedCounter,
    upstream_errors: Option<UpstreamErrors>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct RouteCells {
    /// [method][status class], created on first use.
    requests: [[OnceLock<ShardedCounter>; 5]; 8],
    /// Only routes that ever stream get these series.
    streams: OnceLock<StreamHandles>,
    /// Only routes that ever tunnel get these series.
    tunnels: OnceLock<TunnelHandles>,
    /// Only routes whose answers ever carry token counts get these series.
    tokens: OnceLock<TokenHandles>,
}

struct TokenHandles {
    prompt: Counter,
    completion: Counter,
}

struct TunnelHandles {
    active: Gauge,
    from_client: Counter,
    from_upstream: Counter,
}

struct StreamHandles {
    ttfb: DurationHistogram,
    duration: DurationHistogram,
    active: Gauge,
    first_event: DurationHistogram,
    gap: DurationHistogram,
    events: Histogram,
    /// By `StreamEnd::ALL`'s order.
    ended: [Counter; 8],
    heartbeats: Counter,
}

impl RouteMetrics {
    fn counter(&self, method: usize, status: usize) -> Option<&ShardedCounter> {
        let cell = self.cells.requests.get(method)?.get(status)?;
        Some(cell.get_or_init(|| {
            self.families
                .requests
                .get_or_create(&RequestLabels {
                    listener: self.labels.listener.clone(),
                    route: self.labels.route.clone(),
                    upstream: self.labels.upstream.clone(),
                    method: METHODS[method],
                    status: STATUS_CLASSES[status],
                })
                .clone()
        }))
    }

    fn streams(&self) -> &StreamHandles {
        self.cells.streams.get_or_init(|| {
            let f = &self.families;
            let stream_labels = StreamLabels {
                listener: self.labels.listener.clone(),
                route: self.labels.route.clone(),
            };
            StreamHandles {
                ttfb: f.stream_ttfb.get_or_create(&self.labels).clone(),
                duration: f.stream_duration.get_or_create(&self.labels).clone(),
                active: f.streams_active.get_or_create(&stream_labels).clone(),
                first_event: f.stream_first_event.get_or_create(&self.labels).clone(),
                gap: f.stream_gap.get_or_create(&self.labels).clone(),
                events: f.stream_events.get_or_create(&stream_labels).clone(),
                ended: StreamEnd::ALL.map(|reason| {
                    f.streams_ended
                        .get_or_create(&StreamEndLabels {
                            listener: self.labels.listener.clone(),
                            route: self.labels.route.clone(),
                            reason: reason.as_str(),
                        })
                        .clone()
                }),
                heartbeats: f.stream_heartbeats.get_or_create(&stream_labels).clone(),
            }
        })
    }

    /// A tunnel opened: counted as active until the handle is dropped, its bytes counted as
    /// they pass (see [`TunnelMetrics`]).
    pub fn tunnel_opened(&self) -> TunnelMetrics {
        let h = self.cells.tunnels.get_or_init(|| {
            let f = &self.families;
            let bytes = |direction| {
                f.tunnel_bytes
                    .get_or_create(&TunnelBytesLabels {
                        listener: self.labels.listener.clone(),
                        route: self.labels.route.clone(),
                        direction,
                    })
                    .clone()
            };
            TunnelHandles {
                active: f
                    .tunnels_active
                    .get_or_create(&StreamLabels {
                        listener: self.labels.listener.clone(),
                        route: self.labels.route.clone(),
                    })
                    .clone(),
                from_client: bytes("from_client"),
                from_upstream: bytes("from_upstream"),
            }
        });
        h.active.inc();
        TunnelMetrics {
            active: h.active.clone(),
            from_client: h.from_client.clone(),
            from_upstream: h.from_upstream.clone(),
            tunnels: self.families.tunnels.clone(),
            labels: self.labels.clone(),
        }
    }

    /// The token counts of one LLM answer (`stream::usage`).
    pub(crate) fn tokens(&self, usage: &Usage) {
        let h = self.cells.tokens.get_or_init(|| {
            let counter = |kind| {
                self.families
                    .llm_tokens
                    .get_or_create(&TokenLabels {
                        listener: self.labels.listener.clone(),
                        route: self.labels.route.clone(),
                        upstream: self.labels.upstream.clone(),
                        kind,
                    })
                    .clone()
            };
            TokenHandles {
                prompt: counter("prompt"),
                completion: counter("completion"),
            }
        });
        h.prompt.inc_by(usage.prompt);
        h.completion.inc_by(usage.completion);
    }

    /// An event stream started after `ttfb`: counted as active until [`Self::stream_ended`].
    pub fn stream_started(&self, ttfb: Duration) {
        let s = self.streams();
        s.ttfb.observe(ttfb);
        s.active.inc();
        // The latency a person waits for, for the request latency histogram.
        self.duration.observe(ttfb);
    }

    pub fn stream_ended(&self, duration: Duration) {
        let s = self.streams();
        s.duration.observe(duration);
        s.active.dec();
    }

    /// The first complete event of a stream, `after` its response headers.
    pub(crate) fn stream_first_event(&self, after: Duration) {
        self.streams().first_event.observe(after);
    }

    /// `n` events arrived together after `gap` of silence.
    pub(crate) fn stream_events_arrived(&self, gap: Duration, n: usize) {
        let s = self.streams();
        s.gap.observe(gap);
        for _ in 1..n {
            s.gap.observe(Duration::ZERO);
        }
    }

    pub(crate) fn stream_heartbeat(&self) {
        self.streams().heartbeats.inc();
    }

    /// A stream is over: how, and how many events it carried.
    pub(crate) fn stream_closed(&self, how: StreamEnd, events: u64) {
        let s = self.streams();
        s.events.observe(events as f64);
        if let Some(c) = StreamEnd::ALL
            .iter()
            .position(|r| *r == how)
            .and_then(|i| s.ended.get(i))
        {
            c.inc();
        }
    }

    /// A finished exchange: one count, and (unless it was a stream) its duration.
    pub fn finished(
        &self,
        method: usize,
        status: u16,
        duration: Option<Duration>,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        if let Some(c) = self.counter(method, status_index(status)) {
            c.inc();
        }
        if let Some(d) = duration {
            self.duration.observe(d);
        }
        if bytes_in > 0 {
            self.bytes_in.inc_by(bytes_in);
        }
        if bytes_out > 0 {
            self.bytes_out.inc_by(bytes_out);
        }
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        if let Some(e) = &self.upstream_errors {
            e.inc(kind);
        }
    }

    /// Cumulative values for the time series: (requests, 5xx answers, latency histogram).
    pub fn totals(&self) -> (u64, u64, HistogramSnapshot) {
        let mut requests = 0;
        let mut errors = 0;
        for by_status in &self.cells.requests {
            for (i, c) in by_status.iter().enumerate() {
                if let Some(c) = c.get() {
                    let n = c.get();
                    requests += n;
                    if i == 4 {
                        errors += n;
                    }
                }
            }
        }
        (requests, errors, self.duration.snapshot())
    }
}

/// One open tunnel's handles: active until dropped.
#[derive(Debug)]
pub struct TunnelMetrics {
    active: Gauge,
    /// Bytes read from the client (and written to the upstream).
    pub from_client: Counter,
    /// Bytes read from the upstream (and written to the client).
    pub from_upstream: Counter,
    tunnels: Family<TunnelLabels, Counter>,
    labels: Arc<RouteLabels>,
}

impl TunnelMetrics {
    /// The tunnel closed; `outcome` is one of the words listed in the family's help.
    pub fn ended(self, outcome: &'static str) {
        self.tunnels
            .get_or_create(&TunnelLabels {
                listener: self.labels.listener.clone(),
                route: self.labels.route.clone(),
                outcome,
            })
            .inc();
    }
}

impl Drop for TunnelMetrics {
    fn drop(&mut self) {
        self.active.dec();
    }
}

// === values read at scrape time ===

#[derive(Debug, Default)]
struct Live {
    listeners: Mutex<Vec<LiveListener>>,
}

#[derive(Debug)]
struct LiveListener {
    name: String,
    connections: Weak<AtomicUsize>,
    in_flight: Weak<AtomicUsize>,
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A listener replaced by a reload drains beside its successor: one series per name.
        let mut by_name: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        {
            let l = crate::sync::lock(&self.listeners);
            for e in l.iter() {
                let (Some(c), Some(f)) = (e.connections.upgrade(), e.in_flight.upgrade()) else {
                    continue;
                };
                let v = by_name.entry(e.name.clone()).or_default();
                v.0 += c.load(Ordering::Relaxed);
                v.1 += f.load(Ordering::Relaxed);
            }
        }
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let mut m = encoder.encode_descriptor(
            "listener_connections_open",
            "Client connections open, by listener",
            None,
            MetricType::Gauge,
        )?;
        for (name, (c, _)) in &by_name {
            let labels = [("listener", name.as_str())];
            ConstGauge::new(as_i64(*c)).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "http_requests_in_flight",
            "Requests being answered now, by listener (streams included)",
            None,
            MetricType::Gauge,
        )?;
        for (name, (_, f)) in &by_name {
            let labels = [("listener", name.as_str())];
            ConstGauge::new(as_i64(*f)).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

// === upstream errors ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    upstream: String,
    kind: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// Refused, reset while connecting, TLS handshake failed.
    ConnectError,
    ConnectTimeout,
    FirstByteTimeout,
    /// The connection failed after the request went out (or mid-response).
    Reset,
    /// The response body went silent longer than the route's idle timeout.
    IdleTimeout,
    TotalTimeout,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 6] = [
        UpstreamErrorKind::ConnectError,
        UpstreamErrorKind::ConnectTimeout,
        UpstreamErrorKind::FirstByteTimeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::IdleTimeout,
        UpstreamErrorKind::TotalTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::ConnectError => "connect_error",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::FirstByteTimeout => "first_byte_timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::IdleTimeout => "idle_timeout",
            UpstreamErrorKind::TotalTimeout => "total_timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One upstream's error counters, one per kind, and its connections opened. `Default`:
/// counters nobody exports (an `Upstream` built only to be probed by the health checks).
#[derive(Clone, Default, Debug)]
pub struct UpstreamErrors {
    kinds: [Counter; 6],
    opened: Counter,
}

impl UpstreamErrors {
    pub fn inc(&self, kind: UpstreamErrorKind) {
        if let Some(c) = self.kinds.get(kind.index()) {
            c.inc();
        }
    }

    /// Counts the upstream's new connections (its endpoints' pools share it).
    pub fn opened(&self) -> Counter {
        self.opened.clone()
    }
}

#[cfg(test)]
mod tests;
