//! Follows HTTP/1 message framing through the bytes hyper reads: heads (parsed by `head`),
//! Content-Length and chunked bodies, the pause after an upgrade request, and the HTTP/2
//! preface that ends the guard's work.

use std::collections::VecDeque;

use super::Verdict;
use super::head::{Body, Head, inspect};

pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Room for bytes read while an upgrade request awaits its answer, beyond one head: hyper
/// reads at most one buffer ahead then, so this is only ever hit by a tunnel we failed to
/// hear about.
const STASH_SLACK: usize = 64 * 1024;

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
    pub(super) h2_at: Option<usize>,
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

    pub(super) fn stop(&mut self) {
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
                Ok(Some(head)) if head.len > self.max_head => {
                    self.oversize();
                    &[]
                }
                Ok(Some(head)) => {
                    self.on_head(head);
                    &buf[head.len..]
                }
                Ok(None) => {
                    if buf.len() > self.max_head {
                        self.oversize();
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
            Ok(Some(head)) if head.len > self.max_head => {
                self.oversize();
                &[]
            }
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
            Ok(None) => {
                self.oversize();
                &[]
            }
            Err(()) => {
                self.stop();
                &[]
            }
        }
    }

    /// A head over the limit. hyper checks its limit only between reads that leave a head
    /// unfinished, so a head that arrives whole in a larger read gets through it (a 70 KiB
    /// head against 64 KiB did, once hyper read from the socket directly): the verdict
    /// refuses it with 431 if hyper dispatches it. Nothing after it is followed.
    fn oversize(&mut self) {
        self.verdicts.push_back(Verdict::HeadTooLarge);
        self.stop();
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
    /// hyper's own limit misses a head that arrives whole in one larger read: the guard
    /// refuses it, whole or in pieces, and follows nothing after it.
    #[test]
    fn a_head_over_the_limit_is_refused_however_it_arrives() {
        let big = format!(
            "GET /v HTTP/1.1\r\nhost: a\r\nx: {}\r\n\r\n",
            "v".repeat(70 * 1024)
        );
        let mut whole = big.clone().into_bytes();
        whole.extend_from_slice(GET);
        let (t, v) = run(&[&whole]);
        assert_eq!(v, vec![Verdict::HeadTooLarge]);
        assert!(!t.is_active());
        let (t, v) = run(&[&big.as_bytes()[..8192], &big.as_bytes()[8192..], GET]);
        assert_eq!(v, vec![Verdict::HeadTooLarge]);
        assert!(!t.is_active());
        // Under the limit, in one read or in two: served.
        let fits = format!(
            "GET /v HTTP/1.1\r\nhost: a\r\nx: {}\r\n\r\n",
            "v".repeat(60 * 1024)
        );
        assert_eq!(run(&[fits.as_bytes(), GET]).1, vec![V_OK, V_OK]);
        let (a, b) = fits.as_bytes().split_at(100);
        assert_eq!(run(&[a, b, GET]).1, vec![V_OK, V_OK]);
    }

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
}
