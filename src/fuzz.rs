//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz), one function per target taking
//! the fuzzer's bytes. `cargo test` replays every committed corpus through the same
//! functions (`tests/it/fuzz_corpus.rs`), so a crash once found stays fixed on stable Rust.
//! Not an API: hidden from the docs, and nothing else calls it.
//!
//! A target must never panic, loop or allocate without bound on any input: that is the
//! property the fuzzer checks. Targets that can state more (a round trip, agreement with
//! another parser) assert it here.

use crate::upstream::client::{Head, Reader, Snapshot, Step};

/// The chunk-size line of a chunked body (`1a;ext=1`), as the upstream client reads it:
/// a size that parses is the hex value of the leading digits.
pub fn chunk_size(data: &[u8]) {
    if let Some(n) = crate::upstream::client::parse_chunk_size(data) {
        let digits: Vec<u8> = data
            .iter()
            .copied()
            .take_while(u8::is_ascii_hexdigit)
            .collect();
        let text = String::from_utf8_lossy(&digits);
        assert_eq!(u64::from_str_radix(&text, 16).ok(), Some(n), "{text}");
    }
}

/// The HTTP/1 guard's verdicts on arbitrary bytes (`listener::h1_guard`). The first byte picks
/// the limits (the extremes included) and how the bytes are split into reads; the rest is
/// the connection. The verdicts do not depend on how the bytes were split, nor does
/// following a stream that is followed whole; a head the guard gave a verdict on is one httparse
/// parses, with both Content-Length and Transfer-Encoding exactly when the verdict says so.
pub fn h1_guard(data: &[u8]) {
    use crate::listener::h1_guard::{Tracker, Verdict};
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let max_head = [8192, 16 * 1024, 64 * 1024, usize::MAX][usize::from(pick & 3)];
    let max_headers = [1, 4, 100, usize::MAX][usize::from((pick >> 2) & 3)];
    let step = [1, 2, 3, 7, 64, 1000, usize::MAX, 13][usize::from(pick >> 5)];
    let run = |step: usize| {
        let mut t = Tracker::new(max_head, max_headers);
        for part in stream.chunks(step.min(stream.len()).max(1)) {
            t.feed(part);
        }
        let verdicts: Vec<Verdict> = (0..8).map(|_| t.next_verdict()).collect();
        (verdicts, t.is_active())
    };
    let whole = run(usize::MAX);
    let split = run(step);
    assert_eq!(split.0, whole.0, "split every {step}");
    // Split, a head is only parsed once an empty line may have arrived (as hyper does), so
    // garbage is found later or not at all (hyper closes the connection then anyway); but
    // what is followed whole is followed split.
    assert!(split.1 || !whole.1, "split every {step}: stopped");

    // The first head, as httparse reads it on its own.
    let mut t = Tracker::new(max_head, max_headers);
    t.feed(stream);
    if t.pending() == 0 {
        return;
    }
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers.min(stream.len() + 1)];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(stream) else {
        panic!("a verdict on a head httparse does not parse");
    };
    let has = |name: &str| {
        req.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    let both = has("content-length") && has("transfer-encoding");
    assert_eq!(
        t.next_verdict() == Verdict::ContentLengthAndTransferEncoding,
        both
    );
}

