//! One HTTP/1.1 connection, served request after request by one task: read a head, call the
//! service, write the answer, then the next head (pipelined requests wait in the buffer).
//!
//! The socket and the read buffer sit behind one lock that the connection and the request's
//! body share (`Shared`); the body reads straight from them. Buffers are as small as the
//! traffic: a head is read into 1 KiB that grows to `max_header_bytes` only for larger
//! heads, a body's data into 16 KiB, and what an exchange grew is freed before the next
//! head. hyper keeps 8 KiB read and 8 KiB write buffers for each connection's life.
//!
//! Behaviour follows hyper's server (hyper 1.x `proto/h1/conn.rs`, `dispatch.rs`), with
//! keep-alive, `allow_half_close(false)` and a header read timeout:
//! - the header read timeout runs from the moment a head is awaited, so it is also the
//!   keep-alive idle timeout; expired, the connection closes without an answer;
//! - a head hyper refuses gets hyper's status (400, 414, 431) with `connection: close`;
//! - once a request's body is read (or it has none), a client that closes its side is gone:
//!   the service's future, and with it the upstream exchange, is dropped;
//! - `100 Continue` is written when the body is first read, unless the answer started;
//! - a body the service left unread is drained from what has already arrived, or the
//!   connection closes after the answer (its bytes must never be read as a request);
//! - a body error from the service aborts the connection (no last chunk), so a truncated
//!   answer never looks complete.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::body::{Body, BodyError, Source};
use super::decode::{Decoded, Decoder};
use super::encode::{self, BodyLen, Encoder};
use super::head::{HeadError, Parsed, parse_head};
use super::upgrade::{Io, Upgraded};
use crate::scratch;
use crate::sync::lock;
use gone::GoneWatch;
use pass::Pass;

/// The first read of a head; most heads fit.
const HEAD_ROOM: usize = 1024;
/// Room for a body's data per read.
const BODY_ROOM: usize = 16 * 1024;
/// Answer bytes gathered before they are written.
const WRITE_AT: usize = 16 * 1024;
/// Data frames this large are written from their own buffer, not copied.
const COPY_UNDER: usize = 8 * 1024;
/// Buffer capacity kept from one exchange to the next; more is freed.
const KEEP: usize = 4 * 1024;
/// What an unread request body may still be drained of after the answer, from what has
/// already arrived, before the connection is closed instead.
const DRAIN_MAX: usize = 64 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A listener's limits for its HTTP/1.1 connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_head: usize,
    pub(crate) max_headers: usize,
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("request head: {0}")]
    Head(HeadError),
    #[error("no complete request head within the header read timeout")]
    HeadTimeout,
    #[error("the client closed in the middle of a request head")]
    HeadIncomplete,
    #[error("the client went away before its answer was complete")]
    Gone,
    #[error("answer: {0}")]
    Encode(#[from] encode::EncodeError),
    #[error("answer body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("service: {0}")]
    Service(Box<dyn std::error::Error + Send + Sync>),
}

/// What the connection and the request's body share.
// In this order (`repr(C)`): what a streamed frame reads (`poll_gone`, `write_all`) first
// and together, behind the lock word. With 1,000 connections each line of a connection's
// state is a cache miss per event; the compiler's order spread these over four lines.
#[repr(C)]
struct Shared<I> {
    /// The client closed its side.
    eof: bool,
    /// The body's framing broke: the connection cannot go on.
    broken: bool,
    /// The answer's head has started: no `100 Continue` any more.
    answered: bool,
    /// `poll_gone`'s watch on the socket (`gone.rs`).
    gone: GoneWatch,
    /// `100 Continue` bytes written so far, while one is owed.
    cont: Option<usize>,
    rbuf: BytesMut,
    /// None once handed over by an upgrade.
    io: Option<I>,
    decoder: Decoder,
    /// The request the decoder belongs to.
    generation: u64,
    /// The connection's task, waiting for the body (held elsewhere) to be read whole
    /// before it looks for a client that left.
    conn_waker: Option<Waker>,
    /// The body's reader, waiting on the socket: the connection's own reads and writes
    /// take the socket's wakers from it, so it is woken when the connection moves on.
    body_waker: Option<Waker>,
}

