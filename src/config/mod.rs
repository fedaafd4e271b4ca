//! `proxy.yaml`: the typed configuration every other module reads.
//!
//! The file is parsed in exactly one place (`raw.rs`, into a tree whose every node knows its
//! line and column); `env.rs` interpolates `${VAR}` inside scalar values; `validate/` turns
//! the tree into the types below, collecting EVERY problem with its `file:line:column` and
//! key path before refusing the file. Nothing here touches the network.

mod env;
mod raw;
mod secret;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use http::Method;

pub use secret::{REDACTED, Secret, redis_url_shown, sink_url_shown};
pub(crate) use validate::is_loopback;
pub use validate::postgres_url_for_driver;
pub use validate::{parse_str, parse_str_checked};

/// The whole validated configuration: an immutable snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// File name used in messages (`proxy.yaml`), as given on the command line.
    pub source: String,
    pub admin: AdminConfig,
    pub logging: LoggingConfig,
    /// Peers whose `X-Forwarded-For` is believed. Empty: nobody's.
    pub trusted_proxies: Vec<Cidr>,
    pub listeners: Vec<ListenerConfig>,
    /// By name, sorted (stable summaries and error messages).
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// The one Redis client of the program (rate limits now, health checks later).
    pub redis: Option<RedisConfig>,
    /// How many rampart replicas share the limits; the memory fallback of a Redis policy
    /// allows `points / replicas` so N replicas in fallback do not grant N times the limit.
    /// Default 1.
    pub replicas: u32,
    /// Rate-limit policies by name; routes refer to them.
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    pub drain: DrainConfig,
    /// What rampart depends on and checks in the background (`dependencies:`), see
    /// `health/`. Upstream checks live on each upstream (`health_check:`).
    pub dependencies: DependenciesConfig,
    /// Alert rules and where their notifications go (`alerts:`); the defaults when absent.
    pub alerts: AlertsConfig,
    /// What, besides critical checks and the drain, takes `/readyz` down (`readiness:`).
    pub readiness: ReadinessConfig,
}

/// `readiness:`. An open breaker says one route's upstream fails, not that this replica
/// does: taking every replica out of the Service for it turns a partial outage into a
/// total one, so it is opt-in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadinessConfig {
    /// Default `ignore`.
    pub breaker_open: BreakerReadiness,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BreakerReadiness {
    #[default]
    Ignore,
    /// Not ready while a breaker is OPEN (half-open is ready: its probes need traffic).
    NotReady,
}

/// `alerts:`: rules evaluated in-process, for deployments without a Prometheus server.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertsConfig {
    /// How often the rules are evaluated. Default 60s.
    pub interval: Duration,
    /// Default: [`AlertsConfig::default_rules`].
    pub rules: Vec<AlertRule>,
    /// Notifications besides the log (which always gets them).
    pub sinks: Vec<SinkConfig>,
}

/// One rule: "`signal` `comparison` `threshold` over `window`, for `for_`".
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    /// Unique; the alert's name in notifications.
    pub name: String,
    pub signal: Signal,
    pub comparison: Comparison,
    /// In the signal's unit: a share 0..=1 for rates and usages, seconds for latencies, 0
    /// for the yes/no signals (1 = yes).
    pub threshold: f64,
    /// The span a rate or latency is computed over. Default 5m.
    pub window: Duration,
    /// How long the condition must hold before the alert fires. Default 0s.
    pub for_: Duration,
    pub severity: Severity,
    pub route: Option<String>,
    pub upstream: Option<String>,
    /// Fewer requests (or queries, or cache lookups) than this in the window is "no data".
    /// Default 10.
    pub min_samples: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    ErrorRate,
    LatencyP95,
    LatencyAvg,
    DbErrorRate,
    CacheHitRate,
    PoolUsage,
    MemoryUsage,
    BreakerOpen,
    RatelimitFallbackActive,
}

