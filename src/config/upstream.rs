//! `upstreams.<name>` and the resilience settings (breaker, ejection, retry) a route may
//! override.

use std::time::Duration;

use serde::{Serialize, Serializer};

use super::UpstreamHealthCheck;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamConfig {
    /// The key of `upstreams`, which says it already.
    #[serde(skip)]
    pub name: String,
    /// At least one. `http://host:port` (or https), no path. With `groups`, every group's
    /// endpoints, group after group (what health checks and pools are made for).
    #[serde(serialize_with = "super::serialize::display_all")]
    pub endpoints: Vec<http::Uri>,
    /// Named groups sharing the traffic by weight, in file order; empty when the file lists
    /// plain `endpoints` (one group, no choice to make).
    #[serde(serialize_with = "groups_map")]
    pub groups: Vec<EndpointGroup>,
    /// What keeps a client in one group (`sticky:`); None = round robin by weight.
    pub sticky: Option<Sticky>,
    /// Default 5s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub connect_timeout: Duration,
    pub pool: PoolConfig,
    /// Which HTTP/1.1 client speaks to the endpoints. Default rampart's own.
    pub client: UpstreamClient,
    /// For https endpoints (`tls:`).
    pub tls: UpstreamTls,
    /// Beside the other keys, as in the file.
    #[serde(flatten)]
    pub resilience: Resilience,
}

impl UpstreamConfig {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Group weights are 0..=MAX_GROUP_WEIGHT: enough for 0.01 % steps.
    pub const MAX_GROUP_WEIGHT: u32 = 10_000;
    /// Blue-green and canaries need two or three; the cap bounds the smooth sequence.
    pub const MAX_GROUPS: usize = 16;
}

/// `groups.<name>`: endpoints that take `weight` shares of the upstream's traffic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointGroup {
    /// The key under `groups`, which says it already.
    #[serde(skip)]
    pub name: String,
    #[serde(serialize_with = "super::serialize::display_all")]
    pub endpoints: Vec<http::Uri>,
    /// 0..=10000; 0 takes no traffic (a group on standby).
    pub weight: u32,
}

fn groups_map<S: Serializer>(groups: &[EndpointGroup], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(groups.iter().map(|g| (&g.name, g)))
}

/// Where a request's stickiness key comes from (`sticky:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// A request header's value (name lowercase).
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client address, as the rate limiter finds it behind `trusted_proxies`.
    ClientIp,
}

impl std::fmt::Display for Sticky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sticky::Header(h) => write!(f, "header:{h}"),
            Sticky::Cookie(c) => write!(f, "cookie:{c}"),
            Sticky::ClientIp => f.write_str("client_ip"),
        }
    }
}

/// Written as the file takes it: "header:x-user", "cookie:sid", "client_ip".
impl Serialize for Sticky {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How rampart speaks TLS to an upstream's https endpoints (`upstreams.<name>.tls`).
/// Hashed: a configuration snapshot builds one rustls client config per distinct value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct UpstreamTls {
    /// PEM CA certificates trusted in addition to the system's store; None = the system's
    /// store only.
    #[serde(serialize_with = "super::serialize::path")]
    pub ca_file: Option<std::path::PathBuf>,
    /// The SNI sent and the name the certificate must carry; None = the endpoint's host.
    pub server_name: Option<String>,
    /// A client certificate chain (PEM) presented to the upstream, with `client_key`.
    #[serde(serialize_with = "super::serialize::path")]
    pub client_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of `client_cert`. The path is shown, never the key.
    #[serde(serialize_with = "super::serialize::path")]
    pub client_key: Option<std::path::PathBuf>,
    /// Accept any certificate: local testing only (warned about at start-up and reload).
    pub insecure_skip_verify: bool,
    /// Offer ALPN h2 and speak HTTP/2 when the upstream picks it. Default false.
    pub http2: bool,
}

/// How an upstream is protected from its failures and from overload (issue: breaking,
/// retries, shedding, several endpoints). Kept in one struct so the upstream's plain
/// connection settings above stay short.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamClient {
    #[default]
    Rampart,
    Hyper,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    RoundRobin,
    /// Power of two choices on requests in flight.
    LeastOutstanding,
}

