//! Event streams as first-class traffic (issue 16): a stream that stalls, breaks, runs too
//! long or reports an error in-band ends with a complete final event at an event boundary,
//! the upstream request is cancelled, the breaker hears of it; heartbeats keep quiet streams
//! open; a slow reader is never mistaken for a stalled upstream.
//!
//! The upstream is a raw TCP peer writing exactly the bytes (and chunks) each test scripts,
//! so the client's bytes can be compared exactly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::assert_eventually;
use crate::support::*;

/// What the scripted upstream does, in order, on every connection.
#[derive(Clone, Debug)]
enum Step {
    /// One chunk with these bytes.
    Send(&'static [u8]),
    /// One chunk with the first `k` bytes of these, `k` from the request's `?k=`.
    Prefix(&'static [u8]),
    SendOwned(Vec<u8>),
    Wait(u64),
    /// The same event every `ms`, `n` times.
    Every {
        ms: u64,
        n: usize,
    },
    /// The terminating chunk: a clean end.
    End,
    /// A reset (RST).
    Reset,
    /// A chunk header that is not hex.
    BadChunk,
}

struct SseUpstream {
    addr: SocketAddr,
    /// Connections the proxy closed before the script was over (cancelled requests).
    cancelled: Arc<AtomicUsize>,
    /// When each connection was closed by the proxy.
    closed_at: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SseUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SseUpstream {
    async fn start(script: Vec<Step>) -> SseUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancelled = Arc::new(AtomicUsize::new(0));
        let closed_at = Arc::new(Mutex::new(Vec::new()));
        let (c, t) = (cancelled.clone(), closed_at.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(s, script.clone(), c.clone(), t.clone()));
            }
        });
        SseUpstream {
            addr,
            cancelled,
            closed_at,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(
    mut s: TcpStream,
    script: Vec<Step>,
    cancelled: Arc<AtomicUsize>,
    closed_at: Arc<Mutex<Vec<Instant>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s
        .write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
              cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await;
    let (mut rd, mut wr) = s.into_split();
    // The proxy closing its side while the script runs is a cancellation.
    let watch = {
        let (cancelled, closed_at) = (cancelled.clone(), closed_at.clone());
        tokio::spawn(async move {
            let mut b = [0u8; 64];
            loop {
                match rd.read(&mut b).await {
                    Ok(0) | Err(_) => {
                        closed_at.lock().unwrap().push(Instant::now());
                        cancelled.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                }
            }
        })
    };
    let head = String::from_utf8_lossy(&head).into_owned();
    let k: usize = head
        .split_once("?k=")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or(0);
    for step in script {
        let ok = match step {
            Step::Send(b) => chunk(&mut wr, b).await,
            Step::Prefix(b) => chunk(&mut wr, &b[..k.min(b.len())]).await,
            Step::SendOwned(b) => chunk(&mut wr, &b).await,
            Step::Wait(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                true
            }
            Step::Every { ms, n } => {
                let mut ok = true;
                for i in 0..n {
                    ok = ok && chunk(&mut wr, format!("data: tick {i}\n\n").as_bytes()).await;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                ok
            }
            Step::End => {
                let _ = wr.write_all(b"0\r\n\r\n").await;
                watch.abort();
                return;
            }
            Step::Reset => {
                let _ = wr.as_ref().set_zero_linger();
                watch.abort();
                drop(wr);
                return;
            }
            Step::BadChunk => {
                let _ = wr.write_all(b"zz\r\nxx\r\n").await;
                watch.abort();
                return;
            }
        };
        if !ok {
            break;
        }
    }
    // Script over without an end: stay silent (hold the connection) until the proxy closes.
    let _ = tokio::time::timeout(Duration::from_secs(120), watch).await;
    drop(wr);
}

async fn chunk(wr: &mut tokio::net::tcp::OwnedWriteHalf, bytes: &[u8]) -> bool {
    let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    wr.write_all(&out).await.is_ok()
}

fn route(upstream: &SseUpstream, stream: &str) -> String {
    one_route(
        &upstream.url(),
        &format!(
            "        stream: {stream}\n    \
             \x20   timeouts: {{ idle: 30s }}"
        ),
        "",
    )
    .replace(
        "    connect_timeout: 1s",
        "    connect_timeout: 1s\n    circuit_breaker: { failures: 2, open_for: 60s }\n    retry: { attempts: 1 }",
    )
}

/// The whole body as the client got it, whether it ended cleanly, and how long it took.
async fn fetch(addr: SocketAddr, request_id: &str) -> (Vec<u8>, bool, Duration) {
    fetch_path(addr, "/chat", request_id).await
}

async fn fetch_path(addr: SocketAddr, path: &str, request_id: &str) -> (Vec<u8>, bool, Duration) {
    let started = Instant::now();
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("x-request-id", request_id)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = send_streaming(&http1(), req).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut out = Vec::new();
    let clean = loop {
        match tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame within 10 s")
        {
            None => break true,
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    out.extend_from_slice(d);
                }
            }
            Some(Err(_)) => break false,
        }
    };
    (out, clean, started.elapsed())
}

/// Splits a received body into what came before rampart's final event, and the final
/// event's code (checking its exact shape: the request id, a retry in 1-5 s, a blank line).
fn split_final<'a>(body: &'a [u8], request_id: &str) -> (&'a [u8], String) {
    let text = std::str::from_utf8(body).expect("utf-8");
    let at = text
        .rfind("event: error\ndata: {\"code\":\"")
        .unwrap_or_else(|| panic!("no final event in {text:?}"));
    let (before, last) = text.split_at(at);
    let code_start = "event: error\ndata: {\"code\":\"".len();
    let code_end = last[code_start..].find('"').unwrap() + code_start;
    let code = last[code_start..code_end].to_owned();
    let rest = &last[code_end..];
    let want_id = format!(",\"request_id\":\"{request_id}\"}}\nretry: ");
    let id_at = rest
        .find(&want_id)
        .unwrap_or_else(|| panic!("final event without the request id: {last:?}"));
    let retry = &rest[id_at + want_id.len()..];
    let retry_ms: u64 = retry
        .strip_suffix("\n\n")
        .unwrap_or_else(|| panic!("final event not ended by a blank line: {last:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("retry is a number: {last:?}"));
    assert!((1000..5000).contains(&retry_ms), "{last:?}");
    (&body[..before.len()], code)
}

fn metric(px: &rampart::app::Running, series: &str) -> f64 {
    sample(&px.encode_metrics(), series).unwrap_or(0.0)
}

const ENDED: &str = "rampart_http_streams_ended_total{listener=\"main\",route=\"all\",reason=";
const RESPONSE_BYTES: &str =
    "rampart_http_response_bytes_total{listener=\"main\",route=\"all\",upstream=\"up\"}";
const BREAKER: &str = "rampart_circuit_breaker_state{upstream=\"up\",route=\"all\"}";

#[tokio::test]
async fn a_stream_silent_before_its_first_event_ends_with_a_final_event() {
    let up = SseUpstream::start(vec![]).await;
    let px = start(&route(&up, "{ first_event: 300ms, heartbeat: off }")).await;
    let addr = px.addr("main").unwrap();
    for n in 1..=2 {
        let (body, clean, took) = fetch(addr, "req-first").await;
        assert!(clean, "the response ends cleanly");
        let (before, code) = split_final(&body, "req-first");
        assert_eq!(before, b"", "nothing before the final event");
        assert_eq!(code, "STREAM_STALLED");
        assert!(
            took >= Duration::from_millis(280) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // The upstream request is cancelled at the same moment.
        assert_eventually!(
            up.cancelled.load(Ordering::SeqCst) == n,
            "upstream not cancelled"
        );
        let closed = *up.closed_at.lock().unwrap().last().unwrap();
        let now = Instant::now();
        assert!(
            now.duration_since(closed) < took,
            "closed during the stream, not after"
        );
    }
    assert_eq!(
        metric(&px, &format!("{ENDED}\"first_event_timeout\"}}")),
        2.0
    );
    // Two first-event timeouts: the route's breaker (failures: 2) is open though every
    // answer was a 200.
    assert_eq!(metric(&px, BREAKER), 1.0);
    px.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_stalls_mid_event_gets_only_whole_events_then_the_final_event() {
    let up = SseUpstream::start(vec![
        Step::Send(b"id: 1\ndata: one\n\n"),
        Step::Send(b"data: two\r\n\r\n: a comment\n"),
        // Half an event, then silence.
        Step::Send(b"event: message\ndata: thr"),
    ])
    .await;
    let px = start(&route(&up, "{ between_events: 400ms, heartbeat: off }")).await;
    let (body, clean, took) = fetch(px.addr("main").unwrap(), "req-stall").await;
    assert!(clean);
    let (before, code) = split_final(&body, "req-stall");
    assert_eq!(
        std::str::from_utf8(before).unwrap(),
        "id: 1\ndata: one\n\ndata: two\r\n\r\n: a comment\n",
        "whole events (and the comment) unchanged; the half event never reaches the client"
    );
    assert_eq!(code, "STREAM_STALLED");
    assert!(took >= Duration::from_millis(380), "{took:?}");
    assert_eventually!(up.cancelled.load(Ordering::SeqCst) == 1, "not cancelled");
    assert_eq!(metric(&px, &format!("{ENDED}\"stalled\"}}")), 1.0);
    px.shutdown().await;
}

/// The first event comes after the head went out (so not with it), whole, then silence:
/// `between_events` runs from that event, not `first_event` from the head. The server
/// writes such an event without asking the body again (`h1::Waits`): the switch of timers
/// must be armed while the event is handled, not on a later poll that never comes.
#[tokio::test]
async fn a_stall_right_after_a_late_first_event_ends_at_between_events() {
    let up = SseUpstream::start(vec![Step::Wait(600), Step::Send(b"data: one\n\n")]).await;
    let px = start(&route(
        &up,
        "{ first_event: 6s, between_events: 400ms, heartbeat: off }",
    ))
    .await;
    let (body, clean, took) = fetch(px.addr("main").unwrap(), "req-late").await;
    assert!(clean);
    let (before, code) = split_final(&body, "req-late");
    assert_eq!(std::str::from_utf8(before).unwrap(), "data: one\n\n");
    assert_eq!(code, "STREAM_STALLED");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(4),
        "ended {took:?} after the request: between_events is 400 ms after the event at 600 ms"
    );
    assert_eq!(metric(&px, &format!("{ENDED}\"stalled\"}}")), 1.0);
    px.shutdown().await;
}

#[tokio::test]
async fn comments_keep_a_stream_alive_only_when_configured() {
    let comments = || {
        let mut s = vec![Step::Send(b"data: a\n\n")];
        for _ in 0..8 {
            s.push(Step::Wait(100));
            s.push(Step::Send(b": thinking\n"));
        }
        s.push(Step::Send(b"data: b\n\n"));
        s.push(Step::End);
        s
    };
    let up = SseUpstream::start(comments()).await;
    let px = start(&route(&up, "{ between_events: 350ms, heartbeat: off }")).await;
    let (body, clean, _) = fetch(px.addr("main").unwrap(), "req-c1").await;
    assert!(clean);
    let (_, code) = split_final(&body, "req-c1");
    assert_eq!(code, "STREAM_STALLED", "comments are not events by default");
    px.shutdown().await;

    let px = start(&route(
        &up,
        "{ between_events: 350ms, heartbeat: off, comments_are_activity: true }",
    ))
    .await;
    let (body, clean, _) = fetch(px.addr("main").unwrap(), "req-c2").await;
    assert!(clean);
    let text = String::from_utf8(body).unwrap();
    assert!(text.ends_with("data: b\n\n"), "{text:?}");
    assert!(!text.contains("event: error"), "{text:?}");
    px.shutdown().await;
}

#[tokio::test]
async fn an_in_band_error_event_counts_as_an_upstream_failure() {
    let stream: &[u8] =
        b"data: hello\n\nevent: error\ndata: {\"message\":\"model overloaded\"}\n\n";
    let up = SseUpstream::start(vec![Step::Send(stream), Step::End]).await;
    let px = start(&route(&up, "{ heartbeat: off }")).await;
    let addr = px.addr("main").unwrap();
    for _ in 0..2 {
        let (body, clean, _) = fetch(addr, "req-inband").await;
        assert!(clean);
        assert_eq!(body, stream, "the upstream's bytes, unchanged");
    }
    assert_eq!(metric(&px, &format!("{ENDED}\"in_band_error\"}}")), 2.0);
    assert_eq!(
        metric(&px, BREAKER),
        1.0,
        "two in-band errors open the breaker"
    );
    px.shutdown().await;

    // Other names are configurable; `error` then is an ordinary event.
    let px = start(&route(&up, "{ heartbeat: off, error_events: [failed] }")).await;
    let (_, clean, _) = fetch(px.addr("main").unwrap(), "req-inband2").await;
    assert!(clean);
    assert_eq!(metric(&px, &format!("{ENDED}\"complete\"}}")), 1.0);
    assert_eq!(metric(&px, BREAKER), 0.0);
    px.shutdown().await;
}

/// Every split position of a stream with CRLF, CR and LF endings, a BOM, comments and
/// multi-line data: the upstream sends the first `k` bytes and stalls. The client gets
/// exactly the bytes up to the last event boundary in them (whole events, and comment lines
/// between events), then the final event.
#[tokio::test]
async fn events_split_at_every_byte_end_cleanly_at_a_boundary() {
    const STREAM: &[u8] =
        b"\xEF\xBB\xBFid: 1\r\ndata: a\r\ndata: b\r\n\r\n: ping\rdata: c\r\revent: x\ndata: d\n\n";
    // Offsets just past a line end with no event partly received: past the blank line's CR
    // (29) and its LF (30), the comment (37), the CR blank lines (46), the end (64).
    let boundaries = [29usize, 30, 37, 46, 64];
    assert_eq!(STREAM.len(), 64);
    let up = SseUpstream::start(vec![Step::Prefix(STREAM)]).await;
    let px = start(&route(
        &up,
        "{ first_event: 400ms, between_events: 400ms, heartbeat: off }",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 1..STREAM.len() {
        tasks.spawn(async move {
            let id = format!("split-{k}");
            (
                k,
                id.clone(),
                fetch_path(addr, &format!("/chat?k={k}"), &id).await,
            )
        });
    }
    let mut seen = 0;
    while let Some(done) = tasks.join_next().await {
        let (k, id, (body, clean, _)) = done.unwrap();
        assert!(clean, "split at {k}");
        let (before, code) = split_final(&body, &id);
        let want = boundaries
            .iter()
            .copied()
            .filter(|b| *b <= k)
            .max()
            .unwrap_or(0);
        assert_eq!(
            String::from_utf8_lossy(before),
            String::from_utf8_lossy(&STREAM[..want]),
            "split at {k}"
        );
        assert_eq!(code, "STREAM_STALLED", "split at {k}");
        seen += 1;
    }
    assert_eq!(seen, STREAM.len() - 1);
    px.shutdown().await;
}

/// What came before a `STREAM_TIMEOUT` final event: whole ticks of `Step::Every`, at
/// least four of them.
fn ticks_then_timeout<'a>(body: &'a [u8], request_id: &str) -> &'a str {
    let (before, code) = split_final(body, request_id);
    assert_eq!(code, "STREAM_TIMEOUT");
    let text = std::str::from_utf8(before).unwrap();
    assert!(
        text.starts_with("data: tick 0\n\n") && text.ends_with("\n\n"),
        "{text:?}"
    );
    assert!(text.matches("data: tick").count() >= 4, "{text:?}");
    text
}

#[tokio::test]
async fn a_stream_past_max_duration_ends_with_stream_timeout() {
    let up = SseUpstream::start(vec![Step::Every { ms: 100, n: 100 }]).await;
    let px = start(&route(&up, "{ max_duration: 700ms, heartbeat: off }")).await;
    let (body, clean, took) = fetch(px.addr("main").unwrap(), "req-max").await;
    assert!(clean);
    let text = ticks_then_timeout(&body, "req-max");
    assert!(took >= Duration::from_millis(680) && took < Duration::from_secs(3));
    assert_eventually!(up.cancelled.load(Ordering::SeqCst) == 1, "not cancelled");
    assert_eq!(metric(&px, &format!("{ENDED}\"max_duration\"}}")), 1.0);
    // Time to the first event, the gaps between events, events per stream.
    let labels = "{listener=\"main\",route=\"all\",upstream=\"up\"}";
    let ticks = text.matches("data: tick").count() as f64;
    assert_eq!(
        metric(
            &px,
            &format!("rampart_http_stream_first_event_seconds_count{labels}")
        ),
        1.0
    );
    assert_eq!(
        metric(
            &px,
            &format!("rampart_http_stream_event_gap_seconds_count{labels}")
        ),
        ticks - 1.0
    );
    let gaps = metric(
        &px,
        &format!("rampart_http_stream_event_gap_seconds_sum{labels}"),
    );
    assert!(
        gaps > 0.08 * (ticks - 1.0) && gaps < 0.2 * (ticks - 1.0),
        "{gaps}"
    );
    let per_stream = "{listener=\"main\",route=\"all\"}";
    assert_eq!(
        metric(&px, &format!("rampart_http_stream_events_sum{per_stream}")),
        ticks
    );
    assert_eq!(
        metric(&px, BREAKER),
        0.0,
        "rampart's own limit is not the upstream's failure"
    );
    px.shutdown().await;
}

/// `route` with the route's own body timers in place of its `idle: 30s`.
fn route_with_timeouts(upstream: &SseUpstream, stream: &str, timeouts: &str) -> String {
    route(upstream, stream).replace("timeouts: { idle: 30s }", timeouts)
}

/// The route's `timeouts.idle` is the wait for the upstream's next bytes, on an event
/// stream too: with every stream timer off, an upstream gone quiet (here in the middle of
/// an event) is ended at `idle`, cleanly, with only whole events before the final event. It
/// runs on the stream's own timer (`stream::events`), not a second one around the body.
#[tokio::test]
async fn the_route_idle_timeout_ends_a_quiet_stream_cleanly_with_stream_timers_off() {
    let up = SseUpstream::start(vec![
        Step::Send(b"data: one\n\n"),
        Step::Wait(300),
        Step::Send(b"data: two\n\ndata: th"),
        Step::Wait(20_000),
        Step::Send(b"ree\n\n"),
    ])
    .await;
    let px = start(&route_with_timeouts(
        &up,
        "{ first_event: off, between_events: off, max_duration: off, heartbeat: off }",
        "timeouts: { idle: 1s }",
    ))
    .await;
    let (body, clean, took) = fetch(px.addr("main").unwrap(), "req-idle").await;
    assert!(clean, "ended by a final event, not cut");
    let (before, code) = split_final(&body, "req-idle");
    assert_eq!(
        std::str::from_utf8(before).unwrap(),
        "data: one\n\ndata: two\n\n",
        "whole events only"
    );
    assert_eq!(code, "STREAM_STALLED");
    // 300 ms, then a second of silence from the second chunk on (not from the head).
    assert!(
        took >= Duration::from_millis(1_250) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eventually!(up.cancelled.load(Ordering::SeqCst) == 1, "not cancelled");
    assert_eq!(metric(&px, &format!("{ENDED}\"stalled\"}}")), 1.0);
    // A stall is the upstream's failure, as `between_events`' is.
    assert_eq!(
        metric(
            &px,
            "rampart_upstream_errors_total{upstream=\"up\",kind=\"idle_timeout\"}"
        ),
        1.0
    );
    px.shutdown().await;
}

/// `timeouts.total` ends an event stream like `max_duration`: a final `STREAM_TIMEOUT`
/// event at a boundary, the upstream cancelled, not counted against it.
#[tokio::test]
async fn the_route_total_timeout_ends_a_stream_with_stream_timeout() {
    let up = SseUpstream::start(vec![Step::Every { ms: 100, n: 100 }]).await;
    let px = start(&route_with_timeouts(
        &up,
        "{ max_duration: off, heartbeat: off }",
        "timeouts: { idle: 30s, total: 800ms }",
    ))
    .await;
    let (body, clean, took) = fetch(px.addr("main").unwrap(), "req-total").await;
    assert!(clean);
    ticks_then_timeout(&body, "req-total");
    assert!(
        took >= Duration::from_millis(780) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eventually!(up.cancelled.load(Ordering::SeqCst) == 1, "not cancelled");
    assert_eq!(metric(&px, &format!("{ENDED}\"max_duration\"}}")), 1.0);
    assert_eq!(metric(&px, BREAKER), 0.0);
    px.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_breaks_mid_event_gets_upstream_broken() {
    for end in [Step::Reset, Step::BadChunk] {
        let up = SseUpstream::start(vec![
            Step::Send(b"data: one\n\ndata: two\n\n"),
            Step::Send(b"data: thr"),
            // Let the head and the first events through first: a reset discards what the
            // proxy has not read yet.
            Step::Wait(300),
            end.clone(),
        ])
        .await;
        let px = start(&route(&up, "{ heartbeat: off }")).await;
        let (body, clean, _) = fetch(px.addr("main").unwrap(), "req-broken").await;
        assert!(clean, "{end:?}: a clean end of the response");
        let (before, code) = split_final(&body, "req-broken");
        assert_eq!(before, b"data: one\n\ndata: two\n\n", "{end:?}");
        assert_eq!(code, "UPSTREAM_BROKEN", "{end:?}");
        assert_eq!(metric(&px, &format!("{ENDED}\"upstream_error\"}}")), 1.0);
        px.shutdown().await;
    }
}

#[tokio::test]
async fn heartbeats_go_between_events_and_do_not_reset_the_stall_timer() {
    let up = SseUpstream::start(vec![
        Step::Send(b"data: a\n\ndata: par"),
        Step::Wait(1_600),
        Step::Send(b"tial\n\n"),
    ])
    .await;
    let px = start(&route(&up, "{ heartbeat: 1s, between_events: 2500ms }")).await;
    let (body, clean, took) = fetch(px.addr("main").unwrap(), "req-hb").await;
    assert!(clean);
    let (before, code) = split_final(&body, "req-hb");
    // One heartbeat at 1 s (the half event held back, so the client is between events);
    // the event completes at 1.6 s; heartbeats at 2.6 s and 3.6 s (a second after the
    // client's last bytes); the stall timer, counted from the last event (1.6 s) and not
    // from heartbeats, ends the stream at 4.1 s.
    assert_eq!(
        std::str::from_utf8(before).unwrap(),
        "data: a\n\n: keep-alive\n\ndata: partial\n\n: keep-alive\n\n: keep-alive\n\n",
    );
    assert_eq!(code, "STREAM_STALLED");
    assert!(
        took >= Duration::from_millis(4_000) && took < Duration::from_millis(6_000),
        "{took:?}"
    );
    let hb = "rampart_http_stream_heartbeats_total{listener=\"main\",route=\"all\"}";
    assert_eq!(metric(&px, hb), 3.0);
    px.shutdown().await;
}

#[tokio::test]
async fn a_slow_reader_is_not_a_stalled_upstream() {
    // 200 events of 1 KiB sent at once, read by a client that pauses for longer than
    // `between_events`: every event arrives, and no final event.
    let event = format!("data: {}\n\n", "x".repeat(1024));
    let mut script = Vec::new();
    for _ in 0..200 {
        script.push(Step::SendOwned(event.clone().into_bytes()));
    }
    script.push(Step::End);
    let up = SseUpstream::start(script).await;
    let px = start(&route(
        &up,
        "{ between_events: 300ms, first_event: 300ms, heartbeat: off }",
    ))
    .await;
    let mut s = ask_chat(&px, "connection: close\r\n").await;
    let mut first = vec![0u8; 4096];
    let n = s.read(&mut first).await.unwrap();
    assert!(n > 0);
    // The client stops reading: the socket buffers fill, rampart stops reading upstream.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the rest in time")
        .unwrap();
    first.truncate(n);
    first.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&first);
    assert_eq!(
        text.matches("data: xxxx").count(),
        200,
        "every event arrived"
    );
    assert!(
        !text.contains("event: error"),
        "no final event for a slow reader"
    );
    assert!(text.ends_with("0\r\n\r\n"), "a complete chunked body");
    assert_eq!(metric(&px, &format!("{ENDED}\"complete\"}}")), 1.0);
    px.shutdown().await;
}

/// A client that stops reading while a stream flows, then reads again: everything the
/// upstream sent in the meantime must follow at once, though the upstream is quiet by then
/// (no event, no heartbeat, no end to wake the connection). The connection skips asking a
/// body that just said Pending (`write_body`), and must not skip it when its wake-up was
/// spent while the write waited for the client.
#[tokio::test]
async fn a_client_that_pauses_gets_what_came_meanwhile_when_it_reads_again() {
    // 2,000 events of 4 KiB, one chunk each, ~1 ms apart: more than the sockets between
    // rampart and the client hold, in frames small enough to be gathered before writing.
    const EVENTS: usize = 2_000;
    let mut script = Vec::new();
    for i in 0..EVENTS {
        let event = format!("data: {i:04} {}\n\n", "x".repeat(4096));
        script.push(Step::SendOwned(event.into_bytes()));
        script.push(Step::Wait(1));
    }
    // Quiet and open afterwards: only the stall timer (far off) or this end would end it.
    script.push(Step::Wait(15_000));
    script.push(Step::End);
    let up = SseUpstream::start(script).await;
    let px = start(&route(
        &up,
        "{ between_events: 30s, first_event: 30s, heartbeat: off }",
    ))
    .await;
    let mut s = ask_chat(&px, "").await;
    let mut buf = vec![0u8; 4096];
    assert!(s.read(&mut buf).await.unwrap() > 0);
    // Not reading: rampart's writes to this client block while events keep coming.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let last = format!("data: {:04} ", EVENTS - 1);
    let started = Instant::now();
    // Only the end of what came is searched (what came is ~8 MiB).
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !tail.windows(last.len()).any(|w| w == last.as_bytes()) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the rest of the stream did not follow the pause")
            .unwrap();
        assert!(n > 0, "closed before the last event");
        tail.extend_from_slice(&buf[..n]);
        let keep = tail.len().saturating_sub(last.len() + 64 * 1024);
        tail.drain(..keep);
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the rest took {:?}: it waited for the upstream's end",
        started.elapsed()
    );
    drop(s);
    px.shutdown().await;
}

#[tokio::test]
async fn plain_bodies_still_abort_when_the_upstream_stalls() {
    // Not an event stream: a truncated body must not look complete.
    let up = RawUpstream::start(RawAction::CloseMidBody).await;
    let px = start(&one_route(&format!("http://{}", up.addr), "", "")).await;
    let resp = send_streaming(&http1(), get(px.addr("main").unwrap(), "/")).await;
    let r = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .unwrap();
    assert!(r.is_err());
    px.shutdown().await;
}

/// Bytes that come after the head went out (so not with it), then silence: the idle
/// timeout runs from them. The server writes them without asking the body again
/// (`h1::Waits`): the wait for the next bytes must begin while they are handled, not when
/// the timer armed for the first bytes next fires.
#[tokio::test]
async fn a_plain_body_that_stalls_after_late_bytes_is_cut_at_the_idle_timeout() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "        timeouts: { idle: 1s }", "")).await;
    let started = Instant::now();
    let resp = send_streaming(
        &http1(),
        get(px.addr("main").unwrap(), "/stall?after=10&wait=350"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let r = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the stalled body is cut at the idle timeout, not left open");
    assert!(r.is_err(), "a truncated body must not look complete");
    let took = started.elapsed();
    // The bytes at 350 ms (past the head's hold of 250 ms), the cut 1 s after them; not
    // 1 s after the timer armed for the first bytes fired (2 s).
    assert!(
        took >= Duration::from_millis(1300) && took < Duration::from_millis(1850),
        "{took:?}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn over_http2_a_stalled_stream_ends_with_the_final_event_too() {
    let up = SseUpstream::start(vec![Step::Send(b"data: one\n\ndata: tw")]).await;
    let px = start(&route(&up, "{ between_events: 300ms, heartbeat: off }")).await;
    let req = http::Request::get(format!("http://{}/chat", px.addr("main").unwrap()))
        .header("x-request-id", "req-h2")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = send_streaming(&h2c(), req).await;
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .unwrap()
        .expect("the stream ends with END_STREAM, not a reset")
        .to_bytes();
    let (before, code) = split_final(&body, "req-h2");
    assert_eq!(before, b"data: one\n\n");
    assert_eq!(code, "STREAM_STALLED");
    assert_eventually!(up.cancelled.load(Ordering::SeqCst) == 1, "not cancelled");
    px.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_is_counted_client_gone_and_cancels_the_upstream() {
    let up = SseUpstream::start(vec![Step::Every { ms: 50, n: 200 }]).await;
    let px = start(&route(&up, "{ heartbeat: off }")).await;
    let mut s = ask_chat(&px, "").await;
    read_until(&mut s, b"data: tick 1\n\n", "two events").await;
    drop(s);
    assert_eventually!(up.cancelled.load(Ordering::SeqCst) == 1, "not cancelled");
    assert_eventually!(
        metric(&px, &format!("{ENDED}\"client_gone\"}}")) == 1.0,
        "client_gone not counted"
    );
    // The body bytes handed on before the client left are counted when the exchange ends
    // that way too (the count is kept by the tail and settled when it is dropped).
    assert!(
        metric(&px, RESPONSE_BYTES) >= 2.0 * "data: tick 0\n\n".len() as f64,
        "response bytes of a stream the client left: {}",
        metric(&px, RESPONSE_BYTES)
    );
    assert_eq!(
        metric(&px, BREAKER),
        0.0,
        "a client leaving is not the upstream's failure"
    );
    px.shutdown().await;
}

/// A stream that went quiet (no event, no heartbeat) and a client that leaves then: nothing
/// is being written, so only the watch on the client's socket can tell. The upstream is
/// cancelled at once, counted `client_gone`, not ended later by the stall timer. The quiet
/// stream is the connection's second: the watch of the first exchange must not be taken
/// for a watch of this one.
#[tokio::test]
async fn a_client_that_leaves_a_quiet_stream_cancels_the_upstream_at_once() {
    let up = SseUpstream::start(vec![Step::Send(b"data: one\n\n")]).await;
    let px = start(&route(&up, "{ between_events: 2s, heartbeat: off }")).await;
    // The first exchange: an event, then quiet until the stall timer ends it.
    let mut s = ask_chat(&px, "").await;
    let got = read_until(&mut s, b"0\r\n\r\n", "the first stream's end").await;
    assert!(String::from_utf8_lossy(&got).contains("STREAM_STALLED"));
    // The second, on the same connection: its event, a moment of quiet, then the client
    // leaves.
    s.write_all(b"GET /chat HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, b"data: one\n\n", "the second stream's event").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left = std::time::Instant::now();
    drop(s);
    assert_eventually!(
        up.cancelled.load(Ordering::SeqCst) == 2,
        "the second upstream request was not cancelled"
    );
    assert!(
        left.elapsed() < Duration::from_millis(1500),
        "cancelled {:?} after the client left: by the stall timer, not by the watch",
        left.elapsed()
    );
    assert_eq!(metric(&px, &format!("{ENDED}\"client_gone\"}}")), 1.0);
    assert_eq!(metric(&px, &format!("{ENDED}\"stalled\"}}")), 1.0);
    px.shutdown().await;
}

/// A raw HTTP/1.1 connection to `px` that has asked for `/chat`, with `extra` header lines.
async fn ask_chat(px: &rampart::app::Running, extra: &str) -> TcpStream {
    let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
    s.write_all(format!("GET /chat HTTP/1.1\r\nhost: a\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    s
}

/// Reads from `s` until what arrived holds `end`; what arrived.
async fn read_until(s: &mut TcpStream, end: &[u8], what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(end.len()).any(|w| w == end) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what} did not arrive"))
            .unwrap();
        assert!(n > 0, "closed before {what}");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// With nothing held back (`partial_event_buffer: 0`) the client is mid-event when the
/// drain deadline comes: the drain's final event waits for that event's end.
#[tokio::test]
async fn a_drain_in_the_middle_of_a_forwarded_event_waits_for_its_end() {
    let up = SseUpstream::start(vec![
        Step::Send(b"data: a\n\ndata: par"),
        Step::Wait(1_400),
        Step::Send(b"tial\n\n"),
        Step::Every { ms: 100, n: 50 },
    ])
    .await;
    let yaml = route(&up, "{ heartbeat: off, partial_event_buffer: 0 }")
        + "drain: { accept_grace: 0s, timeout: 1s }\n";
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let fetched = tokio::spawn(async move { fetch(addr, "req-drain").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = px.drain().await;
    let (body, clean, _) = fetched.await.unwrap();
    assert!(clean, "{report:?}");
    let text = String::from_utf8(body).unwrap();
    let want = "data: a\n\ndata: partial\n\nevent: error\ndata: {\"code\":\"SERVICE_UNAVAILABLE\"";
    assert!(text.starts_with(want), "{text:?}");
    assert!(text.ends_with("\n\n") && !text.contains("tick"), "{text:?}");
}

/// The drill, with the defaults (no `stream:` on the route): a model that stalls
/// after three tokens. Before, the client waited for the route's `idle` (60 s) and got a
/// cut socket; now heartbeats at 15 s and 30 s keep a load balancer in front from cutting
/// it, and at 45 s (`between_events`) it gets a final event it can show.
#[tokio::test]
async fn with_the_defaults_a_model_that_stalls_after_three_tokens_gets_a_final_event() {
    let up = SseUpstream::start(vec![
        Step::Send(b"data: {\"token\":\"Hel\"}\n\n"),
        Step::Send(b"data: {\"token\":\"lo\"}\n\n"),
        Step::Send(b"data: {\"token\":\",\"}\n\n"),
    ])
    .await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let started = Instant::now();
    let req = http::Request::get(format!("http://{}/chat", px.addr("main").unwrap()))
        .header("x-request-id", "req-defaults")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let mut body = send_streaming(&http1(), req).await.into_body();
    let mut got = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .expect("a frame within 20 s: heartbeats every 15 s")
    {
        if let Some(d) = frame.expect("a clean stream").data_ref() {
            got.extend_from_slice(d);
        }
    }
    let took = started.elapsed();
    let (before, code) = split_final(&got, "req-defaults");
    assert_eq!(
        std::str::from_utf8(before).unwrap(),
        "data: {\"token\":\"Hel\"}\n\ndata: {\"token\":\"lo\"}\n\ndata: {\"token\":\",\"}\n\n\
         : keep-alive\n\n: keep-alive\n\n"
    );
    assert_eq!(code, "STREAM_STALLED");
    assert!(
        took >= Duration::from_secs(45) && took < Duration::from_secs(50),
        "{took:?}"
    );
    assert_eventually!(up.cancelled.load(Ordering::SeqCst) == 1, "not cancelled");
    px.shutdown().await;
}
