//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz), one function per target taking
//! the fuzzer's bytes. `cargo test` replays every committed corpus through the same
//! functions (`tests/it/fuzz_corpus.rs`), so a crash once found stays fixed on stable Rust.
//! Not an API: hidden from the docs, and nothing else calls it.
//!
//! A target must never panic, loop or allocate without bound on any input: that is the
//! property the fuzzer checks. Targets that can state more (a round trip, agreement with
//! another parser) assert it here.

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

/// The HTTP/1 guard's verdicts on arbitrary bytes (`server::h1_guard`). The first byte picks
/// the limits (the extremes included) and how the bytes are split into reads; the rest is
/// the connection. The verdicts do not depend on how the bytes were split, nor does
/// following a stream that is followed whole; a head the guard gave a verdict on is one httparse
/// parses, with both Content-Length and Transfer-Encoding exactly when the verdict says so.
pub fn h1_guard(data: &[u8]) {
    use crate::server::h1_guard::{Tracker, Verdict};
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
/// (`ratelimit::client_ip`, `proxy::headers::set_forwarded`), and the Host check. The first
/// byte picks the peer and the trusted blocks; the rest, split at newlines, are the
/// X-Forwarded-For lines (and the first one is also tried as `Host`, `Forwarded` and
/// `X-Real-IP`). An untrusted peer is always the client and always what X-Forwarded-For
/// says; a trusted one's client is the rightmost address not trusted (or the leftmost of a
/// trusted chain), read from the right.
pub fn xff(data: &[u8]) {
    use std::net::IpAddr;

    use http::{HeaderMap, HeaderValue};

    use crate::config::Cidr;
    use crate::proxy::headers;

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
    let unmap = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));

    let client = crate::ratelimit::client_ip(peer, &map, &trusted);
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
