//! The connection handed over after a 101 (or a 2xx to CONNECT): the socket, with what the
//! client had already sent past the request head read first.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::sync::lock;

/// A socket of any kind (plain, TLS, with rampart's timers around it).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The client's connection after the switch.
pub(crate) struct Upgraded {
    io: Box<dyn Io>,
    /// Bytes read with the head, past it: the new protocol's first bytes.
    pre: Bytes,
}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h1::Upgraded")
            .field("pre", &self.pre.len())
            .finish()
    }
}

impl Upgraded {
    pub(super) fn new(io: Box<dyn Io>, pre: Bytes) -> Upgraded {
        Upgraded { io, pre }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The upgrade did not happen (the answer did not switch, or the connection failed first).
#[derive(Debug, thiserror::Error)]
#[error("the client connection was not upgraded")]
pub(crate) struct UpgradeError;

/// In the extensions of a request that may switch protocols: the connection, once the
/// answer switched. Clone because extensions must be; only one clone gets the connection.
#[derive(Clone)]
pub(crate) struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl std::fmt::Debug for OnUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("h1::OnUpgrade")
    }
}

impl OnUpgrade {
    /// Waits for the switch.
    pub(crate) async fn get(self) -> Result<Upgraded, UpgradeError> {
        let rx = lock(&self.0).take().ok_or(UpgradeError)?;
        rx.await.map_err(|_| UpgradeError)
    }
}

/// The connection's end (it sends the socket) and the request's.
pub(super) fn pending() -> (oneshot::Sender<Upgraded>, OnUpgrade) {
    let (tx, rx) = oneshot::channel();
    (tx, OnUpgrade(Arc::new(Mutex::new(Some(rx)))))
}
