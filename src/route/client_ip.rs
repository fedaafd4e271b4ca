//! The client's address, for rate-limit keys and the access log: the peer, or what trusted
//! proxies in front of it wrote in X-Forwarded-For. Beside the forwarding headers, which
//! follow the same trust rule.

use std::net::IpAddr;

use http::HeaderMap;

use crate::config::Cidr;

/// The client's address: the peer, unless the peer is a trusted proxy; then X-Forwarded-For
/// read from the right, skipping trusted addresses. A spoofed X-Forwarded-For from an
/// untrusted peer is never read.
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    let mut client = peer;
    // Later headers hold later hops: walk them, and their entries, backwards.
    let values: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for entry in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let Some(ip) = parse_xff_entry(entry.trim()) else {
            // Only a broken trusted hop writes garbage: stop at the last address known.
            break;
        };
        client = ip.to_canonical();
        if !trusted.iter().any(|c| c.contains(client)) {
            break;
        }
    }
    client
}

/// `203.0.113.7`, `2001:db8::1`, and the forms with a port some proxies write
/// (`203.0.113.7:5123`, `[2001:db8::1]:5123`).
fn parse_xff_entry(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cidr(s: &str) -> Cidr {
        let (a, p) = s.split_once('/').unwrap();
        Cidr {
            addr: a.parse().unwrap(),
            prefix: p.parse().unwrap(),
        }
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_xff_says() {
        let trusted = [cidr("10.0.0.0/8")];
        let h = xff(&["1.2.3.4"]);
        assert_eq!(client_ip(ip("192.0.2.9"), &h, &trusted), ip("192.0.2.9"));
        assert_eq!(client_ip(ip("192.0.2.9"), &h, &[]), ip("192.0.2.9"));
    }

    #[test]
    fn trusted_hops_are_skipped_from_the_right() {
        let trusted = [cidr("10.0.0.0/8")];
        // The client forged "6.6.6.6"; the first untrusted address from the right is real.
        let h = xff(&["6.6.6.6, 198.51.100.4", "10.0.0.2"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("198.51.100.4"));
        // Only trusted addresses: the leftmost is the best known.
        let h = xff(&["10.0.0.3, 10.0.0.2"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.3"));
        // No header: the trusted peer itself.
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
        // Garbage stops the walk at the last good address.
        let h = xff(&["198.51.100.4, garbage, 10.0.0.2"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.2"));
        // Ports and brackets.
        let h = xff(&["[2001:db8::7]:443"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("2001:db8::7"));
        let h = xff(&["198.51.100.4:5555"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("198.51.100.4"));
        // An IPv4-mapped peer is its IPv4 address.
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.1"), &xff(&["198.51.100.4"]), &trusted),
            ip("198.51.100.4")
        );
    }
}
