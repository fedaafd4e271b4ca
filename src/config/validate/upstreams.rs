//! `upstreams.<name>`: endpoints, pool, TLS, and the resilience keys (load balancing, circuit
//! breaker, outlier ejection, retries) an upstream shares with the routes that override them.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Uri;

use super::MAX_IN_FLIGHT;
use super::reader::{Ctx, Field, MapReader, Unique};
use super::values::{bound_text, parse_duration, parse_endpoint};
use crate::config::raw::child_path;
use crate::config::upstream::{IdentityError, load_client_identity};
use crate::config::{
    BreakerConfig, BreakerScope, EjectionConfig, FailureRate, LoadBalancing, PoolConfig,
    Resilience, RetryConfig, RetryOn, UpstreamClient, UpstreamConfig, UpstreamTls,
};

/// Bodies kept in memory for a retry.
pub(super) const MAX_RETRY_BODY_BYTES: u64 = 64 << 20;
pub(super) const MAX_IDLE_PER_ENDPOINT: u64 = 10_000;
/// A retried request waits its backoff (the route's `total`, when set, cuts it shorter).
pub(super) const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);
/// A request waits this long for an upstream that refuses connections, holding a client.
pub(super) const MAX_CONNECT_WAIT: Duration = Duration::from_secs(300);

/// The decoded upstreams, and the names written in the file (even ones with problems) so a
/// route naming a broken upstream is not reported twice.
pub(super) struct Upstreams {
    pub(super) configs: BTreeMap<String, UpstreamConfig>,
    /// None when the section itself is missing or not a mapping: then nothing is checked.
    pub(super) known: Option<Vec<String>>,
}

pub(super) fn upstreams(ctx: &mut Ctx, f: Option<Field>) -> Upstreams {
    let mut out = Upstreams {
        configs: BTreeMap::new(),
        known: None,
    };
    let Some(f) = f else { return out };
    let Some(entries) = ctx.entries(&f) else {
        return out;
    };
    if entries.is_empty() {
        ctx.report(f.pos(), &f.path, "must define at least one upstream");
    }
    for e in entries {
        let path = child_path(&f.path, &e.key);
        ctx.check_name(&e.key, e.key_pos, &path, "upstream");
        let config = upstream(ctx, Field::at(&e.value, path), &e.key);
        out.configs.insert(e.key.clone(), config);
    }
    out.known = Some(out.configs.keys().cloned().collect());
    out
}

pub(super) fn upstream(ctx: &mut Ctx, f: Field, name: &str) -> UpstreamConfig {
    let mut m = MapReader::open(ctx, Some(f));
    let (endpoints, groups, sticky) = super::groups::endpoints_or_groups(ctx, &mut m);
    let tls = upstream_tls_settings(ctx, m.optional("tls"), &endpoints);
    let config = UpstreamConfig {
        name: name.to_owned(),
        endpoints,
        groups,
        sticky,
        connect_timeout: m
            .read(ctx, "connect_timeout", Ctx::duration)
            .unwrap_or(UpstreamConfig::DEFAULT_CONNECT_TIMEOUT),
        pool: pool(ctx, m.optional("pool")),
        client: m
            .read(ctx, "client", |ctx, f| {
                ctx.one_of(
                    f,
                    &[
                        ("rampart", UpstreamClient::Rampart),
                        ("hyper", UpstreamClient::Hyper),
                    ],
                )
            })
            .unwrap_or_default(),
        tls,
        resilience: resilience(ctx, &mut m),
    };
    m.finish(ctx);
    config
}

