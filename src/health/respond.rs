//! The probe endpoints: `/health`, `/admin/health`, `/readyz`, and a traffic listener's
//! `health_path`, all from the cached results (a request never runs a probe).

use tokio::time::Instant;

use super::{Health, Status, aggregate};

/// `/health`: the cached aggregate as JSON; 200 unless a critical check is unhealthy.
/// Public: no error text and no address (see [`aggregate::Audience`]).
pub(crate) fn health_response(h: &Health) -> (http::StatusCode, String) {
    render_health(h, aggregate::Audience::Public)
}

/// `/admin/health`: the same, with each check's error and every detail.
pub(crate) fn health_detail_response(h: &Health) -> (http::StatusCode, String) {
    render_health(h, aggregate::Audience::Operator)
}

fn render_health(h: &Health, audience: aggregate::Audience) -> (http::StatusCode, String) {
    let draining = h.inputs.draining.load(std::sync::atomic::Ordering::Relaxed);
    let breakers = breakers_not_closed(h);
    let (summary, body) =
        aggregate::render_with(&h.checks(), &breakers, h.uptime(), draining, audience);
    h.metrics.overall.set(summary.status.as_gauge());
    let code = if summary.status == Status::Unhealthy {
        http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        http::StatusCode::OK
    };
    (code, body)
}

/// Every breaker of the current configuration that is not CLOSED, by upstream and route.
pub(crate) fn breakers_not_closed(h: &Health) -> Vec<aggregate::BreakerReport> {
    let snapshot = h.inputs.snapshot.load();
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let mut names: Vec<&String> = snapshot.upstreams.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|n| snapshot.upstreams.get(n))
        .flat_map(|u| u.state.breakers())
        .filter_map(|b| {
            let (state, since, _) = b.status(now);
            (state != crate::upstream::breaker::State::Closed).then(|| aggregate::BreakerReport {
                upstream: b.upstream.clone(),
                route: b.route.clone(),
                state,
                since: wall
                    .checked_sub(now.saturating_duration_since(since))
                    .unwrap_or(wall),
            })
        })
        .collect()
}

/// The breakers that fail requests fast right now ("backend/chat"), for readiness. An
/// OPEN breaker whose `open_for` is over, and a HALF_OPEN one, do not count: they need
/// traffic to close, which a replica out of the Service would never get.
pub(crate) fn blocking_breakers(h: &Health) -> Vec<String> {
    let snapshot = h.inputs.snapshot.load();
    let now = Instant::now();
    let mut list: Vec<String> = snapshot
        .upstreams
        .values()
        .flat_map(|u| u.state.breakers())
        .filter(|b| b.status(now).2)
        .map(|b| b.display_name())
        .collect();
    list.sort();
    list
}

/// `/readyz`: ready when not draining and no critical check is unhealthy (and, with
/// `readiness.breaker_open: not_ready`, no breaker open). The body names what is wrong.
pub(crate) fn ready_response(h: &Health) -> (http::StatusCode, String) {
    if h.inputs.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    let summary = aggregate::summarize(&h.checks());
    let mut reasons = Vec::new();
    if !summary.ready() {
        reasons.push(format!("{} unhealthy", summary.failing_critical.join(", ")));
    }
    let breaker_open = h.inputs.snapshot.load().config.readiness.breaker_open;
    if breaker_open == crate::config::BreakerReadiness::NotReady {
        reasons.extend(
            blocking_breakers(h)
                .into_iter()
                .map(|b| format!("circuit breaker {b} open")),
        );
    }
    if reasons.is_empty() {
        (http::StatusCode::OK, "ready\n".into())
    } else {
        (
            http::StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join(", ")),
        )
    }
}

/// `health_path` on a traffic listener: the `/health` JSON, and 503 while draining as well,
/// since a load balancer that only sees this port has no `/readyz` to stop on.
pub(crate) fn listener_health_response(
    h: &Health,
) -> http::Response<crate::stream::body::ProxyBody> {
    let (mut code, body) = health_response(h);
    if h.inputs.draining.load(std::sync::atomic::Ordering::Relaxed) {
        code = http::StatusCode::SERVICE_UNAVAILABLE;
    }
    let mut resp = http::Response::new(crate::stream::body::ProxyBody::full(bytes::Bytes::from(
        body,
    )));
    *resp.status_mut() = code;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}
