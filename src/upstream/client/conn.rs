//! One upstream HTTP/1.1 connection and the exchange of a request for a response head on
//! it; the body is then read through `Conn::poll_body`.

use std::io;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::{Method, Request, Response};

use super::encode::Outgoing;
use super::reader::{Incoming, Reader, Step};
use super::{ExchangeError, Head, WireError};
use crate::body::RequestBody;
use crate::upstream::forwarded::Forwarded;
use crate::upstream::pool::Io;

/// One upstream HTTP/1.1 connection.
pub struct Conn {
    pub(super) io: Io,
    pub(super) reader: Reader,
    /// The request head (and small bodies, and chunk framing) waiting to be written.
    pub(super) write: Vec<u8>,
    pub(super) written: usize,
    /// The request body still being sent, and how it is framed.
    pub(super) sending: Option<(RequestBody, Outgoing)>,
    /// May carry another request once this exchange has ended, as far as the request side
    /// goes (the response side is the reader's).
    pub(super) keep_alive: bool,
    /// Taken from the pool (not fresh): a failure before sending may be a stale socket.
    pub reused: bool,
    /// The body's last data left nothing buffered and the socket had nothing more: the
    /// read is registered to wake the task (`waits`).
    waiting: bool,
    /// The end or failure a read made right after the body's last data found, given at the
    /// next poll (the socket need not say it twice).
    read_ahead: Option<io::Result<usize>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("io", &self.io)
            .field("written", &self.written)
            .field("keep_alive", &self.keep_alive)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl Conn {
    pub fn new(io: Io) -> Self {
        Conn {
            io,
            reader: Reader::new(),
            write: Vec::new(),
            written: 0,
            sending: None,
            keep_alive: true,
            reused: false,
            waiting: false,
            read_ahead: None,
        }
    }

    /// The data `poll_body` just gave was all there was, and the socket will wake the task
    /// that polled when more comes: polling again now would only return Pending.
    pub fn waits(&self) -> bool {
        self.waiting
    }

    /// The last exchange ended cleanly and the upstream did not ask to close. Facts about
    /// the wire, not about what was queued: every request byte written, the response read
    /// to its end, nothing after it (see `response_ended`).
    pub fn reusable(&self) -> bool {
        self.keep_alive && self.reader.reusable() && !self.still_sending()
    }

    /// Whether an idle connection can take a request now: still open, and silent (an idle
    /// upstream has nothing to say; anything it did say makes the connection unusable).
    pub fn usable_now(&mut self) -> bool {
        // (Bytes left over after a response already made it unreusable: `body_ended`.)
        if !self.reusable() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        self.reader.poll_fill(&mut self.io, &mut cx).is_pending()
    }

    /// A response that ended before its request was all written (an early 401/413) leaves
    /// the upstream expecting the rest of the body: whatever is sent next on this
    /// connection would be read as that body, or the body's bytes as a request. Such a
    /// connection is closed, never pooled, as nginx, Envoy and HAProxy do. Called after
    /// every step of the reader that may have ended the response.
    fn response_ended(&mut self) {
        if self.reader.body_done() && self.still_sending() {
            self.keep_alive = false;
        }
    }

    /// Reads until a final response head is complete; the body framing is then set. After
    /// an error the connection is good for nothing more.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<Response<()>, WireError>> {
        let result = ready!(self.poll_head_inner(cx, head_request));
        match &result {
            Ok(_) => self.response_ended(),
            Err(_) => self.keep_alive = false,
        }
        Poll::Ready(result)
    }

