//! The steps a request walks, outermost first (architecture.md, "A request"):
//! observe -> admission (draining, listener shedding) -> route -> rate limit -> cache ->
//! upstream shedding -> circuit breaker -> body limit -> retry loop (pick endpoint, send,
//! classify) -> stream back (and the cache's way back: stale answers, storing). Each step is
//! a call into its own module; this file only orders them.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body::Body;
use http_body_util::BodyExt;

use tokio::time::Instant;

use crate::admission::ratelimit;
use crate::body::{BodyError, ClientBody, MinRate, RequestBody, TimedBody};
use crate::error::ProxyError;
use crate::health::Health;
use crate::observe::access_log::{AccessRecord, Outcome as LogOutcome, detached};
use crate::observe::http::HttpMetrics;
use crate::observe::http::method_index;
use crate::redis::Budget;
use crate::route;
use crate::route::Route;
use crate::route::client_ip::client_ip;
use crate::route::headers::{self, X_REQUEST_ID};
use crate::route::{ListenerRoutes, Snapshot};
use crate::shutdown::ConnClosing;
use crate::stream::body::ProxyBody;
use crate::stream::events::{BodyTimers, EventStream, is_event_stream};
use crate::stream::tail::{Observed, Tail};
use crate::stream::upgrade::{self, ClientUpgrade};
use crate::stream::usage::UsageMeter;
use crate::upstream::attempts::{Attempts, Resend, error_kind, no_endpoints};
use crate::upstream::breaker::{Admit, Outcome};
use crate::upstream::forward::{self, Upstream};
use crate::upstream::resilience::UpstreamStates;
use crate::upstream::resilience::{BreakerTicket, InFlight, UpstreamMetrics};
use crate::upstream::retry::{self};
use arc_swap::ArcSwap;

mod cache;
mod handshake;
use handshake::upgrade;

/// What the request path reads and writes of the process-wide state: a narrow handle `app`
/// builds, so nothing below `app` sees the rest of it.
#[derive(Debug)]
pub struct Traffic {
    /// The routing table of the current configuration; a reload swaps it.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Breakers, retry budgets, endpoint health (and their metrics), kept across reloads.
    pub upstream_states: Arc<UpstreamStates>,
    /// Requests and SSE streams in flight, process-wide, for the drain.
    pub in_flight: Arc<crate::shutdown::InFlight>,
    pub http: HttpMetrics,
    /// For a listener's `health_path`.
    pub health: Arc<Health>,
}

