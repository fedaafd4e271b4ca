//! Where notifications go besides the log: a generic JSON webhook, a Slack-compatible
//! incoming webhook, the Alertmanager API v2. Each notification is one POST, retried with
//! exponential backoff on a background task: a slow or dead receiver delays nothing but
//! its own notifications.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Uri, header};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use super::AlertEvent;
use super::rules::Change;
use crate::body::RequestBody;
use crate::config::{Secret, SinkConfig, SinkKind, UpstreamClient};
use crate::upstream::pool::{self, ConnectError, EndpointPool};

/// First retry after this, doubling, at most `BACKOFF_MAX` (full jitter).
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One POST to make.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub sink: SinkConfig,
    /// Derived from the sink's URL, so as secret as it is.
    pub url: Secret<Uri>,
    pub body: Bytes,
    /// For the logs: the rule and its change.
    pub what: String,
}

/// The request a sink gets for an event. `resend_within` is how soon rampart sends a
/// firing alert again (Alertmanager forgets alerts that are not re-sent).
pub(crate) fn delivery(
    sink: &SinkConfig,
    event: &AlertEvent,
    instance: &str,
    resend_within: Duration,
) -> Delivery {
    let (url, body) = match sink.kind {
        SinkKind::Webhook => {
            let mut v = event.to_json();
            if let Value::Object(m) = &mut v {
                m.insert("instance".into(), json!(instance));
                m.insert("source".into(), json!("rampart"));
            }
            (sink.url.expose().clone(), v)
        }
        SinkKind::Slack => (
            sink.url.expose().clone(),
            json!({ "text": slack_text(event, instance) }),
        ),
        SinkKind::Alertmanager => (
            alertmanager_url(sink.url.expose()),
            alertmanager_body(event, instance, resend_within),
        ),
    };
    Delivery {
        sink: sink.clone(),
        url: Secret::new(url),
        body: Bytes::from(body.to_string()),
        what: format!("{} {}", event.rule, event.status.as_str()),
    }
}

fn slack_text(e: &AlertEvent, instance: &str) -> String {
    let icon = match (e.status, e.severity) {
        (Change::Resolved, _) => ":white_check_mark:",
        (_, crate::config::Severity::Critical) => ":rotating_light:",
        _ => ":warning:",
    };
    format!(
        "{icon} *[{}] {} {}* on {instance}\n{}",
        e.severity.as_str().to_uppercase(),
        e.rule,
        e.status.as_str(),
        e.summary
    )
}

/// `<base>/api/v2/alerts`, unless the URL already names that path.
pub(super) fn alertmanager_url(base: &Uri) -> Uri {
    let s = base.to_string();
    if s.trim_end_matches('/').ends_with("/api/v2/alerts") {
        return base.clone();
    }
    let joined = format!("{}/api/v2/alerts", s.trim_end_matches('/'));
    joined.parse().unwrap_or_else(|_| base.clone())
}

fn alertmanager_body(e: &AlertEvent, instance: &str, resend_within: Duration) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("alertname".into(), json!(e.rule));
    labels.insert("severity".into(), json!(e.severity.as_str()));
    labels.insert("signal".into(), json!(e.signal.as_str()));
    labels.insert("service".into(), json!("rampart"));
    labels.insert("instance".into(), json!(instance));
    if let Some(r) = &e.route {
        labels.insert("route".into(), json!(r));
    }
    if let Some(u) = &e.upstream {
        labels.insert("upstream".into(), json!(u));
    }
    // Firing: valid until a little after the next re-send; resolved: ended now.
    let ends = match e.status {
        Change::Resolved => e.at,
        _ => e.at + resend_within,
    };
    json!([{
        "labels": labels,
        "annotations": {
            "summary": e.summary,
            "description": e.detail.clone().unwrap_or_default(),
        },
        "startsAt": rfc3339(e.started_at),
        "endsAt": rfc3339(ends),
    }])
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Delivers with retries until it succeeds, fails for good (a 4xx other than 408/429
/// means the request itself is wrong), runs out of attempts, or rampart stops.
pub(crate) async fn deliver(d: Delivery, mut stop: watch::Receiver<bool>) -> Result<u32, String> {
    let mut last = String::new();
    for attempt in 1..=d.sink.max_attempts {
        match post(d.url.expose(), d.body.clone(), d.sink.timeout).await {
            Ok(status) if (200..300).contains(&status) => return Ok(attempt),
            Ok(status) if (400..500).contains(&status) && status != 408 && status != 429 => {
                return Err(format!("refused with status {status}"));
            }
            Ok(status) => last = format!("status {status}"),
            Err(e) => last = e,
        }
        if attempt == d.sink.max_attempts {
            break;
        }
        tracing::debug!(
            sink = d.sink.kind.as_str(),
            alert = %d.what,
            attempt,
            error = %last,
            "alert delivery failed; retrying"
        );
        let ceiling = BACKOFF_BASE
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(BACKOFF_MAX);
        let wait = ceiling.mul_f64(0.5 + crate::jitter::unit() / 2.0);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = crate::shutdown::stopped(&mut stop) => return Err("rampart is stopping".into()),
        }
    }
    Err(format!(
        "{} attempts failed, last: {last}",
        d.sink.max_attempts
    ))
}

