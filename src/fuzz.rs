//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz), one function per target taking
//! the fuzzer's bytes. `cargo test` replays every committed corpus through the same
//! functions (`tests/it/fuzz_corpus.rs`), so a crash once found stays fixed on stable Rust.
//! Not an API: hidden from the docs, and nothing else calls it.
//!
//! A target must never panic, loop or allocate without bound on any input: that is the
//! property the fuzzer checks. Targets that can state more (a round trip, agreement with
//! another parser) assert it here.

use crate::proxy::client::{Head, Reader, Snapshot, Step};

/// The chunk-size line of a chunked body (`1a;ext=1`), as the upstream client reads it:
/// a size that parses is the hex value of the leading digits.
pub fn chunk_size(data: &[u8]) {
    if let Some(n) = crate::proxy::client::parse_chunk_size(data) {
        let digits: Vec<u8> = data
            .iter()
            .copied()
            .take_while(u8::is_ascii_hexdigit)
            .collect();
        let text = String::from_utf8_lossy(&digits);
        assert_eq!(u64::from_str_radix(&text, 16).ok(), Some(n), "{text}");
    }
}

/// What reading a response made of it, compared between two ways of feeding the bytes.
#[derive(Debug, PartialEq)]
enum Event {
    /// A 1xx answer, skipped.
    Informational,
    /// The final head: status and header fields.
    Head(u16, Vec<(String, Vec<u8>)>),
    /// The body's bytes, all of them.
    Body(Vec<u8>),
    /// The body ended cleanly.
    End,
    Failed(String),
}

/// Feeds `wire` to a reader `piece` bytes at a time, as reads from a socket would, and
/// reads a response to a GET (or a HEAD) the way `client::Conn` does: heads while input is
/// buffered, then the body step by step, the end of input being the upstream's close.
/// Returns what came out and the reader's state once every byte was fed (None after a
/// failure: the connection is closed then, whatever else was buffered).
fn read_response(wire: &[u8], piece: usize, head_request: bool) -> (Vec<Event>, Option<Snapshot>) {
    let mut reader = Reader::new();
    let mut pieces = wire.chunks(piece.max(1));
    let mut events = Vec::new();
    // The head.
    'head: loop {
        let Some(p) = pieces.next() else {
            return (events, Some(reader.snapshot()));
        };
        reader.feed(p);
        while reader.buffered() > 0 {
            match reader.parse_head(head_request) {
                Ok(Head::Partial) => break,
                Ok(Head::Informational) => events.push(Event::Informational),
                Ok(Head::Final(resp)) => {
                    let headers = resp
                        .headers()
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                        .collect();
                    events.push(Event::Head(resp.status().as_u16(), headers));
                    break 'head;
                }
                Err(e) => {
                    events.push(Event::Failed(e.to_string()));
                    return (events, None);
                }
            }
        }
    }
    // The body, as `Conn::poll_body` reads it.
    let mut body = Vec::new();
    let end = loop {
        match reader.step(true) {
            Ok(Step::Data(data)) => {
                body.extend_from_slice(&data);
                // Reading past framing, errors left for the next step, as poll_body does.
                let _ = reader.step(false);
            }
            Ok(Step::End) => break Event::End,
            Ok(Step::More) => match pieces.next() {
                Some(p) => reader.feed(p),
                None => match reader.eof() {
                    Ok(()) => break Event::End,
                    Err(e) => break Event::Failed(e.to_string()),
                },
            },
            Err(e) => break Event::Failed(e.to_string()),
        }
    };
    let failed = matches!(end, Event::Failed(_));
    events.push(Event::Body(body));
    events.push(end);
    if failed {
        return (events, None);
    }
    // Whatever the upstream sent after the response (an idle connection's check sees it).
    for p in pieces {
        reader.feed(p);
    }
    (events, Some(reader.snapshot()))
}

/// Response heads as the upstream client parses them (`Reader::parse_head`, 1xx skipped).
/// The first byte chooses a request to HEAD (bit 0) and the size of the reads (the rest);
/// the property: the same bytes read whole or in pieces give the same heads, errors and
/// state.
pub fn response_head(data: &[u8]) {
    let Some((&flags, wire)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let whole = read_response(wire, wire.len(), head_request);
    let pieces = read_response(wire, usize::from(flags >> 1) + 1, head_request);
    assert_eq!(whole, pieces);
}

/// Response bodies as the upstream client decodes them (`Reader::step`: Content-Length,
/// until close, chunked with extensions and trailers). The first byte chooses the framing
/// (bits 0-1) and the size of the reads (the rest). Framings 0-2 take the remaining bytes
/// as they come (chunked, a length from the next two bytes, until close): reading them
/// whole or in pieces must give the same body, end and state. Framing 3 builds a valid
/// chunked body from them (chunk sizes, extensions, trailers), which must decode to its
/// content and leave the connection reusable.
pub fn response_body(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(flags >> 2) + 1;
    let (mut wire, expected) = match flags & 3 {
        0 => (CHUNKED_HEAD.to_vec(), None),
        1 => {
            let (n, rest2) = match rest {
                [a, b, tail @ ..] => (u16::from_be_bytes([*a, *b]), tail),
                _ => (0, &[][..]),
            };
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
            let mut wire = head.into_bytes();
            wire.extend_from_slice(rest2);
            (wire, None)
        }
        2 => (b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\n".to_vec(), None),
        _ => {
            let (wire, content) = valid_chunked(rest);
            (wire, Some(content))
        }
    };
    if flags & 3 != 1 && expected.is_none() {
        wire.extend_from_slice(rest);
    }
    let whole = read_response(&wire, wire.len(), false);
    let pieces = read_response(&wire, piece, false);
    assert_eq!(whole, pieces);
    if let Some(content) = expected {
        let (events, state) = whole;
        assert_eq!(events.get(1), Some(&Event::Body(content)));
        assert_eq!(events.get(2), Some(&Event::End));
        assert!(state.as_ref().is_some_and(Snapshot::reusable), "{state:?}");
    }
}

const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";

/// A valid chunked response built from `seed`: each chunk takes its size (1-64) from a
/// byte, its content from the following ones; odd sizes carry an extension; a trailer
/// field per 16 bytes of content. Returns the wire bytes and the content.
fn valid_chunked(seed: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut wire = CHUNKED_HEAD.to_vec();
    let mut content = Vec::new();
    let mut rest = seed;
    while let Some((&size, tail)) = rest.split_first() {
        let n = (usize::from(size) % 64 + 1).min(tail.len());
        if n == 0 {
            break;
        }
        let ext = if size % 2 == 1 { ";e=\"x; y\"" } else { "" };
        wire.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
        wire.extend_from_slice(&tail[..n]);
        wire.extend_from_slice(b"\r\n");
        content.extend_from_slice(&tail[..n]);
        rest = &tail[n..];
    }
    wire.extend_from_slice(b"0\r\n");
    for i in 0..content.len() / 16 {
        wire.extend_from_slice(format!("x-t{i}: v\r\n").as_bytes());
    }
    wire.extend_from_slice(b"\r\n");
    (wire, content)
}
