//! Client-side request smuggling and the HTTP/1 head path, over raw TCP.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Upstream, one_route, parse};

/// Reads one response (head and Content-Length body) from `s`, within `wait`.
async fn read_response(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
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
    String::from_utf8_lossy(&out).into_owned()
}

/// Limits far past anything sane, set on the parsed config (whatever bounds `check` puts
/// on the keys): the head path must neither allocate by them nor overflow on them.
#[tokio::test]
async fn extreme_head_limits_neither_allocate_nor_wrap() {
    let up = Upstream::start().await;
    let mut cfg = parse(&one_route(&up.url(), "", ""));
    cfg.listeners[0].max_headers = 4_294_967_295;
    cfg.listeners[0].max_header_bytes = usize::MAX;
    let px = rampart::app::start(cfg).await.expect("proxy starts");
    let addr = px.addr("main").unwrap();

    // More headers than hyper's default of 100, in one write; named in Connection, so
    // they are stripped before the upstream (itself limited to 100) sees them.
    let names: Vec<String> = (0..150).map(|i| format!("x-h{i}")).collect();
    let mut many = format!(
        "GET /ok HTTP/1.1\r\nhost: a\r\nconnection: {}\r\n",
        names.join(", ")
    )
    .into_bytes();
    for name in &names {
        many.extend_from_slice(format!("{name}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&many).await.unwrap();
    let resp = read_response(&mut s, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "150 headers: {resp:?}");

    // A head in two reads (the second one after a pause).
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"x-late: 1\r\n\r\n").await.unwrap();
    let resp = read_response(&mut s, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "split head: {resp:?}");
    assert_eq!(up.requests(), 2);
    px.shutdown().await;
}
