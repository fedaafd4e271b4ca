//! Header hygiene between client and upstream: hop-by-hop stripping (RFC 9110 7.6.1),
//! request framing checks, the request checks before routing (Host, authority, transfer
//! codings, CONNECT), the request id and the forwarding headers (X-Forwarded-*,
//! `Forwarded`, `X-Real-IP`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};

use crate::config::Cidr;
use crate::error::ProxyError;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Removes hop-by-hop headers and every header named in `Connection`. With `keep_upgrade`,
/// `Connection: upgrade` and `Upgrade` survive (a WebSocket handshake being forwarded).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names costs less than a lookup
    // per name. Without a Connection header no other name is hop-by-hop.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Names listed in Connection are hop-by-hop too; collect before removing.
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        if let Ok(s) = value.to_str() {
            for token in s.split(',') {
                let token = token.trim();
                if token.is_empty() || (keep_upgrade && token.eq_ignore_ascii_case("upgrade")) {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
    }
    for name in named {
        headers.remove(&name);
    }
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// The names `strip_hop_by_hop` always removes (Connection itself included).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TRAILER
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Whether the client asks for a protocol upgrade (WebSocket): `Connection: upgrade` plus an
/// `Upgrade` header.
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

/// Only meaningful with an h2c upgrade, which is never forwarded (RFC 9113 removed it).
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// An HTTP/1.1 request that asks for an upgrade, narrowed to the protocols `allowed`
/// (lowercase `Upgrade` tokens, as in the route's `upgrades`): its `Upgrade` rewritten to
/// those it lists, in its order, and returned. None when it lists none of them (or does not
/// ask): the request is then served plainly, its `Upgrade` and `Connection` going with the
/// other hop-by-hop headers. h2c is never allowed, whatever the list says.
pub(crate) fn narrow_upgrade(headers: &mut HeaderMap, allowed: &[String]) -> Option<HeaderValue> {
    headers.remove(&HTTP2_SETTINGS);
    if !wants_upgrade(headers) {
        return None;
    }
    let mut kept = String::new();
    for value in headers.get_all(header::UPGRADE) {
        for token in tokens(value) {
            let name = token.split('/').next().unwrap_or(token);
            let ok = !name.eq_ignore_ascii_case("h2c")
                && allowed.iter().any(|a| {
                    // `websocket` allows any version of it; `foo/2` only that one.
                    a.eq_ignore_ascii_case(token)
                        || (!a.contains('/') && a.eq_ignore_ascii_case(name))
                });
            if ok {
                if !kept.is_empty() {
                    kept.push_str(", ");
                }
                kept.push_str(token);
            }
        }
    }
    let value = HeaderValue::from_str(&kept)
        .ok()
        .filter(|_| !kept.is_empty())?;
    headers.insert(header::UPGRADE, value.clone());
    Some(value)
}

/// Whether a 101's `Upgrade` switches to protocols the request offered, and names at least
/// one (RFC 9110 7.8: a server switches only to protocols the client listed). Tokens compare
/// without regard to case.
pub(crate) fn switches_to_offered(response: &HeaderMap, offered: &HeaderValue) -> bool {
    let mut any = false;
    for value in response.get_all(header::UPGRADE) {
        for token in tokens(value) {
            if !tokens(offered).any(|o| o.eq_ignore_ascii_case(token)) {
                return false;
            }
            any = true;
        }
    }
    any
}

/// The comma-separated elements of a header value, trimmed, empty ones skipped (RFC 9110
/// 5.6.1); nothing for a value that is not text.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Shared with the HTTP/1 path, where hyper hides the Content-Length (listener::h1_guard).
pub(crate) const CL_AND_TE: &str = "request has both Content-Length and Transfer-Encoding";

/// Request smuggling guards hyper leaves to us: both framings at once, or Content-Length
/// values that disagree (several headers or a comma list).
pub(crate) fn check_framing(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let has_te = headers.contains_key(header::TRANSFER_ENCODING);
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        if has_te {
            return Err(CL_AND_TE);
        }
        let s = value.to_str().map_err(|_| "invalid Content-Length")?;
        for part in s.split(',') {
            let n: u64 = part.trim().parse().map_err(|_| "invalid Content-Length")?;
            match length {
                Some(prev) if prev != n => return Err("conflicting Content-Length values"),
                _ => length = Some(n),
            }
        }
    }
    Ok(length)
}

/// What the request path needs to know about the client's headers, found in one pass: a
/// lookup by name hashes the name and probes the map, a pass compares names directly, and
/// most requests carry only a few headers.
pub(crate) struct Head {
    /// The first `Host` value.
    pub host: Option<HeaderValue>,
    /// `Host` lines (at most 2 counted: more than one is an error either way).
    hosts: u8,
    transfer_encoding: bool,
    content_length: bool,
    upgrade: bool,
    /// Several `cookie` fields (HTTP/2 splits them; HTTP/1.1 wants one).
    cookies: u8,
    /// X-Forwarded-For/-Proto/-Host, Forwarded, X-Real-IP or X-Request-Id came with the
    /// request.
    pub forwarding: bool,
}

impl Head {
    /// The facts, and `request_id` for these headers.
    pub(crate) fn scan(headers: &HeaderMap) -> (Head, HeaderValue) {
        let mut client_id = None;
        let mut head = Head {
            host: None,
            hosts: 0,
            transfer_encoding: false,
            content_length: false,
            upgrade: false,
            cookies: 0,
            forwarding: false,
        };
        for (name, value) in headers {
            if name == header::HOST {
                if head.host.is_none() {
                    head.host = Some(value.clone());
                }
                head.hosts = head.hosts.saturating_add(1).min(2);
            } else if name == header::COOKIE {
                head.cookies = head.cookies.saturating_add(1).min(2);
            } else if name == header::CONTENT_LENGTH {
                head.content_length = true;
            } else if name == header::TRANSFER_ENCODING {
                head.transfer_encoding = true;
            } else if name == header::UPGRADE {
                head.upgrade = true;
            } else if name == X_REQUEST_ID {
                head.forwarding = true;
                if client_id.is_none() {
                    client_id = Some(value);
                }
            } else if name == X_FORWARDED_FOR
                || name == X_FORWARDED_PROTO
                || name == X_FORWARDED_HOST
                || name == header::FORWARDED
                || name == X_REAL_IP
            {
                head.forwarding = true;
            }
        }
        (head, checked_request_id(client_id))
    }

    /// `check_framing`, skipped when neither header is there.
    pub(crate) fn check_framing(&self, headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
        if !self.content_length {
            return Ok(None);
        }
        check_framing(headers)
    }

    /// The request has an `Upgrade` header (an upgrade to allow, narrow or strip).
    pub(crate) fn has_upgrade(&self) -> bool {
        self.upgrade
    }

    /// What must hold of every request before it is routed, beyond what hyper and h2
    /// check: no CONNECT (405); exactly one valid `Host` on HTTP/1.1, at most one (valid)
    /// on any other version (RFC 9112 3.2: 400, as nginx answers); no userinfo in the
    /// target or `:authority` (RFC 9110 4.2.4, RFC 9113 8.3.1: malformed); chunked as the
    /// only transfer coding (RFC 9112 6.1: 501 for one rampart does not implement).
    pub(crate) fn check<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed);
        }
        match (self.hosts, &self.host) {
            (0, _) if req.version() == Version::HTTP_11 => {
                return Err(ProxyError::BadRequest("missing Host header"));
            }
            (2.., _) => return Err(ProxyError::BadRequest("more than one Host header")),
            (_, Some(h)) if !valid_host(h.as_bytes()) => {
                return Err(ProxyError::BadRequest("invalid Host header"));
            }
            _ => {}
        }
        if req
            .uri()
            .authority()
            .is_some_and(|a| a.as_str().contains('@'))
        {
            return Err(ProxyError::BadRequest("userinfo in the request authority"));
        }
        if self.transfer_encoding {
            check_transfer_coding(req.headers())?;
        }
        Ok(())
    }

    /// Whether the request carries more than one `cookie` field.
    pub(crate) fn split_cookies(&self) -> bool {
        self.cookies > 1
    }
}

