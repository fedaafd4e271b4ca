//! Allocation-free text for the request path (numbers, addresses), where the formatting
//! machinery costs more than the rest of the work. Shared by the header, rate-limit key and
//! HTTP/1.1 client code.

use std::cell::RefCell;
use std::net::IpAddr;

use bytes::Bytes;
use http::HeaderValue;

/// `n` in `RADIX` (10 or 16, lower-case digits), written into `buf`: for header values and
/// framing on the request path, where the formatting machinery costs more than the rest of
/// the work. The radix is a constant so that dividing by it is a multiplication (a 64-bit
/// `div` takes tens of cycles, and a number takes one per digit).
pub(crate) fn digits<const RADIX: u64>(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut n = n;
    if RADIX == 10 {
        // Two digits a step, from a table (as std's formatting does): the numbers here (a
        // count, seconds, a length) mostly have two or three.
        while n >= 100 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            i -= 2;
            buf[i..i + 2].copy_from_slice(&DECIMAL_PAIRS[pair..pair + 2]);
        }
        if n >= 10 {
            let pair = n as usize * 2;
            i -= 2;
            buf[i..i + 2].copy_from_slice(&DECIMAL_PAIRS[pair..pair + 2]);
        } else {
            i -= 1;
            buf[i] = b'0' + n as u8;
        }
        return &buf[i..];
    }
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(n % RADIX) as usize];
        n /= RADIX;
        if n == 0 {
            break;
        }
    }
    // Bytes, not `&str`: checking them as UTF-8 cost more than writing them.
    &buf[i..]
}

/// "00", "01", ... "99".
const DECIMAL_PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = b'0' + (i / 10) as u8;
        t[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    t
};

/// Appends ASCII text (`digits`, an address) to a string without checking it as UTF-8
/// (which cost more than writing it); a byte above ASCII would go in as its Latin-1 char.
pub(crate) fn push_ascii(out: &mut String, ascii: &[u8]) {
    out.extend(ascii.iter().map(|&b| char::from(b)));
}

/// An IPv4 client seen through an IPv6 socket is written as IPv4.
/// The address as a header value. A connection sends many requests from one address, so
/// each thread keeps the last one: a hit costs a reference count, not an allocation.
pub(crate) fn ip_value(ip: IpAddr) -> Option<HeaderValue> {
    thread_local! {
        static LAST: RefCell<Option<(IpAddr, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some((cached, value)) = last
            && *cached == ip
        {
            return Some(value.clone());
        }
        let value = format_ip(ip)?;
        *last = Some((ip, value.clone()));
        Some(value)
    })
}

/// The bytes of a short header value, shared (cloned by reference count) from the start.
struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> AsRef<[u8]> for Text<N> {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// IPv4 is written by hand: `core::fmt` costs several times more.
fn format_ip(ip: IpAddr) -> Option<HeaderValue> {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string()).ok();
    };
    let (buf, len) = ipv4_text(v4);
    HeaderValue::from_maybe_shared(Bytes::from_owner(Text { buf, len })).ok()
}

/// Appends the address as text; IPv4 by hand (the common case on the request path, where
/// `Display` costs more than the rest of the key it goes into).
pub(crate) fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let (buf, len) = ipv4_text(v4);
            push_ascii(out, &buf[..len]);
        }
        IpAddr::V6(_) => {
            use std::fmt::Write;
            let _ = write!(out, "{ip}");
        }
    }
}

/// Dotted-quad digits and their length.
fn ipv4_text(v4: std::net::Ipv4Addr) -> ([u8; 15], usize) {
    let mut buf = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            buf[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buf[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + octet % 10;
        len += 1;
    }
    (buf, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_values_match_display() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.100.9",
            "255.255.255.255",
            "192.168.10.199",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip).unwrap(), ip.to_string().as_str());
            // Again, from the cache.
            assert_eq!(ip_value(ip).unwrap(), ip.to_string().as_str());
        }
    }

    #[test]
    fn push_ip_writes_what_display_does() {
        for ip in [
            "0.0.0.0",
            "10.20.30.40",
            "255.255.255.255",
            "1.0.10.100",
            "2001:db8::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = String::from("ip:");
            push_ip(&mut out, ip);
            assert_eq!(out, format!("ip:{ip}"));
        }
    }

    #[test]
    fn digits_write_every_width() {
        let mut buf = [0u8; 20];
        let around_powers = (0..20u32).flat_map(|e| {
            let p = 10u64.pow(e);
            [p - 1, p, p + 1]
        });
        let all = (0..1000)
            .chain([255, 65_535, u64::MAX - 1, u64::MAX])
            .chain(around_powers);
        for n in all {
            assert_eq!(digits::<10>(n, &mut buf), n.to_string().as_bytes());
            assert_eq!(digits::<16>(n, &mut buf), format!("{n:x}").as_bytes());
            let mut out = String::from("n=");
            push_ascii(&mut out, digits::<10>(n, &mut buf));
            assert_eq!(out, format!("n={n}"));
        }
    }
}