/// What a connection's service needs: which listener it belongs to, and the traffic state.
#[derive(Clone)]
pub(crate) struct ListenerCtx {
    pub name: Arc<str>,
    pub traffic: Arc<Traffic>,
    /// "http" or "https", for X-Forwarded-Proto.
    pub proto: &'static str,
    /// Requests in flight on this listener (load shedding, drain).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// The service hyper calls for every request on a traffic listener. Never fails: every
/// error becomes a JSON answer through `ProxyError::to_response`. `refused` is what the
/// connection's HTTP/1 guard saw in the raw head and hyper does not show in `req`
/// (listener::h1_guard): both Content-Length and Transfer-Encoding, a head over the limit.
///
/// Every step that needs no waiting runs synchronously in `begin`; the common request then
/// awaits only the upstream exchange. The steps that may wait (rate limits, body
/// buffering, upgrades) run in `slow`, boxed, so their large futures are not part of every
/// request's future (which is moved as a whole several times per request).
///
/// Not an `async fn`: that would keep its arguments twice in its state (as arguments, then
/// as the body's locals), ~370 bytes more in every request's future.
#[allow(clippy::manual_async_fn)]
pub(crate) fn handle(
    ctx: Arc<ListenerCtx>,
    peer: SocketAddr,
    req: Request<ClientBody>,
    refused: Option<ProxyError>,
) -> impl Future<Output = Response<ProxyBody>> + std::marker::Send + use<> {
    async move {
        let start = crate::clock::now();
        let (head, request_id) = headers::Head::scan(req.headers());
        let snapshot = ctx.traffic.snapshot.load_full();
        let mut tail = Box::<Tail>::default();
        // Boxed, and only when logging: with the log off nothing of the record is written
        // (an `Option` assigned whole was copied at its full size, None or not).
        if snapshot.access_log {
            let client = client_ip(peer.ip(), req.headers(), &snapshot.trusted_proxies);
            tail.log = Some(Box::new(AccessRecord::begin(
                start,
                ctx.name.clone(),
                &req,
                client,
                request_id.clone(),
            )));
        }
        let listener = snapshot.listeners.get(&*ctx.name);
        let method = method_index(req.method());

        let result = if let Some(e) = refused {
            Err(e)
        } else {
            let env = Env {
                ctx: &ctx,
                snapshot: &snapshot,
                peer,
                request_id: &request_id,
                head: &head,
                start,
            };
            match begin(&env, listener, req, &mut tail) {
                // `ref mut`: the attempts stay where `begin` put them, in the match's own
                // value (which lives across the await anyway); moved out, they took 700 more
                // bytes of this future, which is copied whole for every request.
                Ok(Step::Send(ref mut attempts, route)) => {
                    send(&env, attempts, route, &mut tail).await
                }
                Ok(step) => {
                    // Behind a vtable as well as boxed: its code stays out of the poll function
                    // every request runs (the compiler would otherwise inline it there).
                    let slow: Pin<Box<dyn Future<Output = _> + std::marker::Send + '_>> =
                        Box::pin(slow(&env, step, &mut tail));
                    slow.await
                }
                Err(e) => Err(e),
            }
        };
        let result = cache::finish(result, &mut tail);
        let mut resp = match result {
            Ok(resp) => resp,
            Err(err) => {
                // Failures were reported where they happened; anything else says nothing about
                // the upstream.
                if let Some(t) = tail.ticket.as_mut() {
                    t.report(Outcome::Ignored);
                }
                if let Some(r) = tail.log.as_mut() {
                    r.outcome = LogOutcome::Local(err.code());
                }
                err.to_response(request_id.to_str().unwrap_or("-"))
            }
        };
        cache::mark(&mut resp, &mut tail);
        resp.headers_mut().insert(&X_REQUEST_ID, request_id);
        // The rate-limit fields stay in the tail: `listener::service` decides where the server
        // takes them from.
        if let Some(r) = tail.log.as_mut() {
            r.status = resp.status().as_u16();
        }
        if tail.obs.is_none() {
            // No route took it: counted on the listener (set here, not up front, to keep the
            // routed path to one handle).
            tail.obs = listener.map(|l| Observed::new(start, l.unrouted.clone(), method));
        }
        if let Some(o) = tail.obs.as_mut() {
            o.status = resp.status().as_u16();
            if crate::stream::finale::is_event_stream(&resp) {
                o.stream = true;
                o.route
                    .stream_started(crate::clock::now().saturating_duration_since(start));
            }
        }
        resp.body_mut().set_tail(tail);
        resp
    }
}

/// What every step of one request reads.
struct Env<'a> {
    ctx: &'a ListenerCtx,
    snapshot: &'a Snapshot,
    peer: SocketAddr,
    request_id: &'a HeaderValue,
    /// What the client's headers hold, found in one pass before anything changed them.
    head: &'a headers::Head,
    start: Instant,
}

