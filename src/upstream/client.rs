//! HTTP/1.1 to the upstreams: one connection, one exchange at a time, driven by the
//! request's own task.
//!
//! hyper's client connection hands every request to a dispatcher through a channel, gets
//! the response back through another, and runs a generic state machine in between: about a
//! fifth of rampart's instructions per proxied request. A proxy needs much less: write the
//! head, stream the body, read the response head, stream the response body. Here that is
//! done straight on the socket, and header values and body chunks are slices of the one
//! read buffer, not copies. Upgrades (101) still go through hyper (`pool::exchange_upgrade`).
//!
//! Responses are read as RFC 9112 says, as strictly as hyper's client: a final response
//! after any 1xx; no body for HEAD, 204 and 304; chunked when the last transfer coding is
//! chunked (refused if Content-Length came too, as nginx and Envoy do); otherwise
//! Content-Length (all values must agree); otherwise until the upstream closes. Anything
//! else is an invalid response, answered 502 before the head or as a cut stream after it.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::{BodyError, RequestBody};
use crate::upstream::forwarded::Forwarded;
use crate::upstream::pool::Io;

/// Largest response head accepted (Envoy's default limit is 60 KiB).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one response head (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after the last chunk (they are read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;
/// Free room offered to each read.
const READ_ROOM: usize = 16 * 1024;
/// Below this much free room the buffer is compacted or renewed before a read.
const MIN_READ: usize = 2 * 1024;
/// A buffered request body up to this size goes out in the same write as the head.
const BODY_WITH_HEAD: usize = 16 * 1024;
/// A write buffer that grew past this (a large body frame) is not kept for the next request.
const KEEP_WRITE_BUFFER: usize = 64 * 1024;

pub(crate) use crate::body::WireError;

/// Why an exchange failed: the connection, or the client's own request body.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("request body: {0}")]
    RequestBody(BodyError),
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy)]
enum Outgoing {
    /// Bytes still owed under Content-Length.
    Length(u64),
    Chunked,
}

/// Where the response body stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Incoming {
    /// No body, or all of it was read.
    Done,
    /// Bytes still to come under Content-Length.
    Length(u64),
    /// Until the upstream closes the connection.
    UntilClose,
    Chunked(Chunk),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes left in the current chunk.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes seen so far.
    Trailers(usize),
}

/// What the buffered bytes gave.
pub(crate) enum Step {
    Data(Bytes),
    End,
    /// More bytes must be read first.
    More,
}

/// What a complete head turned out to be.
pub(crate) enum Head {
    Partial,
    /// A 1xx answer (already consumed): the final one follows.
    Informational,
    Final(Response<()>),
}

/// The response side of a connection: the read buffer and where the response stands. It
/// knows nothing of the socket (`poll_fill` is lent one), so the fuzz targets drive the
/// same parsing from byte slices (`crate::fuzz`).
pub(crate) struct Reader {
    /// `read[..filled]` is input not yet consumed; the rest is initialized room for the next
    /// read (kept initialized so that reads need no zeroing).
    read: BytesMut,
    filled: usize,
    incoming: Incoming,
    /// The connection ends with this response: it said so (`Connection: close`, HTTP/1.0),
    /// its body runs until the close, or bytes came after its end (the upstream is out of
    /// step).
    close: bool,
}

impl Reader {
    pub(crate) fn new() -> Self {
        Reader {
            read: BytesMut::new(),
            filled: 0,
            incoming: Incoming::Done,
            close: false,
        }
    }

    /// Makes at least `min` bytes of initialized room after the unconsumed input, reusing
    /// the buffer when nothing else holds a part of it.
    fn room(&mut self, min: usize) {
        if self.read.len() - self.filled >= min {
            return;
        }
        let want = self.filled + min.max(READ_ROOM);
        self.read.truncate(self.filled);
        self.read.reserve(want - self.filled);
        self.read.resize(want, 0);
    }

    /// One read from `io`; Ok(0) at the end of the stream.
    fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        self.room(MIN_READ);
        let mut buf = ReadBuf::new(&mut self.read[self.filled..]);
        ready!(Pin::new(io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.filled += n;
        Poll::Ready(Ok(n))
    }

    /// Appends input as a read would (the fuzz targets' socket).
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.read[self.filled..self.filled + bytes.len()].copy_from_slice(bytes);
        self.filled += bytes.len();
    }

    /// Unconsumed input.
    pub(crate) fn buffered(&self) -> usize {
        self.filled
    }

