//! A client connection's own clocks, for what hyper does not time (issue 12, slow clients):
//!
//! - **The first request head, counted from accept** (nginx's `client_header_timeout`):
//!   hyper-util's protocol detection reads the first bytes with no timer, hyper's HTTP/1
//!   header timer only starts once they came, and HTTP/2 has none. A connection that has not
//!   completed a request head `header_read_timeout` after accept (silent, trickling, or an
//!   HTTP/2 preface and nothing more) is closed. After its first request an HTTP/1
//!   connection is hyper's again (its header timer doubles as the keep-alive timeout).
//! - **HTTP/2 idle** (Envoy's connection idle timeout): a connection with no open stream for
//!   `http2.idle_timeout` gets GOAWAY and is closed, however many PINGs it answers. A stream
//!   counts from its request until rampart is done with its answer (ended, or cut by the
//!   send timeout: a stream the client never reads does not keep the connection open).
//! - **The send timeout** (nginx's `send_timeout`): [`SendTimed`] fails a write to the client
//!   that cannot progress for the timeout, and hyper drops the connection with the answer it
//!   was writing (its upstream connection closes with it). The timeout is the route's `idle`
//!   for the HTTP/1 answer being written; HTTP/2 streams, whose flow-control windows block
//!   them without blocking the socket, are watched per stream (`ProxyBody::watch_sends`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The send timeout until an answer with a route sets it: answers rampart makes itself,
/// tunnels, and the socket under HTTP/2 (the same as the default `idle`, and nginx's).
pub(crate) const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a connection closed for being idle may take to go after its GOAWAY (a peer that
/// does not answer the GOAWAY's PING, or streams left open by a client that reads nothing).
pub(crate) const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// Why the connection's clock ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// No complete request head within `header_read_timeout` of accept: close at once.
    HeaderRead,
    /// HTTP/2 with no open stream for `http2.idle_timeout`: GOAWAY, then close.
    Idle,
}

/// One connection's clocks, shared by its driver, its service and its socket.
pub(crate) struct Clocks {
    born: Instant,
    header_read: Duration,
    h2_idle: Duration,
    h2: AtomicBool,
    streams: AtomicUsize,
    /// When the last stream ended, in milliseconds since `born`.
    idle_since_ms: AtomicU64,
    send_timeout_ms: AtomicU64,
    /// Set when the socket failed a write for the send timeout (for the access log).
    send_timed_out: Arc<AtomicBool>,
    /// The last open stream ended: the driver's clock must look again (see [`Clock`]).
    recheck: AtomicBool,
    /// The driver's, for the end of the last stream.
    waker: Mutex<Option<Waker>>,
}

impl Clocks {
    pub(crate) fn new(header_read: Duration, h2_idle: Duration) -> Arc<Self> {
        Arc::new(Clocks {
            born: Instant::now(),
            header_read,
            h2_idle,
            h2: AtomicBool::new(false),
            streams: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            send_timeout_ms: AtomicU64::new(millis(DEFAULT_SEND_TIMEOUT)),
            send_timed_out: Arc::new(AtomicBool::new(false)),
            recheck: AtomicBool::new(false),
            waker: Mutex::new(None),
        })
    }

    /// The timer the driver keeps for its [`Clock`].
    pub(crate) fn timer(&self) -> Sleep {
        tokio::time::sleep_until(at(self.born, self.header_read))
    }