/// Where a request stands when the next step has to wait. `Send`, the common one, is the
/// largest: boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Step<'a> {
    /// The route has rate-limit policies to ask (in memory or in Redis).
    RateLimit {
        route: &'a Route,
        declared_len: Option<u64>,
        req: Request<ClientBody>,
    },
    /// The cache must ask Redis, or wait for another request's fetch of the key.
    Cache {
        route: &'a Route,
        declared_len: Option<u64>,
        req: Request<ClientBody>,
        pending: crate::cache::Pending,
    },
    /// Answered without the upstream (a cache hit).
    Answer(Response<ProxyBody>),
    /// The body is read whole before anything is sent (chunked, or kept for a retry).
    Buffer {
        route: &'a Route,
        parts: http::request::Parts,
        body: ClientBody,
        client_upgrade: Option<Box<ClientUpgrade>>,
    },
    /// A WebSocket handshake, on a connection of its own.
    Upgrade {
        route: &'a Route,
        parts: http::request::Parts,
        body: RequestBody,
        client_upgrade: Box<ClientUpgrade>,
        timers: forward::Timers,
        /// The endpoint group (`groups:`), chosen as for any request.
        group: Option<usize>,
    },
    /// Ready for the retry loop: the hot path.
    Send(Attempts<'a>, &'a Route),
}

/// Admission (draining, listener shedding), framing, route; then on through `after_route`
/// unless the route's rate limits must be asked first.
fn begin<'a>(
    env: &Env<'a>,
    listener: Option<&'a ListenerRoutes>,
    mut req: Request<ClientBody>,
    tail: &mut Tail,
) -> Result<Step<'a>, ProxyError> {
    let ctx = env.ctx;
    let metrics = &ctx.traffic.upstream_states.metrics;

    // Admission: a request that still arrives on a connection told to close (drain), then
    // the listener's in-flight cap (shed at once, never queue).
    if req.extensions().get::<ConnClosing>().is_some() {
        return Err(ProxyError::ShuttingDown);
    }
    let max_in_flight = listener.and_then(|l| l.max_in_flight);
    tail.listener_slot = Some(
        InFlight::try_acquire(ctx.in_flight.clone(), max_in_flight).ok_or_else(|| {
            shed(metrics, "listener", &ctx.name);
            ProxyError::Overloaded
        })?,
    );
    let declared_len = env
        .head
        .check_framing(req.headers())
        .map_err(ProxyError::BadRequest)?;
    // Host, authority, transfer codings, CONNECT.
    env.head.check(&req)?;

    // Route, on the path in the listener's normal form: no spelling of a path reaches
    // another route (and its limits) than the path itself.
    let routes = listener.map(|l| l.routes.as_slice()).unwrap_or_default();
    let paths = listener.map(|l| l.path).unwrap_or_default();
    let route = {
        let path = route::match_path(req.uri().path(), &paths)
            .map_err(|e| ProxyError::BadRequest(e.message()))?;
        route::find(routes, &req, &path).ok_or(ProxyError::NoRoute)?
    };
    if let Some(forward) = route::forward_path(req.uri().path(), &paths) {
        let forward = forward.map_err(|e| ProxyError::BadRequest(e.message()))?;
        if let Cow::Owned(path) = forward {
            let uri = with_path(req.uri(), &path)
                .ok_or(ProxyError::BadRequest("invalid request target"))?;
            *req.uri_mut() = uri;
        }
    }
    let upstream = &route.upstream;
    let mut obs = Observed::new(env.start, route.metrics.clone(), method_index(req.method()));
    obs.bytes_in = declared_len.unwrap_or(0);
    tail.obs = Some(obs);
    if let Some(r) = tail.log.as_mut() {
        r.route = Some(route.name.clone());
        r.upstream = Some(Arc::from(upstream.name.as_str()));
        r.bytes_in = declared_len.unwrap_or(0);
    }

    // Rate limit: before the body is read, so a refused client costs no body bytes. A
    // route without policies has nothing to ask; policies in memory answer at once; Redis
    // is asked in the wait step.
    if !route.rate_limits.is_empty() {
        // The access log found the client already (behind trusted proxies, a walk of
        // X-Forwarded-For and an allocation): not twice.
        let logged = tail.log.as_ref().map(|r| r.client);
        let verdict = ratelimit::check_now(&route.rate_limits, &route.name, req.headers(), || {
            logged.unwrap_or_else(|| {
                client_ip(env.peer.ip(), req.headers(), &env.snapshot.trusted_proxies)
            })
        });
        match verdict {
            Some(verdict) => apply_verdict(verdict, &req, tail)?,
            None => {
                return Ok(Step::RateLimit {
                    route,
                    declared_len,
                    req,
                });
            }
        }
    }
    after_rate_limit(env, route, declared_len, req, tail)
}

