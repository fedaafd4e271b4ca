//! HTTP/2 to an upstream (`tls.http2: true`, and the upstream picked `h2` in ALPN), spoken
//! by hyper's connection client. Unlike an HTTP/1.1 connection, one HTTP/2 connection
//! carries many requests at once: it is shared by every request to its endpoint (from any
//! worker), its driver runs as a task of its own, and requests hold a clone of its handle.
//! A request whose client leaves drops its response body, which resets its stream (and
//! only its stream) upstream.
//!
//! What hyper keeps to itself, the socket tells (`Scan`): the server's
//! SETTINGS_MAX_CONCURRENT_STREAMS (past it another connection is opened rather than
//! queueing behind the full one) and its GOAWAY (then no new request goes on it).

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::body::{Inner, PooledBody};
use super::hyper_conn::{append_forwarded, hyper_error};
use super::{ConnectError, EndpointPool, Io};
use crate::body::{BodyError, RequestBody};
use crate::upstream::client::{self, ExchangeError, WireError};
use crate::upstream::forwarded::Forwarded;

/// What is known of one HTTP/2 connection, shared by its handles, its driver and its socket.
#[derive(Debug)]
pub(super) struct Shared {
    /// Streams open on it (requests sent whose response has not ended or been dropped).
    in_flight: AtomicUsize,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS; unlimited until it says (RFC 9113
    /// 6.5.2).
    max_streams: AtomicU32,
    /// GOAWAY received, the driver ended, or a request on it failed: no new request.
    closed: AtomicBool,
}

impl Shared {
    fn has_room(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed)
                < self.max_streams.load(Ordering::Relaxed) as usize
    }
}

/// What the endpoint keeps of its HTTP/2 connection: the handle requests are sent through.
#[derive(Debug, Clone)]
struct Handle {
    sender: http2::SendRequest<Notifying>,
    shared: Arc<Shared>,
}

impl Handle {
    /// Whether another request may go on it now.
    fn usable_now(&self) -> bool {
        self.shared.has_room() && !self.sender.is_closed()
    }

    /// A stream of it, counted from now (so concurrent takers never overfill it).
    fn reserve(&self, reused: bool) -> H2Conn {
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        H2Conn {
            handle: self.clone(),
            stream: StreamSlot(self.shared.clone()),
            reused,
        }
    }
}

/// One request's share of a shared HTTP/2 connection: a handle and a stream reserved.
#[derive(Debug)]
pub struct H2Conn {
    handle: Handle,
    stream: StreamSlot,
    /// It was already open (taken, not made for this request): a request it refuses before
    /// sending goes again on a new connection.
    pub reused: bool,
}

impl H2Conn {
    /// The HTTP/2 handshake on a TLS connection whose ALPN said `h2`; the driver is
    /// spawned. The new connection goes in `slot` for the requests after this one.
    pub(super) async fn new(io: Io, slot: &Slot) -> Result<H2Conn, ConnectError> {
        let shared = Arc::new(Shared {
            in_flight: AtomicUsize::new(0),
            max_streams: AtomicU32::new(u32::MAX),
            closed: AtomicBool::new(false),
        });
        let (settled, settings) = tokio::sync::oneshot::channel();
        let scanned = Scan {
            io,
            shared: shared.clone(),
            state: ScanState::default(),
            settled: Some(settled),
        };
        let (sender, driver) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(client::MAX_HEAD as u32)
            .handshake(TokioIo::new(scanned))
            .await
            .map_err(ConnectError::Handshake)?;
        let done = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
            done.closed.store(true, Ordering::Relaxed);
        });
        // Its stream limit is known before requests are put on it (the server's first
        // frame; the caller's connect timeout bounds the wait).
        if settings.await.is_err() {
            return Err(ConnectError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "HTTP/2 connection closed before the upstream's SETTINGS",
            )));
        }
        let handle = Handle { sender, shared };
        let conn = handle.reserve(false);
        *crate::sync::lock(&slot.0) = Some((handle, Instant::now()));
        Ok(conn)
    }

    /// Whether its connection takes another request now (its own stream is reserved).
    pub(super) fn usable_now(&self) -> bool {
        !self.handle.shared.closed.load(Ordering::Relaxed) && !self.handle.sender.is_closed()
    }
}

/// The endpoint's current HTTP/2 connection (at most one takes new requests; a full or
/// closing one is replaced and drains on its own), and when a request last took it.
#[derive(Debug, Default)]
pub(super) struct Slot(Mutex<Option<(Handle, Instant)>>);

