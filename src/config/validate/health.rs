//! `dependencies:` and `upstreams.<name>.health_check`: what rampart checks in the
//! background (see `health/`). A child of `validate` for its reader API.

use std::str::FromStr;
use std::time::Duration;

use bb8_postgres::tokio_postgres;
use tokio_postgres::config::{Host, SslMode};

use super::reader::{Ctx, Field, MapReader};
use super::upstreams::{parse_percent, small_count, upstream_tls};
use super::values::{parse_duration, parse_path_prefix};
use crate::config::{
    CheckConfig, DependenciesConfig, MemoryCheck, PgPoolConfig, PostgresDependency, Secret,
    UpstreamHealthCheck,
};

/// Below this a check of a refusing upstream would spin: at most 100 probes a second.
const MIN_FAST_INTERVAL: Duration = Duration::from_millis(10);
/// Above this the key means nothing: it is capped by `unhealthy_interval` anyway.
const MAX_FAST_INTERVAL: Duration = Duration::from_secs(60);
/// Reading /proc and the cgroup files: local, but still bounded.
const MEMORY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// The defaults of one kind of check.
struct Defaults {
    interval: Duration,
    critical: bool,
    unhealthy_after: u32,
    healthy_after: u32,
}

/// Dependencies flip on the first failure and back on the first success (they have no
/// second instance to fall back on); upstream endpoints need a streak, as ejection does.
/// None is critical by default: Postgres and Redis are shared by every replica, so a
/// critical one that blips takes every replica out of readiness at the same moment, and
/// the Service has nothing left to send to. `critical: true` opts in.
const DEPENDENCY: Defaults = Defaults {
    interval: CheckConfig::DEFAULT_DEPENDENCY_INTERVAL,
    critical: false,
    unhealthy_after: 1,
    healthy_after: 1,
};

pub(super) fn dependencies(
    ctx: &mut Ctx,
    f: Option<Field>,
    redis_present: bool,
) -> DependenciesConfig {
    let mut m = MapReader::open(ctx, f);
    let postgres = m.optional("postgres").map(|f| postgres(ctx, f));
    let redis = m.optional("redis").map(|f| {
        if !redis_present {
            ctx.report(
                f.pos(),
                &f.path,
                "checks the program's Redis client: add a top-level `redis:` section (url or sentinel)",
            );
        }
        let mut r = MapReader::open(ctx, Some(f));
        let check = check_section(ctx, r.optional("check"), &DEPENDENCY, |_, _| {});
        r.finish(ctx);
        check
    });
    let memory = m.optional("memory").map(|f| {
        let mut r = MapReader::open(ctx, Some(f));
        let mut warn_above = DependenciesConfig::DEFAULT_WARN_SHARE;
        let mut check = check_section_without_timeout(ctx, r.optional("check"), |ctx, c| {
            if let Some(w) = c.read(ctx, "warn_above", |ctx, f| {
                ctx.parse_with(f, "a percentage", parse_percent)
            }) {
                warn_above = w;
            }
        });
        check.timeout = MEMORY_CHECK_TIMEOUT.min(check.interval);
        r.finish(ctx);
        MemoryCheck { check, warn_above }
    });
    m.finish(ctx);
    DependenciesConfig {
        postgres,
        redis,
        memory,
    }
}

fn postgres(ctx: &mut Ctx, f: Field) -> PostgresDependency {
    let mut m = MapReader::open(ctx, Some(f));
    let url = m
        .required(ctx, "url")
        .and_then(|f| ctx.parse_secret(&f, "a postgres:// URL", parse_postgres_url));
    let pool = pg_pool(ctx, m.optional("pool"));
    let tls_ca_file = upstream_tls(ctx, m.optional("tls"));
    let mut warn = DependenciesConfig::DEFAULT_WARN_SHARE;
    let check = check_section(ctx, m.optional("check"), &DEPENDENCY, |ctx, c| {
        if let Some(w) = c.read(ctx, "warn_connections_above", |ctx, f| {
            ctx.parse_with(f, "a percentage", parse_percent)
        }) {
            warn = w;
        }
    });
    m.finish(ctx);
    PostgresDependency {
        // A stand-in when broken: the file is refused anyway.
        url: url.unwrap_or_else(|| Secret::new(String::new())),
        pool,
        check,
        warn_connections_above: warn,
        tls_ca_file,
    }
}

