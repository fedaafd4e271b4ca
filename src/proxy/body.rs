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
//! time has its own timers: the first-byte timer for the upstream (`forward.rs`, which reads
//! the request body's [`Upload`] state), the send timeout for the client (the socket in
//! `server`, and [`ProxyBody::watch_sends`] for HTTP/2 streams).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::task::AbortHandle;
use tokio::time::{Instant, Sleep};

use crate::proxy::pool::PooledBody;
use crate::proxy::tail::Tail;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
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
    #[error("{0}")]
    Upstream(#[from] crate::proxy::client::WireError),
}

/// A request body's minimum rate (`timeouts.min_body_rate`): once the body has made rampart
/// wait longer than the idle timeout (`timeouts.body`) in all, it must have sent `per_sec`
/// bytes for every second waited beyond that. Apache's mod_reqtimeout rule: the client may
/// take `body` + received / rate.
#[derive(Debug, Clone, Copy)]
pub struct MinRate {
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
            let now = Instant::now();
            let wake = self.next_wake(now, Duration::ZERO, seen);
            self.armed = Some(Armed {
                sleep: Box::pin(tokio::time::sleep_until(wake)),
                waiting_since: Some(now),
                waited: Duration::ZERO,
            });
        }
        let (since, waited) = match &mut self.armed {
            Some(a) => (*a.waiting_since.get_or_insert_with(Instant::now), a.waited),
            None => return Poll::Pending,
        };
        // A new wait ends no earlier than the timer set for an earlier one (every limit only
        // moves later), so the timer is left alone until it fires.
        loop {
            let Some(armed) = self.armed.as_mut() else {
                return Poll::Pending;
            };
            ready!(armed.sleep.as_mut().poll(cx));
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

pub struct TimedBody<B> {
    inner: B,
    timers: Timers,
    limit: Option<u64>,
    seen: u64,
    done: bool,
    /// A streamed request body's progress, for the first-byte timer (made on demand).
    upload: Option<Arc<Upload>>,
}

impl<B> TimedBody<B> {
    /// A response body: `idle` is the longest wait for the upstream's next frame.
    pub fn new(inner: B, idle: Duration, deadline: Option<Instant>, limit: Option<u64>) -> Self {
        TimedBody {
            inner,
            timers: Timers::new(idle, deadline, None),
            limit,
            seen: 0,
            done: false,
            upload: None,
        }
    }

    /// A request body: `wait` is the longest wait for the client's next bytes (also the grace
    /// of `min_rate`).
    pub fn request(
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
        }
    }

    /// The longest wait for the peer's next frame.
    pub fn idle(&self) -> Duration {
        self.timers.idle
    }

    fn progress(&self, state: UploadState) {
        if let Some(u) = &self.upload {
            u.set(state);
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
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
pub struct Upload(Mutex<UploadState>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadState {
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

    pub fn state(&self) -> UploadState {
        *self.lock()
    }

    pub(crate) fn set(&self, state: UploadState) {
        *self.lock() = state;
    }
}

/// The request body sent upstream: streamed under timers, or already buffered.
pub enum RequestBody {
    Empty,
    Full(Option<Bytes>),
    Stream(TimedBody<Incoming>),
}

impl RequestBody {
    /// For the first-byte timer: a streamed body's progress (None when the body is here
    /// whole, or empty). Each call starts an attempt: the head goes out first.
    pub fn upload(&mut self) -> Option<Arc<Upload>> {
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
            RequestBody::Stream(s) => Pin::new(s).poll_frame(cx),
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

enum Kind {
    Full(Option<Bytes>),
    Upstream(TimedBody<PooledBody>),
    /// An upstream body on a connection that is not pooled (a declined upgrade).
    Direct(TimedBody<Incoming>),
    /// Under a send-timeout watchdog (HTTP/2, see `watch_sends`): shared with it.
    Watched(Box<Watched>),
}

/// Every response rampart sends: a local answer or the upstream's streamed body. It carries
/// the request's `Tail` (access log, breaker verdict, in-flight slots), settled when hyper
/// drops the body (finished, failed or abandoned by the client).
pub struct ProxyBody {
    kind: Kind,
    tail: Option<Box<Tail>>,
    /// Released when the exchange is over for rampart: the body ended, failed, was dropped,
    /// or was cut for a client that took no data (the server's count of a connection's open
    /// HTTP/2 streams).
    held: Option<Box<dyn Send>>,
    /// HTTP/2: the send timeout, watched from the first frame handed on with more to come.
    watch: Option<Duration>,
    /// HTTP/1: set by the connection when it closed for the send timeout, so the access log
    /// says `send_timeout` rather than `client_aborted`.
    conn_timed_out: Option<Arc<AtomicBool>>,
}

impl ProxyBody {
    fn with_kind(kind: Kind) -> Self {
        ProxyBody {
            kind,
            tail: None,
            held: None,
            watch: None,
            conn_timed_out: None,
        }
    }

    pub fn full(bytes: Bytes) -> Self {
        ProxyBody::with_kind(Kind::Full(Some(bytes)))
    }

    pub fn empty() -> Self {
        ProxyBody::with_kind(Kind::Full(None))
    }

    pub fn upstream(body: TimedBody<PooledBody>) -> Self {
        ProxyBody::with_kind(Kind::Upstream(body))
    }

    pub fn direct(body: TimedBody<Incoming>) -> Self {
        ProxyBody::with_kind(Kind::Direct(body))
    }

    pub fn with_tail(mut self, tail: Box<Tail>) -> Self {
        self.tail = Some(tail);
        self
    }

    /// `with_tail` in place: a response is large to move.
    pub fn set_tail(&mut self, tail: Box<Tail>) {
        self.tail = Some(tail);
    }

    /// rampart ended this stream itself at the drain deadline (server::finale), so the access
    /// log says `drained`, not `client_aborted`.
    pub fn mark_drained(&mut self) {
        let mut shared;
        let tail = match &self.kind {
            Kind::Watched(w) => {
                shared = w.lock();
                &mut shared.tail
            }
            _ => &mut self.tail,
        };
        if let Some(log) = tail.as_deref_mut().and_then(|t| t.log.as_mut()) {
            log.outcome = crate::proxy::access_log::Outcome::Drained;
        }
    }

    /// The send timeout for this answer: how long the client may take no data (the route's
    /// `idle`, nginx's `send_timeout`). None for answers rampart makes itself.
    pub fn send_timeout(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Upstream(s) => Some(s.idle()),
            Kind::Direct(s) => Some(s.idle()),
            Kind::Full(_) | Kind::Watched(_) => None,
        }
    }

    /// For an HTTP/2 stream, whose body hyper does not poll while the client's flow-control
    /// window is shut: once a frame has been handed on with more to come, a watchdog ends the
    /// exchange (upstream connection closed, tail settled, `held` released) if the client has
    /// not taken it within the send timeout. An SSE stream waiting for its upstream is not
    /// waiting for its client, and is left to `idle`.
    pub fn watch_sends(&mut self) {
        self.watch = self.send_timeout();
    }

    /// Keeps `held` until the exchange is over for rampart (see the field).
    pub fn hold(&mut self, held: Box<dyn Send>) {
        self.held = Some(held);
    }

    /// HTTP/1: `flag` is set when the connection closes for the send timeout.
    pub fn conn_timed_out(&mut self, flag: Arc<AtomicBool>) {
        self.conn_timed_out = Some(flag);
    }

    /// Moves the exchange under a watchdog (see `watch_sends`); stays as it is outside a
    /// runtime.
    fn start_watch(&mut self, timeout: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let kind = std::mem::replace(&mut self.kind, Kind::Full(None));
        let shared = Arc::new(Mutex::new(Exchange {
            kind,
            tail: self.tail.take(),
            held: self.held.take(),
            handed_at: Some(Instant::now()),
            cut: false,
        }));
        let task = runtime
            .spawn(watchdog(Arc::downgrade(&shared), timeout))
            .abort_handle();
        self.kind = Kind::Watched(Box::new(Watched { shared, task }));
    }
}

/// What a watched response shares with its watchdog.
struct Exchange {
    kind: Kind,
    tail: Option<Box<Tail>>,
    held: Option<Box<dyn Send>>,
    /// A frame was handed on then, and the client has not asked for the next one since.
    handed_at: Option<Instant>,
    /// Ended by the watchdog: the next poll fails.
    cut: bool,
}

impl Exchange {
    fn cut(&mut self) {
        self.cut = true;
        // Dropping the upstream body closes its connection: the response was not read to
        // its end, so it is never pooled.
        self.kind = Kind::Full(None);
        // The tail is dropped here: the breaker hears nothing (the upstream did nothing
        // wrong), the in-flight slots are released.
        if let Some(log) = self.tail.as_deref_mut().and_then(|t| t.log.as_mut()) {
            log.send_timed_out();
        }
        self.tail = None;
        self.held = None;
    }
}

struct Watched {
    shared: Arc<Mutex<Exchange>>,
    task: AbortHandle,
}

impl Watched {
    fn lock(&self) -> MutexGuard<'_, Exchange> {
        // Every field stays consistent across a panic (each is replaced whole).
        crate::sync::lock(&self.shared)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watchdog(shared: Weak<Mutex<Exchange>>, timeout: Duration) {
    let mut wake = Instant::now() + timeout;
    loop {
        tokio::time::sleep_until(wake).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut ex = crate::sync::lock(&shared);
        if ex.cut || kind_ended(&ex.kind) {
            return;
        }
        let now = Instant::now();
        match ex.handed_at {
            Some(at) if now >= at + timeout => {
                tracing::debug!(
                    timeout_ms = timeout.as_millis() as u64,
                    "client took no data for the send timeout: stream ended"
                );
                ex.cut();
                return;
            }
            Some(at) => wake = at + timeout,
            // Waiting for the upstream (its own idle timer runs) or being read.
            None => wake = now + timeout,
        }
    }
}

fn kind_ended(kind: &Kind) -> bool {
    match kind {
        Kind::Full(b) => b.is_none(),
        Kind::Upstream(s) => s.is_end_stream(),
        Kind::Direct(s) => s.is_end_stream(),
        Kind::Watched(w) => {
            let ex = w.lock();
            !ex.cut && kind_ended(&ex.kind)
        }
    }
}

/// Polls a response body and tells its tail (and `held`) what happened.
fn poll_exchange(
    kind: &mut Kind,
    tail: &mut Option<Box<Tail>>,
    held: &mut Option<Box<dyn Send>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    let polled = match kind {
        Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        Kind::Upstream(s) => Pin::new(s).poll_frame(cx),
        Kind::Direct(s) => Pin::new(s).poll_frame(cx),
        Kind::Watched(_) => Poll::Ready(None),
    };
    let ended = kind_ended(kind);
    if let Some(tail) = tail.as_deref_mut() {
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    tail.on_data(d.len());
                }
                // hyper stops polling a body that says it has ended.
                if ended {
                    tail.on_complete();
                }
            }
            Poll::Ready(Some(Err(e))) => tail.on_error(e),
            Poll::Ready(None) => tail.on_complete(),
            Poll::Pending => {}
        }
    }
    if held.is_some() && (ended || matches!(polled, Poll::Ready(Some(Err(_)) | None))) {
        *held = None;
    }
    polled
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Kind::Watched(w) = &this.kind {
            let mut ex = w.lock();
            if ex.cut {
                return Poll::Ready(Some(Err(BodyError::SendTimeout)));
            }
            let ex = &mut *ex;
            ex.handed_at = None;
            let polled = poll_exchange(&mut ex.kind, &mut ex.tail, &mut ex.held, cx);
            if matches!(polled, Poll::Ready(Some(Ok(_)))) && !kind_ended(&ex.kind) {
                ex.handed_at = Some(Instant::now());
            }
            return polled;
        }
        let polled = poll_exchange(&mut this.kind, &mut this.tail, &mut this.held, cx);
        if let Some(timeout) = this.watch
            && matches!(polled, Poll::Ready(Some(Ok(_))))
            && !kind_ended(&this.kind)
        {
            this.watch = None;
            this.start_watch(timeout);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        kind_ended(&self.kind)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(s) => s.size_hint(),
            Kind::Direct(s) => s.size_hint(),
            Kind::Watched(w) => {
                let ex = w.lock();
                match &ex.kind {
                    Kind::Upstream(s) => s.size_hint(),
                    Kind::Direct(s) => s.size_hint(),
                    _ => SizeHint::default(),
                }
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(flag) = &self.conn_timed_out
            && flag.load(Ordering::Relaxed)
            && let Some(log) = self.tail.as_deref_mut().and_then(|t| t.log.as_mut())
        {
            log.send_timed_out();
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
