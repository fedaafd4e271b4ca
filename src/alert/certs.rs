//! The `certificate_expiry` signal: the fewest days any served TLS certificate has left,
//! and which certificates an alert names.

use std::time::SystemTime;

use super::rules::Reading;
use crate::config::{AlertRule, Signal};
use crate::observe::certs::CertExpiry;

/// Certificates listed by name in an alert; the rest are counted.
const CERTS_NAMED: usize = 5;

/// The fewest days any loaded certificate has left. The text names the certificates that
/// meet the condition, soonest first (none does: the soonest, so a resolved alert says
/// what the renewed certificate has now).
pub(super) fn certificate_expiry(rule: &AlertRule, certs: &CertExpiry, now: SystemTime) -> Reading {
    let mut loaded: Vec<(f64, String)> = certs
        .loaded()
        .into_iter()
        .map(|c| {
            let days = c.days_left(now);
            let left = if days < 0.0 {
                format!("expired {:.1} days ago", -days)
            } else {
                format!("{days:.1} days left")
            };
            (
                days,
                format!(
                    "listener {}, certificate {}: {left}",
                    c.listener, c.certificate
                ),
            )
        })
        .collect();
    if loaded.is_empty() {
        return match certs.ever_used() {
            true => Reading {
                value: Some(Signal::NO_CERTIFICATE),
                detail: Some("no certificate loaded".into()),
            },
            false => Reading::default(),
        };
    }
    loaded.sort_by(|a, b| a.0.total_cmp(&b.0));
    let soonest = loaded[0].0;
    let meeting: Vec<&str> = loaded
        .iter()
        .filter(|(d, _)| rule.comparison.holds(*d, rule.threshold))
        .map(|(_, t)| t.as_str())
        .collect();
    let detail = match meeting.len() {
        0 => loaded[0].1.clone(),
        n if n > CERTS_NAMED => format!(
            "{}; and {} more",
            meeting[..CERTS_NAMED].join("; "),
            n - CERTS_NAMED
        ),
        _ => meeting.join("; "),
    };
    Reading {
        value: Some(soonest),
        detail: Some(detail),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::alert::rules::{Change, Evaluator};
    use crate::alert::summary;
    use crate::config::{AlertsConfig, Comparison};

    fn cert_rule() -> AlertRule {
        AlertsConfig::default_rules()
            .into_iter()
            .find(|r| r.signal == Signal::CertificateExpiry)
            .unwrap()
    }

    fn unix_now() -> i64 {
        SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    const DAY: i64 = 86_400;

    fn record(certs: &CertExpiry, listener: &str, name: &str, days: i64) {
        let der = crate::observe::certs::tests::cert_der(name, unix_now() + days * DAY);
        certs.record(listener, &[(name.into(), der)]).unwrap();
    }

    #[test]
    fn certificate_expiry_is_the_soonest_and_names_those_under_the_threshold() {
        let r = cert_rule();
        assert_eq!((r.comparison, r.threshold), (Comparison::Below, 14.0));
        let certs = CertExpiry::default();
        let now = SystemTime::now();
        // No TLS: no data, the rule stays quiet.
        assert_eq!(certificate_expiry(&r, &certs, now), Reading::default());
        record(&certs, "public", "api.example.com", 90);
        let fine = certificate_expiry(&r, &certs, now);
        assert!((fine.value.unwrap() - 90.0).abs() < 0.01);
        assert_eq!(
            fine.detail.as_deref(),
            Some("listener public, certificate api.example.com: 90.0 days left")
        );
        record(&certs, "internal", "db.internal", 3);
        record(&certs, "legacy", "old.example", -2);
        let bad = certificate_expiry(&r, &certs, now);
        assert!((bad.value.unwrap() + 2.0).abs() < 0.01);
        assert_eq!(
            bad.detail.as_deref(),
            Some(
                "listener legacy, certificate old.example: expired 2.0 days ago; \
                 listener internal, certificate db.internal: 3.0 days left"
            )
        );
        let text = summary(&r, Change::Firing, bad.value, bad.detail.as_deref());
        assert!(
            text.starts_with("certificate_expiry -2.0d < 14d: listener legacy, certificate old.example: expired 2.0 days ago;"),
            "{text}"
        );
        // Read again later: the days count down with nothing recorded.
        let later = now + Duration::from_secs(86_400);
        let v = certificate_expiry(&r, &certs, later).value.unwrap();
        assert!((v + 3.0).abs() < 0.01, "{v}");
    }

    #[test]
    fn many_expiring_certificates_are_counted_past_the_first_five() {
        let r = cert_rule();
        let certs = CertExpiry::default();
        for i in 0..8 {
            record(&certs, &format!("l{i}"), &format!("c{i}.example"), i + 1);
        }
        let d = certificate_expiry(&r, &certs, SystemTime::now())
            .detail
            .unwrap();
        assert!(d.ends_with("; and 3 more"), "{d}");
        assert!(
            d.starts_with("listener l0, certificate c0.example: 1.0 days left;"),
            "{d}"
        );
    }

    /// Through the state machine: fires for a certificate with 5 days left, resolves when
    /// it is renewed; fires again and resolves once no certificate is loaded at all.
    #[test]
    fn certificate_expiry_fires_and_resolves_when_renewed_or_gone() {
        let r = cert_rule();
        let certs = CertExpiry::default();
        let mut e = Evaluator::new(std::slice::from_ref(&r));
        let t0 = Instant::now();
        let mut step = |i: u64| {
            let now = t0 + Duration::from_secs(60 * i);
            let t = e.evaluate(now, |rule| {
                certificate_expiry(rule, &certs, SystemTime::now())
            });
            t.into_iter()
                .map(|t| {
                    let s = summary(
                        &t.rule,
                        t.change,
                        t.reading.value,
                        t.reading.detail.as_deref(),
                    );
                    (t.change, s)
                })
                .collect::<Vec<_>>()
        };
        assert!(step(0).is_empty());
        record(&certs, "public", "api.example.com", 5);
        let fired = step(1);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].0, Change::Firing);
        assert!(
            fired[0]
                .1
                .contains("listener public, certificate api.example.com: 5.0 days left"),
            "{}",
            fired[0].1
        );
        assert!(step(2).is_empty(), "fires once");
        record(&certs, "public", "api.example.com", 90);
        let resolved = step(3);
        assert_eq!(resolved[0].0, Change::Resolved);
        assert!(
            resolved[0].1.starts_with("certificate_expiry back over 14d (90.0d): listener public, certificate api.example.com: 90.0 days left"),
            "{}",
            resolved[0].1
        );
        record(&certs, "public", "api.example.com", 1);
        assert_eq!(step(4)[0].0, Change::Firing);
        // TLS turned off: nothing can expire any more, which resolves the alert.
        certs.record("public", &[]).unwrap();
        let gone = step(5);
        assert_eq!(gone[0].0, Change::Resolved);
        assert!(gone[0].1.contains("no certificate loaded"), "{}", gone[0].1);
        assert!(step(6).is_empty());
    }
}