fn pg_pool(ctx: &mut Ctx, f: Option<Field>) -> PgPoolConfig {
    let d = PgPoolConfig::default();
    let mut m = MapReader::open(ctx, f);
    let max_field = m.optional("max_size");
    let max_size = max_field
        .as_ref()
        .and_then(|f| ctx.int(f, 1, 1024))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(d.max_size);
    let min_field = m.optional("min_idle");
    let min_idle = min_field
        .as_ref()
        .and_then(|f| ctx.int(f, 0, 1024))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(d.min_idle);
    if min_idle > max_size
        && let Some(f) = &min_field
    {
        ctx.report(
            f.pos(),
            &f.path,
            format!("must be at most pool.max_size ({max_size}), got {min_idle}"),
        );
    }
    let config = PgPoolConfig {
        min_idle,
        max_size,
        connect_timeout: m
            .read(ctx, "connect_timeout", Ctx::duration)
            .unwrap_or(d.connect_timeout),
        idle_timeout: m
            .read(ctx, "idle_timeout", Ctx::duration)
            .unwrap_or(d.idle_timeout),
        max_lifetime: m
            .read(ctx, "max_lifetime", Ctx::duration)
            .unwrap_or(d.max_lifetime),
    };
    m.finish(ctx);
    config
}

/// `health_check:` of one upstream.
pub(super) fn upstream_health_check(ctx: &mut Ctx, f: Field) -> UpstreamHealthCheck {
    let mut path = UpstreamHealthCheck::DEFAULT_PATH.to_owned();
    let check = check_section(
        ctx,
        Some(f),
        &Defaults {
            interval: CheckConfig::DEFAULT_UPSTREAM_INTERVAL,
            critical: false,
            unhealthy_after: 3,
            healthy_after: 2,
        },
        |ctx, c| {
            if let Some(p) = c.read(ctx, "path", |ctx, f| {
                ctx.parse_with(f, "a path", parse_check_path)
            }) {
                path = p;
            }
        },
    );
    UpstreamHealthCheck { path, check }
}

/// `interval`, `unhealthy_interval`, `fast_interval`, `timeout`, `critical`, `unhealthy_after`, `healthy_after`, and whatever keys
/// `extra` reads from the same mapping.
fn check_section(
    ctx: &mut Ctx,
    f: Option<Field>,
    d: &Defaults,
    extra: impl FnOnce(&mut Ctx, &mut MapReader),
) -> CheckConfig {
    let mut m = MapReader::open(ctx, f);
    let interval = m.read(ctx, "interval", Ctx::duration).unwrap_or(d.interval);
    let timeout = m
        .read(ctx, "timeout", Ctx::duration)
        .unwrap_or(CheckConfig::DEFAULT_TIMEOUT);
    let config = counted(ctx, &mut m, d, interval, timeout);
    extra(ctx, &mut m);
    m.finish(ctx);
    config
}

/// The memory check reads local files: no `timeout` key.
fn check_section_without_timeout(
    ctx: &mut Ctx,
    f: Option<Field>,
    extra: impl FnOnce(&mut Ctx, &mut MapReader),
) -> CheckConfig {
    let mut m = MapReader::open(ctx, f);
    let interval = m
        .read(ctx, "interval", Ctx::duration)
        .unwrap_or(DEPENDENCY.interval);
    let config = counted(ctx, &mut m, &DEPENDENCY, interval, MEMORY_CHECK_TIMEOUT);
    extra(ctx, &mut m);
    m.finish(ctx);
    config
}

fn counted(
    ctx: &mut Ctx,
    m: &mut MapReader,
    d: &Defaults,
    interval: Duration,
    timeout: Duration,
) -> CheckConfig {
    CheckConfig {
        interval,
        unhealthy_interval: m
            .read(ctx, "unhealthy_interval", Ctx::duration)
            .unwrap_or(CheckConfig::DEFAULT_UNHEALTHY_INTERVAL),
        fast_interval: m
            .read(ctx, "fast_interval", |ctx, f| {
                ctx.parse_with(f, "a duration", parse_fast_interval)
            })
            .unwrap_or(CheckConfig::DEFAULT_FAST_INTERVAL),
        timeout,
        critical: m.read(ctx, "critical", Ctx::boolean).unwrap_or(d.critical),
        unhealthy_after: m
            .read(ctx, "unhealthy_after", small_count)
            .unwrap_or(d.unhealthy_after),
        healthy_after: m
            .read(ctx, "healthy_after", small_count)
            .unwrap_or(d.healthy_after),
    }
}