impl Signal {
    pub const ALL: [Signal; 9] = [
        Signal::ErrorRate,
        Signal::LatencyP95,
        Signal::LatencyAvg,
        Signal::DbErrorRate,
        Signal::CacheHitRate,
        Signal::PoolUsage,
        Signal::MemoryUsage,
        Signal::BreakerOpen,
        Signal::RatelimitFallbackActive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::ErrorRate => "error_rate",
            Signal::LatencyP95 => "latency_p95",
            Signal::LatencyAvg => "latency_avg",
            Signal::DbErrorRate => "db_error_rate",
            Signal::CacheHitRate => "cache_hit_rate",
            Signal::PoolUsage => "pool_usage",
            Signal::MemoryUsage => "memory_usage",
            Signal::BreakerOpen => "breaker_open",
            Signal::RatelimitFallbackActive => "ratelimit_fallback_active",
        }
    }

    pub fn unit(self) -> SignalUnit {
        match self {
            Signal::LatencyP95 | Signal::LatencyAvg => SignalUnit::Seconds,
            Signal::BreakerOpen | Signal::RatelimitFallbackActive => SignalUnit::YesNo,
            _ => SignalUnit::Share,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalUnit {
    /// 0..=1, written as a percentage.
    Share,
    Seconds,
    /// 1 or 0.
    YesNo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Above,
    AtLeast,
    Below,
    AtMost,
}

impl Comparison {
    pub fn as_str(self) -> &'static str {
        match self {
            Comparison::Above => ">",
            Comparison::AtLeast => ">=",
            Comparison::Below => "<",
            Comparison::AtMost => "<=",
        }
    }

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Above => value > threshold,
            Comparison::AtLeast => value >= threshold,
            Comparison::Below => value < threshold,
            Comparison::AtMost => value <= threshold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub kind: SinkKind,
    /// A secret (Slack's URL is the credential): shown by [`sink_url_shown`] only.
    pub url: Secret<http::Uri>,
    /// One delivery attempt. Default 5s.
    pub timeout: Duration,
    /// Attempts in all, with exponential backoff between them. Default 5.
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// POST of the alert as JSON.
    Webhook,
    /// POST `{"text": ...}` (Slack incoming webhooks and compatibles: Mattermost, Rocket.Chat).
    Slack,
    /// Alertmanager API v2: POST `<url>/api/v2/alerts`.
    Alertmanager,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Slack => "slack",
            SinkKind::Alertmanager => "alertmanager",
        }
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            interval: Duration::from_secs(60),
            rules: AlertsConfig::default_rules(),
            sinks: Vec::new(),
        }
    }
}

