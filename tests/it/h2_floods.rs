//! HTTP/2 floods against the rampart binary, with raw frames: rapid reset, CONTINUATION
//! flood, HPACK bomb, PING / SETTINGS / WINDOW_UPDATE / PRIORITY / unknown-type / empty
//! DATA floods, streams over the concurrent-streams limit. Each attacking connection must be closed (GOAWAY or TCP close)
//! within 2 s of its first frame, a legitimate client alongside must keep being served, and
//! the process's resident memory (VmRSS) must stay bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::process::{Proc, free_port, temp_dir, vm_rss_kib};
use crate::support::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string literal, no Huffman; lengths below 2^21.
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// An HPACK integer with an `n`-bit prefix, `first` holding the bits above it.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// `method` (GET: static index 2; POST: 3) `http://a/`: the header block of a request.
fn request_block(post: bool) -> Vec<u8> {
    let mut b = vec![if post { 0x83 } else { 0x82 }, 0x86, 0x84];
    // :authority "a", literal without indexing, name from the static table (1).
    b.push(0x01);
    hpack_string(&mut b, b"a");
    b
}

/// The attack: the bytes of one round, repeated until the server closes the connection.
struct Attack {
    name: &'static str,
    /// Sent once, after the preface and SETTINGS.
    opening: Vec<u8>,
    /// Round `i`'s frames.
    round: fn(u32) -> Vec<u8>,
}

fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "rapid reset",
            opening: Vec::new(),
            round: |i| {
                let id = 2 * i + 1;
                let mut f = frame(HEADERS, END_STREAM | END_HEADERS, id, &request_block(false));
                f.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
                f
            },
        },
        Attack {
            name: "CONTINUATION flood",
            // A head that never ends.
            opening: frame(HEADERS, 0, 1, &request_block(false)),
            round: |i| {
                let mut block = vec![0x00];
                hpack_string(&mut block, format!("x-c{i}").as_bytes());
                hpack_string(&mut block, &[b'v'; 8 * 1024]);
                frame(CONTINUATION, 0, 1, &block)
            },
        },
        Attack {
            name: "HPACK bomb",
            opening: Vec::new(),
            round: |i| {
                let id = 2 * i + 1;
                let mut block = request_block(false);
                if i == 0 {
                    // One 4000-byte entry in the dynamic table (index 62) ...
                    block.push(0x40);
                    hpack_string(&mut block, b"x-bomb");
                    hpack_string(&mut block, &[b'b'; 4000]);
                }
                // ... referenced one byte at a time: ~64 MB decoded from 16 KB.
                block.extend(std::iter::repeat_n(0xbe, 16_000));
                frame(HEADERS, END_STREAM | END_HEADERS, id, &block)
            },
        },
        Attack {
            name: "PING flood",
            opening: Vec::new(),
            round: |i| frame(PING, 0, 0, &u64::from(i).to_be_bytes()),
        },
        Attack {
            name: "SETTINGS flood",
            opening: Vec::new(),
            // SETTINGS_INITIAL_WINDOW_SIZE, a different value each time.
            round: |i| {
                let mut p = vec![0x00, 0x04];
                p.extend_from_slice(&(65_535 + (i % 1000)).to_be_bytes());
                frame(SETTINGS, 0, 0, &p)
            },
        },
        Attack {
            name: "WINDOW_UPDATE flood",
            opening: Vec::new(),
            round: |_| frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()),
        },
        Attack {
            name: "PRIORITY flood",
            opening: Vec::new(),
            round: |i| frame(PRIORITY, 0, 2 * (i % 1000) + 1, &[0, 0, 0, 0, 16]),
        },
        Attack {
            name: "unknown frame type flood",
            opening: Vec::new(),
            round: |_| frame(0xee, 0, 0, b"x"),
        },
        Attack {
            name: "empty DATA flood",
            opening: frame(HEADERS, END_HEADERS, 1, &request_block(true)),
            round: |_| frame(DATA, 0, 1, &[]),
        },
        Attack {
            name: "streams over the limit",
            opening: Vec::new(),
            // POSTs whose bodies never come: each stream stays open.
            round: |i| frame(HEADERS, END_HEADERS, 2 * i + 1, &request_block(true)),
        },
    ]
}

/// How an attack ended, seen from the attacker.
#[derive(Debug)]
enum Closed {
    GoAway(u32),
    Eof,
}

/// Runs `attack` on a fresh connection: writes rounds (up to `max_rounds`, for at most
/// `max_time`) while a reader waits for GOAWAY or the end of the connection. Returns how
/// it ended and when, counted from the first frame, and the rounds written.
async fn run(
    addr: SocketAddr,
    attack: &Attack,
    max_time: Duration,
) -> (Option<Closed>, Duration, u32) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 64 * 1024];
            let deadline = tokio::time::Instant::now() + max_time + Duration::from_secs(2);
            let end = loop {
                // Frames in the buffer: look for GOAWAY.
                while buf.len() >= 9 {
                    let len = (usize::from(buf[0]) << 16)
                        | (usize::from(buf[1]) << 8)
                        | usize::from(buf[2]);
                    if buf.len() < 9 + len {
                        break;
                    }
                    if buf[3] == GOAWAY && len >= 8 {
                        let code = u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]);
                        done.store(true, Ordering::SeqCst);
                        return (Some(Closed::GoAway(code)), started.elapsed());
                    }
                    buf.drain(..9 + len);
                }
                match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    Ok(_) => break Some(Closed::Eof),
                    Err(_) => break None,
                }
            };
            done.store(true, Ordering::SeqCst);
            (end, started.elapsed())
        })
    };
    let mut opening = PREFACE.to_vec();
    opening.extend(frame(SETTINGS, 0, 0, &[]));
    opening.extend_from_slice(&attack.opening);
    let mut rounds = 0u32;
    if wr.write_all(&opening).await.is_ok() {
        let mut batch = Vec::new();
        while !done.load(Ordering::SeqCst) && started.elapsed() < max_time && rounds < 2_000_000 {
            batch.clear();
            // About 64 KiB per write.
            while batch.len() < 64 * 1024 {
                batch.extend((attack.round)(rounds));
                rounds += 1;
            }
            match tokio::time::timeout(Duration::from_millis(200), wr.write_all(&batch)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                // The server stopped reading: keep checking whether it closed.
                Err(_) => {}
            }
        }
    }
    let (end, at) = reader.await.unwrap();
    (end, at, rounds)
}

