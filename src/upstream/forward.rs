//! The upstream side: endpoints with their connection pools, endpoint choice, and the send
//! under the connect and first-byte timers, with every failure classified into a
//! `ProxyError`.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use http::uri::Scheme;
use http::{HeaderValue, Request, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::body::{BodyError, RequestBody, Upload, UploadState};
use crate::config::{IdentityError, load_client_identity};
use crate::config::{Resilience, UpstreamConfig, UpstreamTls};
use crate::error::{ProxyError, TimeoutPhase};
use crate::observe::http::UpstreamErrors;
use crate::upstream::balance::{self, Candidate};
use crate::upstream::client::ExchangeError;
use crate::upstream::forwarded::Forwarded;
use crate::upstream::groups::GroupRuntime;
use crate::upstream::pool::{self, ConnectError, EndpointPool, PooledBody, UpgradeError};
use crate::upstream::resilience::{EndpointState, UpstreamState, UpstreamStates};
use crate::upstream::retry::Failure;

#[derive(Debug)]
pub struct Endpoint {
    pub pool: Arc<EndpointPool>,
    /// In flight and health: outlives the snapshot (keyed by URL).
    pub state: Arc<EndpointState>,
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    /// `groups:`, None for plain `endpoints` (which then pays nothing for groups).
    pub(crate) groups: Option<Arc<GroupRuntime>>,
    pub resilience: Resilience,
    /// Breaker, budget, in flight: outlives the snapshot (keyed by name).
    pub state: Arc<UpstreamState>,
    pub errors: UpstreamErrors,
    /// Every endpoint's client gives back what it sent (`EndpointPool::gives_back_sent`):
    /// a retry after the send needs no copy of the request made in advance.
    pub(crate) gives_back_sent: bool,
}

impl Upstream {
    /// `tls` is used for https endpoints.
    pub fn new(
        cfg: &UpstreamConfig,
        tls: &Arc<rustls::ClientConfig>,
        states: &UpstreamStates,
        errors: UpstreamErrors,
    ) -> Result<Self, String> {
        let state = states.get_or_create(cfg);
        let mut endpoints = Vec::with_capacity(cfg.endpoints.len());
        for uri in &cfg.endpoints {
            let https = uri.scheme() == Some(&Scheme::HTTPS);
            let Some(authority) = uri.authority() else {
                return Err(format!("endpoint {uri} has no host"));
            };
            let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
            // Brackets belong to the URL syntax, not to the address to connect to.
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let default_port = port == if https { 443 } else { 80 };
            let host_header = if default_port {
                authority.host().to_string()
            } else {
                format!("{}:{port}", authority.host())
            };
            let host_header = HeaderValue::from_str(&host_header)
                .map_err(|_| format!("endpoint {uri}: host is not a valid header value"))?;
            let (tls, h1_only) = if https {
                // `tls.server_name` pins the name sent and verified (an endpoint reached by
                // address, a certificate issued for the service's name).
                let name = cfg.tls.server_name.clone().unwrap_or_else(|| host.clone());
                let name = ServerName::try_from(name)
                    .map_err(|_| format!("endpoint {uri}: not a valid TLS server name"))?;
                let h1_only = cfg.tls.http2.then(|| {
                    let mut h1 = (**tls).clone();
                    h1.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
                    TlsConnector::from(Arc::new(h1))
                });
                (Some((TlsConnector::from(tls.clone()), name)), h1_only)
            } else {
                (None, None)
            };
            let mut pool = EndpointPool::new(
                host,
                port,
                host_header,
                tls,
                cfg.client,
                cfg.pool.idle_timeout,
                cfg.pool.max_idle_per_endpoint,
            );
            if let Some(h1_only) = h1_only {
                pool = pool.offering_h2(h1_only);
            }
            pool = pool.counting_opened(errors.opened());
            endpoints.push(Endpoint {
                state: state.endpoint(&uri.to_string()),
                pool: Arc::new(pool),
            });
        }
        let groups = state.groups.runtime(cfg, &states.metrics.groups);
        let gives_back_sent = endpoints.iter().all(|e| e.pool.gives_back_sent());
        Ok(Upstream {
            name: cfg.name.clone(),
            endpoints,
            next: AtomicUsize::new(0),
            groups,
            resilience: cfg.resilience.clone(),
            state,
            errors,
            gives_back_sent,
        })
    }

    /// The endpoint for the next attempt: healthy and not yet tried by this request first
    /// (see `balance::pick`). `tried` is a bit set of endpoint indexes. Returns an index.
    pub fn pick(&self, tried: u64) -> Option<usize> {
        let rr = self.next.fetch_add(1, Ordering::Relaxed);
        if self.endpoints.len() == 1 {
            return Some(0);
        }
        self.pick_among(0..self.endpoints.len(), tried, rr)
    }

    /// `pick` inside `group` (of `groups`): a retry stays in the group. When none of its
    /// endpoints is available, another group with weight above 0 takes the request
    /// (counted); when no group has one, the group's own endpoints are used anyway.
    pub(crate) fn pick_in_group(&self, group: usize, tried: u64) -> Option<usize> {
        let Some(groups) = self.groups.as_deref() else {
            return self.pick(tried);
        };
        let rr = self.next.fetch_add(1, Ordering::Relaxed);
        let now = crate::clock::now();
        let any_available = |r: std::ops::Range<usize>| {
            self.endpoints
                .get(r)
                .unwrap_or_default()
                .iter()
                .any(|e| available(e, now))
        };
        let mut range = groups.range(group);
        if !any_available(range.clone())
            && let Some(other) = groups.fallback(group, any_available)
        {
            range = groups.range(other);
        }
        if range.len() == 1 {
            return Some(range.start);
        }
        self.pick_among(range, tried, rr)
    }

    fn pick_among(&self, range: std::ops::Range<usize>, tried: u64, rr: usize) -> Option<usize> {
        let now = crate::clock::now();
        let start = range.start;
        let candidates: Vec<Candidate> = self
            .endpoints
            .get(range)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, e)| Candidate {
                in_flight: e.state.in_flight.load(Ordering::Relaxed),
                available: available(e, now),
                tried: start + i < 64 && tried & (1 << (start + i)) != 0,
            })
            .collect();
        balance::pick(self.resilience.load_balancing, &candidates, rr).map(|i| start + i)
    }
}