impl AlertsConfig {
    /// The users' four rules, plus P95 and an open breaker.
    pub fn default_rules() -> Vec<AlertRule> {
        let rule = |name: &str, signal, comparison, threshold, for_secs, severity| AlertRule {
            name: name.to_owned(),
            signal,
            comparison,
            threshold,
            window: Duration::from_secs(300),
            for_: Duration::from_secs(for_secs),
            severity,
            route: None,
            upstream: None,
            min_samples: 10,
        };
        vec![
            rule(
                "HighErrorRate",
                Signal::ErrorRate,
                Comparison::Above,
                0.05,
                0,
                Severity::Critical,
            ),
            rule(
                "HighAverageLatency",
                Signal::LatencyAvg,
                Comparison::Above,
                1.0,
                0,
                Severity::Warning,
            ),
            rule(
                "HighDatabaseErrorRate",
                Signal::DbErrorRate,
                Comparison::Above,
                0.01,
                0,
                Severity::Critical,
            ),
            rule(
                "LowCacheHitRate",
                Signal::CacheHitRate,
                Comparison::Below,
                0.5,
                0,
                Severity::Warning,
            ),
            rule(
                "HighP95Latency",
                Signal::LatencyP95,
                Comparison::Above,
                0.5,
                0,
                Severity::Warning,
            ),
            // `for: 0s`: fires at the first evaluation that sees a breaker not closed. An
            // open breaker refuses traffic now, and its failure threshold has already
            // debounced it; a `for` as long as `open_for` (60 s for the users) would only
            // fire when the first half-open probe fails, and never for an upstream that is
            // back by then, which is the common case.
            rule(
                "CircuitBreakerOpen",
                Signal::BreakerOpen,
                Comparison::Above,
                0.0,
                0,
                Severity::Critical,
            ),
        ]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    pub target: RedisTarget,
    /// Hard limit on one call, pool check-out included. Default 50ms.
    pub timeout: Duration,
    /// Establishing a connection. Default: `timeout`.
    pub connect_timeout: Duration,
    /// `pool.max_size`, default 16.
    pub pool_max_size: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RedisTarget {
    /// `redis://[:password@]host[:port][/db]`; shown by [`redis_url_shown`] only.
    Url(Secret<String>),
    /// The master is asked of the sentinels, and asked again after a fail-over.
    Sentinel {
        master: String,
        /// `host:port` of each sentinel, tried in order.
        addresses: Vec<String>,
    },
}

/// `dependencies:`: each entry is a background check; absent entries are not checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DependenciesConfig {
    pub postgres: Option<PostgresDependency>,
    /// Checks the top-level `redis:` client (the program has one Redis configuration).
    pub redis: Option<CheckConfig>,
    pub memory: Option<MemoryCheck>,
}

/// When and how one check runs, and what its failure means.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    /// Between the starts of two probes (jittered by 10 %).
    pub interval: Duration,
    /// The interval while the check fails (or, for an upstream, while one of its breakers
    /// or ejections is open), never longer than `interval`. Default 1s, as Envoy's.
    pub unhealthy_interval: Duration,
    /// The interval between the probes that confirm a recovery (a pass while the check is
    /// down or, for an upstream, while a breaker or ejection is open), and after a refused
    /// connect while a breaker or ejection is open; never longer than `unhealthy_interval`.
    /// HAProxy's `fastinter`. Default 250ms.
    pub fast_interval: Duration,
    /// The whole probe, connecting included.
    pub timeout: Duration,
    /// A critical check that fails makes `/health` 503 and `/readyz` not ready.
    pub critical: bool,
    /// Consecutive failures that turn a healthy check unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive successes that turn an unhealthy check healthy.
    pub healthy_after: u32,
}

/// `dependencies.postgres`.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresDependency {
    /// A libpq URL or key=value string: several hosts and `target_session_attrs` allowed.
    /// Holds the password: shown only through tokio-postgres' parser (`/admin/config`).
    pub url: Secret<String>,
    pub pool: PgPoolConfig,
    pub check: CheckConfig,
    /// Client connections over `max_connections` above which the check is degraded.
    /// Default 0.8.
    pub warn_connections_above: f64,
    /// With `sslmode=require` (or `verify-full`): PEM CA certificates trusted besides the
    /// system's store (`tls.ca_file`).
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// The health-check pool: sized for the checks, not for the app.
#[derive(Debug, Clone, PartialEq)]
pub struct PgPoolConfig {
    /// Default 0: nothing is held open between checks beyond what the pool keeps idle.
    pub min_idle: u32,
    /// Default 4.
    pub max_size: u32,
    /// One connection attempt to one host (several hosts are tried in turn). Default 5s.
    pub connect_timeout: Duration,
    /// Default 30s.
    pub idle_timeout: Duration,
    /// Default 30m.
    pub max_lifetime: Duration,
}

/// `dependencies.memory`: resident memory against the cgroup limit (or the machine's).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryCheck {
    pub check: CheckConfig,
    /// Share of the limit above which the check is degraded. Default 0.8.
    pub warn_above: f64,
}

/// `upstreams.<name>.health_check`: an active HTTP check of every endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHealthCheck {
    /// Default /health.
    pub path: String,
    /// Default 5s, timeout 2s, unhealthy after 3, healthy after 2, not critical.
    pub check: CheckConfig,
}

/// One named rate-limit policy (`rate_limits.<name>`).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub name: String,
    /// Requests allowed per window and key. Default 100.
    pub points: u64,
    /// The window. Default 60s.
    pub per: Duration,
    /// Once the points are spent, the key is refused this long (at least until the window
    /// ends). Default 60s; None (`off`) = only until the window ends.
    pub block_for: Option<Duration>,
    pub key: RateLimitKey,
    pub store: RateLimitStore,
    /// IPv6 client addresses are keyed by their first this many bits. Default 64.
    pub ipv6_prefix: u8,
}

