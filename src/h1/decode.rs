//! A request body's framing, walked over the connection's read buffer: `Content-Length`
//! bytes, or chunked coding exactly as hyper's decoder reads it (hyper 1.x
//! `proto/h1/decode.rs`): hex sizes with optional whitespace and extensions (at most 16 KiB
//! of them per body, no bare LF), CRLF after each chunk's data, trailers within the head
//! limits. Data is handed out as slices of the buffer, not copies.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::head::Framing;

/// hyper's `CHUNKED_EXTENSIONS_LIMIT`.
const EXTENSIONS_LIMIT: u64 = 16 * 1024;
/// hyper's `TRAILER_LIMIT`: what its server allows of trailers (it sets no head size).
const TRAILER_LIMIT: usize = 16 * 1024;

/// What the decoder found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// The buffer holds too little: read more.
    NeedMore,
}

/// The body's framing is broken: the connection cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("chunk size overflows")]
    Overflow,
    #[error("chunk extensions over 16 KiB, or with a bare LF")]
    Extensions,
    #[error("invalid CRLF after a chunk")]
    ChunkEnd,
    #[error("invalid or oversized trailers")]
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

#[derive(Debug)]
struct Chunked {
    state: State,
    size: u64,
    extensions: u64,
    trailers: Option<BytesMut>,
    trailer_count: usize,
}

#[derive(Debug)]
enum Kind {
    Length(u64),
    Chunked(Box<Chunked>),
    /// Trailers to hand out, then the end.
    Trailers(HeaderMap),
    Done,
}

#[derive(Debug)]
pub(crate) struct Decoder {
    kind: Kind,
    max_trailer_bytes: usize,
    max_trailers: usize,
}

impl Decoder {
    /// A decoder for `framing`; trailers are held to the head limits, as hyper does.
    pub(crate) fn new(framing: Framing, max_head: usize, max_headers: usize) -> Decoder {
        let kind = match framing {
            Framing::Length(0) => Kind::Done,
            Framing::Length(n) => Kind::Length(n),
            Framing::Chunked => Kind::Chunked(Box::new(Chunked {
                state: State::Start,
                size: 0,
                extensions: 0,
                trailers: None,
                trailer_count: 0,
            })),
        };
        Decoder {
            kind,
            max_trailer_bytes: max_head.min(TRAILER_LIMIT),
            max_trailers: max_headers,
        }
    }

    /// The decoder of a request without a body.
    pub(crate) fn done() -> Decoder {
        Decoder {
            kind: Kind::Done,
            max_trailer_bytes: 0,
            max_trailers: 0,
        }
    }

    /// The whole body has been read.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.kind, Kind::Done)
    }

    /// Bytes still to come of a `Content-Length` body.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.kind {
            Kind::Length(n) => Some(n),
            Kind::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of the body out of `buf` (what it consumes is taken from `buf`).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, DecodeError> {
        match &mut self.kind {
            Kind::Done => Ok(Decoded::End),
            Kind::Trailers(_) => {
                let Kind::Trailers(t) = std::mem::replace(&mut self.kind, Kind::Done) else {
                    return Ok(Decoded::End);
                };
                Ok(Decoded::Trailers(t))
            }
            Kind::Length(rest) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(*rest).unwrap_or(usize::MAX).min(buf.len());
                *rest -= n as u64;
                if *rest == 0 {
                    self.kind = Kind::Done;
                }
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            Kind::Chunked(c) => {
                let step = chunked(c, buf, self.max_trailer_bytes, self.max_trailers)?;
                if let Step::End(trailers) = step {
                    self.kind = match trailers {
                        Some(t) => Kind::Trailers(t),
                        None => Kind::Done,
                    };
                    return self.decode(buf);
                }
                Ok(match step {
                    Step::Data(d) => Decoded::Data(d),
                    _ => Decoded::NeedMore,
                })
            }
        }
    }
}