/// What one breaker guards (`circuit_breaker.scope`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerConfig {
    /// Default route.
    pub scope: BreakerScope,
    /// Consecutive failures that open it. Default 5.
    pub failures: u32,
    /// First open period. Default 60s; doubled (with jitter) each time it re-opens.
    #[serde(serialize_with = "super::serialize::duration")]
    pub open_for: Duration,
    /// Cap of the doubling. Default 5m.
    #[serde(serialize_with = "super::serialize::duration")]
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureRate {
    /// Share of failures, 0 < t <= 1. Written as "50%".
    #[serde(serialize_with = "super::serialize::percent")]
    pub threshold: f64,
    #[serde(serialize_with = "super::serialize::duration")]
    pub window: Duration,
    /// Fewer calls than this in the window never open it. Default 20.
    pub min_calls: u32,
}

/// Passive ejection of one endpoint after consecutive failures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EjectionConfig {
    /// Default 3 (below the breaker's 5: an endpoint is set aside before the upstream is).
    pub consecutive_failures: u32,
    /// Default 10s, doubled for each ejection in a row, up to `max_ejection`.
    #[serde(serialize_with = "super::serialize::duration")]
    pub base_ejection: Duration,
    /// Default 5m.
    #[serde(serialize_with = "super::serialize::duration")]
    pub max_ejection: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The connection could not be made: nothing reached the upstream.
    ConnectError,
    /// Connect or first-byte timeout.
    Timeout,
    /// The connection failed after the request was sent.
    Reset,
    /// Written as the file takes it: "503", a string beside the names.
    #[serde(untagged, serialize_with = "status_text")]
    Status(u16),
}

fn status_text<S: Serializer>(code: &u16, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(code)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryConfig {
    /// Attempts in all, the first included. Default 2.
    pub attempts: u32,
    /// Full-jitter exponential backoff. Default 50ms.
    #[serde(serialize_with = "super::serialize::duration")]
    pub backoff_base: Duration,
    /// Default 1s.
    #[serde(serialize_with = "super::serialize::duration")]
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
    #[serde(serialize_with = "super::serialize::duration_or_off")]
    pub connect_wait: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolConfig {
    /// Close idle upstream connections after this; default 4s, below Node's 5s keep-alive so
    /// we never reuse a socket the upstream is closing.
    #[serde(serialize_with = "super::serialize::duration")]
    pub idle_timeout: Duration,
    /// Default 10000, the most allowed: in practice no count cap, as in Envoy's and hyper's
    /// pools; `idle_timeout` trims what a burst left. A cap below the connections in use
    /// at a peak closes connections the next requests need (a connect storm, and its
    /// tail latency).
    pub max_idle_per_endpoint: usize,
}

impl PoolConfig {
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
    pub const DEFAULT_MAX_IDLE_PER_ENDPOINT: usize = 10_000;
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

/// The defaults of the keys left out of a written `failure_rate` (absent, it is off).
impl Default for FailureRate {
    fn default() -> Self {
        FailureRate {
            threshold: 0.5,
            window: Duration::from_secs(30),
            min_calls: 20,
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

/// Which of the two files a client identity could not be made of, and why.
#[derive(Debug)]
pub(crate) enum IdentityError {
    Cert(String),
    Key(String),
}

/// `client_cert` and `client_key` loaded and checked to belong together (the key's public
/// half is the certificate's): at `rampart check` time, and again when a snapshot is built.
pub(crate) fn load_client_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<std::sync::Arc<rustls::sign::CertifiedKey>, IdentityError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_pem = std::fs::read(cert)
        .map_err(|e| IdentityError::Cert(format!("cannot read {}: {e}", cert.display())))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Cert(format!("{}: bad PEM: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(IdentityError::Cert(format!(
            "{}: no PEM certificate in it",
            cert.display()
        )));
    }
    let key_pem = std::fs::read(key)
        .map_err(|e| IdentityError::Key(format!("cannot read {}: {e}", key.display())))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| IdentityError::Key(format!("{}: no PEM private key: {e}", key.display())))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, private, &provider)
        .map(std::sync::Arc::new)
        .map_err(|e| {
            IdentityError::Key(format!(
                "{} does not go with the certificate in {}: {e}",
                key.display(),
                cert.display()
            ))
        })
}
