//! The RateLimit-Policy, RateLimit and X-RateLimit-* response fields. Built per request as
//! values, not as a header map of their own: building a map and merging it into the
//! response cost more than the decision itself (two allocations, five hashed inserts, then
//! five more and a rehash of the response's map).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header};

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The fields of one verdict, written into whatever answer the route gives: into the
/// response's head by rampart's HTTP/1.1 server (`write_head`, no header map involved), or
/// into its header map for the others (`write_to`).
#[derive(Debug, Default)]
pub(crate) struct RateLimitHeaders {
    /// RateLimit-Policy: the one policy's value, made once with the policy.
    policy: Option<HeaderValue>,
    /// RateLimit-Policy when several policies spoke: their items joined.
    policies: Vec<u8>,
    /// The RateLimit field's items, empty when no policy added one.
    limit: Vec<u8>,
    /// X-RateLimit-Limit, -Remaining, -Reset: the numbers of the policy closest to refusing.
    x: Option<[u64; 3]>,
    close: bool,
}

/// The names of the fields, in the order they are written.
static NAMES: [&HeaderName; 5] = [
    &RATELIMIT_POLICY,
    &RATELIMIT,
    &X_LIMIT,
    &X_REMAINING,
    &X_RESET,
];

impl RateLimitHeaders {
    /// Adds `Connection: close` (a refused request's unread body would otherwise be parsed
    /// as the next request).
    pub(crate) fn close_connection(&mut self) {
        self.close = true;
    }

    /// Whether the answer must close its connection (`close_connection`).
    pub(crate) fn closes(&self) -> bool {
        self.close
    }

