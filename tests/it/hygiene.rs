//! Request hygiene at the edge: one spelling per path before routing (so a route's limits
//! cannot be escaped), Host and forwarding headers, transfer codings, CONNECT, HTTP/2
//! cookies; checked against a raw recording upstream.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;

use crate::support::recorder::{Recorded, Recorder};
use crate::support::*;

/// Listener `main` with `listener_extra`; route `rl` (`/rl`, case-insensitive, rate-limited
/// to `points` a minute per client) and route `all` (`/`), both to `up`.
fn limited(up: &str, points: u64, listener_extra: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: true }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
{listener_extra}
    routes:
      - name: rl
        match: {{ path_prefix: /rl, case_insensitive: true }}
        upstream: up
        rate_limits: [tight]
      - name: all
        match: {{ path_prefix: / }}
        upstream: up
upstreams:
  up:
    endpoints: ["{up}"]
    connect_timeout: 1s
rate_limits:
  tight: {{ points: {points}, per: 60s, store: memory }}
"#
    )
}

/// Writes `bytes` on a fresh connection and reads the first response head and its
/// Content-Length body (5 s at most).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
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
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

async fn get_raw(addr: SocketAddr, target: &str) -> (u16, String) {
    exchange(
        addr,
        format!("GET {target} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes(),
    )
    .await
}

/// The spellings of `/rl` that once reached the upstream past `/rl`'s limit.
const SPELLINGS: &[&str] = &["//rl", "/%72l", "/x/../rl", "/./rl", "/rl;x", "/RL"];

#[tokio::test]
async fn every_spelling_of_a_limited_path_is_limited() {
    let up = Recorder::start().await;
    let px = start(&limited(&up.url(), 1, "")).await;
    let addr = px.addr("main").unwrap();
    let (status, resp) = get_raw(addr, "/rl").await;
    assert_eq!(status, 200, "{resp}");
    for spelling in SPELLINGS {
        let (status, resp) = get_raw(addr, spelling).await;
        assert_eq!(status, 429, "{spelling} escaped the limit: {resp}");
    }
    // Another path is not limited, however it is written.
    let (status, resp) = get_raw(addr, "//other/./x").await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        up.requests()
            .iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>(),
        ["/rl", "//other/./x"]
    );
    px.shutdown().await;
}

#[tokio::test]
async fn paths_no_normal_form_can_hold_are_refused() {
    let up = Recorder::start().await;
    let px = start(&limited(&up.url(), 100, "    escaped_slashes: reject")).await;
    let addr = px.addr("main").unwrap();
    for (target, message) in [
        ("/rl%2fx", "encoded slash"),
        ("/rl%5Cx", "encoded slash"),
        ("/../rl", "above the root"),
        ("/a/%2e%2e/%2E%2E/rl", "above the root"),
        ("/rl%zz", "percent-encoding"),
        ("/a/..;x/rl", "dot segment with parameters"),
    ] {
        let (status, resp) = get_raw(addr, target).await;
        assert_eq!(status, 400, "{target}: {resp}");
        assert!(resp.contains(message), "{target}: {resp}");
    }
    assert_eq!(up.count(), 0);
    px.shutdown().await;

    // By default (`escaped_slashes: keep`) an encoded slash is part of its segment.
    let px = start(&limited(&up.url(), 1, "")).await;
    let addr = px.addr("main").unwrap();
    let (status, _) = get_raw(addr, "/rl").await;
    assert_eq!(status, 200);
    let (status, resp) = get_raw(addr, "/rl%2fx").await;
    assert_eq!(status, 200, "not /rl: {resp}");
    let (status, _) = get_raw(addr, "/rl/%2e/x%2F").await;
    assert_eq!(status, 429, "/rl/x%2F is below /rl");
    assert_eq!(up.requests()[1].target, "/rl%2fx", "forwarded as received");
    px.shutdown().await;
}

