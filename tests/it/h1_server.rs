//! The HTTP/1.1 server side (`listeners[].http1_server: rampart | hyper`): rampart's own
//! server is tested against hyper's, which it replaces. A differential battery (the same
//! raw bytes to a proxy of each kind, the normalised results compared), and hostile and
//! failing clients, each run against both servers.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rampart::demo::ChannelBody;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::support::{Upstream, one_route, start};

/// Both values of `http1_server`; hyper's first: it is the reference.
const SERVERS: [&str; 2] = ["hyper", "rampart"];

// === What differs per request, left out of every comparison (one place) ===

/// Response headers whose values differ per request or per moment.
const PER_REQUEST_RESPONSE: &[&str] = &["date", "x-request-id"];
/// Request headers the upstream sees that differ per request. `x-forwarded-for` is the
/// client's address, which the battery makes tell the vector and the proxy apart.
const PER_REQUEST_UPSTREAM: &[&str] = &["x-request-id", "x-forwarded-for", "traceparent"];
/// In bodies (rampart's own JSON errors), the request id is replaced by this.
const ID_MARK: &str = "<request-id>";

/// The listener lines for `server`: the head limits the battery probes (8 KiB of head,
/// 32 headers) and `header_read_timeout`.
fn listener_extra(server: &str, header_read_timeout: &str) -> String {
    format!(
        "    http1_server: {server}\n    header_read_timeout: {header_read_timeout}\n    max_header_bytes: 8KiB\n    max_headers: 32"
    )
}

// === The upstream: records what it parsed, answers by path ===

/// One request as the upstream saw it, per-request headers left out.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// A hyper HTTP/1.1 upstream. Paths: `/204`, `/304` (an ETag, no body), `/big` (1 MiB),
/// `/big4` (4 MiB), `/stream` (five chunks 20 ms apart, no length); anything else 200 with
/// `METHOD target body-length` (a HEAD gets its Content-Length and no body).
struct Mirror {
    addr: SocketAddr,
    /// (X-Forwarded-For, request).
    seen: Arc<Mutex<Vec<(String, Seen)>>>,
    task: JoinHandle<()>,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type TestBody = BoxBody<Bytes, Infallible>;

impl Mirror {
    async fn start() -> Mirror {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<(String, Seen)>>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(mirror(s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Mirror { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What came from client address `from`, in order.
    fn from(&self, from: Ipv4Addr) -> Vec<Seen> {
        let from = from.to_string();
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(xff, _)| *xff == from)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

async fn mirror(
    seen: Arc<Mutex<Vec<(String, Seen)>>>,
    req: Request<Incoming>,
) -> Response<TestBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let xff = parts
        .headers
        .get("x-forwarded-for")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(k, _)| !PER_REQUEST_UPSTREAM.contains(&k.as_str()))
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    headers.sort();
    let method = parts.method.as_str().to_string();
    let target = parts.uri.to_string();
    seen.lock().unwrap().push((
        xff,
        Seen {
            method: method.clone(),
            target: target.clone(),
            version: format!("{:?}", parts.version),
            headers,
            body: summary(&body),
        },
    ));
    match parts.uri.path() {
        "/204" => full(StatusCode::NO_CONTENT, Bytes::new()),
        "/304" => {
            let mut r = full(StatusCode::NOT_MODIFIED, Bytes::new());
            r.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
            r
        }
        "/big" => full(StatusCode::OK, vec![b'b'; 1 << 20]),
        "/big4" => full(StatusCode::OK, vec![b'c'; 4 << 20]),
        "/stream" => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                for i in 0..5 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let part = Bytes::from(format!("part {i}\n"));
                    if tx.send(Ok(Frame::data(part))).await.is_err() {
                        return;
                    }
                }
            });
            let mut r = Response::new(ChannelBody(rx).boxed());
            r.headers_mut()
                .insert("content-type", "text/plain".parse().unwrap());
            r
        }
        _ => {
            let mut r = full(StatusCode::OK, format!("{method} {target} {}", body.len()));
            r.headers_mut()
                .insert("content-type", "text/plain".parse().unwrap());
            r
        }
    }
}

/// A body as text when short and UTF-8, else its length and hash.
fn summary(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if b.len() <= 300 => s.to_string(),
        _ => {
            // FNV-1a.
            let h = b.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &c| {
                (h ^ u64::from(c)).wrapping_mul(0x0100_0000_01b3)
            });
            format!("<{} bytes, fnv {h:016x}>", b.len())
        }
    }
}

// === The client side: steps, exchange, normalisation ===