impl<I> Shared<I> {
    /// A fresh connection's state: nothing read, no request yet.
    fn new(io: I) -> Shared<I> {
        Shared {
            io: Some(io),
            rbuf: BytesMut::new(),
            decoder: Decoder::done(),
            generation: 0,
            eof: false,
            broken: false,
            cont: None,
            answered: false,
            conn_waker: None,
            body_waker: None,
            gone: GoneWatch::default(),
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Shared<I> {
    /// Reads into the buffer, with at least `room` free. Ok(0): the client closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<usize>> {
        // The socket's read waker is now `cx`'s (or nobody's): `poll_gone` must look again.
        self.gone.placed(false);
        self.poll_fill_with(cx, room)
    }

    fn poll_fill_with(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if self.rbuf.capacity() - self.rbuf.len() < room.max(1) {
            self.rbuf.reserve(room.max(1));
        }
        tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.rbuf)
    }

    /// Writes what is owed of a `100 Continue`.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(done) = self.cont {
            let Some(io) = self.io.as_mut() else {
                self.cont = None;
                break;
            };
            if done >= CONTINUE.len() {
                std::task::ready!(Pin::new(io).poll_flush(cx))?;
                self.cont = None;
                break;
            }
            let n = std::task::ready!(Pin::new(io).poll_write(cx, &CONTINUE[done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.cont = Some(done + n);
        }
        Poll::Ready(Ok(()))
    }

    /// Whether the client has closed while its answer is awaited (hyper's
    /// `mid_message_detect_eof`): only once the request's body is all read and nothing of a
    /// next request has arrived, and only the first time EOF is seen.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.decoder.is_done() {
            // The body is being read elsewhere: be woken when it ends.
            set_waker(&mut self.conn_waker, cx);
            return false;
        }
        if self.eof || self.io.is_none() || !self.rbuf.is_empty() {
            return false;
        }
        if self.gone.quiet(cx) {
            // Watched since the last look, and the socket has not woken the watch.
            return false;
        }
        let watch = self.gone.arm(cx);
        let polled = self.poll_fill_with(&mut Context::from_waker(&watch), 64);
        self.gone.placed(polled.is_pending());
        match polled {
            Poll::Ready(Ok(0)) => {
                self.eof = true;
                true
            }
            Poll::Ready(Ok(_)) | Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
        }
    }