    fn poll_head_inner(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<Response<()>, WireError>> {
        loop {
            if self.reader.buffered() > 0 {
                match self.reader.parse_head(head_request)? {
                    Head::Final(response) => return Poll::Ready(Ok(response)),
                    Head::Informational => continue,
                    Head::Partial => {}
                }
            }
            let nothing_yet = self.reader.buffered() == 0;
            match ready!(self.reader.poll_fill(&mut self.io, cx)) {
                Ok(0) if nothing_yet => return Poll::Ready(Err(WireError::Unanswered)),
                Ok(0) => return Poll::Ready(Err(WireError::ClosedBeforeHead)),
                Ok(_) => {}
                Err(e) if nothing_yet && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Poll::Ready(Err(WireError::Unanswered));
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    pub fn body_done(&self) -> bool {
        self.reader.body_done()
    }

    /// The rest of the body is already read and cannot fail (see `Reader::body_buffered`).
    pub fn body_buffered(&self) -> bool {
        self.reader.body_buffered()
    }

    /// Bytes of the response body still expected, when known.
    pub fn body_remaining(&self) -> Option<u64> {
        match self.reader.incoming {
            Incoming::Done => Some(0),
            Incoming::Length(n) => Some(n),
            _ => None,
        }
    }

    /// The next piece of the response body; Ready(None) at its end. Also keeps sending
    /// the request body, when the upstream answered before it was all sent.
    pub fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, WireError>>> {
        self.waiting = false;
        self.keep_sending(cx);
        loop {
            // (`step` would only answer More, ~45 instructions per event of a stream.)
            if !self.reader.needs_bytes() {
                let stepped = self.reader.step(true);
                self.response_ended();
                match stepped? {
                    Step::Data(data) => {
                        // Read past framing already here, so the end is known with the
                        // last data.
                        let _ = self.reader.step(false);
                        self.response_ended();
                        self.read_ahead(cx);
                        return Poll::Ready(Some(Ok(data)));
                    }
                    Step::End => return Poll::Ready(None),
                    Step::More => {}
                }
            }
            let filled = match self.read_ahead.take() {
                Some(r) => r,
                None => ready!(self.reader.poll_fill(&mut self.io, cx)),
            };
            if filled? == 0 {
                let end = self.reader.eof();
                self.response_ended();
                return Poll::Ready(end.err().map(Err));
            }
        }
    }

    /// After data that left nothing buffered, the read the next poll would make, made now:
    /// when the socket has nothing (the usual case right after a short read: no system
    /// call), its waker is registered and the body `waits`; what it did have is kept for
    /// the next poll (bytes in the buffer, an end or a failure in `read_ahead`).
    fn read_ahead(&mut self, cx: &mut Context<'_>) {
        if self.reader.buffered() > 0 || self.reader.body_done() || self.still_sending() {
            return;
        }
        match self.reader.poll_fill(&mut self.io, cx) {
            Poll::Pending => self.waiting = true,
            Poll::Ready(Ok(n)) if n > 0 => {}
            Poll::Ready(end) => self.read_ahead = Some(end),
        }
    }
}

/// Sends `request` (then the `forwarded` headers) on `conn` and reads the response head. On success the connection is
/// returned with the head, ready to read the body. The request stays in `request` (for
/// another connection) when nothing of it reached the socket, and when a pooled connection
/// closed without a byte of answer to a GET, HEAD or OPTIONS without a body: the classic
/// keep-alive race, which nginx retries too. Otherwise it is taken: into `sent` when given
/// (its head, the body left empty), so that a retry after the send can go again without a
/// copy made in advance of every request.
pub(crate) async fn exchange(
    conn: &mut Conn,
    request: &mut Option<Request<RequestBody>>,
    forwarded: Option<&Forwarded>,
    mut sent: Option<&mut Option<Request<RequestBody>>>,
) -> Option<Result<Response<()>, ExchangeError>> {
    // What was sent, kept (when asked) instead of dropped.
    let mut keep = |req: Option<Request<RequestBody>>| {
        if let (Some(slot), Some(req)) = (sent.as_deref_mut(), req) {
            *slot = Some(req);
        }
    };
    let req = request.as_ref()?;
    let head_request = req.method() == Method::HEAD;
    let framing = conn.encode(req, forwarded);
    // Such a request needs nothing more from `request` once its head is written: it stays
    // lent until an answer starts.
    let replayable = conn.reused
        && framing.is_none()
        && matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if let Err(e) = std::future::poll_fn(|cx| conn.poll_flush(cx)).await {
        conn.keep_alive = false;
        if conn.written > 0 {
            keep(request.take());
        }
        return Some(Err(e.into()));
    }
    if !replayable {
        let (parts, body) = request.take()?.into_parts();
        conn.sending = framing.map(|f| (body, f));
        keep(Some(Request::from_parts(parts, RequestBody::Empty)));
    }
    conn.reader.incoming = Incoming::Done;
    let result = std::future::poll_fn(|cx| {
        if conn.still_sending() {
            match conn.poll_send(cx) {
                Poll::Ready(Err(ExchangeError::RequestBody(e))) => {
                    return Poll::Ready(Err(ExchangeError::RequestBody(e)));
                }
                // The upstream may have answered and stopped reading: look for the answer.
                Poll::Ready(Err(ExchangeError::Wire(_))) => conn.abandon_send(),
                _ => {}
            }
        }
        conn.poll_head(cx, head_request)
            .map_err(ExchangeError::Wire)
    })
    .await;
    if !matches!(result, Err(ExchangeError::Wire(WireError::Unanswered))) {
        keep(request.take());
    }
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use std::time::Duration;

    /// A chunked head on `conn`, the upstream's socket returned to go on with.
    async fn chunked_head(
        conn: &mut Conn,
        mut server: tokio::net::TcpStream,
    ) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let upstream = async {
            read_request(&mut server, 0).await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .expect("write head");
            server
        };
        let mut req = request(Method::GET, "/", RequestBody::Empty);
        let (server, head) = tokio::join!(upstream, exchange(conn, &mut req, None, None));
        head.expect("an answer").expect("a head");
        server
    }

    async fn next(conn: &mut Conn) -> Option<Result<Bytes, WireError>> {
        std::future::poll_fn(|cx| conn.poll_body(cx)).await
    }

    /// After data that was all the socket had, the body waits (its read registered, so the
    /// server need not ask again); with more already buffered it does not.
    #[tokio::test]
    async fn after_its_last_data_the_body_waits_but_not_with_more_buffered() {
        use tokio::io::AsyncWriteExt;
        let (mut conn, server) = pair().await;
        let mut server = chunked_head(&mut conn, server).await;
        server.write_all(b"3\r\none\r\n").await.expect("write");
        assert_eq!(next(&mut conn).await.expect("data").expect("ok"), "one");
        assert!(conn.waits(), "nothing more: the read is registered");
        server
            .write_all(b"3\r\ntwo\r\n5\r\nthree\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(next(&mut conn).await.expect("data").expect("ok"), "two");
        assert!(!conn.waits(), "the next chunk is buffered already");
        assert_eq!(next(&mut conn).await.expect("data").expect("ok"), "three");
        assert!(conn.waits());
        server.write_all(b"0\r\n\r\n").await.expect("write");
        assert!(next(&mut conn).await.is_none(), "the end");
        assert!(!conn.waits());
        assert!(
            conn.reusable(),
            "read to its end: the read made early took nothing"
        );
    }

    /// An upstream that resets right after a chunk: the read made with the chunk finds the
    /// reset, and the next poll reports it (the socket says it only once: a second read
    /// would only see a close).
    #[tokio::test]
    async fn a_reset_found_by_the_read_after_data_is_given_at_the_next_poll() {
        use tokio::io::AsyncWriteExt;
        let (mut conn, server) = pair().await;
        let mut server = chunked_head(&mut conn, server).await;
        server.write_all(b"4\r\nfour\r\n").await.expect("write");
        server.set_zero_linger().expect("linger");
        drop(server);
        // The data and the reset are both there before the body is asked.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(next(&mut conn).await.expect("data").expect("ok"), "four");
        assert!(!conn.waits(), "the reset was found");
        match next(&mut conn).await {
            Some(Err(WireError::Io(e))) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}")
            }
            other => panic!("expected the reset, got {other:?}"),
        }
        assert!(!conn.reusable());
    }

    #[tokio::test]
    async fn closing_before_the_head_is_an_error() {
        let (mut conn, server) = pair().await;
        let upstream = answer_and_close(server, b"HTTP/1.1 200");
        let mut req = request(Method::GET, "/", RequestBody::Empty);
        let (_, result) = tokio::join!(upstream, exchange(&mut conn, &mut req, None, None));
        assert!(matches!(
            result,
            Some(Err(ExchangeError::Wire(WireError::ClosedBeforeHead)))
        ));
        // It was sent: not handed back for another connection.
        assert!(req.is_none());
    }

    #[tokio::test]
    async fn a_closing_pooled_connection_hands_back_only_safe_bodiless_requests() {
        for (method, body, handed_back) in [
            (Method::GET, RequestBody::Empty, true),
            (Method::HEAD, RequestBody::Empty, true),
            (Method::DELETE, RequestBody::Empty, false),
            (
                Method::GET,
                RequestBody::Full(Some(Bytes::from_static(b"x"))),
                true,
            ),
            (
                Method::POST,
                RequestBody::Full(Some(Bytes::from_static(b"x"))),
                false,
            ),
        ] {
            let (mut conn, server) = pair().await;
            conn.reused = true;
            let mut req = request(method.clone(), "/", body);
            let upstream = answer_and_close(server, b"");
            let (_, result) = tokio::join!(upstream, exchange(&mut conn, &mut req, None, None));
            assert!(
                matches!(
                    result,
                    Some(Err(ExchangeError::Wire(WireError::Unanswered)))
                ),
                "{method}"
            );
            assert_eq!(req.is_some(), handed_back, "{method}");
        }
        // A fresh connection is not a stale one: the failure is the upstream's.
        let (mut conn, server) = pair().await;
        let mut req = request(Method::GET, "/", RequestBody::Empty);
        let (_, result) = tokio::join!(
            answer_and_close(server, b""),
            exchange(&mut conn, &mut req, None, None)
        );
        assert!(result.is_some_and(|r| r.is_err()));
        assert!(req.is_none());
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_usable() {
        let (mut conn, mut server) = pair().await;
        let (_, body) = roundtrip(
            &mut conn,
            &mut server,
            Method::GET,
            one(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        )
        .await
        .expect("exchange");
        body.expect("body");
        assert!(conn.usable_now());
        drop(server);
        // The close reaches the event loop, then the check sees it.
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            while conn.usable_now() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(seen.is_ok(), "close not noticed");
    }
}
