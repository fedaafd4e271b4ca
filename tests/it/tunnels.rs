//! Upgrades and tunnels (issue 12, item 5): only the protocols a route allows are tunnelled
//! (WebSocket by default, h2c never), the upstream's 101 must switch to what was asked, and a
//! tunnel holds its connection permit, has an idle timeout, is counted and logged at close,
//! and is ended by the drain. The idle-tunnel case of the slow-client suite lives here too.
//!
//! The upstream is a raw scripted one (`Scripted`), so that what it received and when its
//! side of a tunnel was closed are facts read off its socket.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::assert_eventually;
use crate::slow_clients::{Legit, assert_around, closed_within};
use crate::support::process::{Proc, free_port, temp_dir};
use crate::support::*;

/// A WebSocket handshake's headers (RFC 6455 4.1), after the request line and Host.
const WS: &str = "connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

// === the scripted upstream ===

/// A raw upstream: every request head is recorded (lowercased). A head with an `Upgrade`
/// header is answered 101, switching to `switch_to` (None: what the request asked for;
/// Some(""): no `Upgrade` header at all), and every byte after it is echoed until the peer
/// closes; the bytes `bye!` make it close its side instead. Any other head gets
/// `200 plain` (keep-alive).
struct Scripted {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    /// When rampart closed the upstream side of a switched connection.
    closed: Arc<Mutex<Vec<Instant>>>,
    task: JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    async fn start(switch_to: Option<&'static str>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(Vec::new()));
        let (h, c) = (heads.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, switch_to, h.clone(), c.clone()));
            }
        });
        Scripted {
            addr,
            heads,
            closed,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn closed(&self) -> Vec<Instant> {
        self.closed.lock().unwrap().clone()
    }
}

async fn serve(
    mut s: TcpStream,
    switch_to: Option<&'static str>,
    heads: Arc<Mutex<Vec<String>>>,
    closed: Arc<Mutex<Vec<Instant>>>,
) {
    let mut buf = Vec::new();
    // Bounded: at most 100 requests per connection.
    for _ in 0..100 {
        let Some(end) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let rest = buf.split_off(end);
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        buf = rest;
        heads.lock().unwrap().push(head.clone());
        let Some(asked) = header(&head, "upgrade") else {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain")
                .await;
            continue;
        };
        let to = switch_to.map_or(asked, str::to_string);
        let upgrade = if to.is_empty() {
            String::new()
        } else {
            format!("upgrade: {to}\r\n")
        };
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n{upgrade}sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        if s.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        echo(s, buf, closed).await;
        return;
    }
}

/// Echoes until the peer closes (recorded) or sends `bye!` (then closes itself).
async fn echo(mut s: TcpStream, first: Vec<u8>, closed: Arc<Mutex<Vec<Instant>>>) {
    if !first.is_empty() && s.write_all(&first).await.is_err() {
        return;
    }
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                closed.lock().unwrap().push(Instant::now());
                return;
            }
            Ok(n) => {
                if chunk[..n].windows(4).any(|w| w == b"bye!") {
                    return;
                }
                if s.write_all(&chunk[..n]).await.is_err() {
                    closed.lock().unwrap().push(Instant::now());
                    return;
                }
            }
        }
    }
}

/// Reads into `buf` until it holds a whole head; the head's length (with its blank line).
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The value of header `name` in a lowercased head.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        (n.trim() == name).then(|| v.trim().to_string())
    })
}

// === the client side ===

fn config(up: &Scripted, route: &str, listener: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: true }}
drain: {{ accept_grace: 0s, timeout: 2s }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
{listener}
    routes:
      - name: all
        match: {{ path_prefix: / }}
        upstream: up
{route}
upstreams:
  up:
    endpoints: ["{}"]
    connect_timeout: 1s
"#,
        up.url()
    )
}

