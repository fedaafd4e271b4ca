//! The cache step (architecture.md, step 6): after the rate limit, before the breaker. A
//! fresh entry answers at once; a miss goes on upstream with what the lookup found kept in
//! the tail: a stale entry that answers instead of an upstream failure, and the lead the
//! other misses of the key wait for. On the way back the answer is stored as it passes.

use super::*;
use crate::cache::{Asked, Entry, Exchange, Found, Pending, Policy, X_CACHE, XCache};

/// What the cache says before the upstream is asked.
pub(super) enum Now {
    Answer(Box<Response<ProxyBody>>),
    /// Redis must be asked, or another request's fetch awaited.
    Ask(Pending),
    /// Upstream (a miss, or a request the cache does not take).
    Go,
}

/// The step without waiting: what the request asks, the memory tier.
pub(super) fn begin(
    listener: &str,
    route: &Route,
    policy: &Arc<Policy>,
    req: &Request<ClientBody>,
    tail: &mut Tail,
) -> Now {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    // A request with a body is not one the key describes.
    let asked = if req.body().is_end_stream() {
        policy.ask(
            (listener, &route.name),
            req.method(),
            route::request_host(req),
            target,
            req.headers(),
        )
    } else {
        Asked::Bypass
    };
    let (key, head, refresh) = match asked {
        Asked::Bypass => {
            policy.count(XCache::Bypass);
            tail.cache = Some(Box::new(Exchange::new(
                policy.clone(),
                String::new(),
                false,
                XCache::Bypass,
            )));
            return Now::Go;
        }
        Asked::Cacheable { key, head, refresh } => (key, head, refresh),
    };
    let found = policy.find_now(&key, refresh, !head);
    tail.cache = Some(Box::new(Exchange::new(
        policy.clone(),
        key,
        head,
        XCache::Miss,
    )));
    match found {
        Ok(found) => match settle(found, req.headers(), tail) {
            Some(resp) => Now::Answer(Box::new(resp)),
            None => Now::Go,
        },
        Err(pending) => Now::Ask(pending),
    }
}

/// The waiting part of the step; Redis within what the rate limit left of `budget`.
pub(super) async fn ask(
    pending: Pending,
    req: &Request<ClientBody>,
    tail: &mut Tail,
    budget: &mut Budget,
) -> Option<Response<ProxyBody>> {
    let policy = tail.cache.as_ref()?.policy.clone();
    let found = policy.find(pending, budget).await;
    settle(found, req.headers(), tail)
}

/// A fresh entry becomes the answer; a miss keeps what it found for the way back.
fn settle(found: Found, request: &http::HeaderMap, tail: &mut Tail) -> Option<Response<ProxyBody>> {
    let x = tail.cache.as_mut()?;
    match found {
        Found::Fresh(e) => {
            x.how = XCache::Hit;
            x.policy.count(XCache::Hit);
            let not_modified = crate::cache::not_modified(request, &e);
            Some(answer(
                &e,
                XCache::Hit,
                x.head || not_modified,
                not_modified,
            ))
        }
        Found::Miss { stale, lead } => {
            x.stale = stale;
            x.lead = lead;
            None
        }
    }
}

/// A GET that missed asks the upstream for the whole answer, whatever the client's
/// conditions (nginx does the same): a 304 could not be stored, and the answer serves every
/// client after this one.
pub(super) fn for_upstream(req: &mut Request<ClientBody>, tail: &Tail) {
    if tail
        .cache
        .as_ref()
        .is_some_and(|x| x.how == XCache::Miss && !x.head)
    {
        let h = req.headers_mut();
        h.remove(header::IF_NONE_MATCH);
        h.remove(header::IF_MODIFIED_SINCE);
    }
}

/// An answer made from an entry.
fn answer(e: &Entry, how: XCache, no_body: bool, not_modified: bool) -> Response<ProxyBody> {
    let (status, headers) = crate::cache::answer_head(e, how);
    let body = if no_body {
        ProxyBody::empty()
    } else {
        ProxyBody::full(e.body.clone())
    };
    let mut resp = Response::new(body);
    *resp.headers_mut() = headers;
    if not_modified {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        // A 304 describes the representation but carries none of its body.
        for h in [
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
        ] {
            resp.headers_mut().remove(h);
        }
    } else {
        *resp.status_mut() = status;
    }
    resp
}

/// Failures `stale_if_error` answers for: the upstream down, slow, refused by its breaker
/// or its in-flight cap.
fn upstream_failed(result: &Result<Response<ProxyBody>, ProxyError>) -> bool {
    match result {
        Ok(resp) => matches!(resp.status().as_u16(), 500 | 502 | 503 | 504),
        Err(e) => matches!(
            e,
            ProxyError::UpstreamUnavailable { .. }
                | ProxyError::UpstreamTimeout { .. }
                | ProxyError::UpstreamTls { .. }
                | ProxyError::CircuitOpen { .. }
                | ProxyError::Overloaded
        ),
    }
}

/// The way back, for a request the cache looked up: a stale entry instead of an upstream
/// failure, or the answer stored as it passes; `X-Cache` on whatever goes out.
pub(super) fn finish(
    result: Result<Response<ProxyBody>, ProxyError>,
    tail: &mut Tail,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(x) = tail.cache.as_mut() else {
        return result;
    };
    if x.how != XCache::Miss {
        return result;
    }
    if upstream_failed(&result)
        && let Some(stale) = x.stale.take()
    {
        x.how = XCache::Stale;
        x.lead = None;
        x.policy.count(XCache::Stale);
        if result.is_err()
            && let Some(t) = tail.ticket.as_mut()
        {
            // Reported where it failed; this answer says nothing more of the upstream.
            t.report(Outcome::Ignored);
        }
        let head = x.head;
        return Ok(answer(&stale, XCache::Stale, head, false));
    }
    x.policy.count(XCache::Miss);
    match &result {
        Ok(resp) => x.answered(resp.status().as_u16(), resp.headers()),
        // Nothing to store: the waiters go themselves.
        Err(_) => x.lead = None,
    }
    result
}

/// `X-Cache` on the answer, whatever it is (an error rampart made included).
pub(super) fn mark(resp: &mut Response<ProxyBody>, tail: &mut Tail) {
    if let Some(x) = &tail.cache {
        resp.headers_mut().insert(X_CACHE.clone(), x.how.value());
        if let Some(r) = tail.log.as_mut() {
            r.cache = Some(x.how.as_str());
        }
    }
}