/// The client address rampart believes and the forwarding headers it writes
/// (`route::client_ip`, `route::headers::set_forwarded`), and the Host check. The first
/// byte picks the peer and the trusted blocks; the rest, split at newlines, are the
/// X-Forwarded-For lines (and the first one is also tried as `Host`, `Forwarded` and
/// `X-Real-IP`). An untrusted peer is always the client and always what X-Forwarded-For
/// says; a trusted one's client is the rightmost address not trusted (or the leftmost of a
/// trusted chain), read from the right.
pub fn xff(data: &[u8]) {
    use std::net::IpAddr;

    use http::{HeaderMap, HeaderValue};

    use crate::config::Cidr;
    use crate::route::headers;

    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let peers = ["127.0.0.1", "192.0.2.1", "::ffff:10.1.2.3", "2001:db8::1"];
    let peer: IpAddr = peers[usize::from(pick & 3)]
        .parse()
        .unwrap_or(IpAddr::from([0; 4]));
    let blocks = [
        ("127.0.0.0", 8),
        ("10.0.0.0", 8),
        ("2001:db8::", 32),
        ("192.0.2.1", 32),
        ("0.0.0.0", 0),
        ("::", 0),
    ];
    let trusted: Vec<Cidr> = blocks
        .iter()
        .enumerate()
        .filter(|(i, _)| pick >> 2 & (1 << i) != 0 && *i < 6)
        .filter_map(|(_, (a, p))| {
            Some(Cidr {
                addr: a.parse().ok()?,
                prefix: *p,
            })
        })
        .collect();
    let mut map = HeaderMap::new();
    let lines: Vec<HeaderValue> = rest
        .split(|&b| b == b'\n')
        .filter_map(|l| HeaderValue::from_bytes(l).ok())
        .collect();
    for v in &lines {
        map.append("x-forwarded-for", v.clone());
    }
    if let Some(first) = lines.first() {
        map.insert("forwarded", first.clone());
        map.insert("x-real-ip", first.clone());
        if headers::valid_host(first.as_bytes()) {
            let bytes = first.as_bytes();
            assert!(!bytes.is_empty());
            assert!(
                !bytes
                    .iter()
                    .any(|b| matches!(b, b'@' | b'/' | b'\\' | b',' | b'?' | b'#' | b' '))
                    && bytes.iter().all(|b| b.is_ascii_graphic()),
                "{bytes:?}"
            );
        }
    }
    let unmap = |ip: IpAddr| ip.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));

    let client = crate::route::client_ip::client_ip(peer, &map, &trusted);
    if !is_trusted(peer) {
        assert_eq!(client, unmap(peer));
    } else if client != unmap(peer) {
        // Some entry says `client`, and every entry right of the first that says it is
        // trusted... unless the walk stopped at garbage; either way `client` was written.
        let text: String = lines
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        let said = text.split(',').map(str::trim).any(|e| {
            let e = e.trim_start_matches('[');
            let e = e.split(']').next().unwrap_or(e);
            e.parse::<IpAddr>().ok().map(unmap) == Some(client)
                || e.rsplit_once(':')
                    .and_then(|(h, _)| h.parse::<IpAddr>().ok())
                    .map(unmap)
                    == Some(client)
        });
        assert!(said, "{client} not in {text:?}");
    }

    let trusted_peer = headers::is_trusted(peer, &trusted);
    let mut out = map.clone();
    let host = HeaderValue::from_static("h");
    headers::set_forwarded(&mut out, peer, trusted_peer, "http", Some(&host));
    let peer_text = unmap(peer).to_string();
    let xff: Vec<&HeaderValue> = out.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff.len(), 1);
    let xff = xff[0].to_str().unwrap_or_default();
    if trusted_peer {
        assert!(xff.ends_with(&peer_text), "{xff}");
    } else {
        assert_eq!(xff, peer_text);
        assert!(!out.contains_key("forwarded") && !out.contains_key("x-real-ip"));
        assert_eq!(out["x-forwarded-host"], "h");
        assert_eq!(out["x-forwarded-proto"], "http");
    }
}

