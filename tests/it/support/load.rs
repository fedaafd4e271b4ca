//! A small HTTP/1.1 client over raw sockets that knows exactly what it received, and bounded
//! load built on it.
//!
//! The retry rule of the drain tests: a request is retried only when the connection closed
//! (or was reset) before a single byte of the response arrived, which is what any client
//! can safely do (the server never started answering). Anything else that is not a 200 is a
//! failure: another status, or a response cut after it started.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
pub enum Attempt {
    Response(Resp),
    /// Closed or reset before any response byte: safe to retry.
    NoResponse,
    /// The connection could not be opened.
    Refused,
    /// Some of the response arrived, then it broke.
    Broken(String),
}

/// One keep-alive connection, opened on first use and again after the server closes it.
pub struct Http1Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

impl Http1Conn {
    pub fn new(addr: SocketAddr) -> Self {
        Http1Conn {
            addr,
            stream: None,
            buf: Vec::new(),
        }
    }

    pub async fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Attempt {
        if self.stream.is_none() {
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(self.addr)).await
            {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    self.stream = Some(s);
                    self.buf.clear();
                }
                _ => return Attempt::Refused,
            }
        }
        // The address as Host, as a client would write it (the admin listener without a
        // token answers only hosts that name this machine).
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.addr).into_bytes();
        if !body.is_empty() || method == "POST" {
            req.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        let result = self.exchange(&req).await;
        if !matches!(&result, Attempt::Response(r) if !r.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")))
        {
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self, req: &[u8]) -> Attempt {
        let Some(s) = self.stream.as_mut() else {
            return Attempt::Refused;
        };
        if s.write_all(req).await.is_err() {
            return Attempt::NoResponse;
        }
        // The head.
        let (status, headers, head_len) = loop {
            let mut h = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut h);
            match r.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect::<Vec<_>>();
                    break (r.code.unwrap_or(0), headers, n);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Attempt::Broken(format!("bad head: {e}")),
            }
            match self.fill().await {
                Ok(0) | Err(_) if self.buf.is_empty() => return Attempt::NoResponse,
                Ok(0) => return Attempt::Broken("closed inside the head".into()),
                Err(e) => return Attempt::Broken(format!("head: {e}")),
                Ok(_) => {}
            }
        };
        self.buf.drain(..head_len);
        let resp = |body| Resp {
            status,
            headers: headers.clone(),
            body,
        };
        let get = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
            Framing::Length(0)
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            Framing::Chunked
        } else if let Some(n) = get("content-length").and_then(|v| v.trim().parse().ok()) {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        match self.body(framing, &mut |_| {}).await {
            Ok(body) => Attempt::Response(resp(body)),
            Err(e) => Attempt::Broken(e),
        }
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(0);
        };
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(READ_TIMEOUT, s.read(&mut chunk)).await {
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "read timed out",
            )),
        }
    }

    /// Reads a body; `on_data` sees each piece as it arrives (SSE).
    async fn body(
        &mut self,
        framing: Framing,
        on_data: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        match framing {
            Framing::Length(n) => {
                while self.buf.len() < n {
                    match self.fill().await {
                        Ok(0) => {
                            return Err(format!("closed after {} of {n} bytes", self.buf.len()));
                        }
                        Err(e) => return Err(e.to_string()),
                        Ok(_) => {}
                    }
                }
                body.extend(self.buf.drain(..n));
                on_data(&body);
            }
            Framing::UntilClose => loop {
                on_data(&self.buf);
                body.append(&mut self.buf);
                match self.fill().await {
                    Ok(0) => {
                        self.stream = None;
                        break;
                    }
                    Err(e) => return Err(e.to_string()),
                    Ok(_) => {}
                }
            },
            Framing::Chunked => loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    match self.fill().await {
                        Ok(0) => return Err("closed inside a chunk size".into()),
                        Err(e) => return Err(format!("chunk size: {e}")),
                        Ok(_) => {}
                    }
                };
                let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| format!("bad chunk size {size_text:?}"))?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    match self.fill().await {
                        Ok(0) => return Err("closed inside a chunk".into()),
                        Err(e) => return Err(format!("chunk: {e}")),
                        Ok(_) => {}
                    }
                }
                if size == 0 {
                    // No trailers are sent by rampart: the terminator is CRLF.
                    self.buf.drain(..2);
                    break;
                }
                let data: Vec<u8> = self.buf.drain(..size).collect();
                self.buf.drain(..2);
                on_data(&data);
                body.extend_from_slice(&data);
            },
        }
        Ok(body)
    }
}

// === SSE ===

#[derive(Debug, Default)]
pub struct SseOutcome {
    /// Each event as text, without the blank line.
    pub events: Vec<String>,
    /// The stream ended with the chunked terminator (a clean end, not a cut).
    pub clean_end: bool,
    pub error: Option<String>,
    pub status: u16,
}

impl SseOutcome {
    pub fn data_events(&self) -> usize {
        self.events
            .iter()
            .filter(|e| e.contains("data: event"))
            .count()
    }

    pub fn last(&self) -> &str {
        self.events.last().map(String::as_str).unwrap_or("")
    }
}