/// An upstream's `tls:`. Refused on an upstream whose endpoints are all http://: settings
/// that would be silently ignored (a client certificate, a pinned name) are a mistake in
/// the file, not a default.
fn upstream_tls_settings(ctx: &mut Ctx, f: Option<Field>, endpoints: &[Uri]) -> UpstreamTls {
    if let Some(f) = &f
        && !endpoints.is_empty()
        && endpoints
            .iter()
            .all(|e| e.scheme() != Some(&http::uri::Scheme::HTTPS))
    {
        ctx.report(
            f.pos(),
            &f.path,
            "applies to https:// endpoints, and every endpoint of this upstream is http://",
        );
    }
    let mut m = MapReader::open(ctx, f);
    let ca_file = m.read(ctx, "ca_file", ca_file);
    let server_name = m.read(ctx, "server_name", |ctx, f| {
        let name = ctx.text(f, "a host name")?;
        match rustls::pki_types::ServerName::try_from(name.as_str()) {
            Ok(_) => Some(name),
            Err(_) => {
                ctx.report(
                    f.pos(),
                    &f.path,
                    format!("{name:?} is not a DNS name or IP address"),
                );
                None
            }
        }
    });
    let cert = m.optional("client_cert");
    let key = m.optional("client_key");
    let path = |ctx: &mut Ctx, f: &Field| ctx.text(f, "a file path").map(std::path::PathBuf::from);
    let (client_cert, client_key) = match (&cert, &key) {
        (Some(cf), Some(kf)) => match (path(ctx, cf), path(ctx, kf)) {
            (Some(c), Some(k)) => match load_client_identity(&c, &k) {
                Ok(_) => (Some(c), Some(k)),
                Err(IdentityError::Cert(e)) => {
                    ctx.report(cf.pos(), &cf.path, e);
                    (None, None)
                }
                Err(IdentityError::Key(e)) => {
                    ctx.report(kf.pos(), &kf.path, e);
                    (None, None)
                }
            },
            _ => (None, None),
        },
        (Some(one), None) | (None, Some(one)) => {
            let other = if key.is_none() {
                "client_key"
            } else {
                "client_cert"
            };
            ctx.report(
                one.pos(),
                &one.path,
                format!("needs {other} beside it: a client certificate is presented with its key"),
            );
            (None, None)
        }
        (None, None) => (None, None),
    };
    let insecure_skip_verify = m
        .read(ctx, "insecure_skip_verify", Ctx::boolean)
        .unwrap_or(false);
    let http2 = m.read(ctx, "http2", Ctx::boolean).unwrap_or(false);
    m.finish(ctx);
    UpstreamTls {
        ca_file,
        server_name,
        client_cert,
        client_key,
        insecure_skip_verify,
        http2,
    }
}

/// `tls.ca_file`, checked here so `rampart check` catches it, not the first https request.
fn ca_file(ctx: &mut Ctx, f: &Field) -> Option<std::path::PathBuf> {
    let path = ctx.text(f, "a file path")?;
    match std::fs::read_to_string(&path) {
        Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Some(path.into()),
        Ok(_) => {
            ctx.report(
                f.pos(),
                &f.path,
                format!("{path}: no PEM certificate in it"),
            );
            None
        }
        Err(e) => {
            ctx.report(f.pos(), &f.path, format!("cannot read {path}: {e}"));
            None
        }
    }
}

/// A dependency's `tls:` (postgres), which only takes `ca_file`.
pub(super) fn upstream_tls(ctx: &mut Ctx, f: Option<Field>) -> Option<std::path::PathBuf> {
    let mut m = MapReader::open(ctx, f);
    let ca_file = m.read(ctx, "ca_file", ca_file);
    m.finish(ctx);
    ca_file
}

pub(super) fn endpoints(ctx: &mut Ctx, f: &Field) -> Vec<Uri> {
    endpoints_unique(ctx, f, &mut Unique::default())
}

/// `endpoints`, each one new to `seen` (which the groups of an upstream share).
pub(super) fn endpoints_unique(ctx: &mut Ctx, f: &Field, seen: &mut Unique) -> Vec<Uri> {
    let Some(items) = ctx.list(f, "a list of URLs") else {
        return Vec::new();
    };
    if items.is_empty() {
        ctx.report(f.pos(), &f.path, "must list at least one endpoint");
    }
    let mut out = Vec::new();
    for item in &items {
        if let Some(uri) = ctx.parse_with(item, "a URL", parse_endpoint)
            && seen.insert(ctx, &uri.to_string(), item, "endpoint")
        {
            out.push(uri);
        }
    }
    out
}

pub(super) fn pool(ctx: &mut Ctx, f: Option<Field>) -> PoolConfig {
    let mut m = MapReader::open(ctx, f);
    let config = PoolConfig {
        idle_timeout: m
            .read(ctx, "idle_timeout", Ctx::duration)
            .unwrap_or(PoolConfig::DEFAULT_IDLE_TIMEOUT),
        max_idle_per_endpoint: m
            .read(ctx, "max_idle_per_endpoint", |ctx, f| {
                ctx.count(f, 0, MAX_IDLE_PER_ENDPOINT)
            })
            .unwrap_or(PoolConfig::DEFAULT_MAX_IDLE_PER_ENDPOINT),
    };
    m.finish(ctx);
    config
}