    /// Where the response stands, for comparing two readers (the fuzz targets).
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            incoming: self.incoming,
            // Bytes not consumed end the connection as surely as a close (`usable_now`):
            // when they came does not matter.
            ends_connection: self.close || self.filled > 0,
        }
    }

    /// The first `n` unconsumed bytes, as a slice of the buffer.
    fn take(&mut self, n: usize) -> Bytes {
        self.filled -= n;
        self.read.split_to(n).freeze()
    }

    fn consume(&mut self, n: usize) {
        self.filled -= n;
        self.read.advance(n);
    }

    /// Parses the buffered input as a response head to a request (a HEAD request when
    /// `head_request`); on a final head, the body's framing is set.
    pub(crate) fn parse_head(&mut self, head_request: bool) -> Result<Head, WireError> {
        // Where each name and value lies in the head, so that values can be slices of it
        // once the head is split off the buffer.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let (len, code, http10, count) = {
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let input = &self.read[..self.filled];
            let mut parsed = httparse::Response::new(&mut []);
            let status = httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut parsed, input, &mut slots)
                .map_err(|e| {
                    WireError::Invalid(match e {
                        httparse::Error::TooManyHeaders => "more than 100 header fields",
                        _ => "malformed response head",
                    })
                })?;
            let httparse::Status::Complete(len) = status else {
                if self.filled >= MAX_HEAD {
                    return Err(WireError::Invalid("response head over 64 KiB"));
                }
                return Ok(Head::Partial);
            };
            if len > MAX_HEAD {
                return Err(WireError::Invalid("response head over 64 KiB"));
            }
            let base = input.as_ptr() as usize;
            let offset = |s: &[u8]| (s.as_ptr() as usize).wrapping_sub(base) as u32;
            for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
                let (n, v) = (offset(h.name.as_bytes()), offset(h.value));
                *span = (n, n + h.name.len() as u32, v, v + h.value.len() as u32);
            }
            (
                len,
                parsed.code.unwrap_or(0),
                parsed.version == Some(0),
                parsed.headers.len(),
            )
        };
        let status = StatusCode::from_u16(code)
            .map_err(|_| WireError::Invalid("status code out of range"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            // Only upgrade requests (sent through hyper) may be answered so.
            return Err(WireError::Invalid("unrequested 101 Switching Protocols"));
        }
        if status.is_informational() {
            self.consume(len);
            return Ok(Head::Informational);
        }
        let head = self.take(len);
        // One more for the X-Request-Id echoed to the client: no rehash when it is added.
        let mut headers = HeaderMap::with_capacity(count + 1);
        let mut length: Option<u64> = None;
        let mut transfer_encoding = false;
        let mut chunked = false;
        let mut close = http10;
        for &(ns, ne, vs, ve) in &spans[..count] {
            let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
            let name = head
                .get(ns..ne)
                .and_then(|n| HeaderName::from_bytes(n).ok())
                .ok_or(WireError::Invalid("bad header name"))?;
            if ve > head.len() || vs > ve {
                return Err(WireError::Invalid("bad header value"));
            }
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| WireError::Invalid("bad header value"))?;
            if name == header::CONTENT_LENGTH {
                let n = parse_length(value.as_bytes())
                    .ok_or(WireError::Invalid("bad Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(WireError::Invalid("conflicting Content-Length values"));
                }
                length = Some(n);
            } else if name == header::TRANSFER_ENCODING {
                transfer_encoding = true;
                // Only the last coding of the last field counts.
                chunked = last_token(value.as_bytes()).eq_ignore_ascii_case(b"chunked");
            } else if name == header::CONNECTION {
                for token in value.as_bytes().split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if http10 && token.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
            headers.append(name, value);
        }
        if transfer_encoding && http10 {
            // RFC 9112 6.1: the framing of such a message is faulty (it was likely passed
            // through an HTTP/1.0 hop that did not decode it). Refused, as nginx and
            // hyper's client do.
            return Err(WireError::Invalid(
                "Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        self.incoming = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Incoming::Done
        } else if transfer_encoding {
            if length.is_some() {
                // Maybe an attempt to desynchronize (RFC 9112 6.3): refused, as nginx and
                // Envoy do, rather than guessing which framing the upstream meant.
                return Err(WireError::Invalid(
                    "both Content-Length and Transfer-Encoding",
                ));
            }
            close |= !chunked;
            if chunked {
                Incoming::Chunked(Chunk::Size)
            } else {
                Incoming::UntilClose
            }
        } else {
            match length {
                Some(0) => Incoming::Done,
                Some(n) => Incoming::Length(n),
                None => {
                    close = true;
                    Incoming::UntilClose
                }
            }
        };
        if close {
            self.close = true;
        }
        if self.incoming == Incoming::Done {
            self.body_ended();
        }
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(Head::Final(response))
    }

    /// The body was read to its end; bytes beyond it mean the upstream is out of step.
    fn body_ended(&mut self) {
        self.incoming = Incoming::Done;
        if self.filled > 0 {
            self.close = true;
        }
    }

    pub(crate) fn body_done(&self) -> bool {
        self.incoming == Incoming::Done
    }

    /// The whole body is buffered and framed by its length: nothing more can go wrong
    /// with it.
    fn body_buffered(&self) -> bool {
        match self.incoming {
            Incoming::Done => true,
            Incoming::Length(n) => self.filled as u64 >= n,
            _ => false,
        }
    }

    /// Whether the connection can carry another response after this one, as far as the
    /// response tells: read to its end, nothing said or sent to end the connection.
    pub(crate) fn reusable(&self) -> bool {
        !self.close && self.incoming == Incoming::Done
    }

    /// The upstream closed the connection while the body was being read: the end of a
    /// body that runs until the close, a cut one otherwise.
    pub(crate) fn eof(&mut self) -> Result<(), WireError> {
        self.close = true;
        if self.incoming == Incoming::UntilClose {
            self.incoming = Incoming::Done;
            return Ok(());
        }
        Err(WireError::ClosedInBody)
    }

    /// Works through the buffered bytes only. Without `data`, it stops before body data
    /// (for reading past framing without taking any).
    pub(crate) fn step(&mut self, data: bool) -> Result<Step, WireError> {
        loop {
            match self.incoming {
                Incoming::Done => return Ok(Step::End),
                Incoming::Length(rest) => {
                    if !data || self.filled == 0 {
                        return Ok(Step::More);
                    }
                    let n = self.filled.min(usize::try_from(rest).unwrap_or(usize::MAX));
                    let chunk = self.take(n);
                    if rest == n as u64 {
                        self.body_ended();
                    } else {
                        self.incoming = Incoming::Length(rest - n as u64);
                    }
                    return Ok(Step::Data(chunk));
                }
                Incoming::UntilClose => {
                    if !data || self.filled == 0 {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(self.take(self.filled)));
                }
                Incoming::Chunked(Chunk::Size) => {
                    let Some(line) = self.line(MAX_CHUNK_LINE)? else {
                        return Ok(Step::More);
                    };
                    let size = parse_chunk_size(&self.read[..line])
                        .ok_or(WireError::Invalid("bad chunk size line"))?;
                    self.consume(line + 2);
                    self.incoming = Incoming::Chunked(if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    });
                }
                Incoming::Chunked(Chunk::Data(rest)) => {
                    if !data || self.filled == 0 {
                        return Ok(Step::More);
                    }
                    let n = self.filled.min(usize::try_from(rest).unwrap_or(usize::MAX));
                    let chunk = self.take(n);
                    self.incoming = Incoming::Chunked(if rest == n as u64 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(rest - n as u64)
                    });
                    return Ok(Step::Data(chunk));
                }
                Incoming::Chunked(Chunk::DataEnd) => {
                    if self.filled < 2 {
                        return Ok(Step::More);
                    }
                    if &self.read[..2] != b"\r\n" {
                        return Err(WireError::Invalid("chunk data not followed by CRLF"));
                    }
                    self.consume(2);
                    self.incoming = Incoming::Chunked(Chunk::Size);
                }
                Incoming::Chunked(Chunk::Trailers(seen)) => {
                    let Some(line) = self.line(MAX_TRAILERS - seen)? else {
                        return Ok(Step::More);
                    };
                    self.consume(line + 2);
                    if line == 0 {
                        self.body_ended();
                    } else {
                        self.incoming = Incoming::Chunked(Chunk::Trailers(seen + line + 2));
                    }
                }
            }
        }
    }

    /// The length of the CRLF-terminated line at the start of the input (CRLF excluded),
    /// None until it is all there, an error once it is longer than `limit`.
    fn line(&self, limit: usize) -> Result<Option<usize>, WireError> {
        let input = &self.read[..self.filled.min(limit)];
        match input.iter().position(|&b| b == b'\n') {
            Some(lf) if lf > 0 && input[lf - 1] == b'\r' => Ok(Some(lf - 1)),
            Some(_) => Err(WireError::Invalid("line not ended by CRLF")),
            None if self.filled >= limit => Err(WireError::Invalid("line too long")),
            None => Ok(None),
        }
    }
}

