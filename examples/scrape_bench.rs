//! How long a Prometheus scrape takes with 100 routes (the target: under 5 ms).
//!
//!   cargo run --release --example scrape_bench [ROUTES] [SCRAPES]
//!
//! Starts rampart in-process with ROUTES routes over 10 upstreams (one of them down, so
//! there are 5xx series and upstream errors too), sends each route a few GET, POST and
//! HEAD requests so every family has its series, then times SCRAPES scrapes: the encoding
//! alone, and `GET /metrics` over a kept-alive connection to the admin listener. Everything
//! runs on 127.0.0.1; the number of requests is fixed. Last, the status page's document
//! (`/admin/status`) with 15 minutes of samples.

// A benchmark run by hand: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

fn config(routes: usize, backend: std::net::SocketAddr, dead: std::net::SocketAddr) -> String {
    let mut y = String::from(
        "admin: { listen: \"127.0.0.1:0\" }\nlogging: { level: error, access_log: false }\n\
         listeners:\n  - name: main\n    listen: \"127.0.0.1:0\"\n    routes:\n",
    );
    for i in 0..routes {
        y.push_str(&format!(
            "      - {{ name: r{i}, match: {{ path_prefix: /r{i} }}, upstream: u{} }}\n",
            i % 10
        ));
    }
    y.push_str("upstreams:\n");
    for u in 0..10 {
        let addr = if u == 9 { dead } else { backend };
        y.push_str(&format!(
            "  u{u}: {{ endpoints: [\"http://{addr}\"], retry: {{ attempts: 1 }} }}\n"
        ));
    }
    y
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what:<32} median {:>7.3} ms   p99 {:>7.3} ms   max {:>7.3} ms",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let routes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let scrapes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);

    let (backend, _) = rampart::demo::start_upstreams(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("demo upstream starts");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cfg = rampart::config::parse_str(&config(routes, backend, dead), "bench.yaml", &|_| None)
        .expect("valid config");
    let running = rampart::app::start(cfg).await.expect("rampart starts");
    let addr = running.addr("main").unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    for i in 0..routes {
        for method in ["GET", "GET", "GET", "POST", "HEAD"] {
            let req = Request::builder()
                .method(method)
                .uri(format!("http://{addr}/r{i}/x"))
                .body(Full::new(Bytes::from_static(b"x")))
                .unwrap();
            if let Ok(resp) = client.request(req).await {
                let _ = resp.into_body().collect().await;
            }
        }
    }

    let text = running.encode_metrics();
    let samples = text.lines().filter(|l| !l.starts_with('#')).count();
    println!(
        "{routes} routes: scrape of {} bytes, {samples} samples",
        text.len()
    );

    let mut encode = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let t = Instant::now();
        let s = running.encode_metrics();
        encode.push(t.elapsed());
        std::hint::black_box(s);
    }
    report("encode (in process)", encode);

    let url = format!("http://{}/metrics", running.admin_addr);
    let mut http = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let t = Instant::now();
        let resp = client
            .request(Request::get(&url).body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("scrape");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        http.push(t.elapsed());
        std::hint::black_box(body);
    }
    report("GET /metrics (keep-alive)", http);

    // The status page's document with a full chart span: 90 samples (15 min at 10 s).
    for _ in 0..90 {
        running.record_sample();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let url = format!("http://{}/admin/status", running.admin_addr);
    let mut status = Vec::with_capacity(50);
    for _ in 0..50 {
        let t = Instant::now();
        let resp = client
            .request(Request::get(&url).body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("status");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        status.push(t.elapsed());
        std::hint::black_box(body);
    }
    report("GET /admin/status (90 samples)", status);
    running.shutdown().await;
}
