//! `alerts:`: the in-process rules, their signals, and the sinks notifications go to.

use std::time::Duration;

use serde::{Serialize, Serializer};

use super::Secret;

/// `alerts:`: rules evaluated in-process, for deployments without a Prometheus server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertsConfig {
    /// How often the rules are evaluated. Default 60s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub interval: Duration,
    /// Default: [`AlertsConfig::default_rules`].
    pub rules: Vec<AlertRule>,
    /// Notifications besides the log (which always gets them).
    pub sinks: Vec<SinkConfig>,
}

/// One rule: "`signal` `comparison` `threshold` over `window`, for `for_`".
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    /// Unique; the alert's name in notifications.
    pub name: String,
    pub signal: Signal,
    pub comparison: Comparison,
    /// In the signal's unit: a share 0..=1 for rates and usages, seconds for latencies,
    /// days for `certificate_expiry`, 0 for the yes/no signals (1 = yes).
    pub threshold: f64,
    /// The span a rate or latency is computed over. Default 5m.
    pub window: Duration,
    /// How long the condition must hold before the alert fires. Default 0s.
    pub for_: Duration,
    pub severity: Severity,
    pub route: Option<String>,
    pub upstream: Option<String>,
    /// Fewer requests (or queries, or cache lookups) than this in the window is "no data".
    /// Default 10.
    pub min_samples: u64,
}

/// Written as the file takes it: `for`, and the threshold in the signal's unit ("5.0%",
/// "500ms"), which a derive cannot do (the unit is another field's). The whole struct is
/// taken apart so that a field added to it does not compile until it is shown here.
impl Serialize for AlertRule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Rule<'a> {
            name: &'a str,
            signal: Signal,
            comparison: Comparison,
            threshold: String,
            #[serde(serialize_with = "super::serialize::duration")]
            window: &'a Duration,
            #[serde(rename = "for", serialize_with = "super::serialize::duration")]
            for_: &'a Duration,
            severity: Severity,
            route: &'a Option<String>,
            upstream: &'a Option<String>,
            min_samples: u64,
        }
        let AlertRule {
            name,
            signal,
            comparison,
            threshold,
            window,
            for_,
            severity,
            route,
            upstream,
            min_samples,
        } = self;
        Rule {
            name,
            signal: *signal,
            comparison: *comparison,
            threshold: signal.format_value(Some(*threshold)),
            window,
            for_,
            severity: *severity,
            route,
            upstream,
            min_samples: *min_samples,
        }
        .serialize(s)
    }
}

impl AlertRule {
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
    pub const DEFAULT_MIN_SAMPLES: u64 = 10;
}

/// Serialized as [`Signal::as_str`] spells it (a test holds the two together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    ErrorRate,
    LatencyP95,
    LatencyAvg,
    DbErrorRate,
    CacheHitRate,
    PoolUsage,
    MemoryUsage,
    BreakerOpen,
    RatelimitFallbackActive,
    CertificateExpiry,
}

impl Signal {
    /// A value of this signal as people read it ("12.5%", "340ms", "yes"), in logs,
    /// notifications, the admin API and `/admin/config`.
    pub(crate) fn format_value(self, v: Option<f64>) -> String {
        let Some(v) = v else {
            return "no data".into();
        };
        match self.unit() {
            SignalUnit::Share => format!("{:.1}%", v * 100.0),
            SignalUnit::Seconds => format!("{:.0}ms", v * 1000.0),
            SignalUnit::YesNo if v > 0.0 => "yes".into(),
            SignalUnit::YesNo => "no".into(),
            SignalUnit::Days if v >= Signal::NO_CERTIFICATE => "no certificate loaded".into(),
            // Whole days as the file takes them (`14d`); a reading to a tenth of a day.
            SignalUnit::Days if v.fract() == 0.0 && v.abs() < 1e6 => format!("{v:.0}d"),
            SignalUnit::Days => format!("{v:.1}d"),
        }
    }

    /// `certificate_expiry` once no certificate is loaded any more (TLS turned off, its
    /// listeners removed): nothing can expire, which must resolve a firing alert, and "no
    /// data" never does. Larger than any threshold (at most 365 days).
    pub const NO_CERTIFICATE: f64 = f64::MAX;