/// A `Host` value: `uri-host [":" port]` (RFC 9110 7.2), as nginx reads it: a reg-name
/// (letters, digits, `-._~`, sub-delims but `,`, percent-encodings), an IPv4 address or an
/// IP literal in brackets; a port of at most 5 digits; no empty name, no `..`.
pub(crate) fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(end) = v.iter().position(|&c| c == b']') else {
            return false;
        };
        let inside = &v[1..end];
        if inside.is_empty()
            || !inside
                .iter()
                .all(|&c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'))
        {
            return false;
        }
        match &v[end + 1..] {
            [] => (&v[..=end], None),
            [b':', port @ ..] => (&v[..=end], Some(port)),
            _ => return false,
        }
    } else {
        match v.iter().position(|&c| c == b':') {
            Some(at) => (&v[..at], Some(&v[at + 1..])),
            None => (v, None),
        }
    };
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    let name_ok = host.first() == Some(&b'[')
        || (!host.is_empty()
            && !host.starts_with(b".")
            && !host.windows(2).any(|w| w == b"..")
            && host.iter().all(|&c| {
                c.is_ascii_alphanumeric()
                    || matches!(
                        c,
                        b'-' | b'.'
                            | b'_'
                            | b'~'
                            | b'%'
                            | b'!'
                            | b'$'
                            | b'&'
                            | b'\''
                            | b'('
                            | b')'
                            | b'*'
                            | b'+'
                            | b';'
                            | b'='
                    )
            }));
    port_ok && name_ok
}

