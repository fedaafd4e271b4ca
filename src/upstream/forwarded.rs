//! The forwarding headers of a request, written on the wire by the client.

use std::net::IpAddr;

use http::HeaderValue;

/// X-Forwarded-For/-Proto/-Host and X-Request-Id for a request from an untrusted peer that
/// carries none of them (nearly all): written on the wire right after the request's own
/// headers (`client::Conn::encode`) instead of inserted into its header map, where each
/// insert hashes the name and probes the map. The same values `set_forwarded` and the
/// request id would have put there.
pub(crate) struct Forwarded {
    xff: Option<HeaderValue>,
    proto: &'static str,
    host: Option<HeaderValue>,
    request_id: HeaderValue,
}

impl Forwarded {
    pub(crate) fn new(
        peer: IpAddr,
        proto: &'static str,
        original_host: Option<HeaderValue>,
        request_id: HeaderValue,
    ) -> Self {
        Forwarded {
            xff: crate::text::ip_value(peer.to_canonical()),
            proto,
            host: original_host,
            request_id,
        }
    }

    /// The header lines, in HTTP/1.1 wire form.
    pub(crate) fn write(&self, w: &mut Vec<u8>) {
        let mut line = |name: &[u8], value: &[u8]| {
            w.extend_from_slice(name);
            w.extend_from_slice(value);
            w.extend_from_slice(b"\r\n");
        };
        if let Some(v) = &self.xff {
            line(b"x-forwarded-for: ", v.as_bytes());
        }
        line(b"x-forwarded-proto: ", self.proto.as_bytes());
        if let Some(v) = &self.host {
            line(b"x-forwarded-host: ", v.as_bytes());
        }
        line(b"x-request-id: ", self.request_id.as_bytes());
    }
}
