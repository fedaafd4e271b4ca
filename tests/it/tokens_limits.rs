//! `cost: tokens` end to end: a FastGPT-shaped event stream whose last `data:` chunk reports
//! its usage; the stream that spends the key's tokens finishes whole, and the key's next
//! request is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::redis::unique;
use crate::support::*;

/// The events of one chat completion as FastGPT streams it (OpenAI-compatible chunks), the
/// usage in the last `data:` chunk.
const EVENTS: &[&str] = &[
    "event: answer\ndata: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"index\":0,\"finish_reason\":null}]}\n\n",
    "event: answer\ndata: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"lo\"},\"index\":0,\"finish_reason\":null}]}\n\n",
    "event: answer\ndata: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{},\"index\":0,\"finish_reason\":\"stop\"}]}\n\n",
    "event: answer\ndata: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":70,\"total_tokens\":110}}\n\n",
];

/// Streams `EVENTS` in chunks 20 ms apart to every request, one per connection.
struct FastGptUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for FastGptUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FastGptUpstream {
    async fn start() -> FastGptUpstream {
        Self::start_with("text/event-stream", EVENTS).await
    }

    /// Answers every request with `chunks`, one chunk each, 20 ms apart.
    async fn start_with(
        content_type: &'static str,
        chunks: &'static [&'static str],
    ) -> FastGptUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                    );
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for ev in chunks {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let c = format!("{:x}\r\n{ev}\r\n", ev.len());
                        if s.write_all(c.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let _ = s.write_all(b"0\r\n\r\n").await;
                    let _ = s.flush().await;
                });
            }
        });
        FastGptUpstream {
            addr,
            requests,
            task,
        }
    }
}

fn chat(addr: SocketAddr, user: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/api/v1/chat/completions"))
        .header("x-user", user)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            b"{\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
        )))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_spends_the_tokens_finishes_and_the_next_is_refused() {
    let up = FastGptUpstream::start().await;
    let p = unique("tok");
    let mut yaml = one_route(
        &format!("http://{}", up.addr),
        &format!("        rate_limits: [{p}]"),
        "",
    );
    yaml.push_str(&format!(
        "\nrate_limits:\n  {p}: {{ points: 100, per: 60s, cost: tokens, key: \"header:x-user\", store: memory }}\n"
    ));
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let client = http1();

    // 110 tokens against 100: the stream still finishes, every byte of it.
    let (resp, body) = send(&client, chat(addr, "alice")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        body,
        Bytes::from(EVENTS.concat()),
        "the whole stream arrives"
    );
    // The metric says exactly what the stream reported.
    assert_eq!(tokens(&px, "prompt"), 40.0);
    assert_eq!(tokens(&px, "completion"), 70.0);

    // The charge lands when the exchange ends: the next request is refused within a
    // bounded wait (each admitted one meanwhile spends 110 more).
    let deadline = Instant::now() + Duration::from_secs(3);
    let refused = loop {
        let (resp, body) = send(&client, chat(addr, "alice")).await;
        if resp.status() == 429 {
            break (resp, body);
        }
        assert_eq!(resp.status(), 200);
        assert!(
            Instant::now() < deadline,
            "tokens never charged: {} streams admitted",
            up.requests.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (resp, body) = refused;
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        1,
        "refused from the first request after the spending one"
    );
    let h = resp.headers();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(
        h["ratelimit-policy"],
        format!("\"{p}\";q=100;w=60").as_str()
    );
    assert_eq!(h["x-ratelimit-remaining"], "0");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(
        json_field(&body, "code"),
        Some("TOO_MANY_REQUESTS"),
        "{body}"
    );

    // Another key is unaffected.
    let (resp, _) = send(&client, chat(addr, "bob")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(tokens(&px, "prompt"), 80.0);
    assert_eq!(tokens(&px, "completion"), 140.0);
    px.shutdown().await;
}

fn tokens(px: &rampart::app::Running, kind: &str) -> f64 {
    let series = format!(
        "rampart_llm_tokens_total{{listener=\"main\",route=\"all\",upstream=\"up\",kind=\"{kind}\"}}"
    );
    sample(&px.encode_metrics(), &series).unwrap_or(0.0)
}

/// FastGPT's own stream: answer chunks, then a `flowResponses` event whose nodes carry
/// their token counts (no OpenAI `usage`).
const FLOW: &[&str] = &[
    "event: answer\ndata: {\"choices\":[{\"delta\":{\"content\":\"prompt_tokens: 999\"},\"index\":0}]}\n\n",
    "event: answer\ndata: [DONE]\n\n",
    "event: flowResponses\ndata: [{\"moduleName\":\"AI Chat\",\"moduleType\":\"chatNode\",\"inputTokens\":120,\"outputTokens\":30},{\"moduleName\":\"Tool\",\"moduleType\":\"tools\",\"inputTokens\":5,\"outputTokens\":7}]\n\n",
];

/// A JSON chat completion (not streamed) with its `usage`, split in two chunks.
const JSON_ANSWER: &[&str] = &[
    "{\"id\":\"c2\",\"object\":\"chat.completion\",\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":\"hi\"}}],\"usa",
    "ge\":{\"prompt_tokens\":11,\"completion_tokens\":22,\"total_tokens\":33}}",
];

#[tokio::test]
async fn fastgpt_flow_responses_and_json_answers_are_counted_exactly() {
    // JSON answers are read on routes that ask (`tokens: all`), event streams by default.
    for (content_type, chunks, tokens_key, prompt, completion) in [
        ("text/event-stream", FLOW, "", 125.0, 37.0),
        (
            "application/json; charset=utf-8",
            JSON_ANSWER,
            "        tokens: all",
            11.0,
            22.0,
        ),
        ("application/json", JSON_ANSWER, "", 0.0, 0.0),
        ("text/event-stream", FLOW, "        tokens: off", 0.0, 0.0),
    ] {
        let up = FastGptUpstream::start_with(content_type, chunks).await;
        let px = start(&one_route(&format!("http://{}", up.addr), tokens_key, "")).await;
        let addr = px.addr("main").unwrap();
        for n in 1..=2 {
            let (resp, body) = send(&http1(), chat(addr, "carol")).await;
            assert_eq!(resp.status(), 200);
            assert_eq!(body, Bytes::from(chunks.concat()), "unchanged");
            assert_eq!(
                tokens(&px, "prompt"),
                prompt * f64::from(n),
                "{content_type}"
            );
            assert_eq!(
                tokens(&px, "completion"),
                completion * f64::from(n),
                "{content_type}"
            );
        }
        px.shutdown().await;
    }
}
