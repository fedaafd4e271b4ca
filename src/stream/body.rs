//! The response rampart sends: a local answer or the upstream's body under its timers,
//! carrying the request's `Tail`, with the HTTP/2 send-timeout watchdog.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::admission::ratelimit::RateLimitHeaders;
use crate::body::{BodyError, TimedBody};
use crate::stream::events::EventStream;
use crate::stream::tail::Tail;
use crate::upstream::pool::PooledBody;

enum Kind {
    Full(Option<Bytes>),
    Upstream(TimedBody<PooledBody>),
    /// An upstream body on a connection that is not pooled (a declined upgrade).
    Direct(TimedBody<Incoming>),
    /// An upstream's event stream under the route's stream timers.
    Events(Box<EventStream<PooledBody>>),
    /// Under a send-timeout watchdog (HTTP/2, see `watch_sends`): shared with it.
    Watched(Box<Watched>),
}

/// Every response rampart sends: a local answer or the upstream's streamed body. It carries
/// the request's `Tail` (access log, breaker verdict, in-flight slots), settled when hyper
/// drops the body (finished, failed or abandoned by the client).
// In this order (`repr(C)`): with the tracked body's `finale` before it, the fields every
// frame reads (and an event stream's box pointer) share the first cache line.
#[repr(C)]
pub(crate) struct ProxyBody {
    tail: Option<Box<Tail>>,
    /// Released when the exchange is over for rampart: the body ended, failed, was dropped,
    /// or was cut for a client that took no data (the server's count of a connection's open
    /// HTTP/2 streams).
    held: Option<Box<dyn Send>>,
    /// HTTP/2: the send timeout, watched from the first frame handed on with more to come.
    watch: Option<Duration>,
    kind: Kind,
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

    pub(crate) fn full(bytes: Bytes) -> Self {
        ProxyBody::with_kind(Kind::Full(Some(bytes)))
    }

    pub(crate) fn empty() -> Self {
        ProxyBody::with_kind(Kind::Full(None))
    }
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        ProxyBody::full(bytes)
    }
}

impl ProxyBody {
    pub(crate) fn upstream(body: TimedBody<PooledBody>) -> Self {
        ProxyBody::with_kind(Kind::Upstream(body))
    }

    pub(crate) fn events(stream: EventStream<PooledBody>) -> Self {
        ProxyBody::with_kind(Kind::Events(Box::new(stream)))
    }

    pub(crate) fn direct(body: TimedBody<Incoming>) -> Self {
        ProxyBody::with_kind(Kind::Direct(body))
    }

    /// Attaches the request's `Tail` in place (a response is large to move).
    pub(crate) fn set_tail(&mut self, tail: Box<Tail>) {
        self.tail = Some(tail);
    }

    /// The rate-limit fields the answer still owes its head (rampart's HTTP/1.1 server
    /// writes them from here, unless `take_rate_limit_fields` took them). None once the body is
    /// watched (HTTP/2), where the tail moved.
    pub(crate) fn rate_limit_fields(&self) -> Option<&RateLimitHeaders> {
        self.tail.as_deref()?.rate_limit_headers.as_ref()
    }

    /// Takes the fields the answer owes when they must go into its header map: always for
    /// the servers that write the head from the map alone (hyper's HTTP/1.1 and HTTP/2,
    /// `map_only`), and for an answer that closes its connection, whose `Connection: close`
    /// every server must see there.
    pub(crate) fn take_rate_limit_fields(&mut self, map_only: bool) -> Option<RateLimitHeaders> {
        self.tail
            .as_deref_mut()?
            .rate_limit_headers
            .take_if(|h| map_only || h.closes())
    }

    /// rampart ended this stream itself at the drain deadline (`stream::finale`), so the access
    /// log says `drained`, not `client_aborted`.
    pub(crate) fn mark_drained(&mut self) {
        let mut shared;
        let (kind, tail) = match &mut self.kind {
            Kind::Watched(w) => {
                shared = w.lock();
                let ex = &mut *shared;
                (&mut ex.kind, &mut ex.tail)
            }
            kind => (kind, &mut self.tail),
        };
        if let Kind::Events(s) = kind {
            s.drained();
        }
        if let Some(log) = tail.as_deref_mut().and_then(|t| t.log.as_mut()) {
            log.outcome = crate::observe::access_log::Outcome::Drained;
        }
    }

