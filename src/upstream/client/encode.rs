//! The request side of a connection: the head (and a small body) encoded into one write,
//! then the body streamed under its framing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Method, Request, header};
use http_body::Body;
use tokio::io::AsyncWrite;

use super::head::parse_length;
use super::{Conn, ExchangeError, WireError};
use crate::body::{BodyError, RequestBody};
use crate::upstream::forwarded::Forwarded;

/// A buffered request body up to this size goes out in the same write as the head.
const BODY_WITH_HEAD: usize = 16 * 1024;
/// A write buffer that grew past this (a large body frame) is not kept for the next request.
const KEEP_WRITE_BUFFER: usize = 64 * 1024;

/// How the request body is framed on the wire.
#[derive(Clone, Copy)]
pub(super) enum Outgoing {
    /// Bytes still owed under Content-Length.
    Length(u64),
    Chunked,
}

impl Conn {
    /// Encodes the request head (and a small buffered body) for writing; the body is
    /// sent by `poll_send` once the head is on its way.
    pub(super) fn encode(
        &mut self,
        req: &Request<RequestBody>,
        forwarded: Option<&Forwarded>,
    ) -> Option<Outgoing> {
        self.write.clear();
        // Encoded into the worker's buffer, warm in the cache (this connection's has left it
        // by its next request at 1,000 connections), given back once flushed (`scratch`).
        crate::scratch::swap(&mut self.write);
        let w = &mut self.write;
        self.written = 0;
        w.extend_from_slice(req.method().as_str().as_bytes());
        w.push(b' ');
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        w.extend_from_slice(target.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in req.headers() {
            w.extend_from_slice(name.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        if let Some(f) = forwarded {
            f.write(w);
        }
        let body = req.body();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| parse_length(v.as_bytes()));
        let framing = if let Some(n) = declared {
            Some(Outgoing::Length(n))
        } else if body.is_end_stream() {
            // As hyper does: methods that define a body say it is empty.
            if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
                w.extend_from_slice(b"content-length: 0\r\n");
            }
            None
        } else if let Some(n) = body.size_hint().exact() {
            push_number::<10>(w, b"content-length: ", n);
            Some(Outgoing::Length(n))
        } else {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Some(Outgoing::Chunked)
        };
        w.extend_from_slice(b"\r\n");
        // A kept (replayable) body that fits goes out with the head: one write.
        if let (RequestBody::Full(Some(b)), Some(Outgoing::Length(n))) = (body, framing)
            && b.len() as u64 == n
            && b.len() <= BODY_WITH_HEAD
        {
            w.extend_from_slice(b);
            return None;
        }
        framing.filter(|f| !matches!(f, Outgoing::Length(0)))
    }

    /// Writes what is buffered; Ready(Ok) once all of it is out.
    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>> {
        while self.written < self.write.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
            }
            self.written += n;
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.written = 0;
        if self.write.capacity() > KEEP_WRITE_BUFFER {
            self.write = Vec::new();
        } else {
            crate::scratch::give_back(&mut self.write);
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the request body as it comes, until all of it is sent (Ready(Ok)) or the body
    /// has nothing ready (Pending).
    pub(super) fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        loop {
            ready!(self.poll_flush(cx))?;
            let Some((body, framing)) = self.sending.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let frame = match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    self.sending = None;
                    self.keep_alive = false;
                    return Poll::Ready(Err(ExchangeError::RequestBody(e)));
                }
                None => {
                    let framing = *framing;
                    self.sending = None;
                    match framing {
                        Outgoing::Chunked => self.write.extend_from_slice(b"0\r\n\r\n"),
                        Outgoing::Length(0) => {}
                        Outgoing::Length(_) => {
                            self.keep_alive = false;
                            return Poll::Ready(Err(ExchangeError::RequestBody(BodyError::Length)));
                        }
                    }
                    continue;
                }
            };
            // Trailers of the request are not forwarded.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            match framing {
                Outgoing::Length(rest) => {
                    let len = data.len() as u64;
                    if len > *rest {
                        self.sending = None;
                        self.keep_alive = false;
                        return Poll::Ready(Err(ExchangeError::RequestBody(BodyError::Length)));
                    }
                    *rest -= len;
                    self.write.extend_from_slice(&data);
                }
                Outgoing::Chunked => {
                    push_number::<16>(&mut self.write, b"", data.len() as u64);
                    self.write.extend_from_slice(&data);
                    self.write.extend_from_slice(b"\r\n");
                }
            }
            if matches!(framing, Outgoing::Length(0)) {
                self.sending = None;
            }
        }
    }

    /// Request bytes buffered or a request body still to come.
    pub(super) fn still_sending(&self) -> bool {
        self.sending.is_some() || self.written < self.write.len()
    }

    /// Sending failed after the request started: the upstream may still have answered, so
    /// reading goes on, but this connection carries nothing more.
    pub(super) fn abandon_send(&mut self) {
        self.sending = None;
        self.write.clear();
        self.written = 0;
        self.keep_alive = false;
    }

    /// Keeps sending the request body while the response is read, when the upstream
    /// answered before it was all sent; a failure to send more ends nothing but reuse.
    pub(super) fn keep_sending(&mut self, cx: &mut Context<'_>) {
        if self.still_sending()
            && let Poll::Ready(Err(_)) = self.poll_send(cx)
        {
            self.abandon_send();
        }
    }
}

