//! A byte-recording raw upstream: parses what it receives as a strict HTTP/1.1 server would
//! (httparse heads, one valid Content-Length or chunked, nothing ambiguous), records every
//! request it parsed and every byte of every connection, and answers each request 200 with
//! a small body, keeping the connection open. What it refuses to parse it records as a
//! framing error and closes: a request rampart let through that a backend reads another
//! way shows up here.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One request as the upstream parsed it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub conn: usize,
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// Every value of header `name`, as text.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.all(name).into_iter().next()
    }
}

#[derive(Default)]
pub struct Log {
    pub requests: Vec<Recorded>,
    /// Every byte received, per connection.
    pub raw: Vec<Vec<u8>>,
    /// What the upstream could not parse, with the connection it came on.
    pub errors: Vec<(usize, String)>,
}

pub struct Recorder {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Log>>,
    task: JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let l = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let conn = {
                    let mut log = l.lock().unwrap();
                    log.raw.push(Vec::new());
                    log.raw.len() - 1
                };
                tokio::spawn(serve(s, conn, l.clone()));
            }
        });
        Recorder { addr, log, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().requests.len()
    }

    pub fn errors(&self) -> Vec<(usize, String)> {
        self.log.lock().unwrap().errors.clone()
    }
}

enum Parsed {
    /// A whole request and the bytes it took.
    Request(Recorded, usize),
    Partial,
    Error(String),
}

async fn serve(mut s: TcpStream, conn: usize, log: Arc<Mutex<Log>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // Answer every whole request in the buffer.
        loop {
            match parse(&buf, conn) {
                Parsed::Request(req, used) => {
                    buf.drain(..used);
                    let close = req
                        .all("connection")
                        .iter()
                        .any(|v| v.eq_ignore_ascii_case("close"));
                    let body = format!("recorded {}", req.target);
                    log.lock().unwrap().requests.push(req);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() || close {
                        return;
                    }
                }
                Parsed::Partial => break,
                Parsed::Error(e) => {
                    log.lock().unwrap().errors.push((conn, e));
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
            }
        }
        let n = match tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        log.lock().unwrap().raw[conn].extend_from_slice(&chunk[..n]);
    }
}

fn parse(buf: &[u8], conn: usize) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(e) => return Parsed::Error(format!("head: {e}")),
    };
    if req.version != Some(1) {
        return Parsed::Error("not HTTP/1.1".into());
    }
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let get = |n: &str| -> Vec<&[u8]> {
        headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_slice())
            .collect()
    };
    let cl = get("content-length");
    let te = get("transfer-encoding");
    let mut rec = Recorded {
        conn,
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        headers: headers.clone(),
        body: Vec::new(),
    };
    let rest = &buf[head_len..];
    match (cl.as_slice(), te.as_slice()) {
        ([], []) => Parsed::Request(rec, head_len),
        ([v], []) => {
            let Some(n) = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<usize>().ok())
            else {
                return Parsed::Error(format!("content-length {:?}", String::from_utf8_lossy(v)));
            };
            if rest.len() < n {
                return Parsed::Partial;
            }
            rec.body = rest[..n].to_vec();
            Parsed::Request(rec, head_len + n)
        }
        ([], [v]) if v.eq_ignore_ascii_case(b"chunked") => match dechunk(rest) {
            Ok(Some((body, used))) => {
                rec.body = body;
                Parsed::Request(rec, head_len + used)
            }
            Ok(None) => Parsed::Partial,
            Err(e) => Parsed::Error(e),
        },
        _ => Parsed::Error("ambiguous framing".into()),
    }
}

/// A strict chunked body: hex size, optional `;ext`, CRLF, data, CRLF; trailers allowed.
/// The body and the bytes taken, or None while incomplete.
fn dechunk(b: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let Some(eol) = find_crlf(&b[i..]) else {
            return if b.len() - i > 1024 {
                Err("chunk-size line too long".into())
            } else {
                Ok(None)
            };
        };
        let line = &b[i..i + eol];
        let size_text = line.split(|&c| c == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size_text)
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= 16 && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or_else(|| format!("chunk size {:?}", String::from_utf8_lossy(line)))?;
        i += eol + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = find_crlf(&b[i..]) else {
                    return Ok(None);
                };
                i += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, i)));
                }
            }
        }
        if b.len() < i + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&b[i..i + size]);
        if &b[i + size..i + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        i += size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}
