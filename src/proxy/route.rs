//! Route matching: listener + host + path prefix (+ methods) -> route. Routes are tried in
//! the order they are written and the first match wins, as in Envoy, so the file reads
//! top to bottom like the decision it describes.

use std::sync::Arc;

use http::{Method, Request};

use crate::config::{RouteConfig, RouteTimeouts};
use crate::metrics::http::RouteMetrics;
use crate::proxy::forward::Upstream;
use crate::ratelimit::Policy;

pub struct Route {
    pub name: Arc<str>,
    pub path_prefix: String,
    pub host: Option<String>,
    pub methods: Option<Vec<Method>>,
    pub upstream: Arc<Upstream>,
    pub timeouts: RouteTimeouts,
    pub max_body_bytes: u64,
    /// Every one must allow the request (ratelimit::check).
    pub rate_limits: Vec<Arc<Policy>>,
    /// Counters and histograms of this route, made once per snapshot.
    pub metrics: Arc<RouteMetrics>,
}

impl Route {
    pub fn new(
        cfg: &RouteConfig,
        upstream: Arc<Upstream>,
        rate_limits: Vec<Arc<Policy>>,
        metrics: Arc<RouteMetrics>,
    ) -> Self {
        Route {
            name: Arc::from(cfg.name.as_str()),
            path_prefix: cfg.path_prefix.clone(),
            host: cfg.host.clone(),
            methods: cfg.methods.clone(),
            upstream,
            timeouts: cfg.timeouts.clone(),
            max_body_bytes: cfg.max_body_bytes,
            rate_limits,
            metrics,
        }
    }

    fn matches<'r>(
        &self,
        host: &mut impl FnMut() -> Option<&'r str>,
        path: &str,
        method: &Method,
    ) -> bool {
        if let Some(want) = &self.host {
            match host() {
                Some(h) if h.eq_ignore_ascii_case(want) => {}
                _ => return false,
            }
        }
        if let Some(methods) = &self.methods
            && !methods.contains(method)
        {
            return false;
        }
        path_matches(&self.path_prefix, path)
    }
}

/// "/api" matches "/api" and "/api/..." but not "/apix"; a prefix ending in "/" matches
/// anything below it.
pub fn path_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// The request's host without port: the URI authority (HTTP/2, absolute-form) or `Host`.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(http::header::HOST)?.to_str().ok()?,
    };
    // Strip the port, minding IPv6 literals ("[::1]:8080").
    if let Some(end) = raw.find(']') {
        return Some(&raw[..=end]);
    }
    Some(raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw))
}

pub fn find<'a, B>(routes: &'a [Route], req: &Request<B>) -> Option<&'a Route> {
    let path = req.uri().path();
    // Looked up once, and only when a route names a host: most do not.
    let mut looked_up = None;
    let mut host = || *looked_up.get_or_insert_with(|| request_host(req));
    routes
        .iter()
        .find(|r| r.matches(&mut host, path, req.method()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_whole_segments() {
        assert!(path_matches("/", "/anything"));
        assert!(path_matches("/api", "/api"));
        assert!(path_matches("/api", "/api/chat"));
        assert!(!path_matches("/api", "/apix"));
        assert!(path_matches("/api/", "/api/x"));
        assert!(!path_matches("/api/", "/api"));
    }

    #[test]
    fn host_without_port() {
        let r = Request::get("/")
            .header("host", "Example.com:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r), Some("Example.com"));
        let r = Request::get("/")
            .header("host", "[::1]:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r), Some("[::1]"));
        let r = Request::get("http://h2.example/x").body(()).unwrap();
        assert_eq!(request_host(&r), Some("h2.example"));
    }
}
