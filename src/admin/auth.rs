//! Who may use the admin listener beyond its probes.
//!
//! - With `admin.token`, `/metrics` and `/admin/*` (so the status page's data) need
//!   `Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 9110 11.1).
//! - Without one (loopback, or an explicit `insecure_no_token`), they answer only requests
//!   whose Host names this machine: an IP literal, `localhost`, or a name listed in
//!   `admin.allowed_hosts`. A web page can make a browser send requests to 127.0.0.1 under
//!   its own name (DNS rebinding); the browser then still writes that name in Host, which is
//!   what gives it away.
//!
//! The probes (`/livez`, `/readyz`, `/health`) stay open: kubelet and load balancers call
//! them without credentials, under any name. So does the status page itself, which is
//! static: the data it fetches is what is guarded.

use std::net::IpAddr;

use http::{HeaderMap, Uri, header};

use crate::config::AdminConfig;

pub(super) fn public(path: &str) -> bool {
    matches!(path, "/livez" | "/readyz" | "/health" | "/")
}

/// What a request to a guarded path gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Granted,
    /// 401: a token is configured and the request did not bring it.
    NeedsToken,
    /// 421: no token is configured and the request names a host that is not this one.
    ForeignHost,
}

pub(super) fn check(admin: &AdminConfig, uri: &Uri, headers: &HeaderMap) -> Access {
    match &admin.token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer);
            if given.is_some_and(|g| same(g.as_bytes(), token.expose().as_bytes())) {
                Access::Granted
            } else {
                Access::NeedsToken
            }
        }
        None => {
            // The Host header, and the target's authority when the request line has one
            // (absolute form): every name the request gives must be ours.
            let host = headers.get(header::HOST).map(|h| h.to_str().ok());
            let named = [host, uri.authority().map(|a| Some(a.as_str()))];
            let ok = named
                .into_iter()
                .flatten()
                .all(|h| h.is_some_and(|h| local_name(h, &admin.allowed_hosts)));
            if ok {
                Access::Granted
            } else {
                Access::ForeignHost
            }
        }
    }
}

/// `Bearer <token>`: the scheme in any case, one or more spaces, the token (RFC 9110:
/// `credentials = auth-scheme [ 1*SP token68 ]`).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches(' ');
    (!token.is_empty()).then_some(token)
}

/// A Host value (`name[:port]`, `[v6][:port]`) that can only mean this machine, or a name
/// the operator listed.
fn local_name(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // An IPv6 literal: `[::1]` or `[::1]:9901`.
        Some(rest) => {
            let Some((v6, after)) = rest.split_once(']') else {
                return false;
            };
            return (after.is_empty() || port(after.strip_prefix(':')))
                && v6.parse::<std::net::Ipv6Addr>().is_ok();
        }
        None => match host.rsplit_once(':') {
            Some((name, p)) if port(Some(p)) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

fn port(p: Option<&str>) -> bool {
    p.is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Compares without stopping at the first difference, so timing does not tell how much of
/// a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(
            bearer("Bearer a b"),
            Some("a b"),
            "then compared, and refused"
        );
    }

    #[test]
    fn local_names() {
        let allowed = vec!["rampart.internal".to_owned()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "10.0.0.7:80",
            "[::1]",
            "[::1]:9901",
            "localhost",
            "LOCALHOST:9901",
            "rampart.internal",
            "Rampart.Internal:9901",
        ] {
            assert!(local_name(ok, &allowed), "{ok}");
        }
        for bad in [
            "",
            "attacker.example",
            "attacker.example:9901",
            "localhost.attacker.example",
            "127.0.0.1.attacker.example",
            "127.1",
            "[::1",
            "[::1]x",
            "[::1]:",
            "localhost:",
            "localhost:99x",
            "localhost:123456",
            "[attacker.example]",
            "rampart.internal.attacker.example",
        ] {
            assert!(!local_name(bad, &allowed), "{bad}");
        }
    }
}
