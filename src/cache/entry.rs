//! A stored response and its binary form (what the Redis tier holds).
//!
//! The form: the magic `RPCE`, a version byte, then LEB128 varints and length-prefixed
//! bytes: key, status, stored_at, fresh_until, stale_until, age_at_store, the header count,
//! each header's name and value, the body. Decoding checks every length against what
//! remains before it allocates, so a corrupt or hostile value costs at most its own size.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

const MAGIC: &[u8; 4] = b"RPCE";
/// Bumped when the form changes; an entry of another version does not decode (a miss).
const VERSION: u8 = 1;
/// What `weight` counts for each header and each entry beyond their bytes: the map's and
/// the allocator's overhead, roughly.
const HEADER_OVERHEAD: usize = 64;
const ENTRY_OVERHEAD: usize = 128;

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The full cache key, checked on read (a hashed Redis key may collide).
    pub key: String,
    pub status: u16,
    /// The response headers as stored.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Unix ms.
    pub stored_at: u64,
    /// Unix ms; fresh while the clock is before it.
    pub fresh_until: u64,
    /// Unix ms (>= fresh_until); answers when the upstream fails while the clock is before it.
    pub stale_until: u64,
    /// Seconds the upstream's Age said when stored.
    pub age_at_store: u64,
}

impl Entry {
    /// The binary form.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let header_bytes: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let mut out =
            Vec::with_capacity(MAGIC.len() + 64 + self.key.len() + header_bytes + self.body.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        put_bytes(&mut out, self.key.as_bytes());
        put_varint(&mut out, u64::from(self.status));
        for n in [
            self.stored_at,
            self.fresh_until,
            self.stale_until,
            self.age_at_store,
        ] {
            put_varint(&mut out, n);
        }
        put_varint(&mut out, self.headers.len() as u64);
        for (name, value) in &self.headers {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        put_bytes(&mut out, &self.body);
        out
    }

    /// The entry `bytes` encode; None for anything else (another version, a truncated or
    /// corrupt value, trailing bytes), never a panic.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Entry> {
        let mut r = Reader(bytes.strip_prefix(MAGIC)?.strip_prefix(&[VERSION])?);
        let key = String::from_utf8(r.bytes()?.to_vec()).ok()?;
        let status = u16::try_from(r.varint()?)
            .ok()
            .filter(|s| (100..=999).contains(s))?;
        let stored_at = r.varint()?;
        let fresh_until = r.varint()?;
        let stale_until = r.varint()?;
        let age_at_store = r.varint()?;
        if stale_until < fresh_until {
            return None;
        }
        let count = usize::try_from(r.varint()?).ok()?;
        // Each header takes at least 3 bytes (two lengths and a name's byte): a count the
        // rest cannot hold is refused before the map is sized by it.
        if count > r.0.len() / 3 {
            return None;
        }
        let mut headers = HeaderMap::try_with_capacity(count).ok()?;
        for _ in 0..count {
            let name = HeaderName::from_bytes(r.bytes()?).ok()?;
            let value = HeaderValue::from_bytes(r.bytes()?).ok()?;
            headers.try_append(name, value).ok()?;
        }
        let body = Bytes::copy_from_slice(r.bytes()?);
        if !r.0.is_empty() {
            return None;
        }
        Some(Entry {
            key,
            status,
            headers,
            body,
            stored_at,
            fresh_until,
            stale_until,
            age_at_store,
        })
    }