    /// An HTTP/2 stream opened: open until the guard is dropped.
    pub(crate) fn stream(self: &Arc<Self>) -> StreamGuard {
        self.h2.store(true, Ordering::Relaxed);
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// HTTP/1: the send timeout of the answer about to be written.
    pub(crate) fn set_send_timeout(&self, t: Duration) {
        self.send_timeout_ms.store(millis(t), Ordering::Relaxed);
    }

    /// Set once the socket failed a write for the send timeout.
    pub(crate) fn send_timed_out(&self) -> &Arc<AtomicBool> {
        &self.send_timed_out
    }

    fn idle_at(&self) -> Instant {
        let since = self.born + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        at(since, self.h2_idle)
    }
}

/// The driver's side of a connection's clock: a timer for the next deadline, and nothing
/// at all to do while HTTP/2 streams are open (the last one to end wakes the driver) or once
/// an HTTP/1 connection has had its first request (hyper's own header timer takes over).
/// The connection's task wakes many times per request: then this costs one flag load.
#[derive(Default)]
pub(crate) struct Clock {
    /// The driver's waker is with the clocks (for the end of the last stream).
    registered: bool,
    /// Waiting for the last open stream to end.
    parked: bool,
    /// Nothing more to time.
    off: bool,
}

impl Clock {
    /// Ready once the connection is to end. `timer` is made by [`Clocks::timer`] and kept by
    /// the caller; `seen`: set once a request head has been completed on the connection
    /// (read only while the clock is on: a line of the connection's state not touched at
    /// every wake-up of a long stream).
    pub(crate) fn poll(
        &mut self,
        mut timer: Pin<&mut Sleep>,
        clocks: &Clocks,
        seen: &AtomicBool,
        cx: &mut Context<'_>,
    ) -> Poll<Expired> {
        if self.off {
            return Poll::Pending;
        }
        let seen = seen.load(Ordering::Relaxed);
        // An HTTP/1 request was seen (an HTTP/2 one marks the connection before it is).
        if seen && !clocks.h2.load(Ordering::Relaxed) {
            self.off = true;
            return Poll::Pending;
        }
        if !self.registered {
            self.registered = true;
            // A task's waker stays the same: kept once for the connection's life.
            *crate::sync::lock(&clocks.waker) = Some(cx.waker().clone());
        }
        let recheck =
            clocks.recheck.load(Ordering::Relaxed) && clocks.recheck.swap(false, Ordering::Relaxed);
        if !recheck {
            if self.parked {
                return Poll::Pending;
            }
            ready!(timer.as_mut().poll(cx));
        }
        self.parked = false;
        // Bounded: each turn either returns or moves the timer to a deadline not yet passed.
        for _ in 0..4 {
            let now = Instant::now();
            let deadline = if !seen {
                let d = at(clocks.born, clocks.header_read);
                if now >= d {
                    return Poll::Ready(Expired::HeaderRead);
                }
                d
            } else if !clocks.h2.load(Ordering::Relaxed) {
                self.off = true;
                return Poll::Pending;
            } else if clocks.streams.load(Ordering::Relaxed) == 0 {
                let d = clocks.idle_at();
                if now >= d {
                    return Poll::Ready(Expired::Idle);
                }
                d
            } else {
                // The last stream to end sets `recheck` and wakes the driver.
                self.parked = true;
                return Poll::Pending;
            };
            timer.as_mut().reset(deadline);
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        // The clock is jumping: look again at the next wake-up.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// An open HTTP/2 stream of a connection.
pub(crate) struct StreamGuard(Arc<Clocks>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let c = &self.0;
        if c.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            c.idle_since_ms
                .store(millis(c.born.elapsed()), Ordering::Relaxed);
            c.recheck.store(true, Ordering::Relaxed);
            // Only there when the driver's clock waits for this (rare: its timer fired while
            // streams were open), so most streams end without waking the driver.
            let waker = crate::sync::lock(&c.waker).take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `base + d`, or a year on when that is beyond the clock (configured durations are bounded
/// far below).
fn at(base: Instant, d: Duration) -> Instant {
    base.checked_add(d)
        .unwrap_or_else(|| base + Duration::from_secs(365 * 24 * 3600))
}

/// The client's socket under the send timeout: a write that cannot progress for the timeout
/// (between two successful writes, as nginx's `send_timeout`) fails with `TimedOut`, which
/// ends the connection. The socket is then closed with a reset (nginx's
/// `reset_timedout_connection`): a plain close would leave the unsent answer in the kernel,
/// trickling to a client that reads nothing, for minutes per connection.
pub(crate) struct SendTimed<S = TcpStream> {
    inner: S,
    clocks: Arc<Clocks>,
    /// Armed while writes are blocked; kept (and reset) across stalls.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

/// A client connection's byte stream: TCP, or TLS over it.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin {
    /// SO_LINGER 0 on the TCP socket underneath, so that its close sends RST.
    fn zero_linger(&self);
}

impl Socket for TcpStream {
    fn zero_linger(&self) {
        let _ = self.set_zero_linger();
    }
}

impl<S: Socket> SendTimed<S> {
    pub(crate) fn new(inner: S, clocks: Arc<Clocks>) -> Self {
        SendTimed {
            inner,
            clocks,
            stall: None,
            stalled: false,
        }
    }

    /// A write is blocked: Ready(error) once it has been for the send timeout.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if !self.stalled {
            self.stalled = true;
            let timeout =
                Duration::from_millis(self.clocks.send_timeout_ms.load(Ordering::Relaxed));
            let deadline = at(Instant::now(), timeout);
            match &mut self.stall {
                Some(s) => s.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let Some(stall) = self.stall.as_mut() else {
            return Poll::Pending;
        };
        ready!(stall.as_mut().poll(cx));
        self.clocks.send_timed_out.store(true, Ordering::Relaxed);
        // SO_LINGER 0: the close that follows sends RST and frees the send buffer.
        self.inner.zero_linger();
        tracing::debug!("client took no data for the send timeout: connection closed");
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took no data for the send timeout",
        ))
    }

    fn timed<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => self.poll_stall(cx).map(Err),
            done => {
                self.stalled = false;
                done
            }
        }
    }
}

impl<S: Socket> AsyncRead for SendTimed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: Socket> AsyncWrite for SendTimed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.timed(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.timed(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.timed(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.timed(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn expires(clocks: &Clocks, seen: bool) -> Expired {
        let mut timer = std::pin::pin!(clocks.timer());
        let mut clock = Clock::default();
        let seen = AtomicBool::new(seen);
        poll_fn(|cx| clock.poll(timer.as_mut(), clocks, &seen, cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn the_header_clock_runs_from_accept() {
        let c = Clocks::new(Duration::from_secs(3), Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(expires(&c, false).await, Expired::HeaderRead);
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn http1_hands_over_to_hyper_after_its_first_request() {
        let c = Clocks::new(Duration::from_secs(3), Duration::from_secs(10));
        let r = tokio::time::timeout(Duration::from_secs(3600), expires(&c, true)).await;
        assert!(r.is_err(), "no clock for HTTP/1 after its first request");
    }

    #[tokio::test(start_paused = true)]
    async fn http2_is_idle_only_with_no_stream_open() {
        let c = Clocks::new(Duration::from_secs(3), Duration::from_secs(10));
        let stream = c.stream();
        let c2 = c.clone();
        let closer = tokio::spawn(async move {
            // A stream open for 20 s: not idle.
            tokio::time::sleep(Duration::from_secs(20)).await;
            drop(stream);
            Instant::now()
        });
        assert_eq!(expires(&c, true).await, Expired::Idle);
        let ended = closer.await.unwrap();
        assert_eq!(Instant::now() - ended, Duration::from_secs(10));
        // Streams one after another: idle counts from the last one's end.
        let start = Instant::now();
        for _ in 0..5 {
            let s = c2.stream();
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(s);
            tokio::time::sleep(Duration::from_secs(8)).await;
        }
        let last_end = Instant::now() - Duration::from_secs(8);
        assert_eq!(expires(&c2, true).await, Expired::Idle);
        assert_eq!(Instant::now() - last_end, Duration::from_secs(10));
        assert!(Instant::now() - start >= Duration::from_secs(45));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_idle_counts_from_the_last_stream_even_before_the_header_timer() {
        let c = Clocks::new(Duration::from_secs(10), Duration::from_secs(2));
        let start = Instant::now();
        let stream = c.stream();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(stream);
        });
        assert_eq!(expires(&c, true).await, Expired::Idle);
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }
}