#[tokio::test]
async fn the_upstream_gets_the_path_as_received_unless_told_to_forward() {
    let up = Recorder::start().await;
    let px = start(&limited(&up.url(), 100, "")).await;
    let addr = px.addr("main").unwrap();
    for spelling in SPELLINGS {
        let target = format!("{spelling}?q=%2e%2E");
        let (status, resp) = get_raw(addr, &target).await;
        assert_eq!(status, 200, "{spelling}: {resp}");
        assert_eq!(up.requests().last().unwrap().target, target);
    }
    px.shutdown().await;

    let up = Recorder::start().await;
    let px = start(&limited(&up.url(), 100, "    normalize_path: forward")).await;
    let addr = px.addr("main").unwrap();
    for (spelling, forwarded) in [
        ("//rl", "/rl"),
        ("/%72l", "/rl"),
        ("/x/../rl", "/rl"),
        ("/./rl", "/rl"),
        ("/rl;x", "/rl;x"),
        ("/RL", "/RL"),
        ("/a//b/./c/../%7e%41%2a", "/a/b/~A%2A"),
    ] {
        let (status, resp) = get_raw(addr, &format!("{spelling}?q=%2e")).await;
        assert_eq!(status, 200, "{spelling}: {resp}");
        assert_eq!(
            up.requests().last().unwrap().target,
            format!("{forwarded}?q=%2e"),
            "{spelling}"
        );
    }
    // The limit is the same for every spelling there too.
    let px2 = start(&limited(&up.url(), 1, "    normalize_path: forward")).await;
    let addr2 = px2.addr("main").unwrap();
    assert_eq!(get_raw(addr2, "/%72%4c").await.0, 200);
    assert_eq!(get_raw(addr2, "/x/../rl;y").await.0, 429);
    px2.shutdown().await;
    px.shutdown().await;

    // `normalize_path: off` matches the raw path (the old behaviour, opt-in).
    let up = Recorder::start().await;
    let px = start(&limited(&up.url(), 1, "    normalize_path: off")).await;
    let addr = px.addr("main").unwrap();
    assert_eq!(get_raw(addr, "/rl").await.0, 200);
    assert_eq!(get_raw(addr, "//rl").await.0, 200);
    px.shutdown().await;
}

#[tokio::test]
async fn only_the_listeners_own_health_path_is_exempt_from_limits() {
    let up = Recorder::start().await;
    let yaml = limited(&up.url(), 1, "    health_path: /healthz").replace(
        "upstream: up\nupstreams:",
        "upstream: up\n        rate_limits: [tight]\nupstreams:",
    );
    assert!(yaml.contains("rate_limits: [tight]\nupstreams:"), "{yaml}");
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    // The listener's own health path: answered here, never counted, never forwarded.
    for _ in 0..3 {
        let (status, resp) = get_raw(addr, "/healthz").await;
        assert_eq!(status, 200, "{resp}");
        assert!(!resp.to_ascii_lowercase().contains("ratelimit"), "{resp}");
    }
    assert_eq!(up.count(), 0);
    // Other probe-like paths are ordinary paths on a traffic listener.
    let (status, _) = get_raw(addr, "/livez").await;
    assert_eq!(status, 200);
    for path in ["/livez", "/readyz", "/health", "/metrics"] {
        let (status, resp) = get_raw(addr, path).await;
        assert_eq!(status, 429, "{path}: {resp}");
    }
    assert_eq!(up.count(), 1);
    px.shutdown().await;
}

// === Host, transfer codings, methods ===

async fn status_of(addr: SocketAddr, head: &str) -> (u16, String) {
    exchange(addr, head.as_bytes()).await
}

#[tokio::test]
async fn http11_needs_exactly_one_valid_host() {
    let up = Recorder::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    for (head, want) in [
        ("GET /a HTTP/1.1\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a\r\nhost: a\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a\r\nHost: b\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: \r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a b\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a/b\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: user@a\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a:80x\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a:123456\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: [::1\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a,b\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a..b\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a\\b\r\n\r\n", 400),
        ("GET http://user@a/x HTTP/1.1\r\nhost: a\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a\r\n\r\n", 200),
        ("GET /a HTTP/1.1\r\nhost: A.example-1.com:8080\r\n\r\n", 200),
        ("GET /a HTTP/1.1\r\nhost: [::1]:80\r\n\r\n", 200),
        ("GET /a HTTP/1.1\r\nhost: 10.0.0.1\r\n\r\n", 200),
        ("GET /a HTTP/1.1\r\nhost: a_b.example.\r\n\r\n", 200),
        ("GET http://a/x HTTP/1.1\r\nhost: a\r\n\r\n", 200),
        // HTTP/1.0 may leave Host out; it may not send two.
        ("GET /a HTTP/1.0\r\n\r\n", 200),
        ("GET /a HTTP/1.0\r\nhost: a\r\nhost: b\r\n\r\n", 400),
    ] {
        let (status, resp) = status_of(addr, head).await;
        assert_eq!(status, want, "{head:?}: {resp}");
        if want == 400 {
            assert!(resp.contains("BAD_REQUEST"), "{head:?}: {resp}");
        }
    }
    assert_eq!(up.count(), 7);
    px.shutdown().await;
}

