//! `alerts:`: the in-process rules and the sinks their notifications go to.

use std::time::Duration;

use http::Uri;

use super::reader::{Ctx, Field, MapReader, Unique};
use super::upstreams::Upstreams;
use super::values::written_port;
use crate::config::{
    AlertRule, AlertsConfig, Comparison, Severity, Signal, SignalUnit, SinkConfig, SinkKind,
};

/// The in-memory series keeps samples this far back: longer windows belong in Prometheus.
pub(super) const MAX_ALERT_WINDOW: Duration = Duration::from_secs(3600);

pub(super) fn alerts(
    ctx: &mut Ctx,
    f: Option<Field>,
    upstreams: &Upstreams,
    routes: &[String],
) -> AlertsConfig {
    let d = AlertsConfig::default();
    let mut m = MapReader::open(ctx, f);
    let interval = m
        .read(ctx, "interval", |ctx, f| {
            let d = ctx.duration(f)?;
            if d < Duration::from_secs(1) {
                ctx.report(f.pos(), &f.path, "must be at least 1s");
                return None;
            }
            Some(d)
        })
        .unwrap_or(d.interval);
    let rules = match m.optional("rules") {
        Some(f) => alert_rules(ctx, &f, upstreams, routes),
        None => d.rules,
    };
    let sinks = match m.optional("sinks") {
        Some(f) => ctx
            .list(&f, "a list of sinks")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|item| sink(ctx, item))
            .collect(),
        None => Vec::new(),
    };
    m.finish(ctx);
    AlertsConfig {
        interval,
        rules,
        sinks,
    }
}

pub(super) fn alert_rules(
    ctx: &mut Ctx,
    f: &Field,
    upstreams: &Upstreams,
    routes: &[String],
) -> Vec<AlertRule> {
    let Some(items) = ctx.list(f, "a list of rules") else {
        return Vec::new();
    };
    let mut names = Unique::default();
    let mut out = Vec::new();
    for item in items {
        let Some((rule, name_at)) = alert_rule(ctx, item, upstreams, routes) else {
            continue;
        };
        if names.insert(ctx, &rule.name, &name_at, "alert rule name") {
            out.push(rule);
        }
    }
    out
}

pub(super) fn alert_rule<'a>(
    ctx: &mut Ctx,
    f: Field<'a>,
    upstreams: &Upstreams,
    routes: &[String],
) -> Option<(AlertRule, Field<'a>)> {
    let mut m = MapReader::open(ctx, Some(f));
    let name_field = m.required(ctx, "name");
    let name = name_field.as_ref().and_then(|f| ctx.name(f, "alert rule"));
    let signals = Signal::ALL.map(|s| (s.as_str(), s));
    let signal = m
        .required(ctx, "signal")
        .and_then(|f| ctx.one_of(&f, &signals));
    let comparison = m.read(ctx, "comparison", |ctx, f| {
        ctx.one_of(
            f,
            &[
                (">", Comparison::Above),
                (">=", Comparison::AtLeast),
                ("<", Comparison::Below),
                ("<=", Comparison::AtMost),
            ],
        )
    });
    let threshold_field = m.optional("threshold");
    let threshold = match (signal.map(Signal::unit), &threshold_field) {
        (Some(SignalUnit::Share), Some(t)) => ctx.parse_with(t, "a percentage", parse_share),
        (Some(SignalUnit::Seconds), Some(t)) => ctx.duration(t).map(|d| d.as_secs_f64()),
        (Some(SignalUnit::Days), Some(t)) => ctx.duration(t).map(|d| d.as_secs_f64() / 86_400.0),
        (Some(SignalUnit::YesNo), Some(t)) => {
            ctx.report(
                t.pos(),
                &t.path,
                "this signal is yes or no: leave out `threshold` (the rule fires while it is yes)",
            );
            None
        }
        (Some(SignalUnit::YesNo), None) => Some(0.0),
        (Some(_), None) => {
            if !m.quiet {
                ctx.report(m.pos, &m.path, "missing required key \"threshold\"");
            }
            None
        }
        (None, _) => None,
    };
    let window = m
        .read(ctx, "window", |ctx, f| {
            let d = ctx.duration(f)?;
            if d > MAX_ALERT_WINDOW {
                ctx.report(
                    f.pos(),
                    &f.path,
                    "must be at most 1h (use Prometheus for longer windows)",
                );
                return None;
            }
            Some(d)
        })
        .unwrap_or(AlertRule::DEFAULT_WINDOW);
    let for_ = m
        .read(ctx, "for", Ctx::duration_or_zero)
        .unwrap_or(Duration::ZERO);
    let severity = m
        .read(ctx, "severity", |ctx, f| {
            ctx.one_of(
                f,
                &[
                    ("critical", Severity::Critical),
                    ("warning", Severity::Warning),
                    ("info", Severity::Info),
                ],
            )
        })
        .unwrap_or(Severity::Warning);
    let route = m.read(ctx, "route", |ctx, f| {
        let r = ctx.text(f, "a route name")?;
        if !routes.contains(&r) {
            ctx.report(
                f.pos(),
                &f.path,
                format!("unknown route \"{r}\" (known: {})", routes.join(", ")),
            );
            return None;
        }
        Some(r)
    });
    let upstream = m.read(ctx, "upstream", |ctx, f| ctx.upstream_ref(f, upstreams));
    let min_samples = m
        .read(ctx, "min_samples", |ctx, f| ctx.int(f, 1, 1_000_000_000))
        .unwrap_or(AlertRule::DEFAULT_MIN_SAMPLES);
    m.finish(ctx);
    let signal = signal?;
    let rule = AlertRule {
        name: name?,
        signal,
        // Yes/no signals fire while yes; a hit rate and the days a certificate has left
        // alert when they fall.
        comparison: comparison.unwrap_or(match signal {
            Signal::CacheHitRate | Signal::CertificateExpiry => Comparison::Below,
            _ => Comparison::Above,
        }),
        threshold: threshold?,
        window,
        for_,
        severity,
        route,
        upstream,
        min_samples,
    };
    Some((rule, name_field?))
}