/// Not ejected, and not failing its active checks (which counts as ejected).
fn available(e: &Endpoint, now: Instant) -> bool {
    e.state.active_ok.load(Ordering::Relaxed) && crate::sync::lock(&e.state.health).available(now)
}

/// A failed attempt: what the client would hear, and what kind of failure it was (for
/// retries, ejection and the breaker; None when the fault is the client's own request body).
pub(crate) struct SendError {
    pub error: ProxyError,
    pub failure: Option<Failure>,
    /// The request was put back because the first-byte or total deadline passed while
    /// connecting; a retry sends it only when the request body was kept for retries (as a
    /// copy would be).
    pub by_deadline: bool,
}

/// TLS settings for https endpoints: the system's trust store plus, when given, the CAs in
/// `ca_file` (a private CA, or a test's). Built once per configuration snapshot.
pub(crate) fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = trust_store(ca_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The system's trust store plus the CAs in `ca_file`.
fn trust_store(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, String> {
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
    Ok(roots)
}

/// ALPN ids.
pub(crate) const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// An upstream's TLS settings (`upstreams.<name>.tls`) as a rustls client config: the
/// system's trust store plus `ca_file` (or no verification at all), the client identity,
/// and the ALPN offer (`h2` first only when `http2` is on). Built once per distinct
/// settings per configuration snapshot.
pub(crate) fn upstream_tls(tls: &UpstreamTls) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    } else {
        builder.with_root_certificates(trust_store(tls.ca_file.as_deref())?)
    };
    let mut config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let identity = load_client_identity(cert, key).map_err(|e| match e {
                IdentityError::Cert(e) | IdentityError::Key(e) => e,
            })?;
            builder
                .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(identity)))
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = if tls.http2 {
        vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
    } else {
        vec![ALPN_HTTP11.to_vec()]
    };
    Ok(Arc::new(config))
}

