//! `redis:` and `rate_limits.<name>`.

use std::time::Duration;

use super::Secret;

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

impl RedisConfig {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
    pub const DEFAULT_POOL_MAX_SIZE: u32 = 16;
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

impl RateLimitConfig {
    pub const DEFAULT_POINTS: u64 = 100;
    pub const DEFAULT_PER: Duration = Duration::from_secs(60);
    pub const DEFAULT_BLOCK_FOR: Duration = Duration::from_secs(60);
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
