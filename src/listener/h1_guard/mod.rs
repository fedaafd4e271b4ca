//! HTTP/1 request-smuggling guard at the byte level.
//!
//! hyper's h1 parser drops `Content-Length` from the header map when `Transfer-Encoding` is
//! also present, so the service cannot see the ambiguity and would forward the request.
//! [`H1Guard`] wraps the accepted stream, watches the bytes hyper reads (without copying or
//! changing them) and follows HTTP/1 message framing to find every request head. For each
//! head it queues a [`Verdict`]; the service pops one per HTTP/1 request (hyper dispatches
//! them one at a time, in order, after their head was read, so the verdict is always there).
//!
//! The tracker mirrors hyper's own parsing (httparse for heads, hyper's chunked decoder
//! states for bodies). Whenever it cannot follow the stream it stops for good and queues
//! nothing more: hyper refuses such input itself, and the guard must never break a
//! connection hyper would serve.
//!
//! A connection that starts with the HTTP/2 preface is handed to the h2 frame watch
//! (`h2_guard`) instead, which fails the read when the client floods control frames.
//!
//! Here: the IO wrapper and the verdicts the service pops. `tracker` follows the framing,
//! `head` parses one request head as hyper would.

mod head;
mod tracker;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sync::lock;

use super::h2_guard::H2Watch;

// The fuzz target drives the tracker on its own, by `h1_guard::Tracker`.
pub(crate) use tracker::Tracker;

/// What the guard saw in one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Ok,
    /// Both `Content-Length` and `Transfer-Encoding`: refuse with 400.
    ContentLengthAndTransferEncoding,
    /// A head over `max_header_bytes`: refuse with 431.
    HeadTooLarge,
}

/// The most request headers hyper is ever told to accept, whatever the configuration says.
/// hyper reserves a slot per allowed header (about 48 bytes) on every head it parses once
/// the limit is above its default of 100, so an unbounded value is an allocation the size
/// of the configuration on the request path (4294967295 asked for 137 GB and aborted).
pub(crate) const MAX_HEADERS_CEILING: usize = 10_000;

/// The header count limit hyper and the guard both apply: the configured one, within
/// 1..=[`MAX_HEADERS_CEILING`].
pub(crate) fn max_headers(configured: usize) -> usize {
    configured.clamp(1, MAX_HEADERS_CEILING)
}

/// Wraps `inner` and returns the handle the service pops verdicts from.
pub(crate) fn wrap<S>(
    inner: S,
    max_head_bytes: usize,
    max_headers: usize,
) -> (H1Guard<S>, Verdicts) {
    let tracker = Arc::new(Mutex::new(Tracker::new(max_head_bytes, max_headers)));
    let guard = H1Guard {
        inner,
        tracker: tracker.clone(),
        active: true,
        h2: None,
    };
    (guard, Verdicts(tracker))
}

/// The IO wrapper: reads feed the tracker, writes pass straight through.
pub(crate) struct H1Guard<S> {
    inner: S,
    tracker: Arc<Mutex<Tracker>>,
    /// Cached "still tracking" so a stopped guard (HTTP/2, tunnels) costs no lock.
    active: bool,
    /// The frame watch of an HTTP/2 connection (after the preface).
    h2: Option<H2Watch>,
}

/// The service's side of one connection's guard.
#[derive(Clone)]
pub(crate) struct Verdicts(Arc<Mutex<Tracker>>);

impl Verdicts {
    /// The verdict for the HTTP/1 request hyper is dispatching now. `Ok` when the guard
    /// stopped tracking.
    pub(crate) fn next(&self) -> Verdict {
        lock(&self.0).next_verdict()
    }

    /// The request was answered 101: what follows is another protocol, stop looking.
    pub(crate) fn switched(&self) {
        lock(&self.0).stop();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H1Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !matches!(res, Poll::Ready(Ok(()))) {
            return res;
        }
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return res;
        }
        let mut frames = new;
        if this.active {
            let mut t = lock(&this.tracker);
            t.feed(new);
            this.active = t.is_active();
            match t.h2_at.take() {
                Some(at) => {
                    this.h2 = Some(H2Watch::new());
                    frames = &new[at.min(new.len())..];
                }
                None => return res,
            }
        }
        if let Some(watch) = this.h2.as_mut()
            && !watch.feed(frames)
        {
            tracing::info!("HTTP/2 control-frame flood: closing the connection");
            // A failed read hands over no bytes.
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "HTTP/2 control-frame flood",
            )));
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H1Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&res);
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&res);
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S> H1Guard<S> {
    /// What rampart writes earns an HTTP/2 client room for its WINDOW_UPDATEs.
    fn wrote(&mut self, res: &Poll<io::Result<usize>>) {
        if let (Some(watch), Poll::Ready(Ok(n))) = (self.h2.as_mut(), res) {
            watch.wrote(*n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tracker::H2_PREFACE;
    use super::*;

    const V_OK: Verdict = Verdict::Ok;
    const V_BOTH: Verdict = Verdict::ContentLengthAndTransferEncoding;
    // The tracker's samples, repeated here: its test module is private to it.
    const GET: &[u8] = b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n";
    const CL_TE: &[u8] = b"POST /d HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";

    #[tokio::test]
    async fn after_the_h2_preface_a_control_frame_flood_fails_the_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        for (flood, fails) in [(1000, false), (1001, true)] {
            let (client, server) = tokio::io::duplex(1 << 20);
            let (mut guard, _) = wrap(server, 64 * 1024, 100);
            let mut bytes = H2_PREFACE.to_vec();
            // SETTINGS, then the PINGs, the preface split from them mid-read.
            bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            bytes.extend(ping.repeat(flood - 1));
            let mut client = client;
            client.write_all(&bytes[..10]).await.unwrap();
            let mut got = vec![0u8; 10];
            guard.read_exact(&mut got).await.unwrap();
            client.write_all(&bytes[10..]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let r = guard.read_to_end(&mut rest).await;
            assert_eq!(r.is_err(), fails, "{flood} PINGs and a SETTINGS: {r:?}");
        }
    }

    #[tokio::test]
    async fn the_wrapper_passes_bytes_through_and_queues_verdicts() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64);
        let (mut guard, verdicts) = wrap(server, 64 * 1024, 100);
        let all = [GET, CL_TE].concat();
        let expect = all.clone();
        let writer = tokio::spawn(async move {
            let mut client = client;
            client.write_all(&all).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        guard.read_to_end(&mut got).await.unwrap();
        let _client = writer.await.unwrap();
        assert_eq!(got, expect);
        assert_eq!(verdicts.next(), V_OK);
        assert_eq!(verdicts.next(), V_BOTH);
        assert_eq!(verdicts.next(), V_OK, "none left: Ok");
    }
}
