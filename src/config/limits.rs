//! `redis:` and `rate_limits.<name>`.

use std::time::Duration;

use serde::{Serialize, Serializer};

use super::Secret;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RedisConfig {
    /// `url`, `sentinel` or `cluster`, beside the other keys as in the file.
    #[serde(flatten)]
    pub target: RedisTarget,
    /// Hard limit on one call, pool check-out included. Default 50ms.
    #[serde(serialize_with = "super::serialize::duration")]
    pub timeout: Duration,
    /// Establishing a connection. Default: `timeout`.
    #[serde(serialize_with = "super::serialize::duration")]
    pub connect_timeout: Duration,
    /// `pool.max_size`, default 16.
    #[serde(rename = "pool", serialize_with = "pool_max_size")]
    pub pool_max_size: u32,
}

/// `pool: { max_size: ... }`, as the file nests it.
fn pool_max_size<S: Serializer>(max_size: &u32, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Pool {
        max_size: u32,
    }
    Pool {
        max_size: *max_size,
    }
    .serialize(s)
}

impl RedisConfig {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
    pub const DEFAULT_POOL_MAX_SIZE: u32 = 16;
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisTarget {
    /// `redis://[:password@]host[:port][/db]`; shown by [`redis_url_shown`] only.
    #[serde(serialize_with = "super::secret::redis_url")]
    Url(Secret<String>),
    /// The master is asked of the sentinels, and asked again after a fail-over.
    Sentinel {
        master: String,
        /// `host:port` of each sentinel, tried in order.
        addresses: Vec<String>,
    },
    /// A Redis Cluster: the seed nodes are asked for the slot map; the client follows
    /// MOVED/ASK and refreshes the map itself.
    Cluster {
        /// `host:port` of the seed nodes (any of them answering is enough).
        nodes: Vec<String>,
        /// ACL user; None = the default user.
        username: Option<String>,
        /// `AUTH` password, the same on every node.
        password: Option<Secret<String>>,
    },
}

/// One named rate-limit policy (`rate_limits.<name>`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimitConfig {
    /// The key of `rate_limits`, which says it already.
    #[serde(skip)]
    pub name: String,
    /// Requests (`cost: requests`) or tokens (`cost: tokens`) allowed per window and key.
    /// Default 100; None when the policy only limits open streams (`max_streams` written,
    /// `points` not).
    pub points: Option<u64>,
    /// The window. Default 60s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub per: Duration,
    /// Once the points are spent, the key is refused this long (at least until the window
    /// ends). Default 60s; None (`off`) = only until the window ends.
    #[serde(serialize_with = "super::serialize::duration_or_off")]
    pub block_for: Option<Duration>,
    pub key: RateLimitKey,
    pub store: RateLimitStore,
    /// IPv6 client addresses are keyed by their first this many bits. Default 64.
    pub ipv6_prefix: u8,
    /// What a point is. Default requests.
    pub cost: RateLimitCost,
    /// Exchanges (streams) open at once per key; None = no limit. A permit is held until
    /// the response body ends, however it ends.
    pub max_streams: Option<u64>,
    /// `store: redis`: how long a permit lives in Redis unless its replica renews it (every
    /// third of it). A replica that dies frees its permits within this. Default 30s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub stream_lease: Duration,
    /// `store: redis`, `cost: requests`: quota leasing, the most points one replica takes
    /// of a key in one Redis call (`lease: { max: N }`); None (`lease: off`) = one call per
    /// request. Default Some(64).
    #[serde(serialize_with = "lease")]
    pub lease: Option<u64>,
}

/// `lease: off` or `lease: { max: N }`, as the file writes it.
fn lease<S: Serializer>(lease: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Lease {
        max: u64,
    }
    match lease {
        Some(max) => Lease { max: *max }.serialize(s),
        None => s.serialize_str("off"),
    }
}

impl RateLimitConfig {
    pub const DEFAULT_POINTS: u64 = 100;
    pub const DEFAULT_PER: Duration = Duration::from_secs(60);
    pub const DEFAULT_BLOCK_FOR: Duration = Duration::from_secs(60);
    pub const DEFAULT_STREAM_LEASE: Duration = Duration::from_secs(30);
    pub const DEFAULT_LEASE_MAX: u64 = 64;
}

/// What one point of a policy stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitCost {
    /// Each request costs one point, at admission.
    #[default]
    Requests,
    /// Admission only asks whether points are left; the exchange's tokens (prompt +
    /// completion) are charged when they are known.
    Tokens,
}

/// What a policy counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitKey {
    /// `route+...`: one count per route the policy is on.
    pub per_route: bool,
    pub by: KeySource,
}

impl RateLimitKey {
    pub const DEFAULT_IPV6_PREFIX: u8 = 64;
}

/// Written as the file takes it: `client_ip`, `route+header:x-user-id`.
impl Serialize for RateLimitKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let route = if self.per_route { "route+" } else { "" };
        match &self.by {
            KeySource::ClientIp => s.collect_str(&format_args!("{route}client_ip")),
            KeySource::Header(h) => s.collect_str(&format_args!("{route}header:{h}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    ClientIp,
    /// Lower-case header name. A request without the header is counted by client IP.
    Header(http::HeaderName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitStore {
    Redis,
    Memory,
}
