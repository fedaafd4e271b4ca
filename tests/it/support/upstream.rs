//! Scripted in-process upstreams on 127.0.0.1:0, with counters.
//!
//! `Upstream::start()` serves HTTP/1.1 (and h2c) with behaviours chosen by path:
//! - `/ok` (and anything unknown): 200 "ok"
//! - `/status/N`: status N
//! - `/backoff`: 503 with `Retry-After: 7`
//! - `/delay/MS`: 200 after MS milliseconds
//! - `/hang`: never answers (cancellation is counted when hyper drops the handler)
//! - `/echo`: 200, JSON of the request head as seen upstream, plus the body length
//! - `/sse?n=N&gap=MS`: N SSE events MS apart, send times recorded in `sse_sent`
//! - `/stall?after=N&wait=MS`: after MS ms (default 0), N bytes of a 1000-byte
//!   Content-Length body, then silence
//! - `/ws`: answers an Upgrade with 101 and echoes the upgraded bytes
//!
//! `RawUpstream` is a bare TCP peer for what hyper will not do on purpose: reset the
//! connection, or close it in the middle of a body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rampart::demo::ChannelBody;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub type TestBody = BoxBody<Bytes, Infallible>;

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicUsize,
    pub connections: AtomicUsize,
    /// Connections that ended (either side closed them).
    pub closed: AtomicUsize,
    /// Handlers dropped before they finished (the proxy gave up on the request).
    pub cancelled: AtomicUsize,
    /// SSE streams whose receiver went away before the last event.
    pub sse_aborted: AtomicUsize,
    pub last_head: Mutex<Option<http::request::Parts>>,
    pub last_body: Mutex<Option<Bytes>>,
    pub sse_sent: Mutex<Vec<Instant>>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct CancelGuard(Arc<Counters>, bool);
impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Serves on `listener` (a port that refused connections until now, say).
    pub fn start_on(listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.connections.fetch_add(1, Ordering::SeqCst);
                let c2 = c.clone();
                let conn = builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        service_fn(move |req| {
                            let c = c2.clone();
                            async move { Ok::<_, Infallible>(handle(c, req).await) }
                        }),
                    )
                    .into_owned();
                let c3 = c.clone();
                tokio::spawn(async move {
                    let _ = conn.await;
                    c3.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Upstream {
            addr,
            counters,
            task,
        }
    }

    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn handle(c: Arc<Counters>, mut req: Request<Incoming>) -> Response<TestBody> {
    c.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let mut guard = CancelGuard(c.clone(), false);
    let resp = if let Some(code) = path.strip_prefix("/status/") {
        let code = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        full(code, format!("status {code}"))
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        full(StatusCode::OK, "delayed")
    } else if path == "/backoff" {
        let mut r = full(StatusCode::SERVICE_UNAVAILABLE, "busy, come back later");
        r.headers_mut().insert("retry-after", "7".parse().unwrap());
        r
    } else if path == "/ratelimited" {
        // An upstream with a limiter of its own: its fields, which rampart's replace.
        let mut r = full(StatusCode::OK, "limited upstream");
        for (k, v) in [
            ("ratelimit-policy", "\"up\";q=9;w=9"),
            ("ratelimit", "\"up\";r=8;t=9"),
            ("x-ratelimit-limit", "9"),
            ("x-ratelimit-remaining", "8"),
            ("x-ratelimit-reset", "9"),
        ] {
            r.headers_mut().append(k, v.parse().unwrap());
        }
        r
    } else if path == "/hang" {
        std::future::pending::<()>().await;
        unreachable!()
    } else if path == "/echo" {
        let on_upgrade_free = req.headers().clone();
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut headers = String::from("{");
        for (i, (k, v)) in on_upgrade_free.iter().enumerate() {
            if i > 0 {
                headers.push(',');
            }
            headers.push_str(&format!("{:?}:{:?}", k.as_str(), v.to_str().unwrap_or("?")));
        }
        headers.push('}');
        let json = format!(
            "{{\"method\":{:?},\"uri\":{:?},\"version\":{:?},\"headers\":{},\"body_len\":{}}}",
            parts.method.as_str(),
            parts.uri.to_string(),
            format!("{:?}", parts.version),
            headers,
            body.len()
        );
        *c.last_head.lock().unwrap() = Some(parts);
        *c.last_body.lock().unwrap() = Some(body);
        let mut r = full(StatusCode::OK, json);
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        // Hop-by-hop headers the proxy must strip on the way back.
        r.headers_mut()
            .insert("connection", "x-upstream-secret".parse().unwrap());
        r.headers_mut()
            .insert("x-upstream-secret", "leak".parse().unwrap());
        r.headers_mut()
            .insert("keep-alive", "timeout=5".parse().unwrap());
        r
    } else if path == "/sse" {
        let n = query(&req, "n").unwrap_or(3);
        let gap = Duration::from_millis(query(&req, "gap").unwrap_or(200));
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let c2 = c.clone();
        tokio::spawn(async move {
            for i in 0..n {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                let ev = format!("id: {i}\ndata: event {i}\n\n");
                c2.sse_sent.lock().unwrap().push(Instant::now());
                if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                    c2.sse_aborted.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        });
        let mut r = Response::new(ChannelBody(rx).boxed());
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        r
    } else if path == "/stall" {
        let after = query(&req, "after").unwrap_or(10) as usize;
        let wait = Duration::from_millis(query(&req, "wait").unwrap_or(0));
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = tx
                .send(Ok(Frame::data(Bytes::from(vec![b'x'; after]))))
                .await;
            // Keep the sender alive (silence, not end) for a long while.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tx);
        });
        let mut r = Response::new(ChannelBody(rx).boxed());
        r.headers_mut()
            .insert("content-length", "1000".parse().unwrap());
        r
    } else if path == "/ws" {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r
    } else {
        full(StatusCode::OK, "ok")
    };
    guard.1 = true;
    resp
}

