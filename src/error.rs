//! ProxyError: every way a request can fail, and the ONE place that turns it into a
//! response (`{"code","message","request_id"}`), so status codes stay consistent.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Which wait ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeoutPhase {
    Connect,
    FirstByte,
    Total,
}

impl TimeoutPhase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::Connect => "connect",
            TimeoutPhase::FirstByte => "first_byte",
            TimeoutPhase::Total => "total",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("{0}")]
    BadRequest(&'static str),
    /// A request head over the listener's `max_header_bytes`.
    #[error("request head is larger than the limit")]
    HeadersTooLarge,
    #[error("no route matches this request")]
    NoRoute,
    /// CONNECT: rampart is a reverse proxy, not a tunnel to anywhere.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A transfer coding rampart does not implement (RFC 9112 6.1: 501).
    #[error("{0}")]
    NotImplemented(&'static str),
    #[error("the client was too slow sending the request body")]
    RequestTimeout,
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("upstream {upstream} is unavailable: {detail}")]
    UpstreamUnavailable { upstream: String, detail: String },
    /// The upstream's certificate was refused (expired, untrusted, another name) or the
    /// upstream refused ours: a connect failure with its own code, so that a TLS mistake is
    /// not taken for an upstream that is down.
    #[error("upstream {upstream}: TLS failed: {detail}")]
    UpstreamTls { upstream: String, detail: String },
    #[error("upstream {upstream} timed out ({} timeout)", phase.as_str())]
    UpstreamTimeout {
        upstream: String,
        phase: TimeoutPhase,
    },
    #[error("Server is shutting down")]
    ShuttingDown,
    #[error("too many requests in flight, try again shortly")]
    Overloaded,
    #[error("upstream {upstream} is failing; the circuit breaker is open")]
    CircuitOpen {
        upstream: String,
        retry_after: std::time::Duration,
    },
    #[error("Too many requests, retry in {retry_after_secs} s")]
    TooManyRequests {
        /// Whole seconds, at least 1.
        retry_after_secs: u64,
    },
}

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UpstreamUnavailable { .. } | ProxyError::UpstreamTls { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ShuttingDown | ProxyError::Overloaded | ProxyError::CircuitOpen { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Seconds for `Retry-After`, for the answers that mean "come back later". Whole
    /// seconds, never 0 (a client told to retry at once would hammer us).
    pub(crate) fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ProxyError::Overloaded => Some(1),
            ProxyError::CircuitOpen { retry_after, .. } => {
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0))
                    .map(|s| s.max(1))
            }
            ProxyError::TooManyRequests { retry_after_secs } => Some((*retry_after_secs).max(1)),
            _ => None,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "BAD_REQUEST",
            ProxyError::HeadersTooLarge => "HEADERS_TOO_LARGE",
            ProxyError::NoRoute => "NO_ROUTE",
            ProxyError::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ProxyError::NotImplemented(_) => "NOT_IMPLEMENTED",
            ProxyError::RequestTimeout => "REQUEST_TIMEOUT",
            ProxyError::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            ProxyError::UpstreamUnavailable { .. } => "UPSTREAM_UNAVAILABLE",
            ProxyError::UpstreamTls { .. } => "UPSTREAM_TLS_ERROR",
            ProxyError::UpstreamTimeout { .. } => "UPSTREAM_TIMEOUT",
            ProxyError::ShuttingDown => "SERVICE_UNAVAILABLE",
            ProxyError::Overloaded => "OVERLOADED",
            ProxyError::CircuitOpen { .. } => "CIRCUIT_OPEN",
            ProxyError::TooManyRequests { .. } => "TOO_MANY_REQUESTS",
        }
    }

    /// Whether the connection should be closed after this answer: after a refused body the
    /// unread rest of it would otherwise be parsed as the next request.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::HeadersTooLarge
                | ProxyError::MethodNotAllowed
                | ProxyError::NotImplemented(_)
                | ProxyError::RequestTimeout
                | ProxyError::PayloadTooLarge { .. }
                | ProxyError::ShuttingDown
        )
    }

    /// Generic over the body so this low module needs no body type of the request path.
    pub(crate) fn to_response<B: From<Bytes>>(&self, request_id: &str) -> Response<B> {
        let mut body = String::with_capacity(128);
        body.push_str("{\"code\":\"");
        body.push_str(self.code());
        body.push_str("\",\"message\":");
        push_json_string(&mut body, &self.to_string());
        if let ProxyError::UpstreamUnavailable { upstream, .. }
        | ProxyError::UpstreamTls { upstream, .. }
        | ProxyError::UpstreamTimeout { upstream, .. }
        | ProxyError::CircuitOpen { upstream, .. } = self
        {
            body.push_str(",\"upstream\":");
            push_json_string(&mut body, upstream);
        }
        body.push_str(",\"request_id\":");
        push_json_string(&mut body, request_id);
        body.push('}');
        let mut resp = Response::new(B::from(Bytes::from(body)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.closes_connection() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ProxyError::MethodNotAllowed = self {
            // RFC 9110 15.5.6: a 405 names the methods that are.
            h.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        if let Some(secs) = self.retry_after_secs() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Minimal JSON string escaping; the values are our own messages, names and request ids.
pub(crate) fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<ProxyError> {
        vec![
            ProxyError::BadRequest("x"),
            ProxyError::NoRoute,
            ProxyError::MethodNotAllowed,
            ProxyError::NotImplemented("x"),
            ProxyError::RequestTimeout,
            ProxyError::PayloadTooLarge { limit: 1 },
            ProxyError::UpstreamUnavailable {
                upstream: "b".into(),
                detail: "refused".into(),
            },
            ProxyError::UpstreamTls {
                upstream: "b".into(),
                detail: "invalid peer certificate: Expired".into(),
            },
            ProxyError::UpstreamTimeout {
                upstream: "b".into(),
                phase: TimeoutPhase::FirstByte,
            },
            ProxyError::ShuttingDown,
            ProxyError::Overloaded,
            ProxyError::CircuitOpen {
                upstream: "b".into(),
                retry_after: std::time::Duration::from_millis(1500),
            },
            ProxyError::TooManyRequests {
                retry_after_secs: 7,
            },
        ]
    }

    #[test]
    fn each_error_maps_to_its_status_and_code() {
        let expected = [
            (400, "BAD_REQUEST"),
            (404, "NO_ROUTE"),
            (405, "METHOD_NOT_ALLOWED"),
            (501, "NOT_IMPLEMENTED"),
            (408, "REQUEST_TIMEOUT"),
            (413, "PAYLOAD_TOO_LARGE"),
            (502, "UPSTREAM_UNAVAILABLE"),
            (502, "UPSTREAM_TLS_ERROR"),
            (504, "UPSTREAM_TIMEOUT"),
            (503, "SERVICE_UNAVAILABLE"),
            (503, "OVERLOADED"),
            (503, "CIRCUIT_OPEN"),
            (429, "TOO_MANY_REQUESTS"),
        ];
        for (err, (status, code)) in all().iter().zip(expected) {
            let resp = err.to_response::<Bytes>("rid-1");
            assert_eq!(resp.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        }
    }

    #[test]
    fn method_not_allowed_names_the_allowed_methods_and_closes() {
        let resp = ProxyError::MethodNotAllowed.to_response::<Bytes>("r");
        assert!(
            resp.headers()[header::ALLOW]
                .to_str()
                .unwrap()
                .contains("GET")
        );
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        let resp = ProxyError::NotImplemented("x").to_response::<Bytes>("r");
        assert_eq!(resp.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn shutting_down_closes_the_connection_with_the_users_message() {
        let resp = ProxyError::ShuttingDown.to_response::<Bytes>("r");
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        assert_eq!(
            ProxyError::ShuttingDown.to_string(),
            "Server is shutting down"
        );
    }

    #[test]
    fn come_back_later_answers_carry_retry_after_never_zero() {
        let r = ProxyError::Overloaded.to_response::<Bytes>("r");
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let open = |ms| ProxyError::CircuitOpen {
            upstream: "b".into(),
            retry_after: std::time::Duration::from_millis(ms),
        };
        assert_eq!(
            open(1500).to_response::<Bytes>("r").headers()[header::RETRY_AFTER],
            "2"
        );
        assert_eq!(
            open(0).to_response::<Bytes>("r").headers()[header::RETRY_AFTER],
            "1"
        );
        assert_eq!(
            open(60_000).to_response::<Bytes>("r").headers()[header::RETRY_AFTER],
            "60"
        );
        assert!(
            !ProxyError::NoRoute
                .to_response::<Bytes>("r")
                .headers()
                .contains_key(header::RETRY_AFTER)
        );
    }

    #[test]
    fn too_many_requests_has_retry_after_never_zero() {
        let resp = ProxyError::TooManyRequests {
            retry_after_secs: 7,
        }
        .to_response::<Bytes>("r");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        assert!(!resp.headers().contains_key(header::CONNECTION));
        let resp = ProxyError::TooManyRequests {
            retry_after_secs: 0,
        }
        .to_response::<Bytes>("r");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        push_json_string(&mut s, "a\"b\\c\n\u{1}");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
