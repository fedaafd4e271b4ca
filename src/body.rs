//! The body types both directions share, below the upstream client: the error a body
//! ends with, the timers a streaming body runs under, and the request body as the upstream
//! is sent it.
//!
//! Bodies that stream frame by frame under the route's timers.
//!
//! `TimedBody` wraps a streaming body (the client's request body or the upstream's response
//! body) with the idle timeout (longest wait for the peer's next frame), an optional absolute
//! deadline (the route's `total`), an optional byte limit and, for request bodies, a minimum
//! rate. It never buffers: each frame is handed on as soon as it arrives, which is what keeps
//! SSE events live. An error it yields makes hyper abort the other side, so a cut stream is
//! never passed off as a clean end.
//!
//! Its clocks only run while rampart WAITS FOR THE PEER (the body was asked for a frame and
//! had none): time the other side spends not taking data (an upstream slow to read the
//! request, a client slow to read the response) is never held against this side. That other
//! time has its own timers: the first-byte timer for the upstream (`upstream::forward`, which reads
//! the request body's [`Upload`] state), the send timeout for the client (the socket in
//! `server`, and [`ProxyBody::watch_sends`] for HTTP/2 streams).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

#[derive(Debug, thiserror::Error)]
/// How a response from an upstream connection broke; defined here, below the client, because
/// a body ends with it.
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed before a complete response head")]
    ClosedBeforeHead,
    /// Not a byte of an answer came before the close (or reset): a pooled connection the
    /// upstream was closing as the request went out.
    #[error("connection closed without an answer")]
    Unanswered,
    #[error("connection closed before the end of the response body")]
    ClosedInBody,
    #[error("invalid response from upstream: {0}")]
    Invalid(&'static str),
    /// From hyper's client (`upstreams.<name>.client: hyper`).
    #[error(transparent)]
    Hyper(hyper::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("no body data for longer than the idle timeout")]
    Idle,
    #[error("the route's total timeout elapsed")]
    Total,
    #[error("request body slower than the route's minimum rate")]
    Slow,
    #[error("the client took no data for longer than the send timeout")]
    SendTimeout,
    #[error("body larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("request body length differs from its Content-Length")]
    Length,
    #[error("{0}")]
    Inner(#[from] hyper::Error),
    /// From rampart's HTTP/1.1 server (`listeners[].http1_server: rampart`).
    #[error("{0}")]
    Client(#[from] crate::h1::BodyError),
    #[error("{0}")]
    Upstream(#[from] WireError),
}

/// A request body's minimum rate (`timeouts.min_body_rate`): once the body has made rampart
/// wait longer than the idle timeout (`timeouts.body`) in all, it must have sent `per_sec`
/// bytes for every second waited beyond that. Apache's mod_reqtimeout rule: the client may
/// take `body` + received / rate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MinRate {
    pub per_sec: u64,
}

/// The earliest of "idle timeout since the wait began", "absolute deadline" and "minimum rate
/// broken", on ONE timer that is only re-armed when it fires (not on every frame), and only
/// created the first time the body has nothing ready: a small response that arrives whole
/// never touches the clock or the timer wheel.
struct Timers {
    idle: Duration,
    deadline: Option<Instant>,
    min_rate: Option<MinRate>,
    armed: Option<Armed>,
}

struct Armed {
    sleep: Pin<Box<Sleep>>,
    /// The task the sleep is registered to wake: while it has not fired and the same task
    /// polls, polling it again only re-registers the same waker (most of a streamed frame's
    /// timer cost), so it is skipped.
    registered: Option<std::task::Waker>,
    /// Waiting for the peer since then; None while the last poll gave a frame.
    waiting_since: Option<Instant>,
    /// Time waited before `waiting_since` (kept for the minimum rate only).
    waited: Duration,
}

impl Timers {
    fn new(idle: Duration, deadline: Option<Instant>, min_rate: Option<MinRate>) -> Self {
        Timers {
            idle,
            deadline,
            min_rate,
            armed: None,
        }
    }

    /// When the minimum rate is broken if the wait that began at `since` goes on, with
    /// `seen` bytes received and `waited` waited before.
    fn rate_limit_at(&self, since: Instant, waited: Duration, seen: u64) -> Option<Instant> {
        let rate = self.min_rate?;
        let nanos = u128::from(seen) * 1_000_000_000 / u128::from(rate.per_sec.max(1));
        let earned = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        let allowed = self.idle.saturating_add(earned).saturating_sub(waited);
        since.checked_add(allowed)
    }

    fn next_wake(&self, since: Instant, waited: Duration, seen: u64) -> Instant {
        [
            since.checked_add(self.idle),
            self.deadline,
            self.rate_limit_at(since, waited, seen),
        ]
        .into_iter()
        .flatten()
        .min()
        // Only when every limit is beyond the clock's range (the config bounds them far
        // below): look again in a year, never spin.
        .or_else(|| since.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(since)
    }

    /// A frame arrived: the wait is over (only tracked once the timer exists).
    fn frame(&mut self) {
        let rated = self.min_rate.is_some();
        if let Some(a) = &mut self.armed
            && let Some(since) = a.waiting_since.take()
            && rated
        {
            a.waited = a.waited.saturating_add(since.elapsed());
        }
    }

    /// The body has nothing ready: Ready(err) once a limit really passed; Pending (waker
    /// registered) otherwise. `seen` is the bytes received so far.
    fn poll_expired(&mut self, cx: &mut Context<'_>, seen: u64) -> Poll<BodyError> {
        if self.armed.is_none() {
            let now = crate::clock::now();
            let wake = self.next_wake(now, Duration::ZERO, seen);
            self.armed = Some(Armed {
                sleep: Box::pin(tokio::time::sleep_until(wake)),
                registered: None,
                waiting_since: Some(now),
                waited: Duration::ZERO,
            });
        }
        let (since, waited) = match &mut self.armed {
            Some(a) => (
                *a.waiting_since.get_or_insert_with(crate::clock::now),
                a.waited,
            ),
            None => return Poll::Pending,
        };
        // A new wait ends no earlier than the timer set for an earlier one (every limit only
        // moves later), so the timer is left alone until it fires.
        loop {
            let Some(armed) = self.armed.as_mut() else {
                return Poll::Pending;
            };
            if armed
                .registered
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
                && !armed.sleep.is_elapsed()
            {
                return Poll::Pending;
            }
            if armed.sleep.as_mut().poll(cx).is_pending() {
                armed.registered = Some(cx.waker().clone());
                return Poll::Pending;
            }
            armed.registered = None;
            let now = Instant::now();
            if self.deadline.is_some_and(|d| now >= d) {
                return Poll::Ready(BodyError::Total);
            }
            if since.checked_add(self.idle).is_some_and(|t| now >= t) {
                return Poll::Ready(BodyError::Idle);
            }
            if self
                .rate_limit_at(since, waited, seen)
                .is_some_and(|t| now >= t)
            {
                return Poll::Ready(BodyError::Slow);
            }
            let next = self.next_wake(since, waited, seen);
            if let Some(armed) = self.armed.as_mut() {
                armed.sleep.as_mut().reset(next);
            }
        }
    }
}

pub(crate) struct TimedBody<B> {
    inner: B,
    timers: Timers,
    limit: Option<u64>,
    seen: u64,
    done: bool,
    /// A streamed request body's progress, for the first-byte timer (made on demand).
    upload: Option<Arc<Upload>>,
    /// The last frame left the inner body waiting and the timers armed for the task
    /// (`h1::Waits`).
    waits: bool,
}

impl<B> TimedBody<B> {
    /// A response body: `idle` is the longest wait for the upstream's next frame.
    pub(crate) fn new(
        inner: B,
        idle: Duration,
        deadline: Option<Instant>,
        limit: Option<u64>,
    ) -> Self {
        TimedBody {
            inner,
            timers: Timers::new(idle, deadline, None),
            limit,
            seen: 0,
            done: false,
            upload: None,
            waits: false,
        }
    }

    /// A request body: `wait` is the longest wait for the client's next bytes (also the grace
    /// of `min_rate`).
    pub(crate) fn request(
        inner: B,
        wait: Duration,
        min_rate: Option<MinRate>,
        deadline: Option<Instant>,
        limit: u64,
    ) -> Self {
        TimedBody {
            inner,
            timers: Timers::new(wait, deadline, min_rate),
            limit: Some(limit),
            seen: 0,
            done: false,
            upload: None,
            waits: false,
        }
    }

    /// The longest wait for the peer's next frame.
    pub(crate) fn idle(&self) -> Duration {
        self.timers.idle
    }

    fn progress(&self, state: UploadState) {
        if let Some(u) = &self.upload {
            u.set(state);
        }
    }
}

impl<B> crate::h1::Waits for TimedBody<B> {
    fn waits(&self) -> bool {
        self.waits
    }
}

// Request bodies and hyper's are never asked (only the server's response bodies are).
impl crate::h1::Waits for ClientBody {}
impl crate::h1::Waits for Incoming {}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + crate::h1::Waits + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        this.waits = false;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if let Some(limit) = this.limit
                        && this.seen > limit
                    {
                        this.done = true;
                        return Poll::Ready(Some(Err(BodyError::TooLarge(limit))));
                    }
                }
                this.timers.frame();
                if this.upload.is_some() {
                    let now = Instant::now();
                    this.progress(if this.inner.is_end_stream() {
                        UploadState::Done(now)
                    } else {
                        UploadState::Upstream(now)
                    });
                } else if this.inner.waits() {
                    // The wait for the next frame begins now, as it would at the next poll:
                    // its timer armed for this task, the body waits too. (A limit that
                    // passed is left for that next poll to report.)
                    this.waits = this.timers.poll_expired(cx, this.seen).is_pending();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.done = true;
                if this.upload.is_some() {
                    this.progress(UploadState::Done(Instant::now()));
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.progress(UploadState::Client);
                match this.timers.poll_expired(cx, this.seen) {
                    Poll::Ready(err) => {
                        this.done = true;
                        Poll::Ready(Some(Err(err)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where a streamed request body stands, for the first-byte timer (`forward::send`), which
/// runs from the body's last byte and never while rampart waits for the client.
pub(crate) struct Upload(Mutex<UploadState>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadState {
    /// Waiting for the client's next bytes: the body's own timers govern.
    Client,
    /// Bytes for the upstream since this time (the head, or a piece of the body) and the body
    /// has not been asked for more since: the upstream is not taking the request.
    Upstream(Instant),
    /// The whole body was handed on at this time.
    Done(Instant),
}

impl Upload {
    fn lock(&self) -> MutexGuard<'_, UploadState> {
        // A plain value: a panic elsewhere cannot leave it half-written.
        crate::sync::lock(&self.0)
    }

    pub(crate) fn new(state: UploadState) -> Self {
        Upload(Mutex::new(state))
    }

    pub(crate) fn state(&self) -> UploadState {
        *self.lock()
    }

    pub(crate) fn set(&self, state: UploadState) {
        *self.lock() = state;
    }
}

/// A client's request body, from whichever HTTP/1.1 server read the request (or hyper's
/// HTTP/2).
#[derive(Debug)]
pub(crate) enum ClientBody {
    Hyper(Incoming),
    Rampart(crate::h1::Body),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::Inner),
            ClientBody::Rampart(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::Client),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Rampart(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Rampart(b) => b.size_hint(),
        }
    }
}

/// The request body sent upstream: streamed under timers, or already buffered.
pub(crate) enum RequestBody {
    Empty,
    Full(Option<Bytes>),
    /// Boxed: 192 bytes inline made every request 150 bytes larger, and a request is held
    /// twice in its future (to send, and as sent for a retry) and moved several times.
    Stream(Box<TimedBody<ClientBody>>),
}

impl RequestBody {
    /// For the first-byte timer: a streamed body's progress (None when the body is here
    /// whole, or empty). Each call starts an attempt: the head goes out first.
    pub(crate) fn upload(&mut self) -> Option<Arc<Upload>> {
        let RequestBody::Stream(s) = self else {
            return None;
        };
        let now = Instant::now();
        let u = s
            .upload
            .get_or_insert_with(|| Arc::new(Upload::new(UploadState::Upstream(now))));
        u.set(UploadState::Upstream(now));
        Some(u.clone())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Stream(s) => Pin::new(&mut **s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Full(b) => b.is_none(),
            RequestBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RequestBody::Full(None) => SizeHint::with_exact(0),
            RequestBody::Stream(s) => s.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn expired(t: &mut Timers, seen: u64) -> BodyError {
        std::future::poll_fn(|cx| t.poll_expired(cx, seen)).await
    }

    #[tokio::test(start_paused = true)]
    async fn timers_report_idle_then_total() {
        let start = Instant::now();
        let mut t = Timers::new(secs(2), Some(start + secs(5)), None);
        let err = expired(&mut t, 0).await;
        assert!(matches!(err, BodyError::Idle));
        assert_eq!(Instant::now() - start, secs(2));

        let mut t = Timers::new(secs(2), Some(start + secs(5)), None);
        // Activity keeps the idle timer from firing; the deadline still wins.
        let waiter = async {
            std::future::poll_fn(|cx| {
                t.frame();
                t.poll_expired(cx, 0)
            })
            .await
        };
        let err = waiter.await;
        assert!(matches!(err, BodyError::Total));
        assert_eq!(Instant::now() - start, secs(5));
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Polls once (the body had nothing), waits `for_` with no poll (the other side was not
    /// taking data), then a frame arrives.
    fn wait_then_frame(t: &mut Timers, seen: u64) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(t.poll_expired(&mut cx, seen).is_pending());
        t.frame();
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_clock_runs_only_while_waiting_for_the_peer() {
        let mut t = Timers::new(secs(2), None, None);
        wait_then_frame(&mut t, 0);
        // Five seconds in which nobody asked this body for a frame (the other side was slow).
        tokio::time::advance(secs(5)).await;
        let start = Instant::now();
        let err = expired(&mut t, 0).await;
        assert!(matches!(err, BodyError::Idle));
        assert_eq!(Instant::now() - start, secs(2), "counted from the new wait");
    }

    #[tokio::test(start_paused = true)]
    async fn the_minimum_rate_applies_after_the_grace_to_the_time_waited() {
        // 1 byte a second against 500 B/s with 10 s of grace: 10 s + 10 bytes / 500 B/s.
        let start = Instant::now();
        let mut t = Timers::new(secs(10), None, Some(MinRate { per_sec: 500 }));
        let mut seen = 0;
        let err = loop {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(e) = t.poll_expired(&mut cx, seen) {
                break e;
            }
            tokio::time::advance(secs(1)).await;
            if let Poll::Ready(e) = t.poll_expired(&mut cx, seen) {
                break e;
            }
            t.frame();
            seen += 1;
            assert!(seen < 100, "never cut");
        };
        assert!(matches!(err, BodyError::Slow), "{err:?}");
        assert_eq!(Instant::now() - start, secs(11));

        // 5 KB a second passes, however long it runs: the allowance grows faster than time.
        let mut t = Timers::new(secs(10), None, Some(MinRate { per_sec: 500 }));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for i in 1..=120 {
            assert!(t.poll_expired(&mut cx, i * 5000).is_pending());
            tokio::time::advance(secs(1)).await;
            assert!(
                t.poll_expired(&mut cx, i * 5000).is_pending(),
                "cut at {i} s"
            );
            t.frame();
        }

        // Time the upstream spent not reading is not waited time.
        let mut t = Timers::new(secs(10), None, Some(MinRate { per_sec: 500 }));
        wait_then_frame(&mut t, 0);
        tokio::time::advance(secs(60)).await;
        let start = Instant::now();
        let err = expired(&mut t, 0).await;
        assert!(matches!(err, BodyError::Idle | BodyError::Slow));
        assert_eq!(Instant::now() - start, secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_beyond_the_clock_never_overflows() {
        let mut t = Timers::new(secs(2), None, Some(MinRate { per_sec: 1 }));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(t.poll_expired(&mut cx, u64::MAX).is_pending());
        let err = expired(&mut t, u64::MAX).await;
        assert!(matches!(err, BodyError::Idle));
    }
}
