//! `listeners[]` and their `routes[]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Method;
use serde::{Serialize, Serializer};

/// When a listener stops accepting during a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainMode {
    /// Stops after `drain.accept_grace` (traffic coming into the pod).
    Inbound,
    /// Keeps accepting until the drain deadline, or until the inbound side has drained and
    /// nothing is connected any more: the app's own outbound calls while it finishes.
    Egress,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Connections beyond this wait in the kernel backlog. Default 10_000.
    pub max_connections: usize,
    /// Time allowed to send a complete request head, counted from accept for the first one
    /// (nginx's `client_header_timeout`); also the HTTP/1 keep-alive idle timeout. Default 10s.
    #[serde(serialize_with = "super::serialize::duration")]
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
    #[serde(flatten)]
    pub path: PathConfig,
    /// TLS termination; None = plain HTTP.
    pub tls: Option<ListenerTls>,
    /// A plain listener answers every request (but `health_path`) with a 308 to the same
    /// URL over https. Default false; refused with `tls`.
    pub redirect_to_https: bool,
    /// Which HTTP/1.1 server reads this listener's requests. Default `rampart`.
    pub http1_server: Http1Server,
    pub routes: Vec<RouteConfig>,
}

/// The HTTP/1.1 server side of a listener (`http1_server:`): rampart's own (`crate::h1`),
/// or hyper's, kept as the differential reference of the wire tests and as a switch to fall
/// back on in production. HTTP/2 is hyper's either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Http1Server {
    #[default]
    Rampart,
    Hyper,
}

impl ListenerConfig {
    pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
    pub const DEFAULT_MAX_HEADERS: usize = 100;
}

/// A listener's `tls:`. Only the file paths are kept: the listener reads the files at start
/// and on every reload (the check reads them too, to refuse a bad pair before that).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerTls {
    /// The default certificate (served without SNI or when no name matches), with `key`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// More certificates, chosen by SNI.
    pub certificates: Vec<TlsPair>,
    /// Client certificates are required and must chain to a CA in this file (mTLS).
    pub client_ca: Option<PathBuf>,
    /// From accept to the end of the handshake. Default 10s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub handshake_timeout: Duration,
    /// How often the certificate and key files are looked at for a change on disk (a
    /// Kubernetes secret rotated), which then reloads them. None (`off`): only reloads do.
    /// Default 5s.
    #[serde(serialize_with = "super::serialize::duration_or_off")]
    pub watch: Option<Duration>,
}

impl ListenerTls {
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_WATCH: Duration = Duration::from_secs(5);

    /// Every pair, the default first.
    pub fn pairs(&self) -> Vec<TlsPair> {
        let first = self
            .cert
            .clone()
            .zip(self.key.clone())
            .map(|(cert, key)| TlsPair { cert, key });
        first
            .into_iter()
            .chain(self.certificates.iter().cloned())
            .collect()
    }
}

/// A certificate chain file (leaf first) and its private key file, PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How a listener reads request paths before matching routes (proxy/path.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PathConfig {
    /// Default `Match`.
    #[serde(rename = "normalize_path")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizePath {
    /// Routes match the path as received.
    Off,
    /// Routes match the normalised path; the upstream gets the path as received.
    Match,
    /// Routes match the normalised path, and the upstream gets it too.
    Forward,
}

/// `escaped_slashes`: what an encoded `/` or `\` (`%2F`, `%5C`) in a path gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// 400: an upstream that decodes it before routing would see other segments than the
    /// ones rampart matched.
    Reject,
    /// Kept encoded, part of the segment it is in (the default, as Envoy's: file names and
    /// ids with an encoded slash are real traffic, and Express matches routes on the
    /// encoded path too).
    Keep,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Http2Config {
    /// Default 100.
    pub max_concurrent_streams: u32,
    /// Streams reset by the client before we accepted them (CVE-2023-44487). Default 20.
    pub max_pending_accept_reset_streams: usize,
    /// Streams we had to reset because of the peer's errors (CVE-2024-27316 style). Default 1024.
    pub max_local_error_reset_streams: usize,
    /// A connection with no open stream for this long gets GOAWAY and is closed, PINGs or not
    /// (Envoy's connection idle timeout). Default 3m, at most 24h.
    #[serde(serialize_with = "super::serialize::duration")]
    pub idle_timeout: Duration,
}