/// What a policy counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitKey {
    /// `route+...`: one count per route the policy is on.
    pub per_route: bool,
    pub by: KeySource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    ClientIp,
    /// Lower-case header name. A request without the header is counted by client IP.
    Header(http::HeaderName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitStore {
    Redis,
    Memory,
}

/// The shutdown sequence (`drain:`), see `shutdown.rs`.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainConfig {
    /// After the signal, readiness fails but traffic is still accepted this long, while load
    /// balancers converge. Default 5s; 0 allowed; less than `timeout`.
    pub accept_grace: Duration,
    /// The whole drain, counted from the signal: at this deadline open SSE streams get a
    /// final event and what is left is cut. Default 30s.
    pub timeout: Duration,
}

/// When a listener stops accepting during a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainMode {
    /// Stops after `drain.accept_grace` (traffic coming into the pod).
    Inbound,
    /// Keeps accepting until the drain deadline, or until the inbound side has drained and
    /// nothing is connected any more: the app's own outbound calls while it finishes.
    Egress,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Default 127.0.0.1:9901.
    pub listen: SocketAddr,
    /// When set, `/metrics`, `/admin/*` and the status page's data need
    /// `Authorization: Bearer <token>` (the probes never do). An empty value is none.
    pub token: Option<Secret<String>>,
    /// Serve the admin listener on a non-loopback address without a token: an explicit,
    /// logged decision (refused otherwise). Default false.
    pub insecure_no_token: bool,
    /// Without a token, `/metrics` and `/admin/*` answer only requests whose Host is an IP
    /// literal, `localhost`, or one of these (lower case, no port): DNS rebinding.
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoggingConfig {
    /// A tracing `EnvFilter` directive; default "info".
    pub level: String,
    /// Default text.
    pub format: LogFormat,
    /// One line per request; default true.
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Connections beyond this wait in the kernel backlog. Default 10_000.
    pub max_connections: usize,
    /// Time allowed to send a complete request head, counted from accept for the first one
    /// (nginx's `client_header_timeout`); also the HTTP/1 keep-alive idle timeout. Default 10s.
    pub header_read_timeout: Duration,
    /// Bytes of request head (HTTP/1 read buffer, HTTP/2 header list). Default 64 KiB,
    /// minimum 8 KiB (hyper's floor).
    pub max_header_bytes: usize,
    /// Number of request headers. Default 100.
    pub max_headers: usize,
    pub http2: Http2Config,
    /// Requests in flight on this listener; above it, 503 OVERLOADED. None = no cap.
    pub max_in_flight: Option<usize>,
    /// Default inbound.
    pub drain: DrainMode,
    /// Also answers the `/health` JSON at this path, before routing (for load balancers that
    /// only see traffic ports); 503 while draining too. None by default.
    pub health_path: Option<String>,
    /// `normalize_path`, `merge_slashes`, `escaped_slashes`.
    pub path: PathConfig,
    pub routes: Vec<RouteConfig>,
}

/// How a listener reads request paths before matching routes (proxy/path.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathConfig {
    /// Default `Match`.
    pub normalize: NormalizePath,
    /// Empty segments dropped (`//a` is `/a`). Default true.
    pub merge_slashes: bool,
    /// Default `Reject`.
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            normalize: NormalizePath::Match,
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::Keep,
        }
    }
}

/// `normalize_path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalizePath {
    /// Routes match the path as received.
    Off,
    /// Routes match the normalised path; the upstream gets the path as received.
    Match,
    /// Routes match the normalised path, and the upstream gets it too.
    Forward,
}

