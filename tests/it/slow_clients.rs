//! Slow clients (issue 12): silent connections, trickled heads, slow bodies, slow readers
//! (HTTP/1 with a tiny receive window, HTTP/2 with a zero window), idle HTTP/2 connections
//! that answer PINGs, HTTP/2 that goes silent after the preface. Each one is closed at its
//! timeout (+-1 s) while a legitimate client alongside keeps getting 200s, and none of them
//! is ever held against the upstream (breaker, ejection). Idle tunnels (WebSocket, after a
//! 101) are in `tunnels.rs`, which shares `Legit` and the timing helpers from here.
//!
//! Timeouts are 2-3 s so the suite stays fast; one test runs the same attack against the
//! defaults for just past the default first-byte timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::assert_eventually;
use crate::support::*;

// === fixtures ===

/// A listener `main` with routes `/big` (to `big`, when given) and `/` (to `up`); the drain
/// is short so that a test's leftover sockets never hold its shutdown for long.
fn config(up: &str, big: Option<&str>, route: &str, listener: &str, upstream: &str) -> String {
    let big_route = big.map_or(String::new(), |_| {
        format!(
            "      - name: big\n        match: {{ path_prefix: /big }}\n        upstream: big\n{route}\n"
        )
    });
    let big_upstream = big.map_or(String::new(), |b| {
        format!("  big:\n    endpoints: [\"{b}\"]\n    connect_timeout: 1s\n")
    });
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
{big_route}      - name: all
        match: {{ path_prefix: / }}
        upstream: up
{route}
upstreams:
  up:
    endpoints: ["{up}"]
    connect_timeout: 1s
{upstream}
{big_upstream}"#
    )
}

/// A legitimate client alongside an attack: one request after another, each on a fresh
/// connection (so no keep-alive race can count against it), counting answers.
pub(crate) struct Legit {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(usize, Vec<String>)>,
}

impl Legit {
    pub(crate) fn start(addr: SocketAddr) -> Legit {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failures) = (0, Vec::new());
            // Bounded: at most 10 minutes of requests 100 ms apart.
            for _ in 0..6000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                match legit_request(addr).await {
                    Ok(()) => ok += 1,
                    Err(e) => failures.push(e),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (ok, failures)
        });
        Legit { stop, task }
    }

    /// Stops and asserts 100 % success over at least `min_ok` requests.
    pub(crate) async fn check(self, min_ok: usize) {
        self.stop.store(true, Ordering::SeqCst);
        let (ok, failures) = self.task.await.unwrap();
        assert!(
            failures.is_empty(),
            "legitimate client: {ok} ok, {} failed: {failures:?}",
            failures.len()
        );
        assert!(ok >= min_ok, "legitimate client: only {ok} requests");
    }
}

async fn legit_request(addr: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(b"GET /ok HTTP/1.1\r\nhost: legit\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(text)
        }
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 3 s".into()))
}

/// Waits (at most `limit`) until the peer closes: Ok(elapsed since `since`) or Err on timeout.
pub(crate) async fn closed_within(
    s: &mut TcpStream,
    since: Instant,
    limit: Duration,
) -> Result<Duration, String> {
    let mut buf = [0u8; 4096];
    let wait = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| format!("still open after {limit:?}"))
}

pub(crate) fn assert_around(what: &str, took: Duration, expected: Duration) {
    let (lo, hi) = (
        expected.saturating_sub(Duration::from_secs(1)),
        expected + Duration::from_secs(1),
    );
    assert!(
        took >= lo && took <= hi,
        "{what}: took {took:?}, expected {expected:?} +- 1 s"
    );
}

async fn metrics(px: &rampart::app::Running) -> String {
    let (_, body) = send(&http1(), get(px.admin_addr, "/metrics")).await;
    String::from_utf8_lossy(&body).into_owned()
}

