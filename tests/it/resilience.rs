//! Circuit breaking, retries, endpoint ejection and load shedding against real sockets.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

fn config(endpoints: &[String], upstream_extra: &str, listener_extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
{listener_extra}
    routes:
      - match: {{ path_prefix: / }}
        upstream: up
upstreams:
  up:
    endpoints: [{}]
    connect_timeout: 1s
{upstream_extra}
"#,
        eps.join(", ")
    )
}

async fn status_of(addr: std::net::SocketAddr, path: &str) -> (u16, String, Option<String>) {
    let (resp, body) = send(&http1(), get(addr, path)).await;
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).to_string(),
        retry_after,
    )
}

async fn metrics(px: &rampart::app::Running) -> String {
    let (_, body) = send(&http1(), get(px.admin_addr, "/metrics")).await;
    String::from_utf8_lossy(&body).to_string()
}

#[tokio::test]
async fn breaker_opens_fails_fast_admits_bounded_probes_and_closes() {
    let up = Upstream::start().await;
    let yaml = config(
        &[up.url()],
        "    circuit_breaker: { failures: 5, open_for: 500ms, max_open_for: 5s, half_open_successes: 2, half_open_max_probes: 2 }\n    retry: { attempts: 1 }",
        "",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();

    for _ in 0..5 {
        assert_eq!(status_of(addr, "/status/503").await.0, 503);
    }
    assert_eq!(up.requests(), 5);
    // The 6th is answered without reaching the upstream.
    let started = Instant::now();
    let (status, body, retry_after) = status_of(addr, "/ok").await;
    assert_eq!(status, 503);
    assert_eq!(json_field(&body, "code"), Some("CIRCUIT_OPEN"), "{body}");
    assert!(body.contains("\"upstream\":\"up\""));
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(up.requests(), 5);
    assert!(
        metrics(&px)
            .await
            .contains("rampart_circuit_breaker_state{upstream=\"up\",route=\"main.0\"} 1")
    );

    // After open_for: exactly two probes get through, the rest still fail fast.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(
            async move { status_of(addr, "/delay/300").await },
        ));
    }
    let mut ok = 0;
    let mut open = 0;
    for t in tasks {
        let (status, body, _) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 if json_field(&body, "code") == Some("CIRCUIT_OPEN") => open += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((ok, open), (2, 8));
    assert_eq!(up.requests(), 7);
    // Two successful probes closed it.
    assert_eq!(status_of(addr, "/ok").await.0, 200);
    assert!(
        metrics(&px)
            .await
            .contains("rampart_circuit_breaker_state{upstream=\"up\",route=\"main.0\"} 0")
    );

    // Open it again; a failed probe re-opens it for about twice as long.
    for _ in 0..5 {
        status_of(addr, "/status/503").await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        status_of(addr, "/status/503").await.0,
        503,
        "the probe reaches the upstream"
    );
    let reopened = Instant::now();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body, _) = status_of(addr, "/ok").await;
    assert_eq!(
        (status, json_field(&body, "code")),
        (503, Some("CIRCUIT_OPEN")),
        "still open after 600 ms"
    );
    // ~1 s (900-1100 ms with jitter) after the failed probe it admits probes again.
    let wait = Duration::from_millis(1200).saturating_sub(reopened.elapsed());
    tokio::time::sleep(wait).await;
    assert_eq!(status_of(addr, "/ok").await.0, 200);
    let m = metrics(&px).await;
    assert!(
        m.contains("rampart_circuit_breaker_transitions_total{upstream=\"up\",route=\"main.0\",to=\"open\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("rampart_circuit_breaker_rejections_total{upstream=\"up\",route=\"main.0\"}"),
        "{m}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn back_off_answers_pass_through_without_opening_the_breaker() {
    let up = Upstream::start().await;
    let px = start(&config(
        &[up.url()],
        "    retry: { attempts: 3, on: [connect_error, 503] }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    for _ in 0..8 {
        let (status, _, retry_after) = status_of(addr, "/backoff").await;
        assert_eq!((status, retry_after.as_deref()), (503, Some("7")));
    }
    assert_eq!(up.requests(), 8, "a 503 with Retry-After is not retried");
    assert_eq!(status_of(addr, "/ok").await.0, 200, "breaker still closed");
    px.shutdown().await;
}

#[tokio::test]
async fn post_that_reached_the_upstream_is_never_retried() {
    let rst = RawUpstream::start(RawAction::Reset).await;
    let ok = Upstream::start().await;
    let yaml = config(
        &[format!("http://{}", rst.addr), ok.url()],
        "    retry: { attempts: 3, on: [connect_error, reset, 502, 503] }",
        "",
    );
    let px = start(&yaml).await;
    let req = Request::post(format!("http://{}/echo", px.addr("main").unwrap()))
        .body(Full::new(Bytes::from_static(b"{\"q\":\"charge my card\"}")))
        .unwrap();
    let (resp, _) = send(&http1(), req).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        rst.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "seen once"
    );
    assert_eq!(ok.requests(), 0, "not retried elsewhere");
    px.shutdown().await;
}

#[tokio::test]
async fn get_after_a_reset_is_retried_on_another_endpoint() {
    let rst = RawUpstream::start(RawAction::Reset).await;
    let ok = Upstream::start().await;
    let yaml = config(
        &[format!("http://{}", rst.addr), ok.url()],
        "    retry: { attempts: 3, on: [connect_error, reset, 502, 503] }",
        "",
    );
    let px = start(&yaml).await;
    let (status, body, _) = status_of(px.addr("main").unwrap(), "/echo").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(rst.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(ok.requests(), 1);
    assert!(
        metrics(&px)
            .await
            .contains("rampart_upstream_retries_total{upstream=\"up\",reason=\"reset\"} 1")
    );
    px.shutdown().await;
}

#[tokio::test]
async fn post_is_retried_when_the_connection_was_refused() {
    let (_refusing, dead) = refusing_addr();
    let ok = Upstream::start().await;
    // Default retry policy: attempts 2, on connect_error.
    let px = start(&config(&[format!("http://{dead}"), ok.url()], "", "")).await;
    let req = Request::post(format!("http://{}/echo", px.addr("main").unwrap()))
        .body(Full::new(Bytes::from(vec![b'p'; 100_000])))
        .unwrap();
    let (resp, body) = send(&http1(), req).await;
    assert_eq!(resp.status(), 200);
    assert!(String::from_utf8_lossy(&body).contains("\"body_len\":100000"));
    assert_eq!(ok.requests(), 1);
    px.shutdown().await;
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_traffic_moves_to_the_healthy_one() {
    let (_refusing, dead) = refusing_addr();
    let ok = Upstream::start().await;
    let yaml = config(
        &[format!("http://{dead}"), ok.url()],
        "    retry: { attempts: 1 }\n    ejection: { consecutive_failures: 2, base_ejection: 30s }",
        "",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let mut failures = 0;
    for _ in 0..12 {
        if status_of(addr, "/ok").await.0 == 502 {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 2,
        "the dead endpoint is set aside after 2 failures"
    );
    assert_eq!(ok.requests(), 10);
    assert!(
        metrics(&px)
            .await
            .contains("rampart_endpoint_ejections_total{upstream=\"up\",endpoint=")
    );
    px.shutdown().await;
}

#[tokio::test]
async fn load_is_shed_with_503_overloaded_instead_of_queued() {
    let up = Upstream::start().await;
    for (upstream_extra, listener_extra) in
        [("", "    max_in_flight: 2"), ("    max_in_flight: 2", "")]
    {
        let px = start(&config(&[up.url()], upstream_extra, listener_extra)).await;
        let addr = px.addr("main").unwrap();
        let slow: Vec<_> = (0..2)
            .map(|_| tokio::spawn(async move { status_of(addr, "/delay/500").await }))
            .collect();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        let (status, body, retry_after) = status_of(addr, "/ok").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(json_field(&body, "code"), Some("OVERLOADED"));
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "shed at once"
        );
        for t in slow {
            assert_eq!(t.await.unwrap().0, 200);
        }
        // Slots are given back when responses end.
        assert_eq!(status_of(addr, "/ok").await.0, 200);
        assert!(metrics(&px).await.contains("rampart_requests_shed_total"));
        px.shutdown().await;
    }
}

#[tokio::test]
async fn a_stream_that_goes_silent_counts_as_a_failure_but_a_client_leaving_does_not() {
    let up = Upstream::start().await;
    let yaml = config(
        &[up.url()],
        "    circuit_breaker: { failures: 2, open_for: 30s }\n    retry: { attempts: 1 }",
        "",
    )
    .replace(
        "        upstream: up\n",
        "        upstream: up\n        timeouts: { idle: 200ms }\n",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    // Clients that leave mid-stream say nothing about the upstream.
    for _ in 0..3 {
        let resp = send_streaming(&http1(), get(addr, "/sse?n=20&gap=50")).await;
        assert_eq!(resp.status(), 200);
        drop(resp);
    }
    assert_eq!(status_of(addr, "/ok").await.0, 200, "still closed");
    // Two responses whose upstream goes silent mid-body open it.
    for _ in 0..2 {
        let resp = send_streaming(&http1(), get(addr, "/stall?after=10")).await;
        assert_eq!(resp.status(), 200);
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            http_body_util::BodyExt::collect(resp.into_body()),
        )
        .await
        .unwrap();
        assert!(r.is_err(), "the silent stream is cut");
    }
    let (status, body, _) = status_of(addr, "/ok").await;
    assert_eq!(
        (status, json_field(&body, "code")),
        (503, Some("CIRCUIT_OPEN")),
        "{body}"
    );
    px.shutdown().await;
}

/// retry.connect_wait: a POST that meets a refused port waits for the upstream, and is
/// sent once it listens; a wait that runs out is one failure toward ejection and the
/// breaker, whatever the number of connects it made.
#[tokio::test]
async fn a_connect_wait_sends_a_post_once_the_upstream_listens_and_counts_once() {
    // The port refuses until the upstream binds it, 300 ms into the request.
    let (hold, dead) = refusing_addr();
    let yaml = config(
        &[format!("http://{dead}")],
        "    retry: { connect_wait: 2s }\n    ejection: { consecutive_failures: 2 }\n    circuit_breaker: { failures: 2 }",
        "",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let up = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(hold);
        let listener = tokio::net::TcpListener::bind(dead).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("hello") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the body");
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    });
    let started = Instant::now();
    let req = Request::post(format!("http://{addr}/items"))
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let (resp, _) = send(&http1(), req).await;
    assert_eq!(resp.status(), 201);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(900),
        "{waited:?}"
    );
    let seen = up.await.unwrap();
    assert!(seen.starts_with("POST /items"), "{seen}");

    // Nothing listens any more: the wait runs its 2 s out (many connects), then fails once.
    let started = Instant::now();
    let (status, body, _) = status_of(addr, "/ok").await;
    assert_eq!(status, 502, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(1900));
    let text = metrics(&px).await;
    assert!(
        !text.contains("rampart_endpoint_ejections_total{"),
        "ejected after one request's wait:\n{text}"
    );
    let breakers: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("rampart_circuit_breaker_state{upstream=\"up\""))
        .collect();
    assert!(
        !breakers.is_empty() && breakers.iter().all(|l| l.ends_with(" 0")),
        "breaker not closed after one failed request:\n{text}"
    );
    let connects = sample(
        &text,
        "rampart_upstream_errors_total{upstream=\"up\",kind=\"connect_error\"}",
    )
    .unwrap_or(0.0);
    assert!(connects > 5.0, "{connects} connects");
    px.shutdown().await;
}

/// retry.connect_wait with many requests waiting on one endpoint: their connects are
/// shared (about one per 50 ms slot, not one per waiting request), no waiting request is
/// refused for lack of retry budget (a refused connect reaches nothing), and once the port
/// listens every waiter goes within ~250 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_share_their_connects_and_all_go_once_the_port_listens() {
    const WAITERS: usize = 50;
    let (hold, dead) = refusing_addr();
    let yaml = config(
        &[format!("http://{dead}")],
        "    retry: { connect_wait: 5s }\n    ejection: { consecutive_failures: 1000 }\n    circuit_breaker: { failures: 1000 }",
        "",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let connects = |text: &str| {
        sample(
            text,
            "rampart_upstream_errors_total{upstream=\"up\",kind=\"connect_error\"}",
        )
        .unwrap_or(0.0)
    };
    let client = http1();
    let requests: Vec<_> = (0..WAITERS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let (resp, _) = send(&client, get(addr, &format!("/w{i}"))).await;
                (resp.status().as_u16(), Instant::now())
            })
        })
        .collect();
    // Every request has made its own first connect; then about one second of waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = connects(&metrics(&px).await);
    let waited = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = connects(&metrics(&px).await) - before;
    let per_second = during / waited.elapsed().as_secs_f64();
    eprintln!(
        "{WAITERS} waiters: {before} connects before the wait, {during} in {:?} of wait",
        waited.elapsed()
    );
    assert!(
        before >= WAITERS as f64,
        "{before} connects before the wait"
    );
    // One per 50 ms slot is 20 a second (slots are jittered); one per waiter would be
    // hundreds.
    assert!(per_second <= 40.0, "{during} connects during the wait");

    // The port listens: every waiter goes within ~250 ms (a slot, then a jittered sleep).
    drop(hold);
    let listener = tokio::net::TcpListener::bind(dead).await.unwrap();
    let listening = Instant::now();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for _ in 0..WAITERS * 2 {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let mut last = Duration::ZERO;
    for r in requests {
        let (status, done) = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
        last = last.max(done.saturating_duration_since(listening));
    }
    eprintln!("all {WAITERS} answered {last:?} after the port listened");
    assert!(last < Duration::from_millis(500), "{last:?}");
    let text = metrics(&px).await;
    assert_eq!(
        sample(
            &text,
            "rampart_retry_budget_exhausted_total{upstream=\"up\"}"
        ),
        None,
        "{text}"
    );
    server.abort();
    px.shutdown().await;
}

