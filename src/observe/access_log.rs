//! One access-log line per request, written when the response body is dropped, so duration,
//! bytes and the outcome cover the whole stream, not just the headers. A tunnel's line (status
//! 101) is written when the tunnel closes: its bytes are those carried each way, its outcome
//! how it ended (`stream::upgrade`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::tokens::Usage;
use crate::body::BodyError;
use crate::observe::http::StreamEnd;

/// How an exchange ended, as one word for grepping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
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
    /// An event stream rampart ended with a final event, or that carried an in-band error.
    Stream(StreamEnd),
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
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
            Outcome::Stream(how) => match how {
                StreamEnd::FirstEventTimeout => "stream_first_event_timeout",
                StreamEnd::Stalled => "stream_stalled",
                StreamEnd::MaxDuration => "stream_max_duration",
                StreamEnd::UpstreamError => "upstream_reset",
                StreamEnd::InBandError => "stream_in_band_error",
                StreamEnd::Drain => "drained",
                StreamEnd::ClientGone => "client_aborted",
                StreamEnd::Complete => "ok",
            },
        }
    }
}

#[derive(Debug)]
pub(crate) struct AccessRecord {
    pub start: Instant,
    pub listener: Arc<str>,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub method: http::Method,
    /// The path and query, shared with the request (no copy): both are cut (and the query
    /// escaped) only when the line is written.
    pub uri: http::uri::PathAndQuery,
    /// The address rate limits count (the peer, or X-Forwarded-For from trusted proxies).
    pub client: IpAddr,
    pub user_agent: Option<http::HeaderValue>,
    pub version: http::Version,
    /// Where the rate-limit decision came from, when the route has policies.
    pub ratelimit: Option<&'static str>,
    /// What the route's cache did (HIT, MISS, STALE, BYPASS), when it has one.
    pub cache: Option<&'static str>,
    pub status: u16,
    pub request_id: http::HeaderValue,
    pub ttfb: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The LLM answer's token counts, when its body carried them (`stream::usage`).
    pub usage: Option<Usage>,
    pub outcome: Outcome,
}

impl AccessRecord {
    /// The record of a request just read, before any route, answer or byte of body.
    pub(crate) fn begin<B>(
        start: Instant,
        listener: Arc<str>,
        req: &http::Request<B>,
        client: IpAddr,
        request_id: http::HeaderValue,
    ) -> Self {
        AccessRecord {
            start,
            listener,
            route: None,
            upstream: None,
            method: req.method().clone(),
            uri: req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            client,
            user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
            version: req.version(),
            ratelimit: None,
            cache: None,
            status: 0,
            request_id,
            ttfb: None,
            bytes_in: 0,
            bytes_out: 0,
            usage: None,
            outcome: Outcome::Streaming,
        }
    }

    pub(crate) fn body_complete(&mut self) {
        // Idempotent: a body may report its end twice (last frame, then None).
        if self.outcome == Outcome::Streaming {
            self.outcome = Outcome::Ok;
        }
    }

    /// How an event stream ended, when that says more than `ok` (see `Tail::on_stream_end`).
    pub(crate) fn stream_ended(&mut self, how: StreamEnd) {
        if matches!(self.outcome, Outcome::Streaming | Outcome::Ok) {
            self.outcome = Outcome::Stream(how);
        }
    }

    /// Copies out what the record shares with the request head. hyper reads a head into a
    /// buffer (8 KiB) and hands out slices of it: while one slice lives, the whole buffer
    /// does. Kept for a stream's life, the path and the user agent would hold 8 KiB per
    /// open stream; copied, they hold their own few bytes.
    pub(crate) fn detach(&mut self) {
        self.uri = detached_path(&self.uri);
        self.user_agent = self.user_agent.as_ref().map(detached);
        self.request_id = detached(&self.request_id);
    }

    /// Before the record is dropped with the stream rampart ended (not failed: the upstream
    /// did nothing wrong).
    pub(crate) fn send_timed_out(&mut self) {
        if self.outcome == Outcome::Streaming {
            self.outcome = Outcome::SendTimeout;
        }
    }

