//! One access-log line per request, written when the response body is dropped, so duration,
//! bytes and the outcome cover the whole stream, not just the headers. A tunnel's line (status
//! 101) is written when the tunnel closes: its bytes are those carried each way, its outcome
//! how it ended (`proxy::upgrade`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::proxy::body::BodyError;

/// How an exchange ended, as one word for grepping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Headers sent, body still flowing (never logged as such: see Drop).
    Streaming,
    Ok,
    /// The client went away before the body ended.
    ClientAborted,
    /// The upstream failed after the response started; the client saw a cut stream.
    UpstreamReset,
    IdleTimeout,
    TotalTimeout,
    /// An SSE stream rampart ended with a final event at the drain deadline.
    Drained,
    /// The client took no data for the send timeout (the route's `idle`): rampart ended the
    /// stream and released the upstream connection.
    SendTimeout,
    /// A tunnel (after a 101) the client closed first.
    ClientClosed,
    /// A tunnel the upstream closed first.
    UpstreamClosed,
    /// Answered by rampart itself with this error code.
    Local(&'static str),
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Streaming => "streaming",
            Outcome::Ok => "ok",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamReset => "upstream_reset",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::TotalTimeout => "total_timeout",
            Outcome::Drained => "drained",
            Outcome::SendTimeout => "send_timeout",
            Outcome::ClientClosed => "client_closed",
            Outcome::UpstreamClosed => "upstream_closed",
            Outcome::Local(code) => code,
        }
    }
}

#[derive(Debug)]
pub struct AccessRecord {
    pub start: Instant,
    pub listener: Arc<str>,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub request_id: http::HeaderValue,
    pub ttfb: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub outcome: Outcome,
}

impl AccessRecord {
    pub fn body_complete(&mut self) {
        // Idempotent: a body may report its end twice (last frame, then None).
        if self.outcome == Outcome::Streaming {
            self.outcome = Outcome::Ok;
        }
    }

    /// Before the record is dropped with the stream rampart ended (not failed: the upstream
    /// did nothing wrong).
    pub fn send_timed_out(&mut self) {
        if self.outcome == Outcome::Streaming {
            self.outcome = Outcome::SendTimeout;
        }
    }

    pub fn body_failed(&mut self, err: &BodyError) {
        self.outcome = match err {
            BodyError::Idle => Outcome::IdleTimeout,
            BodyError::Total => Outcome::TotalTimeout,
            _ => Outcome::UpstreamReset,
        };
        tracing::warn!(
            request_id = self.request_id.to_str().unwrap_or("-"),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            bytes_out = self.bytes_out,
            error = %err,
            "response aborted after it started"
        );
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        if self.outcome == Outcome::Streaming {
            self.outcome = Outcome::ClientAborted;
        }
        let duration = self.start.elapsed();
        tracing::info!(
            target: "rampart::access",
            listener = &*self.listener,
            method = %self.method,
            path = %self.path,
            status = self.status,
            route = self.route.as_deref().unwrap_or("-"),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            duration_ms = duration.as_secs_f64() * 1000.0,
            ttfb_ms = self.ttfb.map(|t| t.as_secs_f64() * 1000.0),
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            request_id = self.request_id.to_str().unwrap_or("-"),
            outcome = self.outcome.as_str(),
        );
    }
}