/// 10ms to 1m: `fast_interval` is capped by `unhealthy_interval` when the check runs.
fn parse_fast_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_FAST_INTERVAL {
        return Err(format!("must be at least 10ms, got \"{s}\""));
    }
    if d > MAX_FAST_INTERVAL {
        return Err(format!("must be at most 1m, got \"{s}\""));
    }
    Ok(d)
}

/// A path with an optional query, sent as is to every endpoint.
fn parse_check_path(s: &str) -> Result<String, String> {
    let (path, query) = match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s, None),
    };
    parse_path_prefix(path)?;
    if let Some(q) = query
        && (q.contains('#') || q.chars().any(char::is_whitespace))
    {
        return Err(format!(
            "must be a path with an optional query, got \"{s}\""
        ));
    }
    http::uri::PathAndQuery::from_str(s)
        .map_err(|_| format!("not a valid request path: \"{s}\""))?;
    Ok(s.to_owned())
}

/// `postgres://user:password@host1:5432,host2:5432/db?target_session_attrs=read-write`, or
/// the key=value form. Checked with the parser that connects, so what passes here connects
/// the same way. Never echoed: it may hold a password.
fn parse_postgres_url(s: &str) -> Result<String, String> {
    if s.to_ascii_lowercase().contains("sslmode=verify-ca") {
        return Err(
            "sslmode=verify-ca: use sslmode=require or verify-full (rampart always \
                    verifies the certificate and the host name)"
                .into(),
        );
    }
    let config = tokio_postgres::Config::from_str(&postgres_url_for_driver(s)).map_err(|e| {
        // The driver's message may quote a piece of the text (an "option" that is really the
        // end of an unquoted password): only a known option's name is repeated.
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text.push_str(&c.to_string());
            cause = c.source();
        }
        let detail = PG_OPTIONS
            .iter()
            .find(|o| text.contains(&format!("invalid value for option `{o}`")))
            .map_or_else(
                || {
                    "it does not parse; not shown, as it may hold a password: quote values with \
                     spaces (password='a b'), write @ as %40 in a URL"
                        .to_owned()
                },
                |o| format!("invalid value for option `{o}`"),
            );
        format!(
            "invalid Postgres URL ({detail}); expected one like \"postgres://user@host:5432/db\""
        )
    })?;
    // `postgres://app:p@ss@db/app`: the driver reads "ss@db" as the host, which would then
    // be shown (and looked up) with part of the password in it.
    if config
        .get_hosts()
        .iter()
        .any(|h| matches!(h, Host::Tcp(name) if name.contains('@')))
    {
        return Err(
            "a host name contains \"@\": in a URL, write an @ of the password as %40 (not shown)"
                .into(),
        );
    }
    if config.get_ssl_mode() == SslMode::Require
        && config
            .get_hosts()
            .iter()
            .any(|h| !matches!(h, Host::Tcp(_)))
    {
        return Err("sslmode=require with a Unix socket host: TLS needs a TCP host".into());
    }
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err("the Postgres URL names no host".into());
    }
    for h in config.get_hosts() {
        if let Host::Tcp(name) = h
            && name.is_empty()
        {
            return Err("the Postgres URL has an empty host".into());
        }
    }
    Ok(s.to_owned())
}

