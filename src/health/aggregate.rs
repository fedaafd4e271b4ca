//! From the cached check results to what `/health` and `/readyz` answer. Pure: reads the
//! slots, never probes.
//!
//! - a check is unhealthy when its verdict is down (or it has no result yet);
//! - `/health` is `unhealthy` (503) when a critical check is unhealthy, `degraded` (200) when
//!   any check is degraded or a non-critical one is unhealthy, else `healthy` (200);
//! - a breaker that is not CLOSED makes a healthy `/health` `degraded` (still 200) and is
//!   listed under `breakers`;
//! - ready = no critical check unhealthy (and not draining, which the caller adds; nor an
//!   open breaker when `readiness.breaker_open: not_ready`).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Check, Status, Value, View};
use crate::error::push_json_string;

/// An upstream's status from its endpoints' statuses.
pub(crate) fn combine_endpoints(statuses: &[Status]) -> Status {
    let up = statuses.iter().filter(|s| **s != Status::Unhealthy).count();
    if statuses.is_empty() || up == 0 {
        Status::Unhealthy
    } else if up < statuses.len() || statuses.contains(&Status::Degraded) {
        Status::Degraded
    } else {
        Status::Healthy
    }
}

pub(crate) struct Summary {
    pub status: Status,
    /// Names of the critical checks that are unhealthy.
    pub failing_critical: Vec<String>,
}

impl Summary {
    pub(crate) fn ready(&self) -> bool {
        self.failing_critical.is_empty()
    }
}

pub(crate) fn summarize(checks: &[std::sync::Arc<Check>]) -> Summary {
    let statuses: Vec<(&Check, Status)> = checks.iter().map(|c| (&**c, c.status())).collect();
    summarize_statuses(&statuses)
}

fn summarize_statuses(statuses: &[(&Check, Status)]) -> Summary {
    let failing_critical: Vec<String> = statuses
        .iter()
        .filter(|(c, s)| c.critical && *s == Status::Unhealthy)
        .map(|(c, _)| c.name.clone())
        .collect();
    let status = if !failing_critical.is_empty() {
        Status::Unhealthy
    } else if statuses.iter().any(|(_, s)| *s != Status::Healthy) {
        Status::Degraded
    } else {
        Status::Healthy
    };
    Summary {
        status,
        failing_critical,
    }
}

/// Who reads a `/health` document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audience {
    /// Anyone (`/health`, a listener's `health_path`): states, latencies and counts; no
    /// error text (a driver's message names hosts, users, databases) and no address.
    Public,
    /// Whoever may use the admin API (`/admin/health`): everything the checks found.
    Operator,
}

/// Details that say nothing about where things are; any other (`server`, and whatever a
/// check adds later) is for the operator only.
const PUBLIC_DETAILS: &[&str] = &[
    "role",
    "connections_used_pct",
    "connections",
    "max_connections",
    "tls",
    "ping_ms",
    "used_pct",
    "rss_bytes",
    "limit_bytes",
    "limit_source",
    "http_status",
];

/// A breaker that is not CLOSED, as `/health` lists it.
#[derive(Debug, Clone)]
pub(crate) struct BreakerReport {
    pub upstream: String,
    /// None: the breaker every route of the upstream shares.
    pub route: Option<String>,
    pub state: crate::upstream::breaker::State,
    /// When it entered `state`.
    pub since: SystemTime,
}

#[cfg(test)]
/// The `/health` body and its summary.
pub(crate) fn render(
    checks: &[std::sync::Arc<Check>],
    uptime: Duration,
    draining: bool,
    audience: Audience,
) -> (Summary, String) {
    render_with(checks, &[], uptime, draining, audience)
}

/// As `render`, listing `breakers` (those not CLOSED): any makes a healthy answer
/// `degraded`. An unhealthy one stays so: a breaker never makes `/health` 503, since the
/// process serves every other route.
pub(crate) fn render_with(
    checks: &[std::sync::Arc<Check>],
    breakers: &[BreakerReport],
    uptime: Duration,
    draining: bool,
    audience: Audience,
) -> (Summary, String) {
    let now = Instant::now();
    let statuses: Vec<(&Check, Status)> = checks.iter().map(|c| (&**c, c.status())).collect();
    let mut summary = summarize_statuses(&statuses);
    if summary.status == Status::Healthy && !breakers.is_empty() {
        summary.status = Status::Degraded;
    }
    let mut out = String::with_capacity(256 + 200 * checks.len());
    out.push_str("{\"status\":\"");
    out.push_str(summary.status.as_str());
    out.push_str("\",\"timestamp\":\"");
    let _ = write!(
        out,
        "{}",
        humantime::format_rfc3339_millis(SystemTime::now())
    );
    let _ = write!(out, "\",\"uptime_s\":{}", uptime.as_secs());
    let _ = write!(out, ",\"draining\":{draining}");
    out.push_str(",\"checks\":{");
    for (i, (check, status)) in statuses.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, &check.name);
        out.push(':');
        push_check(&mut out, check, *status, now, audience);
    }
    out.push_str("},\"breakers\":[");
    for (i, b) in breakers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"upstream\":");
        push_json_string(&mut out, &b.upstream);
        out.push_str(",\"route\":");
        match &b.route {
            Some(r) => push_json_string(&mut out, r),
            None => out.push_str("null"),
        }
        let _ = write!(
            out,
            ",\"state\":\"{}\",\"since\":\"{}\"}}",
            b.state.as_str(),
            humantime::format_rfc3339_millis(b.since)
        );
    }
    out.push_str("]}\n");
    (summary, out)
}

