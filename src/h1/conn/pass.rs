//! One pass of `write_body` over a response body: frames into the write buffer until there
//! is something to write.

use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Mutex;

use bytes::Bytes;
use http::HeaderMap;

use super::{COPY_UNDER, ConnError, Shared, WRITE_AT};
use crate::h1::encode::{self, Encoder};
use crate::h1::upgrade::Io;
use crate::scratch;
use crate::sync::lock;

/// What `write_body` keeps from one pass over the body to the next, in one place: every
/// streamed event reads it, and with 1,000 connections each cache line of a connection's
/// state is a miss per event (as loose locals of the future, it took several).
pub(super) struct Pass {
    /// The body said Pending, or said with its last frame that it waits (`Waits`), and what
    /// it gave went out within the same poll of the task: asking it again now would only
    /// walk its layers to the same Pending (a second pass per event of a stream). A wake-up
    /// from it during this poll polls the task again.
    pub(super) body_waits: bool,
    pub(super) ended: bool,
    /// Data too large to copy, written from its own buffer after `wbuf`.
    pub(super) big: Option<Bytes>,
    pub(super) encoder: Encoder,
}

impl Pass {
    /// Frames from `body` into `wbuf` until there is something to write (or the body
    /// ended); Pending only with nothing to write, after looking for a client that left.
    pub(super) fn poll<I, B>(
        &mut self,
        mut body: Pin<&mut B>,
        wbuf: &mut Vec<u8>,
        trailers: &mut Option<HeaderMap>,
        te_trailers: bool,
        shared: &Mutex<Shared<I>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ConnError>>
    where
        I: Io,
        B: http_body::Body<Data = Bytes> + encode::Waits,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let skip = std::mem::take(&mut self.body_waits) && wbuf.is_empty();
        if !skip {
            loop {
                if wbuf.len() >= WRITE_AT {
                    return Poll::Ready(Ok(()));
                }
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if data.is_empty() => {}
                        Ok(data) => {
                            let copy = data.len() < COPY_UNDER;
                            // Into the worker's buffer, warm in the cache (`scratch`).
                            scratch::swap(wbuf);
                            self.encoder.data(wbuf, &data, copy)?;
                            if !copy {
                                self.big = Some(data);
                                return Poll::Ready(Ok(()));
                            }
                            // It has nothing more now and will wake the task (an event
                            // stream's usual case): write without asking it again.
                            if body.waits() {
                                self.body_waits = true;
                                return Poll::Ready(Ok(()));
                            }
                        }
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers()
                                && te_trailers
                            {
                                *trailers = Some(t);
                            }
                        }
                    },
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(ConnError::Body(e.into())));
                    }
                    Poll::Ready(None) => {
                        self.encoder.finish(wbuf, trailers.as_ref())?;
                        self.ended = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => {
                        if !wbuf.is_empty() {
                            self.body_waits = true;
                            return Poll::Ready(Ok(()));
                        }
                        break;
                    }
                }
            }
        }
        // Nothing to write: a client that left ends the exchange.
        if lock(shared).poll_gone(cx) {
            return Poll::Ready(Err(ConnError::Gone));
        }
        Poll::Pending
    }
}
