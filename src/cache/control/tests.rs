use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

use super::*;

fn map(lines: &[(&str, &[u8])]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (name, value) in lines {
        m.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    m
}

fn req(lines: &[(&str, &[u8])]) -> RequestDirectives {
    request_directives(&map(lines))
}

const TTL: Duration = Duration::from_secs(3600);

/// 2026-12-06 17:40:00 UTC, a Sunday.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_796_578_800)
}

fn store(lines: &[(&str, &[u8])]) -> Storable {
    storable(200, &map(lines), TTL, &[], now())
}

fn fresh(secs: u64) -> Storable {
    Storable::Yes {
        fresh_for: Duration::from_secs(secs),
        stale_if_error: StaleRule::Policy,
    }
}

fn fresh_for(s: Storable) -> Option<Duration> {
    match s {
        Storable::Yes { fresh_for, .. } => Some(fresh_for),
        Storable::No(_) => None,
    }
}

fn stale_rule(s: Storable) -> Option<StaleRule> {
    match s {
        Storable::Yes { stale_if_error, .. } => Some(stale_if_error),
        Storable::No(_) => None,
    }
}

#[test]
fn request_no_cache_no_store_only_if_cached() {
    let cc = "cache-control";
    assert_eq!(req(&[]), RequestDirectives::default());
    assert!(req(&[(cc, b"no-cache")]).no_cache);
    assert!(req(&[(cc, b"NO-CACHE")]).no_cache);
    assert!(req(&[(cc, b"max-age=0")]).no_cache);
    assert!(req(&[(cc, b"max-age=\"0\"")]).no_cache);
    assert!(req(&[(cc, b"max-age=000")]).no_cache);
    assert!(!req(&[(cc, b"max-age=1")]).no_cache);
    assert!(!req(&[(cc, b"max-age=")]).no_cache);
    assert!(!req(&[(cc, b"max-age=0x")]).no_cache);
    assert!(req(&[(cc, b"no-store")]).no_store);
    assert!(req(&[(cc, b"only-if-cached")]).only_if_cached);
    assert_eq!(
        req(&[(cc, b"  No-Store ,, Only-If-Cached,no-cache  ")]),
        RequestDirectives {
            no_store: true,
            no_cache: true,
            only_if_cached: true
        }
    );
    // Several lines, unknown directives and arguments.
    assert_eq!(
        req(&[
            (cc, b"foo=bar"),
            (cc, b"x, no-store"),
            (cc, b"only-if-cached")
        ]),
        RequestDirectives {
            no_store: true,
            no_cache: false,
            only_if_cached: true
        }
    );
    assert_eq!(
        req(&[(cc, b"no-cachex, xno-store")]),
        RequestDirectives::default()
    );
}

#[test]
fn request_pragma_counts_only_without_cache_control() {
    assert!(req(&[("pragma", b"no-cache")]).no_cache);
    assert!(req(&[("pragma", b"foo, No-Cache")]).no_cache);
    assert!(!req(&[("pragma", b"no-store")]).no_cache);
    assert!(!req(&[("pragma", b"no-cache"), ("cache-control", b"max-age=10")]).no_cache);
    // A Cache-Control line that says nothing still overrides Pragma (RFC 9111 5.4).
    assert!(!req(&[("pragma", b"no-cache"), ("cache-control", b"\xff\xfe")]).no_cache);
}

#[test]
fn quoted_arguments_hide_their_commas() {
    let cc = "cache-control";
    assert_eq!(
        req(&[(cc, b"foo=\"a, no-store, b\"")]),
        RequestDirectives::default()
    );
    assert_eq!(
        req(&[(cc, b"foo=\"a\\\", no-store\", no-cache")]),
        RequestDirectives {
            no_cache: true,
            ..RequestDirectives::default()
        }
    );
    // Junk after a directive, quotes included, is skipped up to the next real comma.
    assert_eq!(
        req(&[(cc, b"foo bar \"x, no-store\" , no-cache")]),
        RequestDirectives {
            no_cache: true,
            ..RequestDirectives::default()
        }
    );
    // An unterminated quote runs to the end of its line, not into the next one.
    assert_eq!(
        req(&[(cc, b"foo=\"a, no-store"), (cc, b"only-if-cached")]),
        RequestDirectives {
            only_if_cached: true,
            ..RequestDirectives::default()
        }
    );
    // A trailing backslash.
    assert_eq!(req(&[(cc, b"foo=\"a\\")]), RequestDirectives::default());
}