/// A retry after the request was sent (a 503 on the `on:` list, an idempotent PUT with a
/// kept body) sends the same bytes again, with our own client (which gives back what it
/// sent, nothing copied in advance) and with hyper's (a copy made before the first send):
/// the differential check of the first against the reference.
#[tokio::test]
async fn a_request_retried_after_it_was_sent_goes_again_byte_for_byte_with_either_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for client in ["rampart", "hyper"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
        let log = seen.clone();
        // Answers the first request 503, every other 200; one request per read of a head
        // and its Content-Length body, the connection kept open.
        let upstream = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < end + 4 + len {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let request: Vec<u8> = buf.drain(..end + 4 + len).collect();
                        let first = {
                            let mut log = log.lock().unwrap();
                            log.push(request);
                            log.len() == 1
                        };
                        let answer: &[u8] = if first {
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let yaml = config(
            &[format!("http://{addr}")],
            &format!(
                "    client: {client}\n    retry: {{ attempts: 2, backoff: {{ base: 1ms, max: 2ms }}, on: [503] }}"
            ),
            "",
        );
        let px = start(&yaml).await;
        let req = Request::put(format!("http://{}/p/q?x=1&y=2", px.addr("main").unwrap()))
            .header("x-one", "1")
            .header("x-two", "two, 2")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(b"the body")))
            .unwrap();
        let (resp, body) = send(&http1(), req).await;
        assert_eq!(resp.status(), 200, "{client}");
        assert_eq!(&body[..], b"ok", "{client}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{client}: sent, then sent again");
        assert_eq!(
            String::from_utf8_lossy(&seen[0]),
            String::from_utf8_lossy(&seen[1]),
            "{client}: the retry is the same request"
        );
        let text = String::from_utf8_lossy(&seen[1]).to_ascii_lowercase();
        for part in [
            "put /p/q?x=1&y=2 ",
            "x-one: 1",
            "x-two: two, 2",
            "\r\n\r\nthe body",
        ] {
            assert!(text.contains(part), "{client}: {part:?} in\n{text}");
        }
        px.shutdown().await;
        upstream.abort();
    }
}
