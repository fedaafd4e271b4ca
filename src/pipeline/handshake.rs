//! The upgrade step: a WebSocket handshake the route allows, on an upstream connection of
//! its own, then the tunnel.

use super::*;

/// The handshake of an upgrade the route allows, on a connection of its own: a 101 that
/// switches to a protocol the request offered becomes a tunnel (`stream::upgrade`), a 101 to
/// anything else a 502, any other answer an ordinary one. Fed to endpoint health and the
/// breaker as any attempt; never retried.
pub(super) async fn upgrade(
    env: &Env<'_>,
    route: &Route,
    mut parts: http::request::Parts,
    body: RequestBody,
    client_upgrade: ClientUpgrade,
    (timers, group): (forward::Timers, Option<usize>),
    tail: &mut Tail,
) -> Result<Response<ProxyBody>, ProxyError> {
    let upstream = &*route.upstream;
    let cfg = &upstream.resilience;
    let picked = match group {
        None => upstream.pick(0),
        Some(g) => upstream.pick_in_group(g, 0),
    };
    let idx = picked.ok_or_else(|| no_endpoints(upstream))?;
    let endpoint = &upstream.endpoints[idx];
    parts
        .headers
        .insert(header::HOST, endpoint.pool.host_header.clone());
    let request = Request::from_parts(parts, body);
    let resp = match forward::send_upgrade(&upstream.name, endpoint, request, &timers).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(failure) = e.failure {
                if let Some(kind) = error_kind(failure) {
                    upstream.errors.inc(kind);
                }
                upstream.state.endpoint_result(&endpoint.state, false, cfg);
                if let Some(t) = tail.ticket.as_mut() {
                    t.report(Outcome::Failure);
                }
            }
            return Err(e.error);
        }
    };
    if let Some(r) = tail.log.as_mut() {
        r.ttfb = Some(crate::clock::now().saturating_duration_since(env.start));
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let switched = headers::switches_to_offered(resp.headers(), &client_upgrade.offered);
        upstream
            .state
            .endpoint_result(&endpoint.state, switched, cfg);
        if let Some(t) = tail.ticket.as_mut() {
            t.report(if switched {
                Outcome::Success
            } else {
                Outcome::Failure
            });
        }
        if !switched {
            // Dropped unswitched: hyper closes the upstream connection.
            drop(resp);
            return Err(ProxyError::UpstreamUnavailable {
                upstream: upstream.name.clone(),
                detail: "101 switching to a protocol the request did not offer".into(),
            });
        }
        // The tunnel writes the access-log line when it closes, hours later maybe: it keeps
        // nothing of the request head's buffer (`AccessRecord::detach`).
        let log = tail.log.take().map(|mut r| {
            r.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
            r.detach();
            r
        });
        let t = upgrade::Tunnel {
            idle: route.timeouts.idle,
            log,
            metrics: route.metrics.clone(),
            request_id: detached(env.request_id),
            in_flight: env.ctx.traffic.in_flight.request(),
            rate_limit_hold: std::mem::take(&mut tail.rate_limit_hold),
        };
        return Ok(upgrade::tunnel(resp, client_upgrade, t));
    }
    // The upstream declined the upgrade: an ordinary answer, judged as the retry loop
    // judges one (the body's end reports anything else to the breaker).
    let status = resp.status().as_u16();
    let failed = matches!(status, 502..=504) || (status == 500 && cfg.circuit_breaker.count_500);
    let backoff_signal =
        matches!(status, 429 | 503) && resp.headers().contains_key(header::RETRY_AFTER);
    upstream
        .state
        .endpoint_result(&endpoint.state, !failed, cfg);
    if let Some(t) = tail.ticket.as_mut() {
        if backoff_signal && !cfg.circuit_breaker.count_backoff {
            t.report(Outcome::Ignored);
        } else if failed {
            t.report(Outcome::Failure);
        }
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    let body = TimedBody::new(body, route.timeouts.idle, timers.deadline, None);
    Ok(Response::from_parts(parts, ProxyBody::direct(body)))
}