/// The WARN line an upstream that verifies nothing gets each time a configuration with it
/// is loaded (start-up and every reload).
pub(crate) fn warn_insecure(cfg: &UpstreamConfig) {
    if cfg.tls.insecure_skip_verify {
        tracing::warn!(
            upstream = %cfg.name,
            "upstream TLS certificates are NOT verified (tls.insecure_skip_verify: true): for local testing only"
        );
    }
}

/// `insecure_skip_verify`: any certificate, any name. The handshake's signatures are still
/// checked (the peer holds the key of the certificate it sent), so the only thing given
/// up is who that peer is.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Per-request timing limits for one attempt.
pub(crate) struct Timers {
    pub connect: Duration,
    /// From the request's last byte to the response head (see `within_first_byte`).
    pub first_byte: Duration,
    pub deadline: Option<Instant>,
}

/// Sends the request in `request` (and the `forwarded` headers) to `endpoint` and waits
/// for the response head, at most `first_byte` from the request's last byte (see
/// [`within_first_byte`]) or until the route's total deadline if that comes first. The
/// request is taken out, and put back when it provably never left; what was sent goes to
/// `sent` when given (our own client's, see `pool::exchange`). The error is boxed: the
/// answer travels up through several futures, and most answers are not errors.
pub(crate) async fn send(
    upstream: &str,
    endpoint: &Endpoint,
    request: &mut Option<Request<RequestBody>>,
    forwarded: Option<&Forwarded>,
    timers: &Timers,
    mut sent: Option<&mut Option<Request<RequestBody>>>,
) -> Result<Response<PooledBody>, Box<SendError>> {
    let timed_out = |phase, failure, by_deadline| {
        Box::new(SendError {
            error: ProxyError::UpstreamTimeout {
                upstream: upstream.to_string(),
                phase,
            },
            failure: Some(failure),
            by_deadline,
        })
    };
    // A pooled connection may have been closed by the upstream a moment ago. When the
    // client hands the request back (nothing of it was written, or a safe bodiless request
    // got not a byte of answer), go again, once, on a fresh connection.
    let mut from_pool = true;
    loop {
        let idle = if from_pool {
            endpoint.pool.take_idle()
        } else {
            None
        };
        let conn = match idle {
            Some(c) => c,
            // Rare once the pool is warm: boxed, so its large future is not part of every
            // request's. The request stays out of it, so it is still here if time runs out.
            // Bounded by the connect timeout and the route's total deadline.
            None => match Box::pin(until(
                timers.deadline,
                endpoint.pool.connect(timers.connect),
            ))
            .await
            {
                Some(Ok(c)) => {
                    // Requests waiting for the endpoint to listen again go now.
                    endpoint.state.connect_gate.connected(Instant::now());
                    c
                }
                Some(Err(e)) => {
                    let failure = connect_failure(&e);
                    return Err(Box::new(SendError {
                        error: connect_error(upstream, &endpoint.pool, e),
                        failure: Some(failure),
                        by_deadline: false,
                    }));
                }
                None => {
                    return Err(timed_out(
                        TimeoutPhase::Total,
                        Failure::ConnectTimeout,
                        true,
                    ));
                }
            },
        };
        // From here on a timeout means the request may have reached the upstream.
        let reused = conn.reused();
        let upload = request.as_mut().and_then(|r| r.body_mut().upload());
        let exchange = pool::exchange(
            conn,
            endpoint.pool.clone(),
            request,
            forwarded,
            sent.as_deref_mut(),
        );
        // No await in this match's arms, and the answer moved whole into the hold below:
        // so it passes through this future on the stack, not through its room (written
        // there, cold at 1,000 connections, for every request).
        let answer = match within_first_byte(exchange, upload.as_deref(), timers).await {
            Ok(Some(Ok(resp))) if resp.body().held() => return Ok(resp),
            Ok(Some(answer)) => answer,
            Ok(None) => {
                // Callers always lend a request; nothing was sent.
                return Err(Box::new(SendError {
                    error: ProxyError::UpstreamUnavailable {
                        upstream: upstream.to_string(),
                        detail: "no request".into(),
                    },
                    failure: None,
                    by_deadline: false,
                }));
            }
            Err(phase) => return Err(timed_out(phase, Failure::FirstByteTimeout, false)),
        };
        let error = match hold_first_byte(answer).await {
            Ok(resp) => return Ok(resp),
            Err(error) => error,
        };
        // Given back unsent: nothing reached the upstream.
        let unsent = request.is_some();
        if unsent && reused {
            from_pool = false;
            continue;
        }
        let (error, blame) = classify(&error, upstream, &endpoint.pool);
        return Err(Box::new(SendError {
            error,
            failure: blame.then_some(if unsent {
                Failure::Connect
            } else {
                Failure::Reset
            }),
            by_deadline: false,
        }));
    }
}

