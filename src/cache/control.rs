//! Cache-Control as a shared cache reads it (RFC 9111, and `stale-if-error` from RFC 5861):
//! what a request asks of the cache, and whether and for how long a response may be stored.
//!
//! Header values are read as bytes: a line with obs-text or other garbage still yields the
//! directives it spells, and what it does not spell is ignored.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use http::header::{AGE, CACHE_CONTROL, CONTENT_TYPE, DATE, EXPIRES, PRAGMA, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderValue};

/// Freshness lifetimes and stale allowances are clamped to this (RFC 9111 1.2.2: a cache
/// treats a larger delta-seconds as 2^31).
const MAX_SECS: u64 = 1 << 31;

/// What a request's Cache-Control (or, without one, Pragma) asks of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RequestDirectives {
    /// `no-store`: do not store the response to this request.
    pub no_store: bool,
    /// `no-cache`, `max-age=0` or `Pragma: no-cache`: do not answer from the cache without
    /// going upstream.
    pub no_cache: bool,
    /// `only-if-cached`: answer from the cache or with 504.
    pub only_if_cached: bool,
}

/// The request's directives; every Cache-Control line counts.
pub(crate) fn request_directives(headers: &HeaderMap) -> RequestDirectives {
    let mut d = RequestDirectives::default();
    each_directive(headers.get_all(CACHE_CONTROL), |name, arg| {
        if name.eq_ignore_ascii_case(b"no-cache") {
            d.no_cache = true;
        } else if name.eq_ignore_ascii_case(b"no-store") {
            d.no_store = true;
        } else if name.eq_ignore_ascii_case(b"only-if-cached") {
            d.only_if_cached = true;
        } else if name.eq_ignore_ascii_case(b"max-age")
            && arg.as_deref().and_then(delta_seconds) == Some(0)
        {
            d.no_cache = true;
        }
    });
    // RFC 9111 5.4: Pragma counts only when the request has no Cache-Control.
    if !headers.contains_key(CACHE_CONTROL) {
        each_directive(headers.get_all(PRAGMA), |name, _| {
            if name.eq_ignore_ascii_case(b"no-cache") {
                d.no_cache = true;
            }
        });
    }
    d
}

/// Whether a response may be stored, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storable {
    /// Not stored; a short reason for the logs.
    No(&'static str),
    Yes {
        /// How long from now the response is fresh (its lifetime less its Age); never zero,
        /// at most 2^31 s.
        fresh_for: Duration,
        /// How long past freshness it may answer when the upstream fails.
        stale_if_error: StaleRule,
    },
}

/// How long a stored response may answer, stale, when the upstream fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StaleRule {
    /// The response says nothing: the policy's `stale_if_error` applies.
    Policy,
    /// Never: `must-revalidate`, `proxy-revalidate`, or `s-maxage` without a
    /// `stale-if-error` (it implies proxy-revalidate for a shared cache, RFC 9111 5.2.2.10).
    Never,
    /// The response's own `stale-if-error=N` (at most 2^31 s).
    For(Duration),
}

