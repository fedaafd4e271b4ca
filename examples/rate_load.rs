//! The fixed-rate load client of `MODE=scale scripts/bench.sh`: CONNECTIONS keep-alive
//! HTTP/1.1 connections sending `GET` to URL at RATE requests per second in all, for
//! WARMUP_S seconds not counted, then SECONDS measured. Debian's wrk has no `-R`; this is
//! the part of wrk2 the benchmark needs.
//!
//!   rate_load URL CONNECTIONS RATE WARMUP_S SECONDS CLK_TCK [PID...]
//!
//! Open loop: request k of connection i is due at `start + (i + k * CONNECTIONS) / RATE`,
//! whatever happened to the ones before, and its latency runs from that due time, not from
//! when it could be sent. A target that stalls for 100 ms is charged 100 ms on every request
//! that fell due meanwhile (they wait for the connection), not once: no coordinated
//! omission. HTTP/1.1 has one request in flight per connection, so a connection that falls
//! behind sends at once until it catches up.
//!
//! Prints one `key=value` line: requests answered in the measured interval, errors (failed,
//! timed out or not 200), requests never sent (their connection was still busy with earlier
//! ones when the run ended: the target did not keep up), reconnects, the rate achieved,
//! latency p50/p90/p99/max in ms, and the CPU time (utime+stime) of PIDs over the same
//! interval per request. Everything is on
//! 127.0.0.1; every wait is bounded.

// A benchmark run by the script: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Longest wait for one request (connecting included), from when it was sent.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Default, Debug)]
struct Counts {
    /// Measured requests answered 200, read to their end.
    ok: AtomicU64,
    /// Measured requests that failed, timed out or were not answered 200.
    errors: AtomicU64,
    /// Measured requests never sent: due before the end, but their connection was still
    /// busy with earlier ones when the run ended.
    missed: AtomicU64,
    /// Connections opened again after an error.
    reconnects: AtomicU64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rate_load: {e}");
            eprintln!("usage: rate_load URL CONNECTIONS RATE WARMUP_S SECONDS CLK_TCK [PID...]");
            ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> Res<T> {
    let s = args
        .get(i)
        .ok_or_else(|| format!("argument {} is missing", i + 1))?;
    s.parse()
        .map_err(|_| format!("argument {} ({s}) is not valid", i + 1).into())
}

async fn run(args: &[String]) -> Res<()> {
    let url: String = arg(args, 0)?;
    let connections: u64 = arg(args, 1)?;
    let rate: f64 = arg(args, 2)?;
    let warmup = Duration::from_secs_f64(arg(args, 3)?);
    let seconds = Duration::from_secs_f64(arg(args, 4)?);
    let clk_tck: f64 = arg(args, 5)?;
    let pids: Vec<u32> = args[6.min(args.len())..]
        .iter()
        .map(|p| p.parse())
        .collect::<Result<_, _>>()?;
    if connections == 0 || rate <= 0.0 || seconds.is_zero() {
        return Err("CONNECTIONS, RATE and SECONDS must be positive".into());
    }
    let target = Arc::new(Target::parse(&url)?);

    // Every connection opened (and proved to work) before the clock starts.
    let mut senders = Vec::new();
    for _ in 0..connections {
        let mut s = tokio::time::timeout(REQUEST_DEADLINE, target.connect())
            .await
            .map_err(|_| "connect timed out")??;
        tokio::time::timeout(REQUEST_DEADLINE, target.get(&mut s))
            .await
            .map_err(|_| "first request timed out")??;
        senders.push(s);
    }

    let counts = Arc::new(Counts::default());
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    // A little slack for the tasks to start before the first request falls due.
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + warmup;
    let end = measure_from + seconds;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, sender) in senders.into_iter().enumerate() {
        let first = start + Duration::from_secs_f64(i as f64 / rate);
        let (target, counts) = (target.clone(), counts.clone());
        tasks.spawn(connection(
            target,
            counts,
            sender,
            first,
            interval,
            measure_from,
            end,
        ));
    }

    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = cpu_ticks(&pids);
    let t0 = Instant::now();
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = cpu_ticks(&pids);
    let secs = t0.elapsed().as_secs_f64();