#[test]
fn garbage_bytes_cost_only_their_directive() {
    let cc = "cache-control";
    assert_eq!(
        req(&[(cc, b"\xff\x80=\xfe, no-store, caf\xe9")]),
        RequestDirectives {
            no_store: true,
            ..RequestDirectives::default()
        }
    );
    assert_eq!(
        store(&[("cache-control", b"\xe9\xe9, max-age=60")]),
        fresh(60)
    );
    assert_eq!(
        store(&[("cache-control", b"max-age=6\xe9")]),
        Storable::No("invalid max-age")
    );
}

#[test]
fn status_must_be_heuristically_cacheable() {
    let m = HeaderMap::new();
    for s in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
        assert_eq!(storable(s, &m, TTL, &[], now()), fresh(3600), "{s}");
    }
    for s in [
        100, 201, 206, 302, 303, 304, 307, 400, 401, 403, 500, 502, 503, 504,
    ] {
        assert_eq!(
            storable(s, &m, TTL, &[], now()),
            Storable::No("status"),
            "{s}"
        );
    }
}

#[test]
fn event_streams_and_cookies_are_not_stored() {
    let no = Storable::No("event-stream");
    assert_eq!(store(&[("content-type", b"text/event-stream")]), no);
    assert_eq!(
        store(&[("content-type", b"Text/Event-Stream; charset=utf-8")]),
        no
    );
    assert_eq!(store(&[("content-type", b" text/event-stream ;x=1")]), no);
    assert_eq!(
        store(&[
            ("content-type", b"application/json"),
            ("content-type", b"text/event-stream")
        ]),
        no
    );
    assert_eq!(
        store(&[("content-type", b"text/event-streams")]),
        fresh(3600)
    );
    assert_eq!(store(&[("content-type", b"application/json")]), fresh(3600));
    assert_eq!(store(&[("set-cookie", b"a=b")]), Storable::No("set-cookie"));
    assert_eq!(store(&[("set-cookie", b"")]), Storable::No("set-cookie"));
}

#[test]
fn no_store_private_and_no_cache_refuse_with_or_without_arguments() {
    let cc = "cache-control";
    assert_eq!(store(&[(cc, b"no-store")]), Storable::No("no-store"));
    assert_eq!(
        store(&[(cc, b"max-age=60, NO-STORE")]),
        Storable::No("no-store")
    );
    assert_eq!(
        store(&[(cc, b"public"), (cc, b"no-store")]),
        Storable::No("no-store")
    );
    assert_eq!(store(&[(cc, b"private")]), Storable::No("private"));
    assert_eq!(
        store(&[(cc, b"private=\"set-cookie, x-user\"")]),
        Storable::No("private")
    );
    assert_eq!(
        store(&[(cc, b"Private=x-user, s-maxage=60")]),
        Storable::No("private")
    );
    assert_eq!(store(&[(cc, b"no-cache")]), Storable::No("no-cache"));
    assert_eq!(
        store(&[(cc, b"no-cache=\"x-a, x-b\", max-age=60")]),
        Storable::No("no-cache")
    );
    // The first rule that fails names the reason.
    assert_eq!(
        store(&[(cc, b"no-cache, private, no-store")]),
        Storable::No("no-store")
    );
    assert_eq!(
        storable(206, &map(&[(cc, b"no-store")]), TTL, &[], now()),
        Storable::No("status")
    );
    // Pragma on a response means nothing.
    assert_eq!(store(&[("pragma", b"no-cache")]), fresh(3600));
}

#[test]
fn vary_must_be_covered_by_the_policy() {
    let policy = ["accept-language".to_owned(), "authorization".to_owned()];
    let s = |lines: &[(&str, &[u8])]| storable(200, &map(lines), TTL, &policy, now());
    assert_eq!(s(&[("vary", b"Accept-Language")]), fresh(3600));
    assert_eq!(
        s(&[("vary", b"accept-language, AUTHORIZATION")]),
        fresh(3600)
    );
    assert_eq!(
        s(&[("vary", b"accept-language"), ("vary", b" authorization ,")]),
        fresh(3600)
    );
    assert_eq!(s(&[("vary", b"")]), fresh(3600));
    assert_eq!(
        s(&[("vary", b"accept-language, cookie")]),
        Storable::No("vary")
    );
    assert_eq!(
        s(&[("vary", b"accept-language"), ("vary", b"origin")]),
        Storable::No("vary")
    );
    assert_eq!(s(&[("vary", b"accept-langu\xe9ge")]), Storable::No("vary"));
    assert_eq!(s(&[("vary", b"*")]), Storable::No("vary *"));
    assert_eq!(
        s(&[("vary", b"cookie"), ("vary", b" * ")]),
        Storable::No("vary *")
    );
    assert_eq!(store(&[("vary", b"accept-language")]), Storable::No("vary"));
}

