//! The response head and body framing, written as hyper's server writes them (hyper 1.x
//! `proto/h1/role.rs`, `Server::encode`), so clients see the same bytes from either server:
//! lower-case names as the map holds them, a cached `date`, `content-length` from the
//! body's exact size or `transfer-encoding: chunked` when it is unknown (close-delimited
//! for HTTP/1.0), no body for HEAD, 1xx, 204, 304 and a 2xx to CONNECT, and `connection:
//! close` (or `keep-alive` for an HTTP/1.0 client) as the connection's fate requires.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRAILER, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, Method, StatusCode, Version};

use super::head::{digits, has_token, is_chunked};

/// How the body is framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Encoder {
    /// This many bytes still to write.
    Length(u64),
    /// Chunked, with the trailer names the head declared (`Trailer`).
    Chunked(Option<Vec<HeaderName>>),
    /// Until the connection closes (HTTP/1.0 without a known length).
    Close,
}

/// What writing a body chunk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EncodeError {
    #[error("response body longer than its content-length")]
    TooLong,
    #[error("response body shorter than its content-length")]
    TooShort,
    #[error("response head has an invalid content-length")]
    BadLength,
}

/// Fields a response body brings for its head besides the response's header map: rampart's
/// rate-limit fields, written straight into the head (five inserts into the map and five
/// values made for it cost more than the rate-limit decision they report).
pub(crate) trait HeadFields {
    /// Whether there is anything to write.
    fn has_head_fields(&self) -> bool {
        false
    }
    /// Whether the response's own field `name` is left out: one of these replaces it.
    fn replaces(&self, _name: &HeaderName) -> bool {
        false
    }
    /// Writes the fields as head lines (`name: value` CRLF).
    fn write_head_fields(&self, _dst: &mut Vec<u8>) {}
}

/// What the server asks of a response body right after it gave a frame: whether it has
/// nothing more ready and every waker it needs is registered for the task that polled it,
/// so that asking again now would only walk its layers to a Pending. A server that knows
/// writes at once and asks the body again only when the task is woken (an event stream's
/// second pass through every layer per event, a fifth of its instructions). Answering
/// true when a waker is missing stalls the body: every layer answers false unless it is
/// sure, and false is always safe.
pub(crate) trait Waits {
    fn waits(&self) -> bool {
        false
    }
}

/// The request facts the head depends on, and what the answer brings besides its map.
#[derive(Clone, Copy)]
pub(crate) struct For<'a> {
    /// A reason phrase the answer brought (`hyper::ext::ReasonPhrase`, kept from the
    /// upstream's status line), written instead of the canonical one.
    pub(crate) reason: Option<&'a [u8]>,
    pub(crate) method: &'a Method,
    pub(crate) version: Version,
    /// The connection is to stay open after this exchange (so far as the request goes).
    pub(crate) keep_alive: bool,
    /// The answer's body's own head fields (`HeadFields`), when it has any.
    pub(crate) extra: Option<&'a dyn HeadFields>,
}

impl std::fmt::Debug for For<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("For")
            .field("method", self.method)
            .field("version", &self.version)
            .field("keep_alive", &self.keep_alive)
            .field("extra", &self.extra.is_some())
            .finish_non_exhaustive()
    }
}

/// The head written, and what it decided.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) encoder: Encoder,
    /// The response carries no body at all (HEAD, 1xx, 204, 304, a 2xx to CONNECT).
    pub(crate) bodiless: bool,
    /// The connection must close after this response.
    pub(crate) last: bool,
}

/// The body's length as the response's body tells it (hyper's `BodyLength`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLen {
    /// The body is already at its end.
    Empty,
    Known(u64),
    Unknown,
}

