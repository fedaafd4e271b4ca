//! The response side of a connection: the read buffer, and the walk through a body's
//! framing (Content-Length, chunks, until the close). The head is parsed in `head`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncRead;

use super::WireError;

/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after the last chunk (they are read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;
/// Most free room offered to a read: what a body that streams fast gets.
const READ_ROOM: usize = 16 * 1024;
/// Least free room offered to a read: what an event stream's small reads get. The buffer
/// is resident memory for as long as the response lasts, and an open SSE stream only ever
/// needs a few hundred bytes of it: 16 KiB
/// per stream was a third of rampart's memory per stream with 1,000 open (benchmarks.md).
const MIN_ROOM: usize = 2 * 1024;
/// Reads this much smaller than the room, this many times in a row, halve the room.
const SMALL_READ_DIVISOR: usize = 8;
const SMALL_READS_TO_SHRINK: u8 = 8;
/// Below this much free room the buffer is compacted or renewed before a read. Small, so
/// that an event stream's 2 KiB is renewed only every dozen events or so, not at every
/// read.
const MIN_READ: usize = 512;

/// Where the response body stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Incoming {
    /// No body, or all of it was read.
    Done,
    /// Bytes still to come under Content-Length.
    Length(u64),
    /// Until the upstream closes the connection.
    UntilClose,
    Chunked(Chunk),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Chunk {
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

/// The response side of a connection: the read buffer and where the response stands. It
/// knows nothing of the socket (`poll_fill` is lent one), so the fuzz targets drive the
/// same parsing from byte slices (`crate::fuzz`).
pub(crate) struct Reader {
    /// Input not yet consumed, all of it; reads go into its spare capacity,
    /// never zeroed (`tokio_util::io::poll_read_buf`: zeroing 2 KiB at each renewal cost
    /// ~2 missed cache lines per event of a stream).
    pub(super) read: BytesMut,
    pub(super) incoming: Incoming,
    /// The connection ends with this response: it said so (`Connection: close`, HTTP/1.0),
    /// its body runs until the close, or bytes came after its end (the upstream is out of
    /// step).
    pub(super) close: bool,
    /// The free room the next renewal offers, between MIN_ROOM and READ_ROOM: doubled when
    /// a read fills what it was offered, halved after a run of small reads (as hyper's
    /// adaptive read strategy does).
    room_size: usize,
    small_reads: u8,
}

impl Reader {
    pub(crate) fn new() -> Self {
        Reader {
            read: BytesMut::new(),
            incoming: Incoming::Done,
            close: false,
            room_size: MIN_ROOM,
            small_reads: 0,
        }
    }

    /// Makes at least `min` bytes of room after the unconsumed input, reusing the buffer
    /// when nothing else holds a part of it.
    fn room(&mut self, min: usize) {
        if self.read.capacity() - self.read.len() >= min {
            return;
        }
        self.read.reserve(min.max(self.room_size));
    }

    /// One read from `io`; Ok(0) at the end of the stream.
    pub(super) fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        self.room(MIN_READ);
        let offered = self.read.capacity() - self.read.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(io),
            cx,
            &mut self.read
        ))?;
        self.adapt(n, offered);
        Poll::Ready(Ok(n))
    }

    /// Sizes the next renewal of the buffer by how the reads go.
    fn adapt(&mut self, n: usize, offered: usize) {
        if n == offered && n > 0 {
            self.room_size = (self.room_size * 2).min(READ_ROOM);
            self.small_reads = 0;
        } else if n < self.room_size / SMALL_READ_DIVISOR {
            self.small_reads += 1;
            if self.small_reads >= SMALL_READS_TO_SHRINK {
                self.room_size = (self.room_size / 2).max(MIN_ROOM);
                self.small_reads = 0;
            }
        } else {
            self.small_reads = 0;
        }
    }

    /// Appends input as a read would (the fuzz targets' socket).
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.read.extend_from_slice(bytes);
    }

    /// Unconsumed input.
    pub(crate) fn buffered(&self) -> usize {
        self.read.len()
    }

    /// Where the response stands, for comparing two readers (the fuzz targets).
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            incoming: self.incoming,
            // Bytes not consumed end the connection as surely as a close (`usable_now`):
            // when they came does not matter.
            ends_connection: self.close || !self.read.is_empty(),
        }
    }

    /// The first `n` unconsumed bytes, as a slice of the buffer.
    pub(super) fn take(&mut self, n: usize) -> Bytes {
        self.read.split_to(n).freeze()
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.read.advance(n);
    }

    /// The body was read to its end; bytes beyond it mean the upstream is out of step.
    pub(super) fn body_ended(&mut self) {
        self.incoming = Incoming::Done;
        if !self.read.is_empty() {
            self.close = true;
        }
    }

    pub(crate) fn body_done(&self) -> bool {
        self.incoming == Incoming::Done
    }

    /// Nothing is buffered and the body is where `step` can only ask for more bytes (and
    /// changes nothing): a streamed body's usual state at each poll, which then goes
    /// straight to the read. (Not at a trailer limit, where `step` fails at once.)
    pub(crate) fn needs_bytes(&self) -> bool {
        self.read.is_empty()
            && matches!(
                self.incoming,
                Incoming::Length(_)
                    | Incoming::UntilClose
                    | Incoming::Chunked(Chunk::Size | Chunk::Data(_) | Chunk::DataEnd)
            )
    }

    /// The whole body is buffered and framed by its length: nothing more can go wrong
    /// with it.
    pub(super) fn body_buffered(&self) -> bool {
        match self.incoming {
            Incoming::Done => true,
            Incoming::Length(n) => self.read.len() as u64 >= n,
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
                    if !data || self.read.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = self
                        .read
                        .len()
                        .min(usize::try_from(rest).unwrap_or(usize::MAX));
                    let chunk = self.take(n);
                    if rest == n as u64 {
                        self.body_ended();
                    } else {
                        self.incoming = Incoming::Length(rest - n as u64);
                    }
                    return Ok(Step::Data(chunk));
                }
                Incoming::UntilClose => {
                    if !data || self.read.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(self.take(self.read.len())));
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
                    if !data || self.read.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = self
                        .read
                        .len()
                        .min(usize::try_from(rest).unwrap_or(usize::MAX));
                    let chunk = self.take(n);
                    self.incoming = Incoming::Chunked(if rest == n as u64 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(rest - n as u64)
                    });
                    return Ok(Step::Data(chunk));
                }
                Incoming::Chunked(Chunk::DataEnd) => {
                    if self.read.len() < 2 {
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
        let input = &self.read[..self.read.len().min(limit)];
        match input.iter().position(|&b| b == b'\n') {
            Some(lf) if lf > 0 && input[lf - 1] == b'\r' => Ok(Some(lf - 1)),
            Some(_) => Err(WireError::Invalid("line not ended by CRLF")),
            None if self.read.len() >= limit => Err(WireError::Invalid("line too long")),
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

#[cfg(test)]
mod tests {
    use super::super::WireError;
    use super::super::testing::*;
    use http::{Method, StatusCode};
    use proptest::prelude::*;
    use std::future::poll_fn;

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

    /// An event stream's small reads keep the buffer at its smallest; a fast body's full
    /// reads grow it to the largest, and a run of small reads brings it back down.
    #[test]
    fn the_read_room_follows_the_reads() {
        let mut r = super::Reader::new();
        r.room(super::MIN_READ);
        assert!(r.read.capacity() >= super::MIN_ROOM);
        assert!(r.read.is_empty(), "room is capacity, not zeroed bytes");
        for _ in 0..20 {
            r.adapt(110, 3000);
        }
        assert_eq!(r.room_size, super::MIN_ROOM);
        r.adapt(4096, 4096);
        r.adapt(8192, 8192);
        r.adapt(16384, 16384);
        assert_eq!(r.room_size, super::READ_ROOM, "never past the largest");
        for _ in 0..super::SMALL_READS_TO_SHRINK {
            r.adapt(100, 16384);
        }
        assert_eq!(r.room_size, super::READ_ROOM / 2);
        for _ in 0..(3 * super::SMALL_READS_TO_SHRINK) {
            r.adapt(100, 16384);
        }
        assert_eq!(r.room_size, super::MIN_ROOM, "never below the smallest");
        // A read of a good size in between restarts the count.
        r.adapt(8192, 8192);
        for _ in 0..super::SMALL_READS_TO_SHRINK - 1 {
            r.adapt(100, 16384);
        }
        r.adapt(4000, 16384);
        r.adapt(100, 16384);
        assert_eq!(r.room_size, 2 * super::MIN_ROOM);
    }

    /// Data handed on as `Bytes` shares the read buffer: reads into its spare room, and its
    /// renewals while those `Bytes` are held, change none of them (hostile upstream: a
    /// stream of small chunks, each fed in two pieces cut mid-data).
    #[test]
    fn data_handed_on_stays_whole_while_the_buffer_is_renewed() {
        let mut r = super::Reader::new();
        r.incoming = super::Incoming::Chunked(super::Chunk::Size);
        let mut held = Vec::new();
        let mut sent = Vec::new();
        for i in 0..600 {
            let data = format!("event {i} {}", "x".repeat(i % 37));
            sent.extend_from_slice(data.as_bytes());
            let wire = format!("{:x}\r\n{data}\r\n", data.len());
            let (a, b) = wire.as_bytes().split_at(wire.len() / 2 + 1);
            for piece in [a, b] {
                r.feed(piece);
                while let super::Step::Data(d) = r.step(true).expect("good framing") {
                    held.push(d);
                }
            }
        }
        assert_eq!(held.concat(), sent);
        assert!(
            sent.len() > 8 * super::MIN_ROOM,
            "the buffer was renewed several times"
        );
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
}
