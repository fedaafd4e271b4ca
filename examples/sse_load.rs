//! The two ends of `MODE=sse scripts/bench.sh`: an SSE upstream that emits one fixed-size
//! event per interval on every stream, and a load client that holds N streams open through
//! a target, counts the events it receives and reads the target's RSS and CPU time from
//! /proc at the edges of the measured interval (so the CPU is divided by exactly the events
//! counted between the same two instants).
//!
//!   sse_load upstream LISTEN [EVENT_MS] [EVENT_BYTES]
//!   sse_load load URL STREAMS SETTLE_S HOLD_S CLK_TCK [PID...] [-- AUX_PID...]
//!
//! Both run on one current-thread runtime: on the pinned bench they share one core with
//! each other, and the client reports its own and the upstream's (AUX_PID) CPU use, so the
//! run shows that neither was the bottleneck. The upstream is raw HTTP/1.1 over tokio
//! (a chunk per event, keep-alive): it should cost as little per event as can be.
//! The client uses hyper's HTTP/1 client, one connection per stream.
//!
//! `GET /any?count=N` ends the stream after N events (the warm-up); without it a stream
//! runs until the client goes. Everything is on 127.0.0.1; every wait is bounded.

// A benchmark run by the script: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Streams being opened at once: keeps the burst of connects under any listen backlog.
const OPEN_AT_ONCE: usize = 64;
/// Longest wait for all the streams to be open (or failed).
const OPEN_DEADLINE: Duration = Duration::from_secs(60);
/// Longest wait for one stream's head and first event.
const FIRST_EVENT_DEADLINE: Duration = Duration::from_secs(20);
/// Events in the warm-up stream.
const WARMUP_EVENTS: u64 = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = match args.first().map(String::as_str) {
        Some("upstream") => rt.block_on(upstream(&args[1..])),
        Some("load") => rt.block_on(load(&args[1..])),
        _ => Err(
            "usage: sse_load upstream LISTEN [EVENT_MS] [EVENT_BYTES] | \
                  sse_load load URL STREAMS SETTLE_S HOLD_S CLK_TCK [PID...] [-- AUX_PID...]"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sse_load: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: Option<T>) -> Res<T> {
    match args.get(i) {
        Some(s) => s
            .parse()
            .map_err(|_| format!("argument {} ({s}) is not valid", i + 1).into()),
        None => default.ok_or_else(|| format!("argument {} is missing", i + 1).into()),
    }
}

// ---------------------------------------------------------------------------------------
// Upstream

async fn upstream(args: &[String]) -> Res<()> {
    let listen: std::net::SocketAddr = arg(args, 0, None)?;
    let every = Duration::from_millis(arg(args, 1, Some(100))?);
    let size: usize = arg(args, 2, Some(100))?;
    let chunk = Bytes::from(event_chunk(size));
    let listener = TcpListener::bind(listen).await?;
    eprintln!("sse_load upstream on {listen}: {size}-byte event every {every:?} per stream");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // Out of descriptors, most likely: let some close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let _ = serve_upstream(stream, every, chunk).await;
        });
    }
}

/// One event, `data: ...\n\n` of `size` bytes in all, framed as one HTTP/1.1 chunk.
fn event_chunk(size: usize) -> Vec<u8> {
    let pad = size.saturating_sub("data: \n\n".len()).max(1);
    let event = format!("data: {}\n\n", "x".repeat(pad));
    let mut chunk = format!("{:x}\r\n", event.len()).into_bytes();
    chunk.extend_from_slice(event.as_bytes());
    chunk.extend_from_slice(b"\r\n");
    chunk
}

/// Requests on one connection, one after another (the proxies keep it alive).
async fn serve_upstream(mut s: TcpStream, every: Duration, chunk: Bytes) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 16 * 1024 || s.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let count = count_param(&buf[..end]);
        buf.drain(..end);
        s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await?;
        // The first tick is at once: a stream's first event comes with its head.
        let mut tick = tokio::time::interval(every);
        let mut sent = 0u64;
        while count.is_none_or(|n| sent < n) {
            tick.tick().await;
            s.write_all(&chunk).await?;
            sent += 1;
        }
        s.write_all(b"0\r\n\r\n").await?;
    }
}

