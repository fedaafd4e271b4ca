//! HTTP/1 request-smuggling guard at the byte level.
//!
//! hyper's h1 parser drops `Content-Length` from the header map when `Transfer-Encoding` is
//! also present, so the service cannot see the ambiguity and would forward the request.
//! [`H1Guard`] wraps the accepted stream, watches the bytes hyper reads (without copying or
//! changing them) and follows HTTP/1 message framing to find every request head. For each
//! head it queues a [`Verdict`]; the service pops one per HTTP/1 request (hyper dispatches
//! them one at a time, in order, after their head was read, so the verdict is always there).
//!
//! The tracker mirrors hyper's own parsing (httparse for heads, hyper's chunked decoder
//! states for bodies). Whenever it cannot follow the stream it stops for good and queues
//! nothing more: hyper refuses such input itself, and the guard must never break a
//! connection hyper would serve.
//!
//! A connection that starts with the HTTP/2 preface is handed to the h2 frame watch
//! (`h2_guard`) instead, which fails the read when the client floods control frames.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sync::lock;

use super::h2_guard::H2Watch;

/// What the guard saw in one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Ok,
    /// Both `Content-Length` and `Transfer-Encoding`: refuse with 400.
    ContentLengthAndTransferEncoding,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// hyper's default header count; enough for nearly every request without a heap buffer.
const STACK_HEADERS: usize = 100;
/// Room for bytes read while an upgrade request awaits its answer, beyond one head: hyper
/// reads at most one buffer ahead then, so this is only ever hit by a tunnel we failed to
/// hear about.
const STASH_SLACK: usize = 64 * 1024;

/// The most request headers hyper is ever told to accept, whatever the configuration says.
/// hyper reserves a slot per allowed header (about 48 bytes) on every head it parses once
/// the limit is above its default of 100, so an unbounded value is an allocation the size
/// of the configuration on the request path (4294967295 asked for 137 GB and aborted).
pub(crate) const MAX_HEADERS_CEILING: usize = 10_000;

/// The header count limit hyper and the guard both apply: the configured one, within
/// 1..=[`MAX_HEADERS_CEILING`].
pub(crate) fn max_headers(configured: usize) -> usize {
    configured.clamp(1, MAX_HEADERS_CEILING)
}

/// Wraps `inner` and returns the handle the service pops verdicts from.
pub(crate) fn wrap<S>(
    inner: S,
    max_head_bytes: usize,
    max_headers: usize,
) -> (H1Guard<S>, Verdicts) {
    let tracker = Arc::new(Mutex::new(Tracker::new(max_head_bytes, max_headers)));
    let guard = H1Guard {
        inner,
        tracker: tracker.clone(),
        active: true,
        h2: None,
    };
    (guard, Verdicts(tracker))
}

/// The IO wrapper: reads feed the tracker, writes pass straight through.
pub(crate) struct H1Guard<S> {
    inner: S,
    tracker: Arc<Mutex<Tracker>>,
    /// Cached "still tracking" so a stopped guard (HTTP/2, tunnels) costs no lock.
    active: bool,
    /// The frame watch of an HTTP/2 connection (after the preface).
    h2: Option<H2Watch>,
}

/// The service's side of one connection's guard.
#[derive(Clone)]
pub(crate) struct Verdicts(Arc<Mutex<Tracker>>);

impl Verdicts {
    /// The verdict for the HTTP/1 request hyper is dispatching now. `Ok` when the guard
    /// stopped tracking.
    pub(crate) fn next(&self) -> Verdict {
        lock(&self.0).next_verdict()
    }