#[test]
fn s_maxage_wins_over_max_age_over_expires_over_ttl() {
    let cc = "cache-control";
    let expires: &[u8] = b"Sun, 06 Dec 2026 18:40:00 GMT";
    let date: &[u8] = b"Sun, 06 Dec 2026 17:40:00 GMT";
    assert_eq!(
        fresh_for(store(&[
            (cc, b"max-age=60, s-maxage=30"),
            ("expires", expires)
        ])),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        store(&[(cc, b"max-age=60"), ("expires", expires)]),
        fresh(60)
    );
    assert_eq!(store(&[(cc, b"max-age=\"60\"")]), fresh(60));
    assert_eq!(store(&[(cc, b"MAX-AGE = 60")]), fresh(60));
    assert_eq!(store(&[("expires", expires), ("date", date)]), fresh(3600));
    assert_eq!(store(&[]), fresh(3600));
    assert_eq!(
        storable(200, &HeaderMap::new(), Duration::from_secs(5), &[], now()),
        fresh(5)
    );
}

#[test]
fn expires_is_measured_from_date_or_now() {
    let expires: &[u8] = b"Sun, 06 Dec 2026 18:40:00 GMT";
    // Date an hour before now: the lifetime is two hours.
    assert_eq!(
        store(&[
            ("expires", expires),
            ("date", b"Sun, 06 Dec 2026 16:40:00 GMT")
        ]),
        fresh(7200)
    );
    // No Date, or one that does not parse: from now.
    assert_eq!(store(&[("expires", expires)]), fresh(3600));
    assert_eq!(
        store(&[("expires", expires), ("date", b"yesterday")]),
        fresh(3600)
    );
    // In the past, unparsable (`0`, the classic) or conflicting: already expired.
    let stale = Storable::No("stale on arrival");
    assert_eq!(
        store(&[("expires", b"Sun, 06 Dec 2026 17:39:59 GMT")]),
        stale
    );
    assert_eq!(store(&[("expires", b"0")]), stale);
    assert_eq!(store(&[("expires", b"\xff")]), stale);
    assert_eq!(
        store(&[
            ("expires", expires),
            ("expires", b"Sun, 06 Dec 2026 19:40:00 GMT")
        ]),
        stale
    );
    assert_eq!(
        store(&[("expires", expires), ("expires", expires)]),
        fresh(3600)
    );
    // Sub-second precision of `now` carries into the lifetime.
    let later = now() + Duration::from_millis(250);
    assert_eq!(
        fresh_for(storable(
            200,
            &map(&[("expires", expires)]),
            TTL,
            &[],
            later
        )),
        Some(Duration::from_millis(3_599_750))
    );
}

#[test]
fn invalid_or_conflicting_max_age() {
    let cc = "cache-control";
    for bad in [
        &b"max-age"[..],
        b"max-age=",
        b"max-age=-1",
        b"max-age=1.5",
        b"max-age=60s",
        b"max-age=\"\"",
    ] {
        assert_eq!(
            store(&[(cc, bad)]),
            Storable::No("invalid max-age"),
            "{bad:?}"
        );
    }
    assert_eq!(
        store(&[(cc, b"s-maxage=x")]),
        Storable::No("invalid s-maxage")
    );
    // Invalid even when s-maxage would have won.
    assert_eq!(
        store(&[(cc, b"s-maxage=60, max-age=x")]),
        Storable::No("invalid max-age")
    );
    // Duplicates: equal is fine, different is stale (RFC 9111 4.2.1).
    assert_eq!(
        store(&[(cc, b"max-age=60"), (cc, b"max-age=60")]),
        fresh(60)
    );
    assert_eq!(
        store(&[(cc, b"max-age=60, max-age=61")]),
        Storable::No("stale on arrival")
    );
    assert_eq!(
        store(&[(cc, b"s-maxage=60, s-maxage=61, max-age=100")]),
        Storable::No("stale on arrival")
    );
    assert_eq!(
        store(&[(cc, b"max-age=60, max-age=x")]),
        Storable::No("invalid max-age")
    );
    assert_eq!(
        store(&[(cc, b"max-age=0")]),
        Storable::No("stale on arrival")
    );
}