/// Statuses a cache may store without explicit freshness (RFC 9110 15.1); 206 is left out
/// because the cache does not combine partial content.
const HEURISTIC_STATUSES: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Whether a response with `status` and `headers` may be stored by a shared cache whose
/// policy varies on `vary` (lowercased names) and gives `ttl` when the response states no
/// freshness; `now` stands in for a missing Date. The first rule that fails gives the reason.
pub(crate) fn storable(
    status: u16,
    headers: &HeaderMap,
    ttl: Duration,
    vary: &[String],
    now: SystemTime,
) -> Storable {
    if !HEURISTIC_STATUSES.contains(&status) {
        return Storable::No("status");
    }
    if headers.get_all(CONTENT_TYPE).iter().any(is_event_stream) {
        return Storable::No("event-stream");
    }
    if headers.contains_key(SET_COOKIE) {
        return Storable::No("set-cookie");
    }
    let cc = ResponseDirectives::parse(headers);
    if cc.no_store {
        return Storable::No("no-store");
    }
    if cc.private {
        return Storable::No("private");
    }
    if cc.no_cache {
        return Storable::No("no-cache");
    }
    if let Some(reason) = vary_refusal(headers, vary) {
        return Storable::No(reason);
    }
    if cc.s_maxage == Seconds::Invalid {
        return Storable::No("invalid s-maxage");
    }
    if cc.max_age == Seconds::Invalid {
        return Storable::No("invalid max-age");
    }
    let max = Duration::from_secs(MAX_SECS);
    // RFC 9111 4.2.1: conflicting duplicates make the response stale.
    let lifetime = match (cc.s_maxage, cc.max_age) {
        (Seconds::Set(n), _) | (Seconds::Absent, Seconds::Set(n)) => Duration::from_secs(n),
        (Seconds::Absent, Seconds::Absent) => expires_lifetime(headers, now).unwrap_or(ttl),
        _ => Duration::ZERO,
    }
    .min(max);
    let fresh_for = lifetime.saturating_sub(Duration::from_secs(age_secs(headers)));
    if fresh_for.is_zero() {
        return Storable::No("stale on arrival");
    }
    // `s-maxage` implies proxy-revalidate (RFC 9111 5.2.2.10), unless the response also
    // allows stale answers on errors in so many words (RFC 5861 4: "regardless of other
    // freshness information"); `must-revalidate` and `proxy-revalidate` always win.
    let stale_if_error = match cc.stale_if_error {
        _ if cc.must_revalidate => StaleRule::Never,
        Seconds::Set(n) => StaleRule::For(Duration::from_secs(n)),
        _ if cc.s_maxage != Seconds::Absent => StaleRule::Never,
        _ => StaleRule::Policy,
    };
    Storable::Yes {
        fresh_for,
        stale_if_error,
    }
}

/// The response's Age header in seconds: 0 when absent or invalid, saturating when huge.
pub(crate) fn age_secs(headers: &HeaderMap) -> u64 {
    headers
        .get(AGE)
        .map(|v| trim_ows(v.as_bytes()))
        .filter(|v| !v.is_empty() && v.iter().all(u8::is_ascii_digit))
        .map_or(0, |v| {
            v.iter().fold(0u64, |n, d| {
                n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
            })
        })
}

/// A delta-seconds directive argument across duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seconds {
    Absent,
    Set(u64),
    /// Present more than once with different values.
    Conflict,
    /// Present with an argument that is not delta-seconds (sticky).
    Invalid,
}

impl Seconds {
    fn add(self, arg: Option<&[u8]>) -> Seconds {
        match (self, arg.and_then(delta_seconds)) {
            (Seconds::Invalid, _) | (_, None) => Seconds::Invalid,
            (Seconds::Absent, Some(n)) => Seconds::Set(n),
            (Seconds::Set(m), Some(n)) if m == n => self,
            _ => Seconds::Conflict,
        }
    }
}

/// The response directives `storable` reads.
#[derive(Debug)]
struct ResponseDirectives {
    no_store: bool,
    private: bool,
    no_cache: bool,
    /// `must-revalidate` or `proxy-revalidate`.
    must_revalidate: bool,
    s_maxage: Seconds,
    max_age: Seconds,
    stale_if_error: Seconds,
}

impl ResponseDirectives {
    fn parse(headers: &HeaderMap) -> ResponseDirectives {
        let mut d = ResponseDirectives {
            no_store: false,
            private: false,
            no_cache: false,
            must_revalidate: false,
            s_maxage: Seconds::Absent,
            max_age: Seconds::Absent,
            stale_if_error: Seconds::Absent,
        };
        each_directive(headers.get_all(CACHE_CONTROL), |name, arg| {
            let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
            if is("no-store") {
                d.no_store = true;
            } else if is("private") {
                // A field-name list limits it to those fields; not storing at all is simpler
                // and safe.
                d.private = true;
            } else if is("no-cache") {
                d.no_cache = true;
            } else if is("must-revalidate") || is("proxy-revalidate") {
                d.must_revalidate = true;
            } else if is("s-maxage") {
                d.s_maxage = d.s_maxage.add(arg.as_deref());
            } else if is("max-age") {
                d.max_age = d.max_age.add(arg.as_deref());
            } else if is("stale-if-error") {
                d.stale_if_error = d.stale_if_error.add(arg.as_deref());
            }
        });
        d
    }
}

