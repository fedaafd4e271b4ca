//! The response body that carries its connection: it reads the upstream as it is polled,
//! can hold the head back until the first byte (`hold`), and hands the connection back to
//! its endpoint's pool when it was read to the end.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::h2_conn::H2Body;
use super::hyper_conn::HyperBody;
use super::{Connection, EndpointPool};
use crate::upstream::client::{Conn, WireError};

/// How long an answer's head waits for the first byte of its body before it is passed on
/// (`PooledBody::hold`): long enough to catch an upstream that fails right after its head
/// (a bad first chunk, a close: Node writes the head and the body in separate writes), short
/// enough that a stream whose first event is slow still shows its head at once to anything
/// acting on headers (an EventSource's `open`). nginx and Envoy pass the head on at once and
/// cut the stream; this turns the common case into a 502 the client can act on.
pub(crate) const HEAD_HOLD: Duration = Duration::from_millis(250);

/// Most body bytes taken while the head is held: what is ready beyond the first byte is
/// taken too (so that a failure already in the socket is found), up to this much, as a
/// proxy buffer would (nginx's `proxy_buffer_size` is 4-8 KiB, its buffers 64 KiB).
const HOLD_BYTES: usize = 64 * 1024;

/// The upstream's response body, carrying the connection: polling the body reads it, and
/// when the body has been read to its end the connection goes back to its endpoint's pool.
/// Kept small (it is moved through several layers with every response): what only some
/// responses need is boxed on demand.
pub(crate) struct PooledBody {
    inner: Inner,
    pool: Arc<EndpointPool>,
    /// Data taken while the head was held (`hold`), and an error kept back one poll
    /// (`poll_frame`).
    ahead: Option<Box<Ahead>>,
    /// Data went out since the body last returned Pending: what the server has buffered
    /// but may not have written yet.
    unflushed: bool,
    /// The last frame came from the connection, which then had nothing more and will wake
    /// the task (`waits`).
    waits: bool,
}

#[derive(Default)]
struct Ahead {
    frames: std::collections::VecDeque<Bytes>,
    bytes: usize,
    deferred: Option<WireError>,
}

pub(super) enum Inner {
    /// None once the body failed (the connection is then closed).
    Rampart(Option<Box<Conn>>),
    Hyper(Box<HyperBody>),
    /// A stream of a shared HTTP/2 connection: nothing goes back to a pool.
    H2(Box<H2Body>),
}

impl PooledBody {
    pub(super) fn new(inner: Inner, pool: Arc<EndpointPool>) -> Self {
        PooledBody {
            inner,
            pool,
            ahead: None,
            unflushed: false,
            waits: false,
        }
    }

    /// The body came whole with its head: `hold` has nothing to wait for. Asked first, so
    /// that the common answer does not enter `hold`'s future at all.
    pub(crate) fn held(&self) -> bool {
        matches!(&self.inner, Inner::Rampart(Some(conn)) if conn.body_buffered())
    }