/// "5%" or a fraction such as 0.05; 0 to 100 %.
pub(super) fn parse_share(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let n = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok().map(|p| p / 100.0),
        None => t.parse::<f64>().ok(),
    };
    match n {
        Some(n) if (0.0..=1.0).contains(&n) => Ok(n),
        Some(_) => Err(format!("must be between 0% and 100%, got \"{s}\"")),
        None => Err(format!(
            "expected a percentage like \"5%\" (or 0.05), got \"{s}\""
        )),
    }
}

pub(super) fn sink(ctx: &mut Ctx, f: Field) -> Option<SinkConfig> {
    let mut m = MapReader::open(ctx, Some(f));
    let kind = m.required(ctx, "type").and_then(|f| {
        ctx.one_of(
            &f,
            &[
                ("webhook", SinkKind::Webhook),
                ("slack", SinkKind::Slack),
                ("alertmanager", SinkKind::Alertmanager),
            ],
        )
    });
    let url = m
        .required(ctx, "url")
        .and_then(|f| ctx.parse_secret(&f, "a URL", parse_sink_url));
    let timeout = m
        .read(ctx, "timeout", Ctx::duration)
        .unwrap_or(SinkConfig::DEFAULT_TIMEOUT);
    let max_attempts = m
        .read(ctx, "max_attempts", |ctx, f| ctx.int(f, 1, 20))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(SinkConfig::DEFAULT_ATTEMPTS);
    m.finish(ctx);
    Some(SinkConfig {
        kind: kind?,
        url: url?,
        timeout,
        max_attempts,
    })
}