#[test]
fn huge_lifetimes_clamp_to_two_to_the_31() {
    let cc = "cache-control";
    let max = Some(Duration::from_secs(1 << 31));
    assert_eq!(
        fresh_for(store(&[(cc, b"max-age=99999999999999999999999999")])),
        max
    );
    assert_eq!(fresh_for(store(&[(cc, b"max-age=2147483649")])), max);
    assert_eq!(
        fresh_for(store(&[(cc, b"s-maxage=2147483647")])),
        Some(Duration::from_secs((1 << 31) - 1))
    );
    assert_eq!(
        fresh_for(store(&[("expires", b"Fri, 31 Dec 9999 23:59:59 GMT")])),
        max
    );
    assert_eq!(
        fresh_for(storable(200, &HeaderMap::new(), Duration::MAX, &[], now())),
        max
    );
}

#[test]
fn age_is_taken_off_the_lifetime() {
    let cc = "cache-control";
    assert_eq!(store(&[(cc, b"max-age=60"), ("age", b"20")]), fresh(40));
    assert_eq!(
        store(&[(cc, b"max-age=60"), ("age", b"60")]),
        Storable::No("stale on arrival")
    );
    assert_eq!(
        store(&[(cc, b"max-age=60"), ("age", b"99999999999999999999999")]),
        Storable::No("stale on arrival")
    );
    assert_eq!(store(&[(cc, b"max-age=60"), ("age", b"x")]), fresh(60));
    assert_eq!(store(&[("age", b"600")]), fresh(3000));

    let age = |v: &[u8]| age_secs(&map(&[("age", v)]));
    assert_eq!(age_secs(&HeaderMap::new()), 0);
    assert_eq!(age(b"42"), 42);
    assert_eq!(age(b" 42 "), 42);
    assert_eq!(age(b"-1"), 0);
    assert_eq!(age(b"4 2"), 0);
    assert_eq!(age(b""), 0);
    assert_eq!(age(b"\xff"), 0);
    assert_eq!(age(b"99999999999999999999999"), u64::MAX);
    assert_eq!(age_secs(&map(&[("age", b"7"), ("age", b"9")])), 7);
}

#[test]
fn stale_if_error_rules() {
    let cc = "cache-control";
    let rule = |v: &[u8]| stale_rule(store(&[(cc, v)]));
    assert_eq!(rule(b"max-age=60"), Some(StaleRule::Policy));
    assert_eq!(
        rule(b"max-age=60, stale-if-error=300"),
        Some(StaleRule::For(Duration::from_secs(300)))
    );
    assert_eq!(
        rule(b"Stale-If-Error=\"300\", max-age=60"),
        Some(StaleRule::For(Duration::from_secs(300)))
    );
    assert_eq!(
        rule(b"stale-if-error=99999999999"),
        Some(StaleRule::For(Duration::from_secs(1 << 31)))
    );
    assert_eq!(rule(b"stale-if-error=x"), Some(StaleRule::Policy));
    assert_eq!(
        rule(b"stale-if-error=1, stale-if-error=2"),
        Some(StaleRule::Policy)
    );
    assert_eq!(rule(b"must-revalidate"), Some(StaleRule::Never));
    assert_eq!(
        rule(b"stale-if-error=300, must-revalidate"),
        Some(StaleRule::Never)
    );
    assert_eq!(
        rule(b"Proxy-Revalidate, stale-if-error=300"),
        Some(StaleRule::Never)
    );
    // s-maxage implies proxy-revalidate for a shared cache (RFC 9111 5.2.2.10), unless the
    // response says stale-if-error itself (RFC 5861 4).
    assert_eq!(rule(b"s-maxage=60"), Some(StaleRule::Never));
    assert_eq!(
        rule(b"s-maxage=60, stale-if-error=300"),
        Some(StaleRule::For(Duration::from_secs(300)))
    );
    assert_eq!(rule(b"s-maxage=60, s-maxage=61, max-age=60"), None);
}

