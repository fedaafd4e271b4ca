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