    /// The bytes it holds in memory, roughly: key, header names and values, body, and a
    /// fixed overhead per header and per entry.
    pub(crate) fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + HEADER_OVERHEAD)
            .sum();
        ENTRY_OVERHEAD + self.key.len() + headers + self.body.len()
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// What remains to decode.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A LEB128 varint of at most 10 bytes that fits in a u64.
    fn varint(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            let bits = u64::from(b & 0x7f);
            // The tenth byte holds bit 63 only.
            if i == 9 && bits > 1 {
                return None;
            }
            n |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    /// Length-prefixed bytes, the length checked against what remains.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    pub(crate) fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.append("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("cache-control", HeaderValue::from_static("max-age=60"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        headers.append("x-obs", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        Entry {
            key: "GET https://api.example/v1/models".to_owned(),
            status: 200,
            headers,
            body: Bytes::from_static(b"{\"data\":[]}"),
            stored_at: 1_780_000_000_000,
            fresh_until: 1_780_000_060_000,
            stale_until: 1_780_000_660_000,
            age_at_store: 3,
        }
    }

    #[test]
    fn round_trips_a_sample() {
        let e = sample();
        let bytes = e.encode();
        assert!(bytes.starts_with(b"RPCE\x01"));
        let back = Entry::decode(&bytes).unwrap();
        assert_eq!(back, e);
        let multi: Vec<_> = back.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert_eq!(Entry::decode(&bytes[..n]), None, "cut at {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Entry::decode(&longer), None);
    }

    #[test]
    fn another_version_or_magic_is_refused() {
        let mut bytes = sample().encode();
        bytes[4] = 2;
        assert_eq!(Entry::decode(&bytes), None);
        let mut bytes = sample().encode();
        bytes[0] = b'X';
        assert_eq!(Entry::decode(&bytes), None);
    }

    #[test]
    fn invalid_fields_are_refused() {
        let with = |f: &dyn Fn(&mut Entry)| {
            let mut e = sample();
            f(&mut e);
            Entry::decode(&e.encode())
        };
        assert_eq!(with(&|e| e.status = 99), None);
        assert_eq!(with(&|e| e.status = 1000), None);
        assert!(with(&|e| e.status = 100).is_some());
        assert!(with(&|e| e.status = 999).is_some());
        assert_eq!(with(&|e| e.stale_until = e.fresh_until - 1), None);
        assert!(with(&|e| e.stale_until = e.fresh_until).is_some());
        assert!(with(&|e| e.stored_at = u64::MAX).is_some());

        // A header name or value the http crate refuses, written by hand.
        let raw = |name: &[u8], value: &[u8]| {
            let mut out = b"RPCE\x01".to_vec();
            put_bytes(&mut out, b"k");
            for n in [200, 0, 0, 0, 0, 1] {
                put_varint(&mut out, n);
            }
            put_bytes(&mut out, name);
            put_bytes(&mut out, value);
            put_bytes(&mut out, b"");
            Entry::decode(&out)
        };
        assert!(raw(b"x-ok", b"fine").is_some());
        assert_eq!(raw(b"bad name", b"v"), None);
        assert_eq!(raw(b"", b"v"), None);
        assert_eq!(raw(b"x-a", b"line\r\nbreak"), None);
        assert_eq!(raw(b"x-a", b"nul\0"), None);

        // A key that is not UTF-8.
        let mut out = b"RPCE\x01".to_vec();
        put_bytes(&mut out, b"\xff");
        for n in [200, 0, 0, 0, 0, 0] {
            put_varint(&mut out, n);
        }
        put_bytes(&mut out, b"");
        assert_eq!(Entry::decode(&out), None);
    }

    #[test]
    fn huge_lengths_and_counts_are_refused_without_allocating() {
        let mut out = b"RPCE\x01".to_vec();
        put_varint(&mut out, u64::MAX);
        assert_eq!(Entry::decode(&out), None);

        let mut out = b"RPCE\x01".to_vec();
        put_bytes(&mut out, b"k");
        for n in [200, 0, 0, 0, 0, 1 << 40] {
            put_varint(&mut out, n);
        }
        assert_eq!(Entry::decode(&out), None);

        // An overlong varint (11 bytes) and one past u64.
        let mut r = Reader(&[0x80; 11]);
        assert_eq!(r.varint(), None);
        let mut r = Reader(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]);
        assert_eq!(r.varint(), None);
        let mut r = Reader(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(r.varint(), Some(u64::MAX));
    }

    #[test]
    fn weight_counts_key_headers_and_body() {
        let e = sample();
        let headers: usize = e
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        assert_eq!(
            e.weight(),
            128 + e.key.len() + headers + 5 * 64 + e.body.len()
        );
    }

    /// The fuzz corpus's valid seeds are today's encoding of `sample()` and of an empty
    /// entry, so the target's round trip starts from real entries. If the format changes,
    /// write them again: the failure message says what each file must hold.
    #[test]
    fn the_fuzz_seeds_are_todays_encoding() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/cache_entry");
        let mut empty = sample();
        empty.headers.clear();
        empty.body = Bytes::new();
        empty.key.clear();
        for (name, e) in [("sample", sample()), ("empty", empty)] {
            let path = dir.join(format!("seed-{name}"));
            let held = std::fs::read(&path).unwrap();
            assert_eq!(
                held,
                e.encode(),
                "{} is not today's encoding of the {name} entry: write e.encode() there",
                path.display()
            );
            assert_eq!(Entry::decode(&held), Some(e));
        }
    }

    fn header_name() -> impl Strategy<Value = HeaderName> {
        prop_oneof![
            Just(HeaderName::from_static("content-type")),
            Just(HeaderName::from_static("set-cookie")),
            "[a-z0-9-]{1,12}".prop_map(|s| HeaderName::from_bytes(s.as_bytes()).unwrap()),
        ]
    }

    fn header_value() -> impl Strategy<Value = HeaderValue> {
        // Visible ASCII, space, tab and obs-text: what a header value may hold.
        proptest::collection::vec(prop_oneof![0x20u8..0x7f, Just(b'\t'), 0x80u8..=0xff], 0..24)
            .prop_map(|b| HeaderValue::from_bytes(&b).unwrap())
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            ".{0,40}",
            100u16..=999,
            proptest::collection::vec((header_name(), header_value()), 0..12),
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<[u64; 3]>(),
            any::<u64>(),
        )
            .prop_map(|(key, status, pairs, body, [stored, fresh, extra], age)| {
                let mut headers = HeaderMap::new();
                for (n, v) in pairs {
                    headers.append(n, v);
                }
                Entry {
                    key,
                    status,
                    headers,
                    body: Bytes::from(body),
                    stored_at: stored,
                    fresh_until: fresh,
                    stale_until: fresh.saturating_add(extra),
                    age_at_store: age,
                }
            })
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(e in entry()) {
            prop_assert_eq!(Entry::decode(&e.encode()), Some(e));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut with_magic = b"RPCE\x01".to_vec();
            with_magic.extend_from_slice(&bytes);
            for b in [&bytes, &with_magic] {
                if let Some(e) = Entry::decode(b) {
                    prop_assert_eq!(Entry::decode(&e.encode()), Some(e));
                }
            }
        }
    }
}
