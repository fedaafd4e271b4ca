//! The upstream side: pooled HTTP/1.1 clients, endpoint choice and the send under the
//! connect and first-byte timers, with every failure classified into a `ProxyError`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::time::Instant;

use crate::config::UpstreamConfig;
use crate::error::{ProxyError, TimeoutPhase};
use crate::proxy::body::{BodyError, RequestBody};

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

pub struct Endpoint {
    pub scheme: Scheme,
    pub authority: Authority,
}

pub struct Upstream {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    next: AtomicUsize,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Self {
        let endpoints = cfg
            .endpoints
            .iter()
            .filter_map(|u| {
                Some(Endpoint {
                    scheme: u.scheme()?.clone(),
                    authority: u.authority()?.clone(),
                })
            })
            .collect();
        Upstream {
            name: cfg.name.clone(),
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    /// Round-robin over the endpoints.
    pub fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    pub fn uri_for(&self, ep: &Endpoint, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(ep.scheme.clone())
            .authority(ep.authority.clone())
            .path_and_query(pq.map(|p| p.as_str()).unwrap_or("/"))
            .build()
    }
}

/// One pool per upstream and connect timeout. HTTP/1.1 only: that is what Node and most
/// LLM gateways speak best, and it keeps one stream per connection (no head-of-line
/// coupling between a long SSE answer and short calls).
pub fn build_client(
    cfg: &UpstreamConfig,
    connect_timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(30)));
    // https endpoints go through rustls; the http connector must then accept any scheme.
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(cfg.pool.idle_timeout)
        .pool_max_idle_per_host(cfg.pool.max_idle_per_endpoint)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// TLS settings for https endpoints: the system's trust store plus, when given, the CAs in
/// `ca_file` (a private CA, or a test's). Built once per configuration snapshot.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A malformed system certificate is skipped, as every TLS client does.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: bad certificate: {e}", path.display()))?;
            found += 1;
        }
        if found == 0 {
            return Err(format!("{}: no certificates found", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends the request and waits for the response head, at most `first_byte` (or until the
/// route's total deadline if that comes first).
pub async fn send(
    client: &UpstreamClient,
    upstream: &str,
    req: Request<RequestBody>,
    first_byte: Duration,
    deadline: Option<Instant>,
) -> Result<Response<Incoming>, ProxyError> {
    let fb_deadline = Instant::now() + first_byte;
    let (until, phase) = match deadline {
        Some(d) if d < fb_deadline => (d, TimeoutPhase::Total),
        _ => (fb_deadline, TimeoutPhase::FirstByte),
    };
    match tokio::time::timeout_at(until, client.request(req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(classify(&e, upstream)),
        Err(_) => Err(ProxyError::UpstreamTimeout {
            upstream: upstream.to_string(),
            phase,
        }),
    }
}

/// Maps a client error to what the downstream should hear. Our own request-body errors come
/// back wrapped inside the client's error, so look through the source chain first.
fn classify(err: &hyper_util::client::legacy::Error, upstream: &str) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut timed_out = false;
    while let Some(e) = source {
        if let Some(b) = e.downcast_ref::<BodyError>() {
            return match b {
                BodyError::Idle => ProxyError::RequestTimeout,
                BodyError::TooLarge(limit) => ProxyError::PayloadTooLarge { limit: *limit },
                BodyError::Total => ProxyError::UpstreamTimeout {
                    upstream: upstream.to_string(),
                    phase: TimeoutPhase::Total,
                },
                BodyError::Inner(_) => ProxyError::BadRequest("the request body was cut short"),
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            timed_out = true;
        }
        source = e.source();
    }
    if err.is_connect() && timed_out {
        return ProxyError::UpstreamTimeout {
            upstream: upstream.to_string(),
            phase: TimeoutPhase::Connect,
        };
    }
    let detail = if err.is_connect() {
        format!("connect failed: {}", root_cause(err))
    } else {
        format!("connection failed: {}", root_cause(err))
    };
    ProxyError::UpstreamUnavailable {
        upstream: upstream.to_string(),
        detail,
    }
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut e = err;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}
