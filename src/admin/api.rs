//! The admin API's read-only JSON documents and the status page that shows them:
//! `/admin/config`, `/admin/upstreams`, `/admin/alerts`, `/admin/status` (everything the
//! page draws, in one request), and `/` (the page itself).

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::admin::AdminCtx;
use crate::alert::signals;
use crate::config::Severity;
use crate::observe::series::{CHART_SPAN, Filter};
use crate::upstream::breaker::State as BreakerState;
use crate::upstream::groups::{GroupRuntime, group_health};

/// The page: self-contained (no CDN, works offline), refreshing from `/admin/status`.
pub(super) const STATUS_PAGE: &str = include_str!("status.html");

/// "Now" on the status page: the last minute.
const RECENT: Duration = Duration::from_secs(60);

pub(super) fn upstreams(shared: &AdminCtx) -> Value {
    let snapshot = shared.inputs.snapshot.load();
    let now = Instant::now();
    let wall = std::time::SystemTime::now();
    let mut names: Vec<&String> = snapshot.upstreams.keys().collect();
    names.sort();
    let list: Vec<Value> = names
        .into_iter()
        .filter_map(|n| snapshot.upstreams.get(n))
        .map(|u| {
            let endpoints: Vec<Value> = u
                .endpoints
                .iter()
                .map(|e| {
                    let ejected = !crate::sync::lock(&e.state.health).available(now);
                    json!({
                        "url": e.state.url,
                        "in_flight": e.state.in_flight.load(Ordering::Relaxed),
                        "ejected": ejected,
                        "health": signals::endpoint_health(&shared.inputs.health, &u.name, &e.state.url),
                    })
                })
                .collect();
            let breakers: Vec<Value> = u
                .state
                .breakers()
                .iter()
                .map(|b| {
                    let (state, since, _) = b.status(now);
                    let since = wall
                        .checked_sub(now.saturating_duration_since(since))
                        .unwrap_or(wall);
                    json!({
                        "route": b.route,
                        "state": state.as_str(),
                        "since": crate::alert::sinks::rfc3339(since),
                    })
                })
                .collect();
            json!({
                "name": u.name,
                // The worst of its breakers; each is in `breakers` (route null: shared).
                "breaker": u.state.breaker_state().as_str(),
                "breakers": breakers,
                "in_flight": u.state.in_flight.load(Ordering::Relaxed),
                "max_in_flight": u.resilience.max_in_flight,
                "endpoints": endpoints,
                // null for plain `endpoints` (one group).
                "groups": u.groups.as_deref().map(|g| groups(u, g)),
                "sticky": u.groups.as_deref().and_then(|g| g.sticky.as_ref()).map(ToString::to_string),
            })
        })
        .collect();
    json!({ "upstreams": list })
}

/// Each group of an upstream: its weight now, endpoints, health and figures since start.
fn groups(u: &crate::upstream::forward::Upstream, g: &GroupRuntime) -> Value {
    let weights = g.weights();
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let list: Vec<Value> = g
        .names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let urls: Vec<String> = u
                .endpoints
                .get(g.range(i))
                .unwrap_or_default()
                .iter()
                .map(|e| e.state.url.clone())
                .collect();
            let health = group_health(&u.state, &urls);
            let totals = g.totals(i);
            let weight = weights.get(i).copied().unwrap_or(0);
            json!({
                "name": name,
                "weight": weight,
                "share": if total == 0 { 0.0 } else { f64::from(weight) / total as f64 },
                "endpoints": urls,
                "health": {
                    "endpoints": health.endpoints,
                    "available": health.available,
                    "checks_passing": health.checks_passing,
                },
                "totals": {
                    "requests": totals.requests,
                    "errors": totals.errors,
                    "error_rate": totals.error_rate(),
                    "p95_ms": totals.p95().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                },
            })
        })
        .collect();
    Value::Array(list)
}

pub(super) fn alerts(shared: &AdminCtx) -> Value {
    shared.alerts.to_json()
}

pub(super) fn config(shared: &AdminCtx) -> Value {
    super::config_json::to_json(&shared.inputs.snapshot.load().config)
}

fn ms(v: Option<f64>) -> Option<f64> {
    v.map(|s| (s * 1000.0 * 10.0).round() / 10.0)
}