/// `uri` with its path replaced by `path` (already a valid path), query kept.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let mut parts = uri.clone().into_parts();
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// The rate-limit step (a route with policies).
async fn rate_limit(
    env: &Env<'_>,
    route: &Route,
    req: &Request<ClientBody>,
    tail: &mut Tail,
    budget: &mut Budget,
) -> Result<(), ProxyError> {
    let logged = tail.log.as_ref().map(|r| r.client);
    let client = || {
        logged.unwrap_or_else(|| {
            client_ip(env.peer.ip(), req.headers(), &env.snapshot.trusted_proxies)
        })
    };
    let verdict = ratelimit::check(
        &route.rate_limits,
        &route.name,
        req.headers(),
        client,
        budget,
    )
    .await;
    apply_verdict(verdict, req, tail)
}

/// The verdict's headers and log field kept for the response; a refusal becomes the 429.
fn apply_verdict(
    verdict: ratelimit::Verdict,
    req: &Request<ClientBody>,
    tail: &mut Tail,
) -> Result<(), ProxyError> {
    tail.rate_limit_headers = verdict.headers;
    if let Some(r) = tail.log.as_mut() {
        r.ratelimit = verdict.source;
    }
    if let Some(retry_after_secs) = verdict.retry_after_secs {
        // An unread body would otherwise be parsed as the next request.
        if !req.body().is_end_stream()
            && let Some(h) = tail.rate_limit_headers.as_mut()
        {
            h.close_connection();
        }
        return Err(ProxyError::TooManyRequests { retry_after_secs });
    }
    tail.rate_limit_hold = verdict.hold;
    Ok(())
}

/// Upstream shedding, the breaker, the body limit; then the body: sent as it comes, or
/// read whole first (`Step::Buffer`). Inlined, as is `outgoing`: the `Step` is then built
/// in place rather than copied at each return.
#[inline(always)]
fn after_rate_limit<'a>(
    env: &Env<'a>,
    route: &'a Route,
    declared_len: Option<u64>,
    mut req: Request<ClientBody>,
    tail: &mut Tail,
) -> Result<Step<'a>, ProxyError> {
    // The cache (GET and HEAD on a route with a policy), once.
    if let Some(policy) = &route.cache
        && tail.cache.is_none()
    {
        match cache::begin(&env.ctx.name, route, policy, &req, tail) {
            cache::Now::Go => {}
            cache::Now::Answer(resp) => return Ok(Step::Answer(*resp)),
            cache::Now::Ask(pending) => {
                return Ok(Step::Cache {
                    route,
                    declared_len,
                    req,
                    pending,
                });
            }
        }
    }
    if tail.cache.is_some() {
        cache::for_upstream(&mut req, tail);
    }
    let metrics = &env.ctx.traffic.upstream_states.metrics;
    let upstream = &route.upstream;

    // The upstream's in-flight cap, then its breaker: both answer without the network.
    tail.upstream_slot = Some(upstream_slot(metrics, upstream)?);
    tail.ticket = Some(admit(route)?);

    // Body limit, before the upstream sees a byte.
    let limit = route.max_body_bytes;
    if declared_len.is_some_and(|n| n > limit) {
        return Err(ProxyError::PayloadTooLarge { limit });
    }
    let deadline = route.timeouts.total.map(|t| env.start + t);
    // Only an upgrade the route allows goes on as one (never h2c); any other is stripped
    // below with the hop-by-hop headers, and the request served plainly.
    let client_upgrade = if env.head.has_upgrade() {
        upgrade::offer(&mut req, &route.upgrades)
    } else {
        None
    };

    let (parts, body) = req.into_parts();
    let retry_cfg = &upstream.resilience.retry;
    let (body, replay) = if body.is_end_stream() {
        (RequestBody::Empty, Some(Bytes::new()))
    } else if declared_len.is_some_and(|n| !keep_for_retry(retry_cfg, n)) {
        (
            RequestBody::Stream(Box::new(request_body(body, route, deadline))),
            None,
        )
    } else {
        // Chunked (or HTTP/2 without a length): read it up to the limit first, as nginx does
        // by default, so an oversized body is refused before the upstream sees any of it.
        return Ok(Step::Buffer {
            route,
            parts,
            body,
            client_upgrade,
        });
    };
    Ok(outgoing(env, route, parts, body, replay, client_upgrade))
}