    pub(crate) fn body_failed(&mut self, err: &BodyError) {
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

/// A header value in an allocation of its own (see [`AccessRecord::detach`]).
pub(crate) fn detached(v: &http::HeaderValue) -> http::HeaderValue {
    let mut copy = http::HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
    copy.set_sensitive(v.is_sensitive());
    copy
}

fn detached_path(p: &http::uri::PathAndQuery) -> http::uri::PathAndQuery {
    // Parsing what was parsed cannot fail; if it did, sharing is only a cost.
    http::uri::PathAndQuery::try_from(p.as_str()).unwrap_or_else(|_| p.clone())
}

/// The longest path and query string logged, in bytes.
const PATH_MAX: usize = 256;
const QUERY_MAX: usize = 256;

/// Milliseconds with microsecond precision: `0.292`, never `0.29184000000000004`.
fn millis(d: Duration) -> f64 {
    // Whole microseconds divided once: the nearest double to a 3-decimal number prints
    // as that number.
    d.as_micros() as f64 / 1000.0
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "h2",
        http::Version::HTTP_3 => "h3",
        _ => "h1",
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        if self.outcome == Outcome::Streaming {
            self.outcome = Outcome::ClientAborted;
        }
        // No status: the client left before the answer (nginx's 499), as the metrics count it.
        let status = if self.status == 0 { 499 } else { self.status };
        let duration = self.start.elapsed();
        // `&str` fields are written quoted and escaped (JSON strings in the JSON format):
        // a query or user agent cannot forge fields or lines.
        tracing::info!(
            target: "rampart::access",
            listener = &*self.listener,
            method = %self.method,
            path = %cut(self.uri.path(), PATH_MAX),
            query = self.uri.query().map(|q| cut(q, QUERY_MAX)),
            status,
            route = self.route.as_deref().unwrap_or("-"),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            client = %self.client,
            protocol = protocol(self.version),
            user_agent = self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
            ratelimit = self.ratelimit,
            cache = self.cache,
            duration_ms = millis(duration),
            ttfb_ms = self.ttfb.map(millis),
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            tokens_prompt = self.usage.map(|u| u.prompt),
            tokens_completion = self.usage.map(|u| u.completion),
            request_id = self.request_id.to_str().unwrap_or("-"),
            outcome = self.outcome.as_str(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;

    /// Lines written by the subscriber, shared with the test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What a stream keeps of its request must not point into the head's buffer, or the
    /// buffer (8 KiB, hyper's) lives as long as the stream.
    #[test]
    fn a_detached_record_shares_nothing_with_the_request_head() {
        let head = bytes::Bytes::from(
            b"/v1/chat?stream=1 curl/8.5 req-42 and the rest of an 8 KiB buffer".to_vec(),
        );
        let within = |p: *const u8| head.as_ptr_range().contains(&p);
        let mut r = record(None);
        r.uri = http::uri::PathAndQuery::from_maybe_shared(head.slice(0..17)).unwrap();
        r.user_agent = Some(http::HeaderValue::from_maybe_shared(head.slice(18..26)).unwrap());
        r.request_id = http::HeaderValue::from_maybe_shared(head.slice(27..33)).unwrap();
        r.request_id.set_sensitive(true);
        assert!(
            within(r.uri.as_str().as_ptr()),
            "the test shares to begin with"
        );
        r.detach();
        assert_eq!(r.uri.as_str(), "/v1/chat?stream=1");
        assert_eq!(r.user_agent.as_ref().unwrap(), "curl/8.5");
        assert_eq!(r.request_id, "req-42");
        assert!(r.request_id.is_sensitive());
        for p in [
            r.uri.as_str().as_ptr(),
            r.user_agent.as_ref().unwrap().as_bytes().as_ptr(),
            r.request_id.as_bytes().as_ptr(),
        ] {
            assert!(!within(p), "still points into the head");
        }
    }

    fn record(usage: Option<Usage>) -> AccessRecord {
        AccessRecord {
            start: Instant::now(),
            listener: "main".into(),
            route: Some("chat".into()),
            upstream: Some("llm".into()),
            method: http::Method::POST,
            uri: http::uri::PathAndQuery::from_static("/v1/chat/completions"),
            client: IpAddr::from([127, 0, 0, 1]),
            user_agent: None,
            version: http::Version::HTTP_11,
            ratelimit: None,
            cache: None,
            status: 200,
            request_id: http::HeaderValue::from_static("req-1"),
            ttfb: None,
            bytes_in: 10,
            bytes_out: 20,
            usage,
            outcome: Outcome::Ok,
        }
    }

    /// The line `record` writes when dropped, in the text format or the JSON one, as
    /// `main` sets them up (without colour).
    fn line(json: bool, usage: Option<Usage>) -> String {
        let lines = Lines::default();
        let out = lines.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || out.clone());
        let write = || drop(record(usage));
        if json {
            tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), write);
        } else {
            tracing::subscriber::with_default(builder.finish(), write);
        }
        let bytes = lines.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn token_counts_are_logged_when_the_answer_had_them() {
        let usage = Some(Usage {
            prompt: 120,
            completion: 30,
        });
        let text = line(false, usage);
        assert!(
            text.contains(" bytes_out=20 tokens_prompt=120 tokens_completion=30 "),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&line(true, usage)).unwrap();
        assert_eq!(json["tokens_prompt"], 120, "{json}");
        assert_eq!(json["tokens_completion"], 30, "{json}");
        assert_eq!(json["bytes_out"], 20, "{json}");

        let text = line(false, None);
        assert!(text.contains(" bytes_out=20 "), "{text}");
        assert!(!text.contains("tokens_"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&line(true, None)).unwrap();
        assert!(json.get("tokens_prompt").is_none(), "{json}");
        assert!(json.get("tokens_completion").is_none(), "{json}");
    }
}
