//! What a connection does with each request, whichever server read it: admission against
//! the connection's state (closing, the guard's verdict), the listener's own answers
//! (`health_path`, the https redirect), then the pipeline, and the answer's send timers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use http::header::UPGRADE;
use http::{Method, Request, Response, StatusCode, Version};

use super::h1_guard::{Verdict, Verdicts};
use super::{ConnState, timeouts, tls};
use crate::body::ClientBody;
use crate::error::ProxyError;
use crate::pipeline::ListenerCtx;
use crate::shutdown::{ConnClosing, Handover, HoldSource};
use crate::stream::finale::TrackedBody;

/// One connection's request handler.
#[derive(Clone)]
pub(super) struct Handler {
    pub(super) ctx: Arc<ListenerCtx>,
    pub(super) state: Arc<ConnState>,
    pub(super) peer: SocketAddr,
    pub(super) health_path: Option<Arc<str>>,
    pub(super) redirect_to_https: bool,
    /// hyper's HTTP/1 server hides `Content-Length` next to `Transfer-Encoding`; its
    /// connections have the byte-level guard, which tells per request. None with rampart's
    /// server, which marks such a request itself.
    pub(super) verdicts: Option<Verdicts>,
}

impl Handler {
    pub(super) fn call(
        &self,
        mut req: Request<ClientBody>,
    ) -> impl Future<Output = Result<Response<TrackedBody>, Infallible>> + Send + use<> {
        let state = &self.state;
        state.request_seen();
        if state.closing.load(Ordering::Relaxed) {
            req.extensions_mut().insert(ConnClosing);
        }
        let request = self.ctx.traffic.in_flight.request();
        let ctx = self.ctx.clone();
        let state = state.clone();
        let peer = self.peer;
        // HTTP/2 heads never go through the guard, and hyper already hands the service
        // every header of those.
        let h1 = req.version() != Version::HTTP_2;
        // rampart's own HTTP/1.1 server (no byte-level guard) writes the rate-limit
        // fields into the head itself; for hyper's, they go into the map.
        let rampart_h1 = h1 && self.verdicts.is_none();
        // Counted open from here, so a stream waiting for its answer is not idle.
        let stream = (!h1).then(|| state.clocks.stream());
        let refused = if !h1 {
            None
        } else if let Some(verdicts) = &self.verdicts {
            match verdicts.next() {
                Verdict::Ok => None,
                // The step check_framing would take, had hyper left the Content-Length
                // in `req`.
                Verdict::ContentLengthAndTransferEncoding => {
                    Some(ProxyError::BadRequest(crate::route::headers::CL_AND_TE))
                }
                Verdict::HeadTooLarge => Some(ProxyError::HeadersTooLarge),
            }
        } else if req
            .extensions()
            .get::<crate::h1::ContentLengthAndTransferEncoding>()
            .is_some()
        {
            Some(ProxyError::BadRequest(crate::route::headers::CL_AND_TE))
        } else {
            None
        };
        // Only a possible upgrade needs the handle after the answer.
        let upgrading =
            h1 && (req.method() == Method::CONNECT || req.headers().contains_key(UPGRADE));
        let switched = if upgrading {
            req.extensions_mut()
                .insert(Handover(Arc::downgrade(&state) as Weak<dyn HoldSource>));
            Some(self.verdicts.clone())
        } else {
            None
        };
        let health = self.health_path.as_deref().is_some_and(|p| {
            req.uri().path() == p && matches!(*req.method(), Method::GET | Method::HEAD)
        });
        // Before routing: nothing of the request reaches an upstream over plain HTTP.
        let redirect = (self.redirect_to_https && !health).then(|| tls::https_redirect(&req));
        async move {
            let mut resp = if health {
                crate::health::listener_health_response(&ctx.traffic.health)
            } else if let Some(resp) = redirect {
                resp
            } else {
                let resp = crate::pipeline::handle(ctx, peer, req, refused).await;
                if let Some(v) = switched
                    && resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(v) = v
                {
                    v.switched();
                }
                resp
            };
            if let Some(h) = resp.body_mut().take_rate_limit_fields(!rampart_h1) {
                h.write_to(resp.headers_mut());
            }
            let body = resp.body_mut();
            match stream {
                Some(stream) => {
                    body.watch_sends();
                    body.hold(Box::new(stream));
                }
                None => {
                    let clocks = &state.clocks;
                    clocks.set_send_timeout(
                        body.send_timeout()
                            .unwrap_or(timeouts::DEFAULT_SEND_TIMEOUT),
                    );
                    body.conn_timed_out(clocks.send_timed_out().clone());
                }
            }
            Ok::<_, Infallible>(crate::stream::finale::track(resp, request, &state.phase))
        }
    }
}
