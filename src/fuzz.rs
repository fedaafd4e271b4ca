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
