//! `rampart_tls_certificate_*`: when each loaded certificate expires.
//!
//! Whoever loads certificates (the TLS listeners, at start and at every reload) records
//! each listener's leaf certificates here; [`CertExpiry`] keeps only their name and
//! notAfter. Days left are computed when `/metrics` is scraped (and when the alert rule
//! reads them), so they count down between reloads and go negative once a certificate has
//! expired, with nothing recorded again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const SECS_PER_DAY: f64 = 86_400.0;

/// Certificates a listener loaded whose DER could not be read; the others were recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listener {listener}: cannot read the expiry of {}", .problems.join("; "))]
pub struct CertParseError {
    pub listener: String,
    /// `name: why`, one per certificate left out.
    pub problems: Vec<String>,
}

/// One loaded certificate, as the metrics and the alert rule see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoadedCert {
    pub listener: String,
    pub certificate: String,
    /// Unix time, seconds.
    pub not_after: i64,
}

impl LoadedCert {
    /// Days left at `now`, negative once expired.
    pub(crate) fn days_left(&self, now: SystemTime) -> f64 {
        (self.not_after as f64 - unix_secs(now)) / SECS_PER_DAY
    }
}

/// The shared handle (cheap to clone): what the listeners record, `/metrics` exports and
/// the `certificate_expiry` alert signal reads.
#[derive(Debug, Clone, Default)]
pub struct CertExpiry {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Listener -> certificate name -> notAfter. BTreeMaps: the scrape and the alert
    /// text list them in a stable order.
    by_listener: BTreeMap<String, BTreeMap<String, i64>>,
    /// Something has been recorded since start, so "no certificate" is a fact, not a lack
    /// of data (see [`CertExpiry::soonest`]).
    used: bool,
}

impl CertExpiry {
    /// A registry handle whose collector is in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let c = CertExpiry::default();
        registry.register_collector(Box::new(c.clone()));
        c
    }

    /// Replaces what `listener` serves with `certs`: (name, leaf certificate DER) pairs,
    /// the name being the certificate's first SAN or subject CN; an empty name is replaced
    /// by that ([`leaf_name`]). An empty list forgets the listener (TLS turned off, listener
    /// removed).
    ///
    /// A DER that cannot be read is left out and reported; the others are recorded anyway,
    /// so a certificate that cannot be read never keeps its predecessor's expiry on show.
    /// Two certificates of one listener with the same name (an RSA and an ECDSA one) show
    /// as one series, the one expiring first.
    pub fn record(
        &self,
        listener: &str,
        certs: &[(String, Vec<u8>)],
    ) -> Result<(), CertParseError> {
        let mut set = BTreeMap::new();
        let mut problems = Vec::new();
        for (i, (name, der)) in certs.iter().enumerate() {
            let name = match name.as_str() {
                "" => leaf_name(der).unwrap_or_else(|_| format!("certificate {}", i + 1)),
                _ => name.clone(),
            };
            match not_after(der) {
                Ok(t) => {
                    let e = set.entry(name).or_insert(t);
                    *e = (*e).min(t);
                }
                Err(why) => problems.push(format!("{name}: {why}")),
            }
        }
        {
            let mut inner = crate::sync::lock(&self.inner);
            inner.used |= !certs.is_empty();
            if set.is_empty() {
                inner.by_listener.remove(listener);
            } else {
                inner.by_listener.insert(listener.to_owned(), set);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CertParseError {
                listener: listener.to_owned(),
                problems,
            })
        }
    }

    /// Forgets every listener `keep` says no to (those a reload removed).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        crate::sync::lock(&self.inner)
            .by_listener
            .retain(|l, _| keep(l));
    }

    /// Every loaded certificate, by listener then name.
    pub(crate) fn loaded(&self) -> Vec<LoadedCert> {
        let inner = crate::sync::lock(&self.inner);
        inner
            .by_listener
            .iter()
            .flat_map(|(listener, certs)| {
                certs.iter().map(|(name, t)| LoadedCert {
                    listener: listener.clone(),
                    certificate: name.clone(),
                    not_after: *t,
                })
            })
            .collect()
    }

    /// Whether any certificate was ever recorded: until then the alert signal is "no data"
    /// (a deployment without TLS); afterwards an empty set means nothing can expire.
    pub(crate) fn ever_used(&self) -> bool {
        crate::sync::lock(&self.inner).used
    }
}

