//! Typed reads of one scalar on [`Ctx`]: integers, byte sizes, durations, addresses, names,
//! references to upstreams and policies. A wrong value is reported and reads as `None`.

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;

use super::limits::Policies;
use super::reader::{Ctx, Field, Unique, suggest};
use super::upstreams::Upstreams;
use super::values::{
    bound_text, format_bytes, in_range, parse_bytes, parse_duration, parse_int, parse_method,
};
use crate::config::raw::Pos;

impl Ctx<'_> {
    pub(super) fn boolean(&mut self, f: &Field) -> Option<bool> {
        self.parse_with(f, "true or false", |s| match s {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("expected true or false, got \"{s}\"")),
        })
    }

    pub(super) fn one_of<T: Copy>(&mut self, f: &Field, choices: &[(&str, T)]) -> Option<T> {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let expected = format!("one of {}", names.join(", "));
        self.parse_with(f, &expected, |s| {
            choices
                .iter()
                .find(|(n, _)| *n == s)
                .map(|(_, v)| *v)
                .ok_or_else(|| match suggest(s, &names) {
                    Some(m) => format!("expected {expected}, got \"{s}\", did you mean \"{m}\"?"),
                    None => format!("expected {expected}, got \"{s}\""),
                })
        })
    }

    /// An integer in `min..=max`.
    pub(super) fn int(&mut self, f: &Field, min: u64, max: u64) -> Option<u64> {
        self.parse_with(f, "an integer", |s| {
            let n = parse_int(s)?;
            in_range(n, min, max, s)
        })
    }

    /// An integer in `min..=max`, as a `usize`.
    pub(super) fn count(&mut self, f: &Field, min: u64, max: u64) -> Option<usize> {
        self.int(f, min, max).and_then(|n| usize::try_from(n).ok())
    }

    /// A byte size in `min..=max`.
    pub(super) fn bytes(&mut self, f: &Field, min: u64, max: u64) -> Option<u64> {
        self.parse_with(f, "a byte size", |s| {
            let n = parse_bytes(s)?;
            in_range(n, min, max, s).map_err(|e| {
                if min > 1 && n < i128::from(min) {
                    format!(
                        "must be at least {} ({min} bytes), got {s}",
                        format_bytes(min)
                    )
                } else if n > i128::from(max) {
                    format!(
                        "must be at most {} ({max} bytes), got {s}",
                        format_bytes(max)
                    )
                } else {
                    e
                }
            })
        })
    }

    /// A duration greater than 0.
    pub(super) fn duration(&mut self, f: &Field) -> Option<Duration> {
        self.parse_with(f, "a duration", parse_duration)
    }

    /// A duration greater than 0 and at most `max`: for waits a request meets that are not
    /// its own timeouts (each rate-limited request waits up to `redis.timeout` while Redis
    /// is down; a retried one waits its backoff).
    pub(super) fn duration_at_most(&mut self, f: &Field, max: Duration) -> Option<Duration> {
        self.parse_with(f, "a duration", |s| {
            let d = parse_duration(s)?;
            if d > max {
                return Err(format!("must be at most {}, got \"{s}\"", bound_text(max)));
            }
            Ok(d)
        })
    }

    /// A duration, 0 allowed (`0s`).
    pub(super) fn duration_or_zero(&mut self, f: &Field) -> Option<Duration> {
        self.parse_with(f, "a duration", |s| {
            let t = s.trim();
            // A bare 0 is 0 in every unit, so it is not the guess a bare 30 would be.
            if t == "0" || humantime::parse_duration(t).is_ok_and(|d| d.is_zero()) {
                Ok(Duration::ZERO)
            } else {
                parse_duration(s)
            }
        })
    }

    /// A duration, or `off` for none.
    pub(super) fn duration_or_off(&mut self, f: &Field) -> Option<Option<Duration>> {
        self.parse_with(f, "a duration or off", |s| {
            if s == "off" {
                Ok(None)
            } else {
                parse_duration(s).map(Some)
            }
        })
    }

    pub(super) fn socket_addr(&mut self, f: &Field) -> Option<SocketAddr> {
        self.parse_with(f, "an address", |s| {
            s.parse().map_err(|_| {
                format!("expected an address like \"0.0.0.0:8080\" or \"[::1]:8080\", got \"{s}\"")
            })
        })
    }

    pub(super) fn log_filter(&mut self, f: &Field) -> Option<String> {
        self.parse_with(f, "a log level", |s| {
            if s.trim().is_empty() {
                return Err("must not be empty (for example \"info\")".into());
            }
            tracing_subscriber::EnvFilter::try_new(s)
                .map(|_| s.to_owned())
                .map_err(|e| format!("invalid log filter \"{s}\": {e}"))
        })
    }

    /// Listener and upstream names: they end up in metrics and logs.
    pub(super) fn name(&mut self, f: &Field, what: &str) -> Option<String> {
        let name = self.text(f, "a name")?;
        self.check_name(&name, f.pos(), &f.path, what)
            .then_some(name)
    }

    pub(super) fn check_name(&mut self, name: &str, pos: Pos, path: &str, what: &str) -> bool {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            self.report(
                pos,
                path,
                format!(
                    "invalid {what} name \"{name}\": use letters, digits, \"_\" and \"-\" only"
                ),
            );
        }
        ok
    }

    /// Route names may also hold the `.` of the default `<listener>.<index>`.
    pub(super) fn route_name(&mut self, f: &Field) -> Option<String> {
        self.parse_with(f, "a name", |s| {
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                Ok(s.to_owned())
            } else {
                Err(format!(
                    "invalid route name \"{s}\": use letters, digits, \"_\", \"-\" and \".\" only"
                ))
            }
        })
    }

    pub(super) fn upstream_ref(&mut self, f: &Field, upstreams: &Upstreams) -> Option<String> {
        let name = self.text(f, "an upstream name")?;
        if let Some(known) = &upstreams.known
            && !known.contains(&name)
        {
            let message = if known.is_empty() {
                format!("unknown upstream \"{name}\" (no upstreams are defined)")
            } else {
                format!("unknown upstream \"{name}\" (known: {})", known.join(", "))
            };
            self.report(f.pos(), &f.path, message);
            return None;
        }
        Some(name)
    }

    /// A route's `rate_limits`: known policy names, each once.
    pub(super) fn policy_refs(&mut self, f: &Field, policies: &Policies) -> Option<Vec<String>> {
        let items = self.list(f, "a list of rate limit policy names")?;
        let mut seen = Unique::default();
        let mut out = Vec::new();
        for item in &items {
            let Some(name) = self.text(item, "a policy name") else {
                continue;
            };
            if !policies.known.contains(&name) {
                let message = if policies.known.is_empty() {
                    format!("unknown rate limit policy \"{name}\" (no `rate_limits` are defined)")
                } else {
                    format!(
                        "unknown rate limit policy \"{name}\" (known: {})",
                        policies.known.join(", ")
                    )
                };
                self.report(item.pos(), &item.path, message);
                continue;
            }
            if seen.insert(self, &name, item, "rate limit policy") {
                out.push(name);
            }
        }
        Some(out)
    }

    pub(super) fn methods(&mut self, f: &Field) -> Option<Vec<Method>> {
        let items = self.list(f, "a list of HTTP methods")?;
        if items.is_empty() {
            self.report(
                f.pos(),
                &f.path,
                "must list at least one method (leave `methods` out to allow any)",
            );
            return None;
        }
        let mut seen = Unique::default();
        let mut out = Vec::new();
        let mut ok = true;
        for item in &items {
            match self.parse_with(item, "an HTTP method", parse_method) {
                Some(m) => {
                    if seen.insert(self, m.as_str(), item, "method") {
                        out.push(m);
                    } else {
                        ok = false;
                    }
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::validate::test_support::*;

    #[test]
    fn wrong_type() {
        let p = problems(
            "
            admin: [127.0.0.1:9901]
            listeners:
              - name: {first: inbound}
                listen: 0.0.0.0:8080
                routes: backend
            upstreams:
              backend:
                endpoints: http://127.0.0.1:3001
            ",
        );
        assert_eq!(p.len(), 4, "{p:#?}");
        check(&p[0], 1, 8, "admin", "expected a mapping, found a list");
        check(
            &p[1],
            3,
            11,
            "listeners[0].name",
            "expected a name, found a mapping",
        );
        check(
            &p[2],
            5,
            13,
            "listeners[0].routes",
            "expected a list of routes, found a string",
        );
        check(
            &p[3],
            8,
            16,
            "upstreams.backend.endpoints",
            "expected a list of URLs, found a string",
        );
    }

    #[test]
    fn booleans_are_true_or_false() {
        let p = problems(&format!(
            "{MINIMAL}\n        logging: {{access_log: yes}}\n"
        ));
        check(
            &p[0],
            10,
            23,
            "logging.access_log",
            "expected true or false, got \"yes\"",
        );
    }

    #[test]
    fn zero_and_negative_limits() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                max_connections: 0
                max_headers: -3
                max_header_bytes: 4KiB
                http2:
                  max_concurrent_streams: 5000000000
                  max_pending_accept_reset_streams: abc
                  max_local_error_reset_streams: 1.5
                routes:
                  - upstream: backend
                    max_body: -1MiB
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
                pool: {max_idle_per_endpoint: -1}
            ",
        );
        assert_eq!(p.len(), 8, "{p:#?}");
        check(
            &p[0],
            4,
            22,
            "listeners[0].max_connections",
            "must be greater than 0, got 0",
        );
        check(
            &p[1],
            5,
            18,
            "listeners[0].max_headers",
            "must be greater than 0, got -3",
        );
        check(
            &p[2],
            6,
            23,
            "listeners[0].max_header_bytes",
            "must be at least 8KiB (8192 bytes), got 4KiB",
        );
        check(
            &p[3],
            8,
            31,
            "listeners[0].http2.max_concurrent_streams",
            "must be at most 10000, got 5000000000",
        );
        check(
            &p[4],
            9,
            41,
            "listeners[0].http2.max_pending_accept_reset_streams",
            "expected an integer, got \"abc\"",
        );
        check(
            &p[5],
            10,
            38,
            "listeners[0].http2.max_local_error_reset_streams",
            "expected an integer, got \"1.5\"",
        );
        check(
            &p[6],
            13,
            19,
            "listeners[0].routes[0].max_body",
            "must be greater than 0, got -1MiB",
        );
        check(
            &p[7],
            17,
            35,
            "upstreams.backend.pool.max_idle_per_endpoint",
            "must be at least 0, got -1",
        );
    }

    #[test]
    fn every_numeric_key_has_an_upper_bound() {
        // (where the key goes, its bound written as accepted, the value just above, message)
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "listener",
                "max_connections: 1000000",
                "max_connections: 1000001",
                "must be at most 1000000, got 1000001",
            ),
            (
                "listener",
                "max_headers: 1000",
                "max_headers: 1001",
                "must be at most 1000, got 1001",
            ),
            (
                "listener",
                "max_header_bytes: 1MiB",
                "max_header_bytes: 1048577",
                "must be at most 1MiB (1048576 bytes), got 1048577",
            ),
            (
                "listener",
                "max_header_bytes: 1MiB",
                "max_header_bytes: 18446744073709551615",
                "must be at most 1MiB (1048576 bytes), got 18446744073709551615",
            ),
            (
                "listener",
                "max_in_flight: 1000000",
                "max_in_flight: 1000001",
                "must be at most 1000000, got 1000001",
            ),
            (
                "listener",
                "http2: { max_concurrent_streams: 10000 }",
                "http2: { max_concurrent_streams: 10001 }",
                "must be at most 10000, got 10001",
            ),
            (
                "listener",
                "http2: { max_pending_accept_reset_streams: 10000 }",
                "http2: { max_pending_accept_reset_streams: 10001 }",
                "must be at most 10000, got 10001",
            ),
            (
                "listener",
                "http2: { max_local_error_reset_streams: 100000 }",
                "http2: { max_local_error_reset_streams: 100001 }",
                "must be at most 100000, got 100001",
            ),
            (
                "listener",
                "header_read_timeout: 365d",
                "header_read_timeout: 366d",
                "must be at most 365 days",
            ),
            (
                "route",
                "max_body: 1GiB",
                "max_body: 1073741825",
                "must be at most 1GiB (1073741824 bytes), got 1073741825",
            ),
            (
                "route",
                "timeouts: { total: 365d }",
                "timeouts: { total: 8761h }",
                "must be at most 365 days",
            ),
            (
                "upstream",
                "pool: { max_idle_per_endpoint: 10000 }",
                "pool: { max_idle_per_endpoint: 10001 }",
                "must be at most 10000, got 10001",
            ),
            (
                "upstream",
                "max_in_flight: 1000000",
                "max_in_flight: 1000001",
                "must be at most 1000000, got 1000001",
            ),
            (
                "upstream",
                "retry: { max_body: 64MiB }",
                "retry: { max_body: 67108865 }",
                "must be at most 64MiB (67108864 bytes), got 67108865",
            ),
            (
                "upstream",
                "retry: { attempts: 10 }",
                "retry: { attempts: 11 }",
                "must be at most 10, got 11",
            ),
            (
                "upstream",
                "retry: { budget: { min_per_s: 1000000 } }",
                "retry: { budget: { min_per_s: 1000001 } }",
                "must be at most 1000000, got 1000001",
            ),
            (
                "upstream",
                "circuit_breaker: { failures: 1000000 }",
                "circuit_breaker: { failures: 1000001 }",
                "must be at most 1000000, got 1000001",
            ),
            (
                "upstream",
                "health_check: { unhealthy_interval: 365d }",
                "health_check: { unhealthy_interval: 8761h }",
                "must be at most 365 days",
            ),
            (
                "upstream",
                "health_check: { fast_interval: 1m }",
                "health_check: { fast_interval: 61s }",
                "must be at most 1m, got \"61s\"",
            ),
            (
                "upstream",
                "ejection: { consecutive_failures: 1000000 }",
                "ejection: { consecutive_failures: 1000001 }",
                "must be at most 1000000, got 1000001",
            ),
            (
                "top",
                "replicas: 10000",
                "replicas: 10001",
                "must be at most 10000, got 10001",
            ),
            (
                "top",
                "redis: { url: \"redis://127.0.0.1\", pool: { max_size: 1024 } }",
                "redis: { url: \"redis://127.0.0.1\", pool: { max_size: 1025 } }",
                "must be at most 1024, got 1025",
            ),
            (
                "top",
                "rate_limits: { a: { points: 1000000000000000 } }",
                "rate_limits: { a: { points: 1000000000000001 } }",
                "must be at most 1000000000000000",
            ),
            (
                "top",
                "drain: { timeout: 365d, accept_grace: 364d }",
                "drain: { timeout: 366d }",
                "must be at most 365 days",
            ),
            // Waits a request may meet that are not its own timeouts, found by the property
            // test: a Redis that was down held a request for redis.timeout (8 months).
            (
                "top",
                "redis: { url: \"redis://127.0.0.1\", timeout: 5s }",
                "redis: { url: \"redis://127.0.0.1\", timeout: 5001ms }",
                "must be at most 5s, got \"5001ms\"",
            ),
            (
                "top",
                "redis: { url: \"redis://127.0.0.1\", connect_timeout: 1m }",
                "redis: { url: \"redis://127.0.0.1\", connect_timeout: 61s }",
                "must be at most 1m, got \"61s\"",
            ),
            (
                "upstream",
                "retry: { backoff: { base: 1m, max: 1m } }",
                "retry: { backoff: { base: 61s } }",
                "must be at most 1m, got \"61s\"",
            ),
            (
                "upstream",
                "retry: { backoff: { max: 1m } }",
                "retry: { backoff: { max: 2m } }",
                "must be at most 1m, got \"2m\"",
            ),
            (
                "upstream",
                "retry: { connect_wait: 5m }",
                "retry: { connect_wait: 301s }",
                "must be at most 5m, got \"301s\"",
            ),
        ];
        let text = |place: &str, kv: &str| -> String {
            let (listener, route, upstream, top) = match place {
                "listener" => (kv, "", "", ""),
                "route" => ("", kv, "", ""),
                "upstream" => ("", "", kv, ""),
                _ => ("", "", "", kv),
            };
            format!(
                "listeners:\n  - name: inbound\n    listen: 0.0.0.0:8080\n    {listener}\n    routes:\n      - upstream: backend\n        {route}\nupstreams:\n  backend:\n    endpoints: [\"http://127.0.0.1:3001\"]\n    {upstream}\n{top}\n"
            )
        };
        for (place, at_bound, above, message) in cases {
            let good = text(place, at_bound);
            if let Err(e) = parse(&good) {
                panic!("{at_bound}: refused at its bound: {e}");
            }
            match parse(&text(place, above)) {
                Ok(_) => panic!("{above}: accepted"),
                Err(e) => assert!(
                    e.problems.len() == 1 && e.problems[0].message.contains(message),
                    "{above}: {e}"
                ),
            }
        }
    }
}