/// One POST over a fresh connection (notifications are rare: no pool), bounded by
/// `timeout` from connect to response head. Returns the status. Spoken by the same client
/// as the upstreams (`upstream::pool`), TLS included.
pub(crate) async fn post(url: &Uri, body: Bytes, timeout: Duration) -> Result<u16, String> {
    post_with(url, body, timeout, client_tls).await
}

/// `post`, trusting what `tls` gives (called only for https).
async fn post_with(
    url: &Uri,
    body: Bytes,
    timeout: Duration,
    tls: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, String>,
) -> Result<u16, String> {
    let host = url
        .host()
        .ok_or("no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = url
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let authority = HeaderValue::from_str(&authority).map_err(|e| e.to_string())?;
    let path = url.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let req = Request::post(path)
        .header(header::HOST, authority.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("rampart/", env!("CARGO_PKG_VERSION")),
        )
        .body(RequestBody::Full(Some(body)))
        .map_err(|e| e.to_string())?;
    let tls = if https {
        let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        Some((TlsConnector::from(tls()?), name))
    } else {
        None
    };
    // Nothing is kept idle: the connection closes with the answer.
    let pool = Arc::new(EndpointPool::new(
        host,
        port,
        authority,
        tls,
        UpstreamClient::Rampart,
        Duration::ZERO,
        0,
    ));
    let no_answer = || format!("no answer within {}", humantime::format_duration(timeout));
    let attempt = async {
        let conn = pool.connect(timeout).await.map_err(|e| match e {
            ConnectError::Timeout => no_answer(),
            ConnectError::Io(e) => format!("connect: {e}"),
            other => other.to_string(),
        })?;
        match pool::exchange(conn, pool.clone(), &mut Some(req), None, None).await {
            Some(Ok(resp)) => Ok(resp.status().as_u16()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("no request".to_owned()),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| no_answer())?
}

/// The system's trust store, loaded once.
fn client_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    static TLS: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    TLS.get_or_init(|| crate::upstream::forward::tls_config(None))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Comparison, Severity, Signal};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn event(status: Change) -> AlertEvent {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        AlertEvent {
            rule: "HighErrorRate".into(),
            signal: Signal::ErrorRate,
            severity: Severity::Critical,
            status,
            value: Some(0.125),
            threshold: 0.05,
            comparison: Comparison::Above,
            window: Duration::from_secs(300),
            route: None,
            upstream: Some("backend".into()),
            detail: None,
            started_at: t0,
            at: t0 + Duration::from_secs(120),
            summary: "error_rate 12.5% > 5.0% over 5m (upstream backend)".into(),
        }
    }

    fn sink(kind: SinkKind) -> SinkConfig {
        SinkConfig {
            kind,
            url: Secret::new("http://127.0.0.1:9/hook".parse().unwrap()),
            timeout: Duration::from_secs(1),
            max_attempts: 1,
        }
    }

    fn body(d: &Delivery) -> Value {
        serde_json::from_slice(&d.body).unwrap()
    }

    #[test]
    fn payloads_per_sink() {
        let firing = event(Change::Firing);
        let resend = Duration::from_secs(180);
        let w = body(&delivery(
            &sink(SinkKind::Webhook),
            &firing,
            "pod-1",
            resend,
        ));
        assert_eq!(w["alert"], "HighErrorRate");
        assert_eq!(w["status"], "firing");
        assert_eq!(w["instance"], "pod-1");
        assert_eq!(w["started_at"], "2027-01-15T08:00:00.000Z");

        let s = body(&delivery(&sink(SinkKind::Slack), &firing, "pod-1", resend));
        let text = s["text"].as_str().unwrap();
        assert!(
            text.starts_with(":rotating_light: *[CRITICAL] HighErrorRate firing* on pod-1"),
            "{text}"
        );

        let d = delivery(&sink(SinkKind::Alertmanager), &firing, "pod-1", resend);
        assert_eq!(d.url.expose().path(), "/hook/api/v2/alerts");
        let a = body(&d);
        assert_eq!(a[0]["labels"]["alertname"], "HighErrorRate");
        assert_eq!(a[0]["labels"]["upstream"], "backend");
        assert_eq!(a[0]["startsAt"], "2027-01-15T08:00:00.000Z");
        // Firing: valid a while past the next re-send; resolved: ended when it resolved.
        assert_eq!(a[0]["endsAt"], "2027-01-15T08:05:00.000Z");
        let resolved = event(Change::Resolved);
        let a = body(&delivery(
            &sink(SinkKind::Alertmanager),
            &resolved,
            "pod-1",
            resend,
        ));
        assert_eq!(a[0]["endsAt"], "2027-01-15T08:02:00.000Z");
    }

    #[tokio::test]
    async fn a_dead_receiver_fails_after_the_attempts() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let mut s = sink(SinkKind::Webhook);
        s.url = Secret::new(format!("http://{addr}/hook").parse().unwrap());
        s.max_attempts = 2;
        let d = delivery(
            &s,
            &event(Change::Firing),
            "pod-1",
            Duration::from_secs(180),
        );
        let (_tx, stop) = watch::channel(false);
        let err = deliver(d, stop).await.unwrap_err();
        assert!(
            err.starts_with("2 attempts failed, last: connect:"),
            "{err}"
        );
    }

    /// A receiver that reads one request (head and Content-Length body), answers with
    /// `answer` and then, if `close`, closes the connection; counts the requests it read.
    async fn receiver(answer: &'static str, close: bool) -> (Uri, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap())
            .parse()
            .unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                let (mut s, _) = l.accept().await.unwrap();
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() < end + 4 + len {
                            continue;
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        s.write_all(answer.as_bytes()).await.unwrap();
                        if close {
                            let _ = s.shutdown().await;
                            return;
                        }
                        buf.drain(..end + 4 + len);
                    }
                });
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn receivers_that_close_after_answering_get_one_notification() {
        let kinds = [
            (
                "keep-alive",
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                false,
            ),
            (
                "close",
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                true,
            ),
            ("HTTP/1.0", "HTTP/1.0 200 OK\r\n\r\nok", true),
        ];
        for (kind, answer, close) in kinds {
            let (url, seen) = receiver(answer, close).await;
            let mut s = sink(SinkKind::Webhook);
            s.url = Secret::new(url);
            s.max_attempts = 5;
            let d = delivery(
                &s,
                &event(Change::Firing),
                "pod-1",
                Duration::from_secs(180),
            );
            let (_tx, stop) = watch::channel(false);
            let r = tokio::time::timeout(Duration::from_secs(10), deliver(d, stop))
                .await
                .unwrap();
            assert_eq!(r, Ok(1), "{kind}");
            assert_eq!(seen.load(Ordering::SeqCst), 1, "{kind}");
        }
    }

    /// An HTTPS receiver whose certificate a private CA signed: trusted through the
    /// upstreams' TLS settings (`tls_config` with a CA file), it gets the notification.
    #[tokio::test]
    async fn an_https_receiver_with_a_private_ca_gets_the_notification() {
        use http_body_util::{BodyExt, Empty};
        use hyper::body::Incoming;
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: Uri = format!("https://{}/hook", l.local_addr().unwrap())
            .parse()
            .unwrap();
        let (got, mut received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (acceptor, got) = (acceptor.clone(), got.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let got = got.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await?.to_bytes();
                            let _ = got.send((path, body));
                            Ok::<_, hyper::Error>(http::Response::new(Empty::<Bytes>::new()))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        let ca = std::env::temp_dir().join(format!("rampart-sink-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let tls = crate::upstream::forward::tls_config(Some(&ca));
        let _ = std::fs::remove_file(&ca);
        let status = post_with(
            &url,
            Bytes::from_static(b"{}"),
            Duration::from_secs(5),
            || tls,
        )
        .await;
        assert_eq!(status, Ok(200));
        let (path, body) = received.recv().await.unwrap();
        assert_eq!((path.as_str(), &body[..]), ("/hook", &b"{}"[..]));

        // The system's trust store alone does not know that CA.
        let err = post(&url, Bytes::from_static(b"{}"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.starts_with("TLS: "), "{err}");
    }

    #[test]
    fn alertmanager_path_is_added_once() {
        let u: Uri = "http://am:9093".parse().unwrap();
        assert_eq!(
            alertmanager_url(&u).to_string(),
            "http://am:9093/api/v2/alerts"
        );
        let u: Uri = "http://am:9093/api/v2/alerts".parse().unwrap();
        assert_eq!(
            alertmanager_url(&u).to_string(),
            "http://am:9093/api/v2/alerts"
        );
        let u: Uri = "http://am:9093/prefix/".parse().unwrap();
        assert_eq!(
            alertmanager_url(&u).to_string(),
            "http://am:9093/prefix/api/v2/alerts"
        );
    }
}
