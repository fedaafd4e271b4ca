//! The core proxy: forwarding over HTTP/1.1 and h2c, header hygiene, limits, streaming,
//! timeouts, upstream failures and cancellation.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::assert_eventually;
use crate::support::*;

#[tokio::test]
async fn forwards_over_http1_and_h2c_on_the_same_port() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();

    let (resp, body) = send(&http1(), get(addr, "/echo?x=1")).await;
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8_lossy(&body).to_string();
    assert!(body.contains("\"uri\":\"/echo?x=1\""), "{body}");
    assert!(body.contains("\"version\":\"HTTP/1.1\""), "{body}");

    let (resp, body) = send(&h2c(), get(addr, "/echo")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    // h2 downstream, HTTP/1.1 upstream.
    assert!(String::from_utf8_lossy(&body).contains("\"version\":\"HTTP/1.1\""));
    assert_eq!(up.requests(), 2);
    px.shutdown().await;
}

#[tokio::test]
async fn keep_alive_reuses_connections_both_sides() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    for status in sequential_gets(addr, 5).await {
        assert_eq!(status, "HTTP/1.1 200");
    }
    assert_eq!(up.requests(), 5);
    assert_eq!(
        up.counters.connections.load(Ordering::SeqCst),
        1,
        "the upstream connection is pooled"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn request_id_is_kept_or_created_and_echoed() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let mut req = get(addr, "/echo");
    req.headers_mut()
        .insert("x-request-id", "abc-123".parse().unwrap());
    let (resp, body) = send(&http1(), req).await;
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    assert!(String::from_utf8_lossy(&body).contains("\"x-request-id\":\"abc-123\""));

    let mut req = get(addr, "/echo");
    req.headers_mut()
        .insert("x-request-id", "bad id with spaces".parse().unwrap());
    let (resp, body) = send(&http1(), req).await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert!(String::from_utf8_lossy(&body).contains(&id));
    px.shutdown().await;
}

