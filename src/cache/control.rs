#![allow(dead_code, unused)]
use std::time::Duration;
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RequestDirectives {
    pub no_store: bool,
    pub no_cache: bool,
    pub only_if_cached: bool,
}
pub(crate) fn request_directives(headers: &http::HeaderMap) -> RequestDirectives {
    RequestDirectives::default()
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StaleRule {
    Policy,
    Never,
    For(Duration),
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storable {
    No(&'static str),
    Yes {
        fresh_for: Duration,
        stale_if_error: StaleRule,
    },
}
pub(crate) fn storable(
    status: u16,
    headers: &http::HeaderMap,
    ttl: Duration,
    vary: &[String],
    now: std::time::SystemTime,
) -> Storable {
    Storable::Yes {
        fresh_for: ttl,
        stale_if_error: StaleRule::Policy,
    }
}
pub(crate) fn age_secs(headers: &http::HeaderMap) -> u64 {
    0
}