/// `escaped_slashes`: what an encoded `/` or `\` (`%2F`, `%5C`) in a path gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// 400: an upstream that decodes it before routing would see other segments than the
    /// ones rampart matched.
    Reject,
    /// Kept encoded, part of the segment it is in (the default, as Envoy's: file names and
    /// ids with an encoded slash are real traffic, and Express matches routes on the
    /// encoded path too).
    Keep,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Http2Config {
    /// Default 100.
    pub max_concurrent_streams: u32,
    /// Streams reset by the client before we accepted them (CVE-2023-44487). Default 20.
    pub max_pending_accept_reset_streams: usize,
    /// Streams we had to reset because of the peer's errors (CVE-2024-27316 style). Default 1024.
    pub max_local_error_reset_streams: usize,
    /// A connection with no open stream for this long gets GOAWAY and is closed, PINGs or not
    /// (Envoy's connection idle timeout). Default 3m, at most 24h.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Unique within its listener; default `<listener>.<index>`.
    pub name: String,
    /// `match.path_prefix`, default "/". Matched on whole segments ("/api" matches "/api" and
    /// "/api/x", not "/apix") unless it ends with "/".
    pub path_prefix: String,
    /// `match.host`: exact host (port stripped, ASCII case-insensitive); None = any.
    pub host: Option<String>,
    /// `match.methods`; None = any.
    pub methods: Option<Vec<Method>>,
    /// `match.case_insensitive`: the path prefix compared ignoring ASCII case (for
    /// upstreams that route that way, as Express does). Default false.
    pub case_insensitive: bool,
    /// Name of an entry in `upstreams`.
    pub upstream: String,
    pub timeouts: RouteTimeouts,
    /// Request body limit in bytes; default 10 MiB.
    pub max_body_bytes: u64,
    /// Names of `rate_limits` policies; every one must allow the request.
    pub rate_limits: Vec<String>,
    /// Protocols tunnelled after a 101 (`Upgrade` tokens, lowercased; never h2c). Default
    /// `[websocket]`; empty: no upgrades on this route. Any other upgrade is removed and the
    /// request served as plain HTTP/1.1.
    pub upgrades: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteTimeouts {
    /// Default: the upstream's `connect_timeout`.
    pub connect: Duration,
    /// Request body's last byte written -> response headers. Default 30s.
    pub first_byte: Duration,
    /// Longest silence between chunks of the upstream's body; also the send timeout (no
    /// progress writing to the client). Default 60s.
    pub idle: Duration,
    /// Whole exchange including the body; off by default (streams run long).
    pub total: Option<Duration>,
    /// Longest wait for the next bytes of the request body (nginx's `client_body_timeout`);
    /// also the grace before `min_body_rate` applies. Default 60s, at most 1h.
    pub body: Duration,
    /// Bytes per second the request body must average once it has taken longer than `body`
    /// (Apache's mod_reqtimeout `MinRate`): the client may take `body` + received / rate in
    /// all. None = off. Default 500 B/s, at most 1 GiB/s.
    pub min_body_rate: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// At least one. `http://host:port` (or https), no path.
    pub endpoints: Vec<http::Uri>,
    /// Default 5s.
    pub connect_timeout: Duration,
    pub pool: PoolConfig,
    /// Which HTTP/1.1 client speaks to the endpoints. Default rampart's own.
    pub client: UpstreamClient,
    /// For https endpoints: PEM CA certificates trusted in addition to the system's store
    /// (`tls.ca_file`); None = the system's store only.
    pub tls_ca_file: Option<std::path::PathBuf>,
    pub resilience: Resilience,
}

/// How an upstream is protected from its failures and from overload (issue: breaking,
/// retries, shedding, several endpoints). Kept in one struct so the upstream's plain
/// connection settings above stay short.
#[derive(Debug, Clone, PartialEq)]
pub struct Resilience {
    /// Default round_robin.
    pub load_balancing: LoadBalancing,
    pub circuit_breaker: BreakerConfig,
    pub ejection: EjectionConfig,
    pub retry: RetryConfig,
    /// Requests in flight to this upstream; above it, 503 OVERLOADED. None = no cap.
    pub max_in_flight: Option<usize>,
    /// Active checks: an endpoint that fails them is skipped like an ejected one.
    pub health_check: Option<UpstreamHealthCheck>,
}

/// The HTTP/1.1 client of an upstream (`client:`): rampart's own (`proxy::client`), or
/// hyper's connection client, kept as the differential reference of the wire tests and as a
/// switch to fall back on in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamClient {
    #[default]
    Rampart,
    Hyper,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalancing {
    RoundRobin,
    /// Power of two choices on requests in flight.
    LeastOutstanding,
}

/// What one breaker guards (`circuit_breaker.scope`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BreakerScope {
    /// One breaker per route using the upstream: a failing route does not stop the others.
    #[default]
    Route,
    /// One breaker shared by every route of the upstream.
    Upstream,
}

