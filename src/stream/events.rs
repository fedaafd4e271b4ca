//! An upstream's event stream (`text/event-stream`) under the route's `stream:` timers
//! (issue 16): first event, silence between events, whole duration; heartbeats into quiet
//! streams; in-band `event: error` frames told to the breaker.
//!
//! Every way the stream can end early gives the client a well-formed final event, never
//! half an event: the bytes of the event under way are held back until its blank line
//! arrives (at most `partial_event_buffer` of them), so what the client has received
//! always ends between two events, and a final `event: error` (or a heartbeat) can be
//! written at any moment. The bytes forwarded are the upstream's, unchanged, only cut at
//! event boundaries. An event larger than the buffer is forwarded as it comes; a failure in
//! its middle then cuts the connection, as for any other body (a truncated event must not
//! look complete).
//!
//! Timers are polled only while the upstream has nothing to read, so a client that reads
//! slowly never makes a healthy upstream look stalled (the send timeout deals with that
//! client). One `Sleep` per stream is armed at the nearest deadline and re-armed lazily
//! when it fires early, so an event costs no timer update; and as events only move the
//! deadlines later (but for the first event, and the end of an oversize one), a poll with
//! the sleep armed, not fired and registered for the same task touches no timer at all.
//!
//! The route's own body timers (`timeouts.idle`, the wait for the upstream's next bytes,
//! and `timeouts.total`) are deadlines of the same `Sleep`, not a `TimedBody` around the
//! upstream's body as for other answers: a second timer and a second layer of polling for
//! every event (~170 instructions per event, and a timer entry per stream).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::body::BodyError;
use crate::config::StreamConfig;
use crate::h1::Waits;
use crate::observe::http::{RouteMetrics, StreamEnd};
use crate::stream::sse::Scanner;
use crate::stream::usage::{StreamUsage, Usage};

/// What a heartbeat writes: a comment, then a blank line, which between two events
/// dispatches nothing.
const HEARTBEAT: &[u8] = b": keep-alive\n\n";

/// An answer is an event stream: a 200 `text/event-stream` without a Content-Length.
/// Decided on the head, not on what the body happens to know of its length.
pub(crate) fn is_event_stream(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::OK
        && !headers.contains_key(header::CONTENT_LENGTH)
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .get(..17)
                    .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
            })
}

/// What the request's tail learns from the stream as it goes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct News {
    /// In-band error events seen since the last call: the upstream failed, status 200 or not.
    pub(crate) in_band_errors: usize,
    /// The stream ended (once), and how.
    pub(crate) ended: Option<StreamEnd>,
}

/// An event stream's body: the upstream's, dropped (its connection closed, never pooled)
/// the moment a timer ends the stream.
pub(crate) struct EventStream<B> {
    body: Option<B>,
    guard: Guard,
}

// Fields in this order (`repr(C)`), the ones every event reads or writes first: with 1,000
// streams a stream's state has left the cache by its next event, and each line it touches
// is a miss (callgrind's cache simulation counted six lines of this struct per event in
// the compiler's order, four in this one). `align(64)` starts it on a line.
#[repr(C, align(64))]
struct Guard {
    /// The last frame left the upstream's body waiting and the timers armed for the task
    /// (`h1::Waits`).
    waits: bool,
    /// Nothing more goes to the client.
    done: bool,
    /// A deadline may have moved earlier than `sleep`'s: the next poll re-arms it.
    rearm: bool,
    /// The event under way outgrew `held` and is being forwarded as it comes: until its end,
    /// nothing can be inserted.
    oversize: bool,
    /// An in-band error event was seen: if the upstream then ends the stream, that is how it
    /// ended.
    saw_in_band: bool,
    ended: Option<StreamEnd>,
    events: u64,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Since when rampart waits for the upstream's next bytes (`timeouts.idle`); None
    /// while it does not (the last chunk came with more behind it).
    waiting_since: Option<Instant>,
    cfg: Arc<StreamConfig>,
    metrics: Arc<RouteMetrics>,
    /// The task `sleep` last registered with, when it was polled (with coop budget left, so
    /// it did register) since its last reset or firing.
    registered: Option<Waker>,
    /// The last complete event (or, with `comments_are_activity`, comment).
    last_activity: Instant,
    /// The last event, for the gap histogram.
    last_event: Instant,
    /// Bytes last handed to the client (for heartbeats).
    last_sent: Instant,
    /// The event under way, not yet forwarded.
    held: BytesMut,
    scanner: Scanner,
    /// The token counts, read from the events the scanner follows (route `tokens:`).
    usage: Option<StreamUsage>,
    /// The response headers went out.
    started: Instant,
    news: News,
    request_id: HeaderValue,
    /// The route's `timeouts.idle`: the longest wait for the upstream's next bytes (also
    /// the answer's send timeout).
    idle: Duration,
    /// The route's `timeouts.total`, when set.
    deadline: Option<Instant>,
}

