//! One HTTP/1 request head parsed the way hyper parses it, reduced to what framing needs:
//! its length, its body's framing, whether it may switch protocols, and the verdict.

use std::mem::MaybeUninit;

use super::Verdict;
// The same readings of Content-Length and Transfer-Encoding as rampart's own server.
use crate::h1::{digits, is_chunked};

/// hyper's default header count; enough for nearly every request without a heap buffer.
const STACK_HEADERS: usize = 100;

/// The framing facts of one parsed head.
#[derive(Debug, Clone, Copy)]
pub(super) struct Head {
    pub(super) len: usize,
    pub(super) verdict: Verdict,
    pub(super) body: Body,
    pub(super) upgrade: bool,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Body {
    None,
    Length(u64),
    Chunked,
    /// Framing hyper refuses (bad Content-Length, non-chunked Transfer-Encoding, ...).
    Invalid,
}

/// Parses a head at the start of `buf` the way hyper does. `Ok(None)`: incomplete;
/// `Err`: hyper would refuse it too.
pub(super) fn inspect(buf: &[u8], max_headers: usize) -> Result<Option<Head>, ()> {
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