#[tokio::test]
async fn forwarded_headers_believe_only_trusted_proxies() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    // None sent: all four set (written after the client's headers, not through the map).
    let (resp, body) = send(&http1(), get(addr, "/echo")).await;
    let body = String::from_utf8_lossy(&body).to_string();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    for (name, value) in [
        ("x-forwarded-for", "127.0.0.1".to_string()),
        ("x-forwarded-proto", "http".to_string()),
        ("x-forwarded-host", addr.to_string()),
        ("x-request-id", id),
        ("host", up.addr.to_string()),
    ] {
        let field = format!("\"{name}\":\"{value}\"");
        assert_eq!(body.matches(&field).count(), 1, "{field} in {body}");
    }
    // Untrusted: a spoofed X-Forwarded-For is replaced by the socket peer.
    let mut req = get(addr, "/echo");
    req.headers_mut()
        .insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    req.headers_mut()
        .insert("x-forwarded-host", "evil.example".parse().unwrap());
    let (_, body) = send(&http1(), req).await;
    let body = String::from_utf8_lossy(&body).to_string();
    assert!(body.contains("\"x-forwarded-for\":\"127.0.0.1\""), "{body}");
    assert!(body.contains("\"x-forwarded-proto\":\"http\""), "{body}");
    assert!(
        body.contains(&format!("\"x-forwarded-host\":\"{addr}\"")),
        "{body}"
    );
    // Host is the upstream's, as nginx sends it.
    assert!(
        body.contains(&format!("\"host\":\"{}\"", up.addr)),
        "{body}"
    );
    px.shutdown().await;

    // Trusted: appended.
    let yaml = one_route(&up.url(), "", "").replace(
        "listeners:",
        "trusted_proxies: [\"127.0.0.0/8\"]\nlisteners:",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let mut req = get(addr, "/echo");
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    let (_, body) = send(&http1(), req).await;
    let body = String::from_utf8_lossy(&body).to_string();
    assert!(
        body.contains("\"x-forwarded-for\":\"203.0.113.9, 127.0.0.1\""),
        "{body}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let raw_req = b"GET /echo HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, x-client-secret\r\nx-client-secret: 1\r\nkeep-alive: timeout=9\r\nte: trailers\r\nproxy-authorization: basic x\r\nx-kept: yes\r\nconnection: close\r\n\r\n";
    let resp = raw(addr, raw_req, Duration::from_secs(5)).await;
    let lower = resp.to_ascii_lowercase();
    let (head, body) = lower.split_once("\r\n\r\n").unwrap();
    // Upstream side: what the upstream saw.
    assert!(body.contains("\"x-kept\":\"yes\""), "{body}");
    for h in [
        "x-client-secret",
        "keep-alive",
        "\"te\"",
        "proxy-authorization",
    ] {
        assert!(!body.contains(h), "{h} reached the upstream: {body}");
    }
    // Downstream side: the upstream's Connection-named and keep-alive headers are gone.
    assert!(!head.contains("x-upstream-secret"), "{head}");
    assert!(!head.contains("keep-alive: timeout=5"), "{head}");
    px.shutdown().await;
}

#[tokio::test]
async fn ambiguous_framing_is_refused_with_400() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let cl_te = b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    let resp = raw(addr, cl_te, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let two_cl =
        b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!";
    let resp = raw(addr, two_cl, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(up.requests(), 0, "nothing ambiguous reaches the upstream");

    // Pipelined behind a normal request on a keep-alive connection, in one write: hyper
    // parses the second head from its buffer, so only the byte-level guard can tell.
    let get = b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n";
    let both = [&get[..], cl_te].concat();
    let resp = raw(addr, &both, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(second_response(&resp).starts_with("HTTP/1.1 400"), "{resp}");
    assert!(
        resp.contains("Content-Length and Transfer-Encoding"),
        "{resp}"
    );
    assert_eq!(up.requests(), 1, "only the GET is forwarded");

    // Behind an upgrade request the upstream does not switch: still HTTP, still refused.
    let upgrade =
        b"GET /ok HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
    let both = [&upgrade[..], cl_te].concat();
    let resp = raw(addr, &both, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(second_response(&resp).starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(up.requests(), 2);
    px.shutdown().await;
}

/// What follows the first response of a raw exchange, from its status line.
fn second_response(resp: &str) -> &str {
    resp.get(1..)
        .and_then(|r| r.find("HTTP/1.1 "))
        .map_or("", |i| &resp[i + 1..])
}

#[tokio::test]
async fn oversized_bodies_get_413_before_the_upstream_sees_a_byte() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "        max_body: 1KiB", "")).await;
    let addr = px.addr("main").unwrap();
    // Declared length over the limit.
    let req = Request::post(format!("http://{addr}/echo"))
        .body(Full::new(Bytes::from(vec![b'a'; 2048])))
        .unwrap();
    let (resp, body) = send(&http1(), req).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(
        json_field(&String::from_utf8_lossy(&body), "code"),
        Some("PAYLOAD_TOO_LARGE")
    );
    // Chunked, no length: read up to the limit, then refused.
    let mut chunked =
        b"POST /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'b'; 512]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(addr, &chunked, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert_eq!(up.requests(), 0);
    // Under the limit, chunked: forwarded whole.
    let small = b"POST /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let resp = raw(addr, small, Duration::from_secs(5)).await;
    assert!(resp.contains("\"body_len\":5"), "{resp}");
    px.shutdown().await;
}

#[tokio::test]
async fn header_limits_answer_431() {
    let up = Upstream::start().await;
    let px = start(&one_route(
        &up.url(),
        "",
        "    max_headers: 20\n    max_header_bytes: 8KiB",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let mut many = b"GET /ok HTTP/1.1\r\nhost: a\r\n".to_vec();
    for i in 0..30 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let resp = raw(addr, &many, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    let big = format!(
        "GET /ok HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "v".repeat(20_000)
    );
    let resp = raw(addr, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_eq!(up.requests(), 0);
    px.shutdown().await;
}

#[tokio::test]
async fn slow_request_heads_and_idle_keepalive_are_cut_by_the_header_timeout() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "    header_read_timeout: 500ms")).await;
    let addr = px.addr("main").unwrap();
    // Slowloris: half a request head, then nothing.
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "connection not closed");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // An idle keep-alive connection is closed after the same timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "idle connection not closed");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    assert!(started.elapsed() < Duration::from_secs(3));
    px.shutdown().await;
}

#[tokio::test]
async fn no_route_is_404_json_and_routes_match_host_method_and_prefix() {
    let up = Upstream::start().await;
    let other = Upstream::start().await;
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    routes:
      - name: api-posts
        match: {{ path_prefix: /api, methods: [POST] }}
        upstream: other
      - name: by-host
        match: {{ path_prefix: /, host: special.example }}
        upstream: other
      - name: api
        match: {{ path_prefix: /api }}
        upstream: up
upstreams:
  up: {{ endpoints: ["{}"] }}
  other: {{ endpoints: ["{}"] }}
"#,
        up.url(),
        other.url()
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let (resp, body) = send(&http1(), get(addr, "/apix")).await;
    assert_eq!(resp.status(), 404);
    let body = String::from_utf8_lossy(&body);
    assert_eq!(json_field(&body, "code"), Some("NO_ROUTE"));
    assert!(json_field(&body, "request_id").is_some());
    assert_eq!(send(&http1(), get(addr, "/api/x")).await.0.status(), 200);
    assert_eq!((up.requests(), other.requests()), (1, 0));
    let post = Request::post(format!("http://{addr}/api/x"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&http1(), post).await.0.status(), 200);
    let mut hosted = get(addr, "/anything");
    hosted
        .headers_mut()
        .insert("host", "Special.Example:8080".parse().unwrap());
    assert_eq!(send(&http1(), hosted).await.0.status(), 200);
    assert_eq!((up.requests(), other.requests()), (1, 2));
    px.shutdown().await;
}

#[tokio::test]
async fn sse_events_reach_the_client_before_the_next_is_written() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    for client in [http1(), h2c()] {
        up.counters.sse_sent.lock().unwrap().clear();
        let resp = send_streaming(&client, get(addr, "/sse?n=4&gap=300")).await;
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let (text, received) = event_arrivals(resp.into_body()).await;
        let sent = up.counters.sse_sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 4);
        assert_eq!(received.len(), 4, "{text}");
        for i in 0..3 {
            assert!(
                received[i] < sent[i + 1],
                "event {i} arrived after event {} was written: not streamed",
                i + 1
            );
        }
        assert!(text.contains("data: event 3"));
    }
    px.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    // Connection refused: 502.
    let (_refusing, dead) = refusing_addr();
    let px = start(&one_route(&format!("http://{dead}"), "", "")).await;
    let (resp, body) = send(&http1(), get(px.addr("main").unwrap(), "/")).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        json_field(&String::from_utf8_lossy(&body), "code"),
        Some("UPSTREAM_UNAVAILABLE")
    );
    px.shutdown().await;

    // Reset after the request arrived: 502.
    let rst = RawUpstream::start(RawAction::Reset).await;
    let px = start(&one_route(&format!("http://{}", rst.addr), "", "")).await;
    let (resp, _) = send(&http1(), get(px.addr("main").unwrap(), "/")).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(rst.accepted.load(Ordering::SeqCst), 1, "no silent retry");
    px.shutdown().await;

    // No response head within first_byte: 504.
    let up = Upstream::start().await;
    let px = start(&one_route(
        &up.url(),
        "        timeouts: { first_byte: 300ms }",
        "",
    ))
    .await;
    let started = Instant::now();
    let (resp, body) = send(&http1(), get(px.addr("main").unwrap(), "/hang")).await;
    assert_eq!(resp.status(), 504);
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(json_field(&body, "code"), Some("UPSTREAM_TIMEOUT"));
    assert!(body.contains("first_byte"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The proxy gave up on the upstream request too.
    assert_eventually!(
        up.counters.cancelled.load(Ordering::SeqCst) == 1,
        "upstream request not cancelled"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn connect_timeout_is_504() {
    // A listener whose accept queue is full drops further SYNs: connects hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(1).unwrap();
    let addr = full.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    // Without the connect wait (retry.connect_wait, which would wait 5 s for the upstream).
    let px = start(
        &one_route(
            &format!("http://{addr}"),
            "        timeouts: { connect: 300ms }",
            "",
        )
        .replace(
            "connect_timeout: 1s",
            "connect_timeout: 1s\n    retry: { connect_wait: off }",
        ),
    )
    .await;
    let started = Instant::now();
    let (resp, body) = send(&http1(), get(px.addr("main").unwrap(), "/")).await;
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(resp.status(), 504, "{body}");
    assert!(body.contains("connect"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3));
    px.shutdown().await;
}

#[tokio::test]
async fn failures_after_the_response_started_abort_the_stream() {
    // Upstream closes mid-body: the client sees an error, never a clean short body.
    let mid = RawUpstream::start(RawAction::CloseMidBody).await;
    let px = start(&one_route(&format!("http://{}", mid.addr), "", "")).await;
    let resp = send_streaming(&http1(), get(px.addr("main").unwrap(), "/")).await;
    assert_eq!(resp.status(), 200);
    let r = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .unwrap();
    assert!(r.is_err(), "a cut upstream body must not look complete");
    px.shutdown().await;

    // Upstream goes silent mid-body longer than `idle`: aborted.
    let up = Upstream::start().await;
    let px = start(&one_route(
        &up.url(),
        "        timeouts: { idle: 300ms }",
        "",
    ))
    .await;
    let started = Instant::now();
    let resp = send_streaming(&http1(), get(px.addr("main").unwrap(), "/stall?after=10")).await;
    let r = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .unwrap();
    assert!(r.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
    px.shutdown().await;

    // `total` caps the whole exchange even while data keeps flowing: a plain body is cut...
    let px = start(&one_route(
        &up.url(),
        "        timeouts: { total: 500ms, idle: 10s }",
        "",
    ))
    .await;
    let resp = send_streaming(&http1(), get(px.addr("main").unwrap(), "/stall?after=10")).await;
    let r = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .unwrap();
    assert!(r.is_err(), "total timeout must cut a plain body");
    // ...and an event stream ends with a final event at a boundary (issue 16).
    let resp = send_streaming(&http1(), get(px.addr("main").unwrap(), "/sse?n=20&gap=100")).await;
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .unwrap()
        .expect("an event stream ends cleanly")
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("event: error\ndata: {\"code\":\"STREAM_TIMEOUT\"") && text.ends_with("\n\n"),
        "{text}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    // Waiting for the head: the client goes away.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /hang HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eventually!(up.requests() == 1, "request reached upstream");
    drop(s);
    assert_eventually!(
        up.counters.cancelled.load(Ordering::SeqCst) == 1,
        "upstream wait not cancelled"
    );

    // Mid-stream: the client stops reading an SSE answer and closes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /sse?n=50&gap=50 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0);
    drop(s);
    assert_eventually!(
        up.counters.sse_aborted.load(Ordering::SeqCst) == 1,
        "upstream stream kept running after the client left"
    );
    assert!(up.counters.sse_sent.lock().unwrap().len() < 50);
    px.shutdown().await;
}

#[tokio::test]
async fn websocket_upgrade_is_piped_after_101() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping-through-the-tunnel").await.unwrap();
    let mut echo = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping-through-the-tunnel");
    px.shutdown().await;
}

#[tokio::test]
async fn connection_cap_holds_extra_connections_in_the_backlog() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "    max_connections: 1")).await;
    let addr = px.addr("main").unwrap();
    let mut first = TcpStream::connect(addr).await.unwrap();
    first
        .write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(first.read(&mut buf).await.unwrap() > 0);
    // The second connection is not served while the first is open.
    let mut second = TcpStream::connect(addr).await.unwrap();
    second
        .write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf)).await;
    assert!(early.is_err(), "second connection served above the cap");
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    px.shutdown().await;
}

