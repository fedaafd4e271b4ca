//! Route matching: listener + host + path prefix (+ methods) -> route. Routes are tried in
//! the order they are written and the first match wins, as in Envoy, so the file reads
//! top to bottom like the decision it describes.
//!
//! The path matched is the listener's normal form of the request's path (`crate::path`,
//! [`match_path`]), so no spelling of a path reaches another route than the path itself.

pub(crate) mod client_ip;
pub(crate) mod headers;
pub(crate) mod table;

pub(crate) use table::{ListenerRoutes, Snapshot};

use std::borrow::Cow;
use std::sync::Arc;

use http::{Method, Request};

use crate::admission::ratelimit::Policy;
use crate::config::{
    EscapedSlashes, NormalizePath, PathConfig, RouteConfig, RouteTimeouts, StreamConfig,
    TokenCounting,
};
use crate::observe::http::RouteMetrics;
use crate::path::{self, PathError};
use crate::upstream::forward::Upstream;
use crate::upstream::resilience::RouteBreaker;

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub path_prefix: String,
    pub host: Option<String>,
    pub methods: Option<Vec<Method>>,
    /// The prefix compared ignoring ASCII case.
    pub case_insensitive: bool,
    pub upstream: Arc<Upstream>,
    /// This route's breaker, or the upstream's shared one (`circuit_breaker.scope`).
    pub breaker: Arc<RouteBreaker>,
    pub timeouts: RouteTimeouts,
    pub max_body_bytes: u64,
    /// Every one must allow the request (ratelimit::check).
    pub rate_limits: Vec<Arc<Policy>>,
    /// Protocols tunnelled after a 101 (lowercase `Upgrade` tokens; see `stream::upgrade`).
    pub upgrades: Vec<String>,
    /// Timers for answers that are event streams (`stream::events`).
    pub stream: Arc<StreamConfig>,
    /// Read the token counts of event streams / of JSON answers (`stream::usage`).
    pub tokens_in_streams: bool,
    pub tokens_in_json: bool,
    /// Counters and histograms of this route, made once per snapshot.
    pub metrics: Arc<RouteMetrics>,
    /// The `cache:` policy GET and HEAD answers are cached under (set by the snapshot).
    pub cache: Option<Arc<crate::cache::Policy>>,
}

impl Route {
    pub fn new(
        cfg: &RouteConfig,
        upstream: Arc<Upstream>,
        rate_limits: Vec<Arc<Policy>>,
        metrics: Arc<RouteMetrics>,
    ) -> Self {
        let breaker = upstream
            .state
            .breaker_for(&cfg.name, &upstream.resilience.circuit_breaker);
        // A token budget must see every answer.
        let tokens_in_json = cfg.tokens == TokenCounting::All
            || (cfg.tokens == TokenCounting::Streams
                && rate_limits.iter().any(|p| p.charges_tokens()));
        Route {
            name: Arc::from(cfg.name.as_str()),
            breaker,
            path_prefix: cfg.path_prefix.clone(),
            host: cfg.host.clone(),
            methods: cfg.methods.clone(),
            case_insensitive: cfg.case_insensitive,
            upstream,
            timeouts: cfg.timeouts.clone(),
            max_body_bytes: cfg.max_body_bytes,
            rate_limits,
            upgrades: cfg.upgrades.clone(),
            stream: Arc::new(cfg.stream.clone()),
            tokens_in_streams: cfg.tokens != TokenCounting::Off,
            tokens_in_json,
            metrics,
            cache: None,
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
        path_matches(&self.path_prefix, path, self.case_insensitive)
    }
}

/// "/api" matches "/api" and "/api/..." but not "/apix"; a prefix ending in "/" matches
/// anything below it. Bytes, not chars: a prefix never ends inside a character of the
/// path, so nothing here can slice one.
pub(crate) fn path_matches(prefix: &str, path: &str, case_insensitive: bool) -> bool {
    let (prefix, path) = (prefix.as_bytes(), path.as_bytes());
    let Some(head) = path.get(..prefix.len()) else {
        return false;
    };
    let same = if case_insensitive {
        head.eq_ignore_ascii_case(prefix)
    } else {
        head == prefix
    };
    let rest = &path[prefix.len()..];
    same && (prefix.ends_with(b"/") || rest.is_empty() || rest.starts_with(b"/"))
}

/// The path routes are matched against: the request's path in the listener's normal form
/// (parameters cut), or as received with `normalize_path: off`. Borrowed when unchanged.
pub(crate) fn match_path<'p>(path: &'p str, cfg: &PathConfig) -> Result<Cow<'p, str>, PathError> {
    if cfg.normalize == NormalizePath::Off {
        return Ok(Cow::Borrowed(path));
    }
    path::normalize(path, options(cfg, true))
}

/// With `normalize_path: forward`, the path the upstream gets (parameters kept); None when
/// it is forwarded as received.
pub(crate) fn forward_path<'p>(
    path: &'p str,
    cfg: &PathConfig,
) -> Option<Result<Cow<'p, str>, PathError>> {
    (cfg.normalize == NormalizePath::Forward).then(|| path::normalize(path, options(cfg, false)))
}

fn options(cfg: &PathConfig, cut_params: bool) -> path::Options {
    path::Options {
        merge_slashes: cfg.merge_slashes,
        reject_escaped_slashes: cfg.escaped_slashes == EscapedSlashes::Reject,
        cut_params,
    }
}

/// The request's host without port: the URI authority (HTTP/2, absolute-form) or `Host`.
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<&str> {
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

/// The first route for `req`, whose path in the form routes match is `path`.
pub(crate) fn find<'a, B>(routes: &'a [Route], req: &Request<B>, path: &str) -> Option<&'a Route> {
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
        for ci in [false, true] {
            assert!(path_matches("/", "/anything", ci));
            assert!(path_matches("/api", "/api", ci));
            assert!(path_matches("/api", "/api/chat", ci));
            assert!(!path_matches("/api", "/apix", ci));
            assert!(path_matches("/api/", "/api/x", ci));
            assert!(!path_matches("/api/", "/api", ci));
            assert!(!path_matches("/api", "/ap", ci));
        }
    }

    #[test]
    fn case_insensitive_prefixes_ignore_ascii_case_only() {
        assert!(!path_matches("/rl", "/RL", false));
        assert!(path_matches("/rl", "/RL", true));
        assert!(path_matches("/rl", "/rL/x", true));
        assert!(!path_matches("/rl", "/RLx", true));
        assert!(path_matches("/é", "/é/x", true));
        assert!(!path_matches("/é", "/É/x", true));
        // Never slices inside a character.
        assert!(!path_matches("/a", "/\u{e9}", true));
        assert!(!path_matches("/ab", "/\u{e9}", true));
    }

    #[test]
    fn match_and_forward_forms_follow_the_listener() {
        let mut cfg = PathConfig::default();
        assert_eq!(match_path("//rl;x", &cfg).unwrap(), "/rl");
        assert!(forward_path("//rl;x", &cfg).is_none());
        cfg.normalize = NormalizePath::Forward;
        assert_eq!(forward_path("//rl;x", &cfg).unwrap().unwrap(), "/rl;x");
        cfg.normalize = NormalizePath::Off;
        assert_eq!(match_path("//rl;x", &cfg).unwrap(), "//rl;x");
        cfg = PathConfig {
            merge_slashes: false,
            escaped_slashes: EscapedSlashes::Keep,
            ..PathConfig::default()
        };
        assert_eq!(match_path("//rl%2f", &cfg).unwrap(), "//rl%2F");
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
