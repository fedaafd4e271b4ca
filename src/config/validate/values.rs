//! Scalar parsers: text -> value, or the message. Pure functions; [`Ctx`](super::reader::Ctx)
//! adds the position and the key path.

use std::net::IpAddr;
use std::time::Duration;

use http::{Method, Uri};

use crate::config::{Cidr, KeySource, RateLimitKey};

pub(super) const MAX_MIN_BODY_RATE: u64 = 1 << 30;
/// Longer is surely a typo, and `Instant + Duration` panics on overflow downstream.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Optional sign and decimal digits; the sign is kept so "-3" can be reported as such.
pub(super) fn parse_int(s: &str) -> Result<i128, String> {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected an integer, got \"{s}\""));
    }
    // Only overflow can fail here: treat as "very large" and let the range check speak.
    Ok(s.parse::<i128>().unwrap_or(if s.starts_with('-') {
        i128::MIN
    } else {
        i128::MAX
    }))
}

pub(super) fn in_range(n: i128, min: u64, max: u64, text: &str) -> Result<u64, String> {
    if n < i128::from(min) {
        return Err(if min == 1 {
            format!("must be greater than 0, got {text}")
        } else {
            format!("must be at least {min}, got {text}")
        });
    }
    u64::try_from(n)
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("must be at most {max}, got {text}"))
}

/// Integer bytes, or an integer with a unit: KiB, MiB, GiB (powers of 1024), KB, MB, GB
/// (powers of 1000), or B.
pub(super) fn parse_bytes(s: &str) -> Result<i128, String> {
    let bad =
        || format!("expected a byte size like \"64KiB\", \"10MiB\" or \"1048576\", got \"{s}\"");
    let t = s.trim();
    let split = t
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || (*i == 0 && matches!(c, '-' | '+'))))
        .map_or(t.len(), |(i, _)| i);
    let (number, unit) = t.split_at(split);
    let multiplier: i128 = match unit.trim_start() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let n = parse_int(number).map_err(|_| bad())?;
    Ok(n.saturating_mul(multiplier))
}

/// For messages: 8192 -> "8KiB".
pub(super) fn format_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    n.to_string()
}

/// Bytes per second: a byte size followed by `/s` ("500B/s", "1KiB/s"), 1 B/s to 1 GiB/s;
/// or `off`.
pub(super) fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t == "off" {
        return Ok(None);
    }
    let bad = || format!("expected a rate like \"500B/s\" or \"1KiB/s\", or off, got \"{s}\"");
    let size = t.strip_suffix("/s").ok_or_else(bad)?;
    let n = parse_bytes(size).map_err(|_| bad())?;
    in_range(n, 1, MAX_MIN_BODY_RATE, s)
        .map(Some)
        .map_err(|e| match n {
            n if n > i128::from(MAX_MIN_BODY_RATE) => {
                format!("must be at most 1GiB/s, got \"{s}\"")
            }
            _ => e,
        })
}

/// humantime's syntax ("250ms", "30s", "1m30s"), greater than 0. A bare number is refused:
/// nobody can tell whether `30` means seconds or milliseconds.
/// A bound as the file would write it: whole hours as "24h" (humantime says "1day"),
/// whole minutes as "5m", anything else as humantime writes it.
pub(super) fn bound_text(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs > 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if d.subsec_nanos() == 0 && secs > 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        humantime::format_duration(d).to_string()
    }
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || format!("expected a duration like \"250ms\", \"30s\" or \"5m\", got \"{s}\"");
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("must be greater than 0, got \"{s}\""));
    }
    if t.parse::<f64>().is_ok() {
        return Err(expected());
    }
    let d = humantime::parse_duration(t).map_err(|_| expected())?;
    if d.is_zero() {
        return Err(format!("must be greater than 0, got \"{s}\""));
    }
    if d > MAX_DURATION {
        return Err(format!("must be at most 365 days, got \"{s}\""));
    }
    Ok(d)
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (the whole /32 or /128).
pub(super) fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let expected =
        || format!("expected an address or block like \"10.0.0.0/8\" or \"::1\", got \"{s}\"");
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (s, None),
    };
    let addr: IpAddr = ip.parse().map_err(|_| expected())?;
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => {
                    return Err(format!(
                        "prefix /{p} is out of range for an IPv{} address (0 to {max})",
                        if addr.is_ipv4() { 4 } else { 6 }
                    ));
                }
            }
        }
        Some(_) => return Err(expected()),
    };
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    if network != addr {
        // Probably a typo for either the network or the prefix; do not guess silently.
        return Err(format!(
            "\"{s}\" has host bits set: did you mean \"{network}/{prefix}\"?"
        ));
    }
    Ok(Cidr { addr, prefix })
}

