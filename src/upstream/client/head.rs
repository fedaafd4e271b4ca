//! The response head: status, header fields, and the body framing they set, read as
//! strictly as RFC 9112 asks.

use std::mem::MaybeUninit;

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};

use super::WireError;
use super::reader::{Chunk, Incoming, Reader};

/// Largest response head accepted (Envoy's default limit is 60 KiB).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one response head (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;

/// What a complete head turned out to be.
pub(crate) enum Head {
    Partial,
    /// A 1xx answer (already consumed): the final one follows.
    Informational,
    Final(Response<()>),
}

impl Reader {
    /// Parses the buffered input as a response head to a request (a HEAD request when
    /// `head_request`); on a final head, the body's framing is set.
    pub(crate) fn parse_head(&mut self, head_request: bool) -> Result<Head, WireError> {
        // Where each name and value lies in the head, so that values can be slices of it
        // once the head is split off the buffer.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let (len, code, http10, count) = {
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let input = &self.read[..self.read.len()];
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
                if self.read.len() >= MAX_HEAD {
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
        // Room for what rampart adds to the response, the X-Request-Id echoed to the client,
        // with no rehash when it is. Not for a rate-limited route's five RateLimit fields:
        // rampart's HTTP/1.1 server writes those into the head without the map, and a map of
        // a typical answer with room for them outgrows glibc's per-thread cache (1 KiB), a
        // slower allocation on every response.
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
}

/// A decimal Content-Length, or a list of equal ones ("42, 42").
pub(super) fn parse_length(value: &[u8]) -> Option<u64> {
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

#[cfg(test)]
mod tests {
    use super::super::encode::push_number;
    use super::super::testing::*;
    use super::super::{ExchangeError, WireError, parse_chunk_size};
    use super::*;
    use http::Method;

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
        push_number::<10>(&mut w, b"n: ", 1_234_567);
        push_number::<16>(&mut w, b"", 255);
        push_number::<16>(&mut w, b"", 0);
        assert_eq!(w, b"n: 1234567\r\nff\r\n0\r\n");
    }
}