/// The options tokio-postgres names in "invalid value for option" messages.
const PG_OPTIONS: &[&str] = &[
    "sslmode",
    "sslnegotiation",
    "hostaddr",
    "host",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// What tokio-postgres reads: it knows `require` but not `verify-full`, which rampart's
/// `require` already is (the certificate and the host name are always verified).
pub fn postgres_url_for_driver(s: &str) -> String {
    s.replace("sslmode=verify-full", "sslmode=require")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError, Problem};

    const BASE: &str =
        "listeners:\n  - name: m\n    listen: \"127.0.0.1:0\"\n    routes: [{ upstream: u }]\n";

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        let text = format!("{BASE}{extra}");
        super::super::parse_str(&text, "proxy.yaml", &|v| {
            (v == "DATABASE_URL").then(|| "postgres://app:pw@10.0.0.1:5432,10.0.0.2/app".into())
        })
    }

    fn problems(extra: &str) -> Vec<Problem> {
        match parse(extra) {
            Ok(c) => panic!("expected problems, got {c:#?}"),
            Err(e) => e.problems,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn dependencies_get_their_defaults() {
        let c = parse(
            "upstreams:\n  u:\n    endpoints: [\"http://127.0.0.1:3001\"]\n    health_check: {}\n\
             redis: { url: \"redis://127.0.0.1:6379\" }\n\
             dependencies:\n  postgres: { url: \"${DATABASE_URL}\" }\n  redis: {}\n  memory: {}\n",
        )
        .unwrap();
        let d = &c.dependencies;
        let pg = d.postgres.as_ref().unwrap();
        assert_eq!(
            pg.url.expose(),
            "postgres://app:pw@10.0.0.1:5432,10.0.0.2/app"
        );
        assert_eq!(pg.pool, PgPoolConfig::default());
        assert_eq!(
            pg.check,
            CheckConfig {
                interval: secs(10),
                unhealthy_interval: secs(1),
                fast_interval: Duration::from_millis(250),
                timeout: secs(2),
                critical: false,
                unhealthy_after: 1,
                healthy_after: 1,
            }
        );
        assert_eq!(pg.warn_connections_above, 0.8);
        // The password never shows in debug output.
        assert!(!format!("{pg:?}").contains("pw"));
        let redis = d.redis.as_ref().unwrap();
        assert!(!redis.critical);
        assert_eq!((redis.interval, redis.timeout), (secs(10), secs(2)));
        let mem = d.memory.as_ref().unwrap();
        assert_eq!(
            (mem.check.interval, mem.warn_above, mem.check.critical),
            (secs(10), 0.8, false)
        );
        let hc = c.upstreams["u"].resilience.health_check.as_ref().unwrap();
        assert_eq!(hc.path, "/health");
        assert_eq!(
            hc.check,
            CheckConfig {
                interval: secs(5),
                unhealthy_interval: secs(1),
                fast_interval: Duration::from_millis(250),
                timeout: secs(2),
                critical: false,
                unhealthy_after: 3,
                healthy_after: 2,
            }
        );
    }

    #[test]
    fn every_key_set() {
        let c = parse(
            "upstreams:\n  u:\n    endpoints: [\"http://127.0.0.1:3001\"]\n\
             \x20   health_check: { path: \"/hc?deep=1\", interval: 1s, fast_interval: 100ms, timeout: 300ms, unhealthy_after: 5, healthy_after: 4, critical: true }\n\
             dependencies:\n\
             \x20 postgres:\n\
             \x20   url: \"postgres://u@h/db?target_session_attrs=read-write\"\n\
             \x20   pool: { min_idle: 1, max_size: 2, connect_timeout: 1s, idle_timeout: 10s, max_lifetime: 1h }\n\
             \x20   check: { interval: 3s, timeout: 1s, critical: false, warn_connections_above: 90%, unhealthy_after: 2 }\n\
             \x20 memory: { check: { interval: 1m, warn_above: 95%, critical: true } }\n",
        )
        .unwrap();
        let pg = c.dependencies.postgres.unwrap();
        assert_eq!(
            pg.pool,
            PgPoolConfig {
                min_idle: 1,
                max_size: 2,
                connect_timeout: secs(1),
                idle_timeout: secs(10),
                max_lifetime: secs(3600),
            }
        );
        assert_eq!(
            (
                pg.check.interval,
                pg.check.critical,
                pg.check.unhealthy_after
            ),
            (secs(3), false, 2)
        );
        assert_eq!(pg.warn_connections_above, 0.9);
        let mem = c.dependencies.memory.unwrap();
        assert_eq!(
            (mem.check.interval, mem.warn_above, mem.check.critical),
            (secs(60), 0.95, true)
        );
        let hc = c.upstreams["u"].resilience.health_check.clone().unwrap();
        assert_eq!(hc.path, "/hc?deep=1");
        assert_eq!((hc.check.unhealthy_after, hc.check.healthy_after), (5, 4));
        assert_eq!(hc.check.fast_interval, Duration::from_millis(100));
    }

    #[test]
    fn redis_check_needs_the_redis_section() {
        let p = problems(
            "upstreams:\n  u: { endpoints: [\"http://127.0.0.1:3001\"] }\n\
             dependencies:\n  redis: { check: { interval: 1s } }\n",
        );
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!((p[0].line, p[0].path.as_str()), (8, "dependencies.redis"));
        assert!(p[0].message.contains("top-level `redis:`"), "{p:#?}");
    }

    #[test]
    fn problems_are_located() {
        let p = problems(
            "upstreams:\n  u:\n    endpoints: [\"http://127.0.0.1:3001\"]\n    health_check: { path: nope, intervl: 1s, fast_interval: 9ms }\n\
             dependencies:\n\
             \x20 postgres:\n\
             \x20   url: \"postgres://u:secret@h/db?sslmode=verify-ca\"\n\
             \x20   pool: { min_idle: 5, max_size: 2 }\n\
             \x20   check: { timeout: 0s, warn_connections_above: 180% }\n\
             \x20 memory: { check: { timeout: 1s } }\n\
             \x20 mysql: {}\n",
        );
        let text: Vec<String> = p
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        let has = |path: &str, msg: &str| {
            assert!(
                text.iter()
                    .any(|t| t.starts_with(&format!("{path}: ")) && t.contains(msg)),
                "no {path}: ..{msg}.. in {text:#?}"
            )
        };
        has("upstreams.u.health_check.path", "must start with \"/\"");
        has(
            "upstreams.u.health_check.intervl",
            "did you mean \"interval\"",
        );
        has(
            "upstreams.u.health_check.fast_interval",
            "must be at least 10ms, got \"9ms\"",
        );
        has("dependencies.postgres.url", "sslmode=verify-ca");
        has(
            "dependencies.postgres.pool.min_idle",
            "at most pool.max_size (2)",
        );
        has("dependencies.postgres.check.timeout", "greater than 0");
        has(
            "dependencies.postgres.check.warn_connections_above",
            "at most 100%",
        );
        has("dependencies.memory.check.timeout", "unknown key");
        has("dependencies.mysql", "unknown key");
        assert_eq!(p.len(), 9, "{text:#?}");
        assert!(!text.iter().any(|t| t.contains("secret")));
    }

    #[test]
    fn postgres_urls() {
        assert!(parse_postgres_url("postgres://postgres@127.0.0.1:5432/test").is_ok());
        assert!(
            parse_postgres_url(
                "postgres://u:p@10.0.0.1:5432,10.0.0.2:5433/app?target_session_attrs=read-write"
            )
            .is_ok()
        );
        assert!(parse_postgres_url("host=/var/run/postgresql user=postgres").is_ok());
        assert!(parse_postgres_url("postgres://u:secret@h/db?sslmode=require").is_ok());
        assert!(parse_postgres_url("postgres://u:secret@h/db?sslmode=verify-full").is_ok());
        let e = parse_postgres_url("postgres://u:secret@h/db?sslmode=verify-ca").unwrap_err();
        assert!(e.contains("verify-full") && !e.contains("secret"), "{e}");
        let e = parse_postgres_url("postgres://u:secret@h/db?bogus=1").unwrap_err();
        assert!(
            e.contains("invalid Postgres URL") && !e.contains("secret"),
            "{e}"
        );
        assert!(parse_postgres_url("postgres:///db").is_err());
    }

    #[test]
    fn postgres_url_problems_never_quote_the_password() {
        // An unescaped @ in the password: the driver would take the rest as the host name,
        // and print part of the password wherever hosts are shown.
        let e = parse_postgres_url("postgres://app:zq@ss@db/app").unwrap_err();
        assert!(
            e.contains("%40") && !e.contains("zq") && !e.contains("ss@"),
            "{e}"
        );
        // A space left unquoted makes the rest of the password an option name, which the
        // driver's message would quote.
        for bad in [
            "host=db password=zqa zqb=c",
            "host=db password=zqa zqb",
            "host=db password='zqa",
            "postgres://db/app?zqkey=1",
        ] {
            let e = parse_postgres_url(bad).unwrap_err();
            assert!(!e.contains("zq"), "{bad}: {e}");
            assert!(e.starts_with("invalid Postgres URL"), "{e}");
        }
        // What names only a fixed option stays helpful.
        let e = parse_postgres_url("postgres://db/app?sslmode=bogus").unwrap_err();
        assert!(e.contains("sslmode"), "{e}");
    }

    #[test]
    fn check_paths() {
        assert!(parse_check_path("/health").is_ok());
        assert!(parse_check_path("/health?full=1").is_ok());
        assert!(parse_check_path("health").is_err());
        assert!(parse_check_path("/a b").is_err());
    }
}