/// A slot under the upstream's `max_in_flight`, or 503 OVERLOADED (counted as shed).
fn upstream_slot(metrics: &UpstreamMetrics, upstream: &Upstream) -> Result<InFlight, ProxyError> {
    InFlight::try_acquire(upstream.state.clone(), upstream.resilience.max_in_flight).ok_or_else(
        || {
            shed(metrics, "upstream", &upstream.name);
            ProxyError::Overloaded
        },
    )
}

/// The admission of the route's breaker, or 503 CIRCUIT_OPEN.
fn admit(route: &Route) -> Result<BreakerTicket, ProxyError> {
    match route.breaker.admit() {
        Admit::Rejected { retry_after } => Err(ProxyError::CircuitOpen {
            upstream: route.upstream.name.clone(),
            retry_after,
        }),
        Admit::Allowed { probe } => Ok(BreakerTicket::new(route.breaker.clone(), probe)),
    }
}

/// A body small enough is kept so that a retry can send it again.
fn keep_for_retry(cfg: &crate::config::RetryConfig, n: u64) -> bool {
    cfg.attempts > 1 && n <= cfg.max_body
}

/// The headers for the upstream, then the upgrade or the retry loop.
#[inline(always)]
fn outgoing<'a>(
    env: &Env<'a>,
    route: &'a Route,
    mut parts: http::request::Parts,
    body: RequestBody,
    replay: Option<Bytes>,
    client_upgrade: Option<Box<ClientUpgrade>>,
) -> Step<'a> {
    let upstream = &*route.upstream;
    let deadline = route.timeouts.total.map(|t| env.start + t);

    // Headers for the upstream.
    let original_host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => env.head.host.clone(),
    };
    if parts.version == Version::HTTP_2 && env.head.split_cookies() {
        headers::join_cookies(&mut parts.headers);
    }
    headers::strip_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
    let peer = env.peer.ip();
    // The group, while the headers are still the client's (X-Forwarded-For is added below).
    let group = upstream.groups.as_deref().map(|g| {
        let hash = g.sticky.as_ref().and_then(|sticky| {
            crate::upstream::groups::sticky_hash(sticky, &parts.headers, || {
                client_ip(peer, &parts.headers, &env.snapshot.trusted_proxies)
            })
        });
        g.choose(hash)
    });
    let trusted = headers::is_trusted(peer, &env.snapshot.trusted_proxies);
    let forwarded = if trusted || env.head.forwarding || client_upgrade.is_some() {
        // Values to merge with the client's, or a request for hyper's client (upgrades):
        // in the map. Room for all four at once, instead of the map growing on the way.
        parts.headers.reserve(4);
        headers::set_forwarded(
            &mut parts.headers,
            peer,
            trusted,
            env.ctx.proto,
            original_host.as_ref(),
        );
        parts.headers.insert(&X_REQUEST_ID, env.request_id.clone());
        None
    } else {
        Some(crate::upstream::forwarded::Forwarded::new(
            peer,
            env.ctx.proto,
            original_host,
            env.request_id.clone(),
        ))
    };
    // Origin-form on the wire to the upstream.
    parts.uri = match parts.uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    };
    parts.version = Version::HTTP_11;
    let timers = forward::Timers {
        connect: route.timeouts.connect,
        first_byte: route.timeouts.first_byte,
        deadline,
    };

    if let Some(client_upgrade) = client_upgrade {
        return Step::Upgrade {
            route,
            parts,
            body,
            client_upgrade,
            timers,
            group,
        };
    }
    let cfg = &upstream.resilience;
    // Only a retry after the request went out needs it again: our own client gives back
    // what it sent, for hyper's a copy is made now.
    let resend = if cfg.retry.attempts > 1
        && replay.is_some()
        && retry::may_retry_once_sent(&cfg.retry, &parts.method)
    {
        Resend::for_upstream(upstream, &parts.uri, &parts.headers)
    } else {
        Resend::No
    };
    let mut attempts = Attempts::new(
        upstream,
        Request::from_parts(parts, body),
        forwarded,
        replay,
        resend,
        timers,
    );
    if let Some(g) = group {
        attempts.in_group(g);
    }
    Step::Send(attempts, route)
}