/// Why the response's Vary rules it out, if it does: `*`, or a field the policy does not
/// split entries on.
fn vary_refusal(headers: &HeaderMap, vary: &[String]) -> Option<&'static str> {
    let lines = headers.get_all(VARY);
    let elements = || {
        lines
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(trim_ows)
            .filter(|e| !e.is_empty())
    };
    if elements().any(|e| e == b"*") {
        return Some("vary *");
    }
    let known = |e: &[u8]| vary.iter().any(|v| e.eq_ignore_ascii_case(v.as_bytes()));
    if elements().all(known) {
        None
    } else {
        Some("vary")
    }
}

/// Expires minus Date (or `now` without a valid Date); zero for an Expires that does not
/// parse or for lines that disagree (RFC 9111 5.3: invalid means already expired). None
/// without Expires.
fn expires_lifetime(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let mut lines = headers.get_all(EXPIRES).iter();
    let first = lines.next()?;
    if lines.any(|v| v != first) {
        return Some(Duration::ZERO);
    }
    let Some(expires) = first.to_str().ok().and_then(parse_http_date) else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date)
        .unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// `text/event-stream`, any case, any parameters: a stream is never stored.
fn is_event_stream(v: &HeaderValue) -> bool {
    let media = v.as_bytes().split(|&b| b == b';').next().unwrap_or(b"");
    trim_ows(media).eq_ignore_ascii_case(b"text/event-stream")
}

/// A delta-seconds argument (RFC 9111 1.2.2), clamped to 2^31; None unless all digits.
fn delta_seconds(arg: &[u8]) -> Option<u64> {
    if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = arg.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some(n.min(MAX_SECS))
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s
        && is_ows(*first)
    {
        s = rest;
    }
    while let [rest @ .., last] = s
        && is_ows(*last)
    {
        s = rest;
    }
    s
}

/// Calls `f` with each directive's name and argument (unquoted, escapes undone) in the
/// comma-separated lists of `lines` (RFC 9110 5.6.1, 5.6.4). What follows a directive up
/// to the next comma outside quotes is ignored, so garbage costs only its own directive.
fn each_directive<'a>(
    lines: impl IntoIterator<Item = &'a HeaderValue>,
    mut f: impl FnMut(&[u8], Option<Cow<'_, [u8]>>),
) {
    for line in lines {
        let s = line.as_bytes();
        let mut i = 0;
        while i < s.len() {
            while i < s.len() && (is_ows(s[i]) || s[i] == b',') {
                i += 1;
            }
            let start = i;
            while i < s.len() && !matches!(s[i], b'=' | b',' | b' ' | b'\t') {
                i += 1;
            }
            let name = &s[start..i];
            while i < s.len() && is_ows(s[i]) {
                i += 1;
            }
            let mut arg = None;
            if s.get(i) == Some(&b'=') {
                i += 1;
                while i < s.len() && is_ows(s[i]) {
                    i += 1;
                }
                if s.get(i) == Some(&b'"') {
                    let (value, end) = quoted(s, i);
                    arg = Some(value);
                    i = end;
                } else {
                    let from = i;
                    while i < s.len() && !matches!(s[i], b',' | b' ' | b'\t') {
                        i += 1;
                    }
                    arg = Some(Cow::Borrowed(&s[from..i]));
                }
            }
            // Skip to the next separator, past any quoted string in the way.
            while i < s.len() && s[i] != b',' {
                i = if s[i] == b'"' { quoted(s, i).1 } else { i + 1 };
            }
            if !name.is_empty() {
                f(name, arg);
            }
        }
    }
}

