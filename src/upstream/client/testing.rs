//! A socket to speak for the upstream, and the exchanges the tests of every part share.

use std::future::poll_fn;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Conn, ExchangeError, WireError, exchange};
use crate::body::RequestBody;
use crate::upstream::pool::Io;

/// A connection to a socket the test speaks for as the upstream.
pub(super) async fn pair() -> (Conn, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let server = accepted.expect("accept").0;
    server.set_nodelay(true).expect("nodelay");
    (Conn::new(Io::Plain(client.expect("connect"))), server)
}

pub(super) fn request(
    method: Method,
    path: &str,
    body: RequestBody,
) -> Option<Request<RequestBody>> {
    let mut r = Request::new(body);
    *r.method_mut() = method;
    *r.uri_mut() = path.parse().expect("uri");
    r.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("up"));
    Some(r)
}

/// What the upstream read: up to the end of the request head, plus `body` more bytes.
pub(super) async fn read_request(server: &mut TcpStream, body: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = server.read(&mut byte).await.expect("read request");
        assert_eq!(
            n,
            1,
            "request cut short: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.push(byte[0]);
    }
    let mut rest = vec![0u8; body];
    server.read_exact(&mut rest).await.expect("read body");
    got.extend_from_slice(&rest);
    got
}

/// One exchange: the upstream reads the request head and answers with `segments`, one
/// write each. Returns the head, and the body or the error that cut it.
pub(super) async fn roundtrip(
    conn: &mut Conn,
    server: &mut TcpStream,
    method: Method,
    segments: Vec<Vec<u8>>,
) -> Result<(Response<()>, Result<Vec<u8>, WireError>), ExchangeError> {
    let upstream = async {
        read_request(server, 0).await;
        for s in segments {
            server.write_all(&s).await.expect("write");
            tokio::task::yield_now().await;
        }
    };
    let client = async {
        let mut req = request(method, "/x", RequestBody::Empty);
        let head = exchange(conn, &mut req, None, None)
            .await
            .expect("a request")?;
        let mut body = Vec::new();
        loop {
            match poll_fn(|cx| conn.poll_body(cx)).await {
                Some(Ok(b)) => body.extend_from_slice(&b),
                Some(Err(e)) => return Ok((head, Err(e))),
                None => return Ok((head, Ok(body))),
            }
        }
    };
    let (_, result) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(upstream, client)
    })
    .await
    .expect("exchange hung");
    result
}

/// The upstream reads the request, answers `wire` and closes the connection.
pub(super) async fn answer_and_close(mut server: TcpStream, wire: &[u8]) {
    read_request(&mut server, 0).await;
    server.write_all(wire).await.expect("write");
}

/// Sends a GET on `conn` and waits for the response head.
pub(super) async fn get_head(conn: &mut Conn) {
    let mut req = request(Method::GET, "/", RequestBody::Empty);
    exchange(conn, &mut req, None, None)
        .await
        .expect("request")
        .expect("head");
}

pub(super) fn one(bytes: &[u8]) -> Vec<Vec<u8>> {
    vec![bytes.to_vec()]
}
