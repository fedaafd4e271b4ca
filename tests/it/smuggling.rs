//! Client-side request smuggling and the HTTP/1 head path, over raw TCP.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::recorder::{Recorded, Recorder};
use crate::support::{Upstream, logs, one_route, parse, start};

/// Reads one response (head and Content-Length body) from `s`, within `wait`.
async fn read_response(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                break;
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Limits far past anything sane, set on the parsed config (whatever bounds `check` puts
/// on the keys): the head path must neither allocate by them nor overflow on them.
#[tokio::test]
async fn extreme_head_limits_neither_allocate_nor_wrap_rampart_server() {
    extreme_head_limits_neither_allocate_nor_wrap("rampart").await;
}

#[tokio::test]
async fn extreme_head_limits_neither_allocate_nor_wrap_hyper_server() {
    extreme_head_limits_neither_allocate_nor_wrap("hyper").await;
}

/// The listener line that picks the HTTP/1.1 server (`rampart` or `hyper`), for `one_route`.
fn server_line(server: &str) -> String {
    format!("    http1_server: {server}")
}

async fn extreme_head_limits_neither_allocate_nor_wrap(server: &str) {
    let up = Upstream::start().await;
    let mut cfg = parse(&one_route(&up.url(), "", &server_line(server)));
    cfg.listeners[0].max_headers = 4_294_967_295;
    cfg.listeners[0].max_header_bytes = usize::MAX;
    let px = rampart::app::start(cfg).await.expect("proxy starts");
    let addr = px.addr("main").unwrap();

    // More headers than hyper's default of 100, in one write; named in Connection, so
    // they are stripped before the upstream (itself limited to 100) sees them.
    let names: Vec<String> = (0..150).map(|i| format!("x-h{i}")).collect();
    let mut many = format!(
        "GET /ok HTTP/1.1\r\nhost: a\r\nconnection: {}\r\n",
        names.join(", ")
    )
    .into_bytes();
    for name in &names {
        many.extend_from_slice(format!("{name}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&many).await.unwrap();
    let resp = read_response(&mut s, Duration::from_secs(5)).await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "{server} server, 150 headers: {resp:?}"
    );

    // A head in two reads (the second one after a pause).
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"x-late: 1\r\n\r\n").await.unwrap();
    let resp = read_response(&mut s, Duration::from_secs(5)).await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "{server} server, split head: {resp:?}"
    );
    assert_eq!(up.requests(), 2, "{server} server");
    px.shutdown().await;
}

// === The client-side corpus ===

/// What a vector must get.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// Refused with one of these statuses, the connection closed, nothing of it upstream.
    Refused(&'static [u16]),
    /// Served: the first answer is the upstream's 200, and this many requests reached it.
    Served(usize),
}

struct Vector {
    name: &'static str,
    bytes: Vec<u8>,
    want: Want,
}

fn v(name: &'static str, bytes: impl AsRef<[u8]>, want: Want) -> Vector {
    Vector {
        name,
        bytes: bytes.as_ref().to_vec(),
        want,
    }
}

const R400: Want = Want::Refused(&[400]);
const S1: Want = Want::Served(1);

/// A POST head with `headers` (each line with its CRLF), then `body`.
fn post(headers: &str, body: &str) -> String {
    format!("POST /v HTTP/1.1\r\nhost: a\r\n{headers}\r\n{body}")
}

fn smuggled(i: usize) -> String {
    format!("GET /SMUGGLED-{i} HTTP/1.1\r\nhost: a\r\n\r\n")
}

fn corpus() -> Vec<Vector> {
    let inner = smuggled(0);
    let inner_len = inner.len();
    let many_headers: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let tiny_chunks: String = "1\r\na\r\n".repeat(1000);
    vec![
        // --- CL.TE and TE.CL: both framings, either order ---
        v(
            "CL.TE",
            post(
                "content-length: 6\r\ntransfer-encoding: chunked\r\n",
                "0\r\n\r\nG",
            ),
            R400,
        ),
        v(
            "TE.CL",
            post(
                "transfer-encoding: chunked\r\ncontent-length: 3\r\n",
                "8\r\nSMUGGLED\r\n0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "CL.TE with an inner request",
            post(
                &format!(
                    "content-length: {}\r\ntransfer-encoding: chunked\r\n",
                    inner_len + 5
                ),
                &format!("0\r\n\r\n{inner}"),
            ),
            R400,
        ),
        v(
            "TE.CL with an inner request",
            post(
                "transfer-encoding: chunked\r\ncontent-length: 4\r\n",
                &format!("{:x}\r\n{inner}\r\n0\r\n\r\n", inner_len),
            ),
            R400,
        ),
        v(
            "CL.TE, mixed case names",
            post(
                "Content-length: 5\r\nTransfer-encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "CL.TE, TE value in caps",
            post(
                "content-length: 5\r\ntransfer-encoding: CHUNKED\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "CL.TE, TE with leading spaces",
            post(
                "content-length: 5\r\ntransfer-encoding:    chunked\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "CL.TE, TE with a tab",
            post(
                "content-length: 5\r\ntransfer-encoding:\tchunked\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "CL.TE, CL of 0",
            post(
                "content-length: 0\r\ntransfer-encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "CL between two TE lines",
            post(
                "transfer-encoding: chunked\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "CL.TE, bad CL value",
            post(
                "transfer-encoding: chunked\r\ncontent-length: x\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        // --- TE obfuscations ---
        v(
            "TE: xchunked",
            post("transfer-encoding: xchunked\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: xchunked with CL",
            post(
                "transfer-encoding: xchunked\r\ncontent-length: 5\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "TE: chunked, identity",
            post("transfer-encoding: chunked, identity\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: identity, chunked",
            post("transfer-encoding: identity, chunked\r\n", "0\r\n\r\n"),
            Want::Refused(&[501]),
        ),
        v(
            "TE: gzip, chunked",
            post("transfer-encoding: gzip, chunked\r\n", "0\r\n\r\n"),
            Want::Refused(&[501]),
        ),
        v(
            "TE: chunked twice in one line",
            post("transfer-encoding: chunked, chunked\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: duplicated lines",
            post(
                "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "TE: chunked then identity line",
            post(
                "transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "TE: vertical tab",
            post("transfer-encoding:\x0bchunked\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: form feed",
            post("transfer-encoding:\x0cchunked\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: space before the colon",
            post("transfer-encoding : chunked\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: leading space on the line",
            post(" transfer-encoding: chunked\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: obs-fold",
            post("transfer-encoding:\r\n chunked\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: obs-fold after another header",
            post("x-a: 1\r\n transfer-encoding: chunked\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: chunked;q=1",
            post("transfer-encoding: chunked;q=1\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: quoted",
            post("transfer-encoding: \"chunked\"\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: trailing comma",
            post("transfer-encoding: chunked,\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE: leading empty element",
            post(
                "transfer-encoding: , chunked\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            S1,
        ),
        v(
            "TE: caps",
            post("transfer-encoding: CHUNKED\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            S1,
        ),
        v(
            "TE: tab before value",
            post("transfer-encoding:\tchunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            S1,
        ),
        v(
            "TE: trailing spaces",
            post(
                "transfer-encoding: chunked   \r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            S1,
        ),
        v(
            "TE: NUL inside",
            post("transfer-encoding: chun\0ked\r\n", "0\r\n\r\n"),
            R400,
        ),
        v(
            "TE on HTTP/1.0",
            "POST /v HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            R400,
        ),
        v(
            "TE on HTTP/1.0 with CL",
            "POST /v HTTP/1.0\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            R400,
        ),
        v(
            "TE named in Connection",
            post(
                "transfer-encoding: chunked\r\nconnection: transfer-encoding\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            S1,
        ),
        // --- CL variants ---
        v("CL: +5", post("content-length: +5\r\n", "hello"), R400),
        v(
            "CL: trailing space",
            post("content-length: 5 \r\n", "hello"),
            S1,
        ),
        v(
            "CL: leading spaces",
            post("content-length:   5\r\n", "hello"),
            S1,
        ),
        v("CL: 0x5", post("content-length: 0x5\r\n", "hello"), R400),
        v("CL: 05", post("content-length: 05\r\n", "hello"), S1),
        v(
            "CL: list of equal values",
            post("content-length: 5, 5\r\n", "hello"),
            R400,
        ),
        v(
            "CL: list of values",
            post("content-length: 5, 6\r\n", "hello!"),
            R400,
        ),
        v(
            "CL: duplicated, equal",
            post("content-length: 5\r\ncontent-length: 5\r\n", "hello"),
            S1,
        ),
        v(
            "CL: duplicated, different",
            post("content-length: 5\r\ncontent-length: 6\r\n", "hello!"),
            R400,
        ),
        v(
            "CL: 2^64 + 4",
            post("content-length: 18446744073709551620\r\n", "hello"),
            R400,
        ),
        v(
            "CL: u64::MAX",
            post("content-length: 18446744073709551615\r\n", "hello"),
            Want::Refused(&[400, 413, 431]),
        ),
        v(
            "CL: 1 GB (over max_body)",
            post("content-length: 1000000000\r\n", "hello"),
            Want::Refused(&[413]),
        ),
        v("CL: -1", post("content-length: -1\r\n", "hello"), R400),
        v("CL: 5x", post("content-length: 5x\r\n", "hello"), R400),
        v("CL: empty", post("content-length: \r\n", "hello"), R400),
        v("CL: 5.0", post("content-length: 5.0\r\n", "hello"), R400),
        v("CL: NUL", post("content-length: 5\0\r\n", "hello"), R400),
        v(
            "CL: space before the colon",
            post("content-length : 5\r\n", "hello"),
            R400,
        ),
        v(
            "CL: obs-fold",
            post("content-length:\r\n 5\r\n", "hello"),
            R400,
        ),
        v(
            "CL: named in Connection",
            post(
                "content-length: 5\r\nconnection: content-length\r\n",
                "hello",
            ),
            S1,
        ),
        v(
            "CL: 0 then an inner request",
            post("content-length: 0\r\n", &inner),
            Want::Served(2),
        ),
        v(
            "CL: body holds a request",
            post(&format!("content-length: {inner_len}\r\n"), &inner),
            S1,
        ),
        v(
            "CL: longer than the body sent",
            post("content-length: 10\r\n", "0123"),
            S1,
        ),
        v(
            "CL: shorter than the body sent",
            post("content-length: 2\r\n", "hello"),
            S1,
        ),
        // --- line ends ---
        v("bare LF line ends", "GET /v HTTP/1.1\nhost: a\n\n", S1),
        v(
            "bare LF after the request line",
            "GET /v HTTP/1.1\nhost: a\r\n\r\n",
            S1,
        ),
        v("bare CR line ends", "GET /v HTTP/1.1\rhost: a\r\r", R400),
        v(
            "bare CR inside a value",
            "GET /v HTTP/1.1\r\nhost: a\r\nx: a\rb\r\n\r\n",
            R400,
        ),
        v(
            "bare CR after the request line",
            "GET /v HTTP/1.1\rhost: a\r\n\r\n",
            R400,
        ),
        v(
            "LF CR LF end of head",
            "GET /v HTTP/1.1\r\nhost: a\n\r\n",
            S1,
        ),
        v(
            "leading empty lines",
            "\r\n\r\nGET /v HTTP/1.1\r\nhost: a\r\n\r\n",
            S1,
        ),
        // --- NUL and control bytes ---
        v(
            "NUL in a name",
            "GET /v HTTP/1.1\r\nhost: a\r\nx\0y: 1\r\n\r\n",
            R400,
        ),
        v(
            "NUL in a value",
            "GET /v HTTP/1.1\r\nhost: a\r\nx: a\0b\r\n\r\n",
            R400,
        ),
        v(
            "SOH in a value",
            "GET /v HTTP/1.1\r\nhost: a\r\nx: a\x01b\r\n\r\n",
            R400,
        ),
        v(
            "DEL in a value",
            "GET /v HTTP/1.1\r\nhost: a\r\nx: a\x7fb\r\n\r\n",
            R400,
        ),
        v(
            "ESC in a name",
            "GET /v HTTP/1.1\r\nhost: a\r\nx\x1b: 1\r\n\r\n",
            R400,
        ),
        v(
            "NUL in the path",
            "GET /a\0b HTTP/1.1\r\nhost: a\r\n\r\n",
            R400,
        ),
        v(
            "NUL in the method",
            "G\0T /v HTTP/1.1\r\nhost: a\r\n\r\n",
            R400,
        ),
        v(
            "obs-text in a value",
            b"GET /v HTTP/1.1\r\nhost: a\r\nx: caf\xe9\r\n\r\n".as_slice(),
            S1,
        ),
        // --- chunked bodies ---
        v(
            "chunk size not hex",
            post("transfer-encoding: chunked\r\n", "zz\r\nhello\r\n0\r\n\r\n"),
            R400,
        ),
        v(
            "chunk extension",
            post(
                "transfer-encoding: chunked\r\n",
                "5;foo=bar\r\nhello\r\n0;x\r\n\r\n",
            ),
            S1,
        ),
        v(
            "chunk extension, quoted",
            post(
                "transfer-encoding: chunked\r\n",
                "5;a=\"b;c\"\r\nhello\r\n0\r\n\r\n",
            ),
            S1,
        ),
        v(
            "chunk extension with a bare LF",
            post("transfer-encoding: chunked\r\n", "5;a\nhello\r\n0\r\n\r\n"),
            R400,
        ),
        v(
            "chunk extension of 20 KiB",
            post(
                "transfer-encoding: chunked\r\n",
                &format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(20 * 1024)),
            ),
            R400,
        ),
        v(
            "chunk size with a leading space",
            post("transfer-encoding: chunked\r\n", " 5\r\nhello\r\n0\r\n\r\n"),
            R400,
        ),
        v(
            "chunk size with trailing spaces",
            post(
                "transfer-encoding: chunked\r\n",
                "5  \r\nhello\r\n0\r\n\r\n",
            ),
            S1,
        ),
        v(
            "chunk size 0x5",
            post(
                "transfer-encoding: chunked\r\n",
                "0x5\r\nhello\r\n0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "chunk size -5",
            post("transfer-encoding: chunked\r\n", "-5\r\nhello\r\n0\r\n\r\n"),
            R400,
        ),
        v(
            "chunk size line of 1000 zeros",
            post(
                "transfer-encoding: chunked\r\n",
                &format!("{}5\r\nhello\r\n0\r\n\r\n", "0".repeat(1000)),
            ),
            S1,
        ),
        v(
            "chunk size overflowing u64",
            post(
                "transfer-encoding: chunked\r\n",
                "1ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "chunk size with a bare LF",
            post("transfer-encoding: chunked\r\n", "5\nhello\r\n0\r\n\r\n"),
            R400,
        ),
        v(
            "chunk data without its CRLF",
            post("transfer-encoding: chunked\r\n", "5\r\nhelloX0\r\n\r\n"),
            R400,
        ),
        v(
            "chunk data longer than its size",
            post("transfer-encoding: chunked\r\n", "3\r\nhello\r\n0\r\n\r\n"),
            R400,
        ),
        v(
            "chunk data with a bare LF",
            post("transfer-encoding: chunked\r\n", "5\r\nhello\n0\r\n\r\n"),
            R400,
        ),
        v(
            "trailers",
            post(
                "transfer-encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n",
            ),
            S1,
        ),
        v(
            "a request in the trailers",
            post(
                "transfer-encoding: chunked\r\n",
                &format!("5\r\nhello\r\n0\r\n{inner}"),
            ),
            R400,
        ),
        v(
            "no last chunk, a request next",
            post(
                "transfer-encoding: chunked\r\n",
                &format!("5\r\nhello\r\n{inner}"),
            ),
            R400,
        ),
        v(
            "a thousand one-byte chunks",
            post(
                "transfer-encoding: chunked\r\n",
                &format!("{tiny_chunks}0\r\n\r\n"),
            ),
            S1,
        ),
        v(
            "chunked body holding a request",
            post(
                "transfer-encoding: chunked\r\n",
                &format!("{:x}\r\n{inner}\r\n0\r\n\r\n", inner_len),
            ),
            S1,
        ),
        // --- request-line tricks ---
        v(
            "absolute-form",
            "GET http://a/v HTTP/1.1\r\nhost: a\r\n\r\n",
            S1,
        ),
        v(
            "absolute-form, other host",
            "GET http://b.example/v HTTP/1.1\r\nhost: a\r\n\r\n",
            S1,
        ),
        v(
            "two spaces after the method",
            "GET  /v HTTP/1.1\r\nhost: a\r\n\r\n",
            R400,
        ),
        v(
            "tab after the method",
            "GET\t/v HTTP/1.1\r\nhost: a\r\n\r\n",
            R400,
        ),
        v(
            "space in the target",
            "GET /a b HTTP/1.1\r\nhost: a\r\n\r\n",
            R400,
        ),
        v(
            "junk after the version",
            "GET /a HTTP/1.1 x\r\nhost: a\r\n\r\n",
            R400,
        ),
        v("HTTP/0.9", "GET /v\r\n\r\n", R400),
        v("HTTP/1.2", "GET /v HTTP/1.2\r\nhost: a\r\n\r\n", R400),
        v(
            "HTTP/2.0 on HTTP/1",
            "GET /v HTTP/2.0\r\nhost: a\r\n\r\n",
            R400,
        ),
        v(
            "lower-case version",
            "GET /v http/1.1\r\nhost: a\r\n\r\n",
            R400,
        ),
        v(
            "lower-case method",
            "get /v HTTP/1.1\r\nhost: a\r\n\r\n",
            S1,
        ),
        v(
            "CONNECT",
            "CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n",
            Want::Refused(&[405]),
        ),
        v("no Host", "GET /v HTTP/1.1\r\n\r\n", R400),
        v(
            "two Hosts",
            "GET /v HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
            R400,
        ),
        // --- header names and sizes ---
        v(
            "space in a name",
            "GET /v HTTP/1.1\r\nhost: a\r\nx y: 1\r\n\r\n",
            R400,
        ),
        v(
            "space before a colon",
            "GET /v HTTP/1.1\r\nhost : a\r\n\r\n",
            R400,
        ),
        v(
            "no colon",
            "GET /v HTTP/1.1\r\nhost: a\r\nxyz\r\n\r\n",
            R400,
        ),
        v(
            "empty name",
            "GET /v HTTP/1.1\r\nhost: a\r\n: x\r\n\r\n",
            R400,
        ),
        v(
            "8000-byte name",
            format!(
                "GET /v HTTP/1.1\r\nhost: a\r\n{}: 1\r\n\r\n",
                "n".repeat(8000)
            ),
            S1,
        ),
        v(
            "head over max_header_bytes",
            format!(
                "GET /v HTTP/1.1\r\nhost: a\r\nx: {}\r\n\r\n",
                "v".repeat(70 * 1024)
            ),
            Want::Refused(&[431]),
        ),
        v(
            "150 headers",
            format!("GET /v HTTP/1.1\r\nhost: a\r\n{many_headers}\r\n"),
            Want::Refused(&[431]),
        ),
        // --- Expect: 100-continue ---
        v(
            "Expect with the body at once",
            post("content-length: 5\r\nexpect: 100-continue\r\n", "hello"),
            S1,
        ),
        v(
            "Expect, body holds a request",
            post(
                &format!("content-length: {inner_len}\r\nexpect: 100-continue\r\n"),
                &inner,
            ),
            S1,
        ),
        v(
            "Expect on a GET",
            "GET /v HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\n\r\n",
            S1,
        ),
        v(
            "Expect over max_body",
            post("content-length: 20000000\r\nexpect: 100-continue\r\n", ""),
            Want::Refused(&[413]),
        ),
        v(
            "Expect with CL.TE",
            post(
                "content-length: 5\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n",
                "0\r\n\r\n",
            ),
            R400,
        ),
        v(
            "Expect: garbage",
            post("content-length: 5\r\nexpect: 999-nope\r\n", "hello"),
            S1,
        ),
        // --- pipelines ---
        v(
            "two GETs",
            "GET /v HTTP/1.1\r\nhost: a\r\n\r\nGET /v2 HTTP/1.1\r\nhost: a\r\n\r\n",
            Want::Served(2),
        ),
        v(
            "GET, POST, GET",
            format!(
                "GET /v HTTP/1.1\r\nhost: a\r\n\r\n{}GET /v3 HTTP/1.1\r\nhost: a\r\n\r\n",
                post("content-length: 5\r\n", "hello")
            ),
            Want::Served(3),
        ),
        v(
            "twenty GETs",
            "GET /v HTTP/1.1\r\nhost: a\r\n\r\n".repeat(20),
            Want::Served(20),
        ),
        v(
            "GET then CL.TE",
            format!(
                "GET /v HTTP/1.1\r\nhost: a\r\n\r\n{}",
                post(
                    "content-length: 5\r\ntransfer-encoding: chunked\r\n",
                    "0\r\n\r\n"
                )
            ),
            Want::Served(1),
        ),
        v(
            "chunked POST then GET",
            format!(
                "{}GET /v2 HTTP/1.1\r\nhost: a\r\n\r\n",
                post("transfer-encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n")
            ),
            Want::Served(2),
        ),
        v(
            "HTTP/1.0 then more",
            "GET /v HTTP/1.0\r\n\r\nGET /SMUGGLED-1 HTTP/1.1\r\nhost: a\r\n\r\n",
            S1,
        ),
    ]
}

struct Answer {
    status: u16,
    request_id: Option<String>,
    body: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The pipelined canary was answered.
    Canary,
    Closed,
    /// Neither, within the wait: a hang.
    Open,
}

/// Reads answers (skipping 1xx) until the one carrying `canary` as its request id, the
/// connection's close, or `wait`.
async fn answers(s: &mut TcpStream, canary: &str, wait: Duration) -> (Vec<Answer>, End) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut closed = false;
    loop {
        // Take every whole answer in the buffer.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            let Ok(httparse::Status::Complete(head)) = resp.parse(&buf) else {
                break;
            };
            let status = resp.code.unwrap_or(0);
            let value = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
            };
            let request_id = value("x-request-id");
            let len = match value("content-length") {
                Some(v) => v.trim().parse::<usize>().unwrap_or(0),
                None if (100..200).contains(&status) => 0,
                // Until close (nothing rampart sends here, but read it whole).
                None if closed => buf.len() - head,
                None => break,
            };
            if buf.len() < head + len {
                break;
            }
            let body = buf[head..head + len].to_vec();
            buf.drain(..head + len);
            if (100..200).contains(&status) {
                continue;
            }
            let is_canary = request_id.as_deref() == Some(canary);
            out.push(Answer {
                status,
                request_id,
                body,
            });
            if is_canary {
                return (out, End::Canary);
            }
        }
        if closed {
            return (out, End::Closed);
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => closed = true,
            Err(_) => return (out, End::Open),
        }
    }
}

fn canary(id: &str) -> String {
    format!("GET /{id} HTTP/1.1\r\nhost: c\r\nx-request-id: {id}\r\n\r\n")
}

/// The access-log line of request `id`, waited for (it is written when the answer's body
/// is dropped), at most 5 s.
async fn access_line(id: &str) -> Option<String> {
    let needle = format!("request_id=\"{id}\"");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<String> = logs::lines_with(&needle)
            .into_iter()
            .filter(|l| l.contains("rampart::access"))
            .collect();
        if let Some(l) = lines.into_iter().next() {
            return Some(l);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every client-side vector, each followed by a pipelined canary on its connection and a
/// canary on a fresh one. Passes when, for every vector: the first answer is the one wanted
/// (never a 5xx but the 501 of an unknown coding, never a hang); a refused vector closes
/// its connection and sends nothing upstream; every request the recording upstream parsed
/// is one rampart logged (same request id, method and path) and none twice; the upstream
/// never failed to parse what it got; the fresh canary is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_smuggling_corpus_rampart_server() {
    client_side_smuggling_corpus("rampart").await;
}

/// The same corpus against hyper's HTTP/1.1 server, the reference the own one replaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_smuggling_corpus_hyper_server() {
    client_side_smuggling_corpus("hyper").await;
}

/// The corpus against the listener's `http1_server: server`; every failure names it. The
/// two servers run as two tests, side by side (canary ids carry the server's name).
async fn client_side_smuggling_corpus(server: &str) {
    logs::capture();
    let up = Recorder::start().await;
    let px = start(&one_route(&up.url(), "", &server_line(server))).await;
    let addr = px.addr("main").unwrap();
    let vectors = corpus();
    assert!(vectors.len() >= 80, "{} vectors", vectors.len());
    let started = std::time::Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    let mut seen_ids = std::collections::HashSet::new();
    for (i, vector) in vectors.iter().enumerate() {
        let fail = |failures: &mut Vec<String>, why: String| {
            failures.push(format!("{server} server #{i} {}: {why}", vector.name));
        };
        let before = up.count();
        let errors_before = up.errors().len();
        let id_a = format!("canary-{server}-{i}-a");
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut bytes = vector.bytes.clone();
        bytes.extend_from_slice(canary(&id_a).as_bytes());
        // The server may close before reading everything: a write error is an outcome too.
        let _ = s.write_all(&bytes).await;
        let (got, end) = answers(&mut s, &id_a, Duration::from_secs(3)).await;
        drop(s);
        let statuses: Vec<u16> = got.iter().map(|a| a.status).collect();
        let first = statuses.first().copied();

        // The fresh-connection canary.
        let id_b = format!("canary-{server}-{i}-b");
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(canary(&id_b).as_bytes()).await.unwrap();
        let (fresh, _) = answers(&mut s, &id_b, Duration::from_secs(3)).await;
        drop(s);
        match fresh.last() {
            Some(a) if a.status == 200 && a.body == format!("recorded /{id_b}").as_bytes() => {}
            _ => fail(&mut failures, "the fresh canary was not served".into()),
        }

        if end == End::Open {
            fail(&mut failures, format!("hung (answers {statuses:?})"));
        }
        if let Some(s) = statuses.iter().find(|&&s| s >= 500 && s != 501) {
            fail(&mut failures, format!("answered {s}"));
        }
        let upstream: Vec<Recorded> = up.requests()[before..].to_vec();
        let from_vector = upstream
            .iter()
            .filter(|r| r.header("x-request-id").as_deref() != Some(&id_a))
            .filter(|r| r.header("x-request-id").as_deref() != Some(&id_b))
            .count();
        match vector.want {
            Want::Refused(codes) => {
                if !first.is_some_and(|f| codes.contains(&f)) {
                    fail(&mut failures, format!("wanted {codes:?}, got {statuses:?}"));
                }
                if end != End::Closed {
                    fail(&mut failures, format!("connection left open ({end:?})"));
                }
                if from_vector != 0 {
                    fail(
                        &mut failures,
                        format!("{from_vector} request(s) reached the upstream"),
                    );
                }
            }
            Want::Served(n) => {
                if first != Some(200) || got[0].body.starts_with(b"{") {
                    fail(&mut failures, format!("not served: {statuses:?}"));
                }
                if from_vector != n {
                    fail(
                        &mut failures,
                        format!("{from_vector} upstream request(s), wanted {n}"),
                    );
                }
            }
        }
        // The canary on the same connection, if answered, was answered as itself.
        if let Some(a) = got.iter().find(|a| a.request_id.as_deref() == Some(&id_a))
            && !(a.status == 200 && a.body.ends_with(format!("/{id_a}").as_bytes()))
        {
            fail(
                &mut failures,
                format!(
                    "canary answered {} {:?}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                ),
            );
        }
        // Agreement: what the upstream parsed is what rampart logged.
        if up.errors().len() != errors_before {
            fail(
                &mut failures,
                format!(
                    "the upstream could not parse: {:?}",
                    &up.errors()[errors_before..]
                ),
            );
        }
        for r in &upstream {
            let Some(id) = r.header("x-request-id") else {
                fail(
                    &mut failures,
                    format!("upstream request without an id: {r:?}"),
                );
                continue;
            };
            if !seen_ids.insert(id.clone()) {
                fail(
                    &mut failures,
                    format!("request id {id} reached the upstream twice"),
                );
            }
            let path = r.target.split('?').next().unwrap_or_default();
            match access_line(&id).await {
                Some(line)
                    if line.contains(&format!("method={} ", r.method))
                        && line.contains(&format!("path={path} ")) => {}
                Some(line) => fail(
                    &mut failures,
                    format!(
                        "upstream connection {} saw {} {} but rampart logged {line}",
                        r.conn, r.method, r.target
                    ),
                ),
                None => fail(
                    &mut failures,
                    format!(
                        "upstream connection {} saw {} {} that rampart never logged",
                        r.conn, r.method, r.target
                    ),
                ),
            }
        }
        let outcome = match (first, &end) {
            (None, _) => format!("closed without an answer ({end:?})"),
            (Some(f), End::Canary) => format!("{f}, canary served"),
            (Some(f), _) => format!("{f}, closed"),
        };
        println!(
            "{server} #{i:3} {:<40} {outcome:<24} answers {statuses:?}, upstream {from_vector}",
            vector.name
        );
        *outcomes.entry(outcome).or_default() += 1;
    }
    println!(
        "\nsmuggling corpus ({server} server): {} vectors in {:.1?}, {} upstream requests, all agreed: {}",
        vectors.len(),
        started.elapsed(),
        up.count(),
        failures.is_empty()
    );
    for (outcome, n) in &outcomes {
        println!("  {n:4}  {outcome}");
    }
    assert!(
        failures.is_empty(),
        "{server} server: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    px.shutdown().await;
}