impl BreakerScope {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerScope::Route => "route",
            BreakerScope::Upstream => "upstream",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Default route.
    pub scope: BreakerScope,
    /// Consecutive failures that open it. Default 5.
    pub failures: u32,
    /// First open period. Default 60s; doubled (with jitter) each time it re-opens.
    pub open_for: Duration,
    /// Cap of the doubling. Default 5m.
    pub max_open_for: Duration,
    /// Successful probes that close it again. Default 2.
    pub half_open_successes: u32,
    /// Probes allowed at once while half-open. Default 2.
    pub half_open_max_probes: u32,
    /// Optional: also open when the failure share in a window passes a threshold.
    pub failure_rate: Option<FailureRate>,
    /// Count a 500 as a failure. Default false (a 500 is usually one request's bug).
    pub count_500: bool,
    /// Count a 429/503 that carries Retry-After ("back off", not "dead"). Default false.
    pub count_backoff: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FailureRate {
    /// Share of failures, 0 < t <= 1. Written as "50%".
    pub threshold: f64,
    pub window: Duration,
    /// Fewer calls than this in the window never open it. Default 20.
    pub min_calls: u32,
}

/// Passive ejection of one endpoint after consecutive failures.
#[derive(Debug, Clone, PartialEq)]
pub struct EjectionConfig {
    /// Default 3 (below the breaker's 5: an endpoint is set aside before the upstream is).
    pub consecutive_failures: u32,
    /// Default 10s, doubled for each ejection in a row, up to `max_ejection`.
    pub base_ejection: Duration,
    /// Default 5m.
    pub max_ejection: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// The connection could not be made: nothing reached the upstream.
    ConnectError,
    /// Connect or first-byte timeout.
    Timeout,
    /// The connection failed after the request was sent.
    Reset,
    Status(u16),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Attempts in all, the first included. Default 2.
    pub attempts: u32,
    /// Full-jitter exponential backoff. Default 50ms.
    pub backoff_base: Duration,
    /// Default 1s.
    pub backoff_max: Duration,
    /// Default [connect_error]: only what provably never reached the upstream.
    pub on: Vec<RetryOn>,
    /// Retries allowed as a share of requests (10 s window). Default 0.2.
    pub budget_ratio: f64,
    /// Retries always allowed per second, whatever the traffic. Default 3.
    pub budget_min_per_s: u32,
    /// Bodies up to this size are kept for a retry; larger ones are not retried (except
    /// when the connection never opened). Default 64 KiB.
    pub max_body: u64,
    /// How long a request that meets connection refused or a connect timeout keeps trying
    /// to connect (nothing reached the upstream: any method), so that a restart shorter
    /// than this costs latency, not errors. Default 5s; None (`off`) = only `attempts`.
    pub connect_wait: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Close idle upstream connections after this; default 4s, below Node's 5s keep-alive so
    /// we never reuse a socket the upstream is closing.
    pub idle_timeout: Duration,
    /// Default 256.
    pub max_idle_per_endpoint: usize,
}

/// An address block such as `10.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer may arrive as an IPv4-mapped IPv6 address on a dual-stack socket.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

// === defaults of the resilience settings (validate/ falls back to these) ===

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            scope: BreakerScope::Route,
            failures: 5,
            open_for: Duration::from_secs(60),
            max_open_for: Duration::from_secs(300),
            half_open_successes: 2,
            half_open_max_probes: 2,
            failure_rate: None,
            count_500: false,
            count_backoff: false,
        }
    }
}

impl Default for EjectionConfig {
    fn default() -> Self {
        EjectionConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 2,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            on: vec![RetryOn::ConnectError],
            budget_ratio: 0.2,
            budget_min_per_s: 3,
            max_body: 64 * 1024,
            connect_wait: Some(Duration::from_secs(5)),
        }
    }
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience {
            load_balancing: LoadBalancing::RoundRobin,
            circuit_breaker: BreakerConfig::default(),
            ejection: EjectionConfig::default(),
            retry: RetryConfig::default(),
            max_in_flight: None,
            health_check: None,
        }
    }
}

