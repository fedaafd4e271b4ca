//! `caches:`: named HTTP response-cache policies; a route opts in with `cache: NAME`
//! (`src/cache/`). Defaults live here, beside the types.

use std::time::Duration;

use serde::Serialize;

/// One policy under `caches:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheConfig {
    /// How long an answer stays fresh when the upstream's own headers say nothing
    /// (`s-maxage`, `max-age`, `Expires` win when present). Default 1h (the users'
    /// cache service, seed 3.1).
    #[serde(serialize_with = "super::serialize::duration")]
    pub ttl: Duration,
    /// Answers with a larger body are passed on and not stored. Default 1 MiB.
    pub max_entry_size: u64,
    /// How long past its freshness an entry may still answer when the upstream fails,
    /// times out or its breaker is open (`X-Cache: STALE`). Default 10m; None = off.
    #[serde(serialize_with = "super::serialize::duration_or_off")]
    pub stale_if_error: Option<Duration>,
    /// Default: `redis` when the file has a `redis:` section, `memory` otherwise.
    pub store: CacheStore,
    /// Request headers that split entries (lowercased names). A request with
    /// `Authorization` is cached only when `authorization` is listed; an answer that
    /// varies on a header not listed is not stored.
    pub vary: Vec<String>,
    /// The memory tier's bound in bytes (LRU beyond it), per replica. Default 64 MiB; at
    /// least `max_entry_size`.
    pub memory_max: u64,
    /// How long concurrent misses for one key wait for the request that went upstream
    /// before going themselves (nginx's `proxy_cache_lock_timeout`). Default 5s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub lock_timeout: Duration,
}

impl CacheConfig {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
    pub const DEFAULT_MAX_ENTRY_SIZE: u64 = 1024 * 1024;
    pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(600);
    pub const DEFAULT_MEMORY_MAX: u64 = 64 * 1024 * 1024;
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

    /// The defaults, for a store.
    pub fn with_store(store: CacheStore) -> CacheConfig {
        CacheConfig {
            ttl: Self::DEFAULT_TTL,
            max_entry_size: Self::DEFAULT_MAX_ENTRY_SIZE,
            stale_if_error: Some(Self::DEFAULT_STALE_IF_ERROR),
            store,
            vary: Vec::new(),
            memory_max: Self::DEFAULT_MEMORY_MAX,
            lock_timeout: Self::DEFAULT_LOCK_TIMEOUT,
        }
    }
}

/// Where a policy's entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheStore {
    /// Shared by the replicas through Redis, with the memory tier in front (written on
    /// every store, answering alone while Redis fails).
    Redis,
    /// This replica's memory only.
    Memory,
}
