//! What a connection does with each request, whichever server read it: admission against
//! the connection's state (closing, the guard's verdict), the listener's own answers
//! (`health_path`, the https redirect), then the pipeline, and the answer's send timers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use http::header::UPGRADE;
use http::{Method, Request, Response, StatusCode, Version};

use super::h1_guard::{Verdict, Verdicts};
use super::timeouts::StreamGuard;
use super::{ConnState, timeouts, tls};
use crate::body::ClientBody;
use crate::error::ProxyError;
use crate::pipeline::ListenerCtx;
use crate::shutdown::{ConnClosing, Handover, HoldSource, RequestGuard};
use crate::stream::body::ProxyBody;
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
    ) -> Call<impl Future<Output = Response<ProxyBody>> + Send + use<>> {
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
        let answered = if health {
            Some(crate::health::listener_health_response(&ctx.traffic.health))
        } else if self.redirect_to_https {
            Some(tls::https_redirect(&req))
        } else {
            None
        };
        let after = After {
            state,
            request,
            stream,
            switched,
            rampart_h1,
        };
        match answered {
            Some(resp) => Call::Answered {
                resp: Some(resp),
                after: Some(after),
            },
            None => Call::Pipeline {
                fut: crate::pipeline::handle(ctx, peer, req, refused),
                after: Some(after),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer, then the connection's part of it (`After`). Written out rather
    /// than an `async` block: the block kept the request and its peer in its own state
    /// beside the pipeline's future that they were moved into, and the listener's answers
    /// inline, ~1 KiB more for every request's future, which is copied whole into its box.
    #[project = CallProj]
    pub(super) enum Call<F> {
        Pipeline { #[pin] fut: F, after: Option<After> },
        Answered { resp: Option<Response<ProxyBody>>, after: Option<After> },
    }
}

/// What the connection does with the answer before its server sends it.
pub(super) struct After {
    state: Arc<ConnState>,
    request: RequestGuard,
    stream: Option<StreamGuard>,
    switched: Option<Option<Verdicts>>,
    rampart_h1: bool,
}

impl<F: Future<Output = Response<ProxyBody>>> Future for Call<F> {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (resp, after) = match self.project() {
            CallProj::Pipeline { fut, after } => {
                let resp = std::task::ready!(fut.poll(cx));
                (Some(resp), after.take())
            }
            CallProj::Answered { resp, after } => (resp.take(), after.take()),
        };
        match (resp, after) {
            (Some(resp), Some(after)) => Poll::Ready(Ok(after.apply(resp))),
            // Polled again after it answered: a server never does.
            _ => Poll::Pending,
        }
    }
}

impl After {
    fn apply(self, mut resp: Response<ProxyBody>) -> Response<TrackedBody> {
        let After {
            state,
            request,
            stream,
            switched,
            rampart_h1,
        } = self;
        if let Some(v) = switched
            && resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(v) = v
        {
            v.switched();
        }
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
        crate::stream::finale::track(resp, request, &state.phase)
    }
}