/// With more workers than `max_connections`, a worker waiting on an empty socket must not
/// sit on the only slot while a connection waits on another worker's socket (the kernel
/// spreads connections over the workers' SO_REUSEPORT sockets): one client at a time, each
/// closing before the next, is always served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_below_the_worker_count_still_serves_one_client_at_a_time() {
    let up = Upstream::start().await;
    let px = start_on_workers(&one_route(&up.url(), "", "    max_connections: 1"), 2).await;
    let addr = px.addr("main").unwrap();
    for i in 0..16 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "connection {i} not served within 3 s");
        assert!(
            String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
            "connection {i}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    px.shutdown().await;
}

#[tokio::test]
async fn request_bodies_stream_to_the_upstream() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let payload = Bytes::from(vec![b'z'; 300_000]);
    let req = Request::post(format!("http://{addr}/echo"))
        .body(Full::new(payload.clone()))
        .unwrap();
    let (resp, body) = send(&h2c(), req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("\"body_len\":300000"));
    assert_eq!(
        up.counters.last_body.lock().unwrap().as_ref().unwrap(),
        &payload
    );
    px.shutdown().await;
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_trust_store() {
    let up = TlsUpstream::start().await;
    let ca = std::env::temp_dir().join(format!("rampart-it-ca-{}.pem", up.port));
    std::fs::write(&ca, &up.ca_pem).unwrap();
    let url = format!("https://localhost:{}", up.port);
    // Trusted through `tls.ca_file`: proxied, SSE included.
    let yaml = one_route(&url, "", "").replace(
        "    connect_timeout: 1s",
        &format!(
            "    connect_timeout: 1s\n    tls: {{ ca_file: \"{}\" }}",
            ca.display()
        ),
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let (resp, body) = send(&http1(), get(addr, "/echo")).await;
    assert_eq!(resp.status(), 200);
    assert!(
        String::from_utf8_lossy(&body).contains(&format!("\"host\":\"localhost:{}\"", up.port))
    );
    px.shutdown().await;
    // Not trusted: the handshake fails and the client hears 502, never a silent downgrade.
    let px = start(&one_route(&url, "", "")).await;
    let (resp, body) = send(&http1(), get(px.addr("main").unwrap(), "/echo")).await;
    assert_eq!(resp.status(), 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(up.counters.requests.load(Ordering::SeqCst), 1);
    px.shutdown().await;
}

#[tokio::test]
async fn access_log_has_one_line_per_request_and_can_be_switched_off() {
    logs::capture();
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let mut req = get(addr, "/sse?n=2&gap=10");
    req.headers_mut()
        .insert("x-request-id", "access-log-on-1".parse().unwrap());
    let (resp, _) = send(&http1(), req).await;
    assert_eq!(resp.status(), 200);
    let mut req = get(addr, "/status/503");
    req.headers_mut()
        .insert("x-request-id", "access-log-on-2".parse().unwrap());
    send(&http1(), req).await;
    assert_eventually!(
        logs::lines_with("access-log-on-2").len() == 1,
        "no access line"
    );
    let line = &logs::lines_with("access-log-on-1")[0];
    for field in [
        "method=GET",
        "path=/sse",
        "status=200",
        "route=\"all\"",
        "upstream=\"up\"",
        "outcome=\"ok\"",
        "ttfb_ms=",
        "bytes_out=42",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    assert!(logs::lines_with("access-log-on-2")[0].contains("status=503"));
    px.shutdown().await;

    let off = one_route(&up.url(), "", "").replace("access_log: true", "access_log: false");
    let px = start(&off).await;
    let mut req = get(px.addr("main").unwrap(), "/ok");
    req.headers_mut()
        .insert("x-request-id", "access-log-off-1".parse().unwrap());
    send(&http1(), req).await;
    px.shutdown().await;
    assert!(logs::lines_with("access-log-off-1").is_empty());
}

/// The value of `field=` in a text log line (up to the next space).
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("{name} missing in {line}"))
        + name.len()
        + 2;
    line[start..].split(' ').next().unwrap()
}

#[tokio::test]
async fn access_log_names_client_agent_query_protocol_and_rate_limit_source() {
    logs::capture();
    let up = Upstream::start().await;
    let mut yaml = one_route(&up.url(), "        rate_limits: [per_client]", "");
    yaml.push_str("trusted_proxies: [\"127.0.0.0/8\"]\n");
    yaml.push_str("rate_limits:\n  per_client: { points: 100, per: 60s, store: memory }\n");
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let long = "a".repeat(400);
    let mut req = get(addr, &format!("/echo?q=%22x%22&long={long}"));
    let h = req.headers_mut();
    h.insert("x-request-id", "access-log-fields-1".parse().unwrap());
    h.insert("x-forwarded-for", "198.51.100.4".parse().unwrap());
    h.insert("user-agent", "probe/1.0 \"quoted\"".parse().unwrap());
    let (resp, _) = send(&http1(), req).await;
    assert_eq!(resp.status(), 200);
    let mut req = get(addr, "/ok");
    req.headers_mut()
        .insert("x-request-id", "access-log-fields-2".parse().unwrap());
    let (resp, _) = send(&h2c(), req).await;
    assert_eq!(resp.status(), 200);
    assert_eventually!(
        logs::lines_with("access-log-fields-2").len() == 1,
        "no access line"
    );
    let line = &logs::lines_with("access-log-fields-1")[0];
    assert_eq!(field(line, "client"), "198.51.100.4", "{line}");
    assert!(
        line.contains(r#" user_agent="probe/1.0 \"quoted\"" "#),
        "{line}"
    );
    assert_eq!(field(line, "protocol"), "\"h1\"", "{line}");
    assert_eq!(field(line, "ratelimit"), "\"memory\"", "{line}");
    // Quoted, cut at 256 bytes of the query.
    let query = field(line, "query");
    assert!(query.starts_with(r#""q=%22x%22&long=aaa"#), "{line}");
    assert_eq!(query.len(), 256 + 2, "{line}");
    // Microseconds, without float noise.
    for name in ["duration_ms", "ttfb_ms"] {
        let v = field(line, name);
        let decimals = v.split('.').nth(1).map_or(0, str::len);
        assert!(
            decimals <= 3 && v.parse::<f64>().is_ok(),
            "{name}={v} in {line}"
        );
    }
    let line = &logs::lines_with("access-log-fields-2")[0];
    assert_eq!(field(line, "client"), "127.0.0.1", "{line}");
    assert_eq!(field(line, "protocol"), "\"h2\"", "{line}");
    assert!(!line.contains(" query="), "{line}");
    assert!(!line.contains(" user_agent="), "{line}");
    px.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_logged_499() {
    logs::capture();
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /delay/3000 HTTP/1.1\r\nhost: x\r\nx-request-id: leaves-early-1\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(c);
    assert_eventually!(
        logs::lines_with("leaves-early-1").len() == 1,
        "no access line"
    );
    let line = &logs::lines_with("leaves-early-1")[0];
    assert!(line.contains(" status=499 "), "{line}");
    assert!(line.contains("outcome=\"client_aborted\""), "{line}");
    px.shutdown().await;
}

#[tokio::test]
async fn stale_pooled_connections_are_never_used() {
    // Each upstream connection answers once and is then closed by the upstream.
    let up = RawUpstream::start(RawAction::AnswerThenClose).await;
    let px = start(&one_route(&format!("http://{}", up.addr), "", "")).await;
    let addr = px.addr("main").unwrap();
    let client = http1();
    for i in 0..10 {
        let (resp, body) = send(&client, get(addr, "/")).await;
        assert_eq!(
            resp.status(),
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&body)
        );
        // Give the upstream time to close the one it just used.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 10);
    px.shutdown().await;
}

/// Sends `n` requests one after the other on one keep-alive connection; the statuses.
async fn sequential_gets(addr: std::net::SocketAddr, n: usize) -> Vec<String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..n {
        s.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).ends_with("ok") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "proxy closed a keep-alive connection");
            got.extend_from_slice(&buf[..n]);
        }
        statuses.push(String::from_utf8_lossy(&got[..12]).to_string());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_each_accept_on_their_own_socket_of_the_listener() {
    let up = Upstream::start().await;
    let workers = rampart::workers::Workers::start(2).unwrap();
    let px = rampart::app::start_on(parse(&one_route(&up.url(), "", "")), None, workers)
        .await
        .expect("proxy starts");
    let addr = px.addr("main").unwrap();

    let clients: Vec<_> = (0..32)
        .map(|_| tokio::spawn(sequential_gets(addr, 5)))
        .collect();
    for c in clients {
        for status in c.await.unwrap() {
            assert_eq!(status, "HTTP/1.1 200");
        }
    }
    assert_eq!(up.requests(), 160);

    // SO_REUSEPORT spreads the 32 connections over both workers' sockets (all on one: odds
    // of 2 in 2^32).
    let (resp, body) = send(&http1(), get(px.admin_addr, "/metrics")).await;
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8_lossy(&body);
    let accepted = |w: &str| -> f64 {
        let series =
            format!("rampart_worker_connections_total{{listener=\"main\",worker=\"{w}\"}}");
        sample(&text, &series).unwrap_or(0.0)
    };
    let (w0, w1) = (accepted("0"), accepted("1"));
    assert_eq!(w0 + w1, 32.0, "{text}");
    assert!(w0 > 0.0 && w1 > 0.0, "worker 0: {w0}, worker 1: {w1}");
    px.shutdown().await;
}
