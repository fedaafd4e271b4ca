//! Upstream connections, pooled per endpoint and DRIVEN BY THE REQUEST'S OWN TASK.
//!
//! hyper's pooled client runs every upstream connection as a separate task and hands each
//! request to it through channels: two task wake-ups and a pool lock with a hashed key per
//! request. Here the request future (and then the response body) reads and writes the
//! connection itself (`client`), as nginx's event loop would: no hand-off, no extra task,
//! and when the client goes away the connection is dropped with the body, which cancels the
//! upstream request at once. An idle connection sits in its endpoint's stack unpolled; it
//! is checked when taken out.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
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

use crate::proxy::body::RequestBody;
use crate::proxy::client::{self, Conn, ExchangeError, WireError};
use crate::proxy::headers::Forwarded;

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

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// Where to connect and how; one per endpoint.
pub struct EndpointPool {
    pub host: String,
    pub port: u16,
    /// `Host` header value for this endpoint ("host" or "host:port").
    pub host_header: HeaderValue,
    tls: Option<(TlsConnector, ServerName<'static>)>,
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
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        EndpointPool {
            host,
            port,
            host_header,
            tls,
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
    pub fn take_idle(&self) -> Option<Box<Conn>> {
        let now = Instant::now();
        loop {
            let idle = {
                let mut stack = self.stack().lock().ok()?;
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
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    fn put_idle(&self, conn: Box<Conn>) {
        // Not checked for liveness here: `take_idle` checks every connection it hands out
        // anyway, and this runs on every response.
        if self.max_idle == 0 || !conn.reusable() {
            return;
        }
        if let Ok(mut stack) = self.stack().lock() {
            if stack.len() >= self.max_idle {
                stack.remove(0);
            }
            stack.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Number of idle connections (tests, admin).
    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }

    /// A new connection: TCP (and TLS) under `timeout`. Boxed once per connection: it then
    /// moves between pool, request and body by pointer.
    pub async fn connect(&self, timeout: Duration) -> Result<Box<Conn>, ConnectError> {
        Ok(Box::new(Conn::new(self.connect_timed(timeout).await?)))
    }

    async fn connect_timed(&self, timeout: Duration) -> Result<Io, ConnectError> {
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
pub async fn exchange(
    mut conn: Box<Conn>,
    pool: Arc<EndpointPool>,
    request: &mut Option<Request<RequestBody>>,
    forwarded: Option<&Forwarded>,
) -> Option<Result<Response<PooledBody>, ExchangeError>> {
    let head = client::exchange(&mut conn, request, forwarded).await?;
    Some(head.map(|head| {
        head.map(|()| PooledBody {
            conn: Some(conn),
            pool,
        })
    }))
}

/// The upstream's response body, carrying the connection: polling the body reads it, and
/// when the body has been read to its end the connection goes back to its endpoint's pool.
pub struct PooledBody {
    /// None once the body failed (the connection is then closed).
    conn: Option<Box<Conn>>,
    pool: Arc<EndpointPool>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(conn.poll_body(cx)) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Err(e)) => {
                self.conn = None;
                Poll::Ready(Some(Err(e)))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.as_ref().is_none_or(|c| c.body_done())
    }

    fn size_hint(&self) -> SizeHint {
        match self.conn.as_ref().and_then(|c| c.body_remaining()) {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Only a connection whose response was read to the end can carry another request;
        // anything else (client gone, upstream error) is closed by dropping it.
        if let Some(conn) = self.conn.take()
            && conn.reusable()
        {
            self.pool.put_idle(conn);
        }
    }
}

/// For an Upgrade (WebSocket) handshake: a fresh connection that never enters the pool,
/// spoken to by hyper's client, which hands the socket over after a 101.
pub async fn exchange_upgrade(
    pool: &EndpointPool,
    connect_timeout: Duration,
    req: Request<RequestBody>,
) -> Result<Response<Incoming>, UpgradeError> {
    let io = pool.connect_timed(connect_timeout).await?;
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
pub enum UpgradeError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
}
