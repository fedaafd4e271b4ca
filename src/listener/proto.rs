//! Which HTTP version a connection speaks, and hyper's connection for it.
//!
//! hyper-util's auto builder finds out by reading the first 24 bytes itself and handing
//! them back to hyper in front of the socket. hyper's first read then gets those 24 bytes
//! alone, and its second finds 24 bytes less than the 8 KiB it wants free, so its buffer
//! grows to 16 KiB: on every connection, for the connection's life (a heap profile of 1,000
//! open SSE streams showed 16 MiB there). Here a plain connection is looked at with
//! `peek(2)`, which takes nothing from the socket, and a TLS one by what ALPN agreed; hyper
//! then reads the request itself, in one read into one 8 KiB buffer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::ListenerConfig;

use super::h1_guard;

/// The HTTP/2 connection preface (RFC 9113 §3.4) begins so; no HTTP/1 method does.
const H2_START: &[u8] = b"PRI ";

/// How long to wait before looking again at a first packet too short to tell (`PR`): a
/// client that splits its first bytes so is rare, and peeking again at once would spin.
const SHORT_PEEK_PAUSE: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    H1,
    H2,
}

impl Proto {
    /// What a TLS handshake agreed: `h2` by ALPN, or HTTP/1.1 (RFC 9113 §3.3: HTTP/2 over
    /// TLS is chosen by ALPN only).
    pub(crate) fn from_alpn(alpn: Option<&[u8]>) -> Proto {
        if alpn == Some(b"h2") {
            Proto::H2
        } else {
            Proto::H1
        }
    }

    /// Tells from the first bytes of a plain connection; None while they could be either.
    fn from_start(start: &[u8]) -> Option<Proto> {
        let n = start.len().min(H2_START.len());
        if start[..n] != H2_START[..n] {
            Some(Proto::H1)
        } else if n == H2_START.len() {
            Some(Proto::H2)
        } else {
            None
        }
    }
}

/// Waits for the first bytes of a plain connection and tells its protocol without taking
/// them. None when the peer closed before sending a byte. The caller bounds the wait (the
/// header read timeout, the drain).
pub(crate) async fn sniff(tcp: &TcpStream) -> std::io::Result<Option<Proto>> {
    let mut start = [0u8; 4];
    loop {
        let n = tcp.peek(&mut start).await?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(p) = Proto::from_start(&start[..n]) {
            return Ok(Some(p));
        }
        tokio::time::sleep(SHORT_PEEK_PAUSE).await;
    }
}

/// hyper's HTTP/1 and HTTP/2 connection builders, with a listener's edge-safe limits.
#[derive(Debug, Clone)]
pub(crate) struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    pub(crate) fn new(cfg: &ListenerConfig) -> Builders {
        let mut h1 = http1::Builder::new();
        h1
            // Without a timer hyper silently ignores header_read_timeout.
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .keep_alive(true)
            // One write(2) of head and body copied together beats writev(2) of two slices
            // for the small answers most requests get.
            .writev(false)
            .max_buf_size(cfg.max_header_bytes)
            .max_headers(h1_guard::max_headers(cfg.max_headers));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(cfg.http2.max_concurrent_streams)
            .max_pending_accept_reset_streams(cfg.http2.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(cfg.http2.max_local_error_reset_streams)
            .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
            // Pings find dead peers of idle HTTP/2 connections.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        Builders { h1, h2 }
    }

    /// Serves `io` as `proto` (HTTP/1 with upgrades: WebSockets and CONNECT tunnels).
    pub(crate) fn serve<I, S, B>(&self, proto: Proto, io: I, svc: S) -> Served<I, S>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: HttpService<Incoming, ResBody = B> + Clone,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S: Send + 'static,
        TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
    {
        let io = TokioIo::new(io);
        match proto {
            Proto::H1 => Served::H1(Box::pin(self.h1.serve_connection(io, svc).with_upgrades())),
            Proto::H2 => Served::H2(Box::pin(self.h2.serve_connection(io, svc))),
        }
    }
}

/// A connection being served: by hyper, as HTTP/1 or HTTP/2, or by rampart's HTTP/1.1
/// server. Each boxed: the task holds only the one it serves, not room for the largest.
pub(crate) enum Served<I, S>
where
    S: HttpService<Incoming>,
{
    H1(Pin<Box<http1::UpgradeableConnection<TokioIo<I>, S>>>),
    H2(Pin<Box<http2::Connection<TokioIo<I>, S, TokioExecutor>>>),
    Rampart(crate::h1::Connection),
}

/// Why a served connection ended with an error, from either server.
pub(crate) type ServeError = Box<dyn std::error::Error + Send + Sync>;

impl<I, S> std::fmt::Debug for Served<I, S>
where
    S: HttpService<Incoming>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Served::H1(_) => "Served::H1",
            Served::H2(_) => "Served::H2",
            Served::Rampart(_) => "Served::Rampart",
        })
    }
}

impl<I, S, B> Served<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    /// Finishes what is under way and closes (HTTP/1: after the current exchange; HTTP/2:
    /// GOAWAY, then the open streams finish).
    pub(crate) fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.get_mut() {
            Served::H1(c) => c.as_mut().graceful_shutdown(),
            Served::H2(c) => c.as_mut().graceful_shutdown(),
            Served::Rampart(c) => c.graceful_shutdown(),
        }
    }
}

impl<I, S, B> Future for Served<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Output = Result<(), ServeError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The request path asks `clock::now()`: one reading for this poll.
        crate::clock::in_poll(|| match self.get_mut() {
            Served::H1(c) => c.as_mut().poll(cx).map_err(Into::into),
            Served::H2(c) => c.as_mut().poll(cx).map_err(Into::into),
            Served::Rampart(c) => Pin::new(c).poll(cx).map_err(Into::into),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_the_protocol() {
        assert_eq!(Proto::from_start(b"GET / HTTP/1.1\r\n"), Some(Proto::H1));
        assert_eq!(Proto::from_start(b"POST"), Some(Proto::H1));
        assert_eq!(Proto::from_start(b"PUT "), Some(Proto::H1));
        assert_eq!(Proto::from_start(b"PRI "), Some(Proto::H2));
        assert_eq!(Proto::from_start(b"X"), Some(Proto::H1));
        // Could still be PRI, POST, PUT, PATCH or PROPFIND: wait for more.
        assert_eq!(Proto::from_start(b"P"), None);
        assert_eq!(Proto::from_start(b"PR"), None);
        assert_eq!(Proto::from_start(b"PRI"), None);
        assert_eq!(Proto::from_alpn(Some(b"h2")), Proto::H2);
        assert_eq!(Proto::from_alpn(Some(b"http/1.1")), Proto::H1);
        assert_eq!(Proto::from_alpn(None), Proto::H1);
    }
}