/// The sum of every sample whose series starts with `prefix`.
fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An upstream that answers every request with a body of `len` bytes and writes it as fast as
/// it can; it records when each connection ended (rampart closed it, or the body was done and
/// rampart then closed it).
struct Flood {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<Mutex<Vec<Instant>>>,
    task: JoinHandle<()>,
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Flood {
    async fn start(len: usize) -> Flood {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(Mutex::new(Vec::new()));
        let (a, c) = (accepted.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    if read_head(&mut s).await.is_some() {
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                        let chunk = vec![b'x'; 64 * 1024];
                        let mut left = len;
                        let mut ok = s.write_all(head.as_bytes()).await.is_ok();
                        while ok && left > 0 {
                            let n = left.min(chunk.len());
                            ok = s.write_all(&chunk[..n]).await.is_ok();
                            left -= n;
                        }
                        let mut buf = [0u8; 1024];
                        while ok && matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                    c.lock().unwrap().push(Instant::now());
                });
            }
        });
        Flood {
            addr,
            accepted,
            closed,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn closed(&self) -> Vec<Instant> {
        self.closed.lock().unwrap().clone()
    }
}

/// Reads a request head; None if the connection ends first.
async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 || !matches!(s.read(&mut byte).await, Ok(1)) {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}

/// Trickles `bytes`, one every `gap`, after `head`; returns what the proxy answered (or
/// "closed" / "no answer"), and when, counted from the head.
async fn trickle(addr: SocketAddr, head: &str, bytes: &[u8], gap: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut r, mut w) = s.split();
    let writer = async {
        for b in bytes {
            tokio::time::sleep(gap).await;
            if w.write_all(std::slice::from_ref(b)).await.is_err() {
                break;
            }
        }
        // Then silence, until the reader is done.
        std::future::pending::<()>().await;
    };
    let reader = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer_complete(&out) {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        out
    };
    let mut out = tokio::select! {
        out = reader => out,
        () = writer => unreachable!(),
        () = tokio::time::sleep(Duration::from_secs(15)) => b"no answer".to_vec(),
    };
    let took = started.elapsed();
    // After its answer, the connection ends: what the client still sends is never read as a
    // request.
    let mut rest = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2), r.read(&mut rest)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => out.extend_from_slice(&rest[..n]),
        Err(_) => out.extend_from_slice(b" [connection left open]"),
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    (
        if text.is_empty() {
            "closed".into()
        } else {
            text
        },
        took,
    )
}

/// A whole answer: its head, and as many body bytes as its Content-Length says.
fn answer_complete(out: &[u8]) -> bool {
    let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    out.len() >= end + 4 + len
}

// === item 3: connections that never send a byte, trickled heads ===

#[tokio::test]
async fn silent_connections_are_closed_at_the_header_read_timeout_and_free_their_slots() {
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        None,
        "",
        "    max_connections: 50\n    header_read_timeout: 2s",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // Every slot is taken: this one waits in the backlog until the silent ones are closed.
    let waiting = tokio::spawn(async move {
        let r = legit_request(addr).await;
        (r, started.elapsed())
    });
    let closes: Vec<_> = silent
        .iter_mut()
        .map(|s| closed_within(s, started, Duration::from_secs(6)))
        .collect();
    for (i, took) in futures_join(closes).await.into_iter().enumerate() {
        let took = took.unwrap_or_else(|e| panic!("silent connection {i}: {e}"));
        assert_around(
            &format!("silent connection {i}"),
            took,
            Duration::from_secs(2),
        );
    }
    let (r, took) = waiting.await.unwrap();
    assert_eq!(
        r,
        Ok(()),
        "the client over the cap is served once a slot frees"
    );
    assert!(took < Duration::from_secs(4), "served after {took:?}");
    let legit = Legit::start(addr);
    tokio::time::sleep(Duration::from_secs(1)).await;
    legit.check(5).await;
    px.shutdown().await;
}

