//! Stand-in upstreams for `rampart demo`: a JSON backend (the Node app's place) and an SSE
//! "LLM" that streams a token at a time (FastGPT's place), so the proxy can be tried, and
//! benchmarked, on a fresh machine with nothing else running.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type DemoBody = BoxBody<Bytes, Infallible>;

/// Connections the JSON backend accepted: `GET /_demo/connections` answers it, so the
/// benchmark can tell how many upstream connections a proxy opened during a run.
static BACKEND_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// `GET /bytes/N`: N bytes of body (at most 16 MiB), for the large-response benchmark.
const MAX_BYTES: usize = 16 << 20;

/// Serves `handler` on `listener` until the task is dropped.
async fn serve(listener: TcpListener, sse: bool) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        if !sse {
            BACKEND_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        }
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| async move {
                    Ok::<_, Infallible>(if sse { llm(req) } else { backend(req).await })
                }),
            )
            .into_owned();
        tokio::spawn(conn);
    }
}

async fn backend(req: Request<Incoming>) -> Response<DemoBody> {
    let path = req.uri().path().to_string();
    let fixed = if path == "/_demo/connections" {
        Some(Bytes::from(format!(
            "{}\n",
            BACKEND_CONNECTIONS.load(Ordering::Relaxed)
        )))
    } else {
        path.strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n <= MAX_BYTES)
            .map(|n| Bytes::from(vec![b'x'; n]))
    };
    if let Some(body) = fixed {
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Full::new(body).boxed())
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()));
    }
    let method = req.method().clone();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body_len = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let json = format!(
        "{{\"service\":\"backend\",\"method\":\"{method}\",\"path\":{path:?},\"request_id\":{request_id:?},\"body_bytes\":{body_len}}}\n"
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(json)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn llm(_req: Request<Incoming>) -> Response<DemoBody> {
    let words = [
        "rampart", "keeps", "this", "stream", "flowing", "token", "by", "token.",
    ];
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        for (i, w) in words.iter().enumerate() {
            let event = format!("id: {i}\ndata: {{\"token\":\"{w} \"}}\n\n");
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
            .await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(ChannelBody(rx).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// A body fed by a channel: each message goes out as its own frame, when it is sent.
#[derive(Debug)]
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx)
    }
}

/// Starts both stand-ins and returns their addresses. A bind error names the address.
pub async fn start_upstreams(
    backend_addr: SocketAddr,
    llm_addr: SocketAddr,
) -> std::io::Result<(SocketAddr, SocketAddr)> {
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
        })
    };
    let b = bind(backend_addr, "stand-in backend").await?;
    let l = bind(llm_addr, "stand-in LLM").await?;
    let addrs = (b.local_addr()?, l.local_addr()?);
    tokio::spawn(serve(b, false));
    tokio::spawn(serve(l, true));
    Ok(addrs)
}

/// The demo's ports from `--port-base N`, in proxy.yaml's order: inbound N, egress
/// (fastgpt) N+1, admin N+2, stand-in LLM N+3, stand-in backend N+4. The default
/// (8080, 8081, 9901, 3000, 3001) is not a base: it is proxy.yaml as shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoPorts {
    pub inbound: u16,
    pub egress: u16,
    pub admin: u16,
    pub llm: u16,
    pub backend: u16,
}

impl DemoPorts {
    pub const SHIPPED: DemoPorts = DemoPorts {
        inbound: 8080,
        egress: 8081,
        admin: 9901,
        llm: 3000,
        backend: 3001,
    };

    /// None when N+4 passes 65535.
    pub fn from_base(base: u16) -> Option<DemoPorts> {
        Some(DemoPorts {
            inbound: base,
            egress: base.checked_add(1)?,
            admin: base.checked_add(2)?,
            llm: base.checked_add(3)?,
            backend: base.checked_add(4)?,
        })
    }

    /// Moves the listeners named `inbound` and `fastgpt`, the admin listener and the
    /// upstreams named `backend` and `fastgpt` (onto the stand-ins) to these ports; their
    /// IP addresses stay as configured.
    pub fn apply(&self, cfg: &mut crate::config::Config) -> Result<(), http::uri::InvalidUri> {
        for l in &mut cfg.listeners {
            match l.name.as_str() {
                "inbound" => l.listen.set_port(self.inbound),
                "fastgpt" => l.listen.set_port(self.egress),
                _ => {}
            }
        }
        cfg.admin.listen.set_port(self.admin);
        for (name, port) in [("backend", self.backend), ("fastgpt", self.llm)] {
            if let Some(u) = cfg.upstreams.get_mut(name) {
                u.endpoints = vec![format!("http://127.0.0.1:{port}").parse()?];
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One `GET path` on a connection of its own: (status line, body).
    async fn get(addr: SocketAddr, path: &str) -> (String, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&answer[..end]).to_string();
        let status = head.lines().next().unwrap().to_string();
        (status, answer[end + 4..].to_vec())
    }

    /// What the scale benchmark relies on: a body of the size asked for, and a count of
    /// the connections accepted that each new connection moves by one.
    #[tokio::test]
    async fn backend_serves_sized_bodies_and_counts_connections() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (backend, _) = start_upstreams(any, any).await.unwrap();
        let (status, body) = get(backend, "/bytes/65536").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body.len(), 65536);
        let count =
            |body: Vec<u8>| -> u64 { String::from_utf8(body).unwrap().trim().parse().unwrap() };
        let first = count(get(backend, "/_demo/connections").await.1);
        let second = count(get(backend, "/_demo/connections").await.1);
        assert!(first >= 2, "two connections so far, counted {first}");
        assert_eq!(second, first + 1);
    }
}