impl Http2Config {
    pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
    pub const DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
    pub const DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
    /// Envoy's default connection idle timeout is 1h; a proxy in front of browsers and apps
    /// that reconnect cheaply can close sooner.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
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
    /// Name of a `caches:` policy: GET and HEAD answers of this route are cached under it.
    pub cache: Option<String>,
    /// Protocols tunnelled after a 101 (`Upgrade` tokens, lowercased; never h2c). Default
    /// `[websocket]`; empty: no upgrades on this route. Any other upgrade is removed and the
    /// request served as plain HTTP/1.1.
    pub upgrades: Vec<String>,
    /// Timers and heartbeats for answers that are event streams (`text/event-stream`).
    pub stream: StreamConfig,
    /// Which answers are read for an LLM's token counts. Default `Streams`.
    pub tokens: TokenCounting,
}

/// A route's `tokens:`: which answers rampart reads for token counts (`stream::usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCounting {
    /// Event streams; JSON answers too when the route has a `cost: tokens` policy (a token
    /// budget must see every answer). JSON answers are otherwise left unread: reading every
    /// JSON body would cost every API call through rampart.
    Streams,
    /// Event streams and every JSON answer.
    All,
    /// None (refused on a route with a `cost: tokens` policy).
    Off,
}

/// A route's `stream:`: applied when an answer is an event stream (a 200
/// `text/event-stream` without a Content-Length). Each timer ends the stream with a final
/// `event: error` written between two events, never inside one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamConfig {
    /// Response headers -> first complete event. Default 60s; None = off.
    #[serde(serialize_with = "super::serialize::duration_or_off")]
    pub first_event: Option<Duration>,
    /// Longest silence between complete events. Default 45s; None = off.
    #[serde(serialize_with = "super::serialize::duration_or_off")]
    pub between_events: Option<Duration>,
    /// Whole stream, from its headers. Default 10m; None = off.
    #[serde(serialize_with = "super::serialize::duration_or_off")]
    pub max_duration: Option<Duration>,
    /// A `: keep-alive` comment when the client has had no bytes for this long. Default 15s;
    /// None = off.
    #[serde(serialize_with = "super::serialize::duration_or_off")]
    pub heartbeat: Option<Duration>,
    /// The upstream's own comment lines reset `between_events`. Default false (a model that
    /// only sends keep-alives is stalled).
    pub comments_are_activity: bool,
    /// Event names that are in-band errors (a failure for the breaker and the metrics,
    /// though the status was 200). Default `[error]`.
    pub error_events: Vec<String>,
    /// Bytes of an unfinished event held back, so that a final event can always be written
    /// at a boundary; an event larger than this is forwarded as it comes, and a failure in
    /// its middle then cuts the connection. Default 64 KiB.
    pub partial_event_buffer: u64,
}

impl StreamConfig {
    pub const DEFAULT_FIRST_EVENT: Duration = Duration::from_secs(60);
    pub const DEFAULT_BETWEEN_EVENTS: Duration = Duration::from_secs(45);
    pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(600);
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
    pub const DEFAULT_ERROR_EVENTS: &[&str] = &["error"];
    pub const DEFAULT_PARTIAL_EVENT_BUFFER: u64 = 64 * 1024;
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            first_event: Some(Self::DEFAULT_FIRST_EVENT),
            between_events: Some(Self::DEFAULT_BETWEEN_EVENTS),
            max_duration: Some(Self::DEFAULT_MAX_DURATION),
            heartbeat: Some(Self::DEFAULT_HEARTBEAT),
            comments_are_activity: false,
            error_events: Self::DEFAULT_ERROR_EVENTS
                .iter()
                .map(|n| (*n).to_owned())
                .collect(),
            partial_event_buffer: Self::DEFAULT_PARTIAL_EVENT_BUFFER,
        }
    }
}