/// Path normalisation (`crate::path`). The first byte picks the options; the rest, when the
/// http crate takes it as a path, is normalised. What comes out starts with `/`, has no dot
/// or (merged) empty segment, parses as a path again, and is its own normal form; the
/// matching form of the forwarded form is the matching form.
pub fn path(data: &[u8]) {
    use crate::path::{Options, normalize};
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(pq) = http::uri::PathAndQuery::try_from(rest) else {
        return;
    };
    let raw = pq.path();
    let opts = Options {
        merge_slashes: pick & 1 != 0,
        reject_escaped_slashes: pick & 2 != 0,
        cut_params: pick & 4 != 0,
    };
    let Ok(out) = normalize(raw, opts) else {
        return;
    };
    if !raw.starts_with('/') {
        assert_eq!(out, raw);
        return;
    }
    assert!(out.starts_with('/'), "{raw:?} -> {out:?}");
    for seg in out.split('/').skip(1) {
        let name = if opts.cut_params {
            assert!(!seg.contains(';'), "{raw:?} -> {out:?}");
            seg
        } else {
            seg.split(';').next().unwrap_or(seg)
        };
        assert!(name != "." && name != "..", "{raw:?} -> {out:?}");
    }
    if opts.merge_slashes {
        assert!(!out.contains("//"), "{raw:?} -> {out:?}");
    }
    assert!(
        http::uri::PathAndQuery::try_from(out.as_bytes()).is_ok_and(|p| p.path() == out),
        "{raw:?} -> {out:?}"
    );
    assert_eq!(
        normalize(&out, opts).ok().as_deref(),
        Some(&*out),
        "{raw:?}"
    );
    let matching = Options {
        cut_params: true,
        ..opts
    };
    if !opts.cut_params {
        assert_eq!(
            normalize(&out, matching).ok(),
            normalize(raw, matching).ok(),
            "{raw:?}"
        );
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
        // `Conn::poll_body` skips the step when the reader says it needs bytes: the step
        // must then have nothing to do.
        let skipped = reader.needs_bytes().then(|| reader.snapshot());
        let stepped = reader.step(true);
        if let Some(before) = skipped {
            assert!(
                matches!(stepped, Ok(Step::More)) && reader.snapshot() == before,
                "a step skipped as needing bytes did something"
            );
        }
        match stepped {
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
/// The config loader (`rampart check`, every reload) on any text: a file is accepted or
/// refused with located problems, never a panic, a hang or an allocation the text sizes.
/// What it accepts stays inside every documented bound, and prints (the `check` summary,
/// `/admin/config`, `Debug`) without a panic.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // Variables the text may refer to: one set, one empty, the rest unset.
    let env = |name: &str| match name {
        "SET" => Some("127.0.0.1:8080".to_owned()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    match crate::config::parse_str(&text, "fuzz.yaml", &env) {
        Ok(c) => {
            for l in &c.listeners {
                assert!((1..=1_000_000).contains(&l.max_connections));
                assert!((1..=1000).contains(&l.max_headers));
                assert!((8 * 1024..=1024 * 1024).contains(&l.max_header_bytes));
                for r in &l.routes {
                    assert!((1..=1 << 30).contains(&r.max_body_bytes));
                }
            }
            for u in c.upstreams.values() {
                for e in &u.endpoints {
                    assert!(e.port_u16().is_some_and(|p| p > 0), "{e}");
                }
            }
            let _ = c.summary();
            let _ = format!("{c:?}");
            let _ = crate::admin::config_json::to_json(&c).to_string();
        }
        Err(e) => {
            assert!(!e.problems.is_empty());
            let _ = e.to_string();
        }
    }
}

/// The event-stream scanner (`stream::sse`) on any bytes. The first byte picks the size of
/// the chunks (bits 0-2) and the error names (bits 3-4); the rest is the stream. Fed whole,
/// in chunks and byte by byte, the counts and the final state agree, and each chunk's
/// boundary is the last offset in it that the byte-by-byte feed found between events.
pub fn sse(data: &[u8]) {
    use crate::stream::sse::{Scan, Scanner};
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let step = [1, 2, 3, 5, 7, 64, 1000, usize::MAX][usize::from(pick & 7)];
    let lists: [&[&str]; 4] = [&["error"], &["error", "fail"], &["message"], &[]];
    let which = usize::from(pick >> 3 & 3);
    let new = || match which {
        0 => Scanner::default(),
        _ => Scanner::new(lists[which]),
    };
    let add = |totals: &mut [usize; 3], scan: Scan| {
        assert!(scan.errors <= scan.events, "{scan:?}");
        totals[0] += scan.events;
        totals[1] += scan.errors;
        totals[2] += scan.comments;
    };

    let mut s = new();
    let mut totals = [0; 3];
    let mut boundaries = Vec::new();
    for (i, b) in stream.iter().enumerate() {
        let scan = s.feed(std::slice::from_ref(b));
        add(&mut totals, scan);
        if let Some(at) = scan.boundary {
            assert!(at == 1 && s.at_boundary(), "{i}: {scan:?}");
            boundaries.push(i + 1);
        }
    }
    let byte_by_byte = (totals, s.at_boundary());

    for step in [step, usize::MAX] {
        let mut s = new();
        let mut totals = [0; 3];
        let mut from = 0;
        for part in stream.chunks(step.min(stream.len()).max(1)) {
            let scan = s.feed(part);
            add(&mut totals, scan);
            let to = from + part.len();
            let last = boundaries[..boundaries.partition_point(|&p| p <= to)]
                .last()
                .filter(|&&p| p > from)
                .map(|p| p - from);
            assert_eq!(scan.boundary, last, "chunk {from}..{to}, every {step}");
            from = to;
        }
        assert_eq!((totals, s.at_boundary()), byte_by_byte, "every {step}");
    }
}

/// The token meter (`stream::usage`) on any bytes, as an event stream and as a JSON body.
/// The first two bytes pick where the rest is cut in two (as a big-endian offset, past the
/// end meaning not at all); the meter's answer is the same cut or whole, and byte by byte
/// (that one for inputs up to 4 KiB, to keep each run fast).
pub fn usage(data: &[u8]) {
    use crate::stream::usage::UsageMeter;
    let (cut, body) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), rest),
        _ => return,
    };
    let cut = cut.min(body.len());
    for new in [UsageMeter::event_stream, UsageMeter::json] {
        let mut whole = new();
        whole.feed(body);
        let mut split = new();
        split.feed(&body[..cut]);
        split.feed(&body[cut..]);
        assert_eq!(split.usage(), whole.usage(), "cut at {cut}");
        if body.len() <= 4096 {
            let mut bytes = new();
            for b in body.chunks(1) {
                bytes.feed(b);
            }
            assert_eq!(bytes.usage(), whole.usage(), "byte by byte");
        }
    }
}

/// The upstream HTTP/2 connection's frame scan (`upstream::pool::h2_conn`), which reads the
/// server's SETTINGS and GOAWAY as they pass, on any bytes: never a panic, and what it learns
/// is the same whole, cut in two where the first two bytes say, and byte by byte.
pub fn h2_scan(data: &[u8]) {
    use crate::upstream::pool::h2_conn::scan_pieces;
    let (cut, wire) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), rest),
        _ => return,
    };
    let cut = cut.min(wire.len());
    let whole = scan_pieces([wire]);
    assert_eq!(
        scan_pieces([&wire[..cut], &wire[cut..]]),
        whole,
        "cut at {cut}"
    );
    assert_eq!(scan_pieces(wire.chunks(1)), whole, "byte by byte");
}