/// The steps that wait on something other than the upstream's answer, then the send.
async fn slow(
    env: &Env<'_>,
    mut step: Step<'_>,
    tail: &mut Tail,
) -> Result<Response<ProxyBody>, ProxyError> {
    // The rate limit's and the cache's Redis calls wait `redis.timeout` in all.
    let mut budget = Budget::default();
    loop {
        step = match step {
            Step::RateLimit {
                route,
                declared_len,
                req,
            } => {
                rate_limit(env, route, &req, tail, &mut budget).await?;
                after_rate_limit(env, route, declared_len, req, tail)?
            }
            Step::Cache {
                route,
                declared_len,
                req,
                pending,
            } => {
                if let Some(resp) = cache::ask(pending, &req, tail, &mut budget).await {
                    return Ok(resp);
                }
                after_rate_limit(env, route, declared_len, req, tail)?
            }
            Step::Answer(resp) => return Ok(resp),
            Step::Buffer {
                route,
                parts,
                body,
                client_upgrade,
            } => {
                // While the body trickles in, the client holds nothing of the upstream's: its
                // in-flight slot and a half-open breaker's probe are taken again once the
                // body is here (an open breaker and a full upstream still answered at once).
                let upstream = &*route.upstream;
                tail.upstream_slot = None;
                let probe = tail.ticket.as_ref().is_some_and(BreakerTicket::is_probe);
                if probe {
                    // Reported as ignored: the probe slot is free for another request.
                    tail.ticket = None;
                }
                let deadline = route.timeouts.total.map(|t| env.start + t);
                let buffered = buffer_body(request_body(body, route, deadline)).await?;
                let metrics = &env.ctx.traffic.upstream_states.metrics;
                tail.upstream_slot = Some(upstream_slot(metrics, upstream)?);
                if probe {
                    tail.ticket = Some(admit(route)?);
                }
                if let Some(r) = tail.log.as_mut() {
                    r.bytes_in = buffered.len() as u64;
                }
                if let Some(o) = tail.obs.as_mut() {
                    o.bytes_in = buffered.len() as u64;
                }
                let replay =
                    keep_for_retry(&route.upstream.resilience.retry, buffered.len() as u64)
                        .then(|| buffered.clone());
                let body = RequestBody::Full(Some(buffered));
                outgoing(env, route, parts, body, replay, client_upgrade)
            }
            Step::Upgrade {
                route,
                parts,
                body,
                client_upgrade,
                timers,
                group,
            } => {
                // Boxed: the handshake's future (hyper's client) stays out of this one,
                // which every request waiting on Redis copies.
                let handshake = upgrade(
                    env,
                    route,
                    parts,
                    body,
                    *client_upgrade,
                    (timers, group),
                    tail,
                );
                return Box::pin(handshake).await;
            }
            Step::Send(mut attempts, route) => return send(env, &mut attempts, route, tail).await,
        };
    }
}