/// The head waits (briefly) for the body's first byte: a body that fails at once is a 502,
/// not a head with a cut stream (outside the first-byte timer).
async fn hold_first_byte(
    answer: Result<Response<PooledBody>, ExchangeError>,
) -> Result<Response<PooledBody>, ExchangeError> {
    let mut resp = answer?;
    match resp.body_mut().hold().await {
        Ok(()) => Ok(resp),
        Err(e) => Err(ExchangeError::Wire(e)),
    }
}

/// `fut`, or None once `deadline` (if any) has passed.
async fn until<F: Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Runs an exchange (request out, response head in) under the first-byte timer, which counts
/// only time the UPSTREAM owes us something: from the request's last byte (`Done`), or from
/// the moment rampart had bytes for it that it did not take (`Upstream`: the head, or a piece
/// of the body the upstream is not reading). While rampart waits for the client's next bytes
/// (`Client`), no upstream timer runs: the request body's own timers (`timeouts.body`,
/// `min_body_rate`, `total`) govern, and what they end is the client's fault (408), never
/// the upstream's. A body that is here whole (`upload` None) is done when the exchange starts.
/// The total deadline caps it all, except while waiting for the client (the body's timers
/// carry the same deadline).
pub(crate) async fn within_first_byte<F: Future>(
    fut: F,
    upload: Option<&Upload>,
    timers: &Timers,
) -> Result<F::Output, TimeoutPhase> {
    let started = Instant::now();
    let mut fut = std::pin::pin!(fut);
    // Armed lazily, re-armed only when the deadline moves.
    let mut timer: Option<(Pin<Box<tokio::time::Sleep>>, Instant)> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let since = match upload.map(Upload::state) {
            None => started,
            Some(UploadState::Upstream(at) | UploadState::Done(at)) => at,
            // Woken again by the body when it has news.
            Some(UploadState::Client) => return Poll::Pending,
        };
        let first_byte = since + timers.first_byte;
        let (at, phase) = match timers.deadline {
            Some(d) if d < first_byte => (d, TimeoutPhase::Total),
            _ => (first_byte, TimeoutPhase::FirstByte),
        };
        let sleep = match &mut timer {
            Some((sleep, armed_at)) => {
                if *armed_at != at {
                    sleep.as_mut().reset(at);
                    *armed_at = at;
                }
                sleep
            }
            None => &mut timer.insert((Box::pin(tokio::time::sleep_until(at)), at)).0,
        };
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(phase)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// An Upgrade handshake: always a fresh connection, which the upgrade then owns. The
/// connect has the connect timeout, the handshake the first-byte timer (from the request's
/// last byte, as any request's), both capped by the route's total deadline. The error says,
/// as `send`'s does, whether the upstream is to blame.
pub(crate) async fn send_upgrade(
    upstream: &str,
    endpoint: &Endpoint,
    mut req: Request<RequestBody>,
    timers: &Timers,
) -> Result<Response<hyper::body::Incoming>, Box<SendError>> {
    let failed = |error, failure| {
        Box::new(SendError {
            error,
            failure,
            by_deadline: false,
        })
    };
    let timed_out = |phase, failure| {
        let error = ProxyError::UpstreamTimeout {
            upstream: upstream.to_string(),
            phase,
        };
        failed(error, Some(failure))
    };
    let io = match until(
        timers.deadline,
        endpoint.pool.connect_timed(timers.connect, true),
    )
    .await
    {
        Some(Ok(io)) => {
            endpoint.state.connect_gate.connected(Instant::now());
            io
        }
        Some(Err(e)) => {
            let failure = connect_failure(&e);
            return Err(failed(
                connect_error(upstream, &endpoint.pool, e),
                Some(failure),
            ));
        }
        None => return Err(timed_out(TimeoutPhase::Total, Failure::ConnectTimeout)),
    };
    let upload = req.body_mut().upload();
    let exchange = pool::exchange_upgrade(io, req);
    match within_first_byte(exchange, upload.as_deref(), timers).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(UpgradeError::Connect(e))) => Err(failed(
            connect_error(upstream, &endpoint.pool, e),
            Some(Failure::Connect),
        )),
        Ok(Err(UpgradeError::Exchange(e))) => {
            let (error, blame) = classify_upgrade(&e, upstream);
            Err(failed(error, blame.then_some(Failure::Reset)))
        }
        Err(phase) => Err(timed_out(phase, Failure::FirstByteTimeout)),
    }
}