/// The response cache's reading of Cache-Control and friends (`cache::control`) on any
/// header lines. The first byte picks the status, the policy's ttl and Vary list; the rest,
/// split at newlines, are header lines whose first byte picks the name (Cache-Control,
/// Pragma, Vary, Expires, Date, Age, Content-Type). Never a panic; a response found
/// storable is fresh for more than zero and at most 2^31 s, and may be served stale for at
/// most 2^31 s.
pub fn cache_control(data: &[u8]) {
    use std::time::{Duration, SystemTime};

    use http::{HeaderMap, HeaderValue};

    use crate::cache::control::{StaleRule, Storable, age_secs, request_directives, storable};

    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let status = [200, 404, 206, 500][usize::from(pick & 3)];
    let ttl = [0, 1, 3600, u64::MAX][usize::from(pick >> 2 & 3)];
    let vary: &[String] = &[String::from("accept-language"), String::from("accept")];
    let vary = &vary[..usize::from(pick >> 4 & 1) * 2];
    let names = [
        "cache-control",
        "pragma",
        "vary",
        "expires",
        "date",
        "age",
        "content-type",
        "cache-control",
    ];
    let mut headers = HeaderMap::new();
    for line in rest.split(|&b| b == b'\n') {
        let Some((&n, value)) = line.split_first() else {
            continue;
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(names[usize::from(n & 7)], v);
        }
        let _ = crate::cache::control::parse_http_date(&String::from_utf8_lossy(value));
    }
    let _ = request_directives(&headers);
    let _ = age_secs(&headers);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_578_800);
    let max = Duration::from_secs(1 << 31);
    match storable(status, &headers, Duration::from_secs(ttl), vary, now) {
        Storable::Yes {
            fresh_for,
            stale_if_error,
        } => {
            assert!(!fresh_for.is_zero() && fresh_for <= max, "{fresh_for:?}");
            if let StaleRule::For(d) = stale_if_error {
                assert!(d <= max, "{d:?}");
            }
        }
        Storable::No(reason) => assert!(!reason.is_empty()),
    }
}

/// The response cache's stored form (`cache::entry`) on any bytes: decoding never panics,
/// and what decodes encodes to bytes that decode to the same entry.
pub fn cache_entry(data: &[u8]) {
    use crate::cache::entry::Entry;
    if let Some(e) = Entry::decode(data) {
        assert!(e.stale_until >= e.fresh_until && (100..=999).contains(&e.status));
        assert!(e.weight() >= e.key.len() + e.body.len());
        assert_eq!(Entry::decode(&e.encode()).as_ref(), Some(&e));
    }
}

