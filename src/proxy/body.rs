//! Bodies that stream frame by frame under the route's timers.
//!
//! `TimedBody` wraps a streaming body (the client's request body or the upstream's response
//! body) with the idle timeout (longest silence between frames), an optional absolute
//! deadline (the route's `total`) and an optional byte limit. It never buffers: each frame is
//! handed on as soon as it arrives, which is what keeps SSE events live. An error it yields
//! makes hyper abort the other side, so a cut stream is never passed off as a clean end.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::proxy::pool::PooledBody;
use crate::proxy::tail::Tail;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("no body data for longer than the idle timeout")]
    Idle,
    #[error("the route's total timeout elapsed")]
    Total,
    #[error("body larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("request body length differs from its Content-Length")]
    Length,
    #[error("{0}")]
    Inner(#[from] hyper::Error),
    #[error("{0}")]
    Upstream(#[from] crate::proxy::client::WireError),
}

/// The earliest of "idle timeout since the last frame" and "absolute deadline", on ONE timer
/// that is only re-armed when it fires (not on every frame), and only created the first
/// time the body has nothing ready: a small response that arrives whole never touches the
/// clock or the timer wheel.
struct Timers {
    idle: Duration,
    deadline: Option<Instant>,
    armed: Option<Armed>,
}

struct Armed {
    sleep: Pin<Box<Sleep>>,
    last_frame: Instant,
}

impl Timers {
    fn new(idle: Duration, deadline: Option<Instant>) -> Self {
        Timers {
            idle,
            deadline,
            armed: None,
        }
    }

    fn next_wake(last: Instant, idle: Duration, deadline: Option<Instant>) -> Instant {
        let idle_at = last + idle;
        match deadline {
            Some(d) if d < idle_at => d,
            _ => idle_at,
        }
    }

    /// A frame arrived: the silence starts again (only tracked once the timer exists).
    fn frame(&mut self) {
        if let Some(a) = &mut self.armed {
            a.last_frame = Instant::now();
        }
    }

    /// Ready(err) once a limit really passed; Pending (waker registered) otherwise.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<BodyError> {
        let (idle, deadline) = (self.idle, self.deadline);
        let armed = self.armed.get_or_insert_with(|| {
            let now = Instant::now();
            Armed {
                sleep: Box::pin(tokio::time::sleep_until(Self::next_wake(
                    now, idle, deadline,
                ))),
                last_frame: now,
            }
        });
        loop {
            ready!(armed.sleep.as_mut().poll(cx));
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Poll::Ready(BodyError::Total);
            }
            if now >= armed.last_frame + idle {
                return Poll::Ready(BodyError::Idle);
            }
            let next = Self::next_wake(armed.last_frame, idle, deadline);
            armed.sleep.as_mut().reset(next);
        }
    }
}

pub struct TimedBody<B> {
    inner: B,
    timers: Timers,
    limit: Option<u64>,
    seen: u64,
    done: bool,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, idle: Duration, deadline: Option<Instant>, limit: Option<u64>) -> Self {
        TimedBody {
            inner,
            timers: Timers::new(idle, deadline),
            limit,
            seen: 0,
            done: false,
        }
    }

    pub fn bytes_seen(&self) -> u64 {
        self.seen
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
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => match this.timers.poll_expired(cx) {
                Poll::Ready(err) => {
                    this.done = true;
                    Poll::Ready(Some(Err(err)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body sent upstream: streamed under timers, or already buffered.
pub enum RequestBody {
    Empty,
    Full(Option<Bytes>),
    Stream(TimedBody<Incoming>),
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
}

/// Every response rampart sends: a local answer or the upstream's streamed body. It carries
/// the request's `Tail` (access log, breaker verdict, in-flight slots), settled when hyper
/// drops the body (finished, failed or abandoned by the client).
pub struct ProxyBody {
    kind: Kind,
    tail: Option<Box<Tail>>,
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        ProxyBody {
            kind: Kind::Full(Some(bytes)),
            tail: None,
        }
    }

    pub fn empty() -> Self {
        ProxyBody {
            kind: Kind::Full(None),
            tail: None,
        }
    }

    pub fn upstream(body: TimedBody<PooledBody>) -> Self {
        ProxyBody {
            kind: Kind::Upstream(body),
            tail: None,
        }
    }

    pub fn direct(body: TimedBody<Incoming>) -> Self {
        ProxyBody {
            kind: Kind::Direct(body),
            tail: None,
        }
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
        if let Some(log) = self.tail.as_deref_mut().and_then(|t| t.log.as_mut()) {
            log.outcome = crate::proxy::access_log::Outcome::Drained;
        }
    }
}

impl ProxyBody {
    fn kind_ended(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(s) => s.is_end_stream(),
            Kind::Direct(s) => s.is_end_stream(),
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
        let polled = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(s) => Pin::new(s).poll_frame(cx),
            Kind::Direct(s) => Pin::new(s).poll_frame(cx),
        };
        let ended = this.kind_ended();
        if let Some(tail) = this.tail.as_deref_mut() {
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
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.kind_ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(s) => s.size_hint(),
            Kind::Direct(s) => s.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn timers_report_idle_then_total() {
        let start = Instant::now();
        let mut t = Timers::new(Duration::from_secs(2), Some(start + Duration::from_secs(5)));
        let err = std::future::poll_fn(|cx| t.poll_expired(cx)).await;
        assert!(matches!(err, BodyError::Idle));
        assert_eq!(Instant::now() - start, Duration::from_secs(2));

        let mut t = Timers::new(Duration::from_secs(2), Some(start + Duration::from_secs(5)));
        // Activity keeps the idle timer from firing; the deadline still wins.
        let waiter = async {
            std::future::poll_fn(|cx| {
                t.frame();
                t.poll_expired(cx)
            })
            .await
        };
        let err = waiter.await;
        assert!(matches!(err, BodyError::Total));
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
    }
}