impl<B> Waits for EventStream<B> {
    fn waits(&self) -> bool {
        self.guard.waits
    }
}

/// The route's body timers, which the stream keeps with its own (see the module's note).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyTimers {
    /// `timeouts.idle`.
    pub(crate) idle: Duration,
    /// When `timeouts.total` ends the exchange.
    pub(crate) deadline: Option<Instant>,
}

impl<B> EventStream<B>
where
    B: Body<Data = Bytes> + Waits + Unpin,
    B::Error: Into<BodyError>,
{
    pub(crate) fn new(
        body: B,
        timers: BodyTimers,
        cfg: Arc<StreamConfig>,
        request_id: HeaderValue,
        metrics: Arc<RouteMetrics>,
        count_tokens: bool,
    ) -> Self {
        let now = Instant::now();
        let scanner = Scanner::new(&cfg.error_events);
        EventStream {
            body: Some(body),
            guard: Guard {
                cfg,
                scanner,
                usage: count_tokens.then(StreamUsage::new),
                held: BytesMut::new(),
                oversize: false,
                started: now,
                last_activity: now,
                last_event: now,
                last_sent: now,
                events: 0,
                sleep: None,
                waiting_since: Some(now),
                registered: None,
                rearm: false,
                done: false,
                waits: false,
                news: News::default(),
                saw_in_band: false,
                ended: None,
                request_id,
                metrics,
                idle: timers.idle,
                deadline: timers.deadline,
            },
        }
    }

    /// The answer's send timeout (the route's `idle`), while the upstream's body is there.
    pub(crate) fn send_timeout(&self) -> Option<Duration> {
        self.body.as_ref().map(|_| self.guard.idle)
    }

    /// What happened since the last call (see `News`).
    pub(crate) fn take_news(&mut self) -> News {
        std::mem::take(&mut self.guard.news)
    }

    /// The stream's token counts, once (taken when it ended).
    pub(crate) fn take_usage(&mut self) -> Option<Usage> {
        self.guard.usage.take().and_then(|u| u.usage())
    }

    /// rampart's drain ended the stream with its own final event (`stream::finale`).
    pub(crate) fn drained(&mut self) {
        self.guard.end(StreamEnd::Drain);
    }

    /// What the client has been given ends between two events (false only while an event
    /// too large to hold back is being forwarded as it comes).
    pub(crate) fn client_at_boundary(&self) -> bool {
        !self.guard.oversize
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.guard.done
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let g = &mut self.guard;
        g.waits = false;
        if g.done {
            return Poll::Ready(None);
        }
        loop {
            let Some(body) = self.body.as_mut() else {
                g.done = true;
                return Poll::Ready(None);
            };
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let waits = body.waits();
                        if let Some(out) = g.on_data(data, waits) {
                            g.waits = waits && g.timers_armed(cx);
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        // All of it belongs to an event under way: read on.
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(Some(Err(e))) => {
                    // The upstream's own failure: the timers (`idle` and `total` too) end
                    // the stream in `poll_timers`, not through the body.
                    self.body = None;
                    return Poll::Ready(g.finish(StreamEnd::UpstreamError, e.into()));
                }
                Poll::Ready(None) => {
                    self.body = None;
                    let how = if g.saw_in_band {
                        StreamEnd::InBandError
                    } else {
                        StreamEnd::Complete
                    };
                    g.end(how);
                    g.done = true;
                    // An event the upstream never finished: its bytes as they were (a client
                    // discards an unfinished event at the end of a stream).
                    return Poll::Ready(if g.held.is_empty() {
                        None
                    } else {
                        Some(Ok(Frame::data(g.held.split().freeze())))
                    });
                }
                Poll::Pending => {
                    let polled = g.poll_timers(cx);
                    if g.done {
                        // A timer ended it: the upstream request is cancelled now.
                        self.body = None;
                    }
                    return polled;
                }
            }
        }
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The result of a poll that ends the stream.
type Ending = Option<Result<Frame<Bytes>, BodyError>>;

impl Guard {
    /// Follows `data`; returns what can go to the client now (None: nothing yet). `waits`:
    /// the upstream's body has nothing more for now.
    fn on_data(&mut self, data: Bytes, waits: bool) -> Option<Bytes> {
        let scan = match &mut self.usage {
            Some(usage) => self.scanner.feed_with(&data, usage),
            None => self.scanner.feed(&data),
        };
        // One reading per chunk, for the activity and the heartbeat timers alike: the
        // connection's poll's (`clock`), which the wait for the next bytes shares.
        let now = crate::clock::now();
        // The wait for the next bytes begins now when the body has none (as `TimedBody`'s
        // does), else at the poll that finds it has none (`poll_timers`).
        self.waiting_since = waits.then_some(now);
        if scan.events > 0 || (self.cfg.comments_are_activity && scan.comments > 0) {
            self.last_activity = now;
            if scan.events > 0 {
                if self.events == 0 {
                    // `between_events` now, which may end before `first_event`.
                    self.rearm = true;
                    self.metrics
                        .stream_first_event(now.saturating_duration_since(self.started));
                    if scan.events > 1 {
                        self.metrics
                            .stream_events_arrived(Duration::ZERO, scan.events - 1);
                    }
                } else {
                    self.metrics.stream_events_arrived(
                        now.saturating_duration_since(self.last_event),
                        scan.events,
                    );
                }
                self.last_event = now;
                self.events += scan.events as u64;
            }
        }
        if scan.errors > 0 {
            self.news.in_band_errors += scan.errors;
            self.saw_in_band = true;
        }
        let mut out = match scan.boundary {
            Some(b) => {
                if self.oversize {
                    // Heartbeats are due again.
                    self.oversize = false;
                    self.rearm = true;
                }
                // The chunk itself when it ends between events, as it mostly does.
                let mut head = data;
                let rest = head.split_off(b);
                let out = if self.held.is_empty() {
                    head
                } else {
                    self.held.extend_from_slice(&head);
                    self.held.split().freeze()
                };
                self.held.extend_from_slice(&rest);
                out
            }
            None if self.oversize => data,
            None => {
                self.held.extend_from_slice(&data);
                Bytes::new()
            }
        };
        if self.held.len() as u64 > self.cfg.partial_event_buffer {
            // Too large to hold: forwarded as it comes, and nothing is inserted until it
            // ends.
            self.oversize = true;
            out = if out.is_empty() {
                self.held.split().freeze()
            } else {
                let mut both = BytesMut::with_capacity(out.len() + self.held.len());
                both.extend_from_slice(&out);
                both.extend_from_slice(&self.held.split());
                both.freeze()
            };
        }
        if out.is_empty() {
            return None;
        }
        self.last_sent = now;
        Some(out)
    }

    /// The sleep is armed at or before every deadline (they only moved later since), has
    /// not fired, and will wake this task: a poll of the timers would find nothing to do.
    fn timers_armed(&self, cx: &Context<'_>) -> bool {
        match (&self.sleep, &self.registered) {
            (Some(sleep), Some(w)) => !self.rearm && !sleep.is_elapsed() && w.will_wake(cx.waker()),
            _ => false,
        }
    }

    /// The upstream has nothing to read: a timer may end the stream or send a heartbeat.
    fn poll_timers(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        // The sleep is armed only here, once a wait has begun: at or before that wait's
        // idle deadline, which a later wait only moves on. So a wait that begins needs no
        // re-arming, as an event needs none.
        if self.waiting_since.is_none() {
            self.waiting_since = Some(crate::clock::now());
        }
        if self.timers_armed(cx) {
            return Poll::Pending;
        }
        self.rearm = false;
        loop {
            let Some(next) = self.next_deadline() else {
                return Poll::Pending;
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
            if sleep.deadline() > next {
                sleep.as_mut().reset(next);
                self.registered = None;
            }
            // Out of coop budget, a sleep returns Pending without registering.
            let registers = tokio::task::coop::has_budget_remaining();
            if sleep.as_mut().poll(cx).is_pending() {
                if registers
                    && !self
                        .registered
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    self.registered = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            self.registered = None;
            let now = Instant::now();
            if self.max_at().is_some_and(|at| now >= at)
                || self.deadline.is_some_and(|at| now >= at)
            {
                return Poll::Ready(self.finish(StreamEnd::MaxDuration, BodyError::Total));
            }
            if self.activity_at().is_some_and(|at| now >= at)
                || self.idle_at().is_some_and(|at| now >= at)
            {
                let how = if self.events == 0 {
                    StreamEnd::FirstEventTimeout
                } else {
                    StreamEnd::Stalled
                };
                return Poll::Ready(self.finish(how, BodyError::Idle));
            }
            if self.heartbeat_at().is_some_and(|at| now >= at) {
                self.last_sent = now;
                self.metrics.stream_heartbeat();
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(HEARTBEAT)))));
            }
            // Woke for a deadline that has moved since (events came): sleep on to the next.
            if let Some(next) = self.next_deadline()
                && let Some(sleep) = self.sleep.as_mut()
            {
                sleep.as_mut().reset(next);
            }
            self.registered = None;
        }
    }

    fn max_at(&self) -> Option<Instant> {
        self.cfg.max_duration.map(|d| self.started + d)
    }

    /// When silence ends the stream: `first_event` before any event, `between_events`
    /// after.
    fn activity_at(&self) -> Option<Instant> {
        if self.events == 0 {
            self.cfg.first_event.map(|d| self.started + d)
        } else {
            self.cfg.between_events.map(|d| self.last_activity + d)
        }
    }

    /// When the route's `timeouts.idle` ends a wait for the upstream's bytes.
    fn idle_at(&self) -> Option<Instant> {
        self.waiting_since?.checked_add(self.idle)
    }

    /// Never inside an event being forwarded as it comes.
    fn heartbeat_at(&self) -> Option<Instant> {
        if self.oversize {
            return None;
        }
        self.cfg.heartbeat.map(|d| self.last_sent + d)
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.max_at(),
            self.deadline,
            self.activity_at(),
            self.idle_at(),
            self.heartbeat_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Ends the stream early for `how`: a final event when the client's bytes end between
    /// two events, else `err` (the connection is cut).
    fn finish(&mut self, how: StreamEnd, err: BodyError) -> Ending {
        self.end(how);
        self.done = true;
        self.held.clear();
        if self.oversize {
            return Some(Err(err));
        }
        let (code, message) = match how {
            StreamEnd::FirstEventTimeout => {
                ("STREAM_STALLED", "no event from the upstream in time")
            }
            StreamEnd::Stalled => ("STREAM_STALLED", "the upstream stopped sending events"),
            StreamEnd::MaxDuration => ("STREAM_TIMEOUT", "the stream reached its longest duration"),
            _ => ("UPSTREAM_BROKEN", "the upstream's stream broke"),
        };
        let request_id = self.request_id.to_str().unwrap_or("-");
        Some(Ok(Frame::data(final_event(
            code,
            message,
            request_id,
            crate::stream::finale::jitter(),
        ))))
    }

    /// Records how the stream ended (the first end only).
    fn end(&mut self, how: StreamEnd) {
        if self.ended.is_none() {
            self.ended = Some(how);
            self.news.ended = Some(how);
            self.metrics.stream_closed(how, self.events);
        }
    }
}

impl<B> Drop for EventStream<B> {
    fn drop(&mut self) {
        // Dropped before it ended: the client left (or was cut for taking no data).
        if self.guard.ended.is_none() {
            self.guard.ended = Some(StreamEnd::ClientGone);
            self.guard
                .metrics
                .stream_closed(StreamEnd::ClientGone, self.guard.events);
        }
    }
}

/// The final event of a stream rampart ends: an `error` event the client's code can show,
/// the request id to quote, and a spread reconnect delay. No `id:`, so the client's
/// Last-Event-ID stays the last real event.
pub(crate) fn final_event(code: &str, message: &str, request_id: &str, retry_ms: u64) -> Bytes {
    let request_id = serde_json::Value::from(request_id);
    Bytes::from(format!(
        "event: error\ndata: {{\"code\":\"{code}\",\"message\":\"{message}\",\"request_id\":{request_id}}}\nretry: {retry_ms}\n\n"
    ))
}