#[derive(Clone)]
enum Step {
    Send(Vec<u8>),
    Sleep(u64),
    /// Wait (at most 2 s) until what was received contains this.
    Await(&'static str),
}

/// Everything received on one connection, and whether the server ended it.
struct Exchange {
    bytes: Vec<u8>,
    closed: bool,
}

/// Runs `steps` on a fresh connection from `from` while reading everything, until the
/// server closes or nothing arrives for 2 s after the last step (20 s at most).
async fn exchange(addr: SocketAddr, from: Ipv4Addr, steps: &[Step]) -> Exchange {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::V4(SocketAddrV4::new(from, 0)))
        .unwrap();
    let s = sock.connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let got: Arc<Mutex<Vec<u8>>> = Arc::default();
    let written = Arc::new(AtomicBool::new(false));
    let writer = {
        let got = got.clone();
        let written = written.clone();
        async move {
            for step in steps {
                match step {
                    Step::Send(b) => {
                        // The server may close first: a failed write is an outcome too.
                        if w.write_all(b).await.is_err() {
                            break;
                        }
                    }
                    Step::Sleep(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
                    Step::Await(text) => {
                        let until = Instant::now() + Duration::from_secs(2);
                        while Instant::now() < until
                            && !String::from_utf8_lossy(&got.lock().unwrap()).contains(text)
                        {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            }
            written.store(true, Ordering::SeqCst);
            // Kept open (dropping it would shut the write side down) until the reading ends.
            w
        }
    };
    let reader = async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(2), r.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => got.lock().unwrap().extend_from_slice(&chunk[..n]),
                Err(_) if written.load(Ordering::SeqCst) => return false,
                Err(_) => {}
            }
        }
    };
    let both = async { tokio::join!(writer, reader) };
    let closed = match tokio::time::timeout(Duration::from_secs(20), both).await {
        Ok((_w, closed)) => closed,
        Err(_) => false,
    };
    let bytes = std::mem::take(&mut *got.lock().unwrap());
    Exchange { bytes, closed }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Resp {
    status_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// One vector's result against one proxy, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Normal {
    responses: Vec<Resp>,
    /// Bytes after the last whole response (none, normally).
    rest: String,
    closed: bool,
    upstream: Vec<Seen>,
}

impl Normal {
    fn finals(&self) -> Vec<u16> {
        self.responses
            .iter()
            .map(|r| code(&r.status_line))
            .filter(|c| *c >= 200)
            .collect()
    }

    fn without_1xx(&self) -> Normal {
        let mut n = self.clone();
        n.responses.retain(|r| code(&r.status_line) >= 200);
        n
    }

    fn codes(&self) -> Vec<u16> {
        self.responses
            .iter()
            .map(|r| code(&r.status_line))
            .collect()
    }

    fn show(&self) -> String {
        let mut out = String::new();
        for r in &self.responses {
            out.push_str(&format!("    {}\n", r.status_line));
            for (k, v) in &r.headers {
                out.push_str(&format!("      {k}: {v}\n"));
            }
            out.push_str(&format!("      body {:?}\n", r.body));
        }
        out.push_str(&format!(
            "    rest {:?}, closed {}\n",
            self.rest, self.closed
        ));
        for s in &self.upstream {
            out.push_str(&format!("    upstream {s:?}\n"));
        }
        out
    }
}

fn code(status_line: &str) -> u16 {
    status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A chunked body at the start of `b`: (data, bytes taken), None if incomplete or bad.
fn dechunk(b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let line_end = |from: usize| {
        b[from..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    };
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let eol = line_end(i)?;
        let line = std::str::from_utf8(&b[i..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        i = eol + 2;
        if size == 0 {
            loop {
                let eol = line_end(i)?;
                let empty = eol == i;
                i = eol + 2;
                if empty {
                    return Some((body, i));
                }
            }
        }
        if b.len() < i + size + 2 {
            return None;
        }
        body.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
}

/// Splits what a proxy sent into responses. `head_at`: which final answers (0-based) are
/// to HEAD requests (no body whatever their headers say).
fn responses(bytes: &[u8], closed: bool, head_at: &[usize]) -> (Vec<Resp>, String) {
    let mut out = Vec::new();
    let mut buf = bytes;
    let mut finals = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = resp.parse(buf) else {
            break;
        };
        let status = resp.code.unwrap_or(0);
        let version = if resp.version == Some(0) {
            "1.0"
        } else {
            "1.1"
        };
        let status_line = format!(
            "HTTP/{version} {status} {}",
            resp.reason.unwrap_or_default()
        );
        let all: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let value = |n: &str| all.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let id = value("x-request-id");
        let is_final = status >= 200;
        let no_body = !is_final || status == 204 || status == 304 || head_at.contains(&finals);
        let rest = &buf[head..];
        let (body, used) = if no_body {
            (Vec::new(), 0)
        } else if value("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            match dechunk(rest) {
                Some(x) => x,
                None => break,
            }
        } else if let Some(n) = value("content-length").and_then(|v| v.trim().parse::<usize>().ok())
        {
            if rest.len() < n {
                break;
            }
            (rest[..n].to_vec(), n)
        } else if closed {
            (rest.to_vec(), rest.len())
        } else {
            break;
        };
        let mut body = summary(&body);
        if let Some(id) = id.filter(|id| !id.is_empty()) {
            body = body.replace(&id, ID_MARK);
        }
        let mut headers: Vec<(String, String)> = all
            .into_iter()
            .filter(|(k, _)| !PER_REQUEST_RESPONSE.contains(&k.as_str()))
            .collect();
        headers.sort();
        out.push(Resp {
            status_line,
            headers,
            body,
        });
        buf = &buf[head + used..];
        if is_final {
            finals += 1;
        }
    }
    let rest = String::from_utf8_lossy(&buf[..buf.len().min(300)]).into_owned();
    (out, rest)
}

// === The battery ===

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cmp {
    /// Every normalised field.
    Full,
    /// An error the server answers itself (a parse error, say): hyper's is a bare answer,
    /// the own server's may carry other headers or a body. Only the statuses, the close and
    /// the upstream (nothing) are compared.
    StatusAndClose,
    /// All but interim (1xx) answers: a server may leave out the `100 Continue` when the
    /// body came with the head (RFC 9110, 10.1.1); hyper sends it anyway.
    FullBut1xx,
}

struct Vector {
    name: &'static str,
    steps: Vec<Step>,
    head_at: &'static [usize],
    cmp: Cmp,
    /// The final statuses hyper answers (the reference is checked too, so that the
    /// battery proves something while both values still run hyper).
    want: &'static [u16],
    /// Requests that reach the upstream.
    upstream: usize,
}

impl Vector {
    fn head_at(mut self, at: &'static [usize]) -> Vector {
        self.head_at = at;
        self
    }
    fn but_1xx(mut self) -> Vector {
        self.cmp = Cmp::FullBut1xx;
        self
    }
    fn status_only(mut self) -> Vector {
        self.cmp = Cmp::StatusAndClose;
        self
    }
}

fn v(name: &'static str, bytes: impl AsRef<[u8]>, want: &'static [u16], upstream: usize) -> Vector {
    steps(
        name,
        vec![Step::Send(bytes.as_ref().to_vec())],
        want,
        upstream,
    )
}

fn steps(name: &'static str, steps: Vec<Step>, want: &'static [u16], upstream: usize) -> Vector {
    Vector {
        name,
        steps,
        head_at: &[],
        cmp: Cmp::Full,
        want,
        upstream,
    }
}

/// A refused request: its status, nothing upstream, statuses and close compared only.
fn refused(name: &'static str, bytes: impl AsRef<[u8]>, want: &'static [u16]) -> Vector {
    v(name, bytes, want, 0).status_only()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n")
}

fn post(headers: &str, body: &str) -> String {
    format!("POST /p HTTP/1.1\r\nhost: a\r\n{headers}\r\n{body}")
}

fn battery() -> Vec<Vector> {
    let mib = "m".repeat(1 << 20);
    let chunked_mib: String = (0..16)
        .map(|_| format!("10000\r\n{}\r\n", "k".repeat(0x10000)))
        .collect::<String>()
        + "0\r\n\r\n";
    let tiny_chunks = "1\r\nx\r\n".repeat(500) + "0\r\n\r\n";
    let head_split: Vec<Step> = get("/split")
        .into_bytes()
        .chunks(3)
        .flat_map(|c| [Step::Send(c.to_vec()), Step::Sleep(5)])
        .collect();
    let pad = |n: usize| {
        format!(
            "GET /pad HTTP/1.1\r\nhost: a\r\nx-pad: {}\r\n\r\n",
            "p".repeat(n)
        )
    };
    // Head sizes around max_header_bytes (8 KiB): the head above is 39 bytes plus the pad.
    let just_under = pad(8192 - 39 - 200);
    let just_over = pad(8192 - 39 + 200);
    let headers = |n: usize| -> String {
        let lines: String = (0..n).map(|i| format!("x-h{i}: v\r\n")).collect();
        format!("GET /hdrs HTTP/1.1\r\nhost: a\r\n{lines}\r\n")
    };
    vec![
        // --- methods and targets ---
        v("GET", get("/get?q=1"), &[200], 1),
        v("HEAD", "HEAD /head HTTP/1.1\r\nhost: a\r\n\r\n", &[200], 1).head_at(&[0]),
        v(
            "POST with a body",
            post("content-length: 5\r\n", "hello"),
            &[200],
            1,
        ),
        v(
            "PUT with a body",
            "PUT /put HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc",
            &[200],
            1,
        ),
        v("DELETE", "DELETE /d HTTP/1.1\r\nhost: a\r\n\r\n", &[200], 1),
        v(
            "OPTIONS",
            "OPTIONS /o HTTP/1.1\r\nhost: a\r\n\r\n",
            &[200],
            1,
        ),
        // No route matches `*` (routes match paths): rampart's own 404, from either server.
        v(
            "OPTIONS *",
            "OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n",
            &[404],
            0,
        ),
        v(
            "absolute-form target",
            "GET http://a/abs?x=1 HTTP/1.1\r\nhost: a\r\n\r\n",
            &[200],
            1,
        ),
        v(
            "absolute-form target naming another host",
            "GET http://b:8080/abs HTTP/1.1\r\nhost: a\r\n\r\n",
            &[200],
            1,
        ),
        v(
            "unknown method",
            "PURGE /x HTTP/1.1\r\nhost: a\r\n\r\n",
            &[200],
            1,
        ),
        v(
            "lower-case method",
            "get /lc HTTP/1.1\r\nhost: a\r\n\r\n",
            &[200],
            1,
        ),
        v(
            "odd query and escapes",
            get("/a%2Fb/../c?a=%20&b=%zz#frag"),
            &[200],
            1,
        ),
        v(
            "GET with a body",
            "GET /gb HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nbody",
            &[200],
            1,
        ),
        // --- versions and connection management ---
        v("HTTP/1.0", "GET /ten HTTP/1.0\r\n\r\n", &[200], 1),
        v(
            "HTTP/1.0 keep-alive",
            "GET /ten HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n",
            &[200],
            1,
        ),
        v(
            "HTTP/1.0 keep-alive, two requests",
            "GET /ten1 HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /ten2 HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
            &[200, 200],
            2,
        ),
        v(
            "Connection: close",
            "GET /c HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
            &[200],
            1,
        ),
        v(
            "close on the second of three",
            format!(
                "{}GET /c2 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n{}",
                get("/c1"),
                get("/c3")
            ),
            &[200, 200],
            2,
        ),
        v(
            "Connection with many tokens",
            "GET /tok HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, x-drop, Upgrade\r\nx-drop: 1\r\n\r\n",
            &[200],
            1,
        ),
        v(
            "two pipelined",
            format!("{}{}", get("/1"), get("/2")),
            &[200, 200],
            2,
        ),
        v(
            "ten pipelined",
            (0..10).map(|i| get(&format!("/n{i}"))).collect::<String>(),
            &[200; 10],
            10,
        ),
        v(
            "pipelined GET, POST, HEAD, GET",
            format!(
                "{}{}HEAD /h HTTP/1.1\r\nhost: a\r\n\r\n{}",
                get("/g1"),
                post("content-length: 2\r\n", "hi"),
                get("/g2")
            ),
            &[200, 200, 200, 200],
            4,
        )
        .head_at(&[2]),
        v(
            "pipelined, the second malformed",
            format!(
                "{}GET /x HTTP/1.1\r\nhost: a\r\nbad header\r\n\r\n",
                get("/ok")
            ),
            &[200, 400],
            1,
        )
        .status_only(),
        v(
            "leading empty lines",
            format!("\r\n\r\n{}", get("/lead")),
            &[200],
            1,
        ),
        // --- Expect: 100-continue ---
        steps(
            "Expect, body after the 100",
            vec![
                Step::Send(post("content-length: 5\r\nexpect: 100-continue\r\n", "").into_bytes()),
                Step::Await("100 Continue"),
                Step::Send(b"hello".to_vec()),
            ],
            &[200],
            1,
        ),
        v(
            "Expect, body without waiting",
            post("content-length: 5\r\nexpect: 100-continue\r\n", "hello"),
            &[200],
            1,
        )
        .but_1xx(),
        steps(
            "Expect, chunked body after the 100",
            vec![
                Step::Send(
                    post("transfer-encoding: chunked\r\nexpect: 100-continue\r\n", "").into_bytes(),
                ),
                Step::Await("100 Continue"),
                Step::Send(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
            ],
            &[200],
            1,
        ),
        v(
            "Expect over max_body",
            post("content-length: 20000000\r\nexpect: 100-continue\r\n", ""),
            &[413],
            0,
        )
        .status_only(),
        // --- chunked bodies ---
        v(
            "chunked",
            post("transfer-encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            &[200],
            1,
        ),
        v(
            "chunked with extensions",
            post(
                "transfer-encoding: chunked\r\n",
                "5;a=b;c\r\nhello\r\n0;z=1\r\n\r\n",
            ),
            &[200],
            1,
        ),
        v(
            "chunked with trailers",
            post(
                "transfer-encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\nx-trailer: t\r\nx-two: 2\r\n\r\n",
            ),
            &[200],
            1,
        ),
        v(
            "chunked, upper-case hex",
            post(
                "transfer-encoding: chunked\r\n",
                "A\r\n0123456789\r\n1F\r\n0123456789012345678901234567890\r\n0\r\n\r\n",
            ),
            &[200],
            1,
        ),
        v(
            "chunked, 500 one-byte chunks",
            post("transfer-encoding: chunked\r\n", &tiny_chunks),
            &[200],
            1,
        ),
        v(
            "chunked, 1 MiB in 64 KiB chunks",
            post("transfer-encoding: chunked\r\n", &chunked_mib),
            &[200],
            1,
        ),
        refused(
            "chunked, bad size",
            post("transfer-encoding: chunked\r\n", "zz\r\nhello\r\n0\r\n\r\n"),
            &[400],
        ),
        refused(
            "chunked, size overflows",
            post(
                "transfer-encoding: chunked\r\n",
                "fffffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
            ),
            &[400],
        ),
        refused(
            "chunked, no CRLF after the data",
            post("transfer-encoding: chunked\r\n", "5\r\nhelloXX0\r\n\r\n"),
            &[400],
        ),
        // --- Content-Length ---
        v(
            "CL 1 MiB",
            post(&format!("content-length: {}\r\n", 1 << 20), &mib),
            &[200],
            1,
        ),
        v(
            "CL: equal duplicates",
            post("content-length: 5\r\ncontent-length: 5\r\n", "hello"),
            &[200],
            1,
        ),
        refused(
            "CL: differing duplicates",
            post("content-length: 5\r\ncontent-length: 6\r\n", "hello!"),
            &[400],
        ),
        refused("CL: +5", post("content-length: +5\r\n", "hello"), &[400]),
        refused("CL: 0x5", post("content-length: 0x5\r\n", "hello"), &[400]),
        refused(
            "CL: huge",
            post("content-length: 99999999999999999999999\r\n", "hello"),
            &[400],
        ),
        refused(
            "CL: 1 GB",
            post("content-length: 1000000000\r\n", "hello"),
            &[413],
        ),
        v(
            "CL longer than the body sent",
            post("content-length: 10\r\n", "0123"),
            &[],
            0,
        ),
        // --- Transfer-Encoding ---
        refused(
            "TE: chunked, chunked",
            post("transfer-encoding: chunked, chunked\r\n", "0\r\n\r\n"),
            &[400],
        ),
        refused(
            "TE: gzip",
            post("transfer-encoding: gzip\r\n", "hello"),
            &[400],
        ),
        refused(
            "TE: identity",
            post("transfer-encoding: identity\r\n", "hello"),
            &[400],
        ),
        refused(
            "TE on HTTP/1.0",
            "POST /p HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            &[400],
        ),
        refused(
            "CL and TE",
            post(
                "content-length: 5\r\ntransfer-encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            &[400],
        ),
        // --- head syntax ---
        refused(
            "obs-fold",
            "GET /f HTTP/1.1\r\nhost: a\r\nx-a: 1\r\n  folded\r\n\r\n",
            &[400],
        ),
        refused(
            "space before a colon",
            "GET /s HTTP/1.1\r\nhost: a\r\nx-a : 1\r\n\r\n",
            &[400],
        ),
        refused(
            "NUL in a value",
            "GET /n HTTP/1.1\r\nhost: a\r\nx-a: a\0b\r\n\r\n",
            &[400],
        ),
        refused(
            "CR in a value",
            "GET /n HTTP/1.1\r\nhost: a\r\nx-a: a\rb\r\n\r\n",
            &[400],
        ),
        refused(
            "LF in a value",
            "GET /n HTTP/1.1\r\nhost: a\r\nx-a: a\nb\r\n\r\n",
            &[400],
        ),
        v(
            "bare LF line ends",
            "GET /lf HTTP/1.1\nhost: a\nx-a: 1\n\n",
            &[200],
            1,
        ),
        v(
            "obs-text in a value",
            "GET /o HTTP/1.1\r\nhost: a\r\nx-a: caf\u{e9} \u{ff}\r\n\r\n",
            &[200],
            1,
        ),
        v(
            "trailing spaces in a value",
            "GET /t HTTP/1.1\r\nhost: a\r\nx-a: v  \t\r\n\r\n",
            &[200],
            1,
        ),
        refused(
            "two spaces in the request line",
            "GET  /x HTTP/1.1\r\nhost: a\r\n\r\n",
            &[400],
        ),
        refused("no Host", "GET /x HTTP/1.1\r\n\r\n", &[400]),
        refused(
            "two Hosts",
            "GET /x HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
            &[400],
        ),
        refused("HTTP/1.2", "GET /x HTTP/1.2\r\nhost: a\r\n\r\n", &[400]),
        steps("a head split across many writes", head_split, &[200], 1),
        // --- sizes ---
        refused(
            "URI over 64 KiB",
            format!("GET /{} HTTP/1.1\r\nhost: a\r\n\r\n", "u".repeat(65 * 1024)),
            &[431],
        ),
        v("max_headers headers", headers(30), &[200], 1),
        refused("more headers than max_headers", headers(40), &[431]),
        v("a head just under max_header_bytes", just_under, &[200], 1),
        refused("a head just over max_header_bytes", just_over, &[431]),
        // --- what the upstream answers ---
        v("upstream 204", get("/204"), &[204], 1),
        v(
            "upstream 304",
            "GET /304 HTTP/1.1\r\nhost: a\r\nif-none-match: \"v1\"\r\n\r\n",
            &[304],
            1,
        ),
        v(
            "HEAD of a 1 MiB answer",
            "HEAD /big HTTP/1.1\r\nhost: a\r\n\r\n",
            &[200],
            1,
        )
        .head_at(&[0]),
        v("a 1 MiB answer", get("/big"), &[200], 1),
        v("a streamed answer", get("/stream"), &[200], 1),
        v(
            "204, 304, streamed, pipelined",
            format!("{}{}{}", get("/204"), get("/304"), get("/stream")),
            &[204, 304, 200],
            3,
        ),
    ]
}

/// The client address of vector `i` against `SERVERS[server]`: 127.0.(server+1).(i+1).
fn client_ip(server: usize, i: usize) -> Ipv4Addr {
    let server = u8::try_from(server + 1).unwrap();
    Ipv4Addr::new(127, server, 0, u8::try_from(i + 1).unwrap())
}

/// Every vector to a proxy of each kind (`http1_server: hyper` and `rampart`) on the same
/// upstream, all at once, each on its own connection from its own address; the results are
/// normalised and must agree (all of them, or only statuses, close and upstream for the
/// errors the server answers itself), and hyper's must be the statuses and upstream
/// requests each vector names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_requests_read_the_same_through_both_servers() {
    let up = Mirror::start().await;
    let mut proxies = Vec::new();
    for server in SERVERS {
        proxies.push(start(&one_route(&up.url(), "", &listener_extra(server, "10s"))).await);
    }
    let addrs: Vec<SocketAddr> = proxies.iter().map(|p| p.addr("main").unwrap()).collect();
    let vectors = battery();
    assert!(
        vectors.len() >= 60 && vectors.len() < 250,
        "{} vectors",
        vectors.len()
    );
    let started = Instant::now();
    let mut runs = Vec::new();
    for (i, vector) in vectors.iter().enumerate() {
        for (p, addr) in addrs.iter().enumerate() {
            let steps = vector.steps.clone();
            let (addr, from) = (*addr, client_ip(p, i));
            runs.push(tokio::spawn(
                async move { exchange(addr, from, &steps).await },
            ));
        }
    }
    let mut exchanges = Vec::new();
    for r in runs {
        exchanges.push(r.await.unwrap());
    }
    // What the upstream got is complete once every answer was read.
    let mut failures = Vec::new();
    for (i, vector) in vectors.iter().enumerate() {
        let normal: Vec<Normal> = (0..SERVERS.len())
            .map(|p| {
                let ex = &exchanges[i * SERVERS.len() + p];
                let (responses, rest) = responses(&ex.bytes, ex.closed, vector.head_at);
                Normal {
                    responses,
                    rest,
                    closed: ex.closed,
                    upstream: up.from(client_ip(p, i)),
                }
            })
            .collect();
        let (hyper, rampart) = (&normal[0], &normal[1]);
        let mut why = Vec::new();
        if hyper.finals() != vector.want {
            why.push(format!(
                "hyper answered {:?}, wanted {:?}",
                hyper.finals(),
                vector.want
            ));
        }
        if hyper.upstream.len() != vector.upstream {
            why.push(format!(
                "{} request(s) from hyper's side upstream, wanted {}",
                hyper.upstream.len(),
                vector.upstream
            ));
        }
        let agree = match vector.cmp {
            Cmp::Full => hyper == rampart,
            Cmp::FullBut1xx => hyper.without_1xx() == rampart.without_1xx(),
            Cmp::StatusAndClose => {
                hyper.codes() == rampart.codes()
                    && hyper.closed == rampart.closed
                    && hyper.upstream == rampart.upstream
            }
        };
        if !agree {
            why.push(format!("the servers differ ({:?} comparison)", vector.cmp));
        }
        println!(
            "#{i:2} {:<45} hyper {:?} closed {} upstream {}: {}",
            vector.name,
            hyper.codes(),
            hyper.closed,
            hyper.upstream.len(),
            if why.is_empty() { "ok" } else { "FAILED" }
        );
        if !why.is_empty() {
            failures.push(format!(
                "#{i} {}: {}\n  hyper:\n{}  rampart:\n{}",
                vector.name,
                why.join("; "),
                hyper.show(),
                rampart.show()
            ));
        }
    }
    println!(
        "h1 differential battery: {} vectors x {} servers in {:.1?}",
        vectors.len(),
        SERVERS.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} vectors failed:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
    for p in proxies {
        p.shutdown().await;
    }
}

// === Hostile and failing clients, each against both servers ===

/// A proxy with `http1_server: server`, `header_read_timeout: 1s`, to `url`.
async fn proxy(server: &str, url: &str, route_extra: &str) -> rampart::app::Running {
    start(&one_route(url, route_extra, &listener_extra(server, "1s"))).await
}

/// Reads until the server closes (or resets), at most `wait`: (bytes, when it ended).
async fn read_until_close(s: &mut TcpStream, wait: Duration) -> (Vec<u8>, Option<Instant>) {
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, Some(Instant::now())),
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            Err(_) => return (out, None),
        }
    }
}

/// Reads until `n` whole answers (to non-HEAD requests) arrived, the close, or `wait`.
async fn read_answers(s: &mut TcpStream, n: usize, wait: Duration) -> Vec<Resp> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (got, _) = responses(&buf, false, &[]);
        if got.iter().filter(|r| code(&r.status_line) >= 200).count() >= n {
            return got;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return responses(&buf, true, &[]).0,
        }
    }
}

fn assert_within(what: &str, took: Duration, lo: Duration, hi: Duration) {
    assert!(
        took >= lo && took <= hi,
        "{what}: took {took:?}, expected {lo:?} to {hi:?}"
    );
}

#[tokio::test]
async fn a_silent_client_is_closed_at_header_read_timeout_by_both_servers() {
    let up = Upstream::start().await;
    for server in SERVERS {
        let px = proxy(server, &up.url(), "").await;
        let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
        let opened = Instant::now();
        let (got, ended) = read_until_close(&mut s, Duration::from_secs(5)).await;
        let ended =
            ended.unwrap_or_else(|| panic!("{server} server: silent client still open after 5 s"));
        assert_within(
            &format!("{server} server, silent client closed"),
            ended - opened,
            Duration::from_millis(900),
            Duration::from_millis(2500),
        );
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 408"),
            "{server} server answered a silent client: {got:?}"
        );
        px.shutdown().await;
    }
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_head_trickled_a_byte_per_100ms_is_closed_at_header_read_timeout_by_both_servers() {
    let up = Upstream::start().await;
    for server in SERVERS {
        let px = proxy(server, &up.url(), "").await;
        let s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
        let opened = Instant::now();
        let (mut r, mut w) = s.into_split();
        // 60 bytes: 6 s of trickle, far past the 1 s allowed.
        let head = format!(
            "GET /ok HTTP/1.1\r\nhost: a\r\nx-slow: {}\r\n\r\n",
            "s".repeat(21)
        );
        assert_eq!(head.len(), 60);
        let writer = tokio::spawn(async move {
            for b in head.bytes() {
                if w.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Kept open until the trickle ends.
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let mut got = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut got)).await;
        let took = opened.elapsed();
        assert!(
            ended.is_ok() || took < Duration::from_secs(5),
            "{server} server: trickling client still open after 5 s"
        );
        assert_within(
            &format!("{server} server, trickling client closed"),
            took,
            Duration::from_millis(900),
            Duration::from_millis(2500),
        );
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 408"),
            "{server} server answered a trickled head: {got:?}"
        );
        writer.abort();
        px.shutdown().await;
    }
    assert_eq!(up.requests(), 0, "a trickled head reached the upstream");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_header_read_timeout_by_both_servers() {
    let up = Upstream::start().await;
    for server in SERVERS {
        let px = proxy(server, &up.url(), "").await;
        let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
        s.write_all(get("/ok").as_bytes()).await.unwrap();
        let got = read_answers(&mut s, 1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "{server} server: {got:?}");
        assert!(
            got[0].status_line.starts_with("HTTP/1.1 200"),
            "{server} server: {got:?}"
        );
        let answered = Instant::now();
        let (rest, ended) = read_until_close(&mut s, Duration::from_secs(5)).await;
        let ended = ended
            .unwrap_or_else(|| panic!("{server} server: idle keep-alive still open after 5 s"));
        assert_within(
            &format!("{server} server, idle keep-alive closed"),
            ended - answered,
            Duration::from_millis(800),
            Duration::from_millis(2500),
        );
        assert!(
            rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
            "{server} server sent on an idle connection: {:?}",
            String::from_utf8_lossy(&rest)
        );
        px.shutdown().await;
    }
}

/// What a client that sends a request and shuts its write side down gets.
#[derive(Debug, PartialEq, Eq)]
enum HalfClosed {
    Answered(Vec<u16>),
    ClosedUnanswered,
    Open,
}

/// A request, then shutdown(Write) before the answer (one the upstream gives at once, one
/// it delays 300 ms): hyper's outcome is recorded and the own server must do the same.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_is_treated_alike_by_both_servers() {
    let up = Upstream::start().await;
    for path in ["/ok", "/delay/300"] {
        let mut outcomes = Vec::new();
        for server in SERVERS {
            let px = proxy(server, &up.url(), "").await;
            let before = up.requests();
            let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
            s.write_all(get(path).as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            let (got, ended) = read_until_close(&mut s, Duration::from_secs(5)).await;
            let finals: Vec<u16> = responses(&got, true, &[])
                .0
                .iter()
                .map(|r| code(&r.status_line))
                .filter(|c| *c >= 200)
                .collect();
            let outcome = match (finals.is_empty(), ended) {
                (_, None) => HalfClosed::Open,
                (true, Some(_)) => HalfClosed::ClosedUnanswered,
                (false, Some(_)) => HalfClosed::Answered(finals),
            };
            println!(
                "{server} server, {path} then shutdown(Write): {outcome:?}, {} upstream",
                up.requests() - before
            );
            outcomes.push((outcome, up.requests() - before));
            px.shutdown().await;
        }
        assert_ne!(
            outcomes[0].0,
            HalfClosed::Open,
            "hyper left a half-closed client open ({path})"
        );
        assert_eq!(
            outcomes[0], outcomes[1],
            "{path} then shutdown(Write): hyper got (outcome, upstream requests) {:?}, rampart {:?}",
            outcomes[0], outcomes[1]
        );
    }
}

#[tokio::test]
async fn a_client_leaving_a_long_sse_stream_drops_the_upstream_connection_on_both_servers() {
    for server in SERVERS {
        let up = Upstream::start().await;
        let px = proxy(server, &up.url(), "").await;
        let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
        s.write_all(get("/sse?n=200&gap=100").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !String::from_utf8_lossy(&got).contains("data: event 1") {
            match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
                other => panic!(
                    "{server} server: no second event ({other:?}): {:?}",
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{server} server: {:?}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(
            up.counters.closed.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        drop(s);
        let left = Instant::now();
        while up.counters.closed.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                left.elapsed() < Duration::from_secs(2),
                "{server} server: the upstream connection outlived the client by 2 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "{server} server: upstream dropped {:?} after the client left",
            left.elapsed()
        );
        px.shutdown().await;
    }
}

/// A client that sends its next requests while the first still awaits its answer (an
/// upstream that takes 400 ms), one of them in two writes: nothing is lost or reordered,
/// and the bytes that come meanwhile are not taken for a client that left (the first
/// request is never given up).
#[tokio::test]
async fn requests_sent_while_the_first_awaits_its_answer_are_answered_in_order_by_both_servers() {
    let up = Upstream::start().await;
    for server in SERVERS {
        let px = proxy(server, &up.url(), "").await;
        let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
        let started = Instant::now();
        s.write_all(get("/delay/400").as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = get("/ok?second");
        s.write_all(&second.as_bytes()[..10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(&second.as_bytes()[10..]).await.unwrap();
        s.write_all(get("/delay/0?third").as_bytes()).await.unwrap();
        let got = read_answers(&mut s, 3, Duration::from_secs(5)).await;
        let took = started.elapsed();
        let bodies: Vec<&str> = got.iter().map(|r| r.body.as_str()).collect();
        assert_eq!(
            bodies,
            ["delayed", "ok", "delayed"],
            "{server} server: {got:?}"
        );
        assert!(
            got.iter()
                .all(|r| r.status_line.starts_with("HTTP/1.1 200")),
            "{server} server: {got:?}"
        );
        assert!(
            took >= Duration::from_millis(400),
            "{server} server: {took:?}"
        );
        px.shutdown().await;
    }
    assert_eq!(
        up.counters.cancelled.load(Ordering::SeqCst),
        0,
        "a request was given up"
    );
    assert_eq!(up.counters.requests.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn a_hundred_pipelined_gets_in_one_write_are_all_answered_in_order_by_both_servers() {
    let up = crate::support::recorder::Recorder::start().await;
    for server in SERVERS {
        let px = proxy(server, &up.url(), "").await;
        let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
        let all: String = (0..100).map(|i| get(&format!("/{server}/{i}"))).collect();
        s.write_all(all.as_bytes()).await.unwrap();
        let got = read_answers(&mut s, 100, Duration::from_secs(10)).await;
        assert_eq!(
            got.len(),
            100,
            "{server} server answered {} of 100",
            got.len()
        );
        for (i, r) in got.iter().enumerate() {
            assert!(
                r.status_line.starts_with("HTTP/1.1 200"),
                "{server} server, #{i}: {r:?}"
            );
            assert_eq!(
                r.body,
                format!("recorded /{server}/{i}"),
                "{server} server, answer #{i} out of order"
            );
        }
        px.shutdown().await;
    }
    assert!(up.errors().is_empty(), "{:?}", up.errors());
}

/// A raw upstream: `/early...` is answered 400 as soon as its head arrived, its body never
/// read, and the connection closed; anything else 200 `ok PATH`. Every path is recorded.
async fn early_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let paths: Arc<Mutex<Vec<String>>> = Arc::default();
    let p = paths.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let p = p.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                        p.lock().unwrap().push(path.clone());
                        if path.starts_with("/early") {
                            let _ = s
                                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\nconnection: close\r\n\r\nearly")
                                .await;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            return;
                        }
                        let body = format!("ok {path}");
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    (addr, paths, task)
}

/// The upstream answers 400 at once without reading a 1 MiB POST body made of request
/// heads; a GET follows in the same write. The GET is served as itself or the connection
/// closed; nothing of the body is ever read as a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_upstream_answer_never_lets_the_unread_body_be_read_as_requests_on_both_servers() {
    let (up, paths, task) = early_upstream().await;
    for server in SERVERS {
        let px = proxy(server, &format!("http://{up}"), "").await;
        let inner = "GET /SMUGGLED HTTP/1.1\r\nhost: a\r\n\r\n";
        let mut body = inner.repeat((1 << 20) / inner.len() + 1);
        body.truncate(1 << 20);
        let mut bytes = format!(
            "POST /early HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        bytes.push_str(&body);
        bytes.push_str(&get("/after"));
        let s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let _ = w.write_all(bytes.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut closed = false;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(3), r.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
                Ok(_) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        writer.abort();
        let (answers, rest) = responses(&got, closed, &[]);
        let finals: Vec<&Resp> = answers
            .iter()
            .filter(|a| code(&a.status_line) >= 200)
            .collect();
        println!(
            "{server} server: {:?}, closed {closed}, upstream saw {:?}",
            finals
                .iter()
                .map(|a| a.status_line.clone())
                .collect::<Vec<_>>(),
            paths.lock().unwrap()
        );
        assert!(
            paths
                .lock()
                .unwrap()
                .iter()
                .all(|p| !p.contains("SMUGGLED")),
            "{server} server: the body was read as requests: {:?}",
            paths.lock().unwrap()
        );
        assert!(!finals.is_empty(), "{server} server: no answer to the POST");
        assert!(
            [400, 502].contains(&code(&finals[0].status_line)),
            "{server} server: the POST was answered {:?}",
            finals[0]
        );
        match finals.get(1) {
            None => assert!(
                closed,
                "{server} server: the GET was neither served nor the connection closed"
            ),
            Some(a) => assert_eq!(
                (code(&a.status_line), a.body.as_str()),
                (200, "ok /after"),
                "{server} server: the second answer is not the GET's"
            ),
        }
        assert!(
            finals.len() <= 2 && rest.is_empty(),
            "{server} server: more answers than requests: {answers:?} {rest:?}"
        );
        paths.lock().unwrap().clear();
        px.shutdown().await;
    }
    task.abort();
}

/// `100 Continue` is the server's promise to read the body: none before a request the
/// proxy refuses unread (over the route's `max_body`); one, then the answer, for a request
/// it forwards, its body sent only after the 100; none before the 502 of an upstream that
/// is down (retries off: nothing to keep the body for).
#[tokio::test]
async fn expect_100_continue_is_sent_only_for_a_body_the_proxy_reads_on_both_servers() {
    let up = crate::support::recorder::Recorder::start().await;
    for server in SERVERS {
        let px = proxy(server, &up.url(), "        max_body: 16").await;
        let addr = px.addr("main").unwrap();
        // Refused unread: the 413 comes first, no 100 before it.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(post("content-length: 100\r\nexpect: 100-continue\r\n", "").as_bytes())
            .await
            .unwrap();
        let (got, _) = read_until_close(&mut s, Duration::from_secs(3)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("HTTP/1.1 413"),
            "{server} server, body over max_body: {got:?}"
        );
        // The upstream cannot be reached and retries are off (a retry would keep the body,
        // so read it first): the 502 comes unread, without a 100 before it.
        let (_refusing, down) = crate::support::refusing_addr();
        let px_down = start(
            &one_route(&format!("http://{down}"), "", &listener_extra(server, "1s")).replace(
                "connect_timeout: 1s",
                "connect_timeout: 1s\n    retry: { attempts: 1 }",
            ),
        )
        .await;
        let mut s = TcpStream::connect(px_down.addr("main").unwrap())
            .await
            .unwrap();
        s.write_all(post("content-length: 5\r\nexpect: 100-continue\r\n", "").as_bytes())
            .await
            .unwrap();
        let (got, _) = read_until_close(&mut s, Duration::from_secs(3)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("HTTP/1.1 502") && !got.contains("100 Continue"),
            "{server} server, upstream down: {got:?}"
        );
        drop(s);
        px_down.shutdown().await;
        // Forwarded: 100, then the body, then 200 with what the upstream got.
        let before = up.count();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(post("content-length: 5\r\nexpect: 100-continue\r\n", "").as_bytes())
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(3), s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
                other => panic!(
                    "{server} server: no 100 Continue ({other:?}): {:?}",
                    String::from_utf8_lossy(&head)
                ),
            }
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("HTTP/1.1 100 Continue\r\n"),
            "{server} server: {head:?}"
        );
        assert_eq!(
            up.count(),
            before,
            "{server} server: upstream answered before the body"
        );
        s.write_all(b"hello").await.unwrap();
        let got = read_answers(&mut s, 1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "{server} server: {got:?}");
        assert_eq!(got[0].body, "recorded /p", "{server} server: {got:?}");
        assert_eq!(up.requests()[before].body, b"hello", "{server} server");
        px.shutdown().await;
    }
}

#[tokio::test]
async fn a_websocket_upgrade_carries_bytes_both_ways_on_both_servers() {
    let up = Upstream::start().await;
    for server in SERVERS {
        let px = proxy(server, &up.url(), "").await;
        let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
        s.write_all(
            b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await {
                Ok(Ok(1)) => head.push(b[0]),
                other => panic!(
                    "{server} server: no 101 ({other:?}): {:?}",
                    String::from_utf8_lossy(&head)
                ),
            }
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{server} server: {head}");
        assert!(
            head.contains("upgrade: websocket"),
            "{server} server: {head}"
        );
        for msg in [b"hello".to_vec(), vec![b'w'; 200_000]] {
            let round = async {
                s.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).await.unwrap();
                back
            };
            let back = tokio::time::timeout(Duration::from_secs(3), round)
                .await
                .unwrap_or_else(|_| panic!("{server} server: no echo of {} bytes", msg.len()));
            assert!(
                back == msg,
                "{server} server: the echo of {} bytes differs",
                msg.len()
            );
        }
        // Closed first: an open tunnel would hold the shutdown's drain.
        drop(s);
        px.shutdown().await;
    }
}

/// A client that reads 16 KiB of a 4 MiB answer and stops is cut at the route's send
/// timeout (`timeouts.idle: 1s`); meanwhile other clients are served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_cut_at_the_send_timeout_without_harming_others_on_both_servers() {
    let up = Mirror::start().await;
    for server in SERVERS {
        let px = proxy(server, &up.url(), "        timeouts: { idle: 1s }").await;
        let addr = px.addr("main").unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut slow = socket.connect(addr).await.unwrap();
        slow.write_all(get("/big4").as_bytes()).await.unwrap();
        let asked = Instant::now();
        let mut first = vec![0u8; 16 * 1024];
        tokio::time::timeout(Duration::from_secs(3), slow.read_exact(&mut first))
            .await
            .unwrap_or_else(|_| panic!("{server} server: no first 16 KiB"))
            .unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"), "{server} server");
        // Others, meanwhile, for 2.5 s: each answered within 500 ms.
        let mut served = 0;
        while asked.elapsed() < Duration::from_millis(2500) {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let t = Instant::now();
            s.write_all(get("/other").as_bytes()).await.unwrap();
            let got = read_answers(&mut s, 1, Duration::from_secs(2)).await;
            assert!(
                got.len() == 1
                    && got[0].status_line.starts_with("HTTP/1.1 200")
                    && t.elapsed() < Duration::from_millis(500),
                "{server} server: another client was harmed ({:?}): {got:?}",
                t.elapsed()
            );
            served += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(served >= 5, "{server} server: only {served} other requests");
        // The slow one was cut: reading on gives less than the whole answer, then the end.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match slow.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => rest.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "{server} server: the slow reader's connection still open"
        );
        let total = first.len() + rest.len();
        println!(
            "{server} server: slow reader got {total} bytes of 4 MiB; its connection had ended when read again, {:?} after asking",
            asked.elapsed()
        );
        assert!(
            total < 4 << 20,
            "{server} server: the slow reader got the whole answer ({total} bytes)"
        );
        px.shutdown().await;
    }
}

/// A client that sends a POST with its whole body and then goes away, while the upstream
/// takes 3 s: the upstream exchange is given up at once (hyper's dispatcher notices the
/// EOF as soon as the body is read; rampart's server must too, though the body is read by
/// the upstream client, not by the connection).
#[tokio::test]
async fn a_client_that_leaves_after_its_request_body_cancels_the_upstream_exchange_on_both_servers()
{
    // With hyper's upstream client the body is read in another task than the connection's.
    for client in ["rampart", "hyper"] {
        for server in SERVERS {
            let up = Upstream::start().await;
            let yaml = one_route(&up.url(), "", &listener_extra(server, "1s")).replace(
                "    connect_timeout: 1s\n",
                &format!("    connect_timeout: 1s\n    client: {client}\n"),
            );
            let px = start(&yaml).await;
            let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
            // The body comes after the head: it is read from the socket by whoever reads
            // the body, not with the head.
            s.write_all(b"POST /delay/3000 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(b"abc").await.unwrap();
            // The upstream has the request before the client leaves.
            let asked = Instant::now();
            while up
                .counters
                .requests
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                assert!(
                    asked.elapsed() < Duration::from_secs(2),
                    "{server} server, {client} client: never asked"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(s);
            let left = Instant::now();
            while up
                .counters
                .cancelled
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                assert!(
                    left.elapsed() < Duration::from_secs(2),
                    "{server} server, {client} client: the upstream exchange outlived the client by 2 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            px.shutdown().await;
        }
    }
}