fn push_check(out: &mut String, check: &Check, status: Status, now: Instant, audience: Audience) {
    let _ = write!(
        out,
        "{{\"status\":\"{}\",\"critical\":{}",
        status.as_str(),
        check.critical
    );
    match check.slots.as_slice() {
        // A dependency: its one result, flat.
        [(key, slot)] if key.is_empty() => push_view_fields(out, &slot.load(), now, audience),
        // An upstream: the slowest endpoint's latency, and each endpoint.
        slots => {
            let views: Vec<_> = slots.iter().map(|(k, s)| (k, s.load_full())).collect();
            let slowest = views.iter().filter_map(|(_, v)| v.latency).max();
            if let Some(l) = slowest {
                push_latency(out, l);
            }
            let up = views
                .iter()
                .filter(|(_, v)| v.status != Status::Unhealthy)
                .count();
            let _ = write!(
                out,
                ",\"healthy_endpoints\":{up},\"total_endpoints\":{}",
                views.len()
            );
            if audience == Audience::Public {
                // The endpoints are keyed by their addresses.
                out.push('}');
                return;
            }
            if status == Status::Unhealthy
                && let Some(e) = views.iter().find_map(|(_, v)| v.error.as_deref())
            {
                out.push_str(",\"error\":");
                push_json_string(out, e);
            }
            out.push_str(",\"endpoints\":{");
            for (i, (key, view)) in views.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_string(out, key);
                let _ = write!(out, ":{{\"status\":\"{}\"", view.status.as_str());
                push_view_fields(out, view, now, audience);
                out.push('}');
            }
            out.push('}');
        }
    }
    out.push('}');
}

fn push_latency(out: &mut String, d: Duration) {
    let _ = write!(out, ",\"latency_ms\":{:.1}", d.as_secs_f64() * 1000.0);
}

fn push_view_fields(out: &mut String, v: &View, now: Instant, audience: Audience) {
    if let Some(l) = v.latency {
        push_latency(out, l);
    }
    if let Some(at) = v.checked_at {
        let _ = write!(
            out,
            ",\"checked_ms_ago\":{}",
            now.saturating_duration_since(at).as_millis()
        );
    }
    if let Some(e) = &v.error
        && audience == Audience::Operator
    {
        // While a streak has not flipped the verdict yet, the failure is shown apart.
        out.push_str(if v.status == Status::Healthy {
            ",\"last_error\":"
        } else {
            ",\"error\":"
        });
        push_json_string(out, e);
    }
    if v.failures > 0 {
        let _ = write!(out, ",\"consecutive_failures\":{}", v.failures);
    }
    for (k, value) in &v.details {
        if audience == Audience::Public && !PUBLIC_DETAILS.contains(k) {
            continue;
        }
        out.push(',');
        push_json_string(out, k);
        out.push(':');
        push_value(out, value);
    }
}