    /// The request was answered 101: what follows is another protocol, stop looking.
    pub(crate) fn switched(&self) {
        lock(&self.0).stop();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H1Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !matches!(res, Poll::Ready(Ok(()))) {
            return res;
        }
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return res;
        }
        let mut frames = new;
        if this.active {
            let mut t = lock(&this.tracker);
            t.feed(new);
            this.active = t.is_active();
            match t.h2_at.take() {
                Some(at) => {
                    this.h2 = Some(H2Watch::new());
                    frames = &new[at.min(new.len())..];
                }
                None => return res,
            }
        }
        if let Some(watch) = this.h2.as_mut()
            && !watch.feed(frames)
        {
            tracing::info!("HTTP/2 control-frame flood: closing the connection");
            // A failed read hands over no bytes.
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "HTTP/2 control-frame flood",
            )));
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H1Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&res);
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&res);
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S> H1Guard<S> {
    /// What rampart writes earns an HTTP/2 client room for its WINDOW_UPDATEs.
    fn wrote(&mut self, res: &Poll<io::Result<usize>>) {
        if let (Some(watch), Poll::Ready(Ok(n))) = (self.h2.as_mut(), res) {
            watch.wrote(*n);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a message boundary, expecting a request head.
    Head,
    /// Content-Length body bytes still to come.
    Length(u64),
    /// Inside a chunked body; the u64 is the chunk size being read or the data left.
    Chunked(Chunk, u64),
    /// After an upgrade request: the bytes may be another protocol or the next request,
    /// which only the answer tells. They are stashed until the service knows.
    Paused,
    Stopped,
}

/// hyper's chunked decoder states (proto/h1/decode.rs), so both agree on where a body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

/// The framing facts of one parsed head.
#[derive(Debug, Clone, Copy)]
struct Head {
    len: usize,
    verdict: Verdict,
    body: Body,
    upgrade: bool,
}

#[derive(Debug, Clone, Copy)]
enum Body {
    None,
    Length(u64),
    Chunked,
    /// Framing hyper refuses (bad Content-Length, non-chunked Transfer-Encoding, ...).
    Invalid,
}

pub(crate) struct Tracker {
    state: State,
    /// Bytes of a head split across reads, or the stash while paused. Kept for its capacity.
    partial: Vec<u8>,
    /// Bytes of `partial` known to hold no end of head, so a trickled head is scanned once.
    scanned: usize,
    verdicts: VecDeque<Verdict>,
    /// Nothing but a prefix of the HTTP/2 preface seen yet.
    at_start: bool,
    /// The current message asked for an upgrade: pause once its body is done.
    upgrade: bool,
    /// The preface just ended, this many bytes into the last buffer fed: HTTP/2 frames
    /// follow.
    h2_at: Option<usize>,
    max_head: usize,
    max_headers: usize,
}

impl Tracker {
    pub(crate) fn new(max_head_bytes: usize, max_headers: usize) -> Self {
        Tracker {
            state: State::Head,
            partial: Vec::new(),
            scanned: 0,
            verdicts: VecDeque::new(),
            at_start: true,
            upgrade: false,
            h2_at: None,
            max_head: max_head_bytes,
            max_headers,
        }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.state != State::Stopped
    }

    fn stop(&mut self) {
        self.state = State::Stopped;
        self.at_start = false;
        self.partial = Vec::new();
    }

    /// Verdicts queued and not yet taken.
    pub(crate) fn pending(&self) -> usize {
        self.verdicts.len()
    }

    pub(crate) fn next_verdict(&mut self) -> Verdict {
        if self.verdicts.is_empty() && self.state == State::Paused {
            // hyper dispatched another request, so the upgrade was not switched and the
            // stashed bytes are HTTP after all.
            self.state = State::Head;
            self.scanned = 0;
            let stash = std::mem::take(&mut self.partial);
            self.feed(&stash);
        }
        self.verdicts.pop_front().unwrap_or(Verdict::Ok)
    }

    /// Follows the framing through `buf`, the next bytes of the connection.
    pub(crate) fn feed(&mut self, mut buf: &[u8]) {
        if self.state == State::Stopped || (self.at_start && !self.check_preface(buf)) {
            return;
        }
        while !buf.is_empty() {
            buf = match self.state {
                State::Stopped => return,
                State::Paused => {
                    if self.partial.len().saturating_add(buf.len())
                        > self.max_head.saturating_add(STASH_SLACK)
                    {
                        tracing::debug!("h1 guard: stash over its bound, no longer tracking");
                        self.stop();
                    } else {
                        self.partial.extend_from_slice(buf);
                    }
                    return;
                }
                State::Length(left) => {
                    let take = usize::try_from(left).map_or(buf.len(), |n| n.min(buf.len()));
                    // take <= left, both fit u64.
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        self.after_body()
                    } else {
                        State::Length(left)
                    };
                    &buf[take..]
                }
                State::Chunked(st, size) => self.feed_chunked(st, size, buf),
                State::Head => self.feed_head(buf),
            };
        }
    }

    /// Returns whether to go on with `buf` as HTTP/1. hyper-util serves HTTP/2 when the
    /// connection starts with the preface; then there is nothing for the guard to do.
    fn check_preface(&mut self, buf: &[u8]) -> bool {
        let have = self.partial.len();
        let n = (H2_PREFACE.len() - have).min(buf.len());
        if buf[..n] != H2_PREFACE[have..have + n] {
            self.at_start = false;
            return true;
        }
        if have + n == H2_PREFACE.len() {
            self.stop();
            self.h2_at = Some(n);
        } else {
            // n == buf.len(): all of it is a preface prefix so far.
            self.partial.extend_from_slice(buf);
        }
        false
    }

    fn after_body(&mut self) -> State {
        if std::mem::take(&mut self.upgrade) {
            State::Paused
        } else {
            State::Head
        }
    }

    fn feed_head<'a>(&mut self, buf: &'a [u8]) -> &'a [u8] {
        if self.partial.is_empty() {
            // The steady state: a whole head in one read, parsed in place.
            return match inspect(buf, self.max_headers) {
                Ok(Some(head)) => {
                    self.on_head(head);
                    &buf[head.len..]
                }
                Ok(None) => {
                    if buf.len() > self.max_head {
                        self.stop();
                    } else {
                        self.partial.extend_from_slice(buf);
                        self.scanned = buf.len();
                    }
                    &[]
                }
                Err(()) => {
                    self.stop();
                    &[]
                }
            };
        }
        let old = self.partial.len();
        // One byte over the bound is enough to know hyper refuses the head. Saturating: the
        // bound may be usize::MAX, and a wrapped 0 would take nothing, forever.
        let take = buf
            .len()
            .min(self.max_head.saturating_add(1).saturating_sub(old));
        self.partial.extend_from_slice(&buf[..take]);
        // As hyper does: only parse again once an empty line may have arrived.
        let from = self.scanned.saturating_sub(3);
        let parsed = if has_end(&self.partial[from..]) {
            inspect(&self.partial, self.max_headers)
        } else {
            Ok(None)
        };
        match parsed {
            Ok(Some(head)) => match head.len.checked_sub(old) {
                Some(used) if used <= take => {
                    self.partial.clear();
                    self.scanned = 0;
                    self.on_head(head);
                    &buf[used..]
                }
                _ => {
                    self.stop();
                    &[]
                }
            },
            Ok(None) if self.partial.len() <= self.max_head => {
                self.scanned = self.partial.len();
                &buf[take..]
            }
            _ => {
                self.stop();
                &[]
            }
        }
    }

    fn on_head(&mut self, head: Head) {
        self.verdicts.push_back(head.verdict);
        self.upgrade = head.upgrade;
        self.state = match head.body {
            Body::None | Body::Length(0) => self.after_body(),
            Body::Length(n) => State::Length(n),
            Body::Chunked => State::Chunked(Chunk::Start, 0),
            Body::Invalid => State::Stopped,
        };
        if self.state == State::Stopped {
            self.stop();
        }
    }

    fn feed_chunked<'a>(&mut self, mut st: Chunk, mut size: u64, buf: &'a [u8]) -> &'a [u8] {
        let mut i = 0;
        while i < buf.len() {
            if st == Chunk::Data {
                let take = usize::try_from(size).map_or(buf.len() - i, |n| n.min(buf.len() - i));
                i += take;
                size -= take as u64;
                if size == 0 {
                    st = Chunk::DataCr;
                }
                continue;
            }
            let b = buf[i];
            i += 1;
            let next = match (st, b) {
                (Chunk::Start, _) => hex(b).map(|d| {
                    size = u64::from(d);
                    Chunk::Size
                }),
                (Chunk::Size, b'\t' | b' ') => Some(Chunk::SizeLws),
                (Chunk::Size | Chunk::SizeLws, b';') => Some(Chunk::Extension),
                (Chunk::Size | Chunk::SizeLws, b'\r') => Some(Chunk::SizeLf),
                (Chunk::Size, _) => hex(b).and_then(|d| {
                    size = size.checked_mul(16)?.checked_add(u64::from(d))?;
                    Some(Chunk::Size)
                }),
                (Chunk::SizeLws, b'\t' | b' ') => Some(Chunk::SizeLws),
                (Chunk::Extension, b'\r') => Some(Chunk::SizeLf),
                (Chunk::Extension, b'\n') => None,
                (Chunk::Extension, _) => Some(Chunk::Extension),
                (Chunk::SizeLf, b'\n') if size == 0 => Some(Chunk::EndCr),
                (Chunk::SizeLf, b'\n') => Some(Chunk::Data),
                (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
                (Chunk::DataLf, b'\n') => Some(Chunk::Start),
                (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
                (Chunk::Trailer, _) => Some(Chunk::Trailer),
                (Chunk::TrailerLf, b'\n') => Some(Chunk::EndCr),
                (Chunk::EndCr, b'\r') => Some(Chunk::EndLf),
                (Chunk::EndCr, _) => Some(Chunk::Trailer),
                (Chunk::EndLf, b'\n') => {
                    self.state = self.after_body();
                    return &buf[i..];
                }
                _ => None,
            };
            match next {
                Some(n) => st = n,
                None => {
                    self.stop();
                    return &[];
                }
            }
        }
        self.state = State::Chunked(st, size);
        &[]
    }
}