pub(super) fn resilience(ctx: &mut Ctx, m: &mut MapReader) -> Resilience {
    Resilience {
        load_balancing: m
            .read(ctx, "load_balancing", |ctx, f| {
                ctx.one_of(
                    f,
                    &[
                        ("round_robin", LoadBalancing::RoundRobin),
                        ("least_outstanding", LoadBalancing::LeastOutstanding),
                    ],
                )
            })
            .unwrap_or(LoadBalancing::RoundRobin),
        circuit_breaker: breaker(ctx, m.optional("circuit_breaker")),
        ejection: ejection(ctx, m.optional("ejection")),
        retry: retry(ctx, m.optional("retry")),
        max_in_flight: m.read(ctx, "max_in_flight", |ctx, f| {
            ctx.count(f, 1, MAX_IN_FLIGHT)
        }),
        health_check: m
            .optional("health_check")
            .map(|f| super::health::upstream_health_check(ctx, f)),
    }
}

pub(super) fn small_count(ctx: &mut Ctx, f: &Field) -> Option<u32> {
    ctx.int(f, 1, 1_000_000).and_then(|n| u32::try_from(n).ok())
}

pub(super) fn breaker(ctx: &mut Ctx, f: Option<Field>) -> BreakerConfig {
    let d = BreakerConfig::default();
    let mut m = MapReader::open(ctx, f);
    let open_for = m.read(ctx, "open_for", Ctx::duration).unwrap_or(d.open_for);
    let max_field = m.optional("max_open_for");
    let max_open_for = max_field
        .as_ref()
        .and_then(|f| ctx.duration(f))
        .unwrap_or(d.max_open_for)
        .max(open_for);
    let config = BreakerConfig {
        scope: m
            .read(ctx, "scope", |ctx, f| {
                ctx.one_of(
                    f,
                    &[
                        ("route", BreakerScope::Route),
                        ("upstream", BreakerScope::Upstream),
                    ],
                )
            })
            .unwrap_or_default(),
        failures: m.read(ctx, "failures", small_count).unwrap_or(d.failures),
        open_for,
        max_open_for,
        half_open_successes: m
            .read(ctx, "half_open_successes", small_count)
            .unwrap_or(d.half_open_successes),
        half_open_max_probes: m
            .read(ctx, "half_open_max_probes", small_count)
            .unwrap_or(d.half_open_max_probes),
        failure_rate: m.optional("failure_rate").map(|f| failure_rate(ctx, f)),
        count_500: m
            .read(ctx, "count_500", Ctx::boolean)
            .unwrap_or(d.count_500),
        count_backoff: m
            .read(ctx, "count_backoff", Ctx::boolean)
            .unwrap_or(d.count_backoff),
    };
    m.finish(ctx);
    config
}

pub(super) fn failure_rate(ctx: &mut Ctx, f: Field) -> FailureRate {
    let d = FailureRate::default();
    let mut m = MapReader::open(ctx, Some(f));
    let config = FailureRate {
        threshold: m
            .read(ctx, "threshold", |ctx, f| {
                ctx.parse_with(f, "a percentage", parse_percent)
            })
            .unwrap_or(d.threshold),
        window: m.read(ctx, "window", Ctx::duration).unwrap_or(d.window),
        min_calls: m.read(ctx, "min_calls", small_count).unwrap_or(d.min_calls),
    };
    m.finish(ctx);
    config
}

/// "50%" -> 0.5; more than 0 and at most 100 %.
pub(super) fn parse_percent(s: &str) -> Result<f64, String> {
    let n: f64 = s
        .strip_suffix('%')
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("expected a percentage like \"50%\", got \"{s}\""))?;
    if n > 0.0 && n <= 100.0 {
        Ok(n / 100.0)
    } else {
        Err(format!("must be more than 0% and at most 100%, got {s}"))
    }
}

pub(super) fn ejection(ctx: &mut Ctx, f: Option<Field>) -> EjectionConfig {
    let d = EjectionConfig::default();
    let mut m = MapReader::open(ctx, f);
    let base_ejection = m
        .read(ctx, "base_ejection", Ctx::duration)
        .unwrap_or(d.base_ejection);
    let config = EjectionConfig {
        consecutive_failures: m
            .read(ctx, "consecutive_failures", small_count)
            .unwrap_or(d.consecutive_failures),
        max_ejection: m
            .read(ctx, "max_ejection", Ctx::duration)
            .unwrap_or(d.max_ejection)
            .max(base_ejection),
        base_ejection,
    };
    m.finish(ctx);
    config
}