/// A reader's state, comparable.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    incoming: Incoming,
    ends_connection: bool,
}

impl Snapshot {
    /// The connection could carry another response.
    pub(crate) fn reusable(&self) -> bool {
        !self.ends_connection && self.incoming == Incoming::Done
    }
}

/// One upstream HTTP/1.1 connection.
pub struct Conn {
    io: Io,
    reader: Reader,
    /// The request head (and small bodies, and chunk framing) waiting to be written.
    write: Vec<u8>,
    written: usize,
    /// The request body still being sent, and how it is framed.
    sending: Option<(RequestBody, Outgoing)>,
    /// May carry another request once this exchange has ended, as far as the request side
    /// goes (the response side is the reader's).
    keep_alive: bool,
    /// Taken from the pool (not fresh): a failure before sending may be a stale socket.
    pub reused: bool,
}

impl Conn {
    pub fn new(io: Io) -> Self {
        Conn {
            io,
            reader: Reader::new(),
            write: Vec::new(),
            written: 0,
            sending: None,
            keep_alive: true,
            reused: false,
        }
    }

    /// The last exchange ended cleanly and the upstream did not ask to close. Facts about
    /// the wire, not about what was queued: every request byte written, the response read
    /// to its end, nothing after it (see `response_ended`).
    pub fn reusable(&self) -> bool {
        self.keep_alive && self.reader.reusable() && !self.still_sending()
    }

