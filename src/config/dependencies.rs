//! `dependencies:` (what rampart checks in the background) and the check settings an
//! upstream's `health_check:` shares with them.

use std::time::Duration;

use serde::{Serialize, Serializer};

use super::Secret;

/// `dependencies:`: each entry is a background check; absent entries are not checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DependenciesConfig {
    pub postgres: Option<PostgresDependency>,
    /// Checks the top-level `redis:` client (the program has one Redis configuration).
    #[serde(serialize_with = "redis_check")]
    pub redis: Option<CheckConfig>,
    pub memory: Option<MemoryCheck>,
}

impl DependenciesConfig {
    pub const DEFAULT_WARN_SHARE: f64 = 0.8;
}

/// `redis: { check: ... }`, as the file nests it.
fn redis_check<S: Serializer>(c: &Option<CheckConfig>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Redis<'a> {
        check: &'a CheckConfig,
    }
    c.as_ref().map(|check| Redis { check }).serialize(s)
}

/// When and how one check runs, and what its failure means.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckConfig {
    /// Between the starts of two probes (jittered by 10 %).
    #[serde(serialize_with = "super::serialize::duration")]
    pub interval: Duration,
    /// The interval while the check fails (or, for an upstream, while one of its breakers
    /// or ejections is open), never longer than `interval`. Default 1s, as Envoy's.
    #[serde(serialize_with = "super::serialize::duration")]
    pub unhealthy_interval: Duration,
    /// The interval between the probes that confirm a recovery (a pass while the check is
    /// down or, for an upstream, while a breaker or ejection is open), and after a refused
    /// connect while a breaker or ejection is open; never longer than `unhealthy_interval`.
    /// HAProxy's `fastinter`. Default 250ms.
    #[serde(serialize_with = "super::serialize::duration")]
    pub fast_interval: Duration,
    /// The whole probe, connecting included.
    #[serde(serialize_with = "super::serialize::duration")]
    pub timeout: Duration,
    /// A critical check that fails makes `/health` 503 and `/readyz` not ready.
    pub critical: bool,
    /// Consecutive failures that turn a healthy check unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive successes that turn an unhealthy check healthy.
    pub healthy_after: u32,
}

impl CheckConfig {
    pub const DEFAULT_DEPENDENCY_INTERVAL: Duration = Duration::from_secs(10);
    pub const DEFAULT_UPSTREAM_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Envoy's default `unhealthy_interval`: a failing check is re-run this often, so a
    /// recovery is seen within about a second.
    pub const DEFAULT_UNHEALTHY_INTERVAL: Duration = Duration::from_secs(1);
    /// HAProxy's `fastinter`: the probes that confirm a recovery come this soon after each
    /// other, so the two passes `healthy_after` asks for take about half a second.
    pub const DEFAULT_FAST_INTERVAL: Duration = Duration::from_millis(250);
}

/// `dependencies.postgres`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PostgresDependency {
    /// A libpq URL or key=value string: several hosts and `target_session_attrs` allowed.
    /// Holds the password: shown only through tokio-postgres' parser (`/admin/config`).
    #[serde(serialize_with = "super::secret::postgres_url")]
    pub url: Secret<String>,
    pub pool: PgPoolConfig,
    pub check: CheckConfig,
    /// Client connections over `max_connections` above which the check is degraded.
    /// Default 0.8.
    #[serde(serialize_with = "super::serialize::percent")]
    pub warn_connections_above: f64,
    /// With `sslmode=require` (or `verify-full`): PEM CA certificates trusted besides the
    /// system's store (`tls.ca_file`).
    #[serde(rename = "tls", serialize_with = "super::serialize::tls_ca_file")]
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// The health-check pool: sized for the checks, not for the app.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PgPoolConfig {
    /// Default 0: nothing is held open between checks beyond what the pool keeps idle.
    pub min_idle: u32,
    /// Default 4.
    pub max_size: u32,
    /// One connection attempt to one host (several hosts are tried in turn). Default 5s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub connect_timeout: Duration,
    /// Default 30s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub idle_timeout: Duration,
    /// Default 30m.
    #[serde(serialize_with = "super::serialize::duration")]
    pub max_lifetime: Duration,
}

impl Default for PgPoolConfig {
    fn default() -> Self {
        PgPoolConfig {
            min_idle: 0,
            max_size: 4,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_lifetime: Duration::from_secs(30 * 60),
        }
    }
}

/// `dependencies.memory`: resident memory against the cgroup limit (or the machine's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryCheck {
    pub check: CheckConfig,
    /// Share of the limit above which the check is degraded. Default 0.8.
    #[serde(serialize_with = "super::serialize::percent")]
    pub warn_above: f64,
}

/// `upstreams.<name>.health_check`: an active HTTP check of every endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamHealthCheck {
    /// Default /health.
    pub path: String,
    /// Default 5s, timeout 2s, unhealthy after 3, healthy after 2, not critical.
    pub check: CheckConfig,
}

impl UpstreamHealthCheck {
    pub const DEFAULT_PATH: &str = "/health";
}