    /// Into a header map, replacing the answer's own fields of these names.
    pub(crate) fn write_to(self, map: &mut HeaderMap) {
        let policy = match self.policy {
            Some(v) => Some(v),
            None => owned_value(self.policies),
        };
        // The RateLimit field and the three X-RateLimit numbers share one buffer, each
        // value a slice of it: two allocations (the string, then the count the slices
        // share) where a value each took two (`HeaderValue::from(u64)`).
        let mut text = self.limit;
        let limit_end = text.len();
        let mut ends = [limit_end; 3];
        if let Some(numbers) = self.x {
            for (end, n) in ends.iter_mut().zip(numbers) {
                push_decimal(&mut text, n);
                *end = text.len();
            }
        }
        let all = bytes::Bytes::from(text);
        // An empty span (no policy added) is no value.
        let value = |from: usize, to: usize| {
            HeaderValue::from_maybe_shared(all.slice(from..to))
                .ok()
                .filter(|_| to > from)
        };
        let x = match (
            value(limit_end, ends[0]),
            value(ends[0], ends[1]),
            value(ends[1], ends[2]),
        ) {
            (Some(l), Some(r), Some(t)) => [Some(l), Some(r), Some(t)],
            _ => [None, None, None],
        };
        let [x_limit, x_remaining, x_reset] = x;
        let values = [policy, value(0, limit_end), x_limit, x_remaining, x_reset];
        map.reserve(values.len() + 1);
        for (name, value) in NAMES.into_iter().zip(values) {
            if let Some(value) = value {
                map.insert(name.clone(), value);
            }
        }
        if self.close {
            map.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }

    /// Whether the answer's own field `name` is one of these (which replace it).
    pub(crate) fn replaces(name: &HeaderName) -> bool {
        let s = name.as_str();
        // Most names are ruled out by their length and first letter, before any compare.
        matches!(s.len(), 9 | 16 | 17 | 21)
            && matches!(s.as_bytes().first(), Some(b'r' | b'x'))
            && NAMES.iter().any(|n| n.as_str() == s)
    }

    /// As head lines (`name: value` CRLF): what `write_to` would put in the map, without
    /// the map (`Connection: close` excepted: answers that close keep to the map, where
    /// the server sees it). A value that could not be a field value is left out, as
    /// `write_to` leaves it out.
    pub(crate) fn write_head(&self, dst: &mut Vec<u8>) {
        let policy = match &self.policy {
            Some(v) => v.as_bytes(),
            None => &self.policies,
        };
        line(dst, b"ratelimit-policy: ", policy);
        line(dst, b"ratelimit: ", &self.limit);
        if let Some(numbers) = self.x {
            let starts: [&[u8]; 3] = [
                b"x-ratelimit-limit: ",
                b"x-ratelimit-remaining: ",
                b"x-ratelimit-reset: ",
            ];
            for (start, n) in starts.into_iter().zip(numbers) {
                // Digits are always a field value: no check.
                let mut buf = [0u8; 20];
                let digits = crate::text::digits::<10>(n, &mut buf);
                dst.reserve(start.len() + digits.len() + 2);
                dst.extend_from_slice(start);
                dst.extend_from_slice(digits);
                dst.extend_from_slice(b"\r\n");
            }
        }
    }

    /// As a map of their own (tests).
    #[cfg(test)]
    pub(crate) fn into_map(self) -> HeaderMap {
        let mut map = HeaderMap::new();
        self.write_to(&mut map);
        map
    }
}

/// One head line (`start` is the name and ": ", as `NAMES` spells it), unless `value` is
/// empty or not a field value (RFC 9110 5.5: visible ASCII, spaces and tabs; here, names
/// and numbers of rampart's own making).
fn line(dst: &mut Vec<u8>, start: &[u8], value: &[u8]) {
    // Every byte looked at, no early exit: the compiler can then check several at once.
    let valid = value.iter().fold(true, |ok, &b| {
        ok & (b == b'\t' || (b' '..=b'~').contains(&b))
    });
    if value.is_empty() || !valid {
        return;
    }
    dst.reserve(start.len() + value.len() + 2);
    dst.extend_from_slice(start);
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

/// The fields as the decisions of one request fill them.
#[derive(Default)]
pub(super) struct Fields {
    /// RateLimit-Policy: the one policy's item made once with the policy, or the items of
    /// several joined.
    pub(super) policy: Option<HeaderValue>,
    pub(super) policies: Vec<u8>,
    limit: Vec<u8>,
    /// The policy closest to refusing speaks for the X-RateLimit-* headers.
    tightest: Option<(u64, u64, Duration)>,
    pub(super) retry: Option<Duration>,
}

impl Fields {
    pub(super) fn new() -> Fields {
        Fields {
            // Room for one policy's `"name";r=N;t=N` and the X-RateLimit numbers (`headers`)
            // without growing.
            limit: Vec::with_capacity(96),
            ..Fields::default()
        }
    }

    /// One more policy's RateLimit-Policy item: `value` is `item` as a header value.
    pub(super) fn add_policy(&mut self, item: &str, value: &HeaderValue) {
        match self.policy.take() {
            None if self.policies.is_empty() => self.policy = Some(value.clone()),
            first => {
                if let Some(first) = first {
                    self.policies.extend_from_slice(first.as_bytes());
                }
                self.policies.extend_from_slice(b", ");
                self.policies.extend_from_slice(item.as_bytes());
            }
        }
    }

    /// One more policy's RateLimit item; `quoted` is its name as a structured-field string
    /// (`quoted_name`, made once with the policy).
    pub(super) fn add(&mut self, quoted: &[u8], points: u64, remaining: u64, reset: Duration) {
        if !self.limit.is_empty() {
            self.limit.extend_from_slice(b", ");
        }
        // Bytes by hand: the formatting machinery, or pushing chars into a String, costs
        // more than the rest of the decision.
        self.limit.extend_from_slice(quoted);
        self.limit.extend_from_slice(b";r=");
        push_decimal(&mut self.limit, remaining);
        self.limit.extend_from_slice(b";t=");
        push_decimal(&mut self.limit, ceil_secs(reset));
        let tighter = self.tightest.is_none_or(|(_, least, _)| remaining < least);
        if tighter {
            self.tightest = Some((points, remaining, reset));
        }
    }

    pub(super) fn refuse(&mut self, retry_after: Duration) {
        self.retry = Some(self.retry.map_or(retry_after, |r| r.max(retry_after)));
    }

    pub(super) fn headers(self) -> RateLimitHeaders {
        RateLimitHeaders {
            policy: self.policy,
            policies: self.policies,
            limit: self.limit,
            x: self
                .tightest
                .map(|(points, remaining, reset)| [points, remaining, ceil_secs(reset)]),
            close: false,
        }
    }
}

/// The buffer itself as the value (no copy); None when it is not a valid value.
fn owned_value(s: Vec<u8>) -> Option<HeaderValue> {
    if s.is_empty() {
        return None;
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(s)).ok()
}

pub(super) fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut buf = [0u8; 20];
    out.extend_from_slice(crate::text::digits::<10>(n, &mut buf));
}

pub(super) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A structured-field string (RFC 8941): policy names are `[A-Za-z0-9_-]`, so quoting
/// is all it takes, but escape anyway.
pub(super) fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A policy name as a structured-field string, made once with the policy (`Fields::add`).
pub(super) fn quoted_name(name: &str) -> Box<[u8]> {
    let mut s = String::with_capacity(name.len() + 2);
    push_sf_string(&mut s, name);
    s.into_bytes().into_boxed_slice()
}