pub(super) fn retry(ctx: &mut Ctx, f: Option<Field>) -> RetryConfig {
    let d = RetryConfig::default();
    let mut m = MapReader::open(ctx, f);
    let mut backoff = MapReader::open(ctx, m.optional("backoff"));
    let backoff_base = backoff
        .read(ctx, "base", |ctx, f| {
            ctx.duration_at_most(f, MAX_RETRY_BACKOFF)
        })
        .unwrap_or(d.backoff_base);
    let backoff_max = backoff
        .read(ctx, "max", |ctx, f| {
            ctx.duration_at_most(f, MAX_RETRY_BACKOFF)
        })
        .unwrap_or(d.backoff_max)
        .max(backoff_base);
    backoff.finish(ctx);
    let mut budget = MapReader::open(ctx, m.optional("budget"));
    let budget_ratio = budget
        .read(ctx, "ratio", |ctx, f| {
            ctx.parse_with(f, "a ratio", |s| match s.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(format!("expected a ratio between 0 and 1, got \"{s}\"")),
            })
        })
        .unwrap_or(d.budget_ratio);
    let budget_min_per_s = budget
        .read(ctx, "min_per_s", |ctx, f| {
            ctx.int(f, 0, 1_000_000).and_then(|n| u32::try_from(n).ok())
        })
        .unwrap_or(d.budget_min_per_s);
    budget.finish(ctx);
    let config = RetryConfig {
        attempts: m
            .read(ctx, "attempts", |ctx, f| {
                ctx.int(f, 1, 10).and_then(|n| u32::try_from(n).ok())
            })
            .unwrap_or(d.attempts),
        backoff_base,
        backoff_max,
        on: m.read(ctx, "on", retry_on).unwrap_or(d.on),
        budget_ratio,
        budget_min_per_s,
        max_body: m
            .read(ctx, "max_body", |ctx, f| {
                ctx.bytes(f, 0, MAX_RETRY_BODY_BYTES)
            })
            .unwrap_or(d.max_body),
        connect_wait: m
            .read(ctx, "connect_wait", |ctx, f| {
                ctx.parse_with(f, "a duration or off", |s| {
                    if s == "off" {
                        return Ok(None);
                    }
                    let d = parse_duration(s)?;
                    if d > MAX_CONNECT_WAIT {
                        return Err(format!(
                            "must be at most {}, got \"{s}\"",
                            bound_text(MAX_CONNECT_WAIT)
                        ));
                    }
                    Ok(Some(d))
                })
            })
            .unwrap_or(d.connect_wait),
    };
    m.finish(ctx);
    config
}