enum Step {
    Data(Bytes),
    End(Option<HeaderMap>),
    NeedMore,
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

/// Walks the chunked coding over `buf` until data, the end, or the buffer's end.
fn chunked(
    c: &mut Chunked,
    buf: &mut BytesMut,
    max_trailer_bytes: usize,
    max_trailers: usize,
) -> Result<Step, DecodeError> {
    loop {
        if c.state == State::Body {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let n = usize::try_from(c.size).unwrap_or(usize::MAX).min(buf.len());
            c.size -= n as u64;
            if c.size == 0 {
                c.state = State::BodyCr;
            }
            return Ok(Step::Data(buf.split_to(n).freeze()));
        }
        let Some(&b) = buf.first() else {
            return Ok(Step::NeedMore);
        };
        buf.advance(1);
        c.state = match c.state {
            State::Start => {
                c.size = hex(b).ok_or(DecodeError::ChunkSize)?;
                State::Size
            }
            State::Size => match b {
                b'\t' | b' ' => State::SizeLws,
                b';' => State::Extension,
                b'\r' => State::SizeLf,
                _ => {
                    let d = hex(b).ok_or(DecodeError::ChunkSize)?;
                    c.size = c
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(d))
                        .ok_or(DecodeError::Overflow)?;
                    State::Size
                }
            },
            State::SizeLws => match b {
                b'\t' | b' ' => State::SizeLws,
                b';' => State::Extension,
                b'\r' => State::SizeLf,
                _ => return Err(DecodeError::ChunkSize),
            },
            State::Extension => match b {
                b'\r' => State::SizeLf,
                b'\n' => return Err(DecodeError::Extensions),
                _ => {
                    c.extensions += 1;
                    if c.extensions >= EXTENSIONS_LIMIT {
                        return Err(DecodeError::Extensions);
                    }
                    State::Extension
                }
            },
            State::SizeLf => match b {
                b'\n' if c.size == 0 => State::EndCr,
                b'\n' => State::Body,
                _ => return Err(DecodeError::ChunkSize),
            },
            State::BodyCr => match b {
                b'\r' => State::BodyLf,
                _ => return Err(DecodeError::ChunkEnd),
            },
            State::BodyLf => match b {
                b'\n' => State::Start,
                _ => return Err(DecodeError::ChunkEnd),
            },
            State::Trailer => {
                push(c, b, max_trailer_bytes)?;
                if b == b'\r' {
                    State::TrailerLf
                } else {
                    State::Trailer
                }
            }
            State::TrailerLf => {
                if b != b'\n' {
                    return Err(DecodeError::Trailers);
                }
                if c.trailer_count >= max_trailers {
                    return Err(DecodeError::Trailers);
                }
                c.trailer_count += 1;
                push(c, b, max_trailer_bytes)?;
                State::EndCr
            }
            State::EndCr => {
                // The last chunk's own CRLF is no trailer: only a trailer begun keeps it.
                if b != b'\r' || c.trailers.is_some() {
                    push(c, b, max_trailer_bytes)?;
                }
                if b == b'\r' {
                    State::EndLf
                } else {
                    State::Trailer
                }
            }
            State::EndLf => {
                if b != b'\n' {
                    return Err(DecodeError::ChunkEnd);
                }
                let trailers = match c.trailers.take() {
                    Some(mut t) => {
                        push_into(&mut t, b, max_trailer_bytes)?;
                        Some(trailers(&t, c.trailer_count)?)
                    }
                    None => None,
                };
                return Ok(Step::End(trailers));
            }
            State::Body => State::Body,
        };
    }
}

/// Keeps a trailer byte (hyper's `put_u8!`), within the trailer size limit.
fn push(c: &mut Chunked, b: u8, max: usize) -> Result<(), DecodeError> {
    push_into(
        c.trailers
            .get_or_insert_with(|| BytesMut::with_capacity(64)),
        b,
        max,
    )
}

fn push_into(t: &mut BytesMut, b: u8, max: usize) -> Result<(), DecodeError> {
    if t.len() >= max {
        return Err(DecodeError::Trailers);
    }
    t.extend_from_slice(&[b]);
    Ok(())
}

/// hyper's `decode_trailers`: the trailer lines as header fields.
fn trailers(buf: &[u8], count: usize) -> Result<HeaderMap, DecodeError> {
    let mut slots = vec![httparse::EMPTY_HEADER; count.max(1)];
    match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields.iter() {
                let name =
                    HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| DecodeError::Trailers)?;
                let value = HeaderValue::from_bytes(f.value).map_err(|_| DecodeError::Trailers)?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(DecodeError::Trailers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in pieces of `step` bytes: the data, the trailers, and whether
    /// it ended.
    fn run(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>, bool), DecodeError> {
        let mut d = Decoder::new(Framing::Chunked, 8192, 100);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = None;
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => data.extend_from_slice(&b),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((data, trailers, true)),
                Decoded::NeedMore => {
                    if fed >= wire.len() {
                        return Ok((data, trailers, false));
                    }
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_the_same_however_they_are_split() {
        let wire = b"5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\nx-sum: 1\r\nx-b: 2\r\n\r\n";
        let whole = run(wire, usize::MAX).unwrap();
        assert_eq!(whole.0, b"hello0123456789");
        let t = whole.1.clone().unwrap();
        assert_eq!(t.get("x-sum").unwrap(), "1");
        assert!(whole.2);
        for step in 1..wire.len() {
            assert_eq!(run(wire, step).unwrap(), whole, "split every {step}");
        }
    }

    #[test]
    fn a_chunked_body_without_trailers_hands_out_no_trailers() {
        let (data, trailers, ended) = run(b"5\r\nhello\r\n0\r\n\r\n", usize::MAX).unwrap();
        assert_eq!(data, b"hello");
        assert!(trailers.is_none(), "{trailers:?}");
        assert!(ended);
    }

    #[test]
    fn framing_tricks_are_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
        ] {
            assert!(
                run(bad, usize::MAX).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_ext = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(17 * 1024));
        assert_eq!(run(long_ext.as_bytes(), 4096), Err(DecodeError::Extensions));
    }

    #[test]
    fn a_length_body_takes_exactly_its_bytes() {
        let mut d = Decoder::new(Framing::Length(5), 8192, 100);
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"hel"))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::NeedMore);
        buf.extend_from_slice(b"loGET /");
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"lo"))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"GET /");
        assert!(d.is_done());
    }
}