fn at(y: i64, mo: u32, d: u32, h: u64, mi: u64, s: u64) -> SystemTime {
    let days = days_from_civil(u32::try_from(y).unwrap(), mo, d);
    let secs = days * 86_400 + i64::try_from(h * 3600 + mi * 60 + s).unwrap();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[test]
fn http_dates_in_all_three_forms() {
    let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
    assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
    assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
    assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(t));
    assert_eq!(parse_http_date("Sun Nov 06 08:49:37 1994"), Some(t));
    assert_eq!(parse_http_date(" Sun, 06 Nov 1994 08:49:37 GMT\t"), Some(t));
    assert_eq!(
        parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
        Some(UNIX_EPOCH)
    );
    assert_eq!(
        parse_http_date("Wed, 31 Dec 1969 23:59:59 GMT"),
        Some(UNIX_EPOCH - Duration::from_secs(1))
    );
    assert_eq!(
        parse_http_date("Thursday, 01-Jan-69 00:00:00 GMT"),
        Some(at(2069, 1, 1, 0, 0, 0))
    );
    assert_eq!(
        parse_http_date("Thursday, 01-Jan-70 00:00:00 GMT"),
        Some(UNIX_EPOCH)
    );
    assert_eq!(
        parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
        Some(at(2028, 2, 29, 12, 0, 0))
    );
    assert_eq!(
        parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
        Some(at(2000, 2, 29, 12, 0, 0))
    );
    assert_eq!(
        parse_http_date("Sat, 31 Dec 2016 23:59:60 GMT"),
        Some(at(2017, 1, 1, 0, 0, 0))
    );
    assert_eq!(now(), at(2026, 12, 6, 17, 40, 0));
    // The weekday is a name, not checked against the date.
    assert_eq!(parse_http_date("Mon, 06 Nov 1994 08:49:37 GMT"), Some(t));
}

#[test]
fn malformed_http_dates() {
    for bad in [
        "",
        "0",
        "-1",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Nov 1994 08:49:37 gmt",
        "sun, 06 Nov 1994 08:49:37 GMT",
        "Xyz, 06 Nov 1994 08:49:37 GMT",
        "Sun, 06 nov 1994 08:49:37 GMT",
        "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 94 08:49:37 GMT",
        "Sun,06 Nov 1994 08:49:37 GMT ",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 08:60:00 GMT",
        "Sun, 06 Nov 1994 08:49:61 GMT",
        "Sun, 00 Nov 1994 08:49:37 GMT",
        "Sun, 31 Nov 1994 08:49:37 GMT",
        "Sun, 29 Feb 1900 08:49:37 GMT",
        "Sun, 06 Nov 1994 08-49-37 GMT",
        "Sun, 06 Nov 1994 +8:49:37 GMT",
        "Sun, 0\u{e9}Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-1994 08:49:37 GMT",
        "Sunday, 06 Nov 94 08:49:37 GMT",
        "Sun, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 94",
        "Sun Nov 6 08:49:37 1994",
        "Sun Nov  6 08:49:37 1994 GMT",
        "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}x",
    ] {
        assert_eq!(parse_http_date(bad), None, "{bad:?}");
    }
}

/// IMF-fixdate of `t` (whole seconds), to check the parser against.
fn imf(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let days = i64::try_from(secs / 86_400).unwrap();
    let rem = secs % 86_400;
    // Civil from days (H. Hinnant), the inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // 1970-01-01 was a Thursday.
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][usize::try_from(days % 7).unwrap()];
    let mon = std::str::from_utf8(MONTHS[usize::try_from(m - 1).unwrap()]).unwrap();
    format!(
        "{wd}, {d:02} {mon} {y:04} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

proptest! {
    #[test]
    fn imf_fixdate_round_trips(secs in 0u64..253_402_300_800) {
        let t = UNIX_EPOCH + Duration::from_secs(secs);
        let text = imf(t);
        prop_assert_eq!(parse_http_date(&text), Some(t), "{}", text);
    }

    #[test]
    fn parsers_never_panic(
        lines in proptest::collection::vec(
            (0usize..6, proptest::collection::vec(any::<u8>(), 0..40)),
            0..6,
        ),
    ) {
        let names = ["cache-control", "pragma", "vary", "expires", "date", "age"];
        let mut m = HeaderMap::new();
        for (n, v) in &lines {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                m.append(names[*n], v);
            }
        }
        let _ = request_directives(&m);
        if let Storable::Yes { fresh_for, .. } = storable(200, &m, TTL, &["x".to_owned()], now()) {
            prop_assert!(!fresh_for.is_zero() && fresh_for <= Duration::from_secs(1 << 31));
        }
        for (_, v) in &lines {
            let _ = parse_http_date(&String::from_utf8_lossy(v));
        }
    }
}
