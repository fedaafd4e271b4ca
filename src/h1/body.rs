//! A request's body, read by whoever holds it (the pipeline, or the upstream client's task)
//! straight from the connection's read buffer and socket, under the connection's lock: no
//! channel and no copy between the connection and the body, as hyper has.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::decode::DecodeError;
use crate::sync::lock;

/// Why a request body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the client closed before the end of the request body")]
    Incomplete,
    #[error("request body framing: {0}")]
    Framing(#[from] DecodeError),
    #[error("reading the request body: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection moved on from this request")]
    Gone,
}

/// The connection's side: `generation` names the request the body belongs to, so a body kept past
/// its exchange never reads the next request's bytes.
pub(super) trait Source: Send {
    fn poll_body(
        &mut self,
        generation: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>>;
}

/// The body of a request read by rampart's HTTP/1.1 server.
pub(crate) struct Body {
    src: Option<(Arc<Mutex<dyn Source>>, u64)>,
    /// Bytes still to come of a `Content-Length` body.
    remaining: Option<u64>,
    done: bool,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h1::Body")
            .field("remaining", &self.remaining)
            .field("done", &self.done)
            .finish()
    }
}

impl Body {
    /// The body of a request without one.
    pub(crate) fn empty() -> Body {
        Body {
            src: None,
            remaining: Some(0),
            done: true,
        }
    }

    pub(super) fn new(
        src: Arc<Mutex<dyn Source>>,
        generation: u64,
        remaining: Option<u64>,
    ) -> Body {
        Body {
            src: Some((src, generation)),
            remaining,
            done: false,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let Some((src, generation)) = &this.src else {
            return Poll::Ready(None);
        };
        let r = lock(src).poll_body(*generation, cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(rest), Some(data)) = (this.remaining.as_mut(), frame.data_ref()) {
                    *rest = rest.saturating_sub(data.len() as u64);
                }
            }
            Poll::Ready(_) => this.done = true,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