/// One thing wrong with the file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    /// Key path such as `listeners[0].routes[2].upstream`; empty for the document itself.
    pub path: String,
    pub message: String,
}

/// Every problem found in one file. Display prints one per line:
/// `proxy.yaml:12:15: listeners[0].routes[2].upstream: unknown upstream "fastgtp" (known: backend, fastgpt)`
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            // Line 0: about the file as a whole (it could not be read), so no position.
            if p.line > 0 {
                write!(f, "{}:{}:{}: ", self.source_name, p.line, p.column)?;
            }
            if !p.path.is_empty() {
                write!(f, "{}: ", p.path)?;
            }
            write!(f, "{}", p.message)?;
        }
        Ok(())
    }
}

/// "1 route", "2 routes".
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A byte size in the largest binary unit that divides it ("10 MiB", "1500 B").
fn human_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} B")
}

/// The breaker, retry and health-check lines of one upstream in `rampart check`.
fn summarize_resilience(s: &mut String, r: &Resilience) {
    use std::fmt::Write;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let b = &r.circuit_breaker;
    let rate = b.failure_rate.as_ref().map_or(String::new(), |f| {
        format!(
            ", or {:.0}% of at least {} calls in {}",
            f.threshold * 100.0,
            f.min_calls,
            d(f.window)
        )
    });
    let _ = writeln!(
        s,
        "  breaker per {}: {} failures{rate}, open {} (max {}), closes after {} successes",
        b.scope.as_str(),
        b.failures,
        d(b.open_for),
        d(b.max_open_for),
        b.half_open_successes
    );
    let t = &r.retry;
    let on: Vec<String> =
        t.on.iter()
            .map(|o| match o {
                RetryOn::ConnectError => "connect_error".to_owned(),
                RetryOn::Timeout => "timeout".to_owned(),
                RetryOn::Reset => "reset".to_owned(),
                RetryOn::Status(code) => code.to_string(),
            })
            .collect();
    let _ = writeln!(
        s,
        "  retry   {} attempts on {}, backoff {}..{}, budget {:.0}% + {}/s",
        t.attempts,
        on.join(","),
        d(t.backoff_base),
        d(t.backoff_max),
        t.budget_ratio * 100.0,
        t.budget_min_per_s
    );
    let _ = match &r.health_check {
        Some(h) => writeln!(
            s,
            "  health  GET {} every {}, timeout {}, down after {}, up after {}{}",
            h.path,
            d(h.check.interval),
            d(h.check.timeout),
            h.check.unhealthy_after,
            h.check.healthy_after,
            if h.check.critical { ", critical" } else { "" }
        ),
        None => writeln!(
            s,
            "  health  none (passive ejection only: {} failures)",
            r.ejection.consecutive_failures
        ),
    };
}