fn connect_failure(e: &ConnectError) -> Failure {
    match e {
        ConnectError::Timeout => Failure::ConnectTimeout,
        ConnectError::Tls(_) => Failure::Tls,
        _ => Failure::Connect,
    }
}

fn connect_error(upstream: &str, pool: &EndpointPool, e: ConnectError) -> ProxyError {
    match e {
        ConnectError::Timeout => ProxyError::UpstreamTimeout {
            upstream: upstream.to_string(),
            phase: TimeoutPhase::Connect,
        },
        ConnectError::Tls(e) => tls_error(upstream, pool, &e),
        other => ProxyError::UpstreamUnavailable {
            upstream: upstream.to_string(),
            detail: format!("connect failed: {other}"),
        },
    }
}

/// A failed TLS handshake (or an alert after it: in TLS 1.3 a server refuses the client's
/// certificate after the client has finished), logged with rustls' reason: the answer says
/// only the code and the reason, the line also says which endpoint.
fn tls_error(
    upstream: &str,
    pool: &EndpointPool,
    e: &(dyn std::error::Error + 'static),
) -> ProxyError {
    let detail = root_cause(e);
    tracing::warn!(
        upstream,
        endpoint = %format_args!("{}:{}", pool.host, pool.port),
        error = %detail,
        "upstream TLS failed"
    );
    ProxyError::UpstreamTls {
        upstream: upstream.to_string(),
        detail,
    }
}

/// Whether rustls said no somewhere down the chain (it comes wrapped in io errors).
fn from_rustls(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Maps an exchange error to what the downstream should hear, and whether the upstream is
/// to blame (not when our client's own request body failed).
fn classify(err: &ExchangeError, upstream: &str, pool: &EndpointPool) -> (ProxyError, bool) {
    match err {
        ExchangeError::RequestBody(b) => (body_error(b), false),
        ExchangeError::Wire(e) if from_rustls(e) => (tls_error(upstream, pool, e), true),
        ExchangeError::Wire(e) => (
            ProxyError::UpstreamUnavailable {
                upstream: upstream.to_string(),
                detail: format!("connection failed: {}", root_cause(e)),
            },
            true,
        ),
    }
}

fn body_error(b: &BodyError) -> ProxyError {
    match b {
        // Too slow sending its body (these timers only run while rampart waits for the
        // client): the client's fault, answered 408 as a buffered body's would be, and never
        // counted against the upstream (see `classify`).
        BodyError::Idle | BodyError::Slow | BodyError::Total => ProxyError::RequestTimeout,
        BodyError::TooLarge(limit) => ProxyError::PayloadTooLarge { limit: *limit },
        BodyError::Length
        | BodyError::Inner(_)
        | BodyError::Client(_)
        | BodyError::Upstream(_)
        | BodyError::SendTimeout => ProxyError::BadRequest("the request body was cut short"),
    }
}

/// The same for hyper's errors on the upgrade path, where our request body errors come back
/// wrapped inside hyper's error: look through the source chain first.
fn classify_upgrade(err: &hyper::Error, upstream: &str) -> (ProxyError, bool) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(b) = e.downcast_ref::<BodyError>() {
            return (body_error(b), false);
        }
        source = e.source();
    }
    let error = ProxyError::UpstreamUnavailable {
        upstream: upstream.to_string(),
        detail: format!("connection failed: {}", root_cause(err)),
    };
    (error, true)
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut e = err;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timers(first_byte: u64, total: Option<u64>) -> Timers {
        Timers {
            connect: Duration::from_secs(1),
            first_byte: Duration::from_secs(first_byte),
            deadline: total.map(|t| Instant::now() + Duration::from_secs(t)),
        }
    }

    /// When `within_first_byte` gives up on an exchange that never ends, the exchange itself
    /// moving the upload's state along (at whole seconds), as the request body does from
    /// inside the exchange it is polled by.
    async fn gives_up_after(
        upload: Option<&Upload>,
        t: &Timers,
        script: &[(u64, UploadState)],
    ) -> (u64, TimeoutPhase) {
        let start = Instant::now();
        let exchange = async {
            for (at, state) in script {
                tokio::time::sleep_until(start + Duration::from_secs(*at)).await;
                if let Some(u) = upload {
                    u.set(*state);
                }
            }
            std::future::pending::<()>().await;
        };
        let phase = within_first_byte(exchange, upload, t).await.unwrap_err();
        ((Instant::now() - start).as_secs(), phase)
    }

    #[tokio::test(start_paused = true)]
    async fn first_byte_runs_from_the_last_byte_and_never_while_the_client_sends() {
        // A body here whole: from the start.
        let (took, phase) = gives_up_after(None, &timers(3, None), &[]).await;
        assert_eq!((took, phase), (3, TimeoutPhase::FirstByte));

        // The client sends for 10 s, then the body ends: 3 s after that.
        let start = Instant::now();
        let u = Upload::new(UploadState::Upstream(start));
        let script = [
            (0, UploadState::Client),
            (5, UploadState::Upstream(start + Duration::from_secs(5))),
            (5, UploadState::Client),
            (10, UploadState::Done(start + Duration::from_secs(10))),
        ];
        let (took, phase) = gives_up_after(Some(&u), &timers(3, None), &script).await;
        assert_eq!((took, phase), (13, TimeoutPhase::FirstByte));

        // An upstream that stops taking the body: 3 s after the last piece it took.
        let start = Instant::now();
        let u = Upload::new(UploadState::Upstream(start));
        let script = [
            (0, UploadState::Client),
            (2, UploadState::Upstream(start + Duration::from_secs(2))),
        ];
        let (took, phase) = gives_up_after(Some(&u), &timers(3, None), &script).await;
        assert_eq!((took, phase), (5, TimeoutPhase::FirstByte));

        // The total deadline caps it, but not while the client is sending (its body's own
        // timers carry that deadline).
        let start = Instant::now();
        let u = Upload::new(UploadState::Upstream(start));
        let script = [
            (0, UploadState::Client),
            (6, UploadState::Done(start + Duration::from_secs(6))),
        ];
        let (took, phase) = gives_up_after(Some(&u), &timers(3, Some(4)), &script).await;
        assert_eq!((took, phase), (6, TimeoutPhase::Total));
    }
}
