//! HTTP/2 edge limits, checked with raw frames: the advertised stream limit and the
//! rapid-reset guard (CVE-2023-44487).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads one frame: (type, flags, stream, payload).
async fn read_frame(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut payload))
        .await
        .ok()?
        .ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream, payload))
}

#[tokio::test]
async fn advertises_at_most_100_concurrent_streams() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    let (kind, _, _, payload) = read_frame(&mut s).await.expect("server SETTINGS");
    assert_eq!(kind, 0x4, "first frame is SETTINGS");
    let max_streams = payload.chunks(6).find_map(|p| {
        (u16::from_be_bytes([p[0], p[1]]) == 0x3)
            .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
    });
    assert_eq!(max_streams, Some(100));
    // A raw peer never answers the shutdown PING; close it so the drain has nothing to wait for.
    drop(s);
    px.shutdown().await;
}

/// The protocol is told from the first bytes without taking them (`listener::proto`):
/// a client that sends them a byte or two at a time still gets its protocol, HTTP/1.1 for
/// `P`, `OST` and HTTP/2 for `PR`, `I * HTTP/2.0...`.
#[tokio::test]
async fn first_bytes_split_anywhere_still_choose_the_protocol() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let addr = px.addr("main").unwrap();
    let pause = Duration::from_millis(60);

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"P").await.unwrap();
    tokio::time::sleep(pause).await;
    s.write_all(b"OS").await.unwrap();
    tokio::time::sleep(pause).await;
    s.write_all(b"T /split HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    for cut in [1, 2, 3, 4, 10] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&PREFACE[..cut]).await.unwrap();
        tokio::time::sleep(pause).await;
        s.write_all(&PREFACE[cut..]).await.unwrap();
        s.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
        let (kind, _, _, _) = read_frame(&mut s)
            .await
            .unwrap_or_else(|| panic!("no SETTINGS with the preface cut at {cut}"));
        assert_eq!(kind, 0x4, "first frame is SETTINGS (cut at {cut})");
    }
    px.shutdown().await;
}

#[tokio::test]
async fn rapid_reset_flood_gets_goaway() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
    let mut flood = PREFACE.to_vec();
    flood.extend(frame(0x4, 0, 0, &[]));
    // GET / over http (HPACK static table: :method GET, :scheme http, :path /), then reset.
    for i in 0..500u32 {
        let id = 2 * i + 1;
        flood.extend(frame(0x1, 0x4 | 0x1, id, &[0x82, 0x86, 0x84]));
        flood.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
    }
    // The server may close before reading everything: a write error is fine.
    let _ = s.write_all(&flood).await;
    let mut goaway = None;
    for _ in 0..2000 {
        match read_frame(&mut s).await {
            Some((0x7, _, _, payload)) => {
                goaway = Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
                break;
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert_eq!(goaway, Some(0xb), "expected GOAWAY ENHANCE_YOUR_CALM");
    assert!(
        up.requests() < 500,
        "the flood reached the upstream: {}",
        up.requests()
    );
    drop(s);
    px.shutdown().await;
}

/// HEADERS for `GET <path>` over http (HPACK: :method GET and :scheme http indexed, :path
/// as a literal with its name indexed).
fn get_headers(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    frame(0x1, 0x4 | 0x1, stream, &block)
}

/// A stream that still arrives on a connection told to close (it raced the GOAWAY) gets 503
/// SERVICE_UNAVAILABLE; the stream in flight before it completes.
#[tokio::test]
async fn a_stream_after_goaway_gets_503_and_the_one_in_flight_completes() {
    let up = Upstream::start().await;
    let px = start(&one_route(&up.url(), "", "")).await;
    let mut s = TcpStream::connect(px.addr("main").unwrap()).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    hello.extend(get_headers(1, "/delay/700"));
    s.write_all(&hello).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let shutdown = tokio::spawn(px.shutdown());

    // The first GOAWAY of a graceful shutdown still admits streams (its last id is the
    // maximum) until the PING it sends is answered, which this peer never does.
    let mut saw_goaway = false;
    while !saw_goaway {
        match read_frame(&mut s).await {
            Some((0x7, ..)) => saw_goaway = true,
            Some(_) => {}
            None => panic!("connection closed before GOAWAY"),
        }
    }
    s.write_all(&get_headers(3, "/ok")).await.unwrap();
    let mut bodies: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut ended = [false; 2];
    while ended != [true, true] {
        match read_frame(&mut s).await {
            Some((0x0, flags, id @ (1 | 3), payload)) => {
                let i = (id / 2) as usize;
                bodies[i].extend_from_slice(&payload);
                ended[i] |= flags & 0x1 != 0;
            }
            Some(_) => {}
            None => break,
        }
    }
    let first = String::from_utf8_lossy(&bodies[0]);
    let late = String::from_utf8_lossy(&bodies[1]);
    assert_eq!(first, "delayed");
    assert!(late.contains("\"code\":\"SERVICE_UNAVAILABLE\""), "{late}");
    assert!(late.contains("Server is shutting down"), "{late}");
    assert_eq!(
        up.requests(),
        1,
        "the late stream never reached the upstream"
    );
    drop(s);
    assert!(shutdown.await.unwrap());
}
