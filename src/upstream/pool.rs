//! Upstream connections, pooled per endpoint and DRIVEN BY THE REQUEST'S OWN TASK.
//!
//! hyper's pooled client runs every upstream connection as a separate task and hands each
//! request to it through channels: two task wake-ups and a pool lock with a hashed key per
//! request. Here the request future (and then the response body) reads and writes the
//! connection itself (`client`), as nginx's event loop would: no hand-off, no extra task,
//! and when the client goes away the connection is dropped with the body, which cancels the
//! upstream request at once. An idle connection sits in its endpoint's stack unpolled; it
//! is checked when taken out.
//!
//! An upstream may instead be spoken to by hyper's connection client
//! (`upstreams.<name>.client: hyper`): the differential reference of the wire tests, and a
//! switch to fall back on in production. It is driven the same way (the request's task
//! polls hyper's connection future) and held to the same rules: per-worker pooling, the
//! same timers (`forward::send`), a request given back when hyper says it never left, and a
//! connection pooled only when its response was read to the end with every request byte
//! written before that end (`HyperBody::ended`).

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::body::{BodyError, RequestBody};
use crate::config::UpstreamClient;
use crate::upstream::client::{self, Conn, ExchangeError, WireError};
use crate::upstream::forwarded::Forwarded;

/// A plain or TLS upstream socket.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(io::Error),
    #[error("HTTP handshake: {0}")]
    Handshake(hyper::Error),
}

/// How long an answer's head waits for the first byte of its body before it is passed on
/// (`PooledBody::hold`): long enough to catch an upstream that fails right after its head
/// (a bad first chunk, a close: Node writes the head and the body in separate writes), short
/// enough that a stream whose first event is slow still shows its head at once to anything
/// acting on headers (an EventSource's `open`). nginx and Envoy pass the head on at once and
/// cut the stream; this turns the common case into a 502 the client can act on.
pub(crate) const HEAD_HOLD: Duration = Duration::from_millis(250);

/// Most body bytes taken while the head is held: what is ready beyond the first byte is
/// taken too (so that a failure already in the socket is found), up to this much, as a
/// proxy buffer would (nginx's `proxy_buffer_size` is 4-8 KiB, its buffers 64 KiB).
const HOLD_BYTES: usize = 64 * 1024;

/// An upstream connection, spoken to by one of the two clients.
pub enum Connection {
    Rampart(Box<Conn>),
    Hyper(Box<HyperConn>),
}

impl Connection {
    /// Taken from the pool (not fresh): a failure before sending may be a stale socket.
    pub fn reused(&self) -> bool {
        match self {
            Connection::Rampart(c) => c.reused,
            Connection::Hyper(c) => c.reused,
        }
    }

    fn set_reused(&mut self) {
        match self {
            Connection::Rampart(c) => c.reused = true,
            Connection::Hyper(c) => c.reused = true,
        }
    }

    fn usable_now(&mut self) -> bool {
        match self {
            Connection::Rampart(c) => c.usable_now(),
            Connection::Hyper(c) => c.usable_now(),
        }
    }
}

struct Idle {
    conn: Connection,
    since: Instant,
}

/// Where to connect and how; one per endpoint.
pub struct EndpointPool {
    pub host: String,
    pub port: u16,
    /// `Host` header value for this endpoint ("host" or "host:port").
    pub host_header: HeaderValue,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    client: UpstreamClient,
    /// One stack per worker thread (and one for the other threads): a connection is
    /// registered with the event loop of the thread that opened it, and stays with it (as in
    /// nginx's per-worker `keepalive` cache). `max_idle` applies to each.
    idle: Box<[Mutex<Vec<Idle>>]>,
    idle_timeout: Duration,
    max_idle: usize,
}

