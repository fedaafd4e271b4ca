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

use crate::proxy::access_log::{AccessRecord, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("no body data for longer than the idle timeout")]
    Idle,
    #[error("the route's total timeout elapsed")]
    Total,
    #[error("body larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("{0}")]
    Inner(#[from] hyper::Error),
}

/// The earliest of "idle timeout since the last frame" and "absolute deadline", on ONE timer
/// that is only re-armed when it fires (not on every frame), to keep the hot path cheap.
struct Timers {
    idle: Duration,
    last_frame: Instant,
    deadline: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
}

impl Timers {
    fn new(idle: Duration, deadline: Option<Instant>) -> Self {
        let now = Instant::now();
        let first = Self::next_wake(now, idle, deadline);
        Timers {
            idle,
            last_frame: now,
            deadline,
            sleep: Box::pin(tokio::time::sleep_until(first)),
        }
    }

    fn next_wake(last: Instant, idle: Duration, deadline: Option<Instant>) -> Instant {
        let idle_at = last + idle;
        match deadline {
            Some(d) if d < idle_at => d,
            _ => idle_at,
        }
    }

    /// Ready(err) once a limit really passed; Pending (waker registered) otherwise.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<BodyError> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            let now = Instant::now();
            if self.deadline.is_some_and(|d| now >= d) {
                return Poll::Ready(BodyError::Total);
            }
            if now >= self.last_frame + self.idle {
                return Poll::Ready(BodyError::Idle);
            }
            let next = Self::next_wake(self.last_frame, self.idle, self.deadline);
            self.sleep.as_mut().reset(next);
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
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
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
                this.timers.last_frame = Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(BodyError::Inner(e))))
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
    Upstream(TimedBody<Incoming>),
}

/// Every response rampart sends: a local answer or the upstream's streamed body. It carries
/// the access-log record, written when hyper drops the body (finished, failed or abandoned
/// by the client), so the log sees the whole exchange including the stream.
pub struct ProxyBody {
    kind: Kind,
    log: Option<Box<AccessRecord>>,
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        ProxyBody {
            kind: Kind::Full(Some(bytes)),
            log: None,
        }
    }

    pub fn empty() -> Self {
        ProxyBody {
            kind: Kind::Full(None),
            log: None,
        }
    }

    pub fn upstream(body: TimedBody<Incoming>) -> Self {
        ProxyBody {
            kind: Kind::Upstream(body),
            log: None,
        }
    }

    pub fn with_log(mut self, record: Option<Box<AccessRecord>>) -> Self {
        self.log = record;
        self
    }

    /// rampart ended this stream itself at the drain deadline (server::finale), so the access
    /// log says `drained`, not `client_aborted`.
    pub fn mark_drained(&mut self) {
        if let Some(log) = self.log.as_deref_mut() {
            log.outcome = Outcome::Drained;
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
        };
        if let Some(log) = this.log.as_deref_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        log.bytes_out += d.len() as u64;
                    }
                }
                Poll::Ready(Some(Err(e))) => log.body_failed(e),
                Poll::Ready(None) => log.body_complete(),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(s) => s.size_hint(),
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
                t.last_frame = Instant::now();
                t.poll_expired(cx)
            })
            .await
        };
        let err = waiter.await;
        assert!(matches!(err, BodyError::Total));
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
    }
}