pub(super) fn retry_on(ctx: &mut Ctx, f: &Field) -> Option<Vec<RetryOn>> {
    let items = ctx.list(f, "a list of retry conditions")?;
    let mut out = Vec::new();
    for item in &items {
        let cond = ctx.parse_with(item, "a retry condition", |s| match s {
            "connect_error" => Ok(RetryOn::ConnectError),
            "timeout" => Ok(RetryOn::Timeout),
            "reset" => Ok(RetryOn::Reset),
            code => match code.parse::<u16>() {
                Ok(n) if (500..=599).contains(&n) || n == 429 => Ok(RetryOn::Status(n)),
                _ => Err(format!(
                    "expected connect_error, timeout, reset, 429 or a 5xx status, got \"{s}\""
                )),
            },
        });
        out.extend(cond);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::validate::parse_str;
    use crate::config::validate::test_support::*;
    use std::time::Duration;

    /// Every numeric key refuses the value just above its bound and takes the bound itself:
    /// what `check` accepts must start, serve and reload (tests/it/bounds.rs).
    #[test]
    fn retry_connect_wait_is_a_duration_or_off() {
        let with = |v: &str| {
            parse(&MINIMAL.replace(
                "endpoints: [\"http://127.0.0.1:3001\"]",
                &format!("endpoints: [\"http://127.0.0.1:3001\"]\n            retry: {{ connect_wait: {v} }}"),
            ))
        };
        let wait = |c: Config| c.upstreams["backend"].resilience.retry.connect_wait;
        assert_eq!(wait(parse(MINIMAL).unwrap()), Some(secs(5)));
        assert_eq!(wait(with("off").unwrap()), None);
        assert_eq!(
            wait(with("750ms").unwrap()),
            Some(Duration::from_millis(750))
        );
        let err = with("0s").unwrap_err().to_string();
        assert!(err.contains("connect_wait"), "{err}");
        let err = with("soon").unwrap_err().to_string();
        assert!(err.contains("connect_wait"), "{err}");
    }

    #[test]
    fn upstream_tls_ca_file_must_be_a_readable_pem() {
        only(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: [\"https://127.0.0.1:3001\"]
                tls: { ca_file: /nonexistent/ca.pem }
            ",
            9,
            21,
            "upstreams.backend.tls.ca_file",
            "cannot read /nonexistent/ca.pem",
        );
        let dir = std::env::temp_dir().join(format!("rampart-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let p = problems(&format!(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: [\"https://127.0.0.1:3001\"]
                tls: {{ ca_file: {} }}
            ",
            not_pem.display()
        ));
        assert!(p[0].message.contains("no PEM certificate"), "{p:#?}");
    }

    #[test]
    fn upstream_tls_keys_are_checked_where_they_are_written() {
        let yaml = |endpoint: &str, tls: &str| {
            format!(
                "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: [\"{endpoint}\"]
                tls: {tls}
            "
            )
        };
        // Nothing to apply them to.
        only(
            &yaml("http://127.0.0.1:3001", "{ http2: true }"),
            9,
            10,
            "upstreams.backend.tls",
            "every endpoint of this upstream is http://",
        );
        only(
            &yaml("https://127.0.0.1:3001", "{ server_name: \"not a name\" }"),
            9,
            25,
            "upstreams.backend.tls.server_name",
            "is not a DNS name or IP address",
        );
        only(
            &yaml("https://127.0.0.1:3001", "{ client_cert: /x.pem }"),
            9,
            25,
            "upstreams.backend.tls.client_cert",
            "needs client_key beside it",
        );
        only(
            &yaml(
                "https://127.0.0.1:3001",
                "{ client_cert: /x.pem, client_key: /x.key }",
            ),
            9,
            25,
            "upstreams.backend.tls.client_cert",
            "cannot read /x.pem",
        );
        only(
            &yaml("https://127.0.0.1:3001", "{ insecure_skip_verify: maybe }"),
            9,
            34,
            "upstreams.backend.tls.insecure_skip_verify",
            "",
        );
        let ok = crate::config::parse_str(
            &yaml(
                "https://127.0.0.1:3001",
                "{ server_name: api.internal, insecure_skip_verify: true, http2: true }",
            ),
            "t.yaml",
            &|_| None,
        )
        .unwrap();
        let tls = &ok.upstreams["backend"].tls;
        assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
        assert!(tls.insecure_skip_verify && tls.http2);
    }

    #[test]
    fn unknown_upstream_lists_known_names() {
        let text = yaml(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                routes:
                  - upstream: backend
                  - upstream: fastgpt
                  - upstream: fastgtp
            upstreams:
              fastgpt:
                endpoints: [\"https://fastgpt.example.com\"]
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        let err = parse_str(&text, "proxy.yaml", &env).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        check(
            &err.problems[0],
            7,
            19,
            "listeners[0].routes[2].upstream",
            "unknown upstream \"fastgtp\" (known: backend, fastgpt)",
        );
        assert_eq!(
            err.to_string(),
            "proxy.yaml:7:19: listeners[0].routes[2].upstream: unknown upstream \"fastgtp\" (known: backend, fastgpt)"
        );
    }

    #[test]
    fn a_broken_upstream_is_still_a_known_name() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: []
            ",
        );
        assert_eq!(p.len(), 1, "{p:#?}");
        check(
            &p[0],
            8,
            16,
            "upstreams.backend.endpoints",
            "must list at least one endpoint",
        );
    }

    #[test]
    fn upstream_client_is_rampart_or_hyper() {
        let config = |client: &str| {
            format!(
                "
                listeners:
                  - name: inbound
                    listen: 0.0.0.0:8080
                    routes:
                      - upstream: backend
                upstreams:
                  backend:
                    endpoints: [\"http://127.0.0.1:3001\"]
                    client: {client}
                "
            )
        };
        for (text, expected) in [
            ("rampart", UpstreamClient::Rampart),
            ("hyper", UpstreamClient::Hyper),
        ] {
            let c = parse(&config(text)).expect("valid");
            assert_eq!(c.upstreams["backend"].client, expected);
        }
        only(
            &config("Hyper"),
            9,
            13,
            "upstreams.backend.client",
            "expected one of rampart, hyper, got \"Hyper\"",
        );
    }
}