/// Sends a GET with `headers` (each line ending in CRLF) and reads the answer's head, and
/// its body when it has a Content-Length: (head lowercased, body).
async fn request(s: &mut TcpStream, path: &str, headers: &str) -> (String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: a\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let read = async {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let len: usize = header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        (head, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer within 5 s")
}

/// A new connection and a WebSocket handshake on it (`extra` header lines added).
async fn open(addr: SocketAddr, extra: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (head, _) = request(&mut s, "/ws", &format!("{WS}{extra}")).await;
    (s, head)
}

/// `msg` through the tunnel and back, within 2 s.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    let go = async {
        s.write_all(msg).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        if back == msg {
            Ok(())
        } else {
            Err("echo differs".to_string())
        }
    };
    tokio::time::timeout(Duration::from_secs(2), go)
        .await
        .unwrap_or_else(|_| Err("no echo within 2 s".into()))
}

async fn metrics(admin: SocketAddr) -> String {
    let (_, body) = send(&http1(), get(admin, "/metrics")).await;
    String::from_utf8_lossy(&body).into_owned()
}

// === tests ===

#[tokio::test]
async fn a_websocket_upgrade_is_tunnelled_end_to_end() {
    let up = Scripted::start(None).await;
    let px = start(&config(&up, "", "")).await;
    let addr = px.addr("main").unwrap();
    let (mut s, head) = open(addr, "").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(header(&head, "upgrade").as_deref(), Some("websocket"));
    // Not rampart's business: passed through as the upstream wrote it.
    assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="));
    let seen = up.heads();
    assert_eq!(seen.len(), 1);
    for line in [
        "upgrade: websocket",
        "connection: upgrade",
        "sec-websocket-key: dghlihnhbxbszsbub25jzq==",
        "x-forwarded-for: 127.0.0.1",
    ] {
        assert!(seen[0].contains(line), "{line} missing: {}", seen[0]);
    }
    round_trip(&mut s, b"hello").await.unwrap();
    round_trip(&mut s, &vec![b'x'; 300_000]).await.unwrap();
    drop(s);
    assert_eventually!(up.closed().len() == 1, "upstream side not closed");
    px.shutdown().await;
}

#[tokio::test]
async fn h2c_is_never_forwarded_and_the_request_is_served_plainly() {
    // Even on a route that allows upgrades, and with an upstream that would switch.
    let up = Scripted::start(None).await;
    let px = start(&config(&up, "", "")).await;
    let addr = px.addr("main").unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    // What `curl --http2 http://...` sends.
    let h2c = "connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";
    let (head, body) = request(&mut s, "/first", h2c).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "plain");
    // The connection stays HTTP/1.1.
    let (head, body) = request(&mut s, "/second", "").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "plain");
    let seen = up.heads();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for h in &seen {
        assert!(!h.contains("upgrade"), "forwarded: {h}");
        assert!(!h.contains("http2-settings"), "forwarded: {h}");
    }
    px.shutdown().await;
}

/// The choice documented in docs/architecture.md ("Upgrades and tunnels"): an upgrade the
/// route does not allow is removed and the request served as plain HTTP/1.1 (nginx's
/// behaviour; the upstream answers what it answers a plain request, typically 426), rather
/// than refused.
#[tokio::test]
async fn a_protocol_the_route_does_not_allow_is_removed_and_served_plainly() {
    let up = Scripted::start(None).await;
    let nows = "      - name: nows\n        match: { path_prefix: /nows }\n        upstream: up\n        upgrades: []\n";
    let yaml = config(&up, "", "").replace("    routes:\n", &format!("    routes:\n{nows}"));
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();

    // Not in the default list.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (head, body) = request(&mut s, "/x", "connection: upgrade\r\nupgrade: foo/1\r\n").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "plain");
    // WebSocket on a route with `upgrades: []`.
    let (head, body) = request(&mut s, "/nows/ws", WS).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "plain");
    // Of a list, only what the route allows goes on.
    let (head, _) = request(
        &mut s,
        "/ws",
        "connection: upgrade\r\nupgrade: foo/1, websocket\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let seen = up.heads();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(!seen[0].contains("upgrade"), "{}", seen[0]);
    assert!(!seen[1].contains("upgrade"), "{}", seen[1]);
    assert_eq!(header(&seen[2], "upgrade").as_deref(), Some("websocket"));
    round_trip(&mut s, b"through").await.unwrap();
    px.shutdown().await;
}