/// Everything the status page shows.
pub(super) fn status(shared: &AdminCtx) -> Value {
    let current = shared.inputs.sample();
    let series = crate::sync::lock(&shared.inputs.series);
    let mut ups = upstreams(shared);
    let mut any_open = Vec::new();
    let mut any_ejected = false;
    if let Some(list) = ups.get_mut("upstreams").and_then(Value::as_array_mut) {
        for u in list {
            let Some(name) = u.get("name").and_then(Value::as_str).map(str::to_owned) else {
                continue;
            };
            let filter = Filter {
                route: None,
                upstream: Some(name.clone()),
            };
            let t = series.over(&current, RECENT, &filter);
            let span = series.span(&current, RECENT);
            for b in u
                .get("breakers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|b| b["state"] != BreakerState::Closed.as_str())
            {
                let state = b["state"].as_str().unwrap_or_default().to_owned();
                match b["route"].as_str() {
                    Some(route) => any_open.push((format!("{name}/{route}"), state)),
                    None => any_open.push((name.clone(), state)),
                }
            }
            any_ejected |= u
                .get("endpoints")
                .and_then(Value::as_array)
                .is_some_and(|e| e.iter().any(|e| e["ejected"] == json!(true)));
            if let Value::Object(m) = u {
                m.insert("recent".into(), recent(&t, span));
                m.insert("chart".into(), chart(&series.chart(CHART_SPAN, &filter)));
            }
        }
    }
    let all = series.over(&current, RECENT, &Filter::default());
    let span = series.span(&current, RECENT);
    let overall_chart = chart(&series.chart(CHART_SPAN, &Filter::default()));
    drop(series);

    let deps = signals::dependencies(&shared.inputs.health);
    let dependencies = deps.as_ref().map(|deps| {
        deps.iter()
            .map(|d| {
                json!({
                    "name": d.name,
                    "state": d.state,
                    "critical": d.critical,
                    "detail": d.detail,
                    "latency_ms": d.latency_ms,
                })
            })
            .collect::<Vec<_>>()
    });
    let deps = deps.unwrap_or_default();
    let critical_down: Vec<&str> = deps
        .iter()
        .filter(|d| d.critical && d.state == "unhealthy")
        .map(|d| d.name.as_str())
        .collect();
    let degraded_deps: Vec<&str> = deps
        .iter()
        .filter(|d| (!d.critical && d.state == "unhealthy") || d.state == "degraded")
        .map(|d| d.name.as_str())
        .collect();
    let usage = json!({
        "memory": signals::memory_usage(&shared.inputs.health, &shared.inputs.signals),
        "pool": signals::pool_usage(&shared.inputs.health, &shared.inputs.signals),
    });

    let ratelimit = if shared.inputs.limiters.uses_redis() {
        if shared.inputs.limiters.fallback_active() {
            json!({ "source": "memory", "detail": "Redis unavailable: local fallback in use" })
        } else {
            json!({ "source": "redis", "detail": "shared limits in Redis" })
        }
    } else if shared.inputs.snapshot.load().config.rate_limits.is_empty() {
        json!({ "source": "none", "detail": "no rate limits configured" })
    } else {
        json!({ "source": "memory", "detail": "per-process limits (no Redis configured)" })
    };

    let firing = shared.alerts.firing();
    let draining = shared.draining.load(Ordering::Relaxed);
    let mut reasons = Vec::new();
    let mut level = 0; // 0 ok, 1 degraded, 2 critical
    if draining {
        reasons.push("draining: readiness is off".to_owned());
        level = level.max(1);
    }
    // As /health and /readyz see it: a breaker degrades; it takes readiness (critical)
    // only with `readiness.breaker_open: not_ready`.
    let not_ready = shared.inputs.snapshot.load().config.readiness.breaker_open
        == crate::config::BreakerReadiness::NotReady;
    for (n, state) in &any_open {
        if not_ready && state == BreakerState::Open.as_str() {
            reasons.push(format!("circuit breaker {n} is open: not ready"));
            level = 2;
        } else {
            reasons.push(format!("circuit breaker {n} is {state}"));
            level = level.max(1);
        }
    }
    for n in &critical_down {
        reasons.push(format!("critical dependency {n} is unhealthy"));
        level = 2;
    }
    for n in &degraded_deps {
        reasons.push(format!("dependency {n} is degraded or down"));
        level = level.max(1);
    }
    for a in &firing {
        reasons.push(format!("alert {} firing", a.rule));
        level = level.max(if a.severity == Severity::Critical {
            2
        } else {
            1
        });
    }
    if any_ejected {
        reasons.push("an endpoint is ejected".into());
        level = level.max(1);
    }
    if ratelimit["source"] == "memory" && shared.inputs.limiters.uses_redis() {
        reasons.push("rate limits on local fallback".into());
        level = level.max(1);
    }
    let overall = match (draining, level) {
        (true, l) if l < 2 => "draining",
        (_, 0) => "ok",
        (_, 1) => "degraded",
        _ => "critical",
    };

    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generated_at": crate::alert::sinks::rfc3339(current.wall),
        "overall": { "status": overall, "reasons": reasons },
        "traffic": { "recent": recent(&all, span), "chart": overall_chart },
        "dependencies": dependencies,
        "usage": usage,
        "upstreams": ups["upstreams"],
        "ratelimit": ratelimit,
        "alerts": {
            "firing": firing.iter().map(crate::alert::AlertEvent::to_json).collect::<Vec<_>>(),
        },
    })
}

/// `span`: the time the totals really cover (shorter than a minute just after start).
fn recent(t: &crate::observe::series::Totals, span: Duration) -> Value {
    let secs = span.as_secs_f64();
    json!({
        "window_s": RECENT.as_secs(),
        "requests": t.requests,
        "rate_per_s": if secs >= 1.0 { t.requests as f64 / secs } else { 0.0 },
        "error_rate": t.error_rate(),
        "p95_ms": ms(t.p95()),
    })
}

fn chart(points: &[crate::observe::series::ChartPoint]) -> Value {
    json!({
        "t": points.iter().map(|p| p.t_ms).collect::<Vec<_>>(),
        "rate": points.iter().map(|p| (p.rate_per_s * 100.0).round() / 100.0).collect::<Vec<_>>(),
        "error_rate": points.iter().map(|p| p.error_rate).collect::<Vec<_>>(),
        "p95_ms": points.iter().map(|p| ms(p.p95_s)).collect::<Vec<_>>(),
    })
}