fn can_chunked(method: &Method, status: StatusCode) -> bool {
    !(method == Method::HEAD
        || (method == Method::CONNECT && status.is_success())
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

fn can_have_content_length(method: &Method, status: StatusCode) -> bool {
    !(status.is_informational()
        || (method == Method::CONNECT && status.is_success())
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Writes the head of a response with `status` and `headers` to `dst`.
pub(crate) fn head(
    dst: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    body: BodyLen,
    req: For<'_>,
) -> Result<Written, EncodeError> {
    let method = req.method;
    let http10 = req.version == Version::HTTP_10;
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS
        || (method == Method::CONNECT && status.is_success());
    // hyper answers a 1xx the service returned with a bare 500 and closes; rampart's
    // pipeline never returns one.
    if status.is_informational() && !upgrade {
        let closing = For {
            reason: None,
            keep_alive: false,
            extra: None,
            ..req
        };
        return head(
            dst,
            StatusCode::INTERNAL_SERVER_ERROR,
            &HeaderMap::new(),
            BodyLen::Empty,
            closing,
        )
        .map(|w| Written { last: true, ..w });
    }
    let mut last = !req.keep_alive || upgrade;
    let response_keep_alive = headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"keep-alive"));
    if headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"close"))
    {
        last = true;
    }
    // An HTTP/1.0 client gets keep-alive only when the response says it, or rampart adds it.
    let add_keep_alive = http10 && !last && !response_keep_alive;
    let add_close = !http10 && last && !upgrade && !connection_says_close(headers);

    dst.reserve(64 + headers.len() * 32);
    if !http10 && status == StatusCode::OK && req.reason.is_none() {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        match req.reason {
            Some(reason) => dst.extend_from_slice(reason),
            None => dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        dst.extend_from_slice(b"\r\n");
    }

    let mut encoder: Option<Encoder> = if upgrade {
        Some(Encoder::Length(0))
    } else {
        None
    };
    let mut wrote_date = false;
    let mut trailer_names: Option<Vec<HeaderName>> = None;
    let mut te_value: Option<Vec<u8>> = None;
    let mut connection: Option<Vec<u8>> = None;
    for (name, value) in headers {
        match *name {
            CONTENT_LENGTH => {
                if upgrade || te_value.is_some() {
                    continue;
                }
                match body {
                    BodyLen::Known(n) => {
                        if encoder.is_none() {
                            encoder = Some(Encoder::Length(n));
                            line(dst, b"content-length", value.as_bytes());
                        }
                    }
                    BodyLen::Unknown => {
                        let n = digits(value.as_bytes()).ok_or(EncodeError::BadLength)?;
                        match &encoder {
                            Some(Encoder::Length(prev)) if *prev != n => {
                                return Err(EncodeError::BadLength);
                            }
                            Some(_) => {}
                            None => {
                                encoder = Some(Encoder::Length(n));
                                line(dst, b"content-length", value.as_bytes());
                            }
                        }
                    }
                    BodyLen::Empty => {
                        // A HEAD response keeps the length the GET would have had.
                        if method == Method::HEAD && encoder.is_none() {
                            encoder = Some(Encoder::Length(0));
                            line(dst, b"content-length", value.as_bytes());
                        }
                    }
                }
            }
            TRANSFER_ENCODING => {
                if upgrade || http10 || !can_chunked(method, status) {
                    continue;
                }
                if matches!(encoder, Some(Encoder::Length(_))) && te_value.is_none() {
                    continue;
                }
                let te = te_value.get_or_insert_with(Vec::new);
                if !te.is_empty() {
                    te.extend_from_slice(b", ");
                }
                te.extend_from_slice(value.as_bytes());
                encoder = Some(Encoder::Chunked(None));
            }
            CONNECTION => {
                let c = connection.get_or_insert_with(Vec::new);
                if !c.is_empty() {
                    c.extend_from_slice(b", ");
                }
                c.extend_from_slice(value.as_bytes());
            }
            TRAILER => {
                if http10 || !can_chunked(method, status) {
                    continue;
                }
                line(dst, b"trailer", value.as_bytes());
                if let Ok(s) = value.to_str() {
                    trailer_names.get_or_insert_with(Vec::new).extend(
                        s.split(',')
                            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
                    );
                }
            }
            _ => {
                if *name == DATE {
                    wrote_date = true;
                } else if req.extra.is_some_and(|e| e.replaces(name)) {
                    continue;
                }
                line(dst, name.as_str().as_bytes(), value.as_bytes());
            }
        }
    }
    if let Some(extra) = req.extra {
        extra.write_head_fields(dst);
    }
    if let Some(mut te) = te_value {
        if !is_chunked(&te) {
            te.extend_from_slice(b", chunked");
        }
        line(dst, b"transfer-encoding", &te);
    }
    match (connection, add_close, add_keep_alive) {
        (Some(mut c), true, _) => {
            c.extend_from_slice(b", close");
            line(dst, b"connection", &c);
        }
        (Some(mut c), _, true) => {
            c.extend_from_slice(b", keep-alive");
            line(dst, b"connection", &c);
        }
        (Some(c), _, _) => line(dst, b"connection", &c),
        (None, true, _) => line(dst, b"connection", b"close"),
        (None, _, true) => line(dst, b"connection", b"keep-alive"),
        (None, false, false) => {}
    }
    let encoder = match encoder {
        Some(Encoder::Chunked(_)) => Encoder::Chunked(trailer_names),
        Some(e) => e,
        None => match body {
            BodyLen::Unknown => {
                if http10 || !can_chunked(method, status) {
                    Encoder::Close
                } else {
                    dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    Encoder::Chunked(trailer_names)
                }
            }
            BodyLen::Empty | BodyLen::Known(0) => {
                if can_have_content_length(method, status) && method != Method::HEAD {
                    dst.extend_from_slice(b"content-length: 0\r\n");
                }
                Encoder::Length(0)
            }
            BodyLen::Known(n) => {
                if can_have_content_length(method, status) {
                    line(
                        dst,
                        b"content-length",
                        crate::text::digits::<10>(n, &mut [0u8; 20]),
                    );
                    Encoder::Length(n)
                } else {
                    Encoder::Length(0)
                }
            }
        },
    };
    if !wrote_date {
        dst.extend_from_slice(b"date: ");
        with_date(|d| dst.extend_from_slice(d));
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    let bodiless = !can_chunked(method, status);
    let encoder = if bodiless {
        Encoder::Length(0)
    } else {
        encoder
    };
    if encoder == Encoder::Close {
        last = true;
    }
    Ok(Written {
        encoder,
        bodiless,
        last,
    })
}

fn connection_says_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"close"))
}