    pub const ALL: [Signal; 10] = [
        Signal::ErrorRate,
        Signal::LatencyP95,
        Signal::LatencyAvg,
        Signal::DbErrorRate,
        Signal::CacheHitRate,
        Signal::PoolUsage,
        Signal::MemoryUsage,
        Signal::BreakerOpen,
        Signal::RatelimitFallbackActive,
        Signal::CertificateExpiry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::ErrorRate => "error_rate",
            Signal::LatencyP95 => "latency_p95",
            Signal::LatencyAvg => "latency_avg",
            Signal::DbErrorRate => "db_error_rate",
            Signal::CacheHitRate => "cache_hit_rate",
            Signal::PoolUsage => "pool_usage",
            Signal::MemoryUsage => "memory_usage",
            Signal::BreakerOpen => "breaker_open",
            Signal::RatelimitFallbackActive => "ratelimit_fallback_active",
            Signal::CertificateExpiry => "certificate_expiry",
        }
    }

    pub fn unit(self) -> SignalUnit {
        match self {
            Signal::LatencyP95 | Signal::LatencyAvg => SignalUnit::Seconds,
            Signal::BreakerOpen | Signal::RatelimitFallbackActive => SignalUnit::YesNo,
            Signal::CertificateExpiry => SignalUnit::Days,
            _ => SignalUnit::Share,
        }
    }

    /// Computed over the rule's `window` (the others are read as they are now).
    pub fn windowed(self) -> bool {
        !matches!(self.unit(), SignalUnit::YesNo | SignalUnit::Days)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalUnit {
    /// 0..=1, written as a percentage.
    Share,
    Seconds,
    /// 1 or 0.
    YesNo,
    /// Days, negative in the past (written as a duration, `14d`).
    Days,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Comparison {
    #[serde(rename = ">")]
    Above,
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<")]
    Below,
    #[serde(rename = "<=")]
    AtMost,
}

impl Comparison {
    pub fn as_str(self) -> &'static str {
        match self {
            Comparison::Above => ">",
            Comparison::AtLeast => ">=",
            Comparison::Below => "<",
            Comparison::AtMost => "<=",
        }
    }

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Above => value > threshold,
            Comparison::AtLeast => value >= threshold,
            Comparison::Below => value < threshold,
            Comparison::AtMost => value <= threshold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SinkConfig {
    #[serde(rename = "type")]
    pub kind: SinkKind,
    /// A secret (Slack's URL is the credential): shown by [`sink_url_shown`] only.
    #[serde(serialize_with = "super::secret::sink_url")]
    pub url: Secret<http::Uri>,
    /// One delivery attempt. Default 5s.
    #[serde(serialize_with = "super::serialize::duration")]
    pub timeout: Duration,
    /// Attempts in all, with exponential backoff between them. Default 5.
    pub max_attempts: u32,
}

impl SinkConfig {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_ATTEMPTS: u32 = 5;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// POST of the alert as JSON.
    Webhook,
    /// POST `{"text": ...}` (Slack incoming webhooks and compatibles: Mattermost, Rocket.Chat).
    Slack,
    /// Alertmanager API v2: POST `<url>/api/v2/alerts`.
    Alertmanager,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Slack => "slack",
            SinkKind::Alertmanager => "alertmanager",
        }
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            interval: Duration::from_secs(60),
            rules: AlertsConfig::default_rules(),
            sinks: Vec::new(),
        }
    }
}

impl AlertsConfig {
    /// The users' four rules, plus P95, an open breaker and a certificate about to expire.
    pub fn default_rules() -> Vec<AlertRule> {
        let rule = |name: &str, signal, comparison, threshold, for_secs, severity| AlertRule {
            name: name.to_owned(),
            signal,
            comparison,
            threshold,
            window: AlertRule::DEFAULT_WINDOW,
            for_: Duration::from_secs(for_secs),
            severity,
            route: None,
            upstream: None,
            min_samples: AlertRule::DEFAULT_MIN_SAMPLES,
        };
        vec![
            rule(
                "HighErrorRate",
                Signal::ErrorRate,
                Comparison::Above,
                0.05,
                0,
                Severity::Critical,
            ),
            rule(
                "HighAverageLatency",
                Signal::LatencyAvg,
                Comparison::Above,
                1.0,
                0,
                Severity::Warning,
            ),
            rule(
                "HighDatabaseErrorRate",
                Signal::DbErrorRate,
                Comparison::Above,
                0.01,
                0,
                Severity::Critical,
            ),
            rule(
                "LowCacheHitRate",
                Signal::CacheHitRate,
                Comparison::Below,
                0.5,
                0,
                Severity::Warning,
            ),
            rule(
                "HighP95Latency",
                Signal::LatencyP95,
                Comparison::Above,
                0.5,
                0,
                Severity::Warning,
            ),
            // `for: 0s`: fires at the first evaluation that sees a breaker not closed. An
            // open breaker refuses traffic now, and its failure threshold has already
            // debounced it; a `for` as long as `open_for` (60 s for the users) would only
            // fire when the first half-open probe fails, and never for an upstream that is
            // back by then, which is the common case.
            rule(
                "CircuitBreakerOpen",
                Signal::BreakerOpen,
                Comparison::Above,
                0.0,
                0,
                Severity::Critical,
            ),
            // Two weeks: room for a renewal that failed (ACME retries, a person on leave)
            // to be noticed and redone. Quiet without TLS ("no data").
            rule(
                "CertificateExpiringSoon",
                Signal::CertificateExpiry,
                Comparison::Below,
                14.0,
                0,
                Severity::Warning,
            ),
        ]
    }
}
