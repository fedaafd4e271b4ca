//! HTTP/1.1 Upgrade (WebSocket) pass-through. The handshake is forwarded like any request;
//! bytes are piped only once the upstream has answered 101, never before.

use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::proxy::body::ProxyBody;
use crate::proxy::headers::strip_hop_by_hop;

pub fn tunnel(
    mut resp: http::Response<Incoming>,
    client: OnUpgrade,
    request_id: String,
) -> http::Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _empty) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    tokio::spawn(async move {
        match tokio::join!(client, upstream) {
            (Ok(c), Ok(u)) => {
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(%request_id, error = %e, "upgraded connection ended");
                }
            }
            (c, u) => {
                tracing::warn!(
                    %request_id,
                    client_ok = c.is_ok(),
                    upstream_ok = u.is_ok(),
                    "upgrade failed after 101"
                );
            }
        }
    });
    http::Response::from_parts(parts, ProxyBody::empty())
}