/// A bare TCP upstream: reads one request head, then does `action`.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

#[derive(Clone, Copy)]
pub enum RawAction {
    /// RST right after the request head arrives.
    Reset,
    /// Promise 1000 bytes, send 10, then close.
    CloseMidBody,
    /// A complete keep-alive answer, then close the socket: the proxy's pooled connection
    /// goes stale behind its back.
    AnswerThenClose,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    pub async fn start(action: RawAction) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    match action {
                        RawAction::Reset => {
                            let _ = s.set_zero_linger();
                            drop(s);
                        }
                        RawAction::AnswerThenClose => {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                            let _ = s.flush().await;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            drop(s);
                        }
                        RawAction::CloseMidBody => {
                            let _ = s
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789",
                                )
                                .await;
                            let _ = s.flush().await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            drop(s);
                        }
                    }
                });
            }
        });
        RawUpstream {
            addr,
            accepted,
            task,
        }
    }
}

/// The same scripted upstream behind TLS, with a fresh self-signed certificate for
/// `localhost`; `ca_pem` is what a client must trust.
pub struct TlsUpstream {
    pub port: u16,
    pub ca_pem: String,
    pub counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    pub async fn start() -> TlsUpstream {
        use tokio_rustls::rustls;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let ca_pem = cert.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    c.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            TokioIo::new(tls),
                            service_fn(move |req| {
                                let c = c.clone();
                                async move { Ok::<_, Infallible>(handle(c, req).await) }
                            }),
                        )
                        .await;
                });
            }
        });
        TlsUpstream {
            port,
            ca_pem,
            counters,
            task,
        }
    }
}

/// A private CA made for one test, issuing server and client certificates (PEM).
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "rampart test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `names`, valid now (or one that expired in 2021).
    pub fn issue(&self, names: &[&str], expired: bool) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// How a `TlsServer` is set up.
pub struct TlsServerOptions {
    pub cert: Issued,
    /// Require a client certificate issued by this CA (PEM).
    pub client_ca: Option<String>,
    /// ALPN protocols offered, in order of preference (empty: no ALPN).
    pub alpn: Vec<Vec<u8>>,
    /// HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS (None: hyper's default, 200).
    pub h2_max_streams: Option<u32>,
}

/// An HTTPS upstream with the routes of `Upstream` (HTTP/1.1, and HTTP/2 when ALPN picked
/// it), a chosen certificate, optional client-certificate checking, and connections that
/// can be ended on demand (`close_connections`).
pub struct TlsServer {
    pub port: u16,
    pub counters: Arc<Counters>,
    /// (times closed, gracefully): a connection ends when the count passes the one it
    /// started under.
    close: tokio::sync::watch::Sender<(u32, bool)>,
    task: JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.close.send_modify(|v| *v = (v.0 + 1, false));
        self.task.abort();
    }
}

impl TlsServer {
    pub async fn start(opts: TlsServerOptions) -> TlsServer {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<_> =
            rustls::pki_types::CertificateDer::pem_slice_iter(opts.cert.cert_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(opts.cert.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match &opts.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = opts.alpn;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let max_streams = opts.h2_max_streams;
        let (close, closing) = tokio::sync::watch::channel((0u32, false));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let c = c.clone();
                let mut closing = closing.clone();
                let born = closing.borrow().0;
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    c.connections.fetch_add(1, Ordering::SeqCst);
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    if let Some(n) = max_streams {
                        builder.http2().max_concurrent_streams(n);
                    }
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(tls),
                        service_fn(move |req| {
                            let c = c.clone();
                            async move { Ok::<_, Infallible>(handle(c, req).await) }
                        }),
                    );
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = closing.wait_for(|v| v.0 != born) => {}
                    }
                    if closing.borrow().1 {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                    }
                });
            }
        });
        TlsServer {
            port,
            counters,
            close,
            task,
        }
    }

    /// Ends every open connection: with a GOAWAY and the streams in flight finished
    /// (`graceful`), or dropped where they stand. New connections are still accepted.
    pub fn close_connections(&self, graceful: bool) {
        self.close.send_modify(|v| *v = (v.0 + 1, graceful));
    }
}
