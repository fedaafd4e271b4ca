#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rampart::fuzz::h1_request(data));