fn describe(end: &Option<Closed>) -> String {
    match end {
        Some(Closed::GoAway(code)) => format!("GOAWAY({code})"),
        Some(Closed::Eof) => "close".into(),
        None => "nothing".into(),
    }
}

/// A legitimate client: GET /ok in turn over HTTP/2 and HTTP/1.1 until told to stop.
/// Returns (served, failed).
fn legitimate(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, usize)> {
    tokio::spawn(async move {
        let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let (h2, h1) = (h2c(), http1());
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let client = if i.is_multiple_of(2) { &h2 } else { &h1 };
            i += 1;
            let fut = client.request(get(addr, "/ok"));
            match tokio::time::timeout(Duration::from_secs(5), fut).await {
                Ok(Ok(resp)) if resp.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                other => {
                    eprintln!(
                        "legitimate request failed: {:?}",
                        other.map(|r| r.map(|r| r.status()))
                    );
                    failed.fetch_add(1, Ordering::SeqCst)
                }
            };
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok.into_inner(), failed.into_inner())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_floods_are_cut_within_2s_and_memory_stays_bounded() {
    let up = Upstream::start().await;
    let (port, admin) = (free_port(), free_port());
    let text = format!(
        r#"admin: {{ listen: "127.0.0.1:{admin}" }}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:{port}"
    routes:
      - match: {{ path_prefix: / }}
        upstream: up
upstreams:
  up:
    endpoints: ["{}"]
    connect_timeout: 1s
"#,
        up.url()
    );
    let path = temp_dir("h2-floods").join("proxy.yaml");
    std::fs::write(&path, text).unwrap();
    let mut px = Proc::spawn(&path, SocketAddr::from(([127, 0, 0, 1], admin)));
    px.wait_ready().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let pid = px.pid();

    // Warm up (worker threads, pools, the legitimate client's connections) before the
    // baseline is read.
    let stop = Arc::new(AtomicBool::new(false));
    let legit = legitimate(addr, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = vm_rss_kib(pid);
    let mut peak = baseline;
    let mut slow = Vec::new();
    println!("h2 floods: baseline VmRSS {} KiB", baseline);
    let attacks = Arc::new(attacks());
    for which in 0..attacks.len() {
        let name = attacks[which].name;
        let before = vm_rss_kib(pid);
        // Sustained: 4 attacking connections at a time, each replaced when it is cut, for
        // 600 ms (and at least 8 connections).
        let started = Instant::now();
        let (mut conns, mut rounds, mut worst) = (0usize, 0u64, Duration::ZERO);
        let mut ends: std::collections::BTreeMap<String, usize> = Default::default();
        while started.elapsed() < Duration::from_millis(600) || conns < 8 {
            let wave: Vec<_> = (0..4)
                .map(|_| {
                    let attacks = attacks.clone();
                    tokio::spawn(
                        async move { run(addr, &attacks[which], Duration::from_secs(4)).await },
                    )
                })
                .collect();
            for task in wave {
                let (end, at, n) = task.await.unwrap();
                conns += 1;
                rounds += u64::from(n);
                worst = worst.max(at);
                *ends.entry(describe(&end)).or_default() += 1;
                if end.is_none() || at > Duration::from_secs(2) {
                    slow.push(format!("{name}: {end:?} after {at:?}"));
                }
            }
        }
        let after = vm_rss_kib(pid);
        peak = peak.max(after);
        println!(
            "  {name:<26} {conns:>3} connections, {rounds:>8} rounds, cut by {ends:?}, \
             slowest after {worst:>7.1?}, VmRSS {before:>6} -> {after:>6} KiB"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let (served, failed) = legit.await.unwrap();
    let end_rss = vm_rss_kib(pid);
    println!(
        "  legitimate client: {served} served, {failed} failed; VmRSS baseline {baseline} KiB, \
         peak {peak} KiB, end {end_rss} KiB (+{} KiB)",
        end_rss.saturating_sub(baseline)
    );
    assert!(slow.is_empty(), "attacks not cut within 2 s: {slow:#?}");
    assert_eq!(failed, 0, "the legitimate client was refused");
    assert!(served >= 50, "legitimate client served only {served}");
    // Generous: a debug build, allocator caches; a leak or an unbounded buffer is far more.
    assert!(
        peak.saturating_sub(baseline) < 200 * 1024,
        "VmRSS grew from {baseline} KiB to {peak} KiB"
    );
    assert!(
        px.wait_exit(Duration::ZERO).await.is_none(),
        "rampart exited:\n{}",
        px.stderr()
    );
}
