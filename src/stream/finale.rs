//! The body every traffic response is sent with: it counts the request as in flight until the
//! body is gone, and gives an SSE stream that is still open at the drain deadline a final
//! event before ending it cleanly.
//!
//! A wrapper around `ProxyBody` rather than a change inside it: the drain is the server's
//! business, and the proxy's body stays the proxy's. The only hook into `ProxyBody` is
//! `mark_drained`, so the access log says `drained` instead of `client_aborted`.
//!
//! The final event is only ever inserted between two events, never inside one: the stream's
//! bytes are scanned for the blank line that ends an event. If the deadline falls in the
//! middle of an event, the event is let through to its end first (the drain cuts the
//! connection a little later if it never ends).

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;

use crate::admission::ratelimit::RateLimitHeaders;
use crate::body::BodyError;
use crate::shutdown::{Phase, reached};
use crate::shutdown::{RequestGuard, StreamGuard};
use crate::stream::body::ProxyBody;
use crate::stream::sse::Scanner;

/// Clients are told to reconnect after a random delay in this range (milliseconds), so the
/// streams cut by one drain do not all come back in the same instant.
const RETRY_MS: std::ops::Range<u64> = 1_000..5_000;

// `finale` first (`repr(C)`), then the proxy body's hot fields: one cache line per frame
// (`align(64)` starts it on one) where the compiler's order took three.
#[repr(C, align(64))]
pub(crate) struct TrackedBody {
    finale: Option<Box<Finale>>,
    inner: ProxyBody,
    /// Dropped with the body: the request is no longer in flight.
    _request: RequestGuard,
}

/// Wraps a response for the server: every response is counted; an SSE response also waits
/// for `Phase::Finale` on the connection's listener.
pub(crate) fn track(
    resp: Response<ProxyBody>,
    request: RequestGuard,
    phase: &watch::Receiver<Phase>,
) -> Response<TrackedBody> {
    // One whose length is fixed (all of it already read) cannot take an extra event.
    let open_ended = resp.body().size_hint().exact().is_none();
    let finale = (open_ended && is_event_stream(&resp)).then(|| {
        let mut phase = phase.clone();
        Box::new(Finale {
            probe: phase.clone(),
            polled: None,
            wait: Box::pin(async move { reached(&mut phase, Phase::Finale).await }),
            scanner: Scanner::default(),
            state: State::Streaming,
            stream: request.stream(),
        })
    });
    resp.map(|inner| TrackedBody {
        inner,
        finale,
        _request: request,
    })
}

/// An event stream: a 200 `text/event-stream` answer without a Content-Length. Decided on
/// the head, not on what the body happens to know of its length (a short stream whose
/// every event was read with the head still counts as a stream).
pub(crate) fn is_event_stream(resp: &Response<ProxyBody>) -> bool {
    crate::stream::events::is_event_stream(resp.status(), resp.headers())
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // The answer's body (its tail: access log, slots, permits) before the finale's
        // stream count, as before the fields were reordered (`repr(C)`): a drain that waits
        // for the count sees the stream's log written.
        drop(std::mem::replace(&mut self.inner, ProxyBody::empty()));
    }
}

impl crate::h1::HeadFields for TrackedBody {
    fn has_head_fields(&self) -> bool {
        self.inner.rate_limit_fields().is_some()
    }

    fn replaces(&self, name: &http::HeaderName) -> bool {
        RateLimitHeaders::replaces(name)
    }

    fn write_head_fields(&self, dst: &mut Vec<u8>) {
        if let Some(h) = self.inner.rate_limit_fields() {
            h.write_head(dst);
        }
    }
}

