//! HTTPS to upstreams (`upstreams.<name>.tls`): trust (system store plus `ca_file`), the
//! name checked (`server_name`), client certificates, `insecure_skip_verify`, and HTTP/2
//! when the upstream picks it in ALPN (`http2`). Certificates are made here with rcgen.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use crate::assert_eventually;

use crate::support::upstream::{Issued, TestCa, TlsServer, TlsServerOptions};
use crate::support::{get, http1, json_field, logs, one_route, send, send_streaming, start};

const H2: &[u8] = b"h2";
const H11: &[u8] = b"http/1.1";

fn dir(test: &str) -> PathBuf {
    crate::support::process::temp_dir(&format!("upstream-tls-{test}"))
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn server(cert: Issued, client_ca: Option<String>, alpn: &[&[u8]]) -> TlsServer {
    TlsServer::start(TlsServerOptions {
        cert,
        client_ca,
        alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        h2_max_streams: None,
    })
    .await
}

/// `one_route` to `https://localhost:port` with `tls` (a flow mapping) on the upstream, which
/// is named `name`.
fn config(port: u16, name: &str, tls: &str) -> String {
    let yaml = one_route(&format!("https://localhost:{port}"), "", "")
        .replace("upstream: up\n", &format!("upstream: {name}\n"))
        .replace("\n  up:\n", &format!("\n  {name}:\n"));
    if tls.is_empty() {
        yaml
    } else {
        yaml.replace(
            "    connect_timeout: 1s",
            &format!("    connect_timeout: 1s\n    tls: {tls}"),
        )
    }
}

/// GET `path` through a proxy started with `yaml`: status and body.
async fn through(yaml: &str, path: &str) -> (u16, String) {
    let px = start(yaml).await;
    let (resp, body) = send(&http1(), get(px.addr("main").unwrap(), path)).await;
    px.shutdown().await;
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A 502 UPSTREAM_TLS_ERROR, whose reason (rustls') is logged with the endpoint.
async fn assert_tls_refused(status: u16, body: &str, port: u16, reason: &str) {
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        json_field(body, "code"),
        Some("UPSTREAM_TLS_ERROR"),
        "{body}"
    );
    let endpoint = format!("localhost:{port}");
    assert_eventually!(
        logs::lines_with("upstream TLS failed")
            .iter()
            .any(|l| l.contains(&endpoint) && l.contains(reason)),
        "no log line with {reason} for {endpoint}: {:?}",
        logs::lines_with("upstream TLS failed")
    );
}

#[tokio::test]
async fn a_private_ca_is_trusted_through_ca_file_and_refused_without_it() {
    logs::capture();
    let d = dir("private-ca");
    let ca = TestCa::new();
    let up = server(ca.issue(&["localhost"], false), None, &[]).await;
    let ca_file = write(&d, "ca.pem", &ca.pem);
    let (status, body) = through(
        &config(up.port, "up", &format!("{{ ca_file: \"{ca_file}\" }}")),
        "/echo",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"version\":\"HTTP/1.1\""), "{body}");

    let (status, body) = through(&config(up.port, "up", ""), "/echo").await;
    assert_tls_refused(
        status,
        &body,
        up.port,
        "invalid peer certificate: UnknownIssuer",
    )
    .await;
    assert_eq!(up.counters.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_expired_certificate_is_refused_before_the_request_leaves() {
    logs::capture();
    let d = dir("expired");
    let ca = TestCa::new();
    let up = server(ca.issue(&["localhost"], true), None, &[]).await;
    let ca_file = write(&d, "ca.pem", &ca.pem);
    let (status, body) = through(
        &config(up.port, "up", &format!("{{ ca_file: \"{ca_file}\" }}")),
        "/echo",
    )
    .await;
    assert_tls_refused(
        status,
        &body,
        up.port,
        "invalid peer certificate: certificate expired",
    )
    .await;
    assert_eq!(up.counters.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_unless_server_name_says_so() {
    logs::capture();
    let d = dir("server-name");
    let ca = TestCa::new();
    let up = server(ca.issue(&["api.internal"], false), None, &[]).await;
    let ca_file = write(&d, "ca.pem", &ca.pem);
    let (status, body) = through(
        &config(up.port, "up", &format!("{{ ca_file: \"{ca_file}\" }}")),
        "/echo",
    )
    .await;
    assert_tls_refused(status, &body, up.port, "certificate not valid for name").await;

    let tls = format!("{{ ca_file: \"{ca_file}\", server_name: api.internal }}");
    let (status, body) = through(&config(up.port, "up", &tls), "/echo").await;
    assert_eq!(status, 200, "{body}");
    // The Host header still names the endpoint: only TLS uses the pinned name.
    assert!(
        body.contains(&format!("\"host\":\"localhost:{}\"", up.port)),
        "{body}"
    );
}

#[tokio::test]
async fn an_upstream_that_requires_a_client_certificate_gets_one() {
    logs::capture();
    let d = dir("mtls");
    let ca = TestCa::new();
    let up = server(ca.issue(&["localhost"], false), Some(ca.pem.clone()), &[]).await;
    let ca_file = write(&d, "ca.pem", &ca.pem);
    let client = ca.issue(&["rampart-client"], false);
    let cert = write(&d, "client.pem", &client.cert_pem);
    let key = write(&d, "client.key", &client.key_pem);
    let tls =
        format!("{{ ca_file: \"{ca_file}\", client_cert: \"{cert}\", client_key: \"{key}\" }}");
    let (status, body) = through(&config(up.port, "up", &tls), "/echo").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.counters.requests.load(Ordering::SeqCst), 1);

    // Without: the upstream refuses the handshake (in TLS 1.3 after rampart's Finished, so
    // it shows on the first read) and never sees the request.
    let (status, body) = through(
        &config(up.port, "up", &format!("{{ ca_file: \"{ca_file}\" }}")),
        "/echo",
    )
    .await;
    assert_tls_refused(status, &body, up.port, "CertificateRequired").await;
    assert_eq!(up.counters.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn insecure_skip_verify_accepts_an_untrusted_certificate_and_says_so_at_start() {
    logs::capture();
    let ca = TestCa::new();
    let up = server(ca.issue(&["elsewhere.example"], true), None, &[]).await;
    let yaml = config(up.port, "insecureup", "{ insecure_skip_verify: true }");
    let warnings = || {
        logs::lines_with("insecure_skip_verify")
            .iter()
            .filter(|l| l.contains("WARN") && l.contains("upstream=insecureup"))
            .count()
    };
    let px = start(&yaml).await;
    assert_eq!(
        warnings(),
        1,
        "{:?}",
        logs::lines_with("insecure_skip_verify")
    );
    let (resp, body) = send(&http1(), get(px.addr("main").unwrap(), "/echo")).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    // Each configuration loaded with it says it again.
    let report = px.apply(crate::support::parse(&yaml)).await;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(warnings(), 2);
    px.shutdown().await;
}

#[tokio::test]
async fn refused_certificates_count_for_the_breaker() {
    logs::capture();
    let ca = TestCa::new();
    let up = server(ca.issue(&["localhost"], false), None, &[]).await;
    // Not trusted (no ca_file), no retries: each request is one refused handshake.
    let yaml = config(up.port, "up", "").replace(
        "    connect_timeout: 1s",
        "    connect_timeout: 1s\n    retry: { attempts: 1 }\n    circuit_breaker: { failures: 2, open_for: 60s }",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    for _ in 0..2 {
        let (resp, body) = send(&http1(), get(addr, "/echo")).await;
        let body = String::from_utf8_lossy(&body);
        assert_eq!(
            json_field(&body, "code"),
            Some("UPSTREAM_TLS_ERROR"),
            "{body}"
        );
        assert_eq!(resp.status(), 502);
    }
    let (resp, body) = send(&http1(), get(addr, "/echo")).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(json_field(&body, "code"), Some("CIRCUIT_OPEN"), "{body}");
    assert_eq!(resp.status(), 503);
    assert_eq!(up.counters.requests.load(Ordering::SeqCst), 0);
    px.shutdown().await;
}

/// An upstream offering `alpn` behind `tls.http2: http2`, with the proxy running.
async fn h2_setup(test: &str, alpn: &[&[u8]], http2: bool) -> (TlsServer, rampart::app::Running) {
    h2_setup_with(test, alpn, http2, None, "").await
}

/// As `h2_setup`, with the upstream's stream limit and YAML lines for the route.
async fn h2_setup_with(
    test: &str,
    alpn: &[&[u8]],
    http2: bool,
    h2_max_streams: Option<u32>,
    route_extra: &str,
) -> (TlsServer, rampart::app::Running) {
    let d = dir(test);
    let ca = TestCa::new();
    let up = TlsServer::start(TlsServerOptions {
        cert: ca.issue(&["localhost"], false),
        client_ca: None,
        alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        h2_max_streams,
    })
    .await;
    let ca_file = write(&d, "ca.pem", &ca.pem);
    let tls = format!("{{ ca_file: \"{ca_file}\", http2: {http2} }}");
    let yaml = config(up.port, "up", &tls).replace(
        "        upstream: up\n",
        &format!("        upstream: up\n{route_extra}"),
    );
    let px = start(&yaml).await;
    (up, px)
}

async fn version_seen(px: &rampart::app::Running) -> String {
    let (resp, body) = send(&http1(), get(px.addr("main").unwrap(), "/echo")).await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(resp.status(), 200, "{body}");
    json_field(&body, "version").unwrap_or("?").to_string()
}

#[tokio::test]
async fn http2_is_spoken_when_offered_and_picked_and_only_then() {
    // Both sides want it.
    let (up, px) = h2_setup("h2-both", &[H2, H11], true).await;
    assert_eq!(version_seen(&px).await, "HTTP/2.0");
    // Connection-specific headers HTTP/2 forbids never reach it (h2 would refuse the
    // request); `te: trailers` may.
    let answer = crate::support::raw(
        px.addr("main").unwrap(),
        b"GET /echo HTTP/1.1\r\nhost: a\r\nconnection: close, x-drop\r\nkeep-alive: timeout=5\r\n\
          x-drop: 1\r\nproxy-connection: keep-alive\r\nte: trailers\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"version\":\"HTTP/2.0\""), "{answer}");
    for gone in ["keep-alive", "x-drop", "proxy-connection", "\"connection\""] {
        assert!(
            !answer.contains(gone),
            "{gone} reached the upstream: {answer}"
        );
    }
    px.shutdown().await;
    drop(up);
    // The upstream only speaks http/1.1: so does rampart.
    let (up, px) = h2_setup("h2-h1-only", &[H11], true).await;
    assert_eq!(version_seen(&px).await, "HTTP/1.1");
    assert_eq!(version_seen(&px).await, "HTTP/1.1");
    px.shutdown().await;
    drop(up);
    // The default: only http/1.1 offered, even to an upstream that prefers h2.
    let (up, px) = h2_setup("h2-default", &[H2, H11], false).await;
    assert_eq!(version_seen(&px).await, "HTTP/1.1");
    px.shutdown().await;
    drop(up);
}

#[tokio::test]
async fn concurrent_requests_share_one_http2_connection() {
    let (up, px) = h2_setup("h2-share", &[H2, H11], true).await;
    let addr = px.addr("main").unwrap();
    let client = http1();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            send(&client, get(addr, "/delay/300")).await.0.status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(up.counters.requests.load(Ordering::SeqCst), 20);
    assert_eq!(up.counters.connections.load(Ordering::SeqCst), 1);
    px.shutdown().await;
}

#[tokio::test]
async fn an_event_stream_over_http2_arrives_event_by_event() {
    let (up, px) = h2_setup("h2-sse", &[H2, H11], true).await;
    let addr = px.addr("main").unwrap();
    let resp = send_streaming(&http1(), get(addr, "/sse?n=5&gap=200")).await;
    assert_eq!(resp.status(), 200);
    let (text, arrivals) = crate::support::event_arrivals(resp.into_body()).await;
    assert_eq!(arrivals.len(), 5, "{text}");
    let sent = up.counters.sse_sent.lock().unwrap().clone();
    for (i, at) in arrivals.iter().enumerate() {
        // Each event is passed on as it comes, not gathered.
        assert!(
            at.duration_since(sent[i]) < Duration::from_millis(150),
            "event {i} held back {:?}",
            at.duration_since(sent[i])
        );
    }
    px.shutdown().await;
}

/// Reads a streamed body until it ends or fails: how long that took, whether it failed, and
/// the text.
async fn drain(body: hyper::body::Incoming) -> (Duration, bool, String) {
    let started = Instant::now();
    let mut body = body;
    let mut text = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
            Err(_) => panic!("the stream hangs: {text}"),
            Ok(None) => return (started.elapsed(), false, text),
            Ok(Some(Err(_))) => return (started.elapsed(), true, text),
            Ok(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    text.push_str(&String::from_utf8_lossy(d));
                }
            }
        }
    }
}

#[tokio::test]
async fn an_http2_upstream_that_goes_away_mid_stream_ends_cleanly() {
    let (up, px) = h2_setup("h2-goaway", &[H2, H11], true).await;
    let addr = px.addr("main").unwrap();

    // GOAWAY: the stream in flight finishes, the next request goes on a new connection.
    let mut body = send_streaming(&http1(), get(addr, "/sse?n=4&gap=150"))
        .await
        .into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    up.close_connections(true);
    let (_, failed, text) = drain(body).await;
    assert!(
        !failed,
        "a graceful GOAWAY cut the stream in flight: {text}"
    );
    assert!(text.contains("data: event 3\n\n"), "{text}");
    assert!(!text.contains("event: error"), "{text}");
    assert_eq!(version_seen(&px).await, "HTTP/2.0");
    assert_eq!(up.counters.connections.load(Ordering::SeqCst), 2);

    // Dropped: the stream ends at once (not after a timeout) with the final `error` event
    // rampart writes into an event stream it cannot finish; the next request is served.
    let mut body = send_streaming(&http1(), get(addr, "/sse?n=50&gap=100"))
        .await
        .into_body();
    body.frame().await.unwrap().unwrap();
    up.close_connections(false);
    let (took, failed, text) = drain(body).await;
    assert!(
        failed || text.contains("event: error"),
        "a cut stream ended as if complete: {text}"
    );
    assert!(!text.contains("data: event 49"), "{text}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(version_seen(&px).await, "HTTP/2.0");
    assert_eq!(up.counters.connections.load(Ordering::SeqCst), 3);
    px.shutdown().await;
}

#[tokio::test]
async fn check_refuses_a_client_key_that_is_not_the_certificates() {
    let d = dir("check-mismatch");
    let ca = TestCa::new();
    let a = ca.issue(&["client-a"], false);
    let b = ca.issue(&["client-b"], false);
    let cert = write(&d, "a.pem", &a.cert_pem);
    let key = write(&d, "b.key", &b.key_pem);
    let yaml = format!(
        "listeners:
  - name: main
    listen: \"127.0.0.1:0\"
    routes: [{{ upstream: up }}]
upstreams:
  up:
    endpoints: [\"https://localhost:1\"]
    tls:
      client_cert: \"{cert}\"
      client_key: \"{key}\"
"
    );
    let err = rampart::config::parse_str(&yaml, "proxy.yaml", &|_| None).unwrap_err();
    let p = &err.problems[0];
    assert_eq!(p.path, "upstreams.up.tls.client_key", "{err}");
    assert_eq!((p.line, p.column), (10, 19), "{err}");
    assert!(
        p.message.contains("does not go with the certificate"),
        "{err}"
    );
    assert!(err.to_string().starts_with("proxy.yaml:10:19: "), "{err}");

    // One without the other is refused too.
    let alone = yaml.replace(&format!("      client_key: \"{key}\"\n"), "");
    let err = rampart::config::parse_str(&alone, "proxy.yaml", &|_| None).unwrap_err();
    assert_eq!(
        err.problems[0].path, "upstreams.up.tls.client_cert",
        "{err}"
    );
}

#[tokio::test]
async fn a_full_http2_connection_makes_room_on_another() {
    // The upstream takes 4 streams per connection: 12 at once need 3 connections, and none
    // waits behind another's stream.
    let (up, px) = h2_setup_with("h2-full", &[H2, H11], true, Some(4), "").await;
    let addr = px.addr("main").unwrap();
    // One request first, so that the connection (and its SETTINGS) is there.
    assert_eq!(version_seen(&px).await, "HTTP/2.0");
    let client = http1();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (resp, body) = send(&client, get(addr, "/delay/400")).await;
            (resp.status(), body)
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    // Queued behind 4 streams, the last ones would take 3 rounds of 400 ms.
    assert!(
        started.elapsed() < Duration::from_millis(1100),
        "{:?}",
        started.elapsed()
    );
    let conns = up.counters.connections.load(Ordering::SeqCst);
    assert!((3..=4).contains(&conns), "{conns} connections");
    px.shutdown().await;
}

#[tokio::test]
async fn over_http2_a_request_body_streams_up_and_a_client_that_leaves_resets_its_stream() {
    let (up, px) = h2_setup("h2-body-cancel", &[H2, H11], true).await;
    let addr = px.addr("main").unwrap();
    let payload = bytes::Bytes::from(vec![b'z'; 300_000]);
    let req = http::Request::post(format!("http://{addr}/echo"))
        .body(http_body_util::Full::new(payload.clone()))
        .unwrap();
    let (resp, body) = send(&http1(), req).await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(resp.status(), 200, "{body}");
    assert!(body.contains("\"body_len\":300000"), "{body}");
    assert!(body.contains("\"version\":\"HTTP/2.0\""), "{body}");
    assert_eq!(
        up.counters.last_body.lock().unwrap().as_ref().unwrap(),
        &payload
    );

    // The client reads one event and leaves: the upstream's stream is reset (its body
    // dropped), the connection stays for the others.
    let mut stream = send_streaming(&http1(), get(addr, "/sse?n=50&gap=50"))
        .await
        .into_body();
    stream.frame().await.unwrap().unwrap();
    drop(stream);
    assert_eventually!(
        up.counters.sse_aborted.load(Ordering::SeqCst) == 1,
        "the upstream stream was not reset"
    );
    assert_eq!(version_seen(&px).await, "HTTP/2.0");
    assert_eq!(up.counters.connections.load(Ordering::SeqCst), 1);
    px.shutdown().await;
}

#[tokio::test]
async fn over_http2_the_first_byte_timeout_answers_504_and_cancels_upstream() {
    let (up, px) = h2_setup_with(
        "h2-first-byte",
        &[H2, H11],
        true,
        None,
        "        timeouts: { first_byte: 300ms }\n",
    )
    .await;
    let started = Instant::now();
    let (resp, body) = send(&http1(), get(px.addr("main").unwrap(), "/hang")).await;
    assert_eq!(resp.status(), 504, "{}", String::from_utf8_lossy(&body));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eventually!(
        up.counters.cancelled.load(Ordering::SeqCst) == 1,
        "the upstream handler was not cancelled"
    );
    assert_eq!(version_seen(&px).await, "HTTP/2.0");
    assert_eq!(up.counters.connections.load(Ordering::SeqCst), 1);
    px.shutdown().await;
}

#[tokio::test]
async fn a_refused_certificate_sends_the_request_to_another_endpoint() {
    logs::capture();
    let d = dir("failover");
    let ca = TestCa::new();
    let bad = server(ca.issue(&["localhost"], true), None, &[]).await;
    let good = server(ca.issue(&["localhost"], false), None, &[]).await;
    let ca_file = write(&d, "ca.pem", &ca.pem);
    let yaml = config(bad.port, "up", &format!("{{ ca_file: \"{ca_file}\" }}")).replace(
        &format!("endpoints: [\"https://localhost:{}\"]", bad.port),
        &format!(
            "endpoints: [\"https://localhost:{}\", \"https://localhost:{}\"]",
            bad.port, good.port
        ),
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    for _ in 0..4 {
        let (resp, body) = send(&http1(), get(addr, "/echo")).await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(good.counters.requests.load(Ordering::SeqCst), 4);
    assert_eq!(bad.counters.requests.load(Ordering::SeqCst), 0);
    let endpoint = format!("localhost:{}", bad.port);
    assert!(
        logs::lines_with("upstream TLS failed")
            .iter()
            .any(|l| l.contains(&endpoint) && l.contains("certificate expired")),
        "the refused certificate was not logged"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn a_websocket_upgrade_goes_over_http11_even_when_http2_is_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, px) = h2_setup_with(
        "h2-websocket",
        &[H2, H11],
        true,
        None,
        "        upgrades: [websocket]\n",
    )
    .await;
    let addr = px.addr("main").unwrap();
    // The pool's connection is HTTP/2; the upgrade makes its own, offering only http/1.1.
    assert_eq!(version_seen(&px).await, "HTTP/2.0");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    })
    .await
    .expect("an answer within 5 s");
    assert!(head.starts_with("http/1.1 101"), "{head}");
    s.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back))
        .await
        .expect("echo within 2 s")
        .unwrap();
    assert_eq!(&back, b"hello");
    assert_eq!(up.counters.connections.load(Ordering::SeqCst), 2);
    drop(s);
    px.shutdown().await;
}