/// Written as the file nests it: the matching keys under `match`, the body limit as
/// `max_body`. By hand because a derive cannot group fields; the whole struct is taken
/// apart so that a field added to it does not compile until it is shown (or left out) here.
impl Serialize for RouteConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Route<'a> {
            name: &'a str,
            #[serde(rename = "match")]
            matching: Match<'a>,
            upstream: &'a str,
            timeouts: &'a RouteTimeouts,
            max_body: u64,
            rate_limits: &'a [String],
            cache: Option<&'a str>,
            upgrades: &'a [String],
            stream: &'a StreamConfig,
            tokens: TokenCounting,
        }
        #[derive(Serialize)]
        struct Match<'a> {
            path_prefix: &'a str,
            host: Option<&'a str>,
            methods: Option<Vec<&'a str>>,
            case_insensitive: bool,
        }
        let RouteConfig {
            name,
            path_prefix,
            host,
            methods,
            case_insensitive,
            upstream,
            timeouts,
            max_body_bytes,
            rate_limits,
            cache,
            upgrades,
            stream,
            tokens,
        } = self;
        Route {
            name,
            matching: Match {
                path_prefix,
                host: host.as_deref(),
                methods: methods
                    .as_ref()
                    .map(|m| m.iter().map(Method::as_str).collect()),
                case_insensitive: *case_insensitive,
            },
            upstream,
            timeouts,
            max_body: *max_body_bytes,
            rate_limits,
            cache: cache.as_deref(),
            upgrades,
            stream,
            tokens: *tokens,
        }
        .serialize(s)
    }
}

impl RouteConfig {
    pub const DEFAULT_PATH_PREFIX: &str = "/";
    pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
    /// When `upgrades` is left out: WebSocket only.
    pub const DEFAULT_UPGRADES: &[&str] = &["websocket"];
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteTimeouts {
    /// Default: the upstream's `connect_timeout`.
    #[serde(serialize_with = "super::serialize::duration")]
    pub connect: Duration,
    /// Request body's last byte written -> response headers. Default 30s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub first_byte: Duration,
    /// Longest silence between chunks of the upstream's body; also the send timeout (no
    /// progress writing to the client). Default 60s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub idle: Duration,
    /// Whole exchange including the body; off by default (streams run long).
    #[serde(serialize_with = "super::serialize::duration_or_off")]
    pub total: Option<Duration>,
    /// Longest wait for the next bytes of the request body (nginx's `client_body_timeout`);
    /// also the grace before `min_body_rate` applies. Default 60s, at most 1h.
    #[serde(serialize_with = "super::serialize::duration")]
    pub body: Duration,
    /// Bytes per second the request body must average once it has taken longer than `body`
    /// (Apache's mod_reqtimeout `MinRate`): the client may take `body` + received / rate in
    /// all. None = off. Default 500 B/s, at most 1 GiB/s.
    #[serde(serialize_with = "rate_or_off")]
    pub min_body_rate: Option<u64>,
}

/// "500B/s", or `off`.
fn rate_or_off<S: Serializer>(rate: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match rate {
        Some(n) => s.collect_str(&format_args!("{n}B/s")),
        None => s.serialize_str("off"),
    }
}

impl RouteTimeouts {
    pub const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(30);
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
    /// nginx's `client_body_timeout`.
    pub const DEFAULT_BODY: Duration = Duration::from_secs(60);
    /// Apache's mod_reqtimeout default `MinRate`: far below any real link (4 kbit/s), far above
    /// a trickle of a byte a second.
    pub const DEFAULT_MIN_BODY_RATE: u64 = 500;
}