fn push_value(out: &mut String, v: &Value) {
    match v {
        Value::Str(s) => push_json_string(out, s),
        Value::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Num(x) if x.is_finite() => {
            let _ = write!(out, "{x:.1}");
        }
        Value::Num(_) => out.push_str("null"),
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Object(fields) => {
            out.push('{');
            for (i, (k, v)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_string(out, k);
                out.push(':');
                push_value(out, v);
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arc_swap::ArcSwap;

    use super::*;
    use crate::health::counter::Verdict;

    fn check(name: &str, critical: bool, statuses: &[Status]) -> Arc<Check> {
        let slots = statuses
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let key = if statuses.len() == 1 {
                    String::new()
                } else {
                    format!("http://10.0.0.{i}:80/")
                };
                let view = View {
                    verdict: if *s == Status::Unhealthy {
                        Verdict::Down
                    } else {
                        Verdict::Up
                    },
                    status: *s,
                    latency: Some(Duration::from_millis(3)),
                    error: (*s != Status::Healthy).then(|| "boom \"x\"".to_string()),
                    details: vec![("role", Value::Str("primary".into()))],
                    checked_at: Some(Instant::now()),
                    failures: u32::from(*s == Status::Unhealthy),
                };
                (key, Arc::new(ArcSwap::from_pointee(view)))
            })
            .collect();
        Arc::new(Check {
            name: name.into(),
            critical,
            slots,
        })
    }

    #[test]
    fn endpoints_combine() {
        use Status::*;
        assert_eq!(combine_endpoints(&[Healthy, Healthy]), Healthy);
        assert_eq!(combine_endpoints(&[Healthy, Unhealthy]), Degraded);
        assert_eq!(combine_endpoints(&[Degraded]), Degraded);
        assert_eq!(combine_endpoints(&[Unhealthy, Unhealthy]), Unhealthy);
        assert_eq!(combine_endpoints(&[]), Unhealthy);
    }

    #[test]
    fn a_failing_critical_check_is_unhealthy_a_non_critical_one_degrades() {
        use Status::*;
        let s = summarize(&[
            check("postgres", true, &[Healthy]),
            check("redis", false, &[Unhealthy]),
        ]);
        assert_eq!((s.status, s.ready()), (Degraded, true));
        let s = summarize(&[
            check("postgres", true, &[Unhealthy]),
            check("redis", false, &[Healthy]),
        ]);
        assert_eq!((s.status, s.ready()), (Unhealthy, false));
        assert_eq!(s.failing_critical, vec!["postgres".to_string()]);
        // A warning on a critical check does not make the process unready.
        let s = summarize(&[check("postgres", true, &[Degraded])]);
        assert_eq!((s.status, s.ready()), (Degraded, true));
        let s = summarize(&[check("memory", false, &[Healthy])]);
        assert_eq!((s.status, s.ready()), (Healthy, true));
        let s = summarize(&[]);
        assert_eq!((s.status, s.ready()), (Healthy, true));
    }

    #[test]
    fn json_shape() {
        use Status::*;
        let (_, body) = render(
            &[
                check("postgres", true, &[Unhealthy]),
                check("upstream:backend", true, &[Healthy, Unhealthy]),
            ],
            Duration::from_secs(42),
            false,
            Audience::Operator,
        );
        assert!(
            body.starts_with("{\"status\":\"unhealthy\",\"timestamp\":\""),
            "{body}"
        );
        assert!(
            body.contains("\"uptime_s\":42,\"draining\":false,\"checks\":{"),
            "{body}"
        );
        assert!(
            body.contains(
                "\"postgres\":{\"status\":\"unhealthy\",\"critical\":true,\"latency_ms\":3.0,"
            ),
            "{body}"
        );
        assert!(body.contains("\"error\":\"boom \\\"x\\\"\""), "{body}");
        assert!(body.contains("\"role\":\"primary\""), "{body}");
        assert!(
            body.contains("\"upstream:backend\":{\"status\":\"degraded\",\"critical\":true,\"latency_ms\":3.0,\"healthy_endpoints\":1,\"total_endpoints\":2,\"endpoints\":{\"http://10.0.0.0:80/\":{\"status\":\"healthy\""),
            "{body}"
        );
        assert!(body.ends_with("}},\"breakers\":[]}\n"), "{body}");
    }

    #[test]
    fn a_breaker_not_closed_degrades_a_healthy_answer_and_is_listed() {
        use Status::*;
        let open = BreakerReport {
            upstream: "backend".into(),
            route: Some("chat".into()),
            state: crate::upstream::breaker::State::Open,
            since: SystemTime::UNIX_EPOCH,
        };
        let checks = [check("memory", false, &[Healthy])];
        let (s, body) = render_with(
            &checks,
            std::slice::from_ref(&open),
            Duration::ZERO,
            false,
            Audience::Public,
        );
        assert_eq!((s.status, s.ready()), (Degraded, true));
        assert!(
            body.ends_with(",\"breakers\":[{\"upstream\":\"backend\",\"route\":\"chat\",\"state\":\"open\",\"since\":\"1970-01-01T00:00:00.000Z\"}]}\n"),
            "{body}"
        );
        // Never worse than degraded: an unhealthy answer stays unhealthy, nothing more.
        let checks = [check("postgres", true, &[Unhealthy])];
        let (s, _) = render_with(&checks, &[open], Duration::ZERO, false, Audience::Public);
        assert_eq!(s.status, Unhealthy);
    }
}