impl Config {
    /// Reads and validates a file. An unreadable file is one problem without a position.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_checked(path).map(|(config, _)| config)
    }

    /// [`Config::load`], plus the warnings `rampart check` prints (see
    /// [`parse_str_checked`]).
    pub fn load_checked(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => parse_str_checked(&text, &name, &|var| std::env::var(var).ok()),
            Err(e) => Err(ConfigError {
                problems: vec![Problem {
                    line: 0,
                    column: 0,
                    path: String::new(),
                    message: format!("cannot read {name}: {e}"),
                }],
                source_name: name,
            }),
        }
    }

    /// A short human summary for `rampart check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "{}: ok", self.source);
        let _ = writeln!(
            s,
            "admin     {}{}",
            self.admin.listen,
            match (&self.admin.token, self.admin.insecure_no_token) {
                (Some(_), _) => " (token)",
                (None, true) => " (NO TOKEN: insecure_no_token)",
                (None, false) => "",
            }
        );
        for l in &self.listeners {
            let _ = writeln!(
                s,
                "listener  {} on {} ({}, max {} connections{})",
                l.name,
                l.listen,
                plural(l.routes.len(), "route"),
                l.max_connections,
                if l.drain == DrainMode::Egress {
                    ", egress"
                } else {
                    ""
                }
            );
            for r in &l.routes {
                let methods = r
                    .methods
                    .as_ref()
                    .map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","))
                    .unwrap_or_else(|| "*".into());
                let total = r
                    .timeouts
                    .total
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_else(|| "off".into());
                let limits = if r.rate_limits.is_empty() {
                    String::new()
                } else {
                    format!(", rate limits {}", r.rate_limits.join(","))
                };
                let _ = writeln!(
                    s,
                    "  route   {} {}{} [{}] -> {} (first_byte {}, idle {}, total {}, body {}{limits})",
                    r.name,
                    r.host.as_deref().unwrap_or(""),
                    r.path_prefix,
                    methods,
                    r.upstream,
                    humantime::format_duration(r.timeouts.first_byte),
                    humantime::format_duration(r.timeouts.idle),
                    total,
                    human_bytes(r.max_body_bytes)
                );
            }
        }
        if let Some(r) = &self.redis {
            let target = match &r.target {
                // Credentials stay out of the summary.
                RedisTarget::Url(url) => redis_url_shown(url),
                RedisTarget::Sentinel { master, addresses } => {
                    format!("sentinel master {master} via {}", addresses.join(", "))
                }
            };
            let _ = writeln!(
                s,
                "redis     {target} (timeout {}, pool {}, replicas {})",
                humantime::format_duration(r.timeout),
                r.pool_max_size,
                self.replicas
            );
        }
        for p in self.rate_limits.values() {
            let block = p
                .block_for
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_else(|| "off".into());
            let store = match p.store {
                RateLimitStore::Redis => "redis",
                RateLimitStore::Memory => "memory",
            };
            let _ = writeln!(
                s,
                "ratelimit {} {} per {} (block {block}, store {store})",
                p.name,
                p.points,
                humantime::format_duration(p.per),
            );
        }
        let _ = writeln!(
            s,
            "drain     accept grace {}, timeout {}",
            humantime::format_duration(self.drain.accept_grace),
            humantime::format_duration(self.drain.timeout)
        );
        let sinks: Vec<&str> = self.alerts.sinks.iter().map(|k| k.kind.as_str()).collect();
        let _ = writeln!(
            s,
            "alerts    {} every {}, log{}{}",
            plural(self.alerts.rules.len(), "rule"),
            humantime::format_duration(self.alerts.interval),
            if sinks.is_empty() { "" } else { ", " },
            sinks.join(", ")
        );
        for u in self.upstreams.values() {
            let eps: Vec<String> = u.endpoints.iter().map(|e| e.to_string()).collect();
            let _ = writeln!(
                s,
                "upstream  {} -> {} (connect {}, pool idle {})",
                u.name,
                eps.join(", "),
                humantime::format_duration(u.connect_timeout),
                humantime::format_duration(u.pool.idle_timeout)
            );
            // What decides how this upstream behaves in an outage.
            summarize_resilience(&mut s, &u.resilience);
        }
        let d = &self.dependencies;
        // The memory check reads a file, so it has no timeout to show.
        let checks = [
            d.postgres
                .as_ref()
                .map(|p| ("postgres".to_owned(), &p.check, true)),
            d.redis.as_ref().map(|c| ("redis".to_owned(), c, true)),
            d.memory
                .as_ref()
                .map(|m| ("memory".to_owned(), &m.check, false)),
        ];
        let upstream_checks = self.upstreams.values().filter_map(|u| {
            let hc = u.resilience.health_check.as_ref()?;
            Some((
                format!("upstream:{} GET {}", u.name, hc.path),
                &hc.check,
                true,
            ))
        });
        for (name, c, timed) in checks.into_iter().flatten().chain(upstream_checks) {
            let timeout = if timed {
                format!(", timeout {}", humantime::format_duration(c.timeout))
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "check     {name} every {}{timeout}{}",
                humantime::format_duration(c.interval),
                if c.critical { ", critical" } else { "" }
            );
        }
        s
    }
}
