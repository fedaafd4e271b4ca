//! The process-wide sections: `admin:`, `logging:`, `drain:`, `readiness:` and the
//! `trusted_proxies:` CIDRs.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::Secret;

/// `readiness:`. An open breaker says one route's upstream fails, not that this replica
/// does: taking every replica out of the Service for it turns a partial outage into a
/// total one, so it is opt-in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReadinessConfig {
    /// Default `ignore`.
    pub breaker_open: BreakerReadiness,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerReadiness {
    #[default]
    Ignore,
    /// Not ready while a breaker is OPEN (half-open is ready: its probes need traffic).
    NotReady,
}

/// The shutdown sequence (`drain:`), see `shutdown.rs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainConfig {
    /// After the signal, readiness fails but traffic is still accepted this long, while load
    /// balancers converge. Default 5s; 0 allowed; less than `timeout`.
    #[serde(serialize_with = "super::serialize::duration")]
    pub accept_grace: Duration,
    /// The whole drain, counted from the signal: at this deadline open SSE streams get a
    /// final event and what is left is cut. Default 30s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub timeout: Duration,
}

impl DrainConfig {
    pub const DEFAULT_ACCEPT_GRACE: Duration = Duration::from_secs(5);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
}

#[derive(Debug, Clone, PartialEq, Serialize)]
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

impl AdminConfig {
    pub const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9901);
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggingConfig {
    /// A tracing `EnvFilter` directive; default "info".
    pub level: String,
    /// Default text.
    pub format: LogFormat,
    /// One line per request; default true.
    pub access_log: bool,
}

impl LoggingConfig {
    pub const DEFAULT_LEVEL: &str = "info";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
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
        let ip = ip.to_canonical();
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

/// Written as the file takes it: `10.0.0.0/8`.
impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