/// Whether `bytes` holds an empty line (LF LF or LF CR LF), the end of a head for httparse.
fn has_end(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && bytes.get(i + 2) == Some(&b'\n')))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Parses a head at the start of `buf` the way hyper does. `Ok(None)`: incomplete;
/// `Err`: hyper would refuse it too.
fn inspect(buf: &[u8], max_headers: usize) -> Result<Option<Head>, ()> {
    let mut stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
    let on_stack = max_headers.min(STACK_HEADERS);
    match inspect_with(buf, &mut stack[..on_stack]) {
        Err(httparse::Error::TooManyHeaders) if max_headers > STACK_HEADERS => {
            // Rare: more headers than hyper's default, but maybe within the configured
            // limit. Sized by the bytes at hand, never by the configuration: every header
            // ends a line, and httparse takes one slot for a header it has not seen the
            // end of, so the line count plus one is all the room the head can use.
            let lines = buf.iter().filter(|&&b| b == b'\n').count();
            let slots = max_headers.min(lines.saturating_add(1));
            let mut heap = vec![MaybeUninit::<httparse::Header<'_>>::uninit(); slots];
            inspect_with(buf, &mut heap).map_err(|_| ())
        }
        r => r.map_err(|_| ()),
    }
}

fn inspect_with<'b>(
    buf: &'b [u8],
    headers: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<Head>, httparse::Error> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, headers)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let http11 = req.version == Some(1);
    // hyper (proto/h1/role.rs): CONNECT, or Upgrade on HTTP/1.1, may switch protocols.
    let mut upgrade = req.method == Some("CONNECT");
    let mut has_cl = false;
    let mut te: Option<bool> = None;
    let mut length: Option<u64> = None;
    let mut invalid = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // hyper: only the last encoding of the last line decides chunked.
            te = Some(is_chunked(h.value));
            invalid |= !http11;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            has_cl = true;
            // hyper checks the value only while no Transfer-Encoding was seen.
            if te.is_none() {
                match (digits(h.value), length) {
                    (None, _) => invalid = true,
                    (Some(n), Some(prev)) if n != prev => invalid = true,
                    (Some(n), _) => length = Some(n),
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = http11;
        }
    }
    let verdict = if has_cl && te.is_some() {
        Verdict::ContentLengthAndTransferEncoding
    } else {
        Verdict::Ok
    };
    let body = match (te, length) {
        _ if invalid => Body::Invalid,
        (Some(true), _) => Body::Chunked,
        (Some(false), _) => Body::Invalid,
        (None, Some(n)) => Body::Length(n),
        (None, None) => Body::None,
    };
    Ok(Some(Head {
        len,
        verdict,
        body,
        upgrade,
    }))
}