    // Requests due before `end` may still be in flight: wait for them (bounded).
    let mut latencies = Vec::new();
    let drained = tokio::time::timeout(REQUEST_DEADLINE + Duration::from_secs(1), async {
        while let Some(r) = tasks.join_next().await {
            latencies.extend(r.expect("connection task"));
        }
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
        return Err("requests still in flight after the deadline".into());
    }
    latencies.sort_unstable();
    let ok = counts.ok.load(Ordering::Relaxed);
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0 * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[i - 1] as f64 / 1000.0
    };
    let cpu = cpu1.saturating_sub(cpu0);
    let cpu_us = cpu as f64 / clk_tck / ok.max(1) as f64 * 1e6;
    println!(
        "requests={ok} errors={} missed={} reconnects={} secs={secs:.2} rate_target={rate:.0} rate={:.0} \
         p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} cpu_s={:.2} cpu_us_per_req={cpu_us:.1}",
        counts.errors.load(Ordering::Relaxed),
        counts.missed.load(Ordering::Relaxed),
        counts.reconnects.load(Ordering::Relaxed),
        ok as f64 / secs,
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(100.0),
        cpu as f64 / clk_tck,
    );
    Ok(())
}

/// One connection's schedule. Returns the latencies (µs, from the due time) of the
/// requests due in [measure_from, end) that were answered 200.
async fn connection(
    target: Arc<Target>,
    counts: Arc<Counts>,
    sender: SendRequest<Empty<Bytes>>,
    first: Instant,
    interval: Duration,
    measure_from: Instant,
    end: Instant,
) -> Vec<u64> {
    let mut sender = Some(sender);
    let mut latencies = Vec::new();
    let mut due = first;
    while due < end {
        if Instant::now() >= end {
            // So far behind that the run is over: what is still due was never sent. Counted
            // apart, so that a saturated target shows as one, not as a short tail.
            while due < end {
                if due >= measure_from {
                    counts.missed.fetch_add(1, Ordering::Relaxed);
                }
                due += interval;
            }
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let measured = due >= measure_from;
        let one = async {
            // A connection lost to an error is replaced, on the request's time.
            let mut s = match sender.take() {
                Some(s) if !s.is_closed() => s,
                _ => {
                    counts.reconnects.fetch_add(1, Ordering::Relaxed);
                    target.connect().await?
                }
            };
            target.get(&mut s).await?;
            sender = Some(s);
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        let result = match tokio::time::timeout(REQUEST_DEADLINE, one).await {
            Ok(r) => r,
            // The connection was dropped with the request: the next one opens another.
            Err(_) => Err("request timed out".into()),
        };
        match result {
            Ok(()) if measured => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                latencies.push(due.elapsed().as_micros() as u64);
            }
            Ok(()) => {}
            Err(e) if measured => {
                if counts.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("rate_load: {e}");
                }
            }
            Err(_) => {}
        }
        due += interval;
    }
    latencies
}

#[derive(Debug)]
struct Target {
    addr: String,
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
            path: path.to_string(),
        })
    }

    async fn connect(&self) -> Res<SendRequest<Empty<Bytes>>> {
        let tcp = TcpStream::connect(&self.addr).await?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(send)
    }

    /// One `GET`, its body read to the end; an error unless the answer is 200.
    async fn get(&self, send: &mut SendRequest<Empty<Bytes>>) -> Res<()> {
        send.ready().await?;
        let req = Request::get(&self.path)
            .header(http::header::HOST, &self.addr)
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        if status != http::StatusCode::OK {
            return Err(format!("GET {}: status {status}", self.path).into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// /proc

/// Sum of utime+stime over the processes (all their threads), in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                return 0;
            };
            // After "pid (comm) ": state is field 3, utime 14, stime 15.
            let Some((_, rest)) = s.rsplit_once(") ") else {
                return 0;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            get(11) + get(12)
        })
        .sum()
}