impl crate::h1::Waits for TrackedBody {
    fn waits(&self) -> bool {
        match self.finale.as_deref() {
            None => self.inner.waits(),
            // Streaming: the drain's wait was looked at (and registered for the task) at the
            // start of the poll that gave the frame.
            Some(f) => f.state == State::Streaming && f.polled.is_some() && self.inner.waits(),
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match this.finale.as_deref_mut() {
            None => Pin::new(&mut this.inner).poll_frame(cx),
            Some(f) => f.poll_frame(&mut this.inner, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.finale.as_deref() {
            Some(f) if f.state == State::Done => true,
            // The final event may still come.
            Some(f) if f.state == State::Final => false,
            _ => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.finale {
            // Only streams without a length get here; the final event adds bytes.
            Some(_) => SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Streaming,
    /// The deadline passed in the middle of an event: let it finish first.
    Wanted,
    /// At an event boundary: the final event goes next.
    Final,
    Done,
}

// What every event reads first (`repr(C)`), on the allocation's first line: with 1,000
// streams each line a stream touches per event is a cache miss.
#[repr(C, align(64))]
struct Finale {
    state: State,
    /// The waker `wait` was last registered with.
    polled: Option<std::task::Waker>,
    /// Tells without a lock whether the phase moved since the stream began: `wait` is
    /// polled again only then, or for another task (a poll per frame cost a lock and a
    /// waker registration, several times per event).
    probe: watch::Receiver<Phase>,
    wait: Pin<Box<dyn Future<Output = ()> + Send>>,
    scanner: Scanner,
    stream: StreamGuard,
}

impl Finale {
    /// Whether the drain reached `Finale`, polling `wait` only when it may have.
    fn phase_reached(&mut self, cx: &mut Context<'_>) -> bool {
        let same_task = self
            .polled
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if same_task && !self.probe.has_changed().unwrap_or(true) {
            return false;
        }
        if !same_task {
            self.polled = Some(cx.waker().clone());
        }
        self.wait.as_mut().poll(cx).is_ready()
    }

    fn poll_frame(
        &mut self,
        inner: &mut ProxyBody,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Final => {
                    self.state = State::Done;
                    inner.mark_drained();
                    self.stream.ended_by_drain();
                    return Poll::Ready(Some(Ok(Frame::data(final_event(jitter())))));
                }
                State::Streaming => {
                    if self.phase_reached(cx) {
                        let at_boundary = inner
                            .client_at_boundary()
                            .unwrap_or_else(|| self.scanner.at_boundary());
                        self.state = if at_boundary {
                            State::Final
                        } else {
                            State::Wanted
                        };
                        continue;
                    }
                }
                State::Wanted => {}
            }
            return match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Some(data) = frame.data_ref() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    // An event stream under `stream::events` knows its boundaries already:
                    // no second scan of every byte.
                    if let Some(at_boundary) = inner.client_at_boundary() {
                        if self.state == State::Wanted && at_boundary {
                            self.state = State::Final;
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let found = if self.state == State::Wanted {
                        first_boundary(&mut self.scanner, data)
                    } else {
                        self.scanner.feed(data);
                        None
                    };
                    match found {
                        Some(end) => {
                            // The rest belongs to an event the client will never see whole.
                            let head = data.slice(..end);
                            self.state = State::Final;
                            Poll::Ready(Some(Ok(Frame::data(head))))
                        }
                        None => Poll::Ready(Some(Ok(frame))),
                    }
                }
                Poll::Ready(None) => {
                    self.state = State::Done;
                    Poll::Ready(None)
                }
                other => other,
            };
        }
    }
}

/// The last event of a stream cut by a drain. `id:` is left out so the client's
/// Last-Event-ID stays the last real event, for resuming on another replica.
pub(crate) fn final_event(retry_ms: u64) -> Bytes {
    Bytes::from(format!(
        "event: error\ndata: {{\"code\":\"SERVICE_UNAVAILABLE\",\"message\":\"Server is shutting down\"}}\nretry: {retry_ms}\n\n"
    ))
}

/// A random delay in `RETRY_MS`; std's per-instance random hash keys are random enough to
/// spread reconnects, without a dependency.
pub(crate) fn jitter() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    RETRY_MS.start + h.finish() % (RETRY_MS.end - RETRY_MS.start)
}

/// Feeds `data` to the scanner up to the first event boundary in it, and returns that
/// boundary's offset (the scanner left there); None, with all of `data` fed, if it has none.
/// Byte by byte: it only runs in the moments between a drain's deadline and the end of the
/// event under way.
fn first_boundary(scanner: &mut Scanner, data: &[u8]) -> Option<usize> {
    for i in 0..data.len() {
        let scan = scanner.feed(data.get(i..=i).unwrap_or_default());
        if scan.boundary.is_some() && scanner.at_boundary() {
            // A CRLF's LF right after belongs with it: the cut keeps the whole line end.
            let end = if data.get(i) == Some(&b'\r') && data.get(i + 1) == Some(&b'\n') {
                scanner.feed(b"\n");
                i + 2
            } else {
                i + 1
            };
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boundary_after(chunks: &[&str]) -> bool {
        let mut s = Scanner::default();
        for c in chunks {
            s.feed(c.as_bytes());
        }
        s.at_boundary()
    }

    #[test]
    fn boundaries_follow_every_line_ending() {
        assert!(boundary_after(&[]));
        assert!(boundary_after(&["data: a\n\n"]));
        assert!(boundary_after(&["data: a\r\n\r\n"]));
        assert!(boundary_after(&["data: a\r\r"]));
        assert!(!boundary_after(&["data: a\n"]));
        assert!(!boundary_after(&["data: a\r\n"]));
        assert!(!boundary_after(&["data: a"]));
        // Split anywhere, including inside CRLF.
        assert!(boundary_after(&["data: a\r", "\n\r", "\n"]));
        assert!(boundary_after(&["data: a\n", "\n"]));
        assert!(!boundary_after(&["data: a\n\nid: 2\n"]));
        // A comment line is part of what the blank line ends.
        assert!(boundary_after(&[": ping\n\n"]));
    }

    #[test]
    fn the_cut_comes_after_the_first_complete_event() {
        let mut s = Scanner::default();
        assert_eq!(first_boundary(&mut s, b"data: par"), None);
        let rest = b"tial\n\ndata: next\n\n";
        assert_eq!(first_boundary(&mut s, rest), Some(6));
        assert!(s.at_boundary());
        let mut s = Scanner::default();
        s.feed(b"data: x\r\n");
        // CRLF CRLF: the cut keeps the whole line ending.
        assert_eq!(first_boundary(&mut s, b"\r\nmore"), Some(2));
        assert!(s.at_boundary());
        let mut s = Scanner::default();
        assert_eq!(first_boundary(&mut s, b"data: x\n"), None);
        assert_eq!(first_boundary(&mut s, b"\n"), Some(1));
    }

    #[test]
    fn the_final_event_is_an_error_event_with_a_retry() {
        let ev = final_event(1234);
        assert_eq!(
            &ev[..],
            b"event: error\ndata: {\"code\":\"SERVICE_UNAVAILABLE\",\"message\":\"Server is shutting down\"}\nretry: 1234\n\n"
        );
        let spread: std::collections::HashSet<u64> = (0..50).map(|_| jitter()).collect();
        assert!(spread.iter().all(|r| RETRY_MS.contains(r)));
        assert!(spread.len() > 10, "retry values are spread: {spread:?}");
    }
}
