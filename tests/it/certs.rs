//! Certificate expiry against a running rampart: what is recorded (as the TLS listeners
//! will record the certificates they load) shows on `/metrics` of the admin socket and
//! drives the default `CertificateExpiringSoon` alert.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart::app::Running;
use serde_json::Value;

use crate::assert_eventually;
use crate::support::{self, get, http1, send};

const DAY: u64 = 86_400;

const CONFIG: &str = r#"
admin: { listen: "127.0.0.1:0" }
logging: { level: warn, access_log: false }
listeners:
  - name: public
    listen: "127.0.0.1:0"
    routes: [{ upstream: up }]
upstreams:
  up: { endpoints: ["http://127.0.0.1:1"] }
alerts: { interval: 1s }
"#;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A self-signed leaf for `name` expiring at `not_after` (unix seconds).
fn cert(name: &str, not_after: u64) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_after);
    let key = rcgen::KeyPair::generate().unwrap();
    p.self_signed(&key).unwrap().der().to_vec()
}

async fn admin(r: &Running, path: &str) -> String {
    let (resp, body) = send(&http1(), get(r.admin_addr, path)).await;
    assert_eq!(resp.status(), 200, "{path}");
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of the series `name{labels}` in a scrape.
fn series(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap())
}

async fn cert_alert(r: &Running) -> (Value, Option<Value>) {
    let v: Value = serde_json::from_str(&admin(r, "/admin/alerts").await).unwrap();
    let rule = v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "CertificateExpiringSoon")
        .cloned()
        .expect("the default rule is there");
    let firing = v["firing"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alert"] == "CertificateExpiringSoon")
        .cloned();
    (rule, firing)
}

#[tokio::test]
async fn recorded_certificates_are_scraped_and_alerted_on_until_renewed() {
    let r = support::start(CONFIG).await;
    // No TLS yet: no series, and the rule has no data.
    let text = admin(&r, "/metrics").await;
    assert!(!text.contains("rampart_tls_certificate"), "{text}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (rule, firing) = cert_alert(&r).await;
    assert_eq!(rule["value_text"], "no data", "{rule}");
    assert!(firing.is_none());

    let now = unix_now();
    r.certs()
        .record(
            "public",
            &[
                (
                    "api.example.com".into(),
                    cert("api.example.com", now + 5 * DAY),
                ),
                (
                    "www.example.com".into(),
                    cert("www.example.com", now + 90 * DAY),
                ),
            ],
        )
        .unwrap();
    let text = admin(&r, "/metrics").await;
    let days = |text: &str, name: &str| {
        series(
            text,
            "rampart_tls_certificate_expiry_days",
            &format!("listener=\"public\",certificate=\"{name}\""),
        )
    };
    let soon = days(&text, "api.example.com").expect(&text);
    assert!((soon - 5.0).abs() < 0.01, "{soon}");
    let later = days(&text, "www.example.com").expect(&text);
    assert!((later - 90.0).abs() < 0.01, "{later}");
    assert_eq!(
        series(
            &text,
            "rampart_tls_certificate_not_after_seconds",
            "listener=\"public\",certificate=\"api.example.com\""
        ),
        Some((now + 5 * DAY) as f64)
    );
    assert!(text.contains("# TYPE rampart_tls_certificate_expiry_days gauge"));
    // Scraped again a moment later: counted down, nothing recorded in between.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = days(&admin(&r, "/metrics").await, "api.example.com").unwrap();
    assert!(again < soon, "{again} !< {soon}");

    // Five days left: the default rule (under 14 days) fires and says which certificate.
    assert_eventually!(
        cert_alert(&r).await.1.is_some(),
        "CertificateExpiringSoon not firing: {:?}",
        cert_alert(&r).await
    );
    let fired = cert_alert(&r).await.1.unwrap();
    assert_eq!(fired["severity"], "warning");
    let summary = fired["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("certificate_expiry 5.0d < 14d: listener public, certificate api.example.com: 5.0 days left"),
        "{summary}"
    );
    assert!(!summary.contains("www.example.com"), "{summary}");

    // Renewed by a reload of the certificate: resolved.
    r.certs()
        .record(
            "public",
            &[
                (
                    "api.example.com".into(),
                    cert("api.example.com", now + 60 * DAY),
                ),
                (
                    "www.example.com".into(),
                    cert("www.example.com", now + 90 * DAY),
                ),
            ],
        )
        .unwrap();
    assert_eventually!(
        cert_alert(&r).await.1.is_none(),
        "still firing after the renewal: {:?}",
        cert_alert(&r).await
    );
    let v: Value = serde_json::from_str(&admin(&r, "/admin/alerts").await).unwrap();
    let resolved = v["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["alert"] == "CertificateExpiringSoon" && e["status"] == "resolved")
        .cloned()
        .expect("a resolved change in the history");
    assert!(
        resolved["summary"]
            .as_str()
            .unwrap()
            .contains("listener public, certificate api.example.com: 60.0 days left"),
        "{resolved}"
    );
    r.shutdown().await;
}

#[tokio::test]
async fn an_unreadable_certificate_is_refused_and_the_rest_still_scraped() {
    let r = support::start(CONFIG).await;
    let now = unix_now();
    let err = r
        .certs()
        .record(
            "public",
            &[
                ("junk".into(), b"-----BEGIN CERTIFICATE-----".to_vec()),
                (
                    "expired.example".into(),
                    cert("expired.example", now - 3 * DAY),
                ),
            ],
        )
        .unwrap_err();
    assert!(err.to_string().contains("junk:"), "{err}");
    let text = admin(&r, "/metrics").await;
    assert!(!text.contains("certificate=\"junk\""), "{text}");
    let expired = series(
        &text,
        "rampart_tls_certificate_expiry_days",
        "listener=\"public\",certificate=\"expired.example\"",
    )
    .expect(&text);
    assert!((expired + 3.0).abs() < 0.01, "{expired}");
    assert!(text.ends_with("# EOF\n"));
    r.shutdown().await;
}
