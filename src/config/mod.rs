//! `proxy.yaml`: the typed configuration every other module reads.
//!
//! The file is parsed in exactly one place (`raw.rs`, into a tree whose every node knows its
//! line and column); `env.rs` interpolates `${VAR}` inside scalar values; `validate/` turns
//! the tree into the types below, collecting EVERY problem with its `file:line:column` and
//! key path before refusing the file. Nothing here touches the network.

mod admin;
mod alerts;
mod cache;
mod dependencies;
mod env;
mod limits;
mod listener;
mod raw;
mod release;
mod secret;
mod serialize;
mod summary;
mod upstream;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Serialize;

pub use admin::{
    AdminConfig, BreakerReadiness, Cidr, DrainConfig, LogFormat, LoggingConfig, ReadinessConfig,
};
pub use alerts::{
    AlertRule, AlertsConfig, Comparison, Severity, Signal, SignalUnit, SinkConfig, SinkKind,
};
pub use cache::{CacheConfig, CacheStore};
pub use dependencies::{
    CheckConfig, DependenciesConfig, MemoryCheck, PgPoolConfig, PostgresDependency,
    UpstreamHealthCheck,
};
pub use limits::{
    KeySource, RateLimitConfig, RateLimitCost, RateLimitKey, RateLimitStore, RedisConfig,
    RedisTarget,
};
pub use listener::{
    DrainMode, EscapedSlashes, Http1Server, Http2Config, ListenerConfig, ListenerTls,
    NormalizePath, PathConfig, RouteConfig, RouteTimeouts, StreamConfig, TlsPair, TokenCounting,
};
pub use release::{ReleaseConfig, ReleaseGate};
pub use secret::{REDACTED, Secret, redis_url_shown, sink_url_shown};
pub use upstream::{
    BreakerConfig, BreakerScope, EjectionConfig, EndpointGroup, FailureRate, LoadBalancing,
    PoolConfig, Resilience, RetryConfig, RetryOn, Sticky, UpstreamClient, UpstreamConfig,
    UpstreamTls,
};
pub(crate) use upstream::{IdentityError, load_client_identity};
pub(crate) use validate::is_loopback;
pub use validate::postgres_url_for_driver;
pub(crate) use validate::release_from_json;
pub use validate::{parse_str, parse_str_checked};

/// The whole validated configuration: an immutable snapshot. Serialized, it is
/// `/admin/config` (`admin/config_json.rs`): each type below says how it is written.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// Response-cache policies by name (`caches:`); routes refer to them.
    pub caches: BTreeMap<String, CacheConfig>,
    pub drain: DrainConfig,
    /// What rampart depends on and checks in the background (`dependencies:`), see
    /// `health/`. Upstream checks live on each upstream (`health_check:`).
    pub dependencies: DependenciesConfig,
    /// Alert rules and where their notifications go (`alerts:`); the defaults when absent.
    pub alerts: AlertsConfig,
    /// What, besides critical checks and the drain, takes `/readyz` down (`readiness:`).
    pub readiness: ReadinessConfig,
    /// Releases the configuration starts (`releases:`), in the order written.
    pub releases: Vec<ReleaseConfig>,
    /// Where release state is kept across restarts (`releases_state:`); None: not kept
    /// (Redis still is, when configured).
    #[serde(serialize_with = "serialize::path")]
    pub releases_state: Option<std::path::PathBuf>,
}

impl Config {
    pub const DEFAULT_REPLICAS: u32 = 1;
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
}