impl Collector for CertExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let loaded = self.loaded();
        if loaded.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        let mut m = encoder.encode_descriptor(
            "tls_certificate_expiry_days",
            "Days until a loaded TLS certificate expires (negative once expired), by listener and certificate (its first SAN or subject CN)",
            None,
            MetricType::Gauge,
        )?;
        for c in &loaded {
            let labels = [
                ("listener", c.listener.as_str()),
                ("certificate", c.certificate.as_str()),
            ];
            ConstGauge::new(c.days_left(now)).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "tls_certificate_not_after_seconds",
            "notAfter of a loaded TLS certificate, unix time, by listener and certificate",
            None,
            MetricType::Gauge,
        )?;
        for c in &loaded {
            let labels = [
                ("listener", c.listener.as_str()),
                ("certificate", c.certificate.as_str()),
            ];
            ConstGauge::new(c.not_after).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(format!(
            "{} byte(s) after the certificate (not one DER certificate)",
            rest.len()
        )),
        Err(e) => Err(format!("not a DER X.509 certificate ({e})")),
    }
}

/// The certificate's notAfter, unix seconds.
pub(crate) fn not_after(der: &[u8]) -> Result<i64, String> {
    parse(der).map(|c| c.validity().not_after.timestamp())
}

/// What a certificate is called in the metrics and alerts: its first DNS name or IP
/// address among the subject alternative names, else its subject CN.
pub(crate) fn leaf_name(der: &[u8]) -> Result<String, String> {
    let cert = parse(der)?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) => return Ok((*s).to_owned()),
                GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        return Ok(std::net::Ipv4Addr::from(v4).to_string());
                    }
                    if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        return Ok(std::net::Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| "no DNS or IP subject alternative name and no subject CN".to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;

    /// A self-signed leaf for `name` whose notAfter is `not_after` (unix seconds).
    pub(crate) fn cert_der(name: &str, not_after: i64) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        // rcgen does not re-export `time`'s types: the epoch plus the seconds.
        p.not_after = rcgen::date_time_ymd(1970, 1, 1)
            + Duration::from_secs(u64::try_from(not_after).unwrap());
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn now_unix() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    const DAY: i64 = 86_400;

    fn scrape(c: &CertExpiry) -> String {
        let mut r = crate::observe::new_registry();
        r.register_collector(Box::new(c.clone()));
        crate::observe::encode_registry(&Arc::new(r))
    }

    /// The value of the series whose line starts with `prefix` (labels included).
    fn value(text: &str, prefix: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn days_left_count_down_from_not_after() {
        let now = now_unix();
        let c = CertExpiry::default();
        c.record(
            "public",
            &[
                ("a.example".into(), cert_der("a.example", now + 30 * DAY)),
                ("b.example".into(), cert_der("b.example", now - 2 * DAY)),
            ],
        )
        .unwrap();
        let loaded = c.loaded();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0].not_after, now + 30 * DAY);
        let t = SystemTime::now();
        assert!((loaded[0].days_left(t) - 30.0).abs() < 0.01);
        assert!((loaded[1].days_left(t) + 2.0).abs() < 0.01);
        // Ten days later, with nothing recorded again.
        let later = t + Duration::from_secs(10 * DAY as u64);
        assert!((loaded[0].days_left(later) - 20.0).abs() < 0.01);
        assert!((loaded[1].days_left(later) + 12.0).abs() < 0.01);
    }

    #[test]
    fn scraped_lines_carry_listener_certificate_and_both_values() {
        let now = now_unix();
        let c = CertExpiry::default();
        c.record(
            "public",
            &[(
                "api.example.com".into(),
                cert_der("api.example.com", now + 7 * DAY),
            )],
        )
        .unwrap();
        c.record(
            "internal",
            &[("old.internal".into(), cert_der("old.internal", now - DAY))],
        )
        .unwrap();
        let text = scrape(&c);
        assert!(
            text.contains("# TYPE rampart_tls_certificate_expiry_days gauge"),
            "{text}"
        );
        let days = value(
            &text,
            "rampart_tls_certificate_expiry_days{listener=\"public\",certificate=\"api.example.com\"}",
        );
        assert!((days - 7.0).abs() < 0.01, "{days}");
        let expired = value(
            &text,
            "rampart_tls_certificate_expiry_days{listener=\"internal\",certificate=\"old.internal\"}",
        );
        assert!((expired + 1.0).abs() < 0.01, "{expired}");
        assert_eq!(
            value(
                &text,
                "rampart_tls_certificate_not_after_seconds{listener=\"public\",certificate=\"api.example.com\"}"
            ),
            (now + 7 * DAY) as f64
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn nothing_is_exported_before_a_certificate_is_recorded() {
        let text = scrape(&CertExpiry::default());
        assert!(!text.contains("tls_certificate"), "{text}");
    }

    #[test]
    fn a_record_replaces_the_listeners_set_and_an_empty_one_forgets_it() {
        let now = now_unix();
        let c = CertExpiry::default();
        c.record(
            "public",
            &[
                ("a".into(), cert_der("a", now + DAY)),
                ("b".into(), cert_der("b", now + DAY)),
            ],
        )
        .unwrap();
        c.record("other", &[("c".into(), cert_der("c", now + DAY))])
            .unwrap();
        // The reload: `a` renewed, `b` gone.
        c.record("public", &[("a".into(), cert_der("a", now + 90 * DAY))])
            .unwrap();
        let names: Vec<(String, String, i64)> = c
            .loaded()
            .into_iter()
            .map(|l| (l.listener, l.certificate, l.not_after))
            .collect();
        assert_eq!(
            names,
            [
                ("other".into(), "c".into(), now + DAY),
                ("public".into(), "a".into(), now + 90 * DAY)
            ]
        );
        c.record("public", &[]).unwrap();
        c.retain(|l| l != "other");
        assert!(c.loaded().is_empty());
        assert!(c.ever_used());
        assert!(!scrape(&c).contains("tls_certificate"));
    }

    #[test]
    fn same_name_twice_keeps_the_one_expiring_first() {
        let now = now_unix();
        let c = CertExpiry::default();
        c.record(
            "public",
            &[
                ("x".into(), cert_der("x", now + 60 * DAY)),
                ("x".into(), cert_der("x", now + 5 * DAY)),
                ("x".into(), cert_der("x", now + 30 * DAY)),
            ],
        )
        .unwrap();
        let l = c.loaded();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].not_after, now + 5 * DAY);
    }

    #[test]
    fn unreadable_der_is_an_error_and_the_rest_is_recorded() {
        let now = now_unix();
        let good = cert_der("good", now + DAY);
        let mut trailing = good.clone();
        trailing.push(0);
        let c = CertExpiry::default();
        c.record("public", &[("old".into(), cert_der("old", now + DAY))])
            .unwrap();
        let e = c
            .record(
                "public",
                &[
                    ("junk".into(), b"not a certificate".to_vec()),
                    ("empty".into(), Vec::new()),
                    ("cut".into(), good[..good.len() / 2].to_vec()),
                    ("trailing".into(), trailing),
                    ("good".into(), good.clone()),
                ],
            )
            .unwrap_err();
        assert_eq!(e.listener, "public");
        let text = e.to_string();
        for n in ["junk:", "empty:", "cut:", "trailing: 1 byte(s) after"] {
            assert!(text.contains(n), "{n} missing: {text}");
        }
        // The unreadable ones never keep the old set on show.
        let names: Vec<String> = c.loaded().into_iter().map(|l| l.certificate).collect();
        assert_eq!(names, ["good"]);
        // Nothing readable: the listener is forgotten, not left with its old set.
        assert!(
            c.record("public", &[("x".into(), vec![0x30, 0x03, 1])])
                .is_err()
        );
        assert!(c.loaded().is_empty());
    }

    #[test]
    fn hostile_der_never_panics() {
        let der = cert_der("fuzz.example", now_unix());
        // Every truncation and a flipped byte at every position.
        for cut in 0..der.len() {
            let _ = not_after(&der[..cut]);
            let _ = leaf_name(&der[..cut]);
        }
        for i in 0..der.len() {
            let mut d = der.clone();
            d[i] ^= 0xff;
            let _ = not_after(&d);
            let _ = leaf_name(&d);
        }
    }

    #[test]
    fn the_name_is_the_first_san_else_the_cn() {
        let now = now_unix();
        assert_eq!(
            leaf_name(&cert_der("api.example.com", now)).unwrap(),
            "api.example.com"
        );
        assert_eq!(leaf_name(&cert_der("10.0.0.5", now)).unwrap(), "10.0.0.5");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "only-cn.example");
        let key = rcgen::KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(leaf_name(&der).unwrap(), "only-cn.example");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert!(leaf_name(&der).is_err());
        // Named by the caller, or by the certificate itself.
        let c = CertExpiry::default();
        c.record("l", &[(String::new(), cert_der("self.example", now))])
            .unwrap();
        assert_eq!(c.loaded()[0].certificate, "self.example");
    }
}