/// `upgrades` takes effect through a reload, for the next handshake; tunnels already open
/// keep running.
#[tokio::test]
async fn a_reload_changes_which_upgrades_go_on_and_open_tunnels_keep_running() {
    let up = Scripted::start(None).await;
    let px = start(&config(&up, "", "")).await;
    let addr = px.addr("main").unwrap();
    let (mut before, head) = open(addr, "").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let report = px
        .apply(parse(&config(&up, "        upgrades: []", "")))
        .await;
    assert!(report.is_ok(), "{report:?}");
    let addr = px.addr("main").unwrap_or(addr);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (head, body) = request(&mut s, "/ws", WS).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "plain");
    round_trip(&mut before, b"after the reload").await.unwrap();
    drop(before);
    px.shutdown().await;
}

#[tokio::test]
async fn upgrades_are_checked_by_rampart_check() {
    let text = |upgrades: &str| {
        format!(
            "listeners:\n  - name: main\n    listen: \"127.0.0.1:0\"\n    routes:\n      - upstream: up\n        upgrades: {upgrades}\nupstreams:\n  up: {{ endpoints: [\"http://127.0.0.1:1\"] }}\n"
        )
    };
    let err = |upgrades: &str| {
        rampart::config::parse_str(&text(upgrades), "t.yaml", &|_| None)
            .unwrap_err()
            .to_string()
    };
    let e = err("[websocket, h2c]");
    assert!(
        e.contains("t.yaml:6:") && e.contains("listeners[0].routes[0].upgrades[1]"),
        "{e}"
    );
    assert!(e.contains("h2c is never forwarded"), "{e}");
    assert!(
        err("[websocket, WebSocket]").contains("duplicate"),
        "{}",
        err("[websocket, WebSocket]")
    );
    assert!(
        err("[\"web socket\"]").contains("protocol token"),
        "{}",
        err("[\"web socket\"]")
    );
    assert!(
        err("websocket").contains("expected a list"),
        "{}",
        err("websocket")
    );
    let many = format!(
        "[{}]",
        (0..17)
            .map(|i| format!("p{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(err(&many).contains("at most 16"), "{}", err(&many));
    for fine in ["[websocket, foo/2]", "[]"] {
        let r = rampart::config::parse_str(&text(fine), "t.yaml", &|_| None);
        assert!(r.is_ok(), "{fine}: {:?}", r.err().map(|e| e.to_string()));
    }
}

#[tokio::test]
async fn the_upgrade_connect_and_handshake_have_their_own_timers() {
    // Connect: a listener whose accept queue is full drops further SYNs. The connect gets
    // its own timeout, not the (shorter) first-byte one.
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
    let route = "        timeouts: { connect: 2s, first_byte: 500ms }";
    let yaml = one_route(&format!("http://{addr}"), route, "");
    let px = start(&yaml).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
    let (head, body) = request(&mut s, "/ws", WS).await;
    let took = started.elapsed();
    assert!(head.starts_with("http/1.1 504"), "{head}");
    assert!(body.contains("connect timeout"), "{body}");
    assert!(
        took >= Duration::from_millis(1500),
        "gave up after {took:?}"
    );
    px.shutdown().await;

    // The handshake: an upstream that takes the connection and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let route = "        timeouts: { connect: 300ms, first_byte: 1s }";
    let px = start(&one_route(&format!("http://{addr}"), route, "")).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
    let (head, body) = request(&mut s, "/ws", WS).await;
    let took = started.elapsed();
    assert!(head.starts_with("http/1.1 504"), "{head}");
    assert!(body.contains("first_byte timeout"), "{body}");
    assert_around("handshake timeout", took, Duration::from_secs(1));
    hold.abort();
    px.shutdown().await;
}

#[tokio::test]
async fn a_101_switching_to_another_protocol_is_a_502_and_the_upstream_is_closed() {
    for switch_to in ["h2c", "", "websocket, h2c"] {
        let up = Scripted::start(Some(switch_to)).await;
        let px = start(&config(&up, "", "")).await;
        let addr = px.addr("main").unwrap();
        let (mut s, head) = open(addr, "").await;
        assert!(
            head.starts_with("http/1.1 502"),
            "101 to {switch_to:?}: {head}"
        );
        assert_eventually!(
            up.closed().len() == 1,
            "upstream connection kept after a 101 to {switch_to:?}"
        );
        // The client's connection is still plain HTTP/1.1.
        let (head, body) = request(&mut s, "/after", "").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, "plain");
        px.shutdown().await;
    }
    // Tokens compare without regard to case (RFC 9110 7.8).
    let up = Scripted::start(Some("WebSocket")).await;
    let px = start(&config(&up, "", "")).await;
    let (mut s, head) = open(px.addr("main").unwrap(), "").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    round_trip(&mut s, b"case").await.unwrap();
    px.shutdown().await;
}

#[tokio::test]
async fn tunnels_hold_their_connection_permit() {
    let up = Scripted::start(None).await;
    let px = start(&config(&up, "", "    max_connections: 2")).await;
    let addr = px.addr("main").unwrap();
    let (mut first, head) = open(addr, "").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let (mut second, head) = open(addr, "").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    round_trip(&mut first, b"one").await.unwrap();
    round_trip(&mut second, b"two").await.unwrap();
    let text = metrics(px.admin_addr).await;
    assert_eq!(
        sample(
            &text,
            "rampart_listener_connections_open{listener=\"main\"}"
        ),
        Some(2.0),
        "{text}"
    );

    // A third connection waits in the backlog while both tunnels are open.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /third HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf)).await;
    assert!(early.is_err(), "served above max_connections: {early:?}");
    round_trip(&mut second, b"still").await.unwrap();

    // A tunnel closes: the third is served.
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a tunnel closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    px.shutdown().await;
}

/// The slow-client suite's idle tunnel: a tunnel with no bytes either way for the route's
/// `idle` is closed (both sides) at it, +-1 s; one with traffic is not; a legitimate
/// client alongside keeps 100 % success.
#[tokio::test]
async fn an_idle_tunnel_is_closed_at_its_timeout() {
    let up = Scripted::start(None).await;
    let px = start(&config(&up, "        timeouts: { idle: 2s }", "")).await;
    let addr = px.addr("main").unwrap();
    let legit = Legit::start(addr);
    let (mut silent, head) = open(addr, "").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let opened = Instant::now();
    let (mut chatty, head) = open(addr, "").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let talk = tokio::spawn(async move {
        // 4 s of one message every 400 ms, in both directions through the tunnel.
        for i in 0..10u8 {
            round_trip(&mut chatty, &[b'a' + i]).await?;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        Ok::<_, String>(chatty)
    });
    let took = closed_within(&mut silent, opened, Duration::from_secs(5))
        .await
        .unwrap();
    assert_around("idle tunnel", took, Duration::from_secs(2));
    assert_eventually!(
        !up.closed().is_empty(),
        "the upstream side of the idle tunnel is still open"
    );
    let mut chatty = talk
        .await
        .unwrap()
        .expect("a tunnel with traffic stays open");
    assert!(opened.elapsed() > Duration::from_secs(4));
    round_trip(&mut chatty, b"still here").await.unwrap();
    legit.check(20).await;
    let text = metrics(px.admin_addr).await;
    assert_eq!(
        sample(
            &text,
            "rampart_tunnels_total{listener=\"main\",route=\"all\",outcome=\"idle_timeout\"}"
        ),
        Some(1.0),
        "{text}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn tunnels_are_counted_and_logged_at_close() {
    logs::capture();
    let up = Scripted::start(None).await;
    let px = start(&config(&up, "", "")).await;
    let addr = px.addr("main").unwrap();
    let (mut by_client, _) = open(addr, "x-request-id: tunnel-log-client\r\n").await;
    let (mut by_upstream, _) = open(addr, "x-request-id: tunnel-log-upstream\r\n").await;
    round_trip(&mut by_client, &[b'c'; 1000]).await.unwrap();
    round_trip(&mut by_upstream, &[b'u'; 300]).await.unwrap();
    let active = "rampart_tunnels_active{listener=\"main\",route=\"all\"}";
    let text = metrics(px.admin_addr).await;
    assert_eq!(sample(&text, active), Some(2.0), "{text}");

    drop(by_client);
    // `bye!` makes the upstream close its side.
    by_upstream.write_all(b"bye!").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), by_upstream.read_to_end(&mut rest))
        .await
        .expect("closed after the upstream left")
        .unwrap();
    assert!(rest.is_empty());

    let series = |outcome: &str| {
        format!("rampart_tunnels_total{{listener=\"main\",route=\"all\",outcome=\"{outcome}\"}}")
    };
    assert_eventually!(
        {
            let text = metrics(px.admin_addr).await;
            sample(&text, active) == Some(0.0)
                && sample(&text, &series("client_closed")) == Some(1.0)
                && sample(&text, &series("upstream_closed")) == Some(1.0)
        },
        "tunnel metrics: {}",
        metrics(px.admin_addr).await
    );
    let text = metrics(px.admin_addr).await;
    let bytes = |direction: &str| {
        sample(
            &text,
            &format!(
                "rampart_tunnel_bytes_total{{listener=\"main\",route=\"all\",direction=\"{direction}\"}}"
            ),
        )
    };
    assert_eq!(bytes("from_client"), Some(1304.0), "{text}");
    assert_eq!(bytes("from_upstream"), Some(1300.0), "{text}");

    assert_eventually!(
        logs::lines_with("tunnel-log-upstream").len() == 1,
        "no access line for the tunnel"
    );
    let line = &logs::lines_with("tunnel-log-client")[0];
    for field in [
        "status=101",
        "route=\"all\"",
        "bytes_in=1000",
        "bytes_out=1000",
        "outcome=\"client_closed\"",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    let line = &logs::lines_with("tunnel-log-upstream")[0];
    for field in [
        "bytes_in=304",
        "bytes_out=300",
        "outcome=\"upstream_closed\"",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    px.shutdown().await;
}

/// The built binary with a tunnel open: SIGTERM; the tunnel runs through the accept grace
/// and the drain, is closed at the drain deadline (+-1 s), logged `drained`, and rampart
/// exits within `drain.timeout` + 1.5 s.
#[tokio::test]
async fn the_drain_ends_tunnels_at_its_deadline() {
    let up = Scripted::start(None).await;
    let (port, admin) = (free_port(), free_port());
    let text = format!(
        r#"admin: {{ listen: "127.0.0.1:{admin}" }}
logging: {{ level: info, access_log: true }}
drain: {{ accept_grace: 1s, timeout: 3s }}
listeners:
  - name: main
    listen: "127.0.0.1:{port}"
    routes:
      - name: all
        match: {{ path_prefix: / }}
        upstream: up
upstreams:
  up:
    endpoints: ["{}"]
    connect_timeout: 1s
"#,
        up.url()
    );
    let path = temp_dir("tunnel-drain").join("rampart.yaml");
    std::fs::write(&path, text).unwrap();
    let mut px = Proc::spawn(&path, SocketAddr::from(([127, 0, 0, 1], admin)));
    px.wait_ready().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (mut t, head) = open(addr, "x-request-id: drained-tunnel-1\r\n").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    round_trip(&mut t, b"before").await.unwrap();

    let t0 = Instant::now();
    px.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    round_trip(&mut t, b"during the accept grace")
        .await
        .unwrap();
    tokio::time::sleep_until((t0 + Duration::from_millis(2000)).into()).await;
    round_trip(&mut t, b"while draining").await.unwrap();
    let took = closed_within(&mut t, t0, Duration::from_secs(4))
        .await
        .unwrap();
    assert_around("tunnel closed by the drain", took, Duration::from_secs(3));
    let status = px
        .wait_exit(
            Duration::from_secs(3) + Duration::from_millis(1500)
                - t0.elapsed().min(Duration::from_secs(4)),
        )
        .await;
    assert!(
        status.is_some_and(|s| s.success()),
        "not exited within drain.timeout + 1.5 s ({status:?}):\n{}",
        px.stderr()
    );
    let log = px.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("drained-tunnel-1"))
        .unwrap_or_else(|| panic!("no access line:\n{log}"));
    assert!(line.contains("outcome=\"drained\""), "{line}");
}
