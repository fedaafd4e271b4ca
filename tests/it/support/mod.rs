//! Fixtures: rampart started in-process from a config string, clients, raw sockets.

pub mod load;
pub mod logs;
pub mod postgres;
pub mod process;
pub mod recorder;
pub mod redis;
pub mod skip;
pub mod upstream;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rampart::app::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use upstream::{RawAction, RawUpstream, TlsUpstream, Upstream};

/// Polls a condition every 20 ms for up to 5 s instead of sleeping a fixed time.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!($($msg)+);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

pub fn parse(yaml: &str) -> rampart::config::Config {
    match rampart::config::parse_str(yaml, "test.yaml", &|_| None) {
        Ok(c) => c,
        Err(e) => panic!("test config invalid:\n{e}\n---\n{yaml}"),
    }
}

pub async fn start(yaml: &str) -> Running {
    rampart::app::start(parse(yaml))
        .await
        .expect("proxy starts")
}

/// As [`start`], with the listeners on `n` worker threads (as `rampart run` serves).
pub async fn start_on_workers(yaml: &str, n: usize) -> Running {
    let workers = rampart::workers::Workers::start(n).expect("worker threads start");
    rampart::app::start_on(parse(yaml), None, workers)
        .await
        .expect("proxy starts")
}

/// The value of the sample line that starts with `series` (name and labels, exactly).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// One listener `main` on port 0 with one route `/` to upstream `up` at `url`; `route_extra`
/// and `listener_extra` are YAML lines spliced in (indented to fit).
pub fn one_route(url: &str, route_extra: &str, listener_extra: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: true }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
{listener_extra}
    routes:
      - name: all
        match: {{ path_prefix: / }}
        upstream: up
{route_extra}
upstreams:
  up:
    endpoints: ["{url}"]
    connect_timeout: 1s
"#
    )
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn http1() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Sends and collects the whole body, bounded by 10 s.
pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
    let fut = async {
        let resp = client.request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (Response::from_parts(parts, ()), body)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("request finished within 10 s")
}

pub async fn send_streaming(client: &TestClient, req: Request<Full<Bytes>>) -> Response<Incoming> {
    tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("headers within 10 s")
        .expect("response")
}

/// Writes raw bytes and reads until the peer closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn json_field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let start = body.find(&pat)? + pat.len();
    let end = body[start..].find('"')? + start;
    Some(&body[start..end])
}

/// An address that refuses connections for as long as the returned socket lives: bound but
/// never listening, so no other test can be given the port in the meantime (a listener that
/// is bound and dropped frees the port for the next `bind(0)`).
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// Reads an SSE response body to its end (each frame within 5 s): the text, and when each
/// complete event (ended by a blank line) arrived.
pub async fn event_arrivals(body: Incoming) -> (String, Vec<std::time::Instant>) {
    let mut body = body;
    let mut text = String::new();
    let mut received = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("frame in time")
    {
        let frame = frame.expect("clean stream");
        if let Some(d) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(d));
            while received.len() < text.matches("\n\n").count() {
                received.push(std::time::Instant::now());
            }
        }
    }
    (text, received)
}