/// `http(s)://host[:port][/]`, stored with its port explicit and path "/".
pub(super) fn parse_endpoint(s: &str) -> Result<Uri, String> {
    let expected = || {
        format!(
            "expected a URL like \"http://10.0.0.5:3001\" or \"https://api.example.com\", got \"{s}\""
        )
    };
    let uri: Uri = s.parse().map_err(|_| expected())?;
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        Some(other) => {
            return Err(format!(
                "unsupported scheme \"{other}\" in \"{s}\": use http or https"
            ));
        }
        None => return Err(expected()),
    };
    let authority = uri.authority().ok_or_else(expected)?;
    if authority.as_str().contains('@') {
        // Not echoed: it may hold a password.
        return Err("user info (user:password@) is not allowed in endpoint URLs".into());
    }
    if authority.host().is_empty() {
        return Err(expected());
    }
    if let Some(pq) = uri.path_and_query() {
        if !matches!(pq.path(), "" | "/") {
            return Err(format!(
                "endpoint URLs cannot have a path (\"{}\" in \"{s}\"): routes forward the request path as is",
                pq.path()
            ));
        }
        if pq.query().is_some() {
            return Err(format!("endpoint URLs cannot have a query (in \"{s}\")"));
        }
    }
    let port = written_port(authority)
        .map_err(|p| format!("port \"{p}\" is not a port number (1 to 65535) in \"{s}\""))?
        .unwrap_or(default_port);
    if port == 0 {
        return Err(format!("port 0 is not a valid upstream port (in \"{s}\")"));
    }
    Uri::builder()
        .scheme(uri.scheme_str().unwrap_or("http"))
        .authority(format!("{}:{port}", authority.host().to_ascii_lowercase()))
        .path_and_query("/")
        .build()
        .map_err(|_| expected())
}

/// The port written in an authority, if any. `http::uri::Authority::port` answers `None`
/// for a port it cannot read as a u16 (`:99999`), the same as for no port at all; here
/// that is an error carrying the text written.
pub(super) fn written_port(authority: &http::uri::Authority) -> Result<Option<u16>, String> {
    let text = authority.as_str();
    let host_port = text.rsplit_once('@').map_or(text, |(_, hp)| hp);
    let after_host = match host_port.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or("", |(_, after)| after),
        None => host_port.find(':').map_or("", |i| &host_port[i..]),
    };
    match after_host.strip_prefix(':') {
        None => Ok(None),
        Some(digits) => match digits.parse::<u16>() {
            Ok(p) if digits.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(p)),
            _ => Err(digits.to_owned()),
        },
    }
}

