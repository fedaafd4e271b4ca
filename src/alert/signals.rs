//! Signals the request counters do not give, for the alert rules and the status page.
//!
//! - Counted here: database queries and their failures (each Postgres health probe is one;
//!   code that runs queries of its own adds to them), cache hits and misses (the cache, when
//!   it exists). Windowed like the request counters (the time series samples them).
//! - Read from the health checks' cached results (`alert::signals`): memory use against its
//!   limit, Postgres connections against `max_connections`, each dependency's state.
//! - Fed by hand (`set_pool_usage`, `set_memory_usage`): for sources without a health check;
//!   a health check's value wins when both exist.
//!
//! Until something feeds a signal it is "no data": its rules stay quiet, the page says so.

use crate::health::{Health, Status, Value};
pub(crate) use crate::observe::signals::Signals;
use crate::observe::signals::share;

/// A percentage a health check reports in its details (`used_pct`), as a share.
fn check_share(health: &Health, check: &str, key: &str) -> Option<f64> {
    let checks = health.checks();
    let c = checks.iter().find(|c| c.name == check)?;
    let (_, slot) = c.slots.first()?;
    let view = slot.load();
    // No probe answered yet: no data, not 0 %.
    view.checked_at?;
    view.details.iter().find_map(|(k, v)| match v {
        Value::Num(n) if *k == key => share(Some(n / 100.0)),
        Value::Int(n) if *k == key => share(Some(*n as f64 / 100.0)),
        _ => None,
    })
}

/// Postgres client connections over `max_connections`, else what was fed.
pub(crate) fn pool_usage(health: &Health, signals: &Signals) -> Option<f64> {
    check_share(health, "postgres", "connections_used_pct").or_else(|| signals.fed_pool_usage())
}

/// Resident memory over its limit, else what was fed.
pub(crate) fn memory_usage(health: &Health, signals: &Signals) -> Option<f64> {
    check_share(health, "memory", "used_pct").or_else(|| signals.fed_memory_usage())
}

/// A dependency as the status page shows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dependency {
    pub name: String,
    /// healthy, degraded, unhealthy, or unknown (not checked yet).
    pub state: &'static str,
    pub critical: bool,
    /// The last error or warning.
    pub detail: String,
    pub latency_ms: Option<f64>,
}

/// The dependency checks (not the upstream ones, shown with their upstream); None when
/// none is configured.
pub(crate) fn dependencies(health: &Health) -> Option<Vec<Dependency>> {
    let checks = health.checks();
    let deps: Vec<Dependency> = checks
        .iter()
        .filter(|c| !c.name.starts_with("upstream:"))
        .map(|c| {
            let view = c.slots.first().map(|(_, s)| s.load_full());
            let checked = view.as_ref().is_some_and(|v| v.checked_at.is_some());
            Dependency {
                name: c.name.clone(),
                state: if checked {
                    c.status().as_str()
                } else {
                    "unknown"
                },
                critical: c.critical,
                detail: view
                    .as_ref()
                    .and_then(|v| v.error.clone())
                    .unwrap_or_default(),
                latency_ms: view
                    .and_then(|v| v.latency)
                    .map(|l| (l.as_secs_f64() * 10_000.0).round() / 10.0),
            }
        })
        .collect();
    (!deps.is_empty()).then_some(deps)
}

/// An upstream endpoint's active health ("no data" without a `health_check`).
pub(crate) fn endpoint_health(health: &Health, upstream: &str, url: &str) -> &'static str {
    let checks = health.checks();
    let name = format!("upstream:{upstream}");
    let Some(c) = checks.iter().find(|c| c.name == name) else {
        return "no data";
    };
    match c.slots.iter().find(|(k, _)| k == url) {
        Some((_, s)) => {
            let v = s.load();
            match (v.checked_at, v.status) {
                (None, _) => "unknown",
                (Some(_), Status::Healthy) => "healthy",
                (Some(_), Status::Degraded) => "degraded",
                (Some(_), Status::Unhealthy) => "unhealthy",
            }
        }
        None => "no data",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fed_values_are_clean_shares_and_counts_add_up() {
        let s = Signals::default();
        assert_eq!((s.fed_pool_usage(), s.fed_memory_usage()), (None, None));
        s.set_pool_usage(Some(f64::NAN));
        assert_eq!(s.fed_pool_usage(), None);
        s.set_memory_usage(Some(1.7));
        assert_eq!(s.fed_memory_usage(), Some(1.0));
        s.db_query(true);
        s.db_query(false);
        s.cache_lookup(true);
        let t = s.totals();
        assert_eq!(
            (t.db_queries, t.db_errors, t.cache_hits, t.cache_misses),
            (2, 1, 1, 0)
        );
    }
}
