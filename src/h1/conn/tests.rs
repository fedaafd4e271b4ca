//! One connection over an in-memory socket: what it keeps between exchanges, pipelining,
//! broken framing.

use std::convert::Infallible;

use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

// The bodies these tests answer with bring no head fields of their own.
impl encode::HeadFields for Full<Bytes> {}
impl encode::Waits for Full<Bytes> {}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;
type Svc = fn(Request<Body>) -> Answer;

/// The test's end of a served connection, the state it shares, and its task.
struct Served {
    client: DuplexStream,
    shared: Arc<Mutex<Shared<DuplexStream>>>,
    task: tokio::task::JoinHandle<Result<(), ConnError>>,
}

/// Answers with the body's length, after reading it whole.
fn echo_len(req: Request<Body>) -> Answer {
    Box::pin(async move {
        let n = match req.into_body().collect().await {
            Ok(b) => b.to_bytes().len(),
            Err(_) => usize::MAX,
        };
        Ok(Response::new(Full::new(Bytes::from(n.to_string()))))
    })
}

fn serve(svc: Svc) -> Served {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let shared = Arc::new(Mutex::new(Shared::new(server)));
    let settings = Settings {
        header_read_timeout: Duration::from_secs(5),
        max_head: 64 * 1024,
        max_headers: 100,
    };
    let task = tokio::spawn(run(
        shared.clone(),
        settings,
        svc,
        Arc::new(AtomicBool::new(false)),
    ));
    Served {
        client,
        shared,
        task,
    }
}

