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
//!
//! An https upstream with `tls.http2: true` that picks `h2` in ALPN is spoken to over
//! HTTP/2 by hyper's client instead (`h2_conn`): one connection per endpoint shared by all
//! requests, its driver a task of its own (many requests poll it at once); the HTTP/1.1
//! paths above stay the default and the hardened ones.
//!
//! Here: the socket, the endpoint with its idle stacks (and its HTTP/2 slot), and the
//! exchange that picks the client. The response body that carries a connection back is
//! `body`; hyper's side of things is `hyper_conn` (HTTP/1.1) and `h2_conn` (HTTP/2).

mod body;
pub(crate) mod h2_conn;
// Not `hyper`: that name would shadow the crate in this module's paths.
mod hyper_conn;

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::body::RequestBody;
use crate::config::UpstreamClient;
use crate::upstream::client::{self, Conn, ExchangeError};
use crate::upstream::forwarded::Forwarded;
use body::Inner;
use h2_conn::{H2Conn, exchange_h2};
use hyper_conn::{HyperConn, exchange_hyper};

// The forwarder, the retry loop and the stream layer name it by `pool::PooledBody`.
pub(crate) use body::PooledBody;

impl Io {
    /// The TLS handshake settled on HTTP/2 (ALPN `h2`).
    fn alpn_h2(&self) -> bool {
        match self {
            Io::Tls(s) => s.get_ref().1.alpn_protocol() == Some(crate::upstream::forward::ALPN_H2),
            Io::Plain(_) => false,
        }
    }
}

/// A plain or TLS upstream socket.
#[derive(Debug)]
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

/// An upstream connection, spoken to by one of the two clients.
#[derive(Debug)]
pub enum Connection {
    Rampart(Box<Conn>),
    Hyper(Box<HyperConn>),
    /// A handle on the endpoint's shared HTTP/2 connection.
    H2(Box<H2Conn>),
}

impl Connection {
    /// Taken from the pool (not fresh): a failure before sending may be a stale socket.
    pub fn reused(&self) -> bool {
        match self {
            Connection::Rampart(c) => c.reused,
            Connection::Hyper(c) => c.reused,
            Connection::H2(c) => c.reused,
        }
    }

    fn set_reused(&mut self) {
        match self {
            Connection::Rampart(c) => c.reused = true,
            Connection::Hyper(c) => c.reused = true,
            Connection::H2(c) => c.reused = true,
        }
    }

    fn usable_now(&mut self) -> bool {
        match self {
            Connection::Rampart(c) => c.usable_now(),
            Connection::Hyper(c) => c.usable_now(),
            Connection::H2(c) => c.usable_now(),
        }
    }
}