/// `count=N` in the request line's query, if any.
fn count_param(head: &[u8]) -> Option<u64> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let target = line.split(' ').nth(1)?;
    let query = target.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("count="))
        .and_then(|n| n.parse().ok())
}

// ---------------------------------------------------------------------------------------
// Load client

#[derive(Default, Debug)]
struct Counters {
    opened: AtomicUsize,
    failed_open: AtomicUsize,
    /// The body ended or failed before the client let go of it.
    ended_early: AtomicUsize,
    errors: AtomicUsize,
    events: AtomicU64,
}

async fn load(args: &[String]) -> Res<()> {
    let url: String = arg(args, 0, None)?;
    let streams: usize = arg(args, 1, None)?;
    let settle = Duration::from_secs_f64(arg(args, 2, None)?);
    let hold = Duration::from_secs_f64(arg(args, 3, None)?);
    let clk_tck: f64 = arg(args, 4, None)?;
    let rest = &args[5.min(args.len())..];
    let split = rest.iter().position(|a| a == "--").unwrap_or(rest.len());
    let pids: Vec<u32> = rest[..split]
        .iter()
        .map(|p| p.parse())
        .collect::<Result<_, _>>()?;
    let aux: Vec<u32> = rest[(split + 1).min(rest.len())..]
        .iter()
        .map(|p| p.parse())
        .collect::<Result<_, _>>()?;
    let target = Target::parse(&url)?;

    // The warm-up: one short stream, read to its end.
    let mut warm = target
        .open(&format!("{}?count={WARMUP_EVENTS}", target.path))
        .await?;
    let mut n = 0;
    let mut scan = EventScan::default();
    while let Some(frame) = tokio::time::timeout(FIRST_EVENT_DEADLINE, warm.frame())
        .await
        .map_err(|_| "warm-up stream stalled")?
    {
        if let Ok(data) = frame?.into_data() {
            n += scan.count(&data);
        }
    }
    if n != WARMUP_EVENTS {
        return Err(format!("warm-up stream carried {n} events, not {WARMUP_EVENTS}").into());
    }
    drop(warm);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = rss_kib(&pids);

    let c = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(OPEN_AT_ONCE));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (t, c, gate, stop) = (target.clone(), c.clone(), gate.clone(), stop_rx.clone());
        tasks.spawn(stream_task(t, c, gate, stop));
    }
    while c.opened.load(Ordering::Relaxed) + c.failed_open.load(Ordering::Relaxed) < streams {
        if started.elapsed() > OPEN_DEADLINE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_s = started.elapsed().as_secs_f64();
    eprintln!(
        "sse_load: {} of {streams} streams open in {open_s:.1}s ({} failed); settling {settle:?}",
        c.opened.load(Ordering::Relaxed),
        c.failed_open.load(Ordering::Relaxed)
    );
    tokio::time::sleep(settle).await;

    // The measured interval: RSS sampled every second, CPU and events at both edges.
    let cpu0 = (cpu_ticks(&pids), cpu_ticks(&aux), cpu_ticks_self());
    let ev0 = c.events.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut next = t0;
    while t0.elapsed() < hold {
        next += Duration::from_secs(1);
        tokio::time::sleep_until(next.min(t0 + hold).into()).await;
        samples.push(rss_kib(&pids));
    }
    let secs = t0.elapsed().as_secs_f64();
    let ev1 = c.events.load(Ordering::Relaxed);
    let cpu1 = (cpu_ticks(&pids), cpu_ticks(&aux), cpu_ticks_self());

    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;

    let events = ev1 - ev0;
    let rss_streams = samples.iter().sum::<u64>() as f64 / samples.len().max(1) as f64;
    let per_event = |ticks: u64| ticks as f64 / clk_tck / events.max(1) as f64 * 1e6;
    let pct = |ticks: u64| ticks as f64 / clk_tck / secs * 100.0;
    // One line of key=value for the script.
    println!(
        "streams={streams} opened={} failed_open={} ended_early={} errors={} open_s={open_s:.1} \
         secs={secs:.2} events={events} events_per_s={:.0} rss_idle_kib={rss_idle} \
         rss_streams_kib={rss_streams:.0} mem_per_stream_kib={:.2} cpu_s={:.2} \
         cpu_us_per_event={:.2} proxy_cpu_pct={:.0} upstream_cpu_pct={:.0} client_cpu_pct={:.0}",
        c.opened.load(Ordering::Relaxed),
        c.failed_open.load(Ordering::Relaxed),
        c.ended_early.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed),
        events as f64 / secs,
        (rss_streams - rss_idle as f64) / streams.max(1) as f64,
        (cpu1.0 - cpu0.0) as f64 / clk_tck,
        per_event(cpu1.0 - cpu0.0),
        pct(cpu1.0 - cpu0.0),
        pct(cpu1.1 - cpu0.1),
        pct(cpu1.2 - cpu0.2),
    );
    Ok(())
}