/// Every `Transfer-Encoding` element together must be exactly `chunked` (hyper already
/// refused a request whose last coding is not chunked). Another coding before it: 501, as
/// rampart would have to decode it to know the body; `chunked` twice: 400 (RFC 9112 7).
fn check_transfer_coding(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut chunked = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(text) = value.to_str() else {
            return Err(ProxyError::BadRequest("invalid Transfer-Encoding"));
        };
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else {
                return Err(ProxyError::NotImplemented(
                    "transfer codings other than chunked are not implemented",
                ));
            }
        }
    }
    if chunked == 1 {
        Ok(())
    } else {
        Err(ProxyError::BadRequest("invalid Transfer-Encoding"))
    }
}

/// HTTP/2 may split `cookie` into several fields; HTTP/1.1 allows one, so they are joined
/// with `; ` before the request goes upstream (RFC 9113 8.2.3).
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    // Made of header values and "; ": always a valid value.
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
/// Keeps a client's request id when it is sane (1..=128 of `[A-Za-z0-9._:-]`), so one id
/// follows a request across services; otherwise makes a new one. A header value, so the
/// same bytes go upstream and back without another copy; always visible ASCII.
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    checked_request_id(headers.get(&X_REQUEST_ID))
}

fn checked_request_id(client: Option<&HeaderValue>) -> HeaderValue {
    if let Some(v) = client {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// 32 hex digits: a per-process random prefix (so replicas do not collide) and a counter
/// scrambled through splitmix64.
pub(crate) fn new_request_id() -> HeaderValue {
    // The seed's digits are written once.
    static SEED: std::sync::OnceLock<(u64, [u8; 16])> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (seed, prefix) = *SEED.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        let seed = h.finish();
        (seed, hex16(seed))
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z = seed ^ n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&prefix);
    out[16..].copy_from_slice(&hex16(z));
    // Hex digits are always a valid header value. Shared from the start: the id goes both
    // upstream and back to the client.
    HeaderValue::from_maybe_shared(Bytes::from_owner(out)).unwrap_or(HeaderValue::from_static("-"))
}

fn hex16(word: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (j, digit) in out.iter_mut().enumerate() {
        *digit = HEX[((word >> (60 - 4 * j)) & 0xf) as usize];
    }
    out
}

pub(crate) fn is_trusted(peer: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|c| c.contains(peer))
}