/// Reads until `n` answers' bodies (Content-Length framed) have come.
async fn read_answers(c: &mut DuplexStream, n: usize) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..1000 {
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.matches("HTTP/1.1 ").count() >= n && text.ends_with(|c: char| c.is_ascii_digit()) {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk)).await {
            Ok(Ok(k)) if k > 0 => out.extend_from_slice(&chunk[..k]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn what_an_exchange_grew_is_freed_before_the_next_head() {
    let Served {
        client: mut c,
        shared,
        ..
    } = serve(echo_len);
    // A 40 KB head grows the read buffer to 64 KiB; a 200 KB body then reads through it.
    let big_head = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(40_000));
    c.write_all(big_head.as_bytes()).await.unwrap();
    let answer = read_answers(&mut c, 1).await;
    assert!(answer.ends_with("\r\n\r\n0"), "{answer}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cap = lock(&shared).rbuf.capacity();
    assert!(
        cap <= KEEP,
        "after a large head, an idle connection kept {cap} bytes"
    );
    c.write_all(b"POST / HTTP/1.1\r\ncontent-length: 200000\r\n\r\n")
        .await
        .unwrap();
    c.write_all(&vec![b'b'; 200_000]).await.unwrap();
    let answer = read_answers(&mut c, 1).await;
    assert!(answer.ends_with("\r\n\r\n200000"), "{answer}");
    // The connection is idle now, waiting for a head.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cap = lock(&shared).rbuf.capacity();
    assert!(
        cap <= KEEP,
        "an idle connection kept {cap} bytes of read buffer"
    );

    // A small exchange after it does not grow it again.
    c.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answers(&mut c, 1).await;
    assert!(answer.ends_with("\r\n\r\n0"), "{answer}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cap = lock(&shared).rbuf.capacity();
    assert!(cap <= KEEP, "{cap}");
}

#[tokio::test]
async fn pipelined_requests_with_bodies_are_answered_in_order() {
    let Served {
        client: mut c,
        task,
        ..
    } = serve(echo_len);
    let mut wire = Vec::new();
    for i in 0..20usize {
        let body = "x".repeat(i * 100);
        if i % 2 == 0 {
            wire.extend_from_slice(
                format!(
                    "POST / HTTP/1.1\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        } else {
            wire.extend_from_slice(format!("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n", body.len()).as_bytes());
        }
    }
    wire.extend_from_slice(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n");
    c.write_all(&wire).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    let lens: Vec<String> = out
        .split("HTTP/1.1 200 OK\r\n")
        .skip(1)
        .map(|a| {
            a.rsplit("\r\n\r\n")
                .next()
                .unwrap_or("")
                .trim_end_matches("HTTP/1.1")
                .to_owned()
        })
        .collect();
    let want: Vec<String> = (0..20)
        .map(|i| (i * 100).to_string())
        .chain(["0".to_owned()])
        .collect();
    assert_eq!(lens, want);
    assert!(out.contains("connection: close"));
    assert!(task.await.unwrap().is_ok());
}

#[tokio::test]
async fn a_body_that_breaks_its_framing_ends_the_connection_after_the_answer() {
    let Served {
        client: mut c,
        task,
        ..
    } = serve(echo_len);
    // The chunk's data is not followed by CRLF: what comes after must never be read
    // as a request.
    c.write_all(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcGET /smuggled HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out)).await;
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_ok()
    );
}

/// A body of many small frames, each ready at once: the server copies them into its write
/// buffer (the worker's, lent: `scratch`) and writes when it has 16 KiB.
struct Frames(std::collections::VecDeque<Bytes>);

impl encode::HeadFields for Frames {}
impl encode::Waits for Frames {}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// `tag`'s 3,000 frames (~60 KB): `tag-<i>;` each.
fn frames(tag: &'static str) -> Vec<Bytes> {
    (0..3000)
        .map(|i| Bytes::from(format!("{tag}-{i};")))
        .collect()
}

/// Serves one streamed answer of `tag`'s frames over a socket of `capacity` bytes.
fn serve_frames(tag: &'static str, capacity: usize) -> DuplexStream {
    let (client, server) = tokio::io::duplex(capacity);
    let settings = Settings {
        header_read_timeout: Duration::from_secs(5),
        max_head: 64 * 1024,
        max_headers: 100,
    };
    let svc = move |_req: Request<Body>| async move {
        Ok::<_, Infallible>(Response::new(Frames(frames(tag).into())))
    };
    tokio::spawn(run(
        Arc::new(Mutex::new(Shared::new(server))),
        settings,
        svc,
        Arc::new(AtomicBool::new(false)),
    ));
    client
}

/// The chunked body of one answer read whole from `c` (the head skipped).
async fn read_chunked(c: &mut DuplexStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    while !raw.ends_with(b"\r\n0\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk)).await {
            Ok(Ok(k)) if k > 0 => raw.extend_from_slice(&chunk[..k]),
            other => panic!("the answer stopped after {} bytes: {other:?}", raw.len()),
        }
    }
    let start = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let mut rest = &raw[start..];
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
        assert_eq!(&rest[eol + 2 + size..eol + 4 + size], b"\r\n");
        rest = &rest[eol + 4 + size..];
    }
}

// Hostile client: one that stops reading keeps its pending bytes in the buffer it was
// lent, while another connection of the same worker streams through the worker's next
// buffer; each gets its own bytes, whole and in order (seen failing when buffers change
// hands with bytes in them).
#[tokio::test]
async fn a_client_that_stops_reading_keeps_its_bytes_while_another_streams() {
    // A 4 KiB socket: the slow answer's first write stays pending.
    let mut slow = serve_frames("slow", 4096);
    let mut fast = serve_frames("fast", 256 * 1024);
    slow.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    fast.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let fast_body = read_chunked(&mut fast).await;
    let slow_body = read_chunked(&mut slow).await;
    assert_eq!(fast_body, frames("fast").concat());
    assert_eq!(slow_body, frames("slow").concat());
}

/// Serves one bodiless answer (204) whose head carries `big` bytes of one field, over a
/// socket of `capacity` bytes.
fn serve_big_head(big: usize, capacity: usize) -> DuplexStream {
    let (client, server) = tokio::io::duplex(capacity);
    let settings = Settings {
        header_read_timeout: Duration::from_secs(5),
        max_head: 64 * 1024,
        max_headers: 100,
    };
    let svc = move |_req: Request<Body>| async move {
        let mut resp = Response::new(Frames(std::collections::VecDeque::new()));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let value = http::HeaderValue::from_str(&"h".repeat(big)).expect("value");
        resp.headers_mut().insert("x-big", value);
        Ok::<_, Infallible>(resp)
    };
    tokio::spawn(run(
        Arc::new(Mutex::new(Shared::new(server))),
        settings,
        svc,
        Arc::new(AtomicBool::new(false)),
    ));
    client
}

// Hostile client: one that does not read a bodiless answer whose head (encoded into the
// worker's buffer, lent) is larger than its socket keeps the head pending in that buffer,
// while another connection of the same worker streams; each gets its own bytes whole.
#[tokio::test]
async fn a_client_that_stops_reading_a_head_keeps_it_while_another_streams() {
    let big = 256 * 1024;
    let mut slow = serve_big_head(big, 4096);
    let mut fast = serve_frames("fast", 256 * 1024);
    slow.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    fast.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_chunked(&mut fast).await, frames("fast").concat());
    let mut head = Vec::new();
    let mut block = [0u8; 8192];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), slow.read(&mut block)).await {
            Ok(Ok(k)) if k > 0 => head.extend_from_slice(&block[..k]),
            other => panic!("the head stopped after {} bytes: {other:?}", head.len()),
        }
    }
    let text = String::from_utf8(head).expect("ASCII");
    assert!(
        text.starts_with("HTTP/1.1 204 No Content\r\n"),
        "{}",
        &text[..64]
    );
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("x-big: "))
        .expect("the big field");
    assert!(
        value.len() == big && value.bytes().all(|b| b == b'h'),
        "the head changed"
    );
}

/// A service's future of a known size, answering at once.
struct Sized4k([u8; 4096]);

impl Future for Sized4k {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(Response::new(Full::new(Bytes::from(vec![self.0[0]])))))
    }
}

/// Every connection's future holds the service's future in place (a box per request was a
/// fresh allocation, cold with many connections, its whole future copied into it), and
/// beside it only the connection's own few fields: not the head, request and answer parts
/// it built, which, borrowed while read, would keep their room there (~1 KiB, copied into
/// for every request).
#[test]
fn the_connection_future_is_the_service_future_and_little_else() {
    let (_client, server) = tokio::io::duplex(1024);
    let settings = Settings {
        header_read_timeout: Duration::from_secs(5),
        max_head: 64 * 1024,
        max_headers: 100,
    };
    let svc: fn(Request<Body>) -> Sized4k = |_| Sized4k([1; 4096]);
    let fut = run(
        Arc::new(Mutex::new(Shared::new(server))),
        settings,
        svc,
        Arc::new(AtomicBool::new(false)),
    );
    let size = std::mem::size_of_val(&fut);
    assert!(
        size >= std::mem::size_of::<Sized4k>(),
        "the service's future is not in the connection's ({size} bytes)"
    );
    let beside = size - std::mem::size_of::<Sized4k>();
    assert!(beside <= 512, "{beside} bytes beside the service's future");
}