#[derive(Clone, Debug)]
struct Target {
    addr: String,
    host: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Res<Target> {
        let rest = url
            .strip_prefix("http://")
            .ok_or("the URL must be http://")?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if !(host.starts_with("127.") || host.starts_with("localhost:")) {
            return Err(format!("{url} is not a loopback URL").into());
        }
        let path = if path.is_empty() { "/" } else { path };
        Ok(Target {
            addr: host.to_string(),
            host: host.to_string(),
            path: path.to_string(),
        })
    }

    /// Connects, sends `GET path` and returns the body of a 200 answer.
    async fn open(&self, path: &str) -> Res<hyper::body::Incoming> {
        let tcp = TcpStream::connect(&self.addr).await?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, &self.host)
            .header(http::header::ACCEPT, "text/event-stream")
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("GET {path}: status {}", resp.status()).into());
        }
        Ok(resp.into_body())
    }
}

/// One stream: opened (at most OPEN_AT_ONCE at a time, counted open at its first event),
/// then read until the stop signal.
async fn stream_task(
    t: Target,
    c: Arc<Counters>,
    gate: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut scan = EventScan::default();
    let opening = async {
        let _permit = gate.acquire().await.map_err(|_| "gate closed")?;
        let mut body = t.open(&t.path).await?;
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        let n = scan.count(&d);
                        c.events.fetch_add(n, Ordering::Relaxed);
                        if n > 0 {
                            return Ok::<_, Box<dyn std::error::Error>>(body);
                        }
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err("stream ended before its first event".into()),
            }
        }
    };
    let mut body = match tokio::time::timeout(FIRST_EVENT_DEADLINE, opening).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            eprintln!("sse_load: a stream failed to open: {e}");
            c.failed_open.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            eprintln!("sse_load: a stream had no first event in {FIRST_EVENT_DEADLINE:?}");
            c.failed_open.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    c.opened.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            frame = body.frame() => match frame {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        c.events.fetch_add(scan.count(&d), Ordering::Relaxed);
                    }
                }
                Some(Err(e)) => {
                    eprintln!("sse_load: a stream failed: {e}");
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    c.ended_early.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                None => {
                    c.ended_early.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
        }
    }
}

/// Counts events (a blank line ends one) across frames however the proxy cut them.
#[derive(Default, Debug)]
struct EventScan {
    /// The last byte seen (CRs aside) was a line feed.
    after_lf: bool,
}

impl EventScan {
    fn count(&mut self, data: &[u8]) -> u64 {
        let mut n = 0;
        for &b in data {
            match b {
                b'\n' if self.after_lf => {
                    n += 1;
                    self.after_lf = false;
                }
                b'\n' => self.after_lf = true,
                b'\r' => {}
                _ => self.after_lf = false,
            }
        }
        n
    }
}

// ---------------------------------------------------------------------------------------
// /proc

/// Sum of VmRSS over the processes, in KiB.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// Sum of utime+stime over the processes (all their threads), in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| stat_ticks(&format!("/proc/{p}/stat")))
        .sum()
}

fn cpu_ticks_self() -> u64 {
    stat_ticks("/proc/self/stat")
}

fn stat_ticks(path: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0;
    };
    // After "pid (comm) ": state is field 3, utime 14, stime 15.
    let Some((_, rest)) = s.rsplit_once(") ") else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}