impl EndpointPool {
    pub fn new(
        host: String,
        port: u16,
        host_header: HeaderValue,
        tls: Option<(TlsConnector, ServerName<'static>)>,
        client: UpstreamClient,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        EndpointPool {
            host,
            port,
            host_header,
            tls,
            client,
            idle: (0..crate::workers::slots())
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            idle_timeout,
            max_idle,
        }
    }

    /// This thread's idle stack (a worker's own, or the control plane's).
    fn stack(&self) -> &Mutex<Vec<Idle>> {
        // Never empty (at least one slot).
        &self.idle[crate::workers::slot_in(self.idle.len())]
    }

    /// The most recently used idle connection that is still open and fresh enough.
    pub fn take_idle(&self) -> Option<Connection> {
        let now = Instant::now();
        loop {
            let idle = {
                let mut stack = crate::sync::lock(self.stack());
                // The oldest sit at the bottom: drop the expired ones first.
                let expired = stack
                    .iter()
                    .take_while(|i| now.duration_since(i.since) >= self.idle_timeout)
                    .count();
                stack.drain(..expired);
                stack.pop()?
            };
            let mut conn = idle.conn;
            if conn.usable_now() {
                conn.set_reused();
                return Some(conn);
            }
        }
    }

    /// Only called with a connection whose response was read to its end (the callers
    /// check the rest).
    fn put_idle(&self, conn: Connection) {
        // Not checked for liveness here: `take_idle` checks every connection it hands out
        // anyway, and this runs on every response.
        if self.max_idle == 0 {
            return;
        }
        let mut stack = crate::sync::lock(self.stack());
        if stack.len() >= self.max_idle {
            stack.remove(0);
        }
        stack.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// A new connection: TCP (and TLS) under `timeout`, for this endpoint's client. Boxed
    /// once per connection: it then moves between pool, request and body by pointer.
    pub async fn connect(&self, timeout: Duration) -> Result<Connection, ConnectError> {
        let io = self.connect_timed(timeout).await?;
        Ok(match self.client {
            UpstreamClient::Rampart => Connection::Rampart(Box::new(Conn::new(io))),
            UpstreamClient::Hyper => Connection::Hyper(Box::new(HyperConn::new(io).await?)),
        })
    }

    /// A new connection's socket (TCP, and TLS) under `timeout`.
    pub async fn connect_timed(&self, timeout: Duration) -> Result<Io, ConnectError> {
        tokio::time::timeout(timeout, self.connect_io())
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    async fn connect_io(&self) -> Result<Io, ConnectError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Io::Plain(tcp)),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(ConnectError::Tls)?;
                Ok(Io::Tls(Box::new(tls)))
            }
        }
    }
}

/// Sends the request in `request` on `conn` and waits for the response head. On success
/// the connection travels on inside the response body. When nothing of the request reached
/// the upstream, it is put back in `request`. None when `request` was empty.
///
/// The request is lent, not passed by value: a future carries its arguments for its whole
/// life, and this one would otherwise hold a copy of the request.
pub(crate) async fn exchange(
    conn: Connection,
    pool: Arc<EndpointPool>,
    request: &mut Option<Request<RequestBody>>,
    forwarded: Option<&Forwarded>,
) -> Option<Result<Response<PooledBody>, ExchangeError>> {
    match conn {
        Connection::Rampart(mut conn) => {
            let head = client::exchange(&mut conn, request, forwarded).await?;
            Some(head.map(|head| head.map(|()| PooledBody::new(Inner::Rampart(Some(conn)), pool))))
        }
        // Boxed: the reference path's future stays out of every request's.
        Connection::Hyper(conn) => Box::pin(exchange_hyper(conn, pool, request, forwarded)).await,
    }
}

/// The upstream's response body, carrying the connection: polling the body reads it, and
/// when the body has been read to its end the connection goes back to its endpoint's pool.
/// Kept small (it is moved through several layers with every response): what only some
/// responses need is boxed on demand.
pub(crate) struct PooledBody {
    inner: Inner,
    pool: Arc<EndpointPool>,
    /// Data taken while the head was held (`hold`), and an error kept back one poll
    /// (`poll_frame`).
    ahead: Option<Box<Ahead>>,
    /// Data went out since the body last returned Pending: what the server has buffered
    /// but may not have written yet.
    unflushed: bool,
}

#[derive(Default)]
struct Ahead {
    frames: std::collections::VecDeque<Bytes>,
    bytes: usize,
    deferred: Option<WireError>,
}

enum Inner {
    /// None once the body failed (the connection is then closed).
    Rampart(Option<Box<Conn>>),
    Hyper(Box<HyperBody>),
}

impl PooledBody {
    fn new(inner: Inner, pool: Arc<EndpointPool>) -> Self {
        PooledBody {
            inner,
            pool,
            ahead: None,
            unflushed: false,
        }
    }