/// An http(s) URL with a host. Not echoed: webhook URLs are credentials.
pub(super) fn parse_sink_url(s: &str) -> Result<Uri, String> {
    let bad = || {
        "expected an http:// or https:// URL with a host (not shown: it may hold a secret)"
            .to_owned()
    };
    let uri: Uri = s.trim().parse().map_err(|_| bad())?;
    if let Some(a) = uri.authority()
        && written_port(a).is_err()
    {
        return Err(
            "the port is not a port number (1 to 65535) (the URL is not shown: it may hold a secret)"
                .into(),
        );
    }
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some_and(|h| !h.is_empty()) => Ok(uri),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::test_support::*;

    #[test]
    fn alerts_default_to_the_users_rules() {
        let c = ok(MINIMAL);
        assert_eq!(c.alerts, AlertsConfig::default());
        let names: Vec<&str> = c.alerts.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "HighErrorRate",
                "HighAverageLatency",
                "HighDatabaseErrorRate",
                "LowCacheHitRate",
                "HighP95Latency",
                "CircuitBreakerOpen",
                "CertificateExpiringSoon"
            ]
        );
    }

    #[test]
    fn alert_rules_and_sinks_are_read() {
        let c = ok(&format!(
            "{MINIMAL}
        alerts:
          interval: 30s
          rules:
            - {{ name: errors, signal: error_rate, threshold: 5%, window: 2m, severity: critical, upstream: backend }}
            - {{ name: slow, signal: latency_p95, comparison: '>=', threshold: 500ms, for: 1m, route: inbound.0 }}
            - {{ name: cache, signal: cache_hit_rate, threshold: 0.5 }}
            - {{ name: breaker, signal: breaker_open, for: 2m }}
          sinks:
            - {{ type: slack, url: 'https://hooks.example.com/services/T0/B0/secret' }}
            - {{ type: alertmanager, url: 'http://127.0.0.1:9093', max_attempts: 3, timeout: 2s }}
"
        ));
        let a = &c.alerts;
        assert_eq!(a.interval, secs(30));
        let r = &a.rules;
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[0].signal, r[0].comparison, r[0].threshold, r[0].window),
            (Signal::ErrorRate, Comparison::Above, 0.05, secs(120))
        );
        assert_eq!(r[0].severity, Severity::Critical);
        assert_eq!(r[0].upstream.as_deref(), Some("backend"));
        assert_eq!(
            (r[1].comparison, r[1].threshold, r[1].for_),
            (Comparison::AtLeast, 0.5, secs(60))
        );
        assert_eq!(r[1].route.as_deref(), Some("inbound.0"));
        assert_eq!((r[2].comparison, r[2].threshold), (Comparison::Below, 0.5));
        assert_eq!((r[3].threshold, r[3].for_), (0.0, secs(120)));
        assert_eq!(a.sinks.len(), 2);
        assert_eq!(a.sinks[1].kind, SinkKind::Alertmanager);
        assert_eq!(a.sinks[1].max_attempts, 3);
        // Debug output never shows the URL's secret.
        assert!(!format!("{:?}", a.sinks[0]).contains("secret"));
    }

    #[test]
    fn certificate_expiry_takes_a_duration_in_days() {
        let c = ok(&format!(
            "{MINIMAL}
        alerts:
          rules:
            - {{ name: certs, signal: certificate_expiry, threshold: 30d }}
            - {{ name: soon, signal: certificate_expiry, threshold: 36h, comparison: '<=', severity: critical }}
"
        ));
        let r = &c.alerts.rules;
        assert_eq!(
            (r[0].signal, r[0].comparison, r[0].threshold),
            (Signal::CertificateExpiry, Comparison::Below, 30.0)
        );
        assert_eq!((r[1].comparison, r[1].threshold), (Comparison::AtMost, 1.5));
        assert_eq!(Signal::CertificateExpiry.format_value(Some(30.0)), "30d");
        assert_eq!(Signal::CertificateExpiry.format_value(Some(1.5)), "1.5d");
        assert_eq!(Signal::CertificateExpiry.format_value(Some(-0.25)), "-0.2d");
        assert_eq!(
            Signal::CertificateExpiry.format_value(Some(Signal::NO_CERTIFICATE)),
            "no certificate loaded"
        );
        let p = problems(&format!(
            "{MINIMAL}
        alerts:
          rules:
            - {{ name: a, signal: certificate_expiry, threshold: 14 }}
            - {{ name: b, signal: certificate_expiry, threshold: 5% }}
            - {{ name: c, signal: certificate_expiry, threshold: 400d }}
            - {{ name: d, signal: certificate_expiry }}
"
        ));
        let all: Vec<String> = p
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        let all = all.join("\n");
        for want in [
            "alerts.rules[0].threshold: expected a duration",
            "alerts.rules[1].threshold: expected a duration",
            "alerts.rules[2].threshold: must be at most 365 days",
            "alerts.rules[3]: missing required key \"threshold\"",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
    }

    #[test]
    fn alert_problems_are_located() {
        let p = problems(&format!(
            "{MINIMAL}
        alerts:
          rules:
            - {{ name: a, signal: error_ratio, threshold: 5% }}
            - {{ name: b, signal: breaker_open, threshold: 1 }}
            - {{ name: c, signal: latency_avg }}
            - {{ name: d, signal: error_rate, threshold: 5%, upstream: nope, window: 2h }}
            - {{ name: d, signal: error_rate, threshold: 150% }}
          sinks:
            - {{ type: webhook, url: 'ftp://secret@example.com' }}
"
        ));
        let text: Vec<String> = p
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        let all = text.join("\n");
        for want in [
            "alerts.rules[0].signal: expected one of error_rate,",
            "alerts.rules[1].threshold: this signal is yes or no",
            "alerts.rules[2]: missing required key \"threshold\"",
            "alerts.rules[3].upstream: unknown upstream \"nope\"",
            "alerts.rules[3].window: must be at most 1h",
            "alerts.rules[4].threshold: must be between 0% and 100%",
            "alerts.sinks[0].url: expected an http:// or https:// URL",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
        assert!(!all.contains("secret@"), "{all}");
    }
}
