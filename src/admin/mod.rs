//! The admin listener (127.0.0.1:9901 by default): probes, metrics and the admin API. Kept
//! off the traffic ports so probes never compete with, or leak to, clients.
//!
//! `api.rs` has the JSON documents and the status page, `config_json.rs` the redacted
//! configuration, `auth.rs` who may use it (the bearer token, or without one the Host names
//! that can only mean this machine).

mod api;
mod auth;
pub(crate) mod config_json;
pub(crate) mod control;
mod releases;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::alert::{AlertInputs, Alerting};
use crate::reload::ReloadResult;
use crate::shutdown::stopped;
use crate::stream::body::ProxyBody;
pub(crate) use control::Control;

/// What the admin endpoints read and drive: a narrow handle `app` builds.
#[derive(Debug)]
pub struct AdminCtx {
    /// What the alert rules read (routing table, health, limiters, series, signals).
    pub inputs: AlertInputs,
    pub registry: Arc<prometheus_client::registry::Registry>,
    pub alerts: Arc<Alerting>,
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Reloads and drains are carried out by the app's supervisor.
    pub control: Control,
    /// `/admin/cache`: the memory tiers, purges.
    pub caches: Arc<crate::cache::Registry>,
    /// `/admin/weights`: group weights set at run time.
    pub upstreams: Arc<crate::upstream::resilience::UpstreamStates>,
    /// `/admin/releases`.
    pub(crate) releases: Arc<crate::upstream::release::Releases>,
}

pub(crate) async fn serve(
    listener: TcpListener,
    ctx: Arc<AdminCtx>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let ctx = ctx.clone();
        let svc = service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(route(&ctx, req).await) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn route(ctx: &AdminCtx, req: Request<Incoming>) -> Response<ProxyBody> {
    let shared = ctx;
    if !auth::public(req.uri().path()) {
        let snapshot = shared.inputs.snapshot.load();
        match auth::check(&snapshot.config.admin, req.uri(), req.headers()) {
            auth::Access::Granted => {}
            auth::Access::NeedsToken => {
                let mut resp = text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"rampart admin\""),
                );
                return resp;
            }
            auth::Access::ForeignHost => {
                return json(
                    StatusCode::MISDIRECTED_REQUEST,
                    "{\"code\":\"MISDIRECTED_REQUEST\",\"message\":\"the admin listener has no token, so it \
                     answers only requests addressed to an IP address, localhost or a name in \
                     admin.allowed_hosts\"}\n"
                        .to_owned(),
                );
            }
        }
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/livez") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let body = crate::observe::encode_registry(&shared.registry);
            let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::observe::CONTENT_TYPE),
            );
            resp
        }
        // Probes answer from the checks' cached results: never a query per call.
        (&Method::GET | &Method::HEAD, "/readyz") => {
            let (status, body) = crate::health::ready_response(&shared.inputs.health);
            no_store(text_owned(status, body))
        }
        // Public: states and latencies, never an error text or an address.
        (&Method::GET | &Method::HEAD, "/health") => {
            let (status, body) = crate::health::health_response(&shared.inputs.health);
            no_store(json(status, body))
        }
        // The same document with everything the checks found, for whoever may see it.
        (&Method::GET | &Method::HEAD, "/admin/health") => {
            let (status, body) = crate::health::health_detail_response(&shared.inputs.health);
            no_store(json(status, body))
        }
        (&Method::GET | &Method::HEAD, "/admin/cache") => document(ctx.caches.describe()),
        (m, p) if is_releases(p) && !releases::allowed(p, m) => {
            let allow = if p == "/admin/releases" {
                "GET, HEAD, POST"
            } else {
                "POST"
            };
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            resp
        }
        (&Method::GET | &Method::HEAD, "/admin/releases") => document(ctx.releases.to_json()),
        // Writes: the same rule as /admin/reload below.
        (_, p) if is_releases(p) && req.headers().contains_key(header::ORIGIN) => {
            text(StatusCode::FORBIDDEN, "cross-origin requests are refused\n")
        }
        (_, "/admin/releases") => releases::start(ctx, req).await,
        (_, p) if is_releases(p) => releases::act(ctx, p),
        (_, "/admin/reload" | "/admin/drain" | "/admin/cache/purge" | "/admin/weights")
            if req.method() != Method::POST =>
        {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            resp
        }
        // A web page the operator has open could POST here (no preflight for a simple
        // POST); browsers always say where it came from, curl and scripts do not.
        (_, "/admin/reload" | "/admin/drain" | "/admin/cache/purge" | "/admin/weights")
            if req.headers().contains_key(header::ORIGIN) =>
        {
            text(StatusCode::FORBIDDEN, "cross-origin requests are refused\n")
        }
        (_, "/admin/cache/purge") => purge(ctx, req).await,
        (_, "/admin/weights") => weights(ctx, req).await,
        (_, "/admin/reload") => {
            let report = ctx.control.reload().await;
            let status = match report.result {
                ReloadResult::Ok => StatusCode::OK,
                ReloadResult::Error => StatusCode::UNPROCESSABLE_ENTITY,
                ReloadResult::Refused => StatusCode::CONFLICT,
            };
            json(status, report.to_json())
        }
        (_, "/admin/drain") => {
            ctx.control.start_drain().await;
            json(
                StatusCode::ACCEPTED,
                "{\"result\":\"draining\"}\n".to_owned(),
            )
        }
        (&Method::GET | &Method::HEAD, "/") => page(),
        (&Method::GET | &Method::HEAD, "/admin/config") => document(api::config(shared)),
        (&Method::GET | &Method::HEAD, "/admin/upstreams") => document(api::upstreams(shared)),
        (&Method::GET | &Method::HEAD, "/admin/alerts") => document(api::alerts(shared)),
        (&Method::GET | &Method::HEAD, "/admin/status") => document(api::status(shared)),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn is_releases(path: &str) -> bool {
    path == "/admin/releases" || path.starts_with("/admin/releases/")
}