/// `join_all` for a handful of futures, without another crate.
async fn futures_join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn trickled_heads_are_closed_at_the_header_read_timeout_counted_from_accept() {
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        None,
        "",
        "    header_read_timeout: 3s",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let legit = Legit::start(addr);
    let head = b"GET /ok HTTP/1.1\r\nhost: a\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut runs = Vec::new();
    // From the first byte, and after a silent start (the clock runs from accept).
    for silent_start in [Duration::ZERO, Duration::from_secs(2)] {
        runs.push(async move {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(silent_start).await;
            let (mut r, mut w) = s.split();
            let writer = async {
                for b in head {
                    if w.write_all(std::slice::from_ref(b)).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                std::future::pending::<()>().await;
            };
            let mut sink = Vec::new();
            tokio::select! {
                _ = r.read_to_end(&mut sink) => started.elapsed(),
                () = writer => unreachable!(),
                () = tokio::time::sleep(Duration::from_secs(8)) => Duration::MAX,
            }
        });
    }
    for (took, silent) in futures_join(runs).await.into_iter().zip([0, 2]) {
        assert_around(
            &format!("trickled head after {silent} s of silence"),
            took,
            Duration::from_secs(3),
        );
    }
    legit.check(20).await;
    px.shutdown().await;
}

// === item 2: slow request bodies ===

const STREAMED_HEAD: &str = "POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 100000\r\n\r\n";
const CHUNKED_HEAD: &str = "POST /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n";

#[tokio::test]
async fn slow_bodies_get_408_and_never_count_against_the_upstream() {
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        None,
        "        timeouts: { first_byte: 1s, body: 2s }",
        "",
        "    circuit_breaker: { failures: 3, open_for: 30s }\n    ejection: { consecutive_failures: 3 }",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let legit = Legit::start(addr);
    let chunks: Vec<u8> = b"1\r\nx\r\n".repeat(10);
    let mut attacks = Vec::new();
    // A streamed body (declared, too large to keep for a retry) and a buffered one (chunked),
    // each a byte every 250 ms: under the minimum rate once `body` has passed.
    for _ in 0..6 {
        attacks.push(trickle(
            addr,
            STREAMED_HEAD,
            &[b'x'; 40],
            Duration::from_millis(250),
        ));
    }
    for _ in 0..2 {
        attacks.push(trickle(
            addr,
            CHUNKED_HEAD,
            &chunks,
            Duration::from_millis(40),
        ));
    }
    // Ten bytes, then nothing: the wait between two reads.
    attacks.push(trickle(
        addr,
        STREAMED_HEAD,
        &[b'x'; 10],
        Duration::from_millis(10),
    ));
    for (i, (answer, took)) in futures_join(attacks).await.into_iter().enumerate() {
        assert!(
            answer.starts_with("HTTP/1.1 408")
                && answer.contains("REQUEST_TIMEOUT")
                && !answer.contains("[connection left open]"),
            "attack {i}: {answer}"
        );
        assert_around(&format!("attack {i}"), took, Duration::from_secs(2));
    }
    let text = metrics(&px).await;
    assert_eq!(
        sample(
            &text,
            r#"rampart_circuit_breaker_state{upstream="up",route="all"}"#
        ),
        Some(0.0),
        "breaker still closed"
    );
    for series in [
        "rampart_upstream_errors_total{",
        "rampart_endpoint_ejections_total{",
    ] {
        assert_eq!(sum(&text, series), 0.0, "{series} counted:\n{text}");
    }
    legit.check(20).await;
    px.shutdown().await;
}

/// A body read whole before sending (chunked) holds nothing of the upstream's while it
/// trickles in: no `max_in_flight` slot, no half-open probe.
#[tokio::test]
async fn slow_buffered_uploads_hold_no_upstream_slot_or_probe() {
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        None,
        "        timeouts: { body: 3s }",
        "",
        "    max_in_flight: 2\n    retry: { attempts: 1 }\n    circuit_breaker: { failures: 2, open_for: 1s, half_open_max_probes: 1, half_open_successes: 1 }",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let chunks: Vec<u8> = b"1\r\nx\r\n".repeat(10);
    // Two slow uploads: as many as the upstream's in-flight cap.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let chunks = chunks.clone();
            tokio::spawn(async move {
                trickle(addr, CHUNKED_HEAD, &chunks, Duration::from_millis(200)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        legit_request(addr).await,
        Ok(()),
        "shed behind slow uploads"
    );
    for s in slow {
        let (answer, _) = s.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    // Open the breaker, wait for half-open, and let a slow upload in first.
    for _ in 0..2 {
        let (resp, _) = send(&http1(), get(addr, "/status/502")).await;
        assert_eq!(resp.status(), 502);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let slow = tokio::spawn(async move {
        trickle(addr, CHUNKED_HEAD, &chunks, Duration::from_millis(200)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The probe is the first request the upstream can answer, not the upload.
    assert_eq!(
        legit_request(addr).await,
        Ok(()),
        "probe held by a slow upload"
    );
    let text = metrics(&px).await;
    assert_eq!(
        sample(
            &text,
            r#"rampart_circuit_breaker_state{upstream="up",route="all"}"#
        ),
        Some(0.0),
        "closed by the probe that passed"
    );
    let (answer, _) = slow.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    px.shutdown().await;
}

#[tokio::test]
async fn an_h2_body_without_length_that_trickles_gets_408() {
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        None,
        "        timeouts: { body: 2s }",
        "",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::post(format!("http://{addr}/echo"))
        .body(())
        .unwrap();
    let (resp, mut body) = client.send_request(req, false).unwrap();
    let started = Instant::now();
    let trickle = async {
        for _ in 0..40 {
            if body.send_data(Bytes::from_static(b"x"), false).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        std::future::pending::<()>().await;
    };
    let resp = tokio::select! {
        r = resp => r.unwrap(),
        () = trickle => unreachable!(),
        () = tokio::time::sleep(Duration::from_secs(8)) => panic!("no answer within 8 s"),
    };
    assert_eq!(resp.status(), 408);
    assert_around(
        "h2 trickled body",
        started.elapsed(),
        Duration::from_secs(2),
    );
    assert_eq!(
        up.requests(),
        0,
        "a buffered body never reached the upstream"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn first_byte_counts_from_the_end_of_the_request_body() {
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        None,
        "        timeouts: { first_byte: 1s, body: 2s }",
        "",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    // 200 KB (streamed: too large to keep for a retry) in 10 KB pieces 100 ms apart: 2 s of
    // upload, each piece well within `body` and the minimum rate, twice the first-byte timeout.
    let upload = |path: &'static str, pieces: usize| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let len = pieces * 10_000;
        let head = format!("POST {path} HTTP/1.1\r\nhost: a\r\ncontent-length: {len}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        for _ in 0..pieces {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(&[b'y'; 10_000]).await.unwrap();
        }
        let body_sent = started.elapsed();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(8), async {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        })
        .await;
        (
            String::from_utf8_lossy(&out).into_owned(),
            body_sent,
            started.elapsed(),
        )
    };
    let (answer, _, _) = upload("/echo", 20).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // An upstream that never answers: 504, first_byte after the body's last byte (100 KB: the
    // socket buffers take it all, though this upstream reads none of it).
    let (answer, body_sent, took) = upload("/hang", 10).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("first_byte"), "{answer}");
    assert_around(
        "first_byte after the body",
        took - body_sent,
        Duration::from_secs(1),
    );
    px.shutdown().await;
}

/// The client is not blamed for the time the upstream takes to read the body.
#[tokio::test]
async fn an_upstream_slow_to_read_the_body_is_not_the_clients_fault() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_head(&mut s).await.unwrap();
        let head = String::from_utf8_lossy(&head).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf).await;
    });
    let px = start(&config(
        &format!("http://{up_addr}"),
        None,
        "        timeouts: { first_byte: 5s, body: 1s }",
        "",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    // 8 MB at once: far more than the socket buffers, so rampart waits on the upstream.
    let body = vec![b'z'; 8_000_000];
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut r, mut w) = s.split();
    let mut out = Vec::new();
    let (_, _) = tokio::join!(w.write_all(&body), async {
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 1024];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                if out.ends_with(b"ok") {
                    break;
                }
            }
        })
        .await;
    });
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    upstream.abort();
    px.shutdown().await;
}

/// With every default: six uploads trickling a byte a second, past the default first-byte
/// timeout (30 s), must not open the breaker, and a client alongside keeps getting 200s.
#[tokio::test]
async fn six_trickled_uploads_with_default_timeouts_never_open_the_breaker() {
    let up = Upstream::start().await;
    let px = start(&config(&up.url(), None, "", "", "")).await;
    let addr = px.addr("main").unwrap();
    let legit = Legit::start(addr);
    let mut attackers = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(STREAMED_HEAD.as_bytes()).await.unwrap();
        attackers.push(tokio::spawn(async move {
            // 33 bytes, a second apart: past the 30 s first-byte timeout.
            for _ in 0..33 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if s.write_all(b"x").await.is_err() {
                    break;
                }
            }
            let mut buf = [0u8; 512];
            // Still waiting for its body: nothing was answered.
            tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf))
                .await
                .is_err()
        }));
    }
    for a in attackers {
        assert!(
            a.await.unwrap(),
            "an attacker was answered before its body timeout"
        );
    }
    let text = metrics(&px).await;
    assert_eq!(
        sample(
            &text,
            r#"rampart_circuit_breaker_state{upstream="up",route="all"}"#
        ),
        Some(0.0)
    );
    legit.check(100).await;
    px.shutdown().await;
}