/// How an endpoint speaks TLS.
struct EndpointTls {
    connector: TlsConnector,
    /// The name sent (SNI) and verified.
    name: ServerName<'static>,
    /// `tls.http2`: the connector offers `h2`; upgrades (WebSocket, HTTP/1.1 only) use
    /// this one, which offers only `http/1.1`.
    h1_only: Option<TlsConnector>,
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
    tls: Option<EndpointTls>,
    client: UpstreamClient,
    /// The current shared HTTP/2 connection, when the upstream speaks it.
    h2: h2_conn::Slot,
    /// The last TLS handshake settled on http/1.1: connects need not wait for each other
    /// (while h2 is expected they do, so that concurrent first requests share one).
    h2_refused: AtomicBool,
    connecting: tokio::sync::Mutex<()>,
    /// One stack per worker thread (and one for the other threads): a connection is
    /// registered with the event loop of the thread that opened it, and stays with it (as in
    /// nginx's per-worker `keepalive` cache). `max_idle` applies to each. Oldest at the
    /// front (expired there first), most recent at the back (taken first).
    idle: Box<[Mutex<VecDeque<Idle>>]>,
    idle_timeout: Duration,
    max_idle: usize,
    /// A sweeper task is running: it closes connections idle past `idle_timeout` even when
    /// no request comes to take them (after a burst, the upstream's closed sockets would
    /// otherwise sit in CLOSE_WAIT, holding descriptors and buffers, until traffic returns).
    sweeping: AtomicBool,
    /// New connections (`rampart_upstream_connections_opened_total`).
    opened: Counter,
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("idle_timeout", &self.idle_timeout)
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
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
            tls: tls.map(|(connector, name)| EndpointTls {
                connector,
                name,
                h1_only: None,
            }),
            client,
            h2: h2_conn::Slot::default(),
            h2_refused: AtomicBool::new(false),
            connecting: tokio::sync::Mutex::new(()),
            idle: (0..crate::workers::slots())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            idle_timeout,
            max_idle,
            sweeping: AtomicBool::new(false),
            opened: Counter::default(),
        }
    }

    /// HTTP/2 when the upstream picks it: the pool's connector offers `h2`; `h1_only`
    /// (the same settings offering only `http/1.1`) is for upgrades.
    pub fn offering_h2(mut self, h1_only: TlsConnector) -> Self {
        if let Some(tls) = &mut self.tls {
            tls.h1_only = Some(h1_only);
        }
        self
    }

    /// Counts the connections this endpoint opens on `opened`.
    pub fn counting_opened(mut self, opened: Counter) -> Self {
        self.opened = opened;
        self
    }

    /// This thread's idle stack (a worker's own, or the control plane's).
    fn stack(&self) -> &Mutex<VecDeque<Idle>> {
        // Never empty (at least one slot).
        &self.idle[crate::workers::slot_in(self.idle.len())]
    }

    /// The most recently used idle connection that is still open and fresh enough.
    pub fn take_idle(&self) -> Option<Connection> {
        if self.offers_h2()
            && let Some(c) = self.h2.take(self.idle_timeout)
        {
            return Some(Connection::H2(Box::new(c)));
        }
        let now = crate::clock::now();
        loop {
            let idle = {
                let mut stack = crate::sync::lock(self.stack());
                self.drop_expired(&mut stack, now);
                stack.pop_back()?
            };
            let mut conn = idle.conn;
            if conn.usable_now() {
                conn.set_reused();
                return Some(conn);
            }
        }
    }

    /// The oldest sit at the front: drops those idle for `idle_timeout` or longer.
    fn drop_expired(&self, stack: &mut VecDeque<Idle>, now: Instant) {
        while stack
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= self.idle_timeout)
        {
            stack.pop_front();
        }
    }

    /// Only called with a connection whose response was read to its end (the callers
    /// check the rest).
    fn put_idle(self: &Arc<Self>, conn: Connection) {
        // Not checked for liveness here: `take_idle` checks every connection it hands out
        // anyway, and this runs on every response.
        if self.max_idle == 0 {
            return;
        }
        {
            let mut stack = crate::sync::lock(self.stack());
            if stack.len() >= self.max_idle {
                stack.pop_front();
            }
            stack.push_back(Idle {
                conn,
                since: crate::clock::now(),
            });
        }
        if !self.sweeping.load(Ordering::Relaxed)
            && !self.sweeping.swap(true, Ordering::AcqRel)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Closes what expired in every stack; whether any connection is still idle.
    fn sweep_once(&self) -> bool {
        let now = Instant::now();
        let mut any = false;
        for stack in &self.idle {
            let mut stack = crate::sync::lock(stack);
            self.drop_expired(&mut stack, now);
            any |= !stack.is_empty();
        }
        any
    }

    /// A new connection: TCP (and TLS) under `timeout`, for this endpoint's client. Boxed
    /// once per connection: it then moves between pool, request and body by pointer.
    pub async fn connect(&self, timeout: Duration) -> Result<Connection, ConnectError> {
        if !self.offers_h2() {
            let io = self.connect_timed(timeout, false).await?;
            return self.http1(io).await;
        }
        // While the upstream is expected to pick h2, one connect at a time: the requests
        // that wait then share the connection it made.
        let _one = if self.h2_refused.load(Ordering::Relaxed) {
            None
        } else {
            Some(self.connecting.lock().await)
        };
        if let Some(c) = self.h2.take(self.idle_timeout) {
            return Ok(Connection::H2(Box::new(c)));
        }
        let started = Instant::now();
        let io = self.connect_timed(timeout, false).await?;
        if !io.alpn_h2() {
            self.h2_refused.store(true, Ordering::Relaxed);
            return self.http1(io).await;
        }
        self.h2_refused.store(false, Ordering::Relaxed);
        let left = timeout.saturating_sub(started.elapsed());
        let conn = tokio::time::timeout(left, H2Conn::new(io, &self.h2))
            .await
            .map_err(|_| ConnectError::Timeout)??;
        Ok(Connection::H2(Box::new(conn)))
    }

    fn offers_h2(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.h1_only.is_some())
    }

    /// Every exchange here is our own client's, which gives back what it sent (for a retry
    /// after the send): not hyper's, nor an HTTP/2 connection's.
    pub(crate) fn gives_back_sent(&self) -> bool {
        self.client == UpstreamClient::Rampart && !self.offers_h2()
    }

    /// An HTTP/1.1 connection over `io`, for this endpoint's client.
    async fn http1(&self, io: Io) -> Result<Connection, ConnectError> {
        Ok(match self.client {
            UpstreamClient::Rampart => Connection::Rampart(Box::new(Conn::new(io))),
            UpstreamClient::Hyper => Connection::Hyper(Box::new(HyperConn::new(io).await?)),
        })
    }

    /// A new connection's socket (TCP, and TLS) under `timeout`; `h1_only` for an upgrade,
    /// which HTTP/2 would not carry.
    pub async fn connect_timed(
        &self,
        timeout: Duration,
        h1_only: bool,
    ) -> Result<Io, ConnectError> {
        tokio::time::timeout(timeout, self.connect_io(h1_only))
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    async fn connect_io(&self, h1_only: bool) -> Result<Io, ConnectError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        self.opened.inc();
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Io::Plain(tcp)),
            Some(tls) => {
                let connector = match &tls.h1_only {
                    Some(h1) if h1_only => h1,
                    _ => &tls.connector,
                };
                let tls = connector
                    .connect(tls.name.clone(), tcp)
                    .await
                    .map_err(ConnectError::Tls)?;
                Ok(Io::Tls(Box::new(tls)))
            }
        }
    }
}