/// `POST /admin/cache/purge` with `{"cache"?, "route"?, "prefix"?}` (at least one).
async fn purge(ctx: &AdminCtx, req: Request<Incoming>) -> Response<ProxyBody> {
    use http_body_util::BodyExt;
    let bad = |msg: &str| {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "code": "BAD_REQUEST", "message": msg }).to_string(),
        )
    };
    let body = match http_body_util::Limited::new(req.into_body(), 16 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad("the body could not be read (at most 16 KiB)"),
    };
    let p: crate::cache::Purge = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return bad(&format!(
                "expected {{\"cache\"?, \"route\"?, \"prefix\"?}}: {e}"
            ));
        }
    };
    if p.cache.is_none() && p.route.is_none() && p.prefix.is_none() {
        return bad("say what to purge: cache, route or prefix (prefix \"/\" for everything)");
    }
    let report = ctx.caches.purge(p).await;
    let v = serde_json::json!({
        "removed_here": report.removed,
        "propagated": report.propagated.is_ok(),
        "sequence": report.propagated.as_ref().ok(),
        "detail": report.propagated.as_ref().err(),
    });
    no_store(json(StatusCode::OK, v.to_string()))
}

/// `POST /admin/weights` with `{"upstream", "weights": {"<group>": n, ...}}` (the groups
/// named take these weights, the others keep theirs) or `{"upstream", "reset": true}` (back
/// to the file's weights). Kept across reloads while the group names stay.
async fn weights(ctx: &AdminCtx, req: Request<Incoming>) -> Response<ProxyBody> {
    use http_body_util::BodyExt;
    let answer = |status: StatusCode, code: &str, msg: &str| {
        json(
            status,
            serde_json::json!({ "code": code, "message": msg }).to_string(),
        )
    };
    let bad = |msg: &str| answer(StatusCode::BAD_REQUEST, "BAD_REQUEST", msg);
    let body = match http_body_util::Limited::new(req.into_body(), 16 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad("the body could not be read (at most 16 KiB)"),
    };
    let expected = "expected {\"upstream\", \"weights\": {\"<group>\": 0 to 10000}} or {\"upstream\", \"reset\": true}";
    let Ok(serde_json::Value::Object(v)) = serde_json::from_slice(&body) else {
        return bad(expected);
    };
    let Some(upstream) = v.get("upstream").and_then(|u| u.as_str()) else {
        return bad(expected);
    };
    if ctx.upstreams.group_weights(upstream).is_none() {
        return answer(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("no upstream {upstream:?} with groups"),
        );
    }
    if v.get("reset").and_then(|r| r.as_bool()) == Some(true) {
        ctx.upstreams.clear_group_weights(upstream);
    } else {
        let Some(map) = v.get("weights").and_then(|w| w.as_object()) else {
            return bad(expected);
        };
        let mut list = Vec::with_capacity(map.len());
        for (name, w) in map {
            let Some(w) = w.as_u64().and_then(|w| u32::try_from(w).ok()) else {
                return bad(&format!("weight of {name:?}: {expected}"));
            };
            list.push((name.clone(), w));
        }
        if let Err(e) = ctx.upstreams.set_group_weights(upstream, &list) {
            return answer(StatusCode::UNPROCESSABLE_ENTITY, "REFUSED", &e);
        }
    }
    let now: serde_json::Map<String, serde_json::Value> = ctx
        .upstreams
        .group_weights(upstream)
        .unwrap_or_default()
        .into_iter()
        .map(|(n, w)| (n, w.into()))
        .collect();
    document(serde_json::json!({ "upstream": upstream, "weights": now }))
}

/// A JSON document of the admin API: always fresh.
fn document(v: serde_json::Value) -> Response<ProxyBody> {
    no_store(json(StatusCode::OK, v.to_string()))
}

fn page() -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(
        api::STATUS_PAGE.as_bytes(),
    )));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Inline only, nothing from elsewhere; data from this listener only; never framed.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn text_owned(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Probe answers change from one call to the next: no cache in between may keep one.
fn no_store(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