    /// For an event stream under `stream::events`: whether what the client has been given
    /// ends between two events. None for other answers (their bytes must be scanned).
    pub(crate) fn client_at_boundary(&self) -> Option<bool> {
        fn of(kind: &Kind) -> Option<bool> {
            match kind {
                Kind::Events(s) => Some(s.client_at_boundary()),
                Kind::Watched(w) => of(&w.lock().kind),
                _ => None,
            }
        }
        of(&self.kind)
    }

    /// The send timeout for this answer: how long the client may take no data (the route's
    /// `idle`, nginx's `send_timeout`). None for answers rampart makes itself.
    pub(crate) fn send_timeout(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Upstream(s) => Some(s.idle()),
            Kind::Direct(s) => Some(s.idle()),
            Kind::Events(s) => s.send_timeout(),
            Kind::Full(_) | Kind::Watched(_) => None,
        }
    }

    /// For an HTTP/2 stream, whose body hyper does not poll while the client's flow-control
    /// window is shut: once a frame has been handed on with more to come, a watchdog ends the
    /// exchange (upstream connection closed, tail settled, `held` released) if the client has
    /// not taken it within the send timeout. An SSE stream waiting for its upstream is not
    /// waiting for its client, and is left to `idle`.
    pub(crate) fn watch_sends(&mut self) {
        self.watch = self.send_timeout();
    }

    /// Keeps `held` until the exchange is over for rampart (see the field).
    pub(crate) fn hold(&mut self, held: Box<dyn Send>) {
        self.held = Some(held);
    }

    /// HTTP/1: `flag` is set when the connection closes for the send timeout.
    pub(crate) fn conn_timed_out(&mut self, flag: Arc<AtomicBool>) {
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
        Kind::Events(s) => s.is_end_stream(),
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
    if let Kind::Events(s) = kind {
        return poll_events(s, tail, held, cx);
    }
    let polled = match kind {
        Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        Kind::Upstream(s) => Pin::new(s).poll_frame(cx),
        Kind::Direct(s) => Pin::new(s).poll_frame(cx),
        Kind::Watched(_) | Kind::Events(_) => Poll::Ready(None),
    };
    let ended = kind_ended(kind);
    if let Some(tail) = tail.as_deref_mut() {
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    tail.on_data(d);
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

/// `poll_exchange` for an event stream: the stream tells the tail what it saw (in-band
/// errors, how it ended), since an early end reaches the client as a final event, not as
/// an error.
fn poll_events(
    s: &mut EventStream<PooledBody>,
    tail: &mut Option<Box<Tail>>,
    held: &mut Option<Box<dyn Send>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    let polled = s.poll_frame(cx);
    let news = s.take_news();
    let failed = matches!(polled, Poll::Ready(Some(Err(_))));
    if let Some(tail) = tail.as_deref_mut() {
        if news.in_band_errors > 0 {
            tail.on_in_band_error();
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    tail.on_data(d);
                }
            }
            Poll::Ready(Some(Err(e))) => tail.on_error(e),
            _ => {}
        }
        if news.ended.is_some()
            && let Some(usage) = s.take_usage()
        {
            // Tokens spent before a failure were spent.
            tail.record_usage(usage);
        }
        if let Some(how) = news.ended
            && !failed
        {
            tail.on_stream_end(how);
        }
    }
    if held.is_some() && (s.is_end_stream() || failed) {
        *held = None;
    }
    polled
}

impl crate::h1::Waits for ProxyBody {
    fn waits(&self) -> bool {
        match &self.kind {
            Kind::Upstream(s) => s.waits(),
            Kind::Events(s) => s.waits(),
            // A local answer is whole; an HTTP/2 stream's watchdog and a declined upgrade's
            // body are asked as before.
            Kind::Full(_) | Kind::Direct(_) | Kind::Watched(_) => false,
        }
    }
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
            Kind::Events(s) => s.size_hint(),
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
        // The body before the tail, as before the fields were reordered (`repr(C)`): the
        // upstream connection goes back (or closes) and an event stream records how it
        // ended before the tail writes the access log and gives back slots and permits.
        drop(std::mem::replace(&mut self.kind, Kind::Full(None)));
    }
}