/// Every `idle_timeout`, closes the pool's expired idle connections; ends when none is
/// idle (the next `put_idle` starts another) or the pool is gone (a reload replaced it).
async fn sweep(pool: Weak<EndpointPool>) {
    loop {
        // Not a busy loop on `idle_timeout: 0s` (where nothing stays idle anyway).
        let Some(period) = pool
            .upgrade()
            .map(|p| p.idle_timeout.max(Duration::from_millis(100)))
        else {
            return;
        };
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if pool.sweep_once() {
            continue;
        }
        pool.sweeping.store(false, Ordering::Release);
        // A connection put back between the look and the store would have seen the flag
        // still set: look once more, and carry on if one came and no one else took over.
        if !pool.sweep_once() || pool.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
    }
}

/// Sends the request in `request` on `conn` and waits for the response head. On success
/// the connection travels on inside the response body. When nothing of the request reached
/// the upstream, it is put back in `request`. None when `request` was empty.
///
/// The request is lent, not passed by value: a future carries its arguments for its whole
/// life, and this one would otherwise hold a copy of the request. Our own client puts what
/// it sent in `sent` (see `client::exchange`); hyper's and HTTP/2 keep nothing.
pub(crate) async fn exchange(
    conn: Connection,
    pool: Arc<EndpointPool>,
    request: &mut Option<Request<RequestBody>>,
    forwarded: Option<&Forwarded>,
    sent: Option<&mut Option<Request<RequestBody>>>,
) -> Option<Result<Response<PooledBody>, ExchangeError>> {
    match conn {
        Connection::Rampart(mut conn) => {
            let head = client::exchange(&mut conn, request, forwarded, sent).await?;
            Some(head.map(|head| head.map(|()| PooledBody::new(Inner::Rampart(Some(conn)), pool))))
        }
        // Boxed: the reference path's future stays out of every request's.
        Connection::Hyper(conn) => Box::pin(exchange_hyper(conn, pool, request, forwarded)).await,
        Connection::H2(conn) => Box::pin(exchange_h2(*conn, pool, request, forwarded)).await,
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