/// The quoted string starting at `s[at]` (a `"`), unescaped, and the index after its
/// closing quote (or the end of `s` when it is not closed).
fn quoted(s: &[u8], at: usize) -> (Cow<'_, [u8]>, usize) {
    let body = at + 1;
    let mut i = body;
    let mut unescaped: Option<Vec<u8>> = None;
    while i < s.len() {
        match s[i] {
            b'"' => break,
            b'\\' => {
                let v = unescaped.get_or_insert_with(|| s[body..i].to_vec());
                if let Some(&c) = s.get(i + 1) {
                    v.push(c);
                }
                i += 2;
            }
            c => {
                if let Some(v) = unescaped.as_mut() {
                    v.push(c);
                }
                i += 1;
            }
        }
    }
    let end = (i + 1).min(s.len());
    let value = match unescaped {
        Some(v) => Cow::Owned(v),
        None => Cow::Borrowed(&s[body..i.min(s.len())]),
    };
    (value, end)
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const LONG_DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// An HTTP-date (RFC 9110 5.6.7): IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) and the two
/// obsolete forms, RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`, years below 70 in the 2000s)
/// and asctime (`Sun Nov  6 08:49:37 1994`). The weekday must be a weekday's name; it is
/// not checked against the date.
pub(crate) fn parse_http_date(s: &str) -> Option<SystemTime> {
    let s = s.trim_matches([' ', '\t']);
    let b = s.as_bytes();
    let (year, month, day, time) = if b.len() == 29 && b.get(3) == Some(&b',') {
        // IMF-fixdate.
        if !DAYS.contains(&s.get(..3)?) || &b[25..] != b" GMT" {
            return None;
        }
        sep(b, &[4, 7, 11, 16], b' ')?;
        (
            digits(&b[12..16])?,
            month(&b[8..11])?,
            digits(&b[5..7])?,
            &b[17..25],
        )
    } else if let Some((weekday, rest)) = s.split_once(',') {
        // RFC 850.
        let r = rest.as_bytes();
        if !LONG_DAYS.contains(&weekday) || r.len() != 23 || &r[19..] != b" GMT" {
            return None;
        }
        sep(r, &[0, 10], b' ')?;
        sep(r, &[3, 7], b'-')?;
        let yy = digits(&r[8..10])?;
        let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
        (year, month(&r[4..7])?, digits(&r[1..3])?, &r[11..19])
    } else if b.len() == 24 {
        // asctime: the day is space-padded.
        if !DAYS.contains(&s.get(..3)?) {
            return None;
        }
        sep(b, &[3, 7, 10, 19], b' ')?;
        let day = if b[8] == b' ' { &b[9..10] } else { &b[8..10] };
        (
            digits(&b[20..24])?,
            month(&b[4..7])?,
            digits(day)?,
            &b[11..19],
        )
    } else {
        return None;
    };
    sep(time, &[2, 5], b':')?;
    let (h, m, sec) = (
        digits(&time[..2])?,
        digits(&time[3..5])?,
        digits(&time[6..])?,
    );
    // Second 60 is a leap second.
    if h > 23 || m > 59 || sec > 60 || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + (h * 3600 + m * 60 + sec) as i64;
    match u64::try_from(secs) {
        Ok(after) => SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(after)),
        Err(_) => SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs())),
    }
}

/// Some when every position in `at` holds `c`.
fn sep(b: &[u8], at: &[usize], c: u8) -> Option<()> {
    at.iter().all(|&i| b.get(i) == Some(&c)).then_some(())
}

/// The value of 1 to 4 ASCII digits.
fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || b.len() > 4 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

/// 1-12 for a month's three-letter name (case-sensitive, as the grammar says).
fn month(b: &[u8]) -> Option<u32> {
    let i = MONTHS.iter().position(|m| m.as_slice() == b)?;
    u32::try_from(i + 1).ok()
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the date (proleptic Gregorian; H. Hinnant's algorithm).
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