/// rampart's HTTP/1.1 server reading a connection's bytes (`h1::parse_head`, then
/// `h1::Decoder` for each body, request after request, as `h1::conn` does). The first byte
/// picks the limits and how the bytes are split into reads; the rest is the connection.
/// Read whole and read split, the connection yields the same heads (method, target,
/// version, headers, framing), bodies (data, trailers, end) and errors. A head framed with
/// both Content-Length and Transfer-Encoding is one the byte-level guard (which mirrors
/// hyper's parser) gives that verdict too.
pub fn h1_request(data: &[u8]) {
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let max_head = [1024, 8192, 64 * 1024, 1 << 20][usize::from(pick & 3)];
    let max_headers = [1, 4, 100, 10_000][usize::from((pick >> 2) & 3)];
    let step = [1, 2, 3, 7, 64, 1000, usize::MAX, 13][usize::from(pick >> 5)];
    let whole = h1_read(stream, usize::MAX, max_head, max_headers);
    let split = h1_read(stream, step, max_head, max_headers);
    assert_eq!(split, whole, "split every {step}");

    if let Some(H1Event::Head { cl_and_te, .. }) = whole.first() {
        use crate::listener::h1_guard::{Tracker, Verdict};
        let mut t = Tracker::new(max_head, max_headers);
        t.feed(stream);
        if t.next_verdict() == Verdict::ContentLengthAndTransferEncoding {
            assert!(*cl_and_te, "the guard saw CL and TE, the server did not");
        }
    }
}

/// What the server made of a connection's bytes, in order.
#[derive(Debug, PartialEq)]
enum H1Event {
    Head {
        head: String,
        framing: String,
        keep_alive: bool,
        cl_and_te: bool,
    },
    Body(Vec<u8>),
    Trailers(String),
    /// The bytes ended in the middle of a head or a body.
    Short,
    Error(String),
}

fn h1_read(stream: &[u8], step: usize, max_head: usize, max_headers: usize) -> Vec<H1Event> {
    use bytes::BytesMut;

    use crate::h1::{Decoded, Decoder, may_end_head, parse_head};

    let mut buf = BytesMut::new();
    let mut fed = 0usize;
    let mut out = Vec::new();
    // At most as many requests as a connection's bytes could hold, and never unbounded.
    for _ in 0..64 {
        // As `h1::conn` reads a head: parsed at the first look, then only when new bytes
        // may end it or the limit is reached; here also once more at the end of the bytes
        // (where the connection's timeout would end it), so whole and split agree.
        let mut looked: Option<usize> = None;
        let parsed = loop {
            let len = buf.len();
            let at_end = fed >= stream.len();
            if len > looked.unwrap_or(0) || (at_end && looked.is_some_and(|l| l < len)) {
                let worth = match looked {
                    None => true,
                    Some(prev) => at_end || len >= max_head || may_end_head(&buf, prev),
                };
                if worth {
                    looked = Some(len);
                    match parse_head(&mut buf, max_head, max_headers) {
                        Ok(Some(p)) => break p,
                        Ok(None) => {}
                        Err(e) => {
                            out.push(H1Event::Error(e.to_string()));
                            return out;
                        }
                    }
                } else if len > 0 && looked.is_none() {
                    looked = Some(len);
                }
            }
            if at_end {
                if !buf.is_empty() {
                    out.push(H1Event::Short);
                }
                return out;
            }
            let end = fed.saturating_add(step).min(stream.len());
            buf.extend_from_slice(&stream[fed..end]);
            fed = end;
        };
        out.push(H1Event::Head {
            head: format!(
                "{} {} {:?} {:?}",
                parsed.parts.method, parsed.parts.uri, parsed.parts.version, parsed.parts.headers
            ),
            framing: format!("{:?}", parsed.framing),
            keep_alive: parsed.keep_alive,
            cl_and_te: parsed.cl_and_te,
        });
        let mut decoder = Decoder::new(parsed.framing, max_head, max_headers);
        let mut body = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => body.extend_from_slice(&d),
                Ok(Decoded::Trailers(t)) => out.push(H1Event::Trailers(format!("{t:?}"))),
                Ok(Decoded::End) => break,
                Ok(Decoded::NeedMore) => {
                    if fed >= stream.len() {
                        out.push(H1Event::Body(body));
                        out.push(H1Event::Short);
                        return out;
                    }
                    let end = fed.saturating_add(step).min(stream.len());
                    buf.extend_from_slice(&stream[fed..end]);
                    fed = end;
                }
                Err(e) => {
                    out.push(H1Event::Body(body));
                    out.push(H1Event::Error(e.to_string()));
                    return out;
                }
            }
        }
        out.push(H1Event::Body(body));
        if !parsed.keep_alive {
            return out;
        }
    }
    out
}
