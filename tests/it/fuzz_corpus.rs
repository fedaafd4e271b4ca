//! Replays every fuzz target's committed corpus (`fuzz/corpus/<target>/`) through the same
//! entry point the fuzzer drives (`rampart::fuzz`), on stable Rust: what the fuzzer once
//! found stays fixed. Run the fuzzers themselves with `cargo +nightly fuzz run <target>`.

use std::path::PathBuf;

/// A fuzz target's entry point.
type Entry = fn(&[u8]);

/// Every target in `fuzz/fuzz_targets/`, with its entry point.
const TARGETS: &[(&str, Entry)] = &[
    ("chunk_size", rampart::fuzz::chunk_size),
    ("h1_guard", rampart::fuzz::h1_guard),
    ("h1_request", rampart::fuzz::h1_request),
    ("xff", rampart::fuzz::xff),
    ("path", rampart::fuzz::path),
    ("response_head", rampart::fuzz::response_head),
    ("response_body", rampart::fuzz::response_body),
    ("config", rampart::fuzz::config),
    ("sse", rampart::fuzz::sse),
    ("usage", rampart::fuzz::usage),
    ("h2_scan", rampart::fuzz::h2_scan),
    ("cache_control", rampart::fuzz::cache_control),
    ("cache_entry", rampart::fuzz::cache_entry),
];

#[test]
fn every_fuzz_target_has_an_entry_here() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .expect("fuzz/fuzz_targets")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(name.strip_suffix(".rs")?.to_string())
        })
        .collect();
    found.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "fuzz targets and their corpus replays differ"
    );
}

#[test]
fn every_fuzz_corpus_replays_clean() {
    for (name, entry) in TARGETS {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: empty corpus", dir.display());
        for file in files {
            let data = std::fs::read(&file).expect("corpus file");
            let outcome = std::panic::catch_unwind(|| entry(&data));
            assert!(outcome.is_ok(), "{name}: {} panics", file.display());
        }
    }
}
