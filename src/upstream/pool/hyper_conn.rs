//! hyper's client (`upstreams.<name>.client: hyper`): the differential reference of the
//! wire tests and the fallback switch. hyper does not say how far a request got on the
//! wire, so the socket and the request body under it report that here (`Progress`).

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::{Inner, PooledBody};
use super::{ConnectError, EndpointPool, Io};
use crate::body::{BodyError, RequestBody};
use crate::upstream::client::{self, ExchangeError, WireError};
use crate::upstream::forwarded::Forwarded;

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
    pub(super) finished: bool,
    pub reused: bool,
    progress: Arc<Progress>,
}

impl std::fmt::Debug for HyperConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperConn")
            .field("finished", &self.finished)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl HyperConn {
    pub(super) async fn new(io: Io) -> Result<HyperConn, ConnectError> {
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
    pub(super) fn usable_now(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.drive(&mut cx) {
            return false;
        }
        matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }
}

/// `exchange` on a hyper connection.
pub(super) async fn exchange_hyper(
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
pub(super) fn append_forwarded(headers: &mut HeaderMap, f: &Forwarded) -> Vec<HeaderName> {
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
pub(super) fn hyper_error(e: hyper::Error) -> ExchangeError {
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
pub(super) struct HyperBody {
    body: Incoming,
    /// Taken when the connection goes back to the pool or is closed.
    pub(super) conn: Option<Box<HyperConn>>,
    /// The body ended with every request byte written: the connection may be pooled.
    pub(super) reusable: bool,
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
    pub(super) fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, WireError>>> {
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

    pub(super) fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
