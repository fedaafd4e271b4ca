//! The steps a request walks, outermost first (architecture.md, "A request"):
//! observe -> admission -> route -> body limit -> forward -> stream back.
//! Each step is a call into its own module; this file only orders them. Later steps (rate
//! limit, cache, breaker, retry) slot in between route and forward.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::proxy::access_log::{AccessRecord, Outcome};
use crate::proxy::body::{BodyError, ProxyBody, RequestBody, TimedBody};
use crate::proxy::headers::{self, X_REQUEST_ID};
use crate::proxy::{ListenerCtx, Snapshot, forward, route, upgrade};
use crate::server::ConnClosing;

/// The service hyper calls for every request on a traffic listener. Never fails: every
/// error becomes a JSON answer through `ProxyError::to_response`. `framing_ok` is false when
/// the connection's HTTP/1 guard saw both Content-Length and Transfer-Encoding in the head,
/// which hyper does not show in `req` (server::h1_guard).
pub async fn handle(
    ctx: Arc<ListenerCtx>,
    peer: SocketAddr,
    req: Request<Incoming>,
    framing_ok: bool,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let request_id = headers::request_id(req.headers());
    let snapshot = ctx.shared.snapshot.load_full();
    let mut record = snapshot.access_log.then(|| {
        Box::new(AccessRecord {
            start,
            listener: ctx.name.clone(),
            route: None,
            upstream: None,
            method: req.method().clone(),
            path: req.uri().path().chars().take(256).collect(),
            status: 0,
            request_id: request_id.clone(),
            ttfb: None,
            bytes_in: 0,
            bytes_out: 0,
            outcome: Outcome::Streaming,
        })
    });

    let result = if framing_ok {
        proxy(
            &ctx,
            &snapshot,
            peer,
            req,
            &request_id,
            start,
            record.as_deref_mut(),
        )
        .await
    } else {
        // The step check_framing would take, had hyper left the Content-Length in `req`.
        Err(ProxyError::BadRequest(headers::CL_AND_TE))
    };
    let mut resp = match result {
        Ok(resp) => resp,
        Err(err) => {
            if let Some(r) = record.as_deref_mut() {
                r.outcome = Outcome::Local(err.code());
            }
            err.to_response(&request_id)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(&X_REQUEST_ID, v);
    }
    if let Some(r) = record.as_deref_mut() {
        r.status = resp.status().as_u16();
    }
    resp.map(|b| b.with_log(record))
}

async fn proxy(
    ctx: &ListenerCtx,
    snapshot: &Snapshot,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    request_id: &str,
    start: Instant,
    mut record: Option<&mut AccessRecord>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // Admission: a request that still arrives on a connection told to close.
    if req.extensions().get::<ConnClosing>().is_some() {
        return Err(ProxyError::ShuttingDown);
    }
    let declared_len = headers::check_framing(req.headers()).map_err(ProxyError::BadRequest)?;

    // Route.
    let routes = snapshot
        .listeners
        .get(&*ctx.name)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let route = route::find(routes, &req).ok_or(ProxyError::NoRoute)?;
    let upstream = &route.upstream;
    if let Some(r) = record.as_deref_mut() {
        r.route = Some(route.name.clone());
        r.upstream = Some(Arc::from(upstream.name.as_str()));
        r.bytes_in = declared_len.unwrap_or(0);
    }

    // Body limit, before the upstream sees a byte.
    let limit = route.max_body_bytes;
    if declared_len.is_some_and(|n| n > limit) {
        return Err(ProxyError::PayloadTooLarge { limit });
    }
    let deadline = route.timeouts.total.map(|t| start + t);
    let idle = route.timeouts.idle;
    let wants_upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
    let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let body = if body.is_end_stream() {
        RequestBody::Empty
    } else if declared_len.is_some() {
        RequestBody::Stream(TimedBody::new(body, idle, deadline, Some(limit)))
    } else {
        // Chunked (or HTTP/2 without a length): read it up to the limit first, as nginx does
        // by default, so an oversized body is refused before the upstream sees any of it.
        let buffered = buffer_body(body, limit, idle, deadline).await?;
        if let Some(r) = record.as_deref_mut() {
            r.bytes_in = buffered.len() as u64;
        }
        RequestBody::Full(Some(buffered))
    };

    // Headers for the upstream.
    let original_host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    };
    headers::strip_hop_by_hop(&mut parts.headers, wants_upgrade);
    // The client sets Host from the endpoint, as nginx does; the original travels in
    // X-Forwarded-Host.
    parts.headers.remove(header::HOST);
    let trusted = headers::is_trusted(peer.ip(), &snapshot.trusted_proxies);
    headers::set_forwarded(
        &mut parts.headers,
        peer.ip(),
        trusted,
        ctx.proto,
        original_host.as_ref(),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        parts.headers.insert(&X_REQUEST_ID, v);
    }
    let endpoint = upstream
        .pick()
        .ok_or_else(|| ProxyError::UpstreamUnavailable {
            upstream: upstream.name.clone(),
            detail: "no endpoints".into(),
        })?;
    parts.uri = upstream
        .uri_for(endpoint, parts.uri.path_and_query())
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?;
    parts.version = Version::HTTP_11;

    // Forward, and wait for the response head.
    let resp = forward::send(
        &route.client,
        &upstream.name,
        Request::from_parts(parts, body),
        route.timeouts.first_byte,
        deadline,
    )
    .await?;
    if let Some(r) = record {
        r.ttfb = Some(start.elapsed());
    }

    if let Some(client_upgrade) = client_upgrade
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        return Ok(upgrade::tunnel(
            resp,
            client_upgrade,
            request_id.to_string(),
        ));
    }

    // Stream back, frame by frame.
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    let body = TimedBody::new(body, idle, deadline, None);
    Ok(Response::from_parts(parts, ProxyBody::upstream(body)))
}

async fn buffer_body(
    body: Incoming,
    limit: u64,
    idle: std::time::Duration,
    deadline: Option<Instant>,
) -> Result<bytes::Bytes, ProxyError> {
    let mut timed = TimedBody::new(body, idle, deadline, Some(limit));
    let mut buf = BytesMut::new();
    while let Some(frame) = timed.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Err(BodyError::TooLarge(limit)) => return Err(ProxyError::PayloadTooLarge { limit }),
            Err(BodyError::Idle | BodyError::Total) => return Err(ProxyError::RequestTimeout),
            Err(BodyError::Inner(_)) => {
                return Err(ProxyError::BadRequest("malformed request body"));
            }
        }
    }
    Ok(buf.freeze())
}