    /// Holds the head until the body has given its first byte (or ended, or failed), at
    /// most `HEAD_HOLD`; then takes whatever else is ready at once (up to `HOLD_BYTES`).
    /// An error means the body failed before anything of the answer was passed on: the
    /// client can still be told 502, rather than get a head and a cut (or, when the server
    /// had not written it yet, empty) answer. An answer whose sized body came whole with
    /// its head passes at once, with nothing taken, no timer and no allocation.
    pub(crate) async fn hold(&mut self) -> Result<(), WireError> {
        if self.held() {
            return Ok(());
        }
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        poll_fn(|cx| {
            loop {
                let held = self.ahead.as_ref().map_or(0, |a| a.bytes);
                if held >= HOLD_BYTES {
                    return Poll::Ready(Ok(()));
                }
                match self.poll_inner(cx) {
                    Poll::Ready(Some(Ok(data))) => {
                        let ahead = self.ahead.get_or_insert_with(Box::default);
                        ahead.bytes += data.len();
                        ahead.frames.push_back(data);
                        if self.inner_ended() {
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending if held > 0 => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(HEAD_HOLD)));
            timer.as_mut().poll(cx).map(Ok)
        })
        .await
    }

    /// The next data from the connection.
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, WireError>>> {
        let conn = match &mut self.inner {
            Inner::Rampart(Some(conn)) => conn,
            Inner::Rampart(None) => return Poll::Ready(None),
            Inner::Hyper(b) => return b.poll_data(cx),
            Inner::H2(b) => return b.poll_data(cx),
        };
        let next = ready!(conn.poll_body(cx));
        if matches!(next, Some(Err(_))) {
            self.inner = Inner::Rampart(None);
        } else if conn.body_done() {
            // Read to its end: the connection can carry another request now, before these
            // last bytes are written to the client (a slow reader would otherwise hold it).
            self.give_back_rampart();
        }
        Poll::Ready(next)
    }

    /// Our own client's connection back to the pool if its response was read to the end
    /// and nothing forbids reuse; otherwise it is closed by dropping it.
    fn give_back_rampart(&mut self) {
        if let Inner::Rampart(slot) = &mut self.inner
            && let Some(conn) = slot.take()
            && conn.reusable()
        {
            self.pool.put_idle(Connection::Rampart(conn));
        }
    }

    fn inner_ended(&self) -> bool {
        match &self.inner {
            Inner::Rampart(conn) => conn.as_ref().is_none_or(|c| c.body_done()),
            Inner::Hyper(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
        }
    }

    fn inner_size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Rampart(conn) => match conn.as_ref().and_then(|c| c.body_remaining()) {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            Inner::Hyper(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
        }
    }
}

impl crate::h1::Waits for PooledBody {
    fn waits(&self) -> bool {
        self.waits
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        let this = &mut *self;
        this.waits = false;
        if let Some(ahead) = this.ahead.as_deref_mut() {
            if let Some(e) = ahead.deferred.take() {
                return Poll::Ready(Some(Err(e)));
            }
            if let Some(data) = ahead.frames.pop_front() {
                ahead.bytes -= data.len();
                this.unflushed = true;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
        }
        match this.poll_inner(cx) {
            Poll::Ready(Some(Ok(data))) => {
                this.unflushed = true;
                // (A connection given back at the body's end is not there to ask.)
                this.waits = matches!(&this.inner, Inner::Rampart(Some(c)) if c.waits());
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            // hyper's server drops what it has not written when a body fails: data that
            // came just before the failure would never reach the client, which would see
            // an empty answer. One Pending first lets the server write it; the error
            // follows on the next poll.
            Poll::Ready(Some(Err(e))) if this.unflushed => {
                this.unflushed = false;
                this.ahead.get_or_insert_with(Box::default).deferred = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map(Frame::data))),
            Poll::Pending => {
                this.unflushed = false;
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead
            .as_ref()
            .is_none_or(|a| a.frames.is_empty() && a.deferred.is_none())
            && self.inner_ended()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner_size_hint();
        let held = match &self.ahead {
            Some(a) if a.bytes > 0 => a.bytes as u64,
            _ => return inner,
        };
        match inner.exact() {
            Some(n) => SizeHint::with_exact(n + held),
            None => {
                let mut sum = SizeHint::new();
                sum.set_lower(inner.lower() + held);
                if let Some(upper) = inner.upper() {
                    sum.set_upper(upper + held);
                }
                sum
            }
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Only a connection whose response was read to the end can carry another request;
        // anything else (client gone, upstream error) is closed by dropping it.
        match &mut self.inner {
            Inner::Rampart(_) => self.give_back_rampart(),
            Inner::Hyper(b) => {
                if let Some(conn) = b.conn.take()
                    && b.reusable
                    && !conn.finished
                {
                    self.pool.put_idle(Connection::Hyper(conn));
                }
            }
            Inner::H2(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{HeaderValue, Request};
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::{EndpointPool, exchange};
    use crate::body::RequestBody;
    use crate::config::UpstreamClient;

    /// The connection goes back to the pool when its answer's last bytes are read from the
    /// upstream, not when the client has taken them: the body is still held here (its last
    /// data not yet passed on), and the connection is already idle.
    #[tokio::test]
    async fn a_connection_is_idle_once_its_answer_is_read_not_once_the_client_has_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
                .await
                .unwrap();
            let _ = wait.await;
            s.write_all(b"56789").await.unwrap();
            // Held open: a closed connection would not be reusable.
            let _ = s.read(&mut buf).await;
        });
        let pool = std::sync::Arc::new(EndpointPool::new(
            "127.0.0.1".into(),
            port,
            HeaderValue::from_static("up"),
            None,
            UpstreamClient::Rampart,
            Duration::from_secs(60),
            16,
        ));
        let conn = pool.connect(Duration::from_secs(5)).await.unwrap();
        let mut request = Some(
            Request::get("/")
                .header("host", "up")
                .body(RequestBody::Empty)
                .unwrap(),
        );
        let response = exchange(conn, pool.clone(), &mut request, None, None)
            .await
            .unwrap()
            .unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"01234");
        assert!(
            pool.take_idle().is_none(),
            "in use while its answer is read"
        );
        go_on.send(()).unwrap();
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&last[..], b"56789");
        let idle = pool.take_idle();
        assert!(
            idle.is_some(),
            "idle once the answer was read, the body still held"
        );
        assert!(body.frame().await.is_none());
        drop((body, idle));
        upstream.abort();
    }
}