/// Sets X-Forwarded-For/-Proto/-Host for the upstream. Incoming values are believed only
/// from a trusted proxy; from anyone else they are replaced, and `Forwarded` and
/// `X-Real-IP` removed, so a client cannot forge its address.
pub(crate) fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted_peer: bool,
    proto: &'static str,
    original_host: Option<&HeaderValue>,
) {
    let peer = peer.to_canonical();
    let xff = if trusted_peer {
        let prior: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if prior.is_empty() {
            crate::text::ip_value(peer)
        } else {
            HeaderValue::from_str(&format!("{}, {}", prior.join(", "), peer)).ok()
        }
    } else {
        crate::text::ip_value(peer)
    };
    if let Some(v) = xff {
        headers.insert(&X_FORWARDED_FOR, v);
    }
    if !(trusted_peer && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !trusted_peer {
        // rampart writes X-Forwarded-*; what an untrusted client wrote in the other
        // spellings of the same facts would be read by some upstream as the truth.
        headers.remove(header::FORWARDED);
        headers.remove(&X_REAL_IP);
    }
    if !(trusted_peer && headers.contains_key(&X_FORWARDED_HOST)) {
        match original_host {
            Some(h) => {
                headers.insert(&X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::forwarded::Forwarded;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "x"),
            ("proxy-connection", "x"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn keeps_upgrade_for_websocket_handshake() {
        let mut h = map(&[
            ("connection", "Upgrade, x-a"),
            ("upgrade", "websocket"),
            ("x-a", "1"),
        ]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("x-a"));
    }

    #[test]
    fn upgrades_are_narrowed_to_what_the_route_allows() {
        let allowed = ["websocket".to_string(), "foo/2".to_string()];
        let narrow = |pairs: &[(&str, &str)]| {
            let mut h = map(pairs);
            let v = narrow_upgrade(&mut h, &allowed);
            (v.map(|v| v.to_str().unwrap().to_owned()), h)
        };
        let (v, h) = narrow(&[("connection", "Upgrade"), ("upgrade", "WebSocket")]);
        assert_eq!(v.as_deref(), Some("WebSocket"));
        assert_eq!(h["upgrade"], "WebSocket");
        let (v, _) = narrow(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c, foo/1, foo/2"),
            ("upgrade", "websocket/13"),
        ]);
        assert_eq!(v.as_deref(), Some("foo/2, websocket/13"));
        // Never h2c, and its settings go whatever happens.
        let (v, h) = narrow(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        assert_eq!(v, None);
        assert!(!h.contains_key("http2-settings"));
        assert!(
            narrow_upgrade(
                &mut map(&[("connection", "upgrade"), ("upgrade", "h2c")]),
                &["h2c".into()]
            )
            .is_none()
        );
        // Without `Connection: upgrade` it is no upgrade request.
        assert_eq!(narrow(&[("upgrade", "websocket")]).0, None);
        assert_eq!(
            narrow(&[("connection", "upgrade"), ("upgrade", "gopher")]).0,
            None
        );
        assert_eq!(
            narrow(&[("connection", "upgrade"), ("upgrade", " , ")]).0,
            None
        );
        let mut none = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert_eq!(narrow_upgrade(&mut none, &[]), None);
    }

    #[test]
    fn a_101_must_switch_to_what_was_offered() {
        let offered = HeaderValue::from_static("foo/2, websocket");
        let ok = |v: &[&str]| {
            let pairs: Vec<(&str, &str)> = v.iter().map(|v| ("upgrade", *v)).collect();
            switches_to_offered(&map(&pairs), &offered)
        };
        assert!(ok(&["websocket"]));
        assert!(ok(&["WebSocket"]));
        assert!(ok(&["FOO/2"]));
        assert!(ok(&["foo/2, websocket"]));
        assert!(!ok(&[]));
        assert!(!ok(&[""]));
        assert!(!ok(&["h2c"]));
        assert!(!ok(&["websocket, h2c"]));
        assert!(!ok(&["websocket", "h2c"]));
        assert!(!ok(&["foo"]));
        assert!(!ok(&["foo/3"]));
    }

    #[test]
    fn framing_checks() {
        assert_eq!(check_framing(&map(&[("content-length", "5")])), Ok(Some(5)));
        assert_eq!(
            check_framing(&map(&[("content-length", "5, 5")])),
            Ok(Some(5))
        );
        assert!(check_framing(&map(&[("content-length", "5"), ("content-length", "6")])).is_err());
        assert!(
            check_framing(&map(&[
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ]))
            .is_err()
        );
        assert!(check_framing(&map(&[("content-length", "-1")])).is_err());
        assert_eq!(check_framing(&map(&[])), Ok(None));
    }

    #[test]
    fn request_id_kept_when_sane_else_new() {
        assert_eq!(request_id(&map(&[("x-request-id", "abc-123")])), "abc-123");
        let bad = request_id(&map(&[("x-request-id", "has space")]));
        assert_eq!(bad.len(), 32);
        assert!(bad.to_str().unwrap().bytes().all(|c| c.is_ascii_hexdigit()));
        let long = "a".repeat(129);
        assert_eq!(request_id(&map(&[("x-request-id", &long)])).len(), 32);
        assert_ne!(new_request_id(), new_request_id());
        // The same per-process prefix.
        assert_eq!(
            new_request_id().as_bytes()[..16],
            new_request_id().as_bytes()[..16]
        );
        assert_eq!(&hex16(0x0123_4567_89ab_cdef), b"0123456789abcdef");
    }

    #[test]
    fn head_scan_agrees_with_lookups() {
        for pairs in [
            &[
                ("host", "a:1"),
                ("x-request-id", "abc"),
                ("x-request-id", "def"),
            ][..],
            &[("content-length", "5"), ("transfer-encoding", "chunked")][..],
            &[("content-length", "5"), ("content-length", "6")][..],
            &[("upgrade", "websocket"), ("connection", "Upgrade")][..],
            &[("upgrade", "websocket")][..],
            &[("x-request-id", "has space"), ("host", "b"), ("host", "c")][..],
            &[][..],
        ] {
            let h = map(pairs);
            let (head, head_id) = Head::scan(&h);
            assert_eq!(head.host.as_ref(), h.get("host"));
            assert_eq!(head.check_framing(&h), check_framing(&h));
            assert_eq!(head.has_upgrade() && wants_upgrade(&h), wants_upgrade(&h));
            let id = request_id(&h);
            if id.len() == 32 {
                assert_eq!(head_id.len(), 32);
            } else {
                assert_eq!(head_id, id);
            }
        }
    }

    #[test]
    fn forwarded_lines_say_what_set_forwarded_would() {
        for peer in ["10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1"] {
            let peer: IpAddr = peer.parse().unwrap();
            let host = HeaderValue::from_static("chat.example");
            let id = HeaderValue::from_static("id-1");
            for original in [Some(host.clone()), None] {
                let mut map = HeaderMap::new();
                set_forwarded(&mut map, peer, false, "https", original.as_ref());
                map.insert(&X_REQUEST_ID, id.clone());
                let mut expected: Vec<String> = map
                    .iter()
                    .map(|(n, v)| format!("{}: {}", n, v.to_str().unwrap()))
                    .collect();
                expected.sort();
                let mut wire = Vec::new();
                Forwarded::new(peer, "https", original, id.clone()).write(&mut wire);
                let wire = String::from_utf8(wire).unwrap();
                let mut lines: Vec<String> =
                    wire.split_terminator("\r\n").map(String::from).collect();
                lines.sort();
                assert_eq!(lines, expected, "{peer}");
            }
        }
    }

    #[test]
    fn strip_leaves_clean_headers_alone() {
        let mut h = map(&[("host", "a"), ("x-a", "1"), ("content-length", "3")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 3);
        for name in ["upgrade", "keep-alive", "proxy-connection", "te"] {
            let mut h = map(&[("host", "a"), (name, "1")]);
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{name}");
        }
    }

    #[test]
    fn forwarded_headers_trust_only_trusted_peers() {
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        let host = HeaderValue::from_static("example.com");
        let mut h = map(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-host", "evil")]);
        set_forwarded(&mut h, peer, false, "http", Some(&host));
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["x-forwarded-proto"], "http");

        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarded(&mut h, peer, true, "http", Some(&host));
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