fn line(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

impl Encoder {
    /// Frames `data` into `dst` (a chunk's size line and CRLF around it when chunked).
    /// `copy`: the data itself goes into `dst` too; otherwise the caller writes it between
    /// what this writes and [`Encoder::after`].
    pub(crate) fn data(
        &mut self,
        dst: &mut Vec<u8>,
        data: &Bytes,
        copy: bool,
    ) -> Result<(), EncodeError> {
        let n = data.len() as u64;
        match self {
            Encoder::Length(rest) => {
                *rest = rest.checked_sub(n).ok_or(EncodeError::TooLong)?;
            }
            Encoder::Chunked(_) => {
                let mut hex = [0u8; 16];
                let digits = hex_digits(n, &mut hex);
                dst.extend_from_slice(digits);
                dst.extend_from_slice(b"\r\n");
            }
            Encoder::Close => {}
        }
        if copy {
            dst.extend_from_slice(data);
            self.after(dst);
        }
        Ok(())
    }

    /// What follows a chunk's data.
    pub(crate) fn after(&self, dst: &mut Vec<u8>) {
        if let Encoder::Chunked(_) = self {
            dst.extend_from_slice(b"\r\n");
        }
    }

    /// Ends the body: the last chunk and the declared trailers, or a check that the length
    /// was met.
    pub(crate) fn finish(
        &self,
        dst: &mut Vec<u8>,
        trailers: Option<&HeaderMap>,
    ) -> Result<(), EncodeError> {
        match self {
            Encoder::Length(0) | Encoder::Close => Ok(()),
            Encoder::Length(_) => Err(EncodeError::TooShort),
            Encoder::Chunked(allowed) => {
                dst.extend_from_slice(b"0\r\n");
                if let (Some(allowed), Some(trailers)) = (allowed, trailers) {
                    for (name, value) in trailers {
                        if allowed.contains(name) && trailer_allowed(name) {
                            line(dst, name.as_str().as_bytes(), value.as_bytes());
                        }
                    }
                }
                dst.extend_from_slice(b"\r\n");
                Ok(())
            }
        }
    }
}

/// hyper's `is_valid_trailer_field`: fields that frame, route or authenticate a message
/// never come as trailers.
fn trailer_allowed(name: &HeaderName) -> bool {
    use http::header::{
        AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_RANGE, CONTENT_TYPE, HOST,
        MAX_FORWARDS, SET_COOKIE, TE,
    };
    ![
        AUTHORIZATION,
        CACHE_CONTROL,
        CONTENT_ENCODING,
        CONTENT_LENGTH,
        CONTENT_RANGE,
        CONTENT_TYPE,
        HOST,
        MAX_FORWARDS,
        SET_COOKIE,
        TRAILER,
        TRANSFER_ENCODING,
        TE,
    ]
    .contains(name)
}

/// `n` in upper-case hex (hyper's chunk size lines).
fn hex_digits(mut n: u64, out: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = DIGITS[(n & 15) as usize];
        n >>= 4;
        if n == 0 || i == 0 {
            break;
        }
    }
    &out[i..]
}