    /// Drains an unread body from what is in the buffer and what the socket has ready now.
    fn drain_now(&mut self, cx: &mut Context<'_>) -> bool {
        let mut drained = 0usize;
        loop {
            match self.decoder.decode(&mut self.rbuf) {
                Ok(Decoded::End) => return true,
                Ok(Decoded::Data(d)) => {
                    drained += d.len();
                    if drained > DRAIN_MAX {
                        return false;
                    }
                }
                Ok(Decoded::Trailers(_)) => {}
                Ok(Decoded::NeedMore) => {
                    if self.eof {
                        return false;
                    }
                    match self.poll_fill(cx, BODY_ROOM) {
                        Poll::Ready(Ok(0)) => {
                            self.eof = true;
                            return false;
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(_)) | Poll::Pending => return false,
                    }
                }
                Err(_) => {
                    self.broken = true;
                    return false;
                }
            }
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send> Source for Shared<I> {
    fn poll_body(
        &mut self,
        generation: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if generation != self.generation {
            return Poll::Ready(Some(Err(BodyError::Gone)));
        }
        if self.cont.is_some() {
            if self.answered && self.cont == Some(0) {
                self.cont = None;
            } else {
                match self.poll_continue(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                    Poll::Pending => {
                        set_waker(&mut self.body_waker, cx);
                        return Poll::Pending;
                    }
                }
            }
        }
        loop {
            match self.decoder.decode(&mut self.rbuf) {
                Ok(Decoded::Data(d)) => {
                    if self.decoder.is_done() {
                        wake(&mut self.conn_waker);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Decoded::Trailers(t)) => {
                    wake(&mut self.conn_waker);
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(Decoded::End) => {
                    wake(&mut self.conn_waker);
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            if self.eof {
                self.broken = true;
                return Poll::Ready(Some(Err(BodyError::Incomplete)));
            }
            let room = self.decoder.remaining().map_or(BODY_ROOM, |n| {
                usize::try_from(n).unwrap_or(BODY_ROOM).min(BODY_ROOM)
            });
            let filled = match self.poll_fill(cx, room) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    set_waker(&mut self.body_waker, cx);
                    return Poll::Pending;
                }
            };
            match filled {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

/// Keeps `cx`'s waker in `slot` (a clone only when it changed).
fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

/// Ends the connection for whoever still holds its request body: the body reads `Gone`,
/// and the socket closes now, not when the last body is dropped.
struct Ended<I: Io>(Arc<Mutex<Shared<I>>>);

impl<I: Io> Drop for Ended<I> {
    fn drop(&mut self) {
        let mut s = lock(&self.0);
        s.generation += 1;
        s.io = None;
        wake(&mut s.body_waker);
    }
}

/// A connection being served; `graceful_shutdown` lets the exchange under way finish and
/// closes before the next (at once when idle).
pub(crate) struct Connection {
    fut: Pin<Box<dyn Future<Output = Result<(), ConnError>> + Send>>,
    closing: Arc<AtomicBool>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("h1::Connection")
    }
}

impl Connection {
    pub(crate) fn new<I, S, F, B, E>(io: I, settings: Settings, svc: S) -> Connection
    where
        I: Io,
        S: FnMut(Request<Body>) -> F + Send + 'static,
        F: Future<Output = Result<Response<B>, E>> + Send + 'static,
        B: http_body::Body<Data = Bytes> + encode::HeadFields + encode::Waits + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let closing = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Shared::new(io)));
        Connection {
            fut: Box::pin(run(shared, settings, svc, closing.clone())),
            closing,
        }
    }

    pub(crate) fn graceful_shutdown(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }
}

impl Future for Connection {
    type Output = Result<(), ConnError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.fut.as_mut().poll(cx)
    }
}

// Not an `async fn`: that keeps its arguments twice in its state (as arguments, then as
// the body's locals), and this state is every connection's.
#[allow(clippy::manual_async_fn)]
fn run<I, S, F, B, E>(
    shared: Arc<Mutex<Shared<I>>>,
    settings: Settings,
    mut svc: S,
    closing: Arc<AtomicBool>,
) -> impl Future<Output = Result<(), ConnError>>
where
    I: Io,
    S: FnMut(Request<Body>) -> F + Send + 'static,
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + encode::HeadFields + encode::Waits + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async move {
        let _ended = Ended(shared.clone());
        let mut wbuf: Vec<u8> = Vec::new();
        let mut timer = std::pin::pin!(tokio::time::sleep(settings.header_read_timeout));
        loop {
            // In its own block, and moved whole where it ends the connection: the head read
            // then stays on the stack instead of being written into this future's room.
            let parsed = {
                let head = read_head(&shared, &settings, &closing, timer.as_mut()).await;
                match head {
                    Ok(Some(p)) => p,
                    ended => return end_without_head(&shared, &mut wbuf, ended).await,
                }
            };
            // Built and taken apart outside this function: a local that is borrowed keeps its
            // room in the connection's future until its scope ends, moved whole it does not.
            let (req, asked) = exchange::request(&shared, &settings, parsed);

            // The answer, unless the client leaves first. Pinned here rather than boxed: a
            // box per request was a fresh, cold allocation its whole future was copied into.
            let resp = {
                let mut fut = std::pin::pin!(svc(req));
                // The client is looked at first, as hyper's dispatcher does: one that closed
                // right after its request is gone before anything is sent upstream.
                poll_fn(|cx| {
                    if lock(&shared).poll_gone(cx) {
                        return Poll::Ready(Err(ConnError::Gone));
                    }
                    fut.as_mut().poll(cx).map(Ok)
                })
                .await?
                .map_err(|e| ConnError::Service(e.into()))?
            };

            lock(&shared).answered = true;
            let keep_alive = asked.keep_alive && !closing.load(Ordering::Relaxed);
            // The head (and the small frames after it) into the worker's buffer, warm in the
            // cache, rather than this connection's, cold at 1,000 connections; given back
            // once written (`scratch`).
            scratch::swap(&mut wbuf);
            let (rbody, written, upgrading) =
                exchange::answer(&mut wbuf, resp, &asked, keep_alive)?;
            if written.bodiless || upgrading {
                drop(rbody);
                write_all(&shared, &wbuf).await?;
                scratch::give_back(&mut wbuf);
            } else {
                // Pinned in this block, so it is dropped here, once written.
                let body = std::pin::pin!(rbody);
                write_body(&shared, &mut wbuf, body, written.encoder, asked.te_trailers).await?;
            }

            if upgrading && let Some(tx) = asked.upgrade_tx {
                let handed = {
                    let mut s = lock(&shared);
                    let pre = s.rbuf.split().freeze();
                    s.io.take().map(|io| Upgraded::new(Box::new(io), pre))
                };
                if let Some(up) = handed {
                    // The request's side may have given up; then the socket just closes.
                    let _ = tx.send(up);
                }
                return Ok(());
            }

            // An unread body is drained from what already came, or the connection closes.
            let reusable = poll_fn(|cx| {
                let mut s = lock(&shared);
                let drained = s.decoder.is_done() || s.drain_now(cx);
                s.generation += 1;
                s.conn_waker = None;
                wake(&mut s.body_waker);
                Poll::Ready(drained && !s.broken && !s.eof)
            })
            .await;
            if written.last || !reusable || closing.load(Ordering::Relaxed) {
                return shutdown(&shared).await;
            }
            if wbuf.capacity() > KEEP {
                wbuf = Vec::new();
            }
            let mut s = lock(&shared);
            if s.rbuf.is_empty() && s.rbuf.capacity() > KEEP {
                s.rbuf = BytesMut::new();
            }
        }
    }
}

/// Waits for the next complete head, within the header read timeout. None: the connection
/// ended cleanly (closed by the client between requests, or told to close while idle).
async fn read_head<I: Io>(
    shared: &Mutex<Shared<I>>,
    settings: &Settings,
    closing: &AtomicBool,
    mut timer: Pin<&mut Sleep>,
) -> Result<Option<Parsed>, ConnError> {
    let deadline = crate::clock::now() + settings.header_read_timeout;
    // Bytes already looked at: after the first look, a head is parsed again only once the
    // new bytes may end it (hyper's `is_complete_fast`), so a head trickled byte by byte
    // costs linear time, not quadratic.
    let mut looked: Option<usize> = None;
    poll_fn(|cx| {
        {
            let mut s = lock(shared);
            loop {
                let len = s.rbuf.len();
                if len > looked.unwrap_or(0) {
                    let worth = match looked {
                        None => true,
                        Some(prev) => len >= settings.max_head || may_end_head(&s.rbuf, prev),
                    };
                    looked = Some(len);
                    if worth {
                        match parse_head(&mut s.rbuf, settings.max_head, settings.max_headers) {
                            Ok(Some(p)) => return Poll::Ready(Ok(Some(p))),
                            Ok(None) => {}
                            Err(e) => return Poll::Ready(Err(ConnError::Head(e))),
                        }
                    }
                } else if s.rbuf.is_empty() && closing.load(Ordering::Relaxed) {
                    return Poll::Ready(Ok(None));
                }
                if s.eof {
                    return Poll::Ready(if s.rbuf.is_empty() {
                        Ok(None)
                    } else {
                        Err(ConnError::HeadIncomplete)
                    });
                }
                let room = HEAD_ROOM.max(s.rbuf.len());
                match s.poll_fill(cx, room) {
                    Poll::Ready(Ok(0)) => s.eof = true,
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => break,
                }
            }
        }
        // The timer is never set later than this wait's deadline (it was made at the
        // connection's start, and deadlines only move later), so it is left alone until it
        // fires: then it is the deadline, or it is moved to it. A request costs no timer
        // wheel update; an idle period costs at most one extra wake-up.
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= deadline {
                return Poll::Ready(Err(ConnError::HeadTimeout));
            }
            timer.as_mut().reset(deadline);
        }
    })
    .await
}

/// Whether bytes past `prev` (and the three before, where a line end may have begun) may
/// end a head: a blank line, CRLF or bare LF (hyper's `is_complete_fast`).
pub(crate) fn may_end_head(buf: &[u8], prev: usize) -> bool {
    let tail = &buf[prev.saturating_sub(3).min(buf.len())..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// Streams the answer's body after its head (in `wbuf`): small frames are gathered and
/// written together, large ones from their own buffer.
async fn write_body<I, B>(
    shared: &Mutex<Shared<I>>,
    wbuf: &mut Vec<u8>,
    mut body: Pin<&mut B>,
    encoder: Encoder,
    te_trailers: bool,
) -> Result<(), ConnError>
where
    I: Io,
    B: http_body::Body<Data = Bytes> + encode::Waits,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut trailers: Option<HeaderMap> = None;
    let mut pass = Pass {
        body_waits: false,
        ended: false,
        big: None,
        encoder,
    };
    loop {
        poll_fn(|cx| pass.poll(body.as_mut(), wbuf, &mut trailers, te_trailers, shared, cx))
            .await?;
        if !wbuf.is_empty() {
            {
                let mut write = std::pin::pin!(write_all(shared, wbuf));
                poll_fn(|cx| {
                    let polled = write.as_mut().poll(cx);
                    // The task slept: a wake-up of the body's may have been spent meanwhile.
                    pass.body_waits &= polled.is_ready();
                    polled
                })
                .await?;
            }
            scratch::give_back(wbuf);
        }
        if let Some(data) = pass.big.take() {
            write_all(shared, &data).await?;
            pass.encoder.after(wbuf);
        }
        if pass.ended {
            return Ok(());
        }
    }
}

/// Ends the connection when no head came: closed cleanly (None), or refused with hyper's
/// status for a head that cannot be served, when it has one.
async fn end_without_head<I: Io>(
    shared: &Mutex<Shared<I>>,
    wbuf: &mut Vec<u8>,
    ended: Result<Option<Parsed>, ConnError>,
) -> Result<(), ConnError> {
    let e = match ended {
        Ok(_) => return shutdown(shared).await,
        Err(e) => e,
    };
    if let ConnError::Head(h) = &e
        && let Some(status) = h.status()
    {
        refuse(wbuf, status);
        write_all(shared, wbuf).await?;
        let _ = shutdown(shared).await;
    }
    Err(e)
}

/// Writes `buf` whole, then flushes.
async fn write_all<I: Io>(shared: &Mutex<Shared<I>>, buf: &[u8]) -> Result<(), ConnError> {
    let mut rest = buf;
    poll_fn(|cx| {
        let mut s = lock(shared);
        // A `100 Continue` begun must end before anything else is written.
        if matches!(s.cont, Some(n) if n > 0) {
            std::task::ready!(s.poll_continue(cx))?;
            wake(&mut s.body_waker);
        }
        s.cont = None;
        let Some(io) = s.io.as_mut() else {
            return Poll::Ready(Err(ConnError::Gone));
        };
        while !rest.is_empty() {
            let n = std::task::ready!(Pin::new(&mut *io).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
            }
            rest = &rest[n..];
        }
        Pin::new(io).poll_flush(cx).map_err(Into::into)
    })
    .await
}

/// Closes the sending side (FIN) once everything is written.
async fn shutdown<I: Io>(shared: &Mutex<Shared<I>>) -> Result<(), ConnError> {
    poll_fn(|cx| {
        let mut s = lock(shared);
        match s.io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx).map(|_| Ok(())),
            None => Poll::Ready(Ok(())),
        }
    })
    .await
}

/// The answer to a head that cannot be served (hyper's, for the same heads).
fn refuse(dst: &mut Vec<u8>, status: StatusCode) {
    dst.clear();
    let _ = encode::head(
        dst,
        status,
        &HeaderMap::new(),
        BodyLen::Empty,
        encode::For {
            reason: None,
            method: &Method::GET,
            version: http::Version::HTTP_11,
            keep_alive: false,
            extra: None,
        },
    );
}

mod exchange;
mod gone;
mod pass;
#[cfg(test)]
mod tests;