/// Appends `prefix`, `n` in `RADIX` (10 or 16) and CRLF.
pub(super) fn push_number<const RADIX: u64>(w: &mut Vec<u8>, prefix: &[u8], n: u64) {
    let mut buf = [0u8; 20];
    w.extend_from_slice(prefix);
    w.extend_from_slice(crate::text::digits::<RADIX>(n, &mut buf));
    w.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::super::exchange;
    use super::super::testing::*;
    use crate::body::RequestBody;
    use bytes::Bytes;
    use http::{HeaderValue, Method};
    use std::future::Future;
    use std::task::Poll;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn requests_are_written_in_origin_form_with_their_framing() {
        let (mut conn, mut server) = pair().await;
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let cases = [
            (
                request(Method::GET, "/a/b?c=1", RequestBody::Empty),
                "GET /a/b?c=1 HTTP/1.1\r\nhost: up\r\n\r\n",
            ),
            (
                request(Method::POST, "/p", RequestBody::Empty),
                "POST /p HTTP/1.1\r\nhost: up\r\ncontent-length: 0\r\n\r\n",
            ),
            (
                request(
                    Method::PUT,
                    "/p",
                    RequestBody::Full(Some(Bytes::from_static(b"hello"))),
                ),
                "PUT /p HTTP/1.1\r\nhost: up\r\ncontent-length: 5\r\n\r\nhello",
            ),
        ];
        for (mut req, expected) in cases {
            let upstream = async {
                let got = read_request(
                    &mut server,
                    expected.len() - expected.find("\r\n\r\n").unwrap_or(0) - 4,
                )
                .await;
                server.write_all(answer).await.expect("write");
                got
            };
            let (got, result) = tokio::join!(upstream, exchange(&mut conn, &mut req, None, None));
            result.expect("request").expect("head");
            assert_eq!(String::from_utf8_lossy(&got), expected);
            assert!(conn.reusable());
        }
    }

    /// What `server` reads up to the end of a request head, read in blocks.
    async fn read_head(server: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut block = vec![0u8; 64 * 1024];
        while !got.ends_with(b"\r\n\r\n") {
            let n = server.read(&mut block).await.expect("read request");
            assert!(n > 0, "request cut short after {} bytes", got.len());
            got.extend_from_slice(&block[..n]);
        }
        got
    }

    // Hostile upstream: one that stops reading leaves the request head it was sent pending
    // in the buffer it was lent (the worker's, `scratch`), while another connection of the
    // same thread sends its request through the next buffer; each upstream reads its own
    // request, whole (seen failing when buffers change hands with bytes in them).
    #[tokio::test]
    async fn an_upstream_that_stops_reading_keeps_its_request_while_another_is_sent() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (mut slow, mut slow_server) = pair().await;
        let (mut fast, mut fast_server) = pair().await;
        // More than loopback's socket buffers take while nobody reads.
        let big = "x".repeat(16 << 20);
        let mut slow_req = request(Method::GET, "/slow", RequestBody::Empty);
        if let Some(r) = slow_req.as_mut() {
            r.headers_mut()
                .insert("x-big", HeaderValue::from_str(&big).expect("value"));
        }
        let slow_exchange = exchange(&mut slow, &mut slow_req, None, None);
        tokio::pin!(slow_exchange);
        let first = std::future::poll_fn(|cx| Poll::Ready(slow_exchange.as_mut().poll(cx))).await;
        assert!(
            first.is_pending(),
            "the slow request's write did not stay pending"
        );

        let mut fast_req = request(Method::GET, "/fast", RequestBody::Empty);
        let upstream = async {
            let got = read_head(&mut fast_server).await;
            fast_server.write_all(answer).await.expect("write");
            got
        };
        let both = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(upstream, exchange(&mut fast, &mut fast_req, None, None))
        });
        let (got, result) = both.await.expect("the fast request never arrived whole");
        result.expect("request").expect("head");
        assert_eq!(got, b"GET /fast HTTP/1.1\r\nhost: up\r\n\r\n");

        let upstream = async {
            let got = read_head(&mut slow_server).await;
            slow_server.write_all(answer).await.expect("write");
            got
        };
        // Bounded: bytes lost or mixed leave the upstream waiting for a head's end.
        let both = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(upstream, slow_exchange)
        });
        let (got, result) = both.await.expect("the slow request never arrived whole");
        result.expect("request").expect("head");
        let expected = format!("GET /slow HTTP/1.1\r\nhost: up\r\nx-big: {big}\r\n\r\n");
        assert_eq!(got.len(), expected.len());
        assert!(
            got == expected.as_bytes(),
            "the slow request's bytes changed"
        );
    }
}