impl Slot {
    /// A stream on the current connection when it has room. One left without a stream for
    /// `idle_timeout` is let go, as an idle HTTP/1.1 connection would be (its driver ends
    /// once the last handle is dropped).
    pub(super) fn take(&self, idle_timeout: Duration) -> Option<H2Conn> {
        let mut slot = crate::sync::lock(&self.0);
        let (handle, used) = slot.as_mut()?;
        let now = Instant::now();
        let idle = handle.shared.in_flight.load(Ordering::Relaxed) == 0
            && now.duration_since(*used) >= idle_timeout;
        if idle || handle.shared.closed.load(Ordering::Relaxed) || handle.sender.is_closed() {
            *slot = None;
            return None;
        }
        if !handle.usable_now() {
            // Full: the caller opens another, which replaces this one here.
            return None;
        }
        *used = now;
        Some(handle.reserve(true))
    }
}

/// The request body as hyper's stream task polls it: each step wakes the request's own task,
/// which runs the first-byte timer from what the body says (`forward::within_first_byte`).
pub(super) struct Notifying {
    inner: RequestBody,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Body for Notifying {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(w) = crate::sync::lock(&this.waker).take() {
            w.wake();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Headers HTTP/2 forbids (RFC 9113 8.2.2); hop-by-hop ones are gone already, this makes
/// sure (h2 refuses a request with one).
const CONNECTION_SPECIFIC: [header::HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
];

fn strip_connection_specific(headers: &mut HeaderMap) {
    for name in &CONNECTION_SPECIFIC {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// `exchange` on an HTTP/2 connection.
pub(super) async fn exchange_h2(
    conn: H2Conn,
    pool: Arc<EndpointPool>,
    request: &mut Option<Request<RequestBody>>,
    forwarded: Option<&Forwarded>,
) -> Option<Result<Response<PooledBody>, ExchangeError>> {
    let req = request.take()?;
    let (mut parts, body) = req.into_parts();
    let original_uri = parts.uri.clone();
    let original_version = parts.version;
    let host = parts.headers.remove(header::HOST);
    let mut added = forwarded
        .map(|f| append_forwarded(&mut parts.headers, f))
        .unwrap_or_default();
    // `:authority` carries what `Host` did, `:scheme` is https (TLS is the only way here).
    let authority = host
        .as_ref()
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| Authority::try_from(pool.host_header.as_bytes()).ok());
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = Uri::builder().scheme(Scheme::HTTPS).path_and_query(path);
    if let Some(a) = authority {
        uri = uri.authority(a);
    }
    if let Ok(uri) = uri.build() {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_2;
    let removed: Vec<_> = CONNECTION_SPECIFIC
        .iter()
        .chain([&header::TE])
        .flat_map(|n| {
            parts
                .headers
                .get_all(n)
                .iter()
                .map(|v| (n.clone(), v.clone()))
        })
        .collect();
    strip_connection_specific(&mut parts.headers);
    let waker = Arc::new(Mutex::new(None));
    let req = Request::from_parts(
        parts,
        Notifying {
            inner: body,
            waker: waker.clone(),
        },
    );
    let H2Conn { handle, stream, .. } = conn;
    let Handle { mut sender, shared } = handle;
    let result = {
        let mut response = std::pin::pin!(sender.try_send_request(req));
        poll_fn(|cx| {
            *crate::sync::lock(&waker) = Some(cx.waker().clone());
            response.as_mut().poll(cx)
        })
        .await
    };
    match result {
        Ok(mut resp) => {
            // The rest of the proxy (and the client's connection) is HTTP/1.1's or its own.
            *resp.version_mut() = Version::HTTP_11;
            Some(Ok(resp.map(|body| {
                let body = H2Body {
                    body,
                    _stream: stream,
                    done: false,
                };
                PooledBody::new(Inner::H2(Box::new(body)), pool)
            })))
        }
        Err(mut e) => {
            let unsent = e.take_message();
            // No new request on a connection that is going (a stream the upstream reset
            // says nothing of the others).
            if unsent.is_some() || sender.is_closed() {
                shared.closed.store(true, Ordering::Relaxed);
            }
            if let Some(unsent) = unsent {
                // Never sent: lent back as it came, for a new connection.
                let (mut parts, body) = unsent.into_parts();
                for name in added.drain(..) {
                    parts.headers.remove(name);
                }
                parts.uri = original_uri;
                parts.version = original_version;
                for name in removed.iter().map(|(n, _)| n) {
                    parts.headers.remove(name);
                }
                for (name, value) in removed {
                    parts.headers.append(name, value);
                }
                if let Some(h) = host {
                    parts.headers.insert(header::HOST, h);
                }
                *request = Some(Request::from_parts(parts, body.inner));
            }
            Some(Err(hyper_error(e.into_error())))
        }
    }
}

/// One open stream, counted against the connection's limit until dropped.
#[derive(Debug)]
struct StreamSlot(Arc<Shared>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body on an HTTP/2 stream. Dropped before its end, hyper resets the stream.
pub(super) struct H2Body {
    body: Incoming,
    _stream: StreamSlot,
    done: bool,
}

impl H2Body {
    /// The next data (trailers are read and dropped, as rampart's client does); Ready(None)
    /// at the end.
    pub(super) fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, WireError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        if self.body.is_end_stream() {
                            self.done = true;
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    Err(_trailers) => {}
                },
                Some(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(WireError::Hyper(e))));
                }
                None => {
                    self.done = true;
                    return Poll::Ready(None);
                }
            }
        }
    }

    pub(super) fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket under hyper's HTTP/2 client, reading the frame headers of what the server
/// sends for the two things hyper does not tell: its stream limit and its GOAWAY.
struct Scan {
    io: Io,
    shared: Arc<Shared>,
    state: ScanState,
    /// Told when the server's first SETTINGS frame has been read whole.
    settled: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Where the scan stands in the server's frame sequence.
#[derive(Default)]
struct ScanState {
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame is a SETTINGS frame (not an ACK): its entries are read.
    settings: bool,
    entry: [u8; 6],
    entry_len: usize,
    /// A whole SETTINGS frame (not an ACK) was read.
    settings_seen: bool,
}

const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

impl ScanState {
    fn feed(&mut self, mut bytes: &[u8], shared: &Shared) {
        while !bytes.is_empty() {
            if self.head_len < 9 {
                let n = (9 - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                self.head_len += n;
                bytes = &bytes[n..];
                if self.head_len < 9 {
                    return;
                }
                let h = self.head;
                self.left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.settings = h[3] == FRAME_SETTINGS && h[4] & 0x1 == 0;
                self.entry_len = 0;
                if h[3] == FRAME_GOAWAY {
                    shared.closed.store(true, Ordering::Relaxed);
                }
                if self.left == 0 {
                    self.end_frame();
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            if self.settings {
                for &b in &bytes[..n] {
                    self.entry[self.entry_len] = b;
                    self.entry_len += 1;
                    if self.entry_len == 6 {
                        self.entry_len = 0;
                        let e = self.entry;
                        let id = u16::from_be_bytes([e[0], e[1]]);
                        if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                            let v = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
                            shared.max_streams.store(v, Ordering::Relaxed);
                        }
                    }
                }
            }
            self.left -= n;
            bytes = &bytes[n..];
            if self.left == 0 {
                self.end_frame();
            }
        }
    }

    fn end_frame(&mut self) {
        self.head_len = 0;
        if self.settings {
            self.settings_seen = true;
        }
    }
}

/// What the scan learns from the server's bytes, fed in `pieces`: the stream limit, whether
/// a GOAWAY came, whether a whole SETTINGS frame did (the fuzz target `h2_scan` checks that
/// any split of the bytes learns the same).
pub(crate) fn scan_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (u32, bool, bool) {
    let shared = Shared {
        in_flight: AtomicUsize::new(0),
        max_streams: AtomicU32::new(u32::MAX),
        closed: AtomicBool::new(false),
    };
    let mut state = ScanState::default();
    for piece in pieces {
        state.feed(piece, &shared);
    }
    (
        shared.max_streams.load(Ordering::Relaxed),
        shared.closed.load(Ordering::Relaxed),
        state.settings_seen,
    )
}

impl AsyncRead for Scan {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.state.feed(&buf.filled()[before..], &this.shared);
        if this.state.settings_seen
            && let Some(settled) = this.settled.take()
        {
            let _ = settled.send(());
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scan {
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
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            in_flight: AtomicUsize::new(0),
            max_streams: AtomicU32::new(u32::MAX),
            closed: AtomicBool::new(false),
        }
    }

    #[test]
    fn the_scan_finds_the_stream_limit_and_goaway_across_any_split() {
        let mut wire = Vec::new();
        // SETTINGS: ENABLE_PUSH=0, MAX_CONCURRENT_STREAMS=7.
        wire.extend_from_slice(&[0, 0, 12, FRAME_SETTINGS, 0, 0, 0, 0, 0]);
        wire.extend_from_slice(&[0, 2, 0, 0, 0, 0, 0, 3, 0, 0, 0, 7]);
        // A SETTINGS ACK, a DATA frame whose payload looks like a SETTINGS entry.
        wire.extend_from_slice(&[0, 0, 0, FRAME_SETTINGS, 1, 0, 0, 0, 0]);
        wire.extend_from_slice(&[0, 0, 6, 0, 0, 0, 0, 0, 1, 0, 3, 0, 0, 0, 1]);
        let goaway = [0, 0, 8, FRAME_GOAWAY, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        for split in 1..wire.len() {
            let s = shared();
            let mut state = ScanState::default();
            for piece in wire.chunks(split) {
                state.feed(piece, &s);
            }
            assert_eq!(s.max_streams.load(Ordering::Relaxed), 7, "split {split}");
            assert!(state.settings_seen);
            assert!(!s.closed.load(Ordering::Relaxed));
            state.feed(&goaway, &s);
            assert!(s.closed.load(Ordering::Relaxed));
        }
    }
}
