//! TLS termination: the handshake, in the connection's own task and under the listener's
//! `handshake_timeout`, before the connection is served as any other (the send timeout,
//! the HTTP/1 guard and hyper sit on top of the TLS stream). A plain HTTP request sent to
//! the TLS port gets a 400 that says so, not a handshake failure the client cannot read.
//! Also the 308 of a plain listener's `redirect_to_https`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::timeouts::Socket;
use crate::config::ListenerTls;
use crate::observe::http::HttpMetrics;
use crate::reload::watch::FileWatch;
use crate::shutdown::{Phase, reached};
use crate::stream::body::ProxyBody;
use crate::tls::{CertStore, PairPaths, load_client_roots};

/// The first byte of a TLS record carrying a handshake message (a ClientHello).
const HANDSHAKE_RECORD: u8 = 0x16;

/// What a plain HTTP request to a TLS port gets (nginx answers the same case with a 400).
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain\r\n\
Content-Length: 50\r\n\
Connection: close\r\n\
\r\n\
The plain HTTP request was sent to an HTTPS port.\n";

/// How much of a plain request is read before answering it: reading it (rather than
/// closing with it unread, which resets the connection) lets the client see the answer.
const PLAIN_HTTP_READ: usize = 16 * 1024;

impl Socket for TlsStream<TcpStream> {
    fn zero_linger(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

/// A TLS listener's certificates and rustls configuration, made before it binds (a start
/// or a reload with a pair that cannot be served fails before anything changes).
#[derive(Debug)]
pub(crate) struct TlsSetup {
    store: Arc<CertStore>,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    /// Made before the files were read, so a change in between is still seen.
    watch: Option<FileWatch>,
}

/// Reads the listener's certificates and builds its rustls configuration: TLS 1.2 and 1.3,
/// ALPN h2 and http/1.1, session resumption (cache and tickets), client certificates
/// required when `client_ca` is set.
pub(crate) fn prepare(tls: &ListenerTls) -> Result<TlsSetup, String> {
    let watch = tls.watch.map(|every| {
        let paths = tls.pairs().into_iter().flat_map(|p| [p.cert, p.key]);
        FileWatch::new(paths).with_interval(every)
    });
    let pairs = tls
        .pairs()
        .into_iter()
        .map(|p| PairPaths {
            cert: p.cert,
            key: p.key,
        })
        .collect();
    let store = Arc::new(CertStore::load(pairs)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca {
        Some(path) => {
            let roots = load_client_roots(path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(store.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(TlsSetup {
        store,
        config: Arc::new(config),
        handshake_timeout: tls.handshake_timeout,
        watch,
    })
}

impl TlsSetup {
    pub(crate) fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// The watch on the files, for the task that reloads them (once).
    pub(crate) fn take_watch(&mut self) -> Option<FileWatch> {
        self.watch.take()
    }
}

/// The handshake counters of one listener, by result.
#[derive(Debug)]
struct Handshakes {
    ok: Counter,
    timeout: Counter,
    error: Counter,
    plain_http: Counter,
}

/// What the accept side of a TLS listener keeps.
pub(crate) struct Terminator {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    counts: Handshakes,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl Terminator {
    pub(crate) fn new(setup: &TlsSetup, listener: &str, metrics: &HttpMetrics) -> Self {
        Terminator {
            acceptor: TlsAcceptor::from(setup.config.clone()),
            handshake_timeout: setup.handshake_timeout,
            counts: Handshakes {
                ok: metrics.tls.handshakes(listener, "ok"),
                timeout: metrics.tls.handshakes(listener, "timeout"),
                error: metrics.tls.handshakes(listener, "error"),
                plain_http: metrics.tls.handshakes(listener, "plain_http"),
            },
        }
    }

    /// The handshake, within `handshake_timeout` of accept (the drain's cut ends it too).
    /// None when it failed: the reason is logged at debug (scanners and broken clients do
    /// this all day), a plain HTTP request answered.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        phase: &mut watch::Receiver<Phase>,
    ) -> Option<TlsStream<TcpStream>> {
        let deadline = Instant::now() + self.handshake_timeout;
        tokio::select! {
            r = self.handshake(stream, peer, deadline) => r,
            _ = reached(phase, Phase::Cut) => None,
        }
    }

    async fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Option<TlsStream<TcpStream>> {
        let mut first = [0u8; 1];
        let failed = |reason: &str| {
            self.counts.error.inc();
            tracing::debug!(%peer, reason, "TLS handshake failed");
        };
        let timed_out = || {
            self.counts.timeout.inc();
            tracing::debug!(%peer, "TLS handshake not done within handshake_timeout: closed");
        };
        match timeout_at(deadline, stream.peek(&mut first)).await {
            Err(_) => {
                timed_out();
                return None;
            }
            Ok(Ok(0)) => {
                failed("closed before the handshake");
                return None;
            }
            Ok(Err(e)) => {
                failed(&e.to_string());
                return None;
            }
            Ok(Ok(_)) if first[0] != HANDSHAKE_RECORD => {
                self.counts.plain_http.inc();
                tracing::debug!(%peer, "plain HTTP sent to a TLS listener: answered 400");
                answer_plain_http(stream, deadline).await;
                return None;
            }
            Ok(Ok(_)) => {}
        }
        match timeout_at(deadline, self.acceptor.accept(stream)).await {
            Err(_) => {
                timed_out();
                None
            }
            Ok(Err(e)) => {
                failed(&e.to_string());
                None
            }
            Ok(Ok(tls)) => {
                self.counts.ok.inc();
                Some(tls)
            }
        }
    }
}

/// Reads the request head (bounded in bytes and time), answers the 400 and closes.
async fn answer_plain_http(mut stream: TcpStream, deadline: Instant) {
    let short = Instant::now() + Duration::from_secs(1);
    let until = deadline.min(short);
    let mut buf = vec![0u8; PLAIN_HTTP_READ];
    let mut read = 0;
    while read < buf.len() {
        match timeout_at(until, stream.read(&mut buf[read..])).await {
            Ok(Ok(n)) if n > 0 => {
                read += n;
                if buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = timeout_at(until, async {
        stream.write_all(PLAIN_HTTP_ANSWER).await?;
        stream.shutdown().await
    })
    .await;
}

/// `redirect_to_https`: a 308 to the same host (without its port) and path over https;
/// 400 without a usable host.
pub(crate) fn https_redirect<B>(req: &Request<B>) -> Response<ProxyBody> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(strip_port)
        // A name or an address literal, nothing that would make the Location another URL.
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
        });
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = host.and_then(|h| HeaderValue::from_str(&format!("https://{h}{target}")).ok());
    let (status, location, text) = match location {
        Some(l) => (StatusCode::PERMANENT_REDIRECT, Some(l), "Moved to https.\n"),
        None => (
            StatusCode::BAD_REQUEST,
            None,
            "A Host header is required.\n",
        ),
    };
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    if let Some(l) = location {
        h.insert(http::header::LOCATION, l);
    }
    resp
}

/// `host:port` -> `host`; `[v6]:port` -> `[v6]`. Anything after `@` is never a host here
/// (Host has no userinfo); a value with one is left to fail the header check.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_says_its_length() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
    }

    #[test]
    fn redirects_drop_the_port_and_keep_path_and_query() {
        let req = Request::get("/a/b?x=1&y=2")
            .header("host", "Example.com:8080")
            .body(())
            .unwrap();
        let resp = https_redirect(&req);
        assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            resp.headers()["location"],
            "https://Example.com/a/b?x=1&y=2"
        );
        let req = Request::get("/")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(https_redirect(&req).headers()["location"], "https://[::1]/");
        let req = Request::get("/").body(()).unwrap();
        assert_eq!(https_redirect(&req).status(), StatusCode::BAD_REQUEST);
        for host in ["evil.test/x", "a@b", "a b", ""] {
            let req = Request::get("/").header("host", host).body(()).unwrap();
            assert_eq!(
                https_redirect(&req).status(),
                StatusCode::BAD_REQUEST,
                "{host}"
            );
        }
    }
}