#[tokio::test]
async fn transfer_codings_other_than_chunked_are_not_implemented() {
    let up = Recorder::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let body = "5\r\nhello\r\n0\r\n\r\n";
    for (te, want) in [
        ("gzip, chunked", 501),
        ("deflate,chunked", 501),
        ("identity, chunked", 501),
        ("chunked, chunked", 400),
        // chunked not last: the length cannot be known, RFC 9112 6.3 says 400.
        ("gzip", 400),
        ("chunked, gzip", 400),
        ("chunked", 200),
        ("Chunked", 200),
    ] {
        let head = format!("POST /a HTTP/1.1\r\nhost: a\r\ntransfer-encoding: {te}\r\n\r\n{body}");
        let (status, resp) = status_of(addr, &head).await;
        assert_eq!(status, want, "{te}: {resp}");
        if want == 501 {
            assert!(resp.contains("NOT_IMPLEMENTED"), "{te}: {resp}");
            assert!(resp.to_ascii_lowercase().contains("connection: close"));
        }
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert!(reqs.iter().all(|r| r.body == b"hello"));
    px.shutdown().await;
}

#[tokio::test]
async fn connect_is_405_over_http1_and_http2() {
    let up = Recorder::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let (status, resp) = status_of(
        addr,
        "CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405, "{resp}");
    assert!(resp.contains("METHOD_NOT_ALLOWED"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("\r\nallow: "), "{resp}");

    let mut h2 = h2_client(addr).await;
    let req = Request::connect("example.com:443").body(()).unwrap();
    let (status, _) = h2_send(&mut h2, req, &[]).await;
    assert_eq!(status, 405);
    assert_eq!(up.count(), 0);
    px.shutdown().await;
}

type H2 = h2::client::SendRequest<Bytes>;

async fn h2_client(addr: SocketAddr) -> H2 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Sends `req` (with extra header lines `extra`, appended so names may repeat) and returns
/// the status and body; status 0 for a stream reset.
async fn h2_send(client: &mut H2, mut req: Request<()>, extra: &[(&str, &str)]) -> (u16, String) {
    for (k, v) in extra {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let fut = async {
        let c = client.clone().ready().await.unwrap();
        let mut c = c;
        let (resp, _) = c.send_request(req, true).ok()?;
        let resp = resp.await.ok()?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.ok()?;
            let _ = body.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        Some((status, String::from_utf8_lossy(&text).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .expect("h2 answer within 5 s")
        .unwrap_or((0, String::new()))
}

#[tokio::test]
async fn h2_authority_with_userinfo_is_malformed_and_cookies_are_joined() {
    let up = Recorder::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let mut h2 = h2_client(addr).await;

    let req = Request::get(format!("http://user:pw@{addr}/a"))
        .body(())
        .unwrap();
    let (status, body) = h2_send(&mut h2, req, &[]).await;
    assert!(status == 400 || status == 0, "{status} {body}");
    assert_eq!(up.count(), 0);

    let req = Request::get(format!("http://{addr}/c")).body(()).unwrap();
    let (status, _) = h2_send(&mut h2, req, &[("cookie", "a=1"), ("cookie", "b=2; c=3")]).await;
    assert_eq!(status, 200);
    let got: Recorded = up.requests().pop().unwrap();
    assert_eq!(got.all("cookie"), ["a=1; b=2; c=3"], "{got:?}");
    px.shutdown().await;
}

#[tokio::test]
async fn forwarded_and_x_real_ip_are_believed_only_from_trusted_proxies() {
    let up = Recorder::start().await;
    let req = "GET /a HTTP/1.1\r\nhost: a\r\nforwarded: for=6.6.6.6;proto=https\r\n\
               x-real-ip: 6.6.6.6\r\nx-forwarded-for: 6.6.6.6\r\n\r\n";
    let px = start(&one_route(&up.url(), "", "")).await;
    let (status, _) = status_of(px.addr("main").unwrap(), req).await;
    assert_eq!(status, 200);
    let got = up.requests().pop().unwrap();
    assert!(got.all("forwarded").is_empty(), "{got:?}");
    assert!(got.all("x-real-ip").is_empty(), "{got:?}");
    assert_eq!(got.all("x-forwarded-for"), ["127.0.0.1"]);
    px.shutdown().await;

    let trusted = one_route(&up.url(), "", "").replace(
        "listeners:",
        "trusted_proxies: [\"127.0.0.0/8\"]\nlisteners:",
    );
    let px = start(&trusted).await;
    let (status, _) = status_of(px.addr("main").unwrap(), req).await;
    assert_eq!(status, 200);
    let got = up.requests().pop().unwrap();
    assert_eq!(got.all("forwarded"), ["for=6.6.6.6;proto=https"]);
    assert_eq!(got.all("x-real-ip"), ["6.6.6.6"]);
    assert_eq!(got.all("x-forwarded-for"), ["6.6.6.6, 127.0.0.1"]);
    px.shutdown().await;
}