/// Reads one SSE response to its end.
pub async fn sse(addr: SocketAddr, path: &str) -> SseOutcome {
    sse_with(addr, path, "").await
}

/// The same, with header lines (`name: value\r\n`) added to the request.
pub async fn sse_with(addr: SocketAddr, path: &str, headers: &str) -> SseOutcome {
    let mut c = Http1Conn::new(addr);
    let mut out = SseOutcome::default();
    let Ok(s) = TcpStream::connect(addr).await else {
        out.error = Some("refused".into());
        return out;
    };
    c.stream = Some(s);
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n{headers}\r\n"
    );
    if c.stream
        .as_mut()
        .unwrap()
        .write_all(req.as_bytes())
        .await
        .is_err()
    {
        out.error = Some("write failed".into());
        return out;
    }
    let head_len = loop {
        let mut h = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut h);
        if let Ok(httparse::Status::Complete(n)) = r.parse(&c.buf) {
            out.status = r.code.unwrap_or(0);
            break n;
        }
        match c.fill().await {
            Ok(n) if n > 0 => {}
            _ => {
                out.error = Some("no head".into());
                return out;
            }
        }
    };
    c.buf.drain(..head_len);
    let mut text = String::new();
    let mut events = Vec::new();
    let result = c
        .body(Framing::Chunked, &mut |data| {
            text.push_str(&String::from_utf8_lossy(data));
            while let Some(i) = text.find("\n\n") {
                events.push(text[..i].to_string());
                text.drain(..i + 2);
            }
        })
        .await;
    out.events = events;
    match result {
        Ok(_) => out.clean_end = true,
        Err(e) => out.error = Some(e),
    }
    out
}

// === load ===

#[derive(Debug, Default)]
pub struct LoadStats {
    pub ok: usize,
    pub failures: Vec<String>,
    /// Requests retried because no response byte came on a closed connection.
    pub retries: usize,
    /// Connections refused (the port was released), and when the first one happened.
    pub refused: usize,
    pub first_refused: Option<Instant>,
    /// When each 200 arrived.
    pub ok_times: Vec<Instant>,
}

impl LoadStats {
    pub fn merge(&mut self, other: LoadStats) {
        self.ok += other.ok;
        self.failures.extend(other.failures);
        self.retries += other.retries;
        self.refused += other.refused;
        self.first_refused = match (self.first_refused, other.first_refused) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.ok_times.extend(other.ok_times);
    }
}

pub struct LoadPlan {
    pub addr: SocketAddr,
    /// Requests cycle through these paths.
    pub paths: Vec<String>,
    /// Pause between requests on one connection.
    pub pace: Duration,
    pub max_requests: usize,
    pub max_time: Duration,
    /// A refused connection ends the worker (the port was released for good); otherwise it
    /// is retried after a short pause, a few times (another process takes the port over).
    pub stop_on_refused: bool,
}

/// One keep-alive connection's worth of load, until `stop`, the request count or the time
/// runs out.
pub async fn worker(plan: Arc<LoadPlan>, offset: usize, stop: Arc<AtomicBool>) -> LoadStats {
    let mut stats = LoadStats::default();
    let mut conn = Http1Conn::new(plan.addr);
    let end = Instant::now() + plan.max_time;
    let mut i = offset;
    'requests: while !stop.load(Ordering::Relaxed)
        && stats.ok + stats.failures.len() < plan.max_requests
        && Instant::now() < end
    {
        let path = &plan.paths[i % plan.paths.len()];
        i += 1;
        let mut refused_in_a_row = 0;
        loop {
            match conn.request("GET", path, b"").await {
                Attempt::Response(r) if r.status == 200 => {
                    stats.ok += 1;
                    stats.ok_times.push(Instant::now());
                    break;
                }
                Attempt::Response(r) => {
                    stats.failures.push(format!(
                        "{path}: status {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ));
                    break;
                }
                Attempt::Broken(e) => {
                    stats.failures.push(format!("{path}: broken response: {e}"));
                    break;
                }
                Attempt::NoResponse => {
                    stats.retries += 1;
                    if stats.retries > 10 * plan.max_requests {
                        stats.failures.push("too many retries".into());
                        break 'requests;
                    }
                }
                Attempt::Refused => {
                    stats.refused += 1;
                    stats.first_refused.get_or_insert_with(Instant::now);
                    refused_in_a_row += 1;
                    if plan.stop_on_refused {
                        break 'requests;
                    }
                    if refused_in_a_row > 3 {
                        stats.failures.push(format!("{path}: connection refused"));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        tokio::time::sleep(plan.pace).await;
    }
    stats
}

/// Starts `n` workers; await the handles for their stats.
pub fn start_load(
    plan: LoadPlan,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<LoadStats>> {
    let plan = Arc::new(plan);
    (0..n)
        .map(|k| tokio::spawn(worker(plan.clone(), k, stop.clone())))
        .collect()
}

pub async fn collect(handles: Vec<tokio::task::JoinHandle<LoadStats>>) -> LoadStats {
    let mut total = LoadStats::default();
    for h in handles {
        total.merge(h.await.unwrap());
    }
    total
}