    /// Whether an idle connection can take a request now: still open, and silent (an idle
    /// upstream has nothing to say; anything it did say makes the connection unusable).
    pub fn usable_now(&mut self) -> bool {
        // (Bytes left over after a response already made it unreusable: `body_ended`.)
        if !self.reusable() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        self.reader.poll_fill(&mut self.io, &mut cx).is_pending()
    }

    /// A response that ended before its request was all written (an early 401/413) leaves
    /// the upstream expecting the rest of the body: whatever is sent next on this
    /// connection would be read as that body, or the body's bytes as a request. Such a
    /// connection is closed, never pooled, as nginx, Envoy and HAProxy do. Called after
    /// every step of the reader that may have ended the response.
    fn response_ended(&mut self) {
        if self.reader.body_done() && self.still_sending() {
            self.keep_alive = false;
        }
    }

    /// Encodes the request head (and a small buffered body) for writing; the body is
    /// sent by `poll_send` once the head is on its way.
    fn encode(
        &mut self,
        req: &Request<RequestBody>,
        forwarded: Option<&Forwarded>,
    ) -> Option<Outgoing> {
        let w = &mut self.write;
        w.clear();
        self.written = 0;
        w.extend_from_slice(req.method().as_str().as_bytes());
        w.push(b' ');
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        w.extend_from_slice(target.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in req.headers() {
            w.extend_from_slice(name.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        if let Some(f) = forwarded {
            f.write(w);
        }
        let body = req.body();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| parse_length(v.as_bytes()));
        let framing = if let Some(n) = declared {
            Some(Outgoing::Length(n))
        } else if body.is_end_stream() {
            // As hyper does: methods that define a body say it is empty.
            if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
                w.extend_from_slice(b"content-length: 0\r\n");
            }
            None
        } else if let Some(n) = body.size_hint().exact() {
            push_number(w, b"content-length: ", n, 10);
            Some(Outgoing::Length(n))
        } else {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Some(Outgoing::Chunked)
        };
        w.extend_from_slice(b"\r\n");
        // A kept (replayable) body that fits goes out with the head: one write.
        if let (RequestBody::Full(Some(b)), Some(Outgoing::Length(n))) = (body, framing)
            && b.len() as u64 == n
            && b.len() <= BODY_WITH_HEAD
        {
            w.extend_from_slice(b);
            return None;
        }
        framing.filter(|f| !matches!(f, Outgoing::Length(0)))
    }

    /// Writes what is buffered; Ready(Ok) once all of it is out.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>> {
        while self.written < self.write.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
            }
            self.written += n;
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.written = 0;
        if self.write.capacity() > KEEP_WRITE_BUFFER {
            self.write = Vec::new();
        } else {
            self.write.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the request body as it comes, until all of it is sent (Ready(Ok)) or the body
    /// has nothing ready (Pending).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        loop {
            ready!(self.poll_flush(cx))?;
            let Some((body, framing)) = self.sending.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let frame = match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    self.sending = None;
                    self.keep_alive = false;
                    return Poll::Ready(Err(ExchangeError::RequestBody(e)));
                }
                None => {
                    let framing = *framing;
                    self.sending = None;
                    match framing {
                        Outgoing::Chunked => self.write.extend_from_slice(b"0\r\n\r\n"),
                        Outgoing::Length(0) => {}
                        Outgoing::Length(_) => {
                            self.keep_alive = false;
                            return Poll::Ready(Err(ExchangeError::RequestBody(BodyError::Length)));
                        }
                    }
                    continue;
                }
            };
            // Trailers of the request are not forwarded.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            match framing {
                Outgoing::Length(rest) => {
                    let len = data.len() as u64;
                    if len > *rest {
                        self.sending = None;
                        self.keep_alive = false;
                        return Poll::Ready(Err(ExchangeError::RequestBody(BodyError::Length)));
                    }
                    *rest -= len;
                    self.write.extend_from_slice(&data);
                }
                Outgoing::Chunked => {
                    push_number(&mut self.write, b"", data.len() as u64, 16);
                    self.write.extend_from_slice(&data);
                    self.write.extend_from_slice(b"\r\n");
                }
            }
            if matches!(framing, Outgoing::Length(0)) {
                self.sending = None;
            }
        }
    }

    /// Request bytes buffered or a request body still to come.
    fn still_sending(&self) -> bool {
        self.sending.is_some() || self.written < self.write.len()
    }

    /// Sending failed after the request started: the upstream may still have answered, so
    /// reading goes on, but this connection carries nothing more.
    fn abandon_send(&mut self) {
        self.sending = None;
        self.write.clear();
        self.written = 0;
        self.keep_alive = false;
    }

    /// Keeps sending the request body while the response is read, when the upstream
    /// answered before it was all sent; a failure to send more ends nothing but reuse.
    fn keep_sending(&mut self, cx: &mut Context<'_>) {
        if self.still_sending()
            && let Poll::Ready(Err(_)) = self.poll_send(cx)
        {
            self.abandon_send();
        }
    }

    /// Reads until a final response head is complete; the body framing is then set. After
    /// an error the connection is good for nothing more.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<Response<()>, WireError>> {
        let result = ready!(self.poll_head_inner(cx, head_request));
        match &result {
            Ok(_) => self.response_ended(),
            Err(_) => self.keep_alive = false,
        }
        Poll::Ready(result)
    }

    fn poll_head_inner(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<Response<()>, WireError>> {
        loop {
            if self.reader.filled > 0 {
                match self.reader.parse_head(head_request)? {
                    Head::Final(response) => return Poll::Ready(Ok(response)),
                    Head::Informational => continue,
                    Head::Partial => {}
                }
            }
            let nothing_yet = self.reader.filled == 0;
            match ready!(self.reader.poll_fill(&mut self.io, cx)) {
                Ok(0) if nothing_yet => return Poll::Ready(Err(WireError::Unanswered)),
                Ok(0) => return Poll::Ready(Err(WireError::ClosedBeforeHead)),
                Ok(_) => {}
                Err(e) if nothing_yet && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Poll::Ready(Err(WireError::Unanswered));
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    pub fn body_done(&self) -> bool {
        self.reader.body_done()
    }

    /// The rest of the body is already read and cannot fail (see `Reader::body_buffered`).
    pub fn body_buffered(&self) -> bool {
        self.reader.body_buffered()
    }

    /// Bytes of the response body still expected, when known.
    pub fn body_remaining(&self) -> Option<u64> {
        match self.reader.incoming {
            Incoming::Done => Some(0),
            Incoming::Length(n) => Some(n),
            _ => None,
        }
    }

    /// The next piece of the response body; Ready(None) at its end. Also keeps sending
    /// the request body, when the upstream answered before it was all sent.
    pub fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, WireError>>> {
        self.keep_sending(cx);
        loop {
            let stepped = self.reader.step(true);
            self.response_ended();
            match stepped? {
                Step::Data(data) => {
                    // Read past framing already here, so the end is known with the last data.
                    let _ = self.reader.step(false);
                    self.response_ended();
                    return Poll::Ready(Some(Ok(data)));
                }
                Step::End => return Poll::Ready(None),
                Step::More => {}
            }
            if ready!(self.reader.poll_fill(&mut self.io, cx))? == 0 {
                let end = self.reader.eof();
                self.response_ended();
                return Poll::Ready(end.err().map(Err));
            }
        }
    }
}

/// Sends `request` (then the `forwarded` headers) on `conn` and reads the response head. On success the connection is
/// returned with the head, ready to read the body. The request stays in `request` (for
/// another connection) when nothing of it reached the socket, and when a pooled connection
/// closed without a byte of answer to a GET, HEAD or OPTIONS without a body: the classic
/// keep-alive race, which nginx retries too. Otherwise it is taken.
pub(crate) async fn exchange(
    conn: &mut Conn,
    request: &mut Option<Request<RequestBody>>,
    forwarded: Option<&Forwarded>,
) -> Option<Result<Response<()>, ExchangeError>> {
    let req = request.as_ref()?;
    let head_request = req.method() == Method::HEAD;
    let framing = conn.encode(req, forwarded);
    // Such a request needs nothing more from `request` once its head is written: it stays
    // lent until an answer starts.
    let replayable = conn.reused
        && framing.is_none()
        && matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if let Err(e) = std::future::poll_fn(|cx| conn.poll_flush(cx)).await {
        conn.keep_alive = false;
        if conn.written > 0 {
            request.take();
        }
        return Some(Err(e.into()));
    }
    if !replayable {
        let body = request.take()?.into_body();
        conn.sending = framing.map(|f| (body, f));
    }
    conn.reader.incoming = Incoming::Done;
    let result = std::future::poll_fn(|cx| {
        if conn.still_sending() {
            match conn.poll_send(cx) {
                Poll::Ready(Err(ExchangeError::RequestBody(e))) => {
                    return Poll::Ready(Err(ExchangeError::RequestBody(e)));
                }
                // The upstream may have answered and stopped reading: look for the answer.
                Poll::Ready(Err(ExchangeError::Wire(_))) => conn.abandon_send(),
                _ => {}
            }
        }
        conn.poll_head(cx, head_request)
            .map_err(ExchangeError::Wire)
    })
    .await;
    if !matches!(result, Err(ExchangeError::Wire(WireError::Unanswered))) {
        request.take();
    }
    Some(result)
}

/// A decimal Content-Length, or a list of equal ones ("42, 42").
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for part in value.split(|&b| b == b',') {
        let digits = part.trim_ascii();
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// The last comma-separated token of a header value, trimmed.
fn last_token(value: &[u8]) -> &[u8] {
    value
        .rsplit(|&b| b == b',')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// A chunk-size line: hex digits, optional whitespace, optional `;extensions`.
pub(crate) fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    line[..digits].iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        Some((n << 4) | u64::from(v))
    })
}

/// Appends `prefix`, `n` in `radix` (10 or 16) and CRLF.
fn push_number(w: &mut Vec<u8>, prefix: &[u8], n: u64, radix: u64) {
    let mut buf = [0u8; 20];
    w.extend_from_slice(prefix);
    w.extend_from_slice(crate::text::digits(n, radix, &mut buf).as_bytes());
    w.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::future::poll_fn;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connection to a socket the test speaks for as the upstream.
    async fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let server = accepted.expect("accept").0;
        server.set_nodelay(true).expect("nodelay");
        (Conn::new(Io::Plain(client.expect("connect"))), server)
    }

    fn request(method: Method, path: &str, body: RequestBody) -> Option<Request<RequestBody>> {
        let mut r = Request::new(body);
        *r.method_mut() = method;
        *r.uri_mut() = path.parse().expect("uri");
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("up"));
        Some(r)
    }

    /// What the upstream read: up to the end of the request head, plus `body` more bytes.
    async fn read_request(server: &mut TcpStream, body: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            let n = server.read(&mut byte).await.expect("read request");
            assert_eq!(
                n,
                1,
                "request cut short: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.push(byte[0]);
        }
        let mut rest = vec![0u8; body];
        server.read_exact(&mut rest).await.expect("read body");
        got.extend_from_slice(&rest);
        got
    }

    /// One exchange: the upstream reads the request head and answers with `segments`, one
    /// write each. Returns the head, and the body or the error that cut it.
    async fn roundtrip(
        conn: &mut Conn,
        server: &mut TcpStream,
        method: Method,
        segments: Vec<Vec<u8>>,
    ) -> Result<(Response<()>, Result<Vec<u8>, WireError>), ExchangeError> {
        let upstream = async {
            read_request(server, 0).await;
            for s in segments {
                server.write_all(&s).await.expect("write");
                tokio::task::yield_now().await;
            }
        };
        let client = async {
            let mut req = request(method, "/x", RequestBody::Empty);
            let head = exchange(conn, &mut req, None).await.expect("a request")?;
            let mut body = Vec::new();
            loop {
                match poll_fn(|cx| conn.poll_body(cx)).await {
                    Some(Ok(b)) => body.extend_from_slice(&b),
                    Some(Err(e)) => return Ok((head, Err(e))),
                    None => return Ok((head, Ok(body))),
                }
            }
        };
        let (_, result) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(upstream, client)
        })
        .await
        .expect("exchange hung");
        result
    }

    /// The upstream reads the request, answers `wire` and closes the connection.
    async fn answer_and_close(mut server: TcpStream, wire: &[u8]) {
        read_request(&mut server, 0).await;
        server.write_all(wire).await.expect("write");
    }

    /// Sends a GET on `conn` and waits for the response head.
    async fn get_head(conn: &mut Conn) {
        let mut req = request(Method::GET, "/", RequestBody::Empty);
        exchange(conn, &mut req, None)
            .await
            .expect("request")
            .expect("head");
    }

    fn one(bytes: &[u8]) -> Vec<Vec<u8>> {
        vec![bytes.to_vec()]
    }

    fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            let ext = if i % 2 == 1 { ";ext=\"v\"" } else { "" };
            out.extend_from_slice(format!("{n:X}{ext}\r\n").as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        out.extend_from_slice(b"0\r\nx-trailer: t\r\n\r\n");
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// However the bytes are split into reads, the same response comes out, and the
        /// connection is ready for the next one.
        #[test]
        fn any_split_of_a_response_reads_the_same(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            use_chunks in any::<bool>(),
            sizes in proptest::collection::vec(1usize..700, 1..5),
            cuts in proptest::collection::vec(1usize..400, 1..8),
        ) {
            let wire = if use_chunks {
                chunked(&body, &sizes)
            } else {
                let mut w = format!("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
                w.extend_from_slice(&body);
                w
            };
            let mut segments = Vec::new();
            let mut rest = &wire[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                segments.push(rest[..n].to_vec());
                rest = &rest[n..];
                i += 1;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let (mut conn, mut server) = pair().await;
                let (head, got) = roundtrip(&mut conn, &mut server, Method::GET, segments).await.expect("exchange");
                assert_eq!(head.status(), StatusCode::OK);
                assert_eq!(head.headers()["x-a"], "1");
                assert_eq!(got.expect("body"), body);
                assert!(conn.reusable());
                // And the next response on the same connection.
                let (head, got) = roundtrip(&mut conn, &mut server, Method::GET, one(b"HTTP/1.1 204 No Content\r\n\r\n")).await.expect("second exchange");
                assert_eq!(head.status(), StatusCode::NO_CONTENT);
                assert!(got.expect("body").is_empty());
            });
        }
    }

    #[tokio::test]
    async fn informational_answers_are_skipped() {
        let (mut conn, mut server) = pair().await;
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (head, body) = roundtrip(&mut conn, &mut server, Method::GET, one(wire))
            .await
            .expect("exchange");
        assert_eq!(head.status(), StatusCode::OK);
        assert!(head.headers().get("link").is_none());
        assert_eq!(body.expect("body"), b"ok");
        assert!(conn.reusable());
    }

    #[tokio::test]
    async fn head_204_and_304_have_no_body_whatever_their_length_says() {
        let (mut conn, mut server) = pair().await;
        for (method, wire) in [
            (
                Method::HEAD,
                &b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"[..],
            ),
            (
                Method::GET,
                b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            ),
            (
                Method::GET,
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            ),
        ] {
            let (head, body) = roundtrip(&mut conn, &mut server, method, one(wire))
                .await
                .expect("exchange");
            assert!(body.expect("body").is_empty());
            assert!(conn.body_done());
            assert!(conn.reusable(), "{}", head.status());
        }
    }

    #[tokio::test]
    async fn a_body_until_close_is_read_to_the_end_and_the_connection_not_reused() {
        let (mut conn, server) = pair().await;
        let upstream = answer_and_close(server, b"HTTP/1.1 200 OK\r\n\r\nall of it");
        let client = async {
            get_head(&mut conn).await;
            let mut body = Vec::new();
            while let Some(b) = poll_fn(|cx| conn.poll_body(cx)).await {
                body.extend_from_slice(&b.expect("body"));
            }
            body
        };
        let (_, body) = tokio::join!(upstream, client);
        assert_eq!(body, b"all of it");
        assert!(!conn.reusable());
    }

    #[tokio::test]
    async fn the_upstream_can_say_the_connection_ends() {
        for (wire, reusable) in [
            (
                &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx"[..],
                false,
            ),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nx", false),
            (
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\nx",
                true,
            ),
            // More bytes than the response: the upstream is out of step.
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nxHTTP/1.1",
                false,
            ),
        ] {
            let (mut conn, mut server) = pair().await;
            let (_, body) = roundtrip(&mut conn, &mut server, Method::GET, one(wire))
                .await
                .expect("exchange");
            assert_eq!(body.expect("body"), b"x");
            assert_eq!(
                conn.reusable(),
                reusable,
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[tokio::test]
    async fn invalid_heads_are_refused() {
        let mut huge = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        huge.extend_from_slice(b"\r\n\r\n");
        let cases: Vec<Vec<u8>> = vec![
            b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nx".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nx".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n".to_vec(),
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(),
            // RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n".to_vec(),
            huge,
        ];
        for wire in cases {
            let (mut conn, mut server) = pair().await;
            let result = roundtrip(&mut conn, &mut server, Method::GET, vec![wire.clone()]).await;
            assert!(
                matches!(result, Err(ExchangeError::Wire(WireError::Invalid(_)))),
                "{:?}: {:?}",
                String::from_utf8_lossy(&wire[..wire.len().min(60)]),
                result.map(|r| r.0.status())
            );
            assert!(!conn.reusable());
        }
    }

    #[tokio::test]
    async fn closing_before_the_head_is_an_error() {
        let (mut conn, server) = pair().await;
        let upstream = answer_and_close(server, b"HTTP/1.1 200");
        let mut req = request(Method::GET, "/", RequestBody::Empty);
        let (_, result) = tokio::join!(upstream, exchange(&mut conn, &mut req, None));
        assert!(matches!(
            result,
            Some(Err(ExchangeError::Wire(WireError::ClosedBeforeHead)))
        ));
        // It was sent: not handed back for another connection.
        assert!(req.is_none());
    }

    #[tokio::test]
    async fn a_closing_pooled_connection_hands_back_only_safe_bodiless_requests() {
        for (method, body, handed_back) in [
            (Method::GET, RequestBody::Empty, true),
            (Method::HEAD, RequestBody::Empty, true),
            (Method::DELETE, RequestBody::Empty, false),
            (
                Method::GET,
                RequestBody::Full(Some(Bytes::from_static(b"x"))),
                true,
            ),
            (
                Method::POST,
                RequestBody::Full(Some(Bytes::from_static(b"x"))),
                false,
            ),
        ] {
            let (mut conn, server) = pair().await;
            conn.reused = true;
            let mut req = request(method.clone(), "/", body);
            let upstream = answer_and_close(server, b"");
            let (_, result) = tokio::join!(upstream, exchange(&mut conn, &mut req, None));
            assert!(
                matches!(
                    result,
                    Some(Err(ExchangeError::Wire(WireError::Unanswered)))
                ),
                "{method}"
            );
            assert_eq!(req.is_some(), handed_back, "{method}");
        }
        // A fresh connection is not a stale one: the failure is the upstream's.
        let (mut conn, server) = pair().await;
        let mut req = request(Method::GET, "/", RequestBody::Empty);
        let (_, result) = tokio::join!(
            answer_and_close(server, b""),
            exchange(&mut conn, &mut req, None)
        );
        assert!(result.is_some_and(|r| r.is_err()));
        assert!(req.is_none());
    }

    #[tokio::test]
    async fn broken_bodies_are_errors_not_ends() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n11111111111111111\r\n",
        ] {
            let (mut conn, mut server) = pair().await;
            let (_, body) = roundtrip(&mut conn, &mut server, Method::GET, one(wire))
                .await
                .expect("head");
            assert!(
                matches!(body, Err(WireError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
        // The upstream closes before Content-Length bytes came.
        let (mut conn, server) = pair().await;
        let upstream =
            answer_and_close(server, b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc");
        let client = async {
            get_head(&mut conn).await;
            let first = poll_fn(|cx| conn.poll_body(cx)).await;
            let second = poll_fn(|cx| conn.poll_body(cx)).await;
            (first, second)
        };
        let (_, (first, second)) = tokio::join!(upstream, client);
        assert_eq!(&first.expect("data").expect("data")[..], b"abc");
        assert!(matches!(second, Some(Err(WireError::ClosedInBody))));
    }

    #[tokio::test]
    async fn requests_are_written_in_origin_form_with_their_framing() {
        let (mut conn, mut server) = pair().await;
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let cases = [
            (
                request(Method::GET, "/a/b?c=1", RequestBody::Empty),
                "GET /a/b?c=1 HTTP/1.1\r\nhost: up\r\n\r\n",
            ),
            (
                request(Method::POST, "/p", RequestBody::Empty),
                "POST /p HTTP/1.1\r\nhost: up\r\ncontent-length: 0\r\n\r\n",
            ),
            (
                request(
                    Method::PUT,
                    "/p",
                    RequestBody::Full(Some(Bytes::from_static(b"hello"))),
                ),
                "PUT /p HTTP/1.1\r\nhost: up\r\ncontent-length: 5\r\n\r\nhello",
            ),
        ];
        for (mut req, expected) in cases {
            let upstream = async {
                let got = read_request(
                    &mut server,
                    expected.len() - expected.find("\r\n\r\n").unwrap_or(0) - 4,
                )
                .await;
                server.write_all(answer).await.expect("write");
                got
            };
            let (got, result) = tokio::join!(upstream, exchange(&mut conn, &mut req, None));
            result.expect("request").expect("head");
            assert_eq!(String::from_utf8_lossy(&got), expected);
            assert!(conn.reusable());
        }
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_usable() {
        let (mut conn, mut server) = pair().await;
        let (_, body) = roundtrip(
            &mut conn,
            &mut server,
            Method::GET,
            one(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        )
        .await
        .expect("exchange");
        body.expect("body");
        assert!(conn.usable_now());
        drop(server);
        // The close reaches the event loop, then the check sees it.
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            while conn.usable_now() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(seen.is_ok(), "close not noticed");
    }

    #[test]
    fn lengths_and_chunk_sizes_parse_strictly() {
        assert_eq!(parse_length(b"42"), Some(42));
        assert_eq!(parse_length(b"42, 42"), Some(42));
        assert_eq!(parse_length(b"42, 43"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b"99999999999999999999"), None);
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"1A ;x=y"), Some(26));
        assert_eq!(parse_chunk_size(b"0"), Some(0));
        assert_eq!(parse_chunk_size(b""), None);
        assert_eq!(parse_chunk_size(b"1 2"), None);
        assert_eq!(parse_chunk_size(b"-1"), None);
        assert_eq!(parse_chunk_size(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_chunk_size(b"10000000000000000"), None);
        let mut w = Vec::new();
        push_number(&mut w, b"n: ", 1_234_567, 10);
        push_number(&mut w, b"", 255, 16);
        push_number(&mut w, b"", 0, 16);
        assert_eq!(w, b"n: 1234567\r\nff\r\n0\r\n");
    }
}