/// `redis://[:password@]host[:port][/db]`. The text is not echoed when it holds a password.
pub(super) fn parse_redis_url(s: &str) -> Result<String, String> {
    let shown = if s.contains('@') {
        "a URL with credentials (not shown)".to_owned()
    } else {
        format!("\"{s}\"")
    };
    if s.starts_with("rediss://") {
        return Err(
            "TLS to Redis (rediss://) is not supported by this version: use redis://".into(),
        );
    }
    if !s.starts_with("redis://") {
        return Err(format!(
            "expected a URL like \"redis://127.0.0.1:6379\", got {shown}"
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(s)
        .map_err(|_| format!("invalid Redis URL: {shown}"))?;
    Ok(s.to_owned())
}

/// `host:port` or `[v6]:port`, port 1..=65535; kept as written (host names are resolved
/// when connecting, not here).
pub(super) fn parse_host_port(s: &str) -> Result<String, String> {
    let expected = || format!("expected host:port like \"10.0.0.5:26379\", got \"{s}\"");
    let (host, port) = s.rsplit_once(':').ok_or_else(expected)?;
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(s.to_owned()),
        _ => Err(expected()),
    }
}

/// `client_ip`, `header:NAME`, `route+client_ip` or `route+header:NAME`.
pub(super) fn parse_rate_limit_key(s: &str) -> Result<RateLimitKey, String> {
    let expected = || {
        format!(
            "expected client_ip, header:NAME, route+client_ip or route+header:NAME, got \"{s}\""
        )
    };
    let (per_route, rest) = match s.strip_prefix("route+") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let by = if rest == "client_ip" {
        KeySource::ClientIp
    } else if let Some(name) = rest.strip_prefix("header:") {
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("invalid header name \"{name}\" in \"{s}\""))?;
        KeySource::Header(name)
    } else {
        return Err(expected());
    };
    Ok(RateLimitKey { per_route, by })
}

pub(super) fn parse_path_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("must start with \"/\", got \"{s}\""));
    }
    if s.contains(['?', '#']) || s.chars().any(char::is_whitespace) {
        return Err(format!(
            "must be a plain path without query, fragment or spaces, got \"{s}\""
        ));
    }
    // Requests are matched in normal form (crate::path): a prefix in another form would
    // never match, or match other paths than it says.
    let opts = crate::path::Options {
        merge_slashes: true,
        reject_escaped_slashes: false,
        cut_params: true,
    };
    match crate::path::normalize(s, opts) {
        Ok(n) if n == s => Ok(s.to_owned()),
        Ok(n) => Err(format!(
            "must be a normalised path (no \".\" or \"..\" segments, \"//\", \";\" parameters, \
             or percent-encoded letters, digits or \"-._~\"; upper-case hex), \
             here \"{n}\", got \"{s}\""
        )),
        Err(e) => Err(format!("{}, got \"{s}\"", e.message())),
    }
}

/// Stored lowercased and without a port: the router compares it with the request's host.
pub(super) fn parse_host(s: &str) -> Result<String, String> {
    let expected = || format!("expected a host name like \"api.example.com\", got \"{s}\"");
    if s.contains(['@', '/', '*']) {
        return Err(if s.contains('*') {
            format!("wildcard hosts are not supported, got \"{s}\"")
        } else {
            expected()
        });
    }
    let authority: http::uri::Authority = s.parse().map_err(|_| expected())?;
    let host = authority.host();
    if host.is_empty() {
        return Err(expected());
    }
    Ok(host.to_ascii_lowercase())
}