/// Runs the retry loop (`upstream::attempts`), then streams the answer back under the
/// route's idle timer, with the breaker told what the loop saw.
async fn send(
    env: &Env<'_>,
    attempts: &mut Attempts<'_>,
    route: &Route,
    tail: &mut Tail,
) -> Result<Response<ProxyBody>, ProxyError> {
    if tail.cache.as_ref().is_some_and(|x| x.stale.is_some()) {
        // A stale entry answers for an upstream that is down: no waiting for it.
        attempts.skip_connect_wait();
    }
    match attempts.run().await {
        Ok(answer) => {
            if let (Some(t), Some(v)) = (tail.ticket.as_mut(), answer.verdict) {
                // Otherwise the body's end decides (a stream may still die).
                t.report(v);
            }
            tail.endpoint_slot = answer.endpoint_slot;
            if let Some(r) = tail.log.as_mut() {
                r.ttfb = Some(crate::clock::now().saturating_duration_since(env.start));
            }
            // Stream back, frame by frame.
            let (mut parts, body) = answer.response.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, false);
            // A compressed answer's token counts cannot be read.
            let readable = || !parts.headers.contains_key(http::header::CONTENT_ENCODING);
            let body = if is_event_stream(parts.status, &parts.headers) {
                // A stream lives for minutes: nothing of it may keep the request head's
                // buffer alive (`AccessRecord::detach`).
                if let Some(r) = tail.log.as_mut() {
                    r.detach();
                }
                // The route's body timers go with the stream's own, on one timer.
                let timers = BodyTimers {
                    idle: route.timeouts.idle,
                    deadline: attempts.deadline(),
                };
                ProxyBody::events(EventStream::new(
                    body,
                    timers,
                    route.stream.clone(),
                    detached(env.request_id),
                    route.metrics.clone(),
                    route.tokens_in_streams && readable(),
                ))
            } else {
                if route.tokens_in_json && readable() && is_json(&parts.headers) {
                    tail.meter = Some(Box::new(UsageMeter::json()));
                }
                let timed = TimedBody::new(body, route.timeouts.idle, attempts.deadline(), None);
                ProxyBody::upstream(timed)
            };
            Ok(Response::from_parts(parts, body))
        }
        Err(failed) => {
            if let (Some(t), Some(v)) = (tail.ticket.as_mut(), failed.verdict) {
                t.report(v);
            }
            Err(failed.error)
        }
    }
}

/// `application/json` or `+json`: an answer whose token counts `tokens: all` reads.
fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let mime = v.split(';').next().unwrap_or_default().trim();
            mime.eq_ignore_ascii_case("application/json")
                || mime
                    .get(mime.len().saturating_sub(5)..)
                    .is_some_and(|t| t.eq_ignore_ascii_case("+json"))
        })
}

fn shed(metrics: &UpstreamMetrics, scope: &'static str, name: &str) {
    metrics
        .shed
        .get_or_create(&vec![
            ("scope", scope.to_string()),
            ("name", name.to_string()),
        ])
        .inc();
}

/// The client's request body under the route's body timers: `timeouts.body` between two
/// reads and `min_body_rate` after it (a client too slow gets 408, its own fault), the total
/// deadline, and `max_body`.
fn request_body(
    body: ClientBody,
    route: &Route,
    deadline: Option<Instant>,
) -> TimedBody<ClientBody> {
    let t = &route.timeouts;
    let min_rate = t.min_body_rate.map(|per_sec| MinRate { per_sec });
    TimedBody::request(body, t.body, min_rate, deadline, route.max_body_bytes)
}

async fn buffer_body(mut timed: TimedBody<ClientBody>) -> Result<Bytes, ProxyError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = timed.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Err(BodyError::TooLarge(limit)) => return Err(ProxyError::PayloadTooLarge { limit }),
            Err(BodyError::Idle | BodyError::Slow | BodyError::Total) => {
                return Err(ProxyError::RequestTimeout);
            }
            Err(
                BodyError::Inner(_)
                | BodyError::Client(_)
                | BodyError::Length
                | BodyError::Upstream(_)
                | BodyError::SendTimeout,
            ) => {
                return Err(ProxyError::BadRequest("malformed request body"));
            }
        }
    }
    Ok(buf.freeze())
}