/// The new keys take effect through a reload like any other: the route's at once.
#[tokio::test]
async fn slow_client_timeouts_reload() {
    let up = Upstream::start().await;
    let px = start(&config(&up.url(), None, "", "", "")).await;
    let addr = px.addr("main").unwrap();
    let report = px
        .apply(parse(&config(
            &up.url(),
            None,
            "        timeouts: { body: 1s, min_body_rate: off }",
            "    http2: { idle_timeout: 1s }",
            "",
        )))
        .await;
    assert!(report.is_ok(), "{report:?}");
    let addr = px.addr("main").unwrap_or(addr);
    assert_eq!(legit_request(addr).await, Ok(()));
    // A head, then silence: 408 at the reloaded `body`.
    let (answer, took) = trickle(addr, CHUNKED_HEAD, b"", Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_around("reloaded body timeout", took, Duration::from_secs(1));
    px.shutdown().await;
}

// === item 4: clients that stop reading ===

#[tokio::test]
async fn an_h1_client_that_stops_reading_releases_the_upstream_at_the_send_timeout() {
    let up = Upstream::start().await;
    let flood = Flood::start(50 * 1024 * 1024).await;
    let px = start(&config(
        &up.url(),
        Some(&flood.url()),
        "        timeouts: { idle: 2s }",
        "",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let legit = Legit::start(addr);
    logs::capture();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nhost: a\r\nx-request-id: slow-reader-h1\r\n\r\n")
        .await
        .unwrap();
    let asked = Instant::now();
    // Reads nothing. The upstream connection is closed at the send timeout.
    assert_eventually!(!flood.closed().is_empty(), "upstream still held");
    let closed = flood.closed()[0] - asked;
    assert_around("upstream released", closed, Duration::from_secs(2));
    assert_eq!(flood.accepted.load(Ordering::SeqCst), 1);
    // And the client's connection is closed too.
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "client connection still open");
    assert_eventually!(
        logs::lines_with("slow-reader-h1").len() == 1,
        "no access line"
    );
    let line = &logs::lines_with("slow-reader-h1")[0];
    assert!(line.contains("outcome=\"send_timeout\""), "{line}");
    legit.check(20).await;
    px.shutdown().await;
}

#[tokio::test]
async fn an_h2_client_with_a_zero_window_does_not_pin_upstream_connections() {
    let up = Upstream::start().await;
    let flood = Flood::start(50 * 1024 * 1024).await;
    let px = start(&config(
        &up.url(),
        Some(&flood.url()),
        "        timeouts: { idle: 2s }",
        "    http2: { idle_timeout: 2s }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let legit = Legit::start(addr);
    logs::capture();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    let mut responses = Vec::new();
    let mut client = client;
    let asked = Instant::now();
    for i in 0..100 {
        client = client.ready().await.unwrap();
        let req = Request::get(format!("http://{addr}/big"))
            .header("x-request-id", format!("zero-window-{i}-h2"))
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        responses.push(resp);
    }
    // Every stream got its head (so its upstream connection is open), and no data.
    let mut bodies = Vec::new();
    for r in responses {
        let r = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .expect("head in time")
            .unwrap();
        assert_eq!(r.status(), 200);
        bodies.push(r.into_body());
    }
    let all_open = Instant::now();
    assert_eq!(flood.accepted.load(Ordering::SeqCst), 100);
    assert_eventually!(
        flood.closed().len() == 100,
        "upstream connections still pinned: {} of 100 released",
        flood.closed().len()
    );
    let access = || {
        logs::lines_with("zero-window-")
            .into_iter()
            .filter(|l| l.contains("outcome="))
            .collect::<Vec<_>>()
    };
    assert_eventually!(access().len() == 100, "{} access lines", access().len());
    for line in access() {
        assert!(line.contains("outcome=\"send_timeout\""), "{line}");
    }
    let last = flood.closed().into_iter().max().unwrap() - all_open;
    assert!(
        last <= Duration::from_secs(3),
        "released {last:?} after the last head"
    );
    let first = flood.closed().into_iter().min().unwrap() - asked;
    assert!(
        first >= Duration::from_secs(1),
        "released {first:?} after asking, before the send timeout"
    );
    // Streams the client never reads do not keep its connection open: once they were cut,
    // it is idle, gets its GOAWAY, and is closed when they still do not end.
    let closed = tokio::time::timeout(Duration::from_secs(10), conn_task).await;
    assert!(
        closed.is_ok(),
        "the connection of cut streams is never closed"
    );
    let took = all_open.elapsed();
    assert!(
        took <= Duration::from_secs(2 + 2 + 5 + 1),
        "closed {took:?} after the last head (send timeout + idle + GOAWAY grace)"
    );
    legit.check(20).await;
    drop(bodies);
    px.shutdown().await;
}

#[tokio::test]
async fn sse_streams_that_are_quiet_while_their_client_reads_are_not_cut() {
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        None,
        "        timeouts: { idle: 2s }",
        "",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    // 4 events 1.5 s apart: 4.5 s, longer than two send timeouts, each gap under `idle`.
    for client in [http1(), h2c()] {
        let resp = send_streaming(&client, get(addr, "/sse?n=4&gap=1500")).await;
        assert_eq!(resp.status(), 200);
        let (text, _) = event_arrivals(resp.into_body()).await;
        assert_eq!(text.matches("data: event").count(), 4, "{text}");
    }
    px.shutdown().await;
}

// === item 3: idle and silent HTTP/2 ===

#[tokio::test]
async fn idle_h2_connections_are_closed_at_the_idle_timeout_even_when_they_answer_pings() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("h2=debug,hyper=debug,rampart=debug")
        .with_test_writer()
        .try_init();
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        None,
        "",
        "    http2: { idle_timeout: 2s }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let legit = Legit::start(addr);

    // A stream open longer than the idle timeout keeps its connection open.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let mut pings = conn.ping_pong().unwrap();
    let conn_task = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("http://{addr}/sse?n=7&gap=500"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let mut body = resp.await.unwrap().into_body();
    let mut events = 0;
    while let Some(d) = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .unwrap()
    {
        let d = d.unwrap();
        let _ = body.flow_control().release_capacity(d.len());
        events += String::from_utf8_lossy(&d).matches("data:").count();
    }
    assert_eq!(events, 7, "the 3 s stream ran to its end");
    let idle_from = Instant::now();
    // Then idle, answering (and sending) PINGs: closed with GOAWAY at the idle timeout.
    let pinger = async {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let _ = pings.ping(h2::Ping::opaque()).await;
        }
    };
    let closed = tokio::select! {
        biased;
        r = conn_task => { r.unwrap().ok(); idle_from.elapsed() }
        () = pinger => Duration::MAX,
    };
    assert_around("idle h2 connection", closed, Duration::from_secs(2));
    legit.check(20).await;
    px.shutdown().await;
}

#[tokio::test]
async fn h2_that_goes_silent_after_the_preface_is_closed_at_the_header_read_timeout() {
    let up = Upstream::start().await;
    let px = start(&config(
        &up.url(),
        None,
        "",
        "    header_read_timeout: 2s",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let legit = Legit::start(addr);
    let started = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (_client, conn) = h2::client::handshake(tcp).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(6), conn).await;
    assert!(closed.is_ok(), "silent h2 connection still open");
    assert_around(
        "silent h2 connection",
        started.elapsed(),
        Duration::from_secs(2),
    );
    legit.check(10).await;
    px.shutdown().await;
}
