//! One request head, parsed as hyper's server parses it (hyper 1.x `proto/h1/role.rs`), so
//! that either server refuses and frames the same bytes the same way: httparse for the
//! syntax, then RFC 9112 §6 for the body's framing.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};

/// hyper's default header count: enough for nearly every request without a heap buffer.
const STACK_HEADERS: usize = 100;
/// The request line of the HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";
/// hyper's `MAX_URI_LEN`: a longer request target is answered 414.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;

/// How the request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Content-Length` bytes; 0 when the request has no body.
    Length(u64),
    Chunked,
}

/// A parsed request head and what the connection needs to know of it.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) parts: http::request::Parts,
    pub(crate) framing: Framing,
    /// The client allows another request after this one (HTTP/1.1 without `close`, or
    /// HTTP/1.0 with `keep-alive`).
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue` on HTTP/1.1.
    pub(crate) expect_continue: bool,
    /// CONNECT, or `Upgrade` on HTTP/1.1: the answer may switch protocols.
    pub(crate) wants_upgrade: bool,
    /// Both `Content-Length` and `Transfer-Encoding`: framed as chunked, answered 400 by the
    /// pipeline (the guard's verdict on hyper's path), and the connection closes after.
    pub(crate) cl_and_te: bool,
}

/// A head that cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeadError {
    #[error("request head larger than max_header_bytes or max_headers")]
    TooLarge,
    #[error("request target longer than 65534 bytes")]
    UriTooLong,
    #[error("malformed request head")]
    Malformed,
    #[error("HTTP/2 connection preface on an HTTP/1 connection")]
    H2Preface,
}

impl HeadError {
    /// The answer hyper gives (`Server::on_error`); None: close without one.
    pub(crate) fn status(self) -> Option<StatusCode> {
        match self {
            HeadError::TooLarge => Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            HeadError::UriTooLong => Some(StatusCode::URI_TOO_LONG),
            HeadError::Malformed => Some(StatusCode::BAD_REQUEST),
            HeadError::H2Preface => None,
        }
    }
}

/// Where one header's name and value lie in the head. u32: a head is at most
/// `max_header_bytes` (1 MiB), and 100 of these are zeroed on the stack for every head
/// (16 bytes each keeps that 1.6 KiB, under glibc's `rep stosb` threshold).
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

impl Span {
    fn name(self) -> std::ops::Range<usize> {
        self.name.0 as usize..self.name.1 as usize
    }

    fn value(self) -> std::ops::Range<usize> {
        self.value.0 as usize..self.value.1 as usize
    }
}

/// The syntax of a head: its length, the method, the target's span, the version and the
/// headers' spans.
struct Syntax {
    len: usize,
    method: Method,
    target: (usize, usize),
    http11: bool,
}

/// Parses the head at the start of `buf`. `Ok(None)`: not complete yet (and within the
/// limits); `Ok(Some)`: the head's bytes are taken from `buf`, whose rest is the body or the
/// next request. Header values and the target are slices of the head, not copies.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    max_head: usize,
    max_headers: usize,
) -> Result<Option<Parsed>, HeadError> {
    let mut spans_stack = [Span::default(); STACK_HEADERS];
    let mut spans_heap = Vec::new();
    let on_stack = max_headers.clamp(1, STACK_HEADERS);
    // Only the first `max_head` bytes can hold a head that is served: what lies past them
    // never changes the answer (so it does not depend on how much more has arrived).
    let view = &buf[..buf.len().min(max_head)];
    let found = match syntax(view, &mut spans_stack[..on_stack]) {
        Err(HeadError::TooLarge) if max_headers > STACK_HEADERS && !view.is_empty() => {
            // Rare: more headers than hyper's default, maybe within the configured limit.
            // Sized by the bytes at hand (a header ends a line), never by the configuration.
            let lines = view.iter().filter(|&&b| b == b'\n').count();
            spans_heap.resize(max_headers.min(lines.saturating_add(1)), Span::default());
            syntax(view, &mut spans_heap)
        }
        r => r,
    };
    let (syn, count) = match found? {
        Some(found) => found,
        None if buf.len() >= max_head => return Err(HeadError::TooLarge),
        None => return Ok(None),
    };
    if syn.len > max_head {
        return Err(HeadError::TooLarge);
    }
    let spans = if spans_heap.is_empty() {
        &spans_stack[..count]
    } else {
        &spans_heap[..count]
    };
    let head: Bytes = buf.split_to(syn.len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(syn.target.0..syn.target.1))
        .map_err(|_| HeadError::Malformed)?;
    build(&head, syn, uri, spans).map(Some)
}

/// httparse over `buf`, recording where each header lies. Ok(None): partial.
fn syntax(buf: &[u8], spans: &mut [Span]) -> Result<Option<(Syntax, usize)>, HeadError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if spans.len() <= STACK_HEADERS {
        &mut slots[..spans.len()]
    } else {
        heap.resize_with(spans.len(), MaybeUninit::uninit);
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        // The version fails at the preface's `2`: wait for the whole preface line, so
        // that however the bytes are split the answer is the same.
        Err(httparse::Error::Version) if buf.starts_with(H2_PREFACE_LINE) => {
            return Err(HeadError::H2Preface);
        }
        Err(httparse::Error::Version) if H2_PREFACE_LINE.starts_with(buf) => return Ok(None),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed);
    };
    if path.len() > MAX_URI_LEN {
        return Err(HeadError::UriTooLong);
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Malformed)?;
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = (s.as_ptr() as usize).saturating_sub(base);
        (start, start + s.len())
    };
    // A head longer than u32 is refused before its spans are read (`max_head`).
    let at32 = |s: &[u8]| {
        let (start, end) = at(s);
        (
            u32::try_from(start).unwrap_or(u32::MAX),
            u32::try_from(end).unwrap_or(u32::MAX),
        )
    };
    for (span, h) in spans.iter_mut().zip(req.headers.iter()) {
        *span = Span {
            name: at32(h.name.as_bytes()),
            value: at32(h.value),
        };
    }
    Ok(Some((
        Syntax {
            len,
            method,
            target: at(path.as_bytes()),
            http11: version == 1,
        },
        req.headers.len(),
    )))
}

/// The request parts and the framing, from the recorded spans (hyper's `Server::parse`).
fn build(head: &Bytes, syn: Syntax, uri: Uri, spans: &[Span]) -> Result<Parsed, HeadError> {
    let http11 = syn.http11;
    let mut keep_alive = http11;
    let mut saw_close = false;
    let mut framing = Framing::Length(0);
    let mut content_length: Option<u64> = None;
    let mut is_cl = false;
    let mut is_te = false;
    let mut te_chunked = false;
    let mut expect_continue = false;
    let mut wants_upgrade = syn.method == Method::CONNECT;
    // One more than the client sent: the map is full at its capacity, and `insert` makes
    // room before it looks for the name, so replacing `Host` for the upstream (every
    // request) would otherwise reallocate and rehash it.
    let mut headers = HeaderMap::with_capacity(spans.len() + 1);
    for span in spans {
        let name = HeaderName::from_bytes(head.get(span.name()).unwrap_or_default())
            .map_err(|_| HeadError::Malformed)?;
        let value = HeaderValue::from_maybe_shared(head.slice(span.value()))
            .map_err(|_| HeadError::Malformed)?;
        match name {
            TRANSFER_ENCODING => {
                if !http11 {
                    return Err(HeadError::Malformed);
                }
                is_te = true;
                if is_cl && content_length.take().is_some() {
                    headers.remove(CONTENT_LENGTH);
                }
                te_chunked = is_chunked(value.as_bytes());
                if te_chunked {
                    framing = Framing::Chunked;
                }
            }
            CONTENT_LENGTH => {
                is_cl = true;
                if is_te {
                    continue;
                }
                let n = digits(value.as_bytes()).ok_or(HeadError::Malformed)?;
                if let Some(prev) = content_length {
                    if prev != n {
                        return Err(HeadError::Malformed);
                    }
                    continue;
                }
                // hyper's DecodedLength keeps the top two values for itself.
                if n >= u64::MAX - 1 {
                    return Err(HeadError::Malformed);
                }
                framing = Framing::Length(n);
                content_length = Some(n);
            }
            CONNECTION => {
                // Once a line asks to close, a later `keep-alive` does not undo it.
                if saw_close || has_token(value.as_bytes(), b"close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(value.as_bytes(), b"keep-alive");
                }
            }
            EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            UPGRADE => wants_upgrade = http11,
            _ => {}
        }
        headers.append(name, value);
    }
    if is_te && !te_chunked {
        return Err(HeadError::Malformed);
    }
    let cl_and_te = is_te && is_cl;
    if cl_and_te {
        keep_alive = false;
    }
    let mut parts = Request::new(()).into_parts().0;
    parts.method = syn.method;
    parts.uri = uri;
    parts.version = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    parts.headers = headers;
    Ok(Parsed {
        parts,
        framing,
        keep_alive,
        expect_continue: expect_continue && http11,
        wants_upgrade,
        cl_and_te,
    })
}

/// hyper's `content_length_parse`: plain decimal digits, no sign, no list.
pub(crate) fn digits(v: &[u8]) -> Option<u64> {
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
pub(crate) fn is_chunked(v: &[u8]) -> bool {
    if !v.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        return false;
    }
    let last = v.rsplit(|&b| b == b',').next().unwrap_or_default();
    last.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// A comma-separated list holds `token` (case-insensitive), as hyper's `connection_close`
/// and `connection_keep_alive` read `Connection`.
pub(crate) fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Parsed>, HeadError> {
        parse_head(&mut BytesMut::from(s), 64 * 1024, 100)
    }

    #[test]
    fn a_plain_get_is_parsed_with_its_headers_and_no_body() {
        let mut buf =
            BytesMut::from("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\nNEXT");
        let p = parse_head(&mut buf, 1024, 100).unwrap().unwrap();
        assert_eq!(&buf[..], b"NEXT", "the rest stays in the buffer");
        assert_eq!(p.parts.method, Method::GET);
        assert_eq!(p.parts.uri, "/a?b=1");
        assert_eq!(p.parts.version, Version::HTTP_11);
        assert_eq!(p.parts.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(p.framing, Framing::Length(0));
        assert!(p.keep_alive && !p.expect_continue && !p.wants_upgrade && !p.cl_and_te);
    }

    #[test]
    fn framing_follows_hyper() {
        let p = parse("POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, Framing::Length(5));
        assert_eq!(p.parts.headers.get_all(CONTENT_LENGTH).iter().count(), 1);
        for bad in [
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n",
        ] {
            assert_eq!(parse(bad).unwrap_err(), HeadError::Malformed, "{bad:?}");
        }
        let p = parse("POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, Framing::Chunked);
        assert!(p.cl_and_te && !p.keep_alive);
        assert!(p.parts.headers.get(CONTENT_LENGTH).is_none());
    }

    #[test]
    fn connection_expect_and_upgrade_are_read() {
        let p = parse("GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.keep_alive);
        let p = parse("GET / HTTP/1.1\r\nconnection: close\r\nconnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!p.keep_alive);
        let p = parse("PUT / HTTP/1.1\r\nexpect: 100-Continue\r\ncontent-length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.expect_continue);
        let p = parse("GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.wants_upgrade);
        let p = parse("GET / HTTP/1.0\r\nupgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!p.wants_upgrade);
        let p = parse("CONNECT a:443 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert!(p.wants_upgrade);
        assert_eq!(p.parts.uri.authority().map(|a| a.as_str()), Some("a:443"));
    }

    #[test]
    fn limits_answer_431_and_partial_heads_wait() {
        assert!(parse("GET / HTTP/1.1\r\nhost: a\r\n").unwrap().is_none());
        let mut big = BytesMut::from(format!("GET /{} HTTP/1.1\r\n", "a".repeat(2000)).as_str());
        assert_eq!(
            parse_head(&mut big, 1024, 100).unwrap_err(),
            HeadError::TooLarge
        );
        let many: String = (0..5).map(|i| format!("x-{i}: v\r\n")).collect();
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\n{many}\r\n").as_str());
        assert_eq!(
            parse_head(&mut buf, 1024, 4).unwrap_err(),
            HeadError::TooLarge
        );
        // Over the stack's 100 slots, within the configured limit.
        let many: String = (0..150).map(|i| format!("x-{i}: v\r\n")).collect();
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\n{many}\r\n").as_str());
        let p = parse_head(&mut buf, 64 * 1024, 200).unwrap().unwrap();
        assert_eq!(p.parts.headers.len(), 150);
        assert_eq!(
            parse("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap_err(),
            HeadError::H2Preface
        );
    }

    #[test]
    fn a_head_of_the_largest_allowed_size_keeps_every_value_in_place() {
        // `max_header_bytes` at its 1 MiB ceiling: the last value lies near the head's end,
        // past what 16-bit positions could hold (the spans are 32-bit).
        let max = 1024 * 1024;
        let big = "v".repeat(max - 200);
        let text = format!("GET / HTTP/1.1\r\nx-first: 1\r\nx-big: {big}\r\nx-last: end\r\n\r\n");
        assert!(text.len() < max && text.len() > usize::from(u16::MAX));
        let mut buf = BytesMut::from(text.as_str());
        let p = parse_head(&mut buf, max, 100).unwrap().unwrap();
        assert!(buf.is_empty());
        let h = &p.parts.headers;
        assert_eq!(h["x-first"], "1");
        assert_eq!(h["x-big"].as_bytes(), big.as_bytes());
        assert_eq!(h["x-last"], "end");
    }

    #[test]
    fn the_header_map_has_room_for_the_upstream_host_without_growing() {
        for n in [1, 2, 3, 5, 6, 11, 12] {
            let extra: String = (1..n).map(|i| format!("x-{i}: v\r\n")).collect();
            let p = parse(&format!("GET / HTTP/1.1\r\nHost: c\r\n{extra}\r\n"))
                .unwrap()
                .unwrap();
            let mut headers = p.parts.headers;
            assert_eq!(headers.len(), n);
            let room = headers.capacity();
            assert!(room > n, "{n} headers in a map of capacity {room}");
            headers.insert(http::header::HOST, HeaderValue::from_static("upstream"));
            assert_eq!(
                headers.capacity(),
                room,
                "{n} headers: replacing Host grew the map"
            );
        }
    }
}
