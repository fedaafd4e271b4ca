//! TLS termination on a listener (issue 17): HTTP/1.1 and HTTP/2 by ALPN, certificates by
//! SNI, mutual TLS, the handshake timeout, plain HTTP sent to the TLS port, certificate
//! rotation by reload under an open connection, `redirect_to_https`, and the check of the
//! files. Certificates are made here with rcgen; the clients are tokio-rustls and hyper.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

use crate::assert_eventually;
use crate::support::process::temp_dir;
use crate::support::*;

// === certificates ===

struct Pair {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn self_signed(names: &[&str]) -> Pair {
    let c = rcgen::generate_simple_self_signed(
        names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
    )
    .unwrap();
    Pair {
        cert_pem: c.cert.pem(),
        key_pem: c.signing_key.serialize_pem(),
        der: c.cert.der().clone(),
    }
}

/// Writes `pair` as `<stem>.crt` and `<stem>.key` in `dir` (replacing what is there).
fn write_pair(dir: &Path, stem: &str, pair: &Pair) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    (cert, key)
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn client_cert(issuer: &CertifiedIssuer<'static, KeyPair>) -> ClientCert {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["client.test".to_owned()]).unwrap();
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let c = p.signed_by(&key, &**issuer).unwrap();
    (
        vec![c.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

// === clients ===

/// Takes any server certificate (the tests look at which one was presented), checking
/// only the handshake signatures.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Default)]
struct Client {
    /// None: no SNI (an IP address as the server name).
    sni: Option<&'static str>,
    alpn: Vec<&'static [u8]>,
    cert: Option<ClientCert>,
    /// A 4 KiB receive buffer: a client that stops reading is soon a blocked writer's.
    small_window: bool,
}

async fn connect(addr: SocketAddr, c: Client) -> std::io::Result<TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match c.cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = c.alpn.iter().map(|p| p.to_vec()).collect();
    let name = match c.sni {
        Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
        None => ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into()),
    };
    let socket = tokio::net::TcpSocket::new_v4()?;
    if c.small_window {
        socket.set_recv_buffer_size(4096)?;
    }
    let tcp = socket.connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("handshake within 5 s")
}

fn presented(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1(tls: TlsStream<TcpStream>) -> H1 {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// GET `path` with `Host: host`: status and body, within 5 s.
async fn get1(sender: &mut H1, host: &str, path: &str) -> Result<(StatusCode, String), String> {
    let req = Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let fut = async {
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| Err("no answer within 5 s".into()))
}

/// A fresh TLS connection and one HTTP/1.1 request on it; the status, or why it failed.
async fn one_request(addr: SocketAddr, c: Client) -> Result<StatusCode, String> {
    let tls = connect(addr, c).await.map_err(|e| e.to_string())?;
    let mut s = h1(tls).await;
    get1(&mut s, "example.test", "/ok").await.map(|r| r.0)
}

// === the proxy ===

/// A TLS listener `main` with `tls_extra` under `tls:` (after `cert` and `key`) and
/// `listener_extra` under the listener.
fn config(url: &str, cert: &Path, key: &Path, tls_extra: &str, listener_extra: &str) -> String {
    format!(
        r#"admin: {{ listen: "127.0.0.1:0" }}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    tls:
      cert: {cert}
      key: {key}
{tls_extra}
{listener_extra}
    routes:
      - name: all
        match: {{ path_prefix: / }}
        upstream: up
upstreams:
  up: {{ endpoints: ["{url}"], connect_timeout: 1s }}
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

fn metric(px: &rampart::app::Running, family: &str, result: &str) -> f64 {
    let text = px.encode_metrics();
    sample(
        &text,
        &format!("rampart_{family}_total{{listener=\"main\",result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn http1_and_http2_by_alpn_reach_the_upstream_with_x_forwarded_proto_https() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-alpn");
    let (cert, key) = write_pair(&dir, "site", &self_signed(&["example.test"]));
    let px = start(&config(&up.url(), &cert, &key, "", "")).await;
    let addr = px.addr("main").unwrap();

    let tls = connect(
        addr,
        Client {
            sni: Some("example.test"),
            alpn: vec![b"h2", b"http/1.1"],
            ..Client::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://example.test/echo")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), h2.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let head = up.counters.last_head.lock().unwrap().clone().unwrap();
    assert_eq!(head.headers["x-forwarded-proto"], "https");

    let tls = connect(
        addr,
        Client {
            sni: Some("example.test"),
            alpn: vec![b"http/1.1"],
            ..Client::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut s = h1(tls).await;
    // Two requests on the one connection: keep-alive over TLS.
    for _ in 0..2 {
        *up.counters.last_head.lock().unwrap() = None;
        let (status, body) = get1(&mut s, "example.test", "/echo").await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        let head = up.counters.last_head.lock().unwrap().clone().unwrap();
        assert_eq!(head.headers["x-forwarded-proto"], "https");
    }
    assert_eq!(up.requests(), 3);
    assert_eq!(metric(&px, "tls_handshakes", "ok"), 2.0);
}

#[tokio::test]
async fn sni_picks_the_exact_name_then_a_one_label_wildcard_else_the_default() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-sni");
    let default = self_signed(&["default.test"]);
    let wild = self_signed(&["*.example.com"]);
    let exact = self_signed(&["api.example.com"]);
    let (cert, key) = write_pair(&dir, "default", &default);
    let (wc, wk) = write_pair(&dir, "wild", &wild);
    let (ec, ek) = write_pair(&dir, "exact", &exact);
    let extra = format!(
        "      certificates:\n        - {{ cert: {}, key: {} }}\n        - {{ cert: {}, key: {} }}",
        wc.display(),
        wk.display(),
        ec.display(),
        ek.display()
    );
    let px = start(&config(&up.url(), &cert, &key, &extra, "")).await;
    let addr = px.addr("main").unwrap();
    let leaf = |sni| async move {
        let tls = connect(
            addr,
            Client {
                sni,
                ..Client::default()
            },
        )
        .await
        .unwrap();
        presented(&tls)
    };
    assert_eq!(leaf(Some("API.example.com")).await, exact.der);
    assert_eq!(leaf(Some("www.example.com")).await, wild.der);
    // One label only, and not the bare domain.
    assert_eq!(leaf(Some("a.b.example.com")).await, default.der);
    assert_eq!(leaf(Some("example.com")).await, default.der);
    assert_eq!(leaf(Some("unknown.test")).await, default.der);
    assert_eq!(leaf(None).await, default.der);
}

#[tokio::test]
async fn client_certificates_are_required_and_must_come_from_client_ca() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-mtls");
    let (cert, key) = write_pair(&dir, "site", &self_signed(&["example.test"]));
    let trusted = ca("trusted CA");
    let other = ca("other CA");
    let ca_path = dir.join("clients.pem");
    std::fs::write(&ca_path, trusted.pem()).unwrap();
    let extra = format!("      client_ca: {}", ca_path.display());
    let px = start(&config(&up.url(), &cert, &key, &extra, "")).await;
    let addr = px.addr("main").unwrap();
    let with = |cert| Client {
        sni: Some("example.test"),
        cert,
        ..Client::default()
    };

    assert_eq!(
        one_request(addr, with(Some(client_cert(&trusted)))).await,
        Ok(StatusCode::OK)
    );
    let none = one_request(addr, with(None)).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let foreign = one_request(addr, with(Some(client_cert(&other)))).await;
    assert!(
        foreign.is_err(),
        "a certificate from another CA: {foreign:?}"
    );
    assert_eq!(up.requests(), 1);
    assert_eq!(metric(&px, "tls_handshakes", "ok"), 1.0);
    assert_eq!(metric(&px, "tls_handshakes", "error"), 2.0);
}

/// Reads until the peer closes; the time that took, or None if it is still open at `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| start.elapsed())
}

#[tokio::test]
async fn a_silent_client_and_half_a_client_hello_are_closed_at_the_handshake_timeout() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-timeout");
    let (cert, key) = write_pair(&dir, "site", &self_signed(&["example.test"]));
    let px = start(&config(
        &up.url(),
        &cert,
        &key,
        "      handshake_timeout: 400ms",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();

    let mut silent = TcpStream::connect(addr).await.unwrap();
    // A handshake record header and the start of a ClientHello, then nothing.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .await
    .unwrap();
    for (what, s) in [("silent", &mut silent), ("half hello", &mut half)] {
        let took = closed_within(s, Duration::from_secs(3)).await;
        let took = took.unwrap_or_else(|| panic!("{what}: still open after 3 s"));
        assert!(
            took < Duration::from_secs(2),
            "{what}: closed after {took:?}"
        );
    }
    assert_eventually!(
        metric(&px, "tls_handshakes", "timeout") == 2.0,
        "two handshake timeouts counted: {}",
        px.encode_metrics()
    );
    // The listener still serves.
    let ok = one_request(
        addr,
        Client {
            sni: Some("example.test"),
            ..Client::default()
        },
    )
    .await;
    assert_eq!(ok, Ok(StatusCode::OK));
}

#[tokio::test]
async fn header_read_timeout_still_closes_a_tls_connection_that_sends_no_request() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-header-timeout");
    let (cert, key) = write_pair(&dir, "site", &self_signed(&["example.test"]));
    let px = start(&config(
        &up.url(),
        &cert,
        &key,
        "",
        "    header_read_timeout: 500ms",
    ))
    .await;
    let mut tls = connect(
        px.addr("main").unwrap(),
        Client {
            sni: Some("example.test"),
            ..Client::default()
        },
    )
    .await
    .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not still open: {r:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn plain_http_sent_to_the_tls_port_gets_a_400_at_once() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-plain");
    let (cert, key) = write_pair(&dir, "site", &self_signed(&["example.test"]));
    let px = start(&config(&up.url(), &cert, &key, "", "")).await;
    let start = Instant::now();
    let answer = raw(
        px.addr("main").unwrap(),
        b"GET /ok HTTP/1.1\r\nHost: example.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "answered and closed in {:?}",
        start.elapsed()
    );
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("Connection: close\r\n"), "{answer}");
    assert!(
        answer.contains("plain HTTP request was sent to an HTTPS port"),
        "{answer}"
    );
    assert_eq!(up.requests(), 0);
    assert_eq!(metric(&px, "tls_handshakes", "plain_http"), 1.0);
}

#[tokio::test]
async fn a_reload_rotates_the_certificate_for_new_handshakes_and_refuses_a_bad_pair() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-rotate");
    let first = self_signed(&["example.test"]);
    let second = self_signed(&["example.test"]);
    let (cert, key) = write_pair(&dir, "site", &first);
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, config(&up.url(), &cert, &key, "", "")).unwrap();
    let cfg = rampart::config::Config::load(&path).unwrap();
    let px = rampart::app::start_with_file(cfg, Some(path.clone()))
        .await
        .unwrap();
    let addr = px.addr("main").unwrap();
    let client = || Client {
        sni: Some("example.test"),
        ..Client::default()
    };

    let open = connect(addr, client()).await.unwrap();
    assert_eq!(presented(&open), first.der);
    let mut open = h1(open).await;
    assert_eq!(
        get1(&mut open, "example.test", "/ok").await.unwrap().0,
        StatusCode::OK
    );

    write_pair(&dir, "site", &second);
    let report = px.reload().await;
    assert!(report.is_ok(), "{report:?}");
    // The same listener: nothing rebound, the open connection keeps serving.
    assert_eq!(px.addr("main"), Some(addr));
    assert_eq!(
        get1(&mut open, "example.test", "/ok").await.unwrap().0,
        StatusCode::OK
    );
    let fresh = connect(addr, client()).await.unwrap();
    assert_eq!(presented(&fresh), second.der);
    assert_eq!(metric(&px, "tls_cert_reloads", "ok"), 1.0);

    // A certificate with another certificate's key: refused, the second pair still served.
    let third = self_signed(&["example.test"]);
    let stranger = self_signed(&["example.test"]);
    std::fs::write(&cert, &third.cert_pem).unwrap();
    std::fs::write(&key, &stranger.key_pem).unwrap();
    let report = px.reload().await;
    assert!(!report.is_ok(), "a mismatched pair is refused: {report:?}");
    let said = report.errors.join("\n");
    assert!(said.contains("listeners[0].tls.key"), "{said}");
    assert!(said.contains("is not the private key"), "{said}");
    let fresh = connect(addr, client()).await.unwrap();
    assert_eq!(presented(&fresh), second.der);
    let mut s = h1(fresh).await;
    assert_eq!(
        get1(&mut s, "example.test", "/ok").await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(
        get1(&mut open, "example.test", "/ok").await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(metric(&px, "tls_cert_reloads", "error"), 1.0);
    assert_eq!(metric(&px, "tls_cert_reloads", "ok"), 1.0);
}

#[tokio::test]
async fn redirect_to_https_answers_308_with_path_and_query_before_routing() {
    let up = Upstream::start().await;
    let px = start(&one_route(
        &up.url(),
        "",
        "    redirect_to_https: true\n    health_path: /healthz",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let answer = raw(
        addr,
        b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: Example.com:8080\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 308 "), "{answer}");
    let location = answer
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(location, "https://Example.com/a/b?x=1&y=2");

    // The listener's health path is still answered there.
    let health = raw(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(!health.starts_with("HTTP/1.1 308"), "{health}");
    assert!(health.contains("\"status\""), "{health}");

    let no_host = raw(addr, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(5)).await;
    assert!(
        no_host.starts_with("HTTP/1.0 400") || no_host.starts_with("HTTP/1.1 400"),
        "{no_host}"
    );
    assert_eq!(up.requests(), 0, "nothing reaches the upstream");
}

#[test]
fn the_check_refuses_bad_files_at_their_key() {
    let dir = temp_dir("tls-check");
    let (cert, key) = write_pair(&dir, "a", &self_signed(&["a.test"]));
    let (_, other_key) = write_pair(&dir, "b", &self_signed(&["b.test"]));
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let yaml = |cert: &Path, key: &Path, extra: &str| {
        format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\n\
             listeners:\n  \
               - name: main\n    \
                 listen: \"127.0.0.1:0\"\n    \
                 tls:\n      \
                   cert: {}\n      \
                   key: {}\n\
             {extra}    \
                 routes: [{{ upstream: up }}]\n\
             upstreams:\n  \
               up: {{ endpoints: [\"http://127.0.0.1:1\"] }}\n",
            cert.display(),
            key.display()
        )
    };
    let refused = |text: String| match rampart::config::parse_str(&text, "test.yaml", &|_| None) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    };

    let e = refused(yaml(&cert, &other_key, ""));
    assert!(
        e.starts_with("test.yaml:7:12: listeners[0].tls.key: "),
        "{e}"
    );
    assert!(
        e.contains("is not the private key of the certificate"),
        "{e}"
    );

    let e = refused(yaml(&dir.join("absent.crt"), &key, ""));
    assert!(
        e.starts_with("test.yaml:6:13: listeners[0].tls.cert: cannot read"),
        "{e}"
    );
    let e = refused(yaml(&not_pem, &key, ""));
    assert!(
        e.contains("listeners[0].tls.cert: ") && e.contains("no certificate"),
        "{e}"
    );
    let e = refused(yaml(&cert, &not_pem, ""));
    assert!(
        e.contains("listeners[0].tls.key: ") && e.contains("no private key"),
        "{e}"
    );
    let e = refused(yaml(
        &cert,
        &key,
        &format!("      client_ca: {}\n", not_pem.display()),
    ));
    assert!(
        e.contains("test.yaml:8:18: listeners[0].tls.client_ca: "),
        "{e}"
    );
    let e = refused(yaml(&cert, &key, "    redirect_to_https: true\n"));
    assert!(e.contains("listeners[0].redirect_to_https: "), "{e}");

    // And the good pair is accepted.
    let ok = rampart::config::parse_str(&yaml(&cert, &key, ""), "test.yaml", &|_| None);
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn the_smuggling_guard_still_refuses_both_framings_over_tls() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-smuggling");
    let (cert, key) = write_pair(&dir, "site", &self_signed(&["example.test"]));
    let px = start(&config(&up.url(), &cert, &key, "", "")).await;
    let mut tls = connect(
        px.addr("main").unwrap(),
        Client {
            sni: Some("example.test"),
            ..Client::default()
        },
    )
    .await
    .unwrap();
    tls.write_all(
        b"POST /ok HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nG",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tls.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_tls_client_that_stops_reading_is_cut_at_the_send_timeout() {
    // An upstream that answers with 64 MiB as fast as it can, and says when rampart let go.
    let flood = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flood_addr = flood.local_addr().unwrap();
    let (released_tx, released) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = flood.accept().await.unwrap();
        let mut head = [0u8; 4096];
        let _ = s.read(&mut head).await.unwrap();
        let len = 64 * 1024 * 1024;
        let mut ok = s
            .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").as_bytes())
            .await
            .is_ok();
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = len;
        while ok && left > 0 {
            ok = s.write_all(&chunk).await.is_ok();
            left -= chunk.len();
        }
        let _ = released_tx.send(Instant::now());
    });
    let dir = temp_dir("tls-send-timeout");
    let (cert, key) = write_pair(&dir, "site", &self_signed(&["example.test"]));
    let yaml = config(&format!("http://{flood_addr}"), &cert, &key, "", "").replace(
        "        upstream: up\n",
        "        upstream: up\n        timeouts: { idle: 1s }\n",
    );
    let px = start(&yaml).await;
    let mut tls = connect(
        px.addr("main").unwrap(),
        Client {
            sni: Some("example.test"),
            small_window: true,
            ..Client::default()
        },
    )
    .await
    .unwrap();
    tls.write_all(b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let asked = Instant::now();
    // Reads nothing: the upstream is let go at the send timeout (1 s), not when 64 MiB are
    // through.
    let released = tokio::time::timeout(Duration::from_secs(6), released)
        .await
        .expect("upstream released within 6 s")
        .unwrap();
    let took = released - asked;
    assert!(took < Duration::from_secs(5), "released after {took:?}");
}

#[tokio::test]
async fn new_certificate_paths_on_reload_bind_the_listener_anew() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-new-paths");
    let first = self_signed(&["example.test"]);
    let second = self_signed(&["example.test"]);
    let (c1, k1) = write_pair(&dir, "one", &first);
    let (c2, k2) = write_pair(&dir, "two", &second);
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, config(&up.url(), &c1, &k1, "", "")).unwrap();
    let cfg = rampart::config::Config::load(&path).unwrap();
    let px = rampart::app::start_with_file(cfg, Some(path.clone()))
        .await
        .unwrap();
    let client = || Client {
        sni: Some("example.test"),
        ..Client::default()
    };
    let addr = px.addr("main").unwrap();
    assert_eq!(
        presented(&connect(addr, client()).await.unwrap()),
        first.der
    );

    std::fs::write(&path, config(&up.url(), &c2, &k2, "", "")).unwrap();
    let report = px.reload().await;
    assert!(report.is_ok(), "{report:?}");
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.starts_with("listener main: settings changed, bound anew")),
        "{report:?}"
    );
    let addr = px.addr("main").unwrap();
    assert_eq!(
        presented(&connect(addr, client()).await.unwrap()),
        second.der
    );
    assert_eq!(one_request(addr, client()).await, Ok(StatusCode::OK));
}

#[test]
fn a_tls_section_needs_a_whole_pair() {
    let dir = temp_dir("tls-check-pairs");
    let (cert, key) = write_pair(&dir, "a", &self_signed(&["a.test"]));
    let yaml = |tls: &str| {
        format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    listen: \"127.0.0.1:0\"\n    tls: {tls}\n    routes: [{{ upstream: up }}]\nupstreams:\n  up: {{ endpoints: [\"http://127.0.0.1:1\"] }}\n"
        )
    };
    let parse = |tls: &str| rampart::config::parse_str(&yaml(tls), "test.yaml", &|_| None);
    let e = parse(&format!("{{ cert: {} }}", cert.display()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("listeners[0].tls: \"cert\" needs \"key\""),
        "{e}"
    );
    let e = parse("{ handshake_timeout: 5s }").unwrap_err().to_string();
    assert!(e.contains("listeners[0].tls: needs a certificate"), "{e}");
    let e = parse(&format!(
        "{{ certificates: [{{ cert: {} }}] }}",
        cert.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("listeners[0].tls.certificates[0]: missing required key \"key\""),
        "{e}"
    );
    // `certificates` alone: its first pair is the default.
    let c = parse(&format!(
        "{{ certificates: [{{ cert: {}, key: {} }}] }}",
        cert.display(),
        key.display()
    ))
    .unwrap();
    let tls = c.listeners[0].tls.clone().unwrap();
    assert_eq!(tls.pairs().len(), 1);
    assert_eq!(tls.handshake_timeout, Duration::from_secs(10));
}

/// A Kubernetes secret volume: `tls.crt -> ..data/tls.crt`, `..data -> ..<version>`, and a
/// rotation swaps `..data` to a new version directory in one rename.
fn k8s_version(dir: &Path, version: &str, cert_pem: &str, key_pem: &str) {
    let v = dir.join(version);
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("tls.crt"), cert_pem).unwrap();
    std::fs::write(v.join("tls.key"), key_pem).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        let link = dir.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &link).unwrap();
        }
    }
}

/// Kubernetes rotates the secret: no reload is asked for, the files change under their
/// symlinks, and new handshakes get the new certificate within a few looks; the open
/// connection keeps serving; the expiry metric follows. A rotation to a pair that does not
/// match is refused and the served certificate stays.
#[tokio::test]
async fn a_secret_rotated_on_disk_is_served_without_a_reload() {
    let up = Upstream::start().await;
    let dir = temp_dir("tls-k8s-rotation");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let first = self_signed(&["example.test"]);
    let second = self_signed(&["example.test"]);
    k8s_version(&dir, "..v1", &first.cert_pem, &first.key_pem);
    let px = start(&config(
        &up.url(),
        &dir.join("tls.crt"),
        &dir.join("tls.key"),
        "      watch: 100ms",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let client = || Client {
        sni: Some("example.test"),
        ..Client::default()
    };
    let expiry =
        "rampart_tls_certificate_expiry_days{listener=\"main\",certificate=\"example.test\"}";
    assert!(
        sample(&px.encode_metrics(), expiry).is_some_and(|d| d > 0.0),
        "the served certificate's expiry is exported from the start"
    );
    let open = connect(addr, client()).await.unwrap();
    assert_eq!(presented(&open), first.der);
    let mut open = h1(open).await;

    k8s_version(&dir, "..v2", &second.cert_pem, &second.key_pem);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let fresh = connect(addr, client()).await.unwrap();
        if presented(&fresh) == second.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still the old certificate 5 s after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&px, "tls_cert_reloads", "ok"), 1.0);
    assert_eq!(
        get1(&mut open, "example.test", "/ok").await.unwrap().0,
        StatusCode::OK,
        "the connection opened before the rotation keeps serving"
    );

    // A rotation to a certificate with another's key: refused, the second one stays.
    let third = self_signed(&["example.test"]);
    let stranger = self_signed(&["example.test"]);
    k8s_version(&dir, "..v3", &third.cert_pem, &stranger.key_pem);
    crate::assert_eventually!(
        metric(&px, "tls_cert_reloads", "error") == 1.0,
        "the mismatched pair was never looked at"
    );
    let fresh = connect(addr, client()).await.unwrap();
    assert_eq!(presented(&fresh), second.der);
    assert_eq!(metric(&px, "tls_cert_reloads", "ok"), 1.0);
    px.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