    /// Holds the head until the body has given its first byte (or ended, or failed), at
    /// most `HEAD_HOLD`; then takes whatever else is ready at once (up to `HOLD_BYTES`).
    /// An error means the body failed before anything of the answer was passed on: the
    /// client can still be told 502, rather than get a head and a cut (or, when the server
    /// had not written it yet, empty) answer. An answer whose sized body came whole with
    /// its head passes at once, with nothing taken, no timer and no allocation.
    pub(crate) async fn hold(&mut self) -> Result<(), WireError> {
        if let Inner::Rampart(Some(conn)) = &self.inner
            && conn.body_buffered()
        {
            return Ok(());
        }
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        poll_fn(|cx| {
            loop {
                let held = self.ahead.as_ref().map_or(0, |a| a.bytes);
                if held >= HOLD_BYTES {
                    return Poll::Ready(Ok(()));
                }
                match self.poll_inner(cx) {
                    Poll::Ready(Some(Ok(data))) => {
                        let ahead = self.ahead.get_or_insert_with(Box::default);
                        ahead.bytes += data.len();
                        ahead.frames.push_back(data);
                        if self.inner_ended() {
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending if held > 0 => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(HEAD_HOLD)));
            timer.as_mut().poll(cx).map(Ok)
        })
        .await
    }

    /// The next data from the connection.
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, WireError>>> {
        let conn = match &mut self.inner {
            Inner::Rampart(Some(conn)) => conn,
            Inner::Rampart(None) => return Poll::Ready(None),
            Inner::Hyper(b) => return b.poll_data(cx),
        };
        let next = ready!(conn.poll_body(cx));
        if matches!(next, Some(Err(_))) {
            self.inner = Inner::Rampart(None);
        }
        Poll::Ready(next)
    }

    fn inner_ended(&self) -> bool {
        match &self.inner {
            Inner::Rampart(conn) => conn.as_ref().is_none_or(|c| c.body_done()),
            Inner::Hyper(b) => b.is_end_stream(),
        }
    }

    fn inner_size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Rampart(conn) => match conn.as_ref().and_then(|c| c.body_remaining()) {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            Inner::Hyper(b) => b.size_hint(),
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        let this = &mut *self;
        if let Some(ahead) = this.ahead.as_deref_mut() {
            if let Some(e) = ahead.deferred.take() {
                return Poll::Ready(Some(Err(e)));
            }
            if let Some(data) = ahead.frames.pop_front() {
                ahead.bytes -= data.len();
                this.unflushed = true;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
        }
        match this.poll_inner(cx) {
            Poll::Ready(Some(Ok(data))) => {
                this.unflushed = true;
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            // hyper's server drops what it has not written when a body fails: data that
            // came just before the failure would never reach the client, which would see
            // an empty answer. One Pending first lets the server write it; the error
            // follows on the next poll.
            Poll::Ready(Some(Err(e))) if this.unflushed => {
                this.unflushed = false;
                this.ahead.get_or_insert_with(Box::default).deferred = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map(Frame::data))),
            Poll::Pending => {
                this.unflushed = false;
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead
            .as_ref()
            .is_none_or(|a| a.frames.is_empty() && a.deferred.is_none())
            && self.inner_ended()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner_size_hint();
        let held = match &self.ahead {
            Some(a) if a.bytes > 0 => a.bytes as u64,
            _ => return inner,
        };
        match inner.exact() {
            Some(n) => SizeHint::with_exact(n + held),
            None => {
                let mut sum = SizeHint::new();
                sum.set_lower(inner.lower() + held);
                if let Some(upper) = inner.upper() {
                    sum.set_upper(upper + held);
                }
                sum
            }
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Only a connection whose response was read to the end can carry another request;
        // anything else (client gone, upstream error) is closed by dropping it.
        match &mut self.inner {
            Inner::Rampart(conn) => {
                if let Some(conn) = conn.take()
                    && conn.reusable()
                {
                    self.pool.put_idle(Connection::Rampart(conn));
                }
            }
            Inner::Hyper(b) => {
                if let Some(conn) = b.conn.take()
                    && b.reusable
                    && !conn.finished
                {
                    self.pool.put_idle(Connection::Hyper(conn));
                }
            }
        }
    }
}

// === hyper's client (`client: hyper`) ===

/// What one hyper connection's socket and request body say about the exchange in flight:
/// what hyper itself does not tell.
#[derive(Default)]
struct Progress {
    /// Bytes were handed to hyper (the request head, a body frame, the body's end) that no
    /// flush has pushed out since. hyper flushes its socket only once its own write buffer
    /// is empty, so a completed flush means every byte handed over so far is written.
    unflushed: AtomicBool,
    /// The request body reached its end (hyper has all of it).
    body_done: AtomicBool,
    /// Bytes read from the socket, ever: unchanged since the request went out = not a
    /// byte of answer.
    read: AtomicU64,
}

/// The socket under hyper, reporting reads and completed flushes to `Progress`.
struct Watched {
    io: Io,
    progress: Arc<Progress>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        this.progress.read.fetch_add(n, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        this.progress.unflushed.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The request body as hyper sees it, reporting to `Progress`.
struct Tracked {
    inner: RequestBody,
    progress: Arc<Progress>,
}

impl Tracked {
    fn ended(&self) {
        if !self.progress.body_done.swap(true, Ordering::Relaxed) {
            // hyper now writes the body's end (a last chunk, or nothing).
            self.progress.unflushed.store(true, Ordering::Relaxed);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(_)) => this.progress.unflushed.store(true, Ordering::Relaxed),
            Some(Err(_)) => {}
            None => this.ended(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.ended();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type Driver = http1::Connection<TokioIo<Watched>, Tracked>;

/// One HTTP/1.1 connection spoken to by hyper: the handle requests are sent through and
/// the protocol driver, polled by whoever uses the connection.
pub struct HyperConn {
    sender: http1::SendRequest<Tracked>,
    driver: Driver,
    /// The driver returned: the connection is closed and must not be polled again.
    finished: bool,
    pub reused: bool,
    progress: Arc<Progress>,
}

impl HyperConn {
    async fn new(io: Io) -> Result<HyperConn, ConnectError> {
        let progress = Arc::new(Progress::default());
        let watched = Watched {
            io,
            progress: progress.clone(),
        };
        let (sender, driver) = http1::Builder::new()
            // 64 KiB, as rampart's client (by default hyper's read buffer, ~400 KiB, is the
            // only bound). hyper then bounds trailers by it too (ours: 16 KiB).
            .max_header_size(client::MAX_HEAD)
            .max_headers(client::MAX_HEADERS)
            .handshake(TokioIo::new(watched))
            .await
            .map_err(ConnectError::Handshake)?;
        Ok(HyperConn {
            sender,
            driver,
            finished: false,
            reused: false,
            progress,
        })
    }

    /// Polls the driver unless it already finished; true when the connection is now closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.finished && Pin::new(&mut self.driver).poll(cx).is_ready() {
            self.finished = true;
        }
        self.finished
    }

    /// Whether it can take another request right now (on check-out).
    fn usable_now(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.drive(&mut cx) {
            return false;
        }
        matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }
}

/// `exchange` on a hyper connection.
async fn exchange_hyper(
    mut conn: Box<HyperConn>,
    pool: Arc<EndpointPool>,
    request: &mut Option<Request<RequestBody>>,
    forwarded: Option<&Forwarded>,
) -> Option<Result<Response<PooledBody>, ExchangeError>> {
    let req = request.take()?;
    // The keep-alive race, as rampart's client handles it: a safe request without a body
    // of its own to stream goes again on a fresh connection when a pooled one closes
    // before a byte of answer. hyper does not say whether it wrote the request then, so
    // what rebuilds it is kept.
    let replay = (conn.reused
        && matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS))
    .then(|| {
        let body = match req.body() {
            RequestBody::Empty | RequestBody::Full(None) => RequestBody::Empty,
            RequestBody::Full(Some(b)) => RequestBody::Full(Some(b.clone())),
            RequestBody::Stream(_) => return None,
        };
        let mut copy = Request::new(body);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.headers_mut() = req.headers().clone();
        Some(copy)
    })
    .flatten();
    let (mut parts, body) = req.into_parts();
    let mut added = forwarded
        .map(|f| append_forwarded(&mut parts.headers, f))
        .unwrap_or_default();
    // Methods that define a body say it is empty, as rampart's client does (RFC 9110
    // 8.6); hyper sends no length for an empty body.
    if body.is_end_stream()
        && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        added.push(header::CONTENT_LENGTH);
    }
    let progress = conn.progress.clone();
    progress.body_done.store(false, Ordering::Relaxed);
    progress.unflushed.store(true, Ordering::Relaxed);
    let read_before = progress.read.load(Ordering::Relaxed);
    let req = Request::from_parts(
        parts,
        Tracked {
            inner: body,
            progress: progress.clone(),
        },
    );
    let result = {
        let mut response = std::pin::pin!(conn.sender.try_send_request(req));
        poll_fn(|cx| {
            // Drive the socket first, so a response that is already there is parsed now.
            // (If the driver finished, hyper has already failed the pending response.)
            conn.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    };
    match result {
        Ok(resp) => {
            if let Some(problem) = refused(&resp) {
                return Some(Err(ExchangeError::Wire(WireError::Invalid(problem))));
            }
            Some(Ok(resp.map(|body| {
                let body = HyperBody {
                    body,
                    conn: Some(conn),
                    reusable: false,
                    done: false,
                };
                PooledBody::new(Inner::Hyper(Box::new(body)), pool)
            })))
        }
        Err(mut e) => {
            if let Some(unsent) = e.take_message() {
                // hyper never wrote it: lent back as it came.
                let (mut parts, body) = unsent.into_parts();
                for name in &added {
                    parts.headers.remove(name);
                }
                *request = Some(Request::from_parts(parts, body.inner));
            } else if progress.read.load(Ordering::Relaxed) == read_before {
                *request = replay;
            }
            Some(Err(hyper_error(e.into_error())))
        }
    }
}

/// What rampart's client refuses and hyper's takes: a 101 outside an upgrade (hyper hands
/// it over as the response), and Content-Length with Transfer-Encoding (hyper reads the
/// chunked body; nginx and Envoy refuse such a message, RFC 9112 6.3).
fn refused<B>(resp: &Response<B>) -> Option<&'static str> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Some("unrequested 101 Switching Protocols");
    }
    let h = resp.headers();
    (h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING))
        .then_some("both Content-Length and Transfer-Encoding")
}

/// Adds the `Forwarded` header lines (which rampart's client writes straight on the wire)
/// to the map; returns their names, none of which the request carried.
fn append_forwarded(headers: &mut HeaderMap, f: &Forwarded) -> Vec<HeaderName> {
    let mut wire = Vec::new();
    f.write(&mut wire);
    let mut names = Vec::new();
    for line in wire.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name.clone(), value);
            names.push(name);
        }
    }
    names
}

/// The request body's own failure (the client's fault, found inside hyper's error), or
/// the connection's.
fn hyper_error(e: hyper::Error) -> ExchangeError {
    // hyper lends its cause only by reference: the kind is copied (what `forward` tells
    // the client depends on nothing else).
    let body = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<BodyError>());
    match body {
        None => ExchangeError::Wire(WireError::Hyper(e)),
        Some(BodyError::Idle) => ExchangeError::RequestBody(BodyError::Idle),
        Some(BodyError::Total) => ExchangeError::RequestBody(BodyError::Total),
        Some(BodyError::TooLarge(n)) => ExchangeError::RequestBody(BodyError::TooLarge(*n)),
        Some(_) => ExchangeError::RequestBody(BodyError::Length),
    }
}

/// A response body read by hyper, with its connection.
struct HyperBody {
    body: Incoming,
    /// Taken when the connection goes back to the pool or is closed.
    conn: Option<Box<HyperConn>>,
    /// The body ended with every request byte written: the connection may be pooled.
    reusable: bool,
    done: bool,
}

impl HyperBody {
    /// The end of the response: judged now, as rampart's client judges it, not when the
    /// body is dropped (by then hyper may have written the rest of the request).
    fn ended(&mut self) {
        self.done = true;
        if let Some(conn) = &self.conn {
            let p = &conn.progress;
            self.reusable =
                p.body_done.load(Ordering::Relaxed) && !p.unflushed.load(Ordering::Relaxed);
        }
    }

    /// The next data from hyper (trailers are read and dropped, as rampart's client does);
    /// Ready(None) at the end.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, WireError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(conn) = self.conn.as_mut() {
                conn.drive(cx);
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        // hyper's body says so once a sized body has all its bytes.
                        if self.body.is_end_stream() {
                            self.ended();
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    Err(_trailers) => {}
                },
                Some(Err(e)) => {
                    self.done = true;
                    self.conn = None;
                    return Poll::Ready(Some(Err(WireError::Hyper(e))));
                }
                None => {
                    self.ended();
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// For an Upgrade (WebSocket) handshake on `io`, a fresh connection (`connect_timed`) that
/// never enters the pool, spoken to by hyper's client, which hands the socket over after a
/// 101.
pub(crate) async fn exchange_upgrade(
    io: Io,
    req: Request<RequestBody>,
) -> Result<Response<Incoming>, UpgradeError> {
    let (mut sender, driver) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = driver.with_upgrades().await {
            tracing::debug!(error = %e, "upgraded upstream connection ended");
        }
    });
    Ok(sender.send_request(req).await?)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpgradeError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
}