pub(super) fn parse_method(s: &str) -> Result<Method, String> {
    let is_token = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !is_token {
        return Err(format!("invalid HTTP method \"{s}\""));
    }
    if s.bytes().any(|b| b.is_ascii_lowercase()) {
        // Methods are case-sensitive: "get" would never match a GET request.
        return Err(format!(
            "HTTP methods are case-sensitive: \"{s}\" must be upper case, did you mean \"{}\"?",
            s.to_ascii_uppercase()
        ));
    }
    Method::from_bytes(s.as_bytes()).map_err(|_| format!("invalid HTTP method \"{s}\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::alerts::parse_sink_url;
    use crate::config::validate::test_support::*;
    use http::Method;
    use std::time::Duration;

    #[test]
    fn bad_duration() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                header_read_timeout: 30
                routes:
                  - upstream: backend
                    timeouts:
                      connect: 5 parsecs
                      first_byte: 0s
                      idle: -5s
                      total: forever
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
                connect_timeout: 400days
            ",
        );
        assert_eq!(p.len(), 6, "{p:#?}");
        check(
            &p[0],
            4,
            26,
            "listeners[0].header_read_timeout",
            "expected a duration like \"250ms\", \"30s\" or \"5m\", got \"30\"",
        );
        check(
            &p[1],
            8,
            20,
            "listeners[0].routes[0].timeouts.connect",
            "got \"5 parsecs\"",
        );
        check(
            &p[2],
            9,
            23,
            "listeners[0].routes[0].timeouts.first_byte",
            "must be greater than 0",
        );
        check(
            &p[3],
            10,
            17,
            "listeners[0].routes[0].timeouts.idle",
            "must be greater than 0",
        );
        check(
            &p[4],
            11,
            18,
            "listeners[0].routes[0].timeouts.total",
            "got \"forever\"",
        );
        check(
            &p[5],
            15,
            22,
            "upstreams.backend.connect_timeout",
            "must be at most 365 days",
        );
    }

    /// `http::Uri` keeps a port it cannot read as a u16 in the text but answers `None` for
    /// it, which read as "no port": traffic for :99999 went to :80.
    #[test]
    fn ports_out_of_range_are_refused_not_defaulted() {
        for (url, port) in [
            ("http://10.0.0.5:99999", "99999"),
            ("http://10.0.0.5:65536", "65536"),
            ("https://api.example.com:4294967297", "4294967297"),
            ("http://[::1]:70000", "70000"),
            ("http://10.0.0.5:", ""),
        ] {
            let e = parse_endpoint(url).unwrap_err();
            assert!(
                e.contains(&format!(
                    "port \"{port}\" is not a port number (1 to 65535)"
                )),
                "{url}: {e}"
            );
            let e = parse_sink_url(url).unwrap_err();
            assert!(e.contains("1 to 65535"), "{url}: {e}");
        }
        assert_eq!(
            parse_endpoint("http://10.0.0.5:65535").unwrap().to_string(),
            "http://10.0.0.5:65535/"
        );
        assert!(parse_sink_url("https://hooks.example.com:8443/x").is_ok());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_bytes("10 MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("3KB"), Ok(3_000));
        assert_eq!(parse_bytes("3MB"), Ok(3_000_000));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("-2KiB"), Ok(-2048));
        for bad in ["", "MiB", "1.5MiB", "10mb", "10 M", "ten", "1-2", "--1"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        // Overflow saturates and is then refused by the range check, never wraps.
        let huge = parse_bytes("99999999999999999999999999999999999999999GiB").unwrap();
        assert!(in_range(huge, 1, u64::MAX, "x").is_err());
    }

    #[test]
    fn bad_endpoint_url() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                routes: [{upstream: backend}]
            upstreams:
              backend:
                endpoints:
                  - http://127.0.0.1:3001/v1
                  - ftp://127.0.0.1
                  - http://user:secret@127.0.0.1:3001
                  - http://127.0.0.1:3001?x=1
                  - 127.0.0.1:3001
                  - http://127.0.0.1:80
                  - http://127.0.0.1/
            ",
        );
        assert_eq!(p.len(), 6, "{p:#?}");
        check(
            &p[0],
            8,
            9,
            "upstreams.backend.endpoints[0]",
            "endpoint URLs cannot have a path (\"/v1\"",
        );
        check(
            &p[1],
            9,
            9,
            "upstreams.backend.endpoints[1]",
            "unsupported scheme \"ftp\"",
        );
        check(
            &p[2],
            10,
            9,
            "upstreams.backend.endpoints[2]",
            "user info (user:password@) is not allowed",
        );
        assert!(!p[2].message.contains("secret"));
        check(
            &p[3],
            11,
            9,
            "upstreams.backend.endpoints[3]",
            "cannot have a query",
        );
        check(
            &p[4],
            12,
            9,
            "upstreams.backend.endpoints[4]",
            "expected a URL like",
        );
        check(
            &p[5],
            14,
            9,
            "upstreams.backend.endpoints[6]",
            "duplicate endpoint \"http://127.0.0.1:80/\" (first used at line 13)",
        );
    }

    #[test]
    fn lowercase_method() {
        let text = MINIMAL.replace("- upstream: backend", "- upstream: backend\n                match: {methods: [GET, post, \"BAD METHOD\", GET]}");
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:#?}");
        check(
            &p[0],
            6,
            32,
            "listeners[0].routes[0].match.methods[1]",
            "\"post\" must be upper case, did you mean \"POST\"?",
        );
        check(
            &p[1],
            6,
            38,
            "listeners[0].routes[0].match.methods[2]",
            "invalid HTTP method \"BAD METHOD\"",
        );
        check(
            &p[2],
            6,
            52,
            "listeners[0].routes[0].match.methods[3]",
            "duplicate method \"GET\"",
        );
    }

    #[test]
    fn extension_methods_are_accepted() {
        let text = MINIMAL.replace(
            "- upstream: backend",
            "- upstream: backend\n                match: {methods: [PROPFIND]}",
        );
        let c = ok(&text);
        assert_eq!(
            c.listeners[0].routes[0].methods,
            Some(vec![Method::from_bytes(b"PROPFIND").unwrap()])
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(secs(90)));
        assert_eq!(parse_duration("5m"), Ok(secs(300)));
        assert_eq!(parse_duration("1h"), Ok(secs(3600)));
        for bare in ["30", "1.5", "0"] {
            assert_eq!(
                parse_duration(bare),
                Err(format!(
                    "expected a duration like \"250ms\", \"30s\" or \"5m\", got \"{bare}\""
                ))
            );
        }
    }
}