/// hyper's `content_length_parse`: plain decimal digits, no sign, no list.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// hyper's `is_chunked_`: a visible-ASCII value whose last comma-separated token is
/// `chunked`.
fn is_chunked(v: &[u8]) -> bool {
    if !v.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        return false;
    }
    let last = v.rsplit(|&b| b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

#[cfg(test)]
mod tests {
    use super::*;

    const V_OK: Verdict = Verdict::Ok;
    const V_BOTH: Verdict = Verdict::ContentLengthAndTransferEncoding;

    fn tracker() -> Tracker {
        Tracker::new(64 * 1024, 100)
    }

    fn drain(t: &mut Tracker) -> Vec<Verdict> {
        t.verdicts.drain(..).collect()
    }

    /// Feeds `parts` as separate reads and returns the verdicts queued.
    fn run(parts: &[&[u8]]) -> (Tracker, Vec<Verdict>) {
        let mut t = tracker();
        for p in parts {
            t.feed(p);
        }
        let v = drain(&mut t);
        (t, v)
    }

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n";
    const POST_CL: &[u8] = b"POST /b HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello";
    const POST_CHUNKED: &[u8] =
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
        5;name=value;x=\"q\"\r\nhello\r\n\
        A \t; ext\r\n0123456789\r\n\
        0;last\r\nx-trailer: 1\r\nother: GET / HTTP/1.1\r\n\r\n";
    const CL_TE: &[u8] = b"POST /d HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    const TE_CL: &[u8] = b"POST /d HTTP/1.1\r\nhost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";

    fn pipelined() -> Vec<u8> {
        [GET, POST_CL, POST_CHUNKED, GET].concat()
    }

    #[test]
    fn one_request_split_at_every_byte_position() {
        for req in [GET, POST_CL, POST_CHUNKED, CL_TE] {
            let expected = if req == CL_TE { V_BOTH } else { V_OK };
            // Followed by a GET, so a wrong end of body shows as a missing or extra verdict.
            let all = [req, GET].concat();
            for at in 0..=req.len() {
                let (t, v) = run(&[&all[..at], &all[at..]]);
                assert_eq!(
                    v,
                    [expected, V_OK],
                    "split at {at} of {:?}",
                    String::from_utf8_lossy(req)
                );
                assert_eq!(t.state, State::Head, "split at {at}");
                assert!(t.partial.is_empty());
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let all = pipelined();
        let parts: Vec<&[u8]> = all.chunks(1).collect();
        let (t, v) = run(&parts);
        assert_eq!(v, [V_OK; 4]);
        assert_eq!(t.state, State::Head);
    }

    #[test]
    fn pipelined_requests_give_one_verdict_each_in_order() {
        let all = pipelined();
        let (t, v) = run(&[&all]);
        assert_eq!(v, [V_OK; 4]);
        assert_eq!(t.state, State::Head);

        let all = [GET, CL_TE, GET, TE_CL].concat();
        let (_, v) = run(&[&all]);
        assert_eq!(v, [V_OK, V_BOTH, V_OK, V_BOTH]);
    }

    #[test]
    fn content_length_and_transfer_encoding_in_either_order_are_flagged() {
        assert_eq!(run(&[CL_TE]).1, [V_BOTH]);
        assert_eq!(run(&[TE_CL]).1, [V_BOTH]);
        // Even when the Content-Length value is nonsense hyper skips it after TE.
        let odd =
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: x\r\n\r\n0\r\n\r\n";
        assert_eq!(run(&[odd]).1, [V_BOTH]);
    }

    #[test]
    fn body_bytes_are_not_taken_for_heads() {
        // The body looks like a CL+TE request; it must be skipped, not parsed.
        let body = CL_TE;
        let mut req =
            format!("POST / HTTP/1.1\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        req.extend_from_slice(body);
        req.extend_from_slice(GET);
        assert_eq!(run(&[&req]).1, [V_OK, V_OK]);
    }

    #[test]
    fn h2_preface_stops_tracking() {
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(CL_TE);
        for at in 0..=H2_PREFACE.len() {
            let (t, v) = run(&[&h2[..at], &h2[at..]]);
            assert!(v.is_empty(), "split at {at}");
            assert_eq!(t.state, State::Stopped);
        }
        // Frames after the preface are never looked at, even one that starts like it.
        let mut t = tracker();
        t.feed(H2_PREFACE);
        t.feed(b"P");
        t.feed(GET);
        assert!(t.verdicts.is_empty() && t.partial.is_empty());
        // Only at the start of a connection.
        let late = [GET, H2_PREFACE].concat();
        let (t, v) = run(&[&late]);
        assert_eq!(v, [V_OK]);
        assert_eq!(t.state, State::Stopped, "the preface is garbage as HTTP/1");
    }

    #[test]
    fn garbage_stops_tracking() {
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls hello\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;a\nhello\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            let all = [bad, CL_TE].concat();
            let (t, v) = run(&[&all]);
            assert!(
                v.len() <= 1 && !v.contains(&V_BOTH),
                "{:?}: {v:?}",
                String::from_utf8_lossy(bad)
            );
            assert_eq!(
                t.state,
                State::Stopped,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oversized_heads_stop_tracking() {
        let mut t = Tracker::new(8192, 100);
        let big = format!("GET / HTTP/1.1\r\nx: {}", "v".repeat(9000));
        t.feed(big.as_bytes());
        assert_eq!(t.state, State::Stopped);
        let mut t = Tracker::new(8192, 100);
        for c in big.as_bytes().chunks(1000) {
            t.feed(c);
        }
        assert_eq!(t.state, State::Stopped);
        assert_eq!(t.partial.capacity(), 0);
    }

    #[test]
    fn many_headers_within_the_configured_limit_are_followed() {
        let mut req = b"POST / HTTP/1.1\r\n".to_vec();
        for i in 0..150 {
            req.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(b"content-length: 1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n");
        let mut t = Tracker::new(64 * 1024, 200);
        t.feed(&req);
        assert_eq!(drain(&mut t), [V_BOTH]);
        assert_eq!(t.state, State::Head);
    }

    #[test]
    fn leading_empty_lines_and_bare_lf_are_accepted_like_httparse() {
        let req = b"\r\n\r\nGET / HTTP/1.1\nhost: a\n\nGET / HTTP/1.1\r\n\r\n";
        for at in 0..=req.len() {
            assert_eq!(
                run(&[&req[..at], &req[at..]]).1,
                [V_OK, V_OK],
                "split at {at}"
            );
        }
    }

    #[test]
    fn upgrade_pauses_until_the_answer_is_known() {
        let up =
            b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
        let all = [&up[..], CL_TE].concat();
        // Not switched: the next pop replays the stash.
        let mut t = tracker();
        t.feed(&all[..up.len() + 10]);
        t.feed(&all[up.len() + 10..]);
        assert_eq!(t.state, State::Paused);
        assert_eq!(t.next_verdict(), V_OK);
        assert_eq!(t.next_verdict(), V_BOTH);
        assert_eq!(t.state, State::Head);
        // Switched: tunnel bytes are never parsed.
        let mut t = tracker();
        t.feed(&all);
        assert_eq!(t.next_verdict(), V_OK);
        t.stop();
        t.feed(CL_TE);
        assert_eq!(t.next_verdict(), V_OK);
        assert!(t.verdicts.is_empty());
        // A stash over its bound gives up.
        let mut t = Tracker::new(8192, 100);
        t.feed(up);
        t.feed(&vec![0u8; 8192 + STASH_SLACK + 1]);
        assert_eq!(t.state, State::Stopped);
    }

    #[test]
    fn connect_pauses_and_upgrade_on_http10_does_not() {
        let connect = b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n";
        let (t, _) = run(&[connect]);
        assert_eq!(t.state, State::Paused);
        let old = b"GET / HTTP/1.0\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";
        let (t, _) = run(&[old]);
        assert_eq!(t.state, State::Head);
    }

    #[test]
    fn a_head_limit_of_usize_max_does_not_wrap() {
        // `max_head + 1` once wrapped to 0 here: nothing of the second read was taken and
        // the loop never ended.
        let mut t = Tracker::new(usize::MAX, 100);
        t.feed(b"GET / HTTP/1.1\r\nhost: a\r\n");
        t.feed(b"x: 1\r\n\r\n");
        assert_eq!(drain(&mut t), [V_OK]);
        assert_eq!(t.state, State::Head);
        // A paused stash under the same limit.
        let up = b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
        t.feed(up);
        t.feed(GET);
        assert_eq!(t.next_verdict(), V_OK);
        assert_eq!(t.next_verdict(), V_OK);
    }

    #[test]
    fn a_header_count_limit_never_sizes_an_allocation() {
        // `vec![..; max_headers]` once asked for usize::MAX headers here.
        for max in [usize::MAX, 4_294_967_295, 101] {
            let mut req = b"POST / HTTP/1.1\r\n".to_vec();
            for i in 0..150 {
                req.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
            }
            req.extend_from_slice(
                b"content-length: 1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            );
            let mut t = Tracker::new(64 * 1024, max);
            t.feed(&req);
            if max > 152 {
                assert_eq!(drain(&mut t), [V_BOTH], "max {max}");
                assert_eq!(t.state, State::Head);
            } else {
                // Over the limit: hyper refuses the head, the guard stops.
                assert!(drain(&mut t).is_empty());
                assert_eq!(t.state, State::Stopped);
            }
        }
    }

    #[tokio::test]
    async fn after_the_h2_preface_a_control_frame_flood_fails_the_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        for (flood, fails) in [(1000, false), (1001, true)] {
            let (client, server) = tokio::io::duplex(1 << 20);
            let (mut guard, _) = wrap(server, 64 * 1024, 100);
            let mut bytes = H2_PREFACE.to_vec();
            // SETTINGS, then the PINGs, the preface split from them mid-read.
            bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            bytes.extend(ping.repeat(flood - 1));
            let mut client = client;
            client.write_all(&bytes[..10]).await.unwrap();
            let mut got = vec![0u8; 10];
            guard.read_exact(&mut got).await.unwrap();
            client.write_all(&bytes[10..]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let r = guard.read_to_end(&mut rest).await;
            assert_eq!(r.is_err(), fails, "{flood} PINGs and a SETTINGS: {r:?}");
        }
    }

    #[tokio::test]
    async fn the_wrapper_passes_bytes_through_and_queues_verdicts() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64);
        let (mut guard, verdicts) = wrap(server, 64 * 1024, 100);
        let all = [GET, CL_TE].concat();
        let expect = all.clone();
        let writer = tokio::spawn(async move {
            let mut client = client;
            client.write_all(&all).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        guard.read_to_end(&mut got).await.unwrap();
        let _client = writer.await.unwrap();
        assert_eq!(got, expect);
        assert_eq!(verdicts.next(), V_OK);
        assert_eq!(verdicts.next(), V_BOTH);
        assert_eq!(verdicts.next(), V_OK, "none left: Ok");
    }
}