thread_local! {
    /// The `date` value, formatted once a second per thread (as hyper caches it).
    static CACHED_DATE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

fn with_date(f: impl FnOnce(&[u8])) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHED_DATE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            c.1.clear();
            c.1.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            c.0 = secs;
        }
        f(&c.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn text(dst: &[u8]) -> String {
        let s = String::from_utf8_lossy(dst).into_owned();
        // The date changes: keep only that it is there.
        s.lines()
            .map(|l| {
                if l.starts_with("date: ") {
                    "date: *"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn get11() -> For<'static> {
        For {
            reason: None,
            method: &Method::GET,
            version: Version::HTTP_11,
            keep_alive: true,
            extra: None,
        }
    }

    /// Two fields of the body's own, the first replacing the response's field of its name.
    struct Extra;

    impl HeadFields for Extra {
        fn has_head_fields(&self) -> bool {
            true
        }
        fn replaces(&self, name: &HeaderName) -> bool {
            name == "x-limit"
        }
        fn write_head_fields(&self, dst: &mut Vec<u8>) {
            dst.extend_from_slice(b"x-limit: 7\r\nx-more: 8\r\n");
        }
    }

    #[test]
    fn a_bodys_own_fields_follow_the_maps_and_replace_theirs() {
        let mut h = HeaderMap::new();
        h.insert("x-limit", HeaderValue::from_static("upstream's"));
        h.insert("x-a", HeaderValue::from_static("1"));
        let mut dst = Vec::new();
        let req = For {
            extra: Some(&Extra),
            ..get11()
        };
        head(&mut dst, StatusCode::OK, &h, BodyLen::Known(5), req).unwrap();
        assert_eq!(
            text(&dst),
            "HTTP/1.1 200 OK\nx-a: 1\nx-limit: 7\nx-more: 8\ncontent-length: 5\ndate: *\n"
        );
        // A 1xx the pipeline never returns becomes a bare 500: without them.
        let mut dst = Vec::new();
        head(&mut dst, StatusCode::CONTINUE, &h, BodyLen::Empty, req).unwrap();
        assert!(!text(&dst).contains("x-more"), "{}", text(&dst));
    }

    #[test]
    fn heads_are_written_as_hyper_writes_them() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        let mut dst = Vec::new();
        let w = head(&mut dst, StatusCode::OK, &h, BodyLen::Known(5), get11()).unwrap();
        assert_eq!(
            text(&dst),
            "HTTP/1.1 200 OK\nx-a: 1\ncontent-length: 5\ndate: *\n"
        );
        assert_eq!(w.encoder, Encoder::Length(5));
        assert!(!w.last);

        let mut dst = Vec::new();
        let w = head(
            &mut dst,
            StatusCode::NOT_FOUND,
            &h,
            BodyLen::Unknown,
            get11(),
        )
        .unwrap();
        assert_eq!(
            text(&dst),
            "HTTP/1.1 404 Not Found\nx-a: 1\ntransfer-encoding: chunked\ndate: *\n"
        );
        assert_eq!(w.encoder, Encoder::Chunked(None));

        let req10 = For {
            reason: None,
            method: &Method::GET,
            version: Version::HTTP_10,
            keep_alive: false,
            extra: None,
        };
        let mut dst = Vec::new();
        let w = head(&mut dst, StatusCode::OK, &h, BodyLen::Unknown, req10).unwrap();
        assert_eq!(text(&dst), "HTTP/1.0 200 OK\nx-a: 1\ndate: *\n");
        assert_eq!(w.encoder, Encoder::Close);
        assert!(w.last);

        let mut dst = Vec::new();
        let closing = For {
            keep_alive: false,
            ..get11()
        };
        head(
            &mut dst,
            StatusCode::NO_CONTENT,
            &h,
            BodyLen::Empty,
            closing,
        )
        .unwrap();
        assert_eq!(
            text(&dst),
            "HTTP/1.1 204 No Content\nx-a: 1\nconnection: close\ndate: *\n"
        );
    }

    #[test]
    fn chunks_are_framed_in_upper_case_hex() {
        let mut e = Encoder::Chunked(None);
        let mut dst = Vec::new();
        e.data(&mut dst, &Bytes::from(vec![b'x'; 26]), true)
            .unwrap();
        e.finish(&mut dst, None).unwrap();
        assert_eq!(
            dst,
            format!("1A\r\n{}\r\n0\r\n\r\n", "x".repeat(26)).into_bytes()
        );
        let mut e = Encoder::Length(2);
        assert_eq!(
            e.data(&mut Vec::new(), &Bytes::from_static(b"abc"), true),
            Err(EncodeError::TooLong)
        );
        assert_eq!(
            Encoder::Length(1).finish(&mut Vec::new(), None),
            Err(EncodeError::TooShort)
        );
    }
}
