//! The tree from `raw.rs` -> the typed [`Config`], collecting EVERY problem.
//!
//! Decoding never stops at a problem: a bad value is reported and replaced by its default so
//! the rest of the file is still checked. Each section is one function taking its node (or
//! `None` when absent) and returning its typed value; a new top-level section is one more
//! such function and one line in [`decode`].

mod health;
mod upgrades;

pub use health::postgres_url_for_driver;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use http::{Method, Uri};

use super::raw::{self, Entry, Kind, Node, Pos, child_path, item_path};
use super::{
    AdminConfig, AlertRule, AlertsConfig, BreakerConfig, BreakerReadiness, BreakerScope, Cidr,
    Comparison, Config, ConfigError, DrainConfig, DrainMode, EjectionConfig, EscapedSlashes,
    FailureRate, Http2Config, KeySource, ListenerConfig, LoadBalancing, LogFormat, LoggingConfig,
    NormalizePath, PathConfig, PoolConfig, Problem, RateLimitConfig, RateLimitKey, RateLimitStore,
    ReadinessConfig, RedisConfig, RedisTarget, Resilience, RetryConfig, RetryOn, RouteConfig,
    RouteTimeouts, Secret, Severity, Signal, SignalUnit, SinkConfig, SinkKind, UpstreamClient,
    UpstreamConfig,
};

// === defaults (documented on the types in mod.rs and in docs/configuration.md) ===

const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9901);
const DEFAULT_LOG_LEVEL: &str = "info";
const MIN_ADMIN_TOKEN: usize = 16;
const MAX_ADMIN_TOKEN: usize = 4096;
const MAX_ADMIN_ALLOWED_HOSTS: usize = 64;
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// hyper refuses a smaller HTTP/1 read buffer.
const MIN_MAX_HEADER_BYTES: u64 = 8 * 1024;

// === upper bounds (docs/configuration.md): what `check` accepts must start,
// serve and reload, so nothing configured can size an allocation, overflow arithmetic or
// panic a constructor (tokio's Semaphore above 2^61 - 1, `Instant + Duration`).

/// Connections per listener: far above what one process serves, far below the Semaphore's
/// limit.
const MAX_CONNECTIONS: u64 = 1_000_000;
/// Request head bytes: nginx's large_client_header_buffers default is 4 x 8 KiB.
const MAX_MAX_HEADER_BYTES: u64 = 1024 * 1024;
/// Request headers; browsers send about 20.
const MAX_HEADERS: u64 = 1000;
const MAX_H2_CONCURRENT_STREAMS: u64 = 10_000;
const MAX_H2_PENDING_ACCEPT_RESET_STREAMS: u64 = 10_000;
const MAX_H2_LOCAL_ERROR_RESET_STREAMS: u64 = 100_000;
/// Requests in flight on a listener or to an upstream.
const MAX_IN_FLIGHT: u64 = 1_000_000;
/// A chunked or HTTP/2 body is read whole before it is forwarded, so this is also what one
/// such request may hold in memory.
const MAX_BODY_BYTES: u64 = 1 << 30;
/// Bodies kept in memory for a retry.
const MAX_RETRY_BODY_BYTES: u64 = 64 << 20;
const MAX_IDLE_PER_ENDPOINT: u64 = 10_000;
/// Every rate-limited request waits up to this while Redis is down (until the fallback
/// takes over): a hard limit meant in milliseconds.
const MAX_REDIS_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// A retried request waits its backoff (the route's `total`, when set, cuts it shorter).
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);
/// A request waits this long for an upstream that refuses connections, holding a client.
const MAX_CONNECT_WAIT: Duration = Duration::from_secs(300);
const DEFAULT_MAX_HEADERS: usize = 100;
const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
const DEFAULT_H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
const DEFAULT_H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Envoy's default connection idle timeout is 1h; a proxy in front of browsers and apps
/// that reconnect cheaply can close sooner.
const DEFAULT_H2_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
const MAX_H2_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_PATH_PREFIX: &str = "/";
const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// nginx's `client_body_timeout`.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_BODY_TIMEOUT: Duration = Duration::from_secs(3600);
/// Apache's mod_reqtimeout default `MinRate`: far below any real link (4 kbit/s), far above
/// a trickle of a byte a second.
const DEFAULT_MIN_BODY_RATE: u64 = 500;
const MAX_MIN_BODY_RATE: u64 = 1 << 30;
const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const DEFAULT_MAX_IDLE_PER_ENDPOINT: usize = 256;
const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
const DEFAULT_REDIS_POOL_MAX_SIZE: u32 = 16;
const DEFAULT_REPLICAS: u32 = 1;
const DEFAULT_RATE_LIMIT_POINTS: u64 = 100;
const DEFAULT_RATE_LIMIT_PER: Duration = Duration::from_secs(60);
const DEFAULT_RATE_LIMIT_BLOCK_FOR: Duration = Duration::from_secs(60);
const DEFAULT_IPV6_PREFIX: u8 = 64;
/// Counts travel through Lua numbers (doubles): stay far below 2^53.
const MAX_RATE_LIMIT_POINTS: u64 = 1_000_000_000_000_000;
const DEFAULT_ACCEPT_GRACE: Duration = Duration::from_secs(5);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer is surely a typo, and `Instant + Duration` panics on overflow downstream.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Sections a later version reads: refused by name so the message says why.
const FUTURE_SECTIONS: &[&str] = &["caches", "tls"];
/// The in-memory series keeps samples this far back: longer windows belong in Prometheus.
const MAX_ALERT_WINDOW: Duration = Duration::from_secs(3600);
const DEFAULT_ALERT_WINDOW: Duration = Duration::from_secs(300);
const DEFAULT_ALERT_MIN_SAMPLES: u64 = 10;
const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_SINK_ATTEMPTS: u32 = 5;

/// Turns a YAML text into the typed configuration, or returns every problem found, sorted by
/// position. `env` looks up the variables `${VAR}` refers to.
pub fn parse_str(
    text: &str,
    source_name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    parse_str_checked(text, source_name, env).map(|(config, _)| config)
}

/// [`parse_str`], plus the warnings `rampart check` prints for a valid file (one line
/// each, `file:line:column: warning: ...`): what works but is likely a mistake.
pub fn parse_str_checked(
    text: &str,
    source_name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<String>), ConfigError> {
    let (root, mut problems) = raw::parse(text);
    let mut ctx = Ctx::new(env);
    let config = root.map(|root| decode(&mut ctx, &root, source_name));
    problems.append(&mut ctx.problems);
    // Stable: problems at one position keep the order they were found in.
    problems.sort_by_key(|p| (p.line, p.column));
    match config {
        Some(config) if problems.is_empty() => {
            let warnings = layered_timeouts(&config.listeners, &ctx.timeout_sites, source_name);
            Ok((config, warnings))
        }
        _ => Err(ConfigError {
            source_name: source_name.to_owned(),
            problems,
        }),
    }
}

/// Where a route's `first_byte` and `idle` timeouts come from: the key, or the route itself
/// for a default.
struct TimeoutSite {
    listener: String,
    route: String,
    first_byte: Located,
    idle: Located,
}

impl TimeoutSite {
    fn get(&self, kind: &str) -> &Located {
        if kind == "idle" {
            &self.idle
        } else {
            &self.first_byte
        }
    }
}

struct Located {
    value: Duration,
    pos: Pos,
    path: String,
    default: bool,
}

impl Located {
    fn of(f: Option<&Field>, value: Duration, route: &Field, key: &str) -> Located {
        match f {
            Some(f) => Located {
                value,
                pos: f.pos(),
                path: f.path.clone(),
                default: false,
            },
            None => Located {
                value,
                pos: route.pos(),
                path: format!("{}.timeouts.{key}", route.path),
                default: true,
            },
        }
    }
}

/// Timeouts that layer. An egress listener (`drain: egress`) carries the app's own calls
/// out (FastGPT), which the app times out itself and answers with its own clean error; the
/// inbound route in front of the app must wait longer than that, or its timer fires first
/// (a 504 that blames the app, a cut stream instead of the app's error). So every inbound
/// route's `first_byte` and `idle` must be longer than the longest of the egress routes'.
/// Which inbound routes lead to the egress calls is not known here: all are compared.
fn layered_timeouts(
    listeners: &[ListenerConfig],
    sites: &[TimeoutSite],
    source: &str,
) -> Vec<String> {
    let egress = |site: &TimeoutSite| {
        listeners
            .iter()
            .any(|l| l.name == site.listener && l.drain == DrainMode::Egress)
    };
    let kinds = ["first_byte", "idle"];
    let mut out = Vec::new();
    for inbound in sites.iter().filter(|s| !egress(s)) {
        for kind in kinds {
            // The longest egress timeout of this kind, the first written on a tie.
            let Some(longest) = sites.iter().filter(|s| egress(s)).reduce(|a, b| {
                if b.get(kind).value > a.get(kind).value {
                    b
                } else {
                    a
                }
            }) else {
                return out;
            };
            let (i, e) = (inbound.get(kind), longest.get(kind));
            if i.value <= e.value {
                out.push(format!(
                    "{source}:{}:{}: warning: {}: {}{} is not longer than the egress route \
                     {}/{}'s {kind} ({} at {source}:{}:{}): the app's own timeout on its call \
                     out cannot answer first; make the inbound one longer",
                    i.pos.line,
                    i.pos.column,
                    i.path,
                    humantime::format_duration(i.value),
                    if i.default { " (default)" } else { "" },
                    longest.listener,
                    longest.route,
                    humantime::format_duration(e.value),
                    e.pos.line,
                    e.pos.column,
                ));
            }
        }
    }
    out
}

fn decode(ctx: &mut Ctx, root: &Node, source_name: &str) -> Config {
    let mut m = MapReader::open(ctx, Some(Field::root(root)));
    let (admin, admin_bind) = admin(ctx, m.optional("admin"));
    let logging = logging(ctx, m.optional("logging"));
    let trusted_proxies = trusted_proxies(ctx, m.optional("trusted_proxies"));
    let listeners_node = m.required(ctx, "listeners");
    let upstreams_node = m.required(ctx, "upstreams");
    let redis = redis(ctx, m.optional("redis"));
    let replicas = m
        .read(ctx, "replicas", |ctx, f| ctx.int(f, 1, 10_000))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(DEFAULT_REPLICAS);
    // Upstreams and policies first: routes refer to them (and inherit the upstream's
    // connect timeout).
    let known = Known {
        upstreams: upstreams(ctx, upstreams_node),
        policies: rate_limits(ctx, m.optional("rate_limits"), redis.is_some()),
    };
    let (listeners, mut binds) = listeners(ctx, listeners_node, &known);
    let drain = drain(ctx, m.optional("drain"));
    let dependencies = health::dependencies(ctx, m.optional("dependencies"), redis.is_some());
    let route_names: Vec<String> = listeners
        .iter()
        .flat_map(|l| l.routes.iter().map(|r| r.name.clone()))
        .collect();
    let alerts = alerts(ctx, m.optional("alerts"), &known.upstreams, &route_names);
    let readiness = readiness(ctx, m.optional("readiness"));
    for section in FUTURE_SECTIONS {
        m.refuse(
            ctx,
            section,
            format!("section \"{section}\" is not supported by this version of rampart"),
        );
    }
    m.finish(ctx);
    binds.extend(admin_bind);
    check_binds(ctx, binds);
    Config {
        source: source_name.to_owned(),
        admin,
        logging,
        trusted_proxies,
        listeners,
        upstreams: known.upstreams.configs,
        redis,
        replicas,
        rate_limits: known.policies.configs,
        drain,
        dependencies,
        alerts,
        readiness,
    }
}

/// What routes may refer to by name.
struct Known {
    upstreams: Upstreams,
    policies: Policies,
}

// === sections ===

fn admin(ctx: &mut Ctx, f: Option<Field>) -> (AdminConfig, Option<Bind>) {
    let mut m = MapReader::open(ctx, f);
    let listen = m.optional("listen");
    let addr = listen.as_ref().and_then(|f| ctx.socket_addr(f));
    let token_field = m.optional("token");
    let token = token_field.as_ref().and_then(|f| {
        let s = ctx.secret(f, "a token")?;
        // Empty is none: `${RAMPART_ADMIN_TOKEN:-}` with the variable unset.
        if s.expose().is_empty() {
            return None;
        }
        let t = s.expose();
        let problem = if t.len() < MIN_ADMIN_TOKEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
            format!("expected at least {MIN_ADMIN_TOKEN} visible ASCII characters (no spaces)")
        } else if t.len() > MAX_ADMIN_TOKEN {
            format!("must be at most {MAX_ADMIN_TOKEN} characters")
        } else {
            return Some(s);
        };
        ctx.report(f.pos(), &f.path, problem);
        None
    });
    let insecure_field = m.optional("insecure_no_token");
    let insecure_no_token = insecure_field
        .as_ref()
        .and_then(|f| ctx.boolean(f))
        .unwrap_or(false);
    let allowed_hosts = m
        .read(ctx, "allowed_hosts", admin_allowed_hosts)
        .unwrap_or_default();
    m.finish(ctx);
    let config = AdminConfig {
        listen: addr.unwrap_or(DEFAULT_ADMIN_LISTEN),
        token,
        insecure_no_token,
        allowed_hosts,
    };
    // Whoever reaches the admin port can drain, reload and read the configuration: off
    // loopback that needs a token, or a written decision to go without one.
    if let (Some(f), Some(addr)) = (&listen, addr)
        && !is_loopback(addr.ip())
        && config.token.is_none()
        && !config.insecure_no_token
    {
        let from_env = token_field
            .as_ref()
            .and_then(|t| raw_variables(t.node))
            .map(|vars| format!(" ({vars} is unset or empty)"))
            .unwrap_or_default();
        ctx.report(
            f.pos(),
            &f.path,
            format!(
                "\"{addr}\" is not a loopback address and admin.token is not set{from_env}: anyone who \
                 reaches it could drain, reload or read the configuration; set admin.token (at least \
                 {MIN_ADMIN_TOKEN} characters; the shipped proxy.yaml reads RAMPART_ADMIN_TOKEN), listen on \
                 127.0.0.1, or accept the risk with admin.insecure_no_token: true"
            ),
        );
    }
    if let Some(f) = &insecure_field
        && config.insecure_no_token
        && config.token.is_some()
    {
        ctx.report(
            f.pos(),
            &f.path,
            "true while admin.token is set: remove one of them",
        );
    }
    let bind = match (&listen, addr) {
        (Some(f), Some(addr)) => Some(Bind {
            addr,
            pos: f.pos(),
            path: f.path.clone(),
            owner: "admin".into(),
            origin: format!("line {}", f.pos().line),
        }),
        // The default still takes its port.
        (None, _) => Some(Bind {
            addr: DEFAULT_ADMIN_LISTEN,
            pos: Pos::default(),
            path: "admin.listen".into(),
            owner: "admin".into(),
            origin: format!("default {DEFAULT_ADMIN_LISTEN}"),
        }),
        // Already reported; comparing its stand-in would only add noise.
        (Some(_), None) => None,
    };
    (config, bind)
}

/// 127.0.0.0/8 and ::1, also written as an IPv4-mapped IPv6 address.
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The variables a scalar refers to, as written (`RAMPART_ADMIN_TOKEN`), for messages.
fn raw_variables(node: &Node) -> Option<String> {
    let Kind::Scalar(raw) = &node.kind else {
        return None;
    };
    let names: Vec<&str> = raw
        .split("${")
        .skip(1)
        .filter_map(|rest| {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            (end > 0).then(|| &rest[..end])
        })
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}

/// `admin.allowed_hosts`: host names (no port) the admin listener answers without a token,
/// besides IP literals and `localhost`.
fn admin_allowed_hosts(ctx: &mut Ctx, f: &Field) -> Option<Vec<String>> {
    let items = ctx.list(f, "a list of host names")?;
    if items.len() > MAX_ADMIN_ALLOWED_HOSTS {
        ctx.report(
            f.pos(),
            &f.path,
            format!(
                "at most {MAX_ADMIN_ALLOWED_HOSTS} host names, got {}",
                items.len()
            ),
        );
        return None;
    }
    let mut seen = Unique::default();
    let mut out = Vec::new();
    for item in &items {
        if let Some(h) = ctx.parse_with(item, "a host name", parse_allowed_host)
            && seen.insert(ctx, &h, item, "host")
        {
            out.push(h);
        }
    }
    Some(out)
}

/// A DNS name as a browser would send it in Host, lower-cased; no port, no wildcard.
fn parse_allowed_host(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "expected a host name without port or wildcard, like \"rampart.internal\", got \"{s}\""
        ))
    }
}

fn logging(ctx: &mut Ctx, f: Option<Field>) -> LoggingConfig {
    let mut m = MapReader::open(ctx, f);
    let config = LoggingConfig {
        level: m
            .read(ctx, "level", Ctx::log_filter)
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.into()),
        format: m
            .read(ctx, "format", |ctx, f| {
                ctx.one_of(f, &[("text", LogFormat::Text), ("json", LogFormat::Json)])
            })
            .unwrap_or(LogFormat::Text),
        access_log: m.read(ctx, "access_log", Ctx::boolean).unwrap_or(true),
    };
    m.finish(ctx);
    config
}

fn readiness(ctx: &mut Ctx, f: Option<Field>) -> ReadinessConfig {
    let mut m = MapReader::open(ctx, f);
    let breaker_open = m
        .read(ctx, "breaker_open", |ctx, f| {
            ctx.one_of(
                f,
                &[
                    ("ignore", BreakerReadiness::Ignore),
                    ("not_ready", BreakerReadiness::NotReady),
                ],
            )
        })
        .unwrap_or_default();
    m.finish(ctx);
    ReadinessConfig { breaker_open }
}

fn drain(ctx: &mut Ctx, f: Option<Field>) -> DrainConfig {
    let mut m = MapReader::open(ctx, f);
    let grace_field = m.optional("accept_grace");
    let accept_grace = grace_field
        .as_ref()
        .and_then(|f| ctx.duration_or_zero(f))
        .unwrap_or(DEFAULT_ACCEPT_GRACE);
    let timeout_field = m.optional("timeout");
    let timeout = timeout_field
        .as_ref()
        .and_then(|f| ctx.duration(f))
        .unwrap_or(DEFAULT_DRAIN_TIMEOUT);
    m.finish(ctx);
    // The timeout counts from the signal, so a grace as long would never stop accepting.
    if accept_grace >= timeout {
        let fmt = |d| humantime::format_duration(d).to_string();
        match (&grace_field, &timeout_field) {
            (Some(g), _) => ctx.report(
                g.pos(),
                &g.path,
                format!(
                    "must be less than drain.timeout ({}), got {}",
                    fmt(timeout),
                    fmt(accept_grace)
                ),
            ),
            (None, Some(t)) => ctx.report(
                t.pos(),
                &t.path,
                format!(
                    "must be more than drain.accept_grace ({} by default), got {}",
                    fmt(accept_grace),
                    fmt(timeout)
                ),
            ),
            // Both defaults: consistent by construction.
            (None, None) => {}
        }
    }
    DrainConfig {
        accept_grace,
        timeout,
    }
}

fn trusted_proxies(ctx: &mut Ctx, f: Option<Field>) -> Vec<Cidr> {
    let Some(f) = f else { return Vec::new() };
    ctx.list(&f, "a list of addresses")
        .unwrap_or_default()
        .iter()
        .filter_map(|item| ctx.parse_with(item, "an address", parse_cidr))
        .collect()
}

/// The decoded upstreams, and the names written in the file (even ones with problems) so a
/// route naming a broken upstream is not reported twice.
struct Upstreams {
    configs: BTreeMap<String, UpstreamConfig>,
    /// None when the section itself is missing or not a mapping: then nothing is checked.
    known: Option<Vec<String>>,
}

fn upstreams(ctx: &mut Ctx, f: Option<Field>) -> Upstreams {
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

fn upstream(ctx: &mut Ctx, f: Field, name: &str) -> UpstreamConfig {
    let mut m = MapReader::open(ctx, Some(f));
    let config = UpstreamConfig {
        name: name.to_owned(),
        endpoints: m
            .required(ctx, "endpoints")
            .map(|f| endpoints(ctx, &f))
            .unwrap_or_default(),
        connect_timeout: m
            .read(ctx, "connect_timeout", Ctx::duration)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
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
        tls_ca_file: upstream_tls(ctx, m.optional("tls")),
        resilience: resilience(ctx, &mut m),
    };
    m.finish(ctx);
    config
}

fn upstream_tls(ctx: &mut Ctx, f: Option<Field>) -> Option<std::path::PathBuf> {
    let mut m = MapReader::open(ctx, f);
    let ca_file = m.read(ctx, "ca_file", |ctx, f| {
        let path = ctx.text(f, "a file path")?;
        // Checked here so `rampart check` catches it, not the first https request.
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
    });
    m.finish(ctx);
    ca_file
}

fn endpoints(ctx: &mut Ctx, f: &Field) -> Vec<Uri> {
    let Some(items) = ctx.list(f, "a list of URLs") else {
        return Vec::new();
    };
    if items.is_empty() {
        ctx.report(f.pos(), &f.path, "must list at least one endpoint");
    }
    let mut seen = Unique::default();
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

fn pool(ctx: &mut Ctx, f: Option<Field>) -> PoolConfig {
    let mut m = MapReader::open(ctx, f);
    let config = PoolConfig {
        idle_timeout: m
            .read(ctx, "idle_timeout", Ctx::duration)
            .unwrap_or(DEFAULT_POOL_IDLE_TIMEOUT),
        max_idle_per_endpoint: m
            .read(ctx, "max_idle_per_endpoint", |ctx, f| {
                ctx.count(f, 0, MAX_IDLE_PER_ENDPOINT)
            })
            .unwrap_or(DEFAULT_MAX_IDLE_PER_ENDPOINT),
    };
    m.finish(ctx);
    config
}

fn listeners(ctx: &mut Ctx, f: Option<Field>, known: &Known) -> (Vec<ListenerConfig>, Vec<Bind>) {
    let (mut out, mut binds) = (Vec::new(), Vec::new());
    let Some(f) = f else { return (out, binds) };
    let Some(items) = ctx.list(&f, "a list of listeners") else {
        return (out, binds);
    };
    if items.is_empty() {
        ctx.report(f.pos(), &f.path, "must list at least one listener");
    }
    let mut names = Unique::default();
    for item in items {
        let (config, name, bind) = listener(ctx, item, known);
        if let Some(name) = name {
            names.insert(ctx, &config.name, &name, "listener name");
        }
        binds.extend(bind);
        out.push(config);
    }
    (out, binds)
}

/// Also returns where the name and the address were written, for the cross-listener checks.
fn listener<'a>(
    ctx: &mut Ctx,
    f: Field<'a>,
    known: &Known,
) -> (ListenerConfig, Option<Field<'a>>, Option<Bind>) {
    let path = f.path.clone();
    let mut m = MapReader::open(ctx, Some(f));
    let name_field = m.required(ctx, "name");
    let name = name_field
        .as_ref()
        .and_then(|f| ctx.name(f, "listener"))
        .unwrap_or_else(|| path.clone());
    let listen_field = m.required(ctx, "listen");
    let listen = listen_field.as_ref().and_then(|f| ctx.socket_addr(f));
    let config = ListenerConfig {
        max_connections: m
            .read(ctx, "max_connections", |ctx, f| {
                ctx.count(f, 1, MAX_CONNECTIONS)
            })
            .unwrap_or(DEFAULT_MAX_CONNECTIONS),
        header_read_timeout: m
            .read(ctx, "header_read_timeout", Ctx::duration)
            .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT),
        max_header_bytes: m
            .read(ctx, "max_header_bytes", |ctx, f| {
                ctx.bytes(f, MIN_MAX_HEADER_BYTES, MAX_MAX_HEADER_BYTES)
            })
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_MAX_HEADER_BYTES),
        max_headers: m
            .read(ctx, "max_headers", |ctx, f| ctx.count(f, 1, MAX_HEADERS))
            .unwrap_or(DEFAULT_MAX_HEADERS),
        http2: http2(ctx, m.optional("http2")),
        max_in_flight: m.read(ctx, "max_in_flight", |ctx, f| {
            ctx.count(f, 1, MAX_IN_FLIGHT)
        }),
        drain: m
            .read(ctx, "drain", |ctx, f| {
                ctx.one_of(
                    f,
                    &[
                        ("inbound", DrainMode::Inbound),
                        ("egress", DrainMode::Egress),
                    ],
                )
            })
            .unwrap_or(DrainMode::Inbound),
        health_path: m.read(ctx, "health_path", |ctx, f| {
            ctx.parse_with(f, "a path", parse_path_prefix)
        }),
        path: path_config(ctx, &mut m),
        routes: m
            .required(ctx, "routes")
            .map(|f| routes(ctx, &f, &name, known))
            .unwrap_or_default(),
        listen: listen.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
        name,
    };
    m.finish(ctx);
    let bind = listen_field.zip(listen).map(|(f, addr)| Bind {
        addr,
        pos: f.pos(),
        path: f.path.clone(),
        owner: format!("listener \"{}\"", config.name),
        origin: format!("line {}", f.pos().line),
    });
    (config, name_field, bind)
}

/// The listener's `normalize_path`, `merge_slashes` and `escaped_slashes`.
fn path_config(ctx: &mut Ctx, m: &mut MapReader) -> PathConfig {
    let default = PathConfig::default();
    PathConfig {
        normalize: m
            .read(ctx, "normalize_path", |ctx, f| {
                ctx.one_of(
                    f,
                    &[
                        ("match", NormalizePath::Match),
                        ("forward", NormalizePath::Forward),
                        ("off", NormalizePath::Off),
                    ],
                )
            })
            .unwrap_or(default.normalize),
        merge_slashes: m
            .read(ctx, "merge_slashes", Ctx::boolean)
            .unwrap_or(default.merge_slashes),
        escaped_slashes: m
            .read(ctx, "escaped_slashes", |ctx, f| {
                ctx.one_of(
                    f,
                    &[
                        ("reject", EscapedSlashes::Reject),
                        ("keep", EscapedSlashes::Keep),
                    ],
                )
            })
            .unwrap_or(default.escaped_slashes),
    }
}

fn http2(ctx: &mut Ctx, f: Option<Field>) -> Http2Config {
    let mut m = MapReader::open(ctx, f);
    let config = Http2Config {
        max_concurrent_streams: m
            .read(ctx, "max_concurrent_streams", |ctx, f| {
                ctx.int(f, 1, MAX_H2_CONCURRENT_STREAMS)
            })
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(DEFAULT_H2_MAX_CONCURRENT_STREAMS),
        max_pending_accept_reset_streams: m
            .read(ctx, "max_pending_accept_reset_streams", |ctx, f| {
                ctx.count(f, 1, MAX_H2_PENDING_ACCEPT_RESET_STREAMS)
            })
            .unwrap_or(DEFAULT_H2_MAX_PENDING_ACCEPT_RESET_STREAMS),
        max_local_error_reset_streams: m
            .read(ctx, "max_local_error_reset_streams", |ctx, f| {
                ctx.count(f, 1, MAX_H2_LOCAL_ERROR_RESET_STREAMS)
            })
            .unwrap_or(DEFAULT_H2_MAX_LOCAL_ERROR_RESET_STREAMS),
        idle_timeout: m
            .read(ctx, "idle_timeout", |ctx, f| {
                ctx.duration_at_most(f, MAX_H2_IDLE_TIMEOUT)
            })
            .unwrap_or(DEFAULT_H2_IDLE_TIMEOUT),
    };
    m.finish(ctx);
    config
}

fn routes(ctx: &mut Ctx, f: &Field, listener: &str, known: &Known) -> Vec<RouteConfig> {
    let Some(items) = ctx.list(f, "a list of routes") else {
        return Vec::new();
    };
    if items.is_empty() {
        ctx.report(f.pos(), &f.path, "must list at least one route");
    }
    let mut names = Unique::default();
    let mut out = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let (config, name_at) = route(ctx, item, listener, index, known);
        names.insert(ctx, &config.name, &name_at, "route name");
        out.push(config);
    }
    out
}

/// Also returns where the name was written (or the route itself, for a default name).
fn route<'a>(
    ctx: &mut Ctx,
    f: Field<'a>,
    listener: &str,
    index: usize,
    known: &Known,
) -> (RouteConfig, Field<'a>) {
    let upstreams = &known.upstreams;
    let whole = f.clone();
    let mut m = MapReader::open(ctx, Some(f));
    let name_field = m.optional("name");
    let name = name_field
        .as_ref()
        .and_then(|f| ctx.route_name(f))
        .unwrap_or_else(|| format!("{listener}.{index}"));
    let (path_prefix, host, methods, case_insensitive) = route_match(ctx, m.optional("match"));
    let upstream = m
        .required(ctx, "upstream")
        .and_then(|f| ctx.upstream_ref(&f, upstreams));
    let connect_default = upstream
        .as_ref()
        .and_then(|u| upstreams.configs.get(u))
        .map_or(DEFAULT_CONNECT_TIMEOUT, |u| u.connect_timeout);
    let (timeouts, first_byte, idle) =
        route_timeouts(ctx, m.optional("timeouts"), connect_default, &whole);
    ctx.timeout_sites.push(TimeoutSite {
        listener: listener.to_owned(),
        route: name.clone(),
        first_byte,
        idle,
    });
    let config = RouteConfig {
        name,
        path_prefix,
        host,
        methods,
        case_insensitive,
        upstream: upstream.unwrap_or_default(),
        timeouts,
        max_body_bytes: m
            .read(ctx, "max_body", |ctx, f| ctx.bytes(f, 1, MAX_BODY_BYTES))
            .unwrap_or(DEFAULT_MAX_BODY_BYTES),
        rate_limits: m
            .read(ctx, "rate_limits", |ctx, f| {
                ctx.policy_refs(f, &known.policies)
            })
            .unwrap_or_default(),
        upgrades: m
            .read(ctx, "upgrades", upgrades::upgrades)
            .unwrap_or_else(|| {
                upgrades::DEFAULT_UPGRADES
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect()
            }),
    };
    m.finish(ctx);
    (config, name_field.unwrap_or(whole))
}

/// `match`: path prefix, host, methods, case_insensitive.
type RouteMatch = (String, Option<String>, Option<Vec<Method>>, bool);

fn route_match(ctx: &mut Ctx, f: Option<Field>) -> RouteMatch {
    let mut m = MapReader::open(ctx, f);
    let path_prefix = m
        .read(ctx, "path_prefix", |ctx, f| {
            ctx.parse_with(f, "a path", parse_path_prefix)
        })
        .unwrap_or_else(|| DEFAULT_PATH_PREFIX.into());
    let host = m.read(ctx, "host", |ctx, f| {
        ctx.parse_with(f, "a host", parse_host)
    });
    let methods = m.read(ctx, "methods", Ctx::methods);
    let case_insensitive = m
        .read(ctx, "case_insensitive", Ctx::boolean)
        .unwrap_or(false);
    m.finish(ctx);
    (path_prefix, host, methods, case_insensitive)
}

/// Also returns where `first_byte` and `idle` come from (`route`: for a default), for the
/// check that inbound timeouts are longer than egress ones.
fn route_timeouts(
    ctx: &mut Ctx,
    f: Option<Field>,
    connect_default: Duration,
    route: &Field,
) -> (RouteTimeouts, Located, Located) {
    let mut m = MapReader::open(ctx, f);
    let first_byte_at = m.optional("first_byte");
    let first_byte = first_byte_at
        .as_ref()
        .and_then(|f| ctx.duration(f))
        .unwrap_or(DEFAULT_FIRST_BYTE_TIMEOUT);
    let idle_at = m.optional("idle");
    let idle = idle_at
        .as_ref()
        .and_then(|f| ctx.duration(f))
        .unwrap_or(DEFAULT_IDLE_TIMEOUT);
    let first_byte_at = Located::of(first_byte_at.as_ref(), first_byte, route, "first_byte");
    let idle_at = Located::of(idle_at.as_ref(), idle, route, "idle");
    let config = RouteTimeouts {
        connect: m
            .read(ctx, "connect", Ctx::duration)
            .unwrap_or(connect_default),
        first_byte,
        idle,
        total: m.read(ctx, "total", Ctx::duration_or_off).flatten(),
        body: m
            .read(ctx, "body", |ctx, f| {
                ctx.duration_at_most(f, MAX_BODY_TIMEOUT)
            })
            .unwrap_or(DEFAULT_BODY_TIMEOUT),
        min_body_rate: m
            .read(ctx, "min_body_rate", |ctx, f| {
                ctx.parse_with(f, "a rate or off", parse_rate)
            })
            .unwrap_or(Some(DEFAULT_MIN_BODY_RATE)),
    };
    m.finish(ctx);
    (config, first_byte_at, idle_at)
}

// === redis and rate limits ===

/// `redis:`: exactly one of `url` and `sentinel`, plus timeouts and the pool. Returns Some
/// whenever the section is written, even with problems, so `store: redis` is not reported
/// as lacking it.
fn redis(ctx: &mut Ctx, f: Option<Field>) -> Option<RedisConfig> {
    let f = f?;
    let mut m = MapReader::open(ctx, Some(f));
    let url_field = m.optional("url");
    let sentinel_field = m.optional("sentinel");
    let url = url_field
        .as_ref()
        .and_then(|f| ctx.parse_secret(f, "a redis:// URL", parse_redis_url));
    let sentinel = sentinel_field.clone().map(|f| sentinel(ctx, f));
    let timeout = m
        .read(ctx, "timeout", |ctx, f| {
            ctx.duration_at_most(f, MAX_REDIS_TIMEOUT)
        })
        .unwrap_or(DEFAULT_REDIS_TIMEOUT);
    let connect_timeout = m
        .read(ctx, "connect_timeout", |ctx, f| {
            ctx.duration_at_most(f, MAX_REDIS_CONNECT_TIMEOUT)
        })
        .unwrap_or(timeout);
    let pool_max_size = redis_pool(ctx, m.optional("pool"));
    let target = match (&url_field, &sentinel_field) {
        (Some(_), Some(s)) => {
            let path = s.path.clone();
            ctx.report(s.pos(), &path, "give either `url` or `sentinel`, not both");
            None
        }
        (None, None) => {
            if !m.quiet {
                ctx.report(
                    m.pos,
                    &m.path,
                    "missing `url` (\"redis://host:port\") or `sentinel` ({ master, addresses })",
                );
            }
            None
        }
        (Some(_), None) => url.map(RedisTarget::Url),
        (None, Some(_)) => sentinel
            .flatten()
            .map(|(master, addresses)| RedisTarget::Sentinel { master, addresses }),
    };
    m.finish(ctx);
    Some(RedisConfig {
        // A stand-in when broken: the file is refused anyway.
        target: target
            .unwrap_or_else(|| RedisTarget::Url(Secret::new("redis://127.0.0.1:6379".into()))),
        timeout,
        connect_timeout,
        pool_max_size,
    })
}

fn sentinel(ctx: &mut Ctx, f: Field) -> Option<(String, Vec<String>)> {
    let mut m = MapReader::open(ctx, Some(f));
    let master = m.required(ctx, "master").and_then(|f| {
        ctx.parse_with(&f, "a master name", |s| {
            if s.is_empty() || s.chars().any(char::is_whitespace) {
                Err(format!(
                    "expected the master's name as the sentinels know it, got \"{s}\""
                ))
            } else {
                Ok(s.to_owned())
            }
        })
    });
    let addresses = m.required(ctx, "addresses").and_then(|f| {
        let items = ctx.list(&f, "a list of host:port")?;
        if items.is_empty() {
            ctx.report(f.pos(), &f.path, "must list at least one sentinel");
            return None;
        }
        let mut seen = Unique::default();
        let mut out = Vec::new();
        for item in &items {
            if let Some(a) = ctx.parse_with(item, "host:port", parse_host_port)
                && seen.insert(ctx, &a, item, "sentinel address")
            {
                out.push(a);
            }
        }
        (out.len() == items.len()).then_some(out)
    });
    m.finish(ctx);
    Some((master?, addresses?))
}

fn redis_pool(ctx: &mut Ctx, f: Option<Field>) -> u32 {
    let mut m = MapReader::open(ctx, f);
    let max_size = m
        .read(ctx, "max_size", |ctx, f| ctx.int(f, 1, 1024))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(DEFAULT_REDIS_POOL_MAX_SIZE);
    m.finish(ctx);
    max_size
}

/// The decoded policies, and every name written (even broken ones), like [`Upstreams`].
struct Policies {
    configs: BTreeMap<String, RateLimitConfig>,
    known: Vec<String>,
}

fn rate_limits(ctx: &mut Ctx, f: Option<Field>, redis_present: bool) -> Policies {
    let mut out = Policies {
        configs: BTreeMap::new(),
        known: Vec::new(),
    };
    let Some(f) = f else { return out };
    let Some(entries) = ctx.entries(&f) else {
        return out;
    };
    for e in entries {
        let path = child_path(&f.path, &e.key);
        ctx.check_name(&e.key, e.key_pos, &path, "rate limit policy");
        let config = rate_limit(ctx, Field::at(&e.value, path), &e.key, redis_present);
        out.configs.insert(e.key.clone(), config);
    }
    out.known = out.configs.keys().cloned().collect();
    out
}

fn rate_limit(ctx: &mut Ctx, f: Field, name: &str, redis_present: bool) -> RateLimitConfig {
    let mut m = MapReader::open(ctx, Some(f));
    let config = RateLimitConfig {
        name: name.to_owned(),
        points: m
            .read(ctx, "points", |ctx, f| ctx.int(f, 1, MAX_RATE_LIMIT_POINTS))
            .unwrap_or(DEFAULT_RATE_LIMIT_POINTS),
        per: m
            .read(ctx, "per", |ctx, f| {
                ctx.parse_with(f, "a duration", |s| {
                    let d = parse_duration(s)?;
                    // Redis and the memory limiter count in milliseconds.
                    if d < Duration::from_millis(1) {
                        return Err(format!("must be at least 1ms, got \"{s}\""));
                    }
                    Ok(d)
                })
            })
            .unwrap_or(DEFAULT_RATE_LIMIT_PER),
        block_for: m
            .read(ctx, "block_for", Ctx::duration_or_off)
            .unwrap_or(Some(DEFAULT_RATE_LIMIT_BLOCK_FOR)),
        key: m
            .read(ctx, "key", |ctx, f| {
                ctx.parse_with(f, "a key", parse_rate_limit_key)
            })
            .unwrap_or(RateLimitKey {
                per_route: false,
                by: KeySource::ClientIp,
            }),
        store: m
            .read(ctx, "store", |ctx, f| {
                let store = ctx.one_of(
                    f,
                    &[
                        ("redis", RateLimitStore::Redis),
                        ("memory", RateLimitStore::Memory),
                    ],
                )?;
                if store == RateLimitStore::Redis && !redis_present {
                    ctx.report(
                        f.pos(),
                        &f.path,
                        "store redis needs a top-level `redis:` section (url or sentinel)",
                    );
                    return None;
                }
                Some(store)
            })
            .unwrap_or(if redis_present {
                RateLimitStore::Redis
            } else {
                RateLimitStore::Memory
            }),
        ipv6_prefix: m
            .read(ctx, "ipv6_prefix", |ctx, f| ctx.int(f, 1, 128))
            .and_then(|n| u8::try_from(n).ok())
            .unwrap_or(DEFAULT_IPV6_PREFIX),
    };
    m.finish(ctx);
    config
}

// === alerts ===

fn alerts(
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

fn alert_rules(
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

fn alert_rule<'a>(
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
        .unwrap_or(DEFAULT_ALERT_WINDOW);
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
        .unwrap_or(DEFAULT_ALERT_MIN_SAMPLES);
    m.finish(ctx);
    let signal = signal?;
    let rule = AlertRule {
        name: name?,
        signal,
        // Yes/no signals fire while yes; a hit rate alerts when it falls.
        comparison: comparison.unwrap_or(match signal {
            Signal::CacheHitRate => Comparison::Below,
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
fn parse_share(s: &str) -> Result<f64, String> {
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

fn sink(ctx: &mut Ctx, f: Field) -> Option<SinkConfig> {
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
        .unwrap_or(DEFAULT_SINK_TIMEOUT);
    let max_attempts = m
        .read(ctx, "max_attempts", |ctx, f| ctx.int(f, 1, 20))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(DEFAULT_SINK_ATTEMPTS);
    m.finish(ctx);
    Some(SinkConfig {
        kind: kind?,
        url: url?,
        timeout,
        max_attempts,
    })
}

/// An http(s) URL with a host. Not echoed: webhook URLs are credentials.
fn parse_sink_url(s: &str) -> Result<Uri, String> {
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

// === listen address conflicts ===

/// One socket the process will bind, and who asked for it.
struct Bind {
    addr: SocketAddr,
    pos: Pos,
    path: String,
    /// `listener "inbound"` or `admin`.
    owner: String,
    /// `line 7`, or `default 127.0.0.1:9901` for the admin address nobody wrote.
    origin: String,
}

/// Two sockets on one port clash when their IPs are equal or either is the wildcard; the one
/// written later gets the problem. Port 0 asks the kernel for a free port, so never clashes.
fn check_binds(ctx: &mut Ctx, mut binds: Vec<Bind>) {
    binds.sort_by_key(|b| b.pos);
    for (j, later) in binds.iter().enumerate() {
        let port = later.addr.port();
        if port == 0 {
            continue;
        }
        let clash = binds[..j].iter().find(|earlier| {
            earlier.addr.port() == port
                && (earlier.addr.ip() == later.addr.ip()
                    || earlier.addr.ip().is_unspecified()
                    || later.addr.ip().is_unspecified())
        });
        if let Some(earlier) = clash {
            ctx.report(
                later.pos,
                &later.path,
                format!(
                    "port {port} already used by {} ({})",
                    earlier.owner, earlier.origin
                ),
            );
        }
    }
}

// === the reader API ===

/// Collects problems while the tree is read.
pub(super) struct Ctx<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
    /// Every route's timeouts and where they were written, for `layered_timeouts`.
    timeout_sites: Vec<TimeoutSite>,
}

/// A node of the tree and its key path, as messages name it.
#[derive(Debug, Clone)]
pub(super) struct Field<'a> {
    node: &'a Node,
    path: String,
}

impl<'a> Field<'a> {
    fn root(node: &'a Node) -> Self {
        Field::at(node, String::new())
    }

    fn at(node: &'a Node, path: String) -> Self {
        Field { node, path }
    }

    fn pos(&self) -> Pos {
        self.node.pos
    }
}

impl<'e> Ctx<'e> {
    fn new(env: &'e dyn Fn(&str) -> Option<String>) -> Self {
        Ctx {
            env,
            problems: Vec::new(),
            timeout_sites: Vec::new(),
        }
    }

    fn report(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            line: pos.line,
            column: pos.column,
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn wrong_kind(&mut self, f: &Field, expected: &str) {
        let found = f.node.kind.describe();
        self.report(
            f.pos(),
            &f.path,
            format!("expected {expected}, found {found}"),
        );
    }

    /// A scalar's text with `${VAR}` substituted; anything else is reported.
    fn text(&mut self, f: &Field, expected: &str) -> Option<String> {
        let Kind::Scalar(raw) = &f.node.kind else {
            self.wrong_kind(f, expected);
            return None;
        };
        match super::env::interpolate(raw, self.env) {
            Ok(text) => Some(text),
            Err(messages) => {
                for m in messages {
                    self.report(f.pos(), &f.path, m);
                }
                None
            }
        }
    }

    /// A credential's text with `${VAR}` substituted. Problems never quote the value: a
    /// message that would (a malformed reference) says what is wrong without it.
    fn secret(&mut self, f: &Field, expected: &str) -> Option<super::Secret<String>> {
        let Kind::Scalar(raw) = &f.node.kind else {
            self.wrong_kind(f, expected);
            return None;
        };
        match super::env::interpolate(raw, self.env) {
            Ok(text) => Some(super::Secret::new(text)),
            Err(messages) => {
                for m in messages {
                    // "environment variable NAME is not set" names a variable, not the value.
                    let m = if m.starts_with("environment variable ") {
                        m
                    } else {
                        "invalid \"${...}\" reference (the value is not shown: it may hold a secret; \
                         write \"$$\" for a literal \"$\")"
                            .to_owned()
                    };
                    self.report(f.pos(), &f.path, m);
                }
                None
            }
        }
    }

    /// A credential read through `parse`, which must not quote it in its messages.
    fn parse_secret<T>(
        &mut self,
        f: &Field,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<super::Secret<T>> {
        let text = self.secret(f, expected)?;
        match parse(text.expose()) {
            Ok(v) => Some(super::Secret::new(v)),
            Err(message) => {
                self.report(f.pos(), &f.path, message);
                None
            }
        }
    }

    /// Reads a scalar through `parse`, reporting its error message at the value.
    fn parse_with<T>(
        &mut self,
        f: &Field,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.text(f, expected)?;
        match parse(&text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.report(f.pos(), &f.path, message);
                None
            }
        }
    }

    fn list<'a>(&mut self, f: &Field<'a>, expected: &str) -> Option<Vec<Field<'a>>> {
        let Kind::List(items) = &f.node.kind else {
            self.wrong_kind(f, expected);
            return None;
        };
        Some(
            items
                .iter()
                .enumerate()
                .map(|(i, node)| Field::at(node, item_path(&f.path, i)))
                .collect(),
        )
    }

    /// The entries of a mapping whose keys are names chosen by the user (`upstreams`).
    fn entries<'a>(&mut self, f: &Field<'a>) -> Option<&'a [Entry]> {
        match &f.node.kind {
            Kind::Map(entries) => Some(entries),
            _ => {
                self.wrong_kind(f, "a mapping");
                None
            }
        }
    }

    fn boolean(&mut self, f: &Field) -> Option<bool> {
        self.parse_with(f, "true or false", |s| match s {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("expected true or false, got \"{s}\"")),
        })
    }

    fn one_of<T: Copy>(&mut self, f: &Field, choices: &[(&str, T)]) -> Option<T> {
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
    fn int(&mut self, f: &Field, min: u64, max: u64) -> Option<u64> {
        self.parse_with(f, "an integer", |s| {
            let n = parse_int(s)?;
            in_range(n, min, max, s)
        })
    }

    /// An integer in `min..=max`, as a `usize`.
    fn count(&mut self, f: &Field, min: u64, max: u64) -> Option<usize> {
        self.int(f, min, max).and_then(|n| usize::try_from(n).ok())
    }

    /// A byte size in `min..=max`.
    fn bytes(&mut self, f: &Field, min: u64, max: u64) -> Option<u64> {
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
    fn duration(&mut self, f: &Field) -> Option<Duration> {
        self.parse_with(f, "a duration", parse_duration)
    }

    /// A duration greater than 0 and at most `max`: for waits a request meets that are not
    /// its own timeouts (each rate-limited request waits up to `redis.timeout` while Redis
    /// is down; a retried one waits its backoff).
    fn duration_at_most(&mut self, f: &Field, max: Duration) -> Option<Duration> {
        self.parse_with(f, "a duration", |s| {
            let d = parse_duration(s)?;
            if d > max {
                return Err(format!("must be at most {}, got \"{s}\"", bound_text(max)));
            }
            Ok(d)
        })
    }

    /// A duration, 0 allowed (`0s`).
    fn duration_or_zero(&mut self, f: &Field) -> Option<Duration> {
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
    fn duration_or_off(&mut self, f: &Field) -> Option<Option<Duration>> {
        self.parse_with(f, "a duration or off", |s| {
            if s == "off" {
                Ok(None)
            } else {
                parse_duration(s).map(Some)
            }
        })
    }

    fn socket_addr(&mut self, f: &Field) -> Option<SocketAddr> {
        self.parse_with(f, "an address", |s| {
            s.parse().map_err(|_| {
                format!("expected an address like \"0.0.0.0:8080\" or \"[::1]:8080\", got \"{s}\"")
            })
        })
    }

    fn log_filter(&mut self, f: &Field) -> Option<String> {
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
    fn name(&mut self, f: &Field, what: &str) -> Option<String> {
        let name = self.text(f, "a name")?;
        self.check_name(&name, f.pos(), &f.path, what)
            .then_some(name)
    }

    fn check_name(&mut self, name: &str, pos: Pos, path: &str, what: &str) -> bool {
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
    fn route_name(&mut self, f: &Field) -> Option<String> {
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

    fn upstream_ref(&mut self, f: &Field, upstreams: &Upstreams) -> Option<String> {
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
    fn policy_refs(&mut self, f: &Field, policies: &Policies) -> Option<Vec<String>> {
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

    fn methods(&mut self, f: &Field) -> Option<Vec<Method>> {
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

/// Finds a value seen twice; the later one gets the problem.
#[derive(Default)]
struct Unique {
    seen: HashMap<String, Pos>,
}

impl Unique {
    /// False (and reported) if `value` was seen before.
    fn insert(&mut self, ctx: &mut Ctx, value: &str, at: &Field, what: &str) -> bool {
        if let Some(first) = self.seen.get(value) {
            ctx.report(
                at.pos(),
                &at.path,
                format!(
                    "duplicate {what} \"{value}\" (first used at line {})",
                    first.line
                ),
            );
            false
        } else {
            self.seen.insert(value.to_owned(), at.pos());
            true
        }
    }
}

/// Reads one mapping with fixed keys. Remembers which keys were asked for, so `finish` can
/// refuse the others (typos, keys of another version) instead of ignoring them.
pub(super) struct MapReader<'a> {
    entries: &'a [Entry],
    path: String,
    pos: Pos,
    /// The node was not a mapping (already reported) or absent: nothing is required of it.
    quiet: bool,
    known: Vec<&'static str>,
    refused: Vec<&'static str>,
}

impl<'a> MapReader<'a> {
    /// Absent, null or not a mapping (reported) reads as an empty mapping.
    fn open(ctx: &mut Ctx, f: Option<Field<'a>>) -> Self {
        let mut reader = MapReader {
            entries: &[],
            path: String::new(),
            pos: Pos::default(),
            quiet: true,
            known: Vec::new(),
            refused: Vec::new(),
        };
        if let Some(f) = f {
            match &f.node.kind {
                Kind::Map(entries) => {
                    reader.entries = entries;
                    reader.quiet = false;
                }
                _ => ctx.wrong_kind(&f, "a mapping"),
            }
            reader.pos = f.pos();
            reader.path = f.path;
        }
        reader
    }

    fn entry(&self, key: &str) -> Option<&'a Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The value of `key`; None if absent or null (null means "use the default").
    fn optional(&mut self, key: &'static str) -> Option<Field<'a>> {
        self.known.push(key);
        let e = self.entry(key)?;
        match e.value.kind {
            Kind::Null => None,
            _ => Some(Field::at(&e.value, child_path(&self.path, key))),
        }
    }

    fn required(&mut self, ctx: &mut Ctx, key: &'static str) -> Option<Field<'a>> {
        self.known.push(key);
        let Some(e) = self.entry(key) else {
            if !self.quiet {
                ctx.report(
                    self.pos,
                    &self.path,
                    format!("missing required key \"{key}\""),
                );
            }
            return None;
        };
        let path = child_path(&self.path, key);
        if let Kind::Null = e.value.kind {
            ctx.report(
                e.key_pos,
                &path,
                format!("missing value for required key \"{key}\""),
            );
            return None;
        }
        Some(Field::at(&e.value, path))
    }

    /// An optional value through one of the `Ctx` readers.
    fn read<'e, T>(
        &mut self,
        ctx: &mut Ctx<'e>,
        key: &'static str,
        reader: impl FnOnce(&mut Ctx<'e>, &Field<'a>) -> Option<T>,
    ) -> Option<T> {
        let f = self.optional(key)?;
        reader(ctx, &f)
    }

    /// A key this version knows about but does not accept.
    fn refuse(&mut self, ctx: &mut Ctx, key: &'static str, message: String) {
        self.refused.push(key);
        if let Some(e) = self.entry(key) {
            ctx.report(e.key_pos, &child_path(&self.path, key), message);
        }
    }

    /// Reports every key that was neither read nor refused.
    fn finish(self, ctx: &mut Ctx) {
        for e in self.entries {
            let key = e.key.as_str();
            if self.known.contains(&key) || self.refused.contains(&key) {
                continue;
            }
            let mut message = format!("unknown key \"{key}\"");
            if let Some(s) = suggest(key, &self.known) {
                let _ = write!(message, ", did you mean \"{s}\"?");
            }
            let _ = write!(message, " (known keys: {})", self.known.join(", "));
            ctx.report(e.key_pos, &child_path(&self.path, key), message);
        }
    }
}

/// The known key closest to `key`, if within 2 edits (and not a rewrite of a short key).
fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2 && *d < key.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// === scalar parsers: text -> value, or the message ===

/// Optional sign and decimal digits; the sign is kept so "-3" can be reported as such.
fn parse_int(s: &str) -> Result<i128, String> {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected an integer, got \"{s}\""));
    }
    // Only overflow can fail here: treat as "very large" and let the range check speak.
    Ok(s.parse::<i128>().unwrap_or(if s.starts_with('-') {
        i128::MIN
    } else {
        i128::MAX
    }))
}

fn in_range(n: i128, min: u64, max: u64, text: &str) -> Result<u64, String> {
    if n < i128::from(min) {
        return Err(if min == 1 {
            format!("must be greater than 0, got {text}")
        } else {
            format!("must be at least {min}, got {text}")
        });
    }
    u64::try_from(n)
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("must be at most {max}, got {text}"))
}

/// Integer bytes, or an integer with a unit: KiB, MiB, GiB (powers of 1024), KB, MB, GB
/// (powers of 1000), or B.
fn parse_bytes(s: &str) -> Result<i128, String> {
    let bad =
        || format!("expected a byte size like \"64KiB\", \"10MiB\" or \"1048576\", got \"{s}\"");
    let t = s.trim();
    let split = t
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || (*i == 0 && matches!(c, '-' | '+'))))
        .map_or(t.len(), |(i, _)| i);
    let (number, unit) = t.split_at(split);
    let multiplier: i128 = match unit.trim_start() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let n = parse_int(number).map_err(|_| bad())?;
    Ok(n.saturating_mul(multiplier))
}

/// For messages: 8192 -> "8KiB".
fn format_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    n.to_string()
}

/// Bytes per second: a byte size followed by `/s` ("500B/s", "1KiB/s"), 1 B/s to 1 GiB/s;
/// or `off`.
fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t == "off" {
        return Ok(None);
    }
    let bad = || format!("expected a rate like \"500B/s\" or \"1KiB/s\", or off, got \"{s}\"");
    let size = t.strip_suffix("/s").ok_or_else(bad)?;
    let n = parse_bytes(size).map_err(|_| bad())?;
    in_range(n, 1, MAX_MIN_BODY_RATE, s)
        .map(Some)
        .map_err(|e| match n {
            n if n > i128::from(MAX_MIN_BODY_RATE) => {
                format!("must be at most 1GiB/s, got \"{s}\"")
            }
            _ => e,
        })
}

/// humantime's syntax ("250ms", "30s", "1m30s"), greater than 0. A bare number is refused:
/// nobody can tell whether `30` means seconds or milliseconds.
/// A bound as the file would write it: whole hours as "24h" (humantime says "1day"),
/// whole minutes as "5m", anything else as humantime writes it.
fn bound_text(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs > 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if d.subsec_nanos() == 0 && secs > 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || format!("expected a duration like \"250ms\", \"30s\" or \"5m\", got \"{s}\"");
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("must be greater than 0, got \"{s}\""));
    }
    if t.parse::<f64>().is_ok() {
        return Err(expected());
    }
    let d = humantime::parse_duration(t).map_err(|_| expected())?;
    if d.is_zero() {
        return Err(format!("must be greater than 0, got \"{s}\""));
    }
    if d > MAX_DURATION {
        return Err(format!("must be at most 365 days, got \"{s}\""));
    }
    Ok(d)
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (the whole /32 or /128).
fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let expected =
        || format!("expected an address or block like \"10.0.0.0/8\" or \"::1\", got \"{s}\"");
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (s, None),
    };
    let addr: IpAddr = ip.parse().map_err(|_| expected())?;
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => {
                    return Err(format!(
                        "prefix /{p} is out of range for an IPv{} address (0 to {max})",
                        if addr.is_ipv4() { 4 } else { 6 }
                    ));
                }
            }
        }
        Some(_) => return Err(expected()),
    };
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    if network != addr {
        // Probably a typo for either the network or the prefix; do not guess silently.
        return Err(format!(
            "\"{s}\" has host bits set: did you mean \"{network}/{prefix}\"?"
        ));
    }
    Ok(Cidr { addr, prefix })
}

/// `http(s)://host[:port][/]`, stored with its port explicit and path "/".
fn parse_endpoint(s: &str) -> Result<Uri, String> {
    let expected = || {
        format!(
            "expected a URL like \"http://10.0.0.5:3001\" or \"https://api.example.com\", got \"{s}\""
        )
    };
    let uri: Uri = s.parse().map_err(|_| expected())?;
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        Some(other) => {
            return Err(format!(
                "unsupported scheme \"{other}\" in \"{s}\": use http or https"
            ));
        }
        None => return Err(expected()),
    };
    let authority = uri.authority().ok_or_else(expected)?;
    if authority.as_str().contains('@') {
        // Not echoed: it may hold a password.
        return Err("user info (user:password@) is not allowed in endpoint URLs".into());
    }
    if authority.host().is_empty() {
        return Err(expected());
    }
    if let Some(pq) = uri.path_and_query() {
        if !matches!(pq.path(), "" | "/") {
            return Err(format!(
                "endpoint URLs cannot have a path (\"{}\" in \"{s}\"): routes forward the request path as is",
                pq.path()
            ));
        }
        if pq.query().is_some() {
            return Err(format!("endpoint URLs cannot have a query (in \"{s}\")"));
        }
    }
    let port = written_port(authority)
        .map_err(|p| format!("port \"{p}\" is not a port number (1 to 65535) in \"{s}\""))?
        .unwrap_or(default_port);
    if port == 0 {
        return Err(format!("port 0 is not a valid upstream port (in \"{s}\")"));
    }
    Uri::builder()
        .scheme(uri.scheme_str().unwrap_or("http"))
        .authority(format!("{}:{port}", authority.host().to_ascii_lowercase()))
        .path_and_query("/")
        .build()
        .map_err(|_| expected())
}

/// The port written in an authority, if any. `http::uri::Authority::port` answers `None`
/// for a port it cannot read as a u16 (`:99999`), the same as for no port at all; here
/// that is an error carrying the text written.
fn written_port(authority: &http::uri::Authority) -> Result<Option<u16>, String> {
    let text = authority.as_str();
    let host_port = text.rsplit_once('@').map_or(text, |(_, hp)| hp);
    let after_host = match host_port.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or("", |(_, after)| after),
        None => host_port.find(':').map_or("", |i| &host_port[i..]),
    };
    match after_host.strip_prefix(':') {
        None => Ok(None),
        Some(digits) => match digits.parse::<u16>() {
            Ok(p) if digits.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(p)),
            _ => Err(digits.to_owned()),
        },
    }
}

/// `redis://[:password@]host[:port][/db]`. The text is not echoed when it holds a password.
fn parse_redis_url(s: &str) -> Result<String, String> {
    let shown = if s.contains('@') {
        "a URL with credentials (not shown)".to_owned()
    } else {
        format!("\"{s}\"")
    };
    if s.starts_with("rediss://") {
        return Err(
            "TLS to Redis (rediss://) is not supported by this version: use redis://".into(),
        );
    }
    if !s.starts_with("redis://") {
        return Err(format!(
            "expected a URL like \"redis://127.0.0.1:6379\", got {shown}"
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(s)
        .map_err(|_| format!("invalid Redis URL: {shown}"))?;
    Ok(s.to_owned())
}

/// `host:port` or `[v6]:port`, port 1..=65535; kept as written (host names are resolved
/// when connecting, not here).
fn parse_host_port(s: &str) -> Result<String, String> {
    let expected = || format!("expected host:port like \"10.0.0.5:26379\", got \"{s}\"");
    let (host, port) = s.rsplit_once(':').ok_or_else(expected)?;
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(s.to_owned()),
        _ => Err(expected()),
    }
}

/// `client_ip`, `header:NAME`, `route+client_ip` or `route+header:NAME`.
fn parse_rate_limit_key(s: &str) -> Result<RateLimitKey, String> {
    let expected = || {
        format!(
            "expected client_ip, header:NAME, route+client_ip or route+header:NAME, got \"{s}\""
        )
    };
    let (per_route, rest) = match s.strip_prefix("route+") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let by = if rest == "client_ip" {
        KeySource::ClientIp
    } else if let Some(name) = rest.strip_prefix("header:") {
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("invalid header name \"{name}\" in \"{s}\""))?;
        KeySource::Header(name)
    } else {
        return Err(expected());
    };
    Ok(RateLimitKey { per_route, by })
}

fn parse_path_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("must start with \"/\", got \"{s}\""));
    }
    if s.contains(['?', '#']) || s.chars().any(char::is_whitespace) {
        return Err(format!(
            "must be a plain path without query, fragment or spaces, got \"{s}\""
        ));
    }
    // Requests are matched in normal form (crate::path): a prefix in another form would
    // never match, or match other paths than it says.
    let opts = crate::path::Options {
        merge_slashes: true,
        reject_escaped_slashes: false,
        cut_params: true,
    };
    match crate::path::normalize(s, opts) {
        Ok(n) if n == s => Ok(s.to_owned()),
        Ok(n) => Err(format!(
            "must be a normalised path (no \".\" or \"..\" segments, \"//\", \";\" parameters, \
             or percent-encoded letters, digits or \"-._~\"; upper-case hex), \
             here \"{n}\", got \"{s}\""
        )),
        Err(e) => Err(format!("{}, got \"{s}\"", e.message())),
    }
}

/// Stored lowercased and without a port: the router compares it with the request's host.
fn parse_host(s: &str) -> Result<String, String> {
    let expected = || format!("expected a host name like \"api.example.com\", got \"{s}\"");
    if s.contains(['@', '/', '*']) {
        return Err(if s.contains('*') {
            format!("wildcard hosts are not supported, got \"{s}\"")
        } else {
            expected()
        });
    }
    let authority: http::uri::Authority = s.parse().map_err(|_| expected())?;
    let host = authority.host();
    if host.is_empty() {
        return Err(expected());
    }
    Ok(host.to_ascii_lowercase())
}

fn parse_method(s: &str) -> Result<Method, String> {
    let is_token = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !is_token {
        return Err(format!("invalid HTTP method \"{s}\""));
    }
    if s.bytes().any(|b| b.is_ascii_lowercase()) {
        // Methods are case-sensitive: "get" would never match a GET request.
        return Err(format!(
            "HTTP methods are case-sensitive: \"{s}\" must be upper case, did you mean \"{}\"?",
            s.to_ascii_uppercase()
        ));
    }
    Method::from_bytes(s.as_bytes()).map_err(|_| format!("invalid HTTP method \"{s}\""))
}

// === upstream resilience: load balancing, breaker, ejection, retries, shedding ===

fn resilience(ctx: &mut Ctx, m: &mut MapReader) -> Resilience {
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
            .map(|f| health::upstream_health_check(ctx, f)),
    }
}

fn small_count(ctx: &mut Ctx, f: &Field) -> Option<u32> {
    ctx.int(f, 1, 1_000_000).and_then(|n| u32::try_from(n).ok())
}

fn breaker(ctx: &mut Ctx, f: Option<Field>) -> BreakerConfig {
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
        count_500: m.read(ctx, "count_500", Ctx::boolean).unwrap_or(false),
        count_backoff: m.read(ctx, "count_backoff", Ctx::boolean).unwrap_or(false),
    };
    m.finish(ctx);
    config
}

fn failure_rate(ctx: &mut Ctx, f: Field) -> FailureRate {
    let mut m = MapReader::open(ctx, Some(f));
    let config = FailureRate {
        threshold: m
            .read(ctx, "threshold", |ctx, f| {
                ctx.parse_with(f, "a percentage", parse_percent)
            })
            .unwrap_or(0.5),
        window: m
            .read(ctx, "window", Ctx::duration)
            .unwrap_or(Duration::from_secs(30)),
        min_calls: m.read(ctx, "min_calls", small_count).unwrap_or(20),
    };
    m.finish(ctx);
    config
}

/// "50%" -> 0.5; more than 0 and at most 100 %.
fn parse_percent(s: &str) -> Result<f64, String> {
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

fn ejection(ctx: &mut Ctx, f: Option<Field>) -> EjectionConfig {
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

fn retry(ctx: &mut Ctx, f: Option<Field>) -> RetryConfig {
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

fn retry_on(ctx: &mut Ctx, f: &Field) -> Option<Vec<RetryOn>> {
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
    use crate::config::DependenciesConfig;

    /// Strips the common indentation (and the first newline) so YAML can be written
    /// indented in the test; line 1 is the first line after the opening quote.
    fn yaml(text: &str) -> String {
        let text = text.strip_prefix('\n').unwrap_or(text);
        let indent = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        text.lines()
            .map(|l| l.get(indent..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "BACKEND_URL" => Some("http://10.0.0.7:3001".into()),
            "LISTEN_PORT" => Some("8088".into()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_str(&yaml(text), "proxy.yaml", &env)
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Ok(c) => panic!("expected problems, got {c:#?}"),
            Err(e) => e.problems,
        }
    }

    /// Exactly one problem, at `line:column` with `path`, its message containing `message`.
    fn only(text: &str, line: usize, column: usize, path: &str, message: &str) {
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:#?}");
        check(&p[0], line, column, path, message);
    }

    fn check(p: &Problem, line: usize, column: usize, path: &str, message: &str) {
        assert_eq!(
            (p.line, p.column, p.path.as_str()),
            (line, column, path),
            "{p:#?}"
        );
        assert!(
            p.message.contains(message),
            "message {:?} does not contain {message:?}",
            p.message
        );
    }

    fn ok(text: &str) -> Config {
        match parse(text) {
            Ok(c) => c,
            Err(e) => panic!("unexpected problems:\n{e}"),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    const MINIMAL: &str = "
        listeners:
          - name: inbound
            listen: 0.0.0.0:8080
            routes:
              - upstream: backend
        upstreams:
          backend:
            endpoints: [\"http://127.0.0.1:3001\"]
    ";

    #[test]
    fn minimal_config_gets_every_default() {
        let expected = Config {
            source: "proxy.yaml".into(),
            admin: AdminConfig {
                listen: "127.0.0.1:9901".parse().unwrap(),
                token: None,
                insecure_no_token: false,
                allowed_hosts: Vec::new(),
            },
            logging: LoggingConfig {
                level: "info".into(),
                format: LogFormat::Text,
                access_log: true,
            },
            trusted_proxies: vec![],
            listeners: vec![ListenerConfig {
                name: "inbound".into(),
                listen: "0.0.0.0:8080".parse().unwrap(),
                max_connections: 10_000,
                header_read_timeout: secs(10),
                max_header_bytes: 64 * 1024,
                max_headers: 100,
                http2: Http2Config {
                    max_concurrent_streams: 100,
                    max_pending_accept_reset_streams: 20,
                    max_local_error_reset_streams: 1024,
                    idle_timeout: secs(180),
                },
                max_in_flight: None,
                drain: DrainMode::Inbound,
                health_path: None,
                path: PathConfig::default(),
                routes: vec![RouteConfig {
                    name: "inbound.0".into(),
                    path_prefix: "/".into(),
                    host: None,
                    methods: None,
                    case_insensitive: false,
                    upstream: "backend".into(),
                    timeouts: RouteTimeouts {
                        connect: secs(5),
                        first_byte: secs(30),
                        idle: secs(60),
                        total: None,
                        body: secs(60),
                        min_body_rate: Some(500),
                    },
                    max_body_bytes: 10 * 1024 * 1024,
                    rate_limits: vec![],
                    upgrades: vec!["websocket".into()],
                }],
            }],
            upstreams: BTreeMap::from([(
                "backend".to_string(),
                UpstreamConfig {
                    name: "backend".into(),
                    endpoints: vec![uri("http://127.0.0.1:3001/")],
                    connect_timeout: secs(5),
                    client: UpstreamClient::Rampart,
                    tls_ca_file: None,
                    resilience: Resilience::default(),
                    pool: PoolConfig {
                        idle_timeout: secs(4),
                        max_idle_per_endpoint: 256,
                    },
                },
            )]),
            redis: None,
            replicas: 1,
            rate_limits: BTreeMap::new(),
            drain: DrainConfig {
                accept_grace: secs(5),
                timeout: secs(30),
            },
            dependencies: DependenciesConfig::default(),
            readiness: ReadinessConfig::default(),
            alerts: AlertsConfig::default(),
        };
        assert_eq!(ok(MINIMAL), expected);
    }

    #[test]
    fn every_key_set_explicitly() {
        let config = ok(r#"
            admin:
              listen: "[::1]:9902"
            logging:
              level: "rampart=debug,info"
              format: json
              access_log: false
            trusted_proxies: ["10.0.0.0/8", "::1", "192.168.1.7", "fd00::/8"]
            listeners:
              - name: inbound
                listen: "0.0.0.0:8080"
                max_connections: 500
                header_read_timeout: 2s
                max_header_bytes: 16KiB
                max_headers: 50
                http2:
                  max_concurrent_streams: 64
                  max_pending_accept_reset_streams: 10
                  max_local_error_reset_streams: 512
                  idle_timeout: 30s
                drain: egress
                routes:
                  - name: chat
                    match:
                      path_prefix: /api/chat
                      host: API.Example.com:443
                      methods: [GET, POST]
                    upstream: fastgpt
                    timeouts:
                      connect: 1s
                      first_byte: 1m30s
                      idle: 250ms
                      total: 1h
                      body: 20s
                      min_body_rate: 1KiB/s
                    max_body: 2MB
                  - match:
                      path_prefix: /
                    upstream: backend
                    timeouts:
                      total: off
                      min_body_rate: off
                    max_body: 1048576
            upstreams:
              backend:
                endpoints: ["http://127.0.0.1:3001", "http://127.0.0.1:3002/"]
                connect_timeout: 2s
                pool:
                  idle_timeout: 3s
                  max_idle_per_endpoint: 0
              fastgpt:
                endpoints: ["https://fastgpt.example.com"]
            drain:
              accept_grace: 0s
              timeout: 1m
        "#);
        let expected = Config {
            source: "proxy.yaml".into(),
            admin: AdminConfig {
                listen: "[::1]:9902".parse().unwrap(),
                token: None,
                insecure_no_token: false,
                allowed_hosts: Vec::new(),
            },
            logging: LoggingConfig {
                level: "rampart=debug,info".into(),
                format: LogFormat::Json,
                access_log: false,
            },
            trusted_proxies: vec![
                Cidr {
                    addr: "10.0.0.0".parse().unwrap(),
                    prefix: 8,
                },
                Cidr {
                    addr: "::1".parse().unwrap(),
                    prefix: 128,
                },
                Cidr {
                    addr: "192.168.1.7".parse().unwrap(),
                    prefix: 32,
                },
                Cidr {
                    addr: "fd00::".parse().unwrap(),
                    prefix: 8,
                },
            ],
            listeners: vec![ListenerConfig {
                name: "inbound".into(),
                listen: "0.0.0.0:8080".parse().unwrap(),
                max_connections: 500,
                header_read_timeout: secs(2),
                max_header_bytes: 16 * 1024,
                max_headers: 50,
                http2: Http2Config {
                    max_concurrent_streams: 64,
                    max_pending_accept_reset_streams: 10,
                    max_local_error_reset_streams: 512,
                    idle_timeout: secs(30),
                },
                max_in_flight: None,
                drain: DrainMode::Egress,
                health_path: None,
                path: PathConfig::default(),
                routes: vec![
                    RouteConfig {
                        name: "chat".into(),
                        path_prefix: "/api/chat".into(),
                        host: Some("api.example.com".into()),
                        methods: Some(vec![Method::GET, Method::POST]),
                        case_insensitive: false,
                        upstream: "fastgpt".into(),
                        timeouts: RouteTimeouts {
                            connect: secs(1),
                            first_byte: secs(90),
                            idle: Duration::from_millis(250),
                            total: Some(secs(3600)),
                            body: secs(20),
                            min_body_rate: Some(1024),
                        },
                        rate_limits: vec![],
                        max_body_bytes: 2_000_000,
                        upgrades: vec!["websocket".into()],
                    },
                    RouteConfig {
                        name: "inbound.1".into(),
                        path_prefix: "/".into(),
                        host: None,
                        methods: None,
                        case_insensitive: false,
                        upstream: "backend".into(),
                        timeouts: RouteTimeouts {
                            // Inherited from the upstream.
                            connect: secs(2),
                            first_byte: secs(30),
                            idle: secs(60),
                            total: None,
                            body: secs(60),
                            min_body_rate: None,
                        },
                        rate_limits: vec![],
                        max_body_bytes: 1_048_576,
                        upgrades: vec!["websocket".into()],
                    },
                ],
            }],
            upstreams: BTreeMap::from([
                (
                    "backend".to_string(),
                    UpstreamConfig {
                        name: "backend".into(),
                        endpoints: vec![
                            uri("http://127.0.0.1:3001/"),
                            uri("http://127.0.0.1:3002/"),
                        ],
                        connect_timeout: secs(2),
                        client: UpstreamClient::Rampart,
                        tls_ca_file: None,
                        resilience: Resilience::default(),
                        pool: PoolConfig {
                            idle_timeout: secs(3),
                            max_idle_per_endpoint: 0,
                        },
                    },
                ),
                (
                    "fastgpt".to_string(),
                    UpstreamConfig {
                        name: "fastgpt".into(),
                        endpoints: vec![uri("https://fastgpt.example.com:443/")],
                        connect_timeout: secs(5),
                        client: UpstreamClient::Rampart,
                        tls_ca_file: None,
                        resilience: Resilience::default(),
                        pool: PoolConfig {
                            idle_timeout: secs(4),
                            max_idle_per_endpoint: 256,
                        },
                    },
                ),
            ]),
            redis: None,
            replicas: 1,
            rate_limits: BTreeMap::new(),
            drain: DrainConfig {
                accept_grace: Duration::ZERO,
                timeout: secs(60),
            },
            dependencies: DependenciesConfig::default(),
            readiness: ReadinessConfig::default(),
            alerts: AlertsConfig::default(),
        };
        assert_eq!(config, expected);
        // The port is explicit in what the forwarder sees.
        assert_eq!(
            config.upstreams["fastgpt"].endpoints[0].port_u16(),
            Some(443)
        );
    }

    #[test]
    fn empty_file_is_one_problem() {
        for text in ["", "# only a comment\n"] {
            let p = parse_str(text, "proxy.yaml", &env).unwrap_err().problems;
            assert_eq!(p.len(), 1);
            check(
                &p[0],
                1,
                1,
                "",
                "empty configuration: expected a mapping with `listeners` and `upstreams`",
            );
        }
    }

    #[test]
    fn yaml_syntax_error() {
        only(
            "
            listeners:
              - name: inbound
               listen: 0.0.0.0:8080
            ",
            3,
            10,
            "",
            "YAML syntax error",
        );
    }

    #[test]
    fn duplicate_key() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                listen: 0.0.0.0:8081
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 1, "{p:#?}");
        check(
            &p[0],
            4,
            5,
            "listeners[0].listen",
            "duplicate key \"listen\" (first defined at line 3)",
        );
    }

    #[test]
    fn duplicate_key_does_not_hide_other_problems() {
        let p = problems(
            "
            logging:
              format: xml
            listeners:
              - name: inbound
                name: again
                listen: 0.0.0.0:8080
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            2,
            11,
            "logging.format",
            "expected one of text, json, got \"xml\"",
        );
        check(&p[1], 5, 5, "listeners[0].name", "duplicate key \"name\"");
    }

    #[test]
    fn unknown_key_with_suggestion() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listn: 0.0.0.0:8080
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            2,
            5,
            "listeners[0]",
            "missing required key \"listen\"",
        );
        check(
            &p[1],
            3,
            5,
            "listeners[0].listn",
            "unknown key \"listn\", did you mean \"listen\"? (known keys: name, listen, max_connections, header_read_timeout, max_header_bytes, max_headers, http2, max_in_flight, drain, health_path, normalize_path, merge_slashes, escaped_slashes, routes)",
        );
    }

    #[test]
    fn unknown_key_far_from_any_gets_no_suggestion() {
        let p = problems(&format!("{MINIMAL}\n        frobnicate: 1\n"));
        assert_eq!(p.len(), 1, "{p:#?}");
        check(
            &p[0],
            10,
            1,
            "frobnicate",
            "unknown key \"frobnicate\" (known keys: admin,",
        );
        assert!(!p[0].message.contains("did you mean"));
    }

    #[test]
    fn future_sections_are_refused_by_name() {
        let p = problems(&format!(
            "{MINIMAL}\n        caches:\n          x: 1\n        tls: {{}}\n"
        ));
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            10,
            1,
            "caches",
            "section \"caches\" is not supported by this version of rampart",
        );
        check(&p[1], 12, 1, "tls", "section \"tls\" is not supported");
    }

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
                "CircuitBreakerOpen"
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

    #[test]
    fn admin_token_is_checked_and_never_printed() {
        let c = ok(&format!(
            "{MINIMAL}\n        admin: {{ token: 0123456789abcdef-long }}\n"
        ));
        assert_eq!(
            c.admin.token.as_ref().map(|t| t.expose().as_str()),
            Some("0123456789abcdef-long")
        );
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        only(
            &format!("{MINIMAL}\n        admin: {{ token: short }}\n"),
            10,
            17,
            "admin.token",
            "expected at least 16 visible ASCII characters",
        );
    }

    #[test]
    fn a_broken_reference_in_a_secret_never_quotes_it() {
        for (value, message) in [
            (
                "\"zqsecret${BROKEN\"",
                "invalid \"${...}\" reference (the value is not shown",
            ),
            (
                "\"zqsecret${1X}zq\"",
                "invalid \"${...}\" reference (the value is not shown",
            ),
            (
                "\"zqsecret${UNSET_VAR}\"",
                "environment variable UNSET_VAR is not set",
            ),
        ] {
            for key in [
                format!("admin: {{ token: {value} }}"),
                format!("redis: {{ url: {value} }}"),
                format!("alerts: {{ sinks: [{{ type: webhook, url: {value} }}] }}"),
                format!("dependencies: {{ postgres: {{ url: {value} }} }}"),
            ] {
                let text = format!("{MINIMAL}\n        {key}\n");
                let err = parse(&text).unwrap_err().to_string();
                assert!(err.contains(message), "{key}: {err}");
                assert!(!err.contains("zq"), "{key}: {err}");
            }
        }
    }

    #[test]
    fn drain_section_is_checked() {
        // The grace must leave time to stop accepting before the deadline.
        only(
            &format!("{MINIMAL}\n        drain: {{ accept_grace: 30s, timeout: 30s }}\n"),
            10,
            24,
            "drain.accept_grace",
            "must be less than drain.timeout (30s), got 30s",
        );
        // The default grace (5s) against a short timeout is reported at the timeout.
        only(
            &format!("{MINIMAL}\n        drain:\n          timeout: 2s\n"),
            11,
            12,
            "drain.timeout",
            "must be more than drain.accept_grace (5s by default), got 2s",
        );
        only(
            &format!("{MINIMAL}\n        drain: {{ timeout: 0s }}\n"),
            10,
            19,
            "drain.timeout",
            "must be greater than 0",
        );
        only(
            &format!("{MINIMAL}\n        drain: {{ accept_grace: 5 }}\n"),
            10,
            24,
            "drain.accept_grace",
            "expected a duration like",
        );
        only(
            &format!("{MINIMAL}\n        drain: {{ acept_grace: 1s }}\n"),
            10,
            10,
            "drain.acept_grace",
            "did you mean \"accept_grace\"?",
        );
        let c = ok(&format!(
            "{MINIMAL}\n        drain: {{ accept_grace: 0, timeout: 3s }}\n"
        ));
        assert_eq!(c.drain.accept_grace, Duration::ZERO);
        assert_eq!(c.drain.timeout, secs(3));
    }

    #[test]
    fn listener_drain_mode_is_inbound_or_egress() {
        only(
            &MINIMAL.replace("routes:", "drain: outbound\n            routes:"),
            4,
            12,
            "listeners[0].drain",
            "expected one of inbound, egress, got \"outbound\"",
        );
    }

    #[test]
    fn listener_path_options() {
        let c = parse_str(
            &MINIMAL.replace(
                "routes:",
                "normalize_path: forward\n            merge_slashes: false\n            \
                 escaped_slashes: keep\n            routes:",
            ),
            "proxy.yaml",
            &|_| None,
        )
        .unwrap();
        let want = PathConfig {
            normalize: NormalizePath::Forward,
            merge_slashes: false,
            escaped_slashes: EscapedSlashes::Keep,
        };
        assert_eq!(c.listeners[0].path, want);
        let p = problems(&MINIMAL.replace(
            "routes:",
            "normalize_path: true\n            escaped_slashes: decode\n            routes:",
        ));
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            4,
            21,
            "listeners[0].normalize_path",
            "expected one of match, forward, off, got \"true\"",
        );
        check(
            &p[1],
            5,
            22,
            "listeners[0].escaped_slashes",
            "expected one of reject, keep, got \"decode\"",
        );
    }

    #[test]
    fn path_prefixes_are_in_normal_form() {
        for (prefix, message) in [
            ("/a//b", "here \"/a/b\", got \"/a//b\""),
            ("/a/./b", "here \"/a/b\""),
            ("/a/../b", "here \"/b\""),
            ("/a;v=1", "here \"/a\""),
            ("/%61pi", "here \"/api\""),
            ("/a%2fb", "here \"/a%2Fb\""),
            ("/..", "path climbs above the root, got \"/..\""),
            ("/a%zz", "invalid percent-encoding in the path"),
        ] {
            let text = MINIMAL.replace(
                "- upstream: backend",
                &format!(
                    "- upstream: backend\n                match: {{path_prefix: \"{prefix}\"}}"
                ),
            );
            only(
                &text,
                6,
                30,
                "listeners[0].routes[0].match.path_prefix",
                message,
            );
        }
        let text = MINIMAL.replace(
            "- upstream: backend",
            "- upstream: backend\n                match: {path_prefix: \"/A%2Fb/\", case_insensitive: true}",
        );
        let c = parse_str(&text, "proxy.yaml", &|_| None).unwrap();
        assert_eq!(c.listeners[0].routes[0].path_prefix, "/A%2Fb/");
        assert!(c.listeners[0].routes[0].case_insensitive);
    }

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
    fn bad_duration() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                header_read_timeout: 30
                routes:
                  - upstream: backend
                    timeouts:
                      connect: 5 parsecs
                      first_byte: 0s
                      idle: -5s
                      total: forever
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
                connect_timeout: 400days
            ",
        );
        assert_eq!(p.len(), 6, "{p:#?}");
        check(
            &p[0],
            4,
            26,
            "listeners[0].header_read_timeout",
            "expected a duration like \"250ms\", \"30s\" or \"5m\", got \"30\"",
        );
        check(
            &p[1],
            8,
            20,
            "listeners[0].routes[0].timeouts.connect",
            "got \"5 parsecs\"",
        );
        check(
            &p[2],
            9,
            23,
            "listeners[0].routes[0].timeouts.first_byte",
            "must be greater than 0",
        );
        check(
            &p[3],
            10,
            17,
            "listeners[0].routes[0].timeouts.idle",
            "must be greater than 0",
        );
        check(
            &p[4],
            11,
            18,
            "listeners[0].routes[0].timeouts.total",
            "got \"forever\"",
        );
        check(
            &p[5],
            15,
            22,
            "upstreams.backend.connect_timeout",
            "must be at most 365 days",
        );
    }

    #[test]
    fn slow_client_timeouts_have_bounds() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                http2: { idle_timeout: 25h }
                routes:
                  - upstream: backend
                    timeouts:
                      body: 2h
                      min_body_rate: 500
                  - upstream: backend
                    timeouts: { body: 0s, min_body_rate: 2GiB/s }
                  - upstream: backend
                    timeouts: { min_body_rate: 0B/s }
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 6, "{p:#?}");
        check(
            &p[0],
            4,
            28,
            "listeners[0].http2.idle_timeout",
            "must be at most 24h, got \"25h\"",
        );
        check(
            &p[1],
            8,
            17,
            "listeners[0].routes[0].timeouts.body",
            "must be at most 1h, got \"2h\"",
        );
        check(
            &p[2],
            9,
            26,
            "listeners[0].routes[0].timeouts.min_body_rate",
            "expected a rate like \"500B/s\" or \"1KiB/s\", or off, got \"500\"",
        );
        check(
            &p[3],
            11,
            27,
            "listeners[0].routes[1].timeouts.body",
            "must be greater than 0",
        );
        check(
            &p[4],
            11,
            46,
            "listeners[0].routes[1].timeouts.min_body_rate",
            "must be at most 1GiB/s, got \"2GiB/s\"",
        );
        check(
            &p[5],
            13,
            36,
            "listeners[0].routes[2].timeouts.min_body_rate",
            "must be greater than 0, got 0B/s",
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

    /// `http::Uri` keeps a port it cannot read as a u16 in the text but answers `None` for
    /// it, which read as "no port": traffic for :99999 went to :80.
    #[test]
    fn ports_out_of_range_are_refused_not_defaulted() {
        for (url, port) in [
            ("http://10.0.0.5:99999", "99999"),
            ("http://10.0.0.5:65536", "65536"),
            ("https://api.example.com:4294967297", "4294967297"),
            ("http://[::1]:70000", "70000"),
            ("http://10.0.0.5:", ""),
        ] {
            let e = parse_endpoint(url).unwrap_err();
            assert!(
                e.contains(&format!(
                    "port \"{port}\" is not a port number (1 to 65535)"
                )),
                "{url}: {e}"
            );
            let e = parse_sink_url(url).unwrap_err();
            assert!(e.contains("1 to 65535"), "{url}: {e}");
        }
        assert_eq!(
            parse_endpoint("http://10.0.0.5:65535").unwrap().to_string(),
            "http://10.0.0.5:65535/"
        );
        assert!(parse_sink_url("https://hooks.example.com:8443/x").is_ok());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_bytes("10 MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("3KB"), Ok(3_000));
        assert_eq!(parse_bytes("3MB"), Ok(3_000_000));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("-2KiB"), Ok(-2048));
        for bad in ["", "MiB", "1.5MiB", "10mb", "10 M", "ten", "1-2", "--1"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        // Overflow saturates and is then refused by the range check, never wraps.
        let huge = parse_bytes("99999999999999999999999999999999999999999GiB").unwrap();
        assert!(in_range(huge, 1, u64::MAX, "x").is_err());
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
    fn duplicate_listener_and_route_names() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                routes:
                  - name: chat
                    upstream: backend
                  - name: chat
                    upstream: backend
              - name: inbound
                listen: 0.0.0.0:8081
                routes:
                  - upstream: backend
                  - name: inbound.0
                    upstream: backend
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 3, "{p:#?}");
        check(
            &p[0],
            7,
            15,
            "listeners[0].routes[1].name",
            "duplicate route name \"chat\" (first used at line 5)",
        );
        check(
            &p[1],
            9,
            11,
            "listeners[1].name",
            "duplicate listener name \"inbound\" (first used at line 2)",
        );
        check(
            &p[2],
            13,
            15,
            "listeners[1].routes[1].name",
            "duplicate route name \"inbound.0\" (first used at line 12)",
        );
    }

    #[test]
    fn invalid_names() {
        let p = problems(
            "
            listeners:
              - name: in bound
                listen: 0.0.0.0:8080
                routes:
                  - upstream: back.end
            upstreams:
              back.end:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            2,
            11,
            "listeners[0].name",
            "invalid listener name \"in bound\"",
        );
        check(
            &p[1],
            7,
            3,
            "upstreams.back.end",
            "invalid upstream name \"back.end\"",
        );
    }

    /// Two listeners, and the admin address, with the given `listen` values.
    fn three_binds(admin: &str, first: &str, second: &str) -> String {
        format!(
            "
            admin:
              listen: \"{admin}\"
            listeners:
              - name: inbound
                listen: \"{first}\"
                routes: [{{upstream: backend}}]
              - name: fastgpt
                listen: \"{second}\"
                routes: [{{upstream: backend}}]
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            "
        )
    }

    #[test]
    fn duplicate_listen_ports() {
        let same_ip = three_binds("127.0.0.1:9901", "10.0.0.1:8080", "10.0.0.1:8080");
        only(
            &same_ip,
            8,
            13,
            "listeners[1].listen",
            "port 8080 already used by listener \"inbound\" (line 5)",
        );

        let wildcard_first = three_binds("127.0.0.1:9901", "0.0.0.0:8080", "127.0.0.1:8080");
        only(
            &wildcard_first,
            8,
            13,
            "listeners[1].listen",
            "port 8080 already used by listener \"inbound\" (line 5)",
        );

        let wildcard_later = three_binds("127.0.0.1:9901", "127.0.0.1:8080", "[::]:8080");
        only(
            &wildcard_later,
            8,
            13,
            "listeners[1].listen",
            "port 8080 already used by listener \"inbound\" (line 5)",
        );

        // (A wildcard admin address would also need a token: see the admin tests.)
        let admin_first = three_binds("127.0.0.1:8080", "127.0.0.1:8080", "127.0.0.1:8081");
        only(
            &admin_first,
            5,
            13,
            "listeners[0].listen",
            "port 8080 already used by admin (line 2)",
        );

        let different_ips = three_binds("127.0.0.1:9901", "10.0.0.1:8080", "10.0.0.2:8080");
        assert!(parse(&different_ips).is_ok());

        let port_zero = three_binds("127.0.0.1:0", "0.0.0.0:0", "0.0.0.0:0");
        assert!(parse(&port_zero).is_ok());
    }

    #[test]
    fn listener_on_the_default_admin_port() {
        let text = MINIMAL.replace("0.0.0.0:8080", "0.0.0.0:9901");
        only(
            &text,
            3,
            13,
            "listeners[0].listen",
            "port 9901 already used by admin (default 127.0.0.1:9901)",
        );
    }

    #[test]
    fn bad_listen_address() {
        let text = MINIMAL.replace("0.0.0.0:8080", "localhost:8080");
        only(
            &text,
            3,
            13,
            "listeners[0].listen",
            "expected an address like \"0.0.0.0:8080\" or \"[::1]:8080\", got \"localhost:8080\"",
        );
    }

    #[test]
    fn missing_required_key() {
        let p = problems(
            "
            listeners:
              - name: inbound
                routes:
                  - match: {path_prefix: /api}
            ",
        );
        assert_eq!(p.len(), 3, "{p:#?}");
        check(&p[0], 1, 1, "", "missing required key \"upstreams\"");
        check(
            &p[1],
            2,
            5,
            "listeners[0]",
            "missing required key \"listen\"",
        );
        check(
            &p[2],
            4,
            9,
            "listeners[0].routes[0]",
            "missing required key \"upstream\"",
        );
        // Without upstreams there is nothing to check the reference against: no cascade.
    }

    #[test]
    fn required_key_without_value() {
        let text = MINIMAL.replace("listen: 0.0.0.0:8080", "listen:");
        only(
            &text,
            3,
            5,
            "listeners[0].listen",
            "missing value for required key \"listen\"",
        );
    }

    #[test]
    fn empty_lists() {
        let p = problems(
            "
            listeners: []
            upstreams: {}
            ",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        check(&p[0], 1, 12, "listeners", "must list at least one listener");
        check(
            &p[1],
            2,
            12,
            "upstreams",
            "must define at least one upstream",
        );
    }

    #[test]
    fn missing_env_var() {
        let text = MINIMAL.replace(
            "\"http://127.0.0.1:3001\"",
            "\"http://127.0.0.1:3001\", \"${FASTGPT_URL}\"",
        );
        only(
            &text,
            8,
            42,
            "upstreams.backend.endpoints[1]",
            "environment variable FASTGPT_URL is not set (give a default with ${FASTGPT_URL:-...})",
        );
    }

    #[test]
    fn unterminated_env_reference() {
        let text = MINIMAL.replace("listen: 0.0.0.0:8080", "listen: \"0.0.0.0:${LISTEN_PORT\"");
        only(&text, 3, 13, "listeners[0].listen", "unterminated \"${\"");
    }

    #[test]
    fn env_values_and_defaults_are_used() {
        let text = MINIMAL
            .replace("0.0.0.0:8080", "\"0.0.0.0:${LISTEN_PORT}\"")
            .replace(
                "\"http://127.0.0.1:3001\"",
                "\"${BACKEND_URL}\", \"${SPARE_URL:-http://10.0.0.8:3001}\"",
            )
            .replace(
                "  - upstream: backend",
                "  - upstream: backend\n                timeouts: {idle: \"${IDLE:-90s}\"}",
            );
        let c = ok(&text);
        assert_eq!(c.listeners[0].listen, "0.0.0.0:8088".parse().unwrap());
        assert_eq!(
            c.upstreams["backend"].endpoints,
            vec![uri("http://10.0.0.7:3001/"), uri("http://10.0.0.8:3001/")]
        );
        assert_eq!(c.listeners[0].routes[0].timeouts.idle, secs(90));
    }

    #[test]
    fn env_in_plain_block_values_is_typed_after_substitution() {
        let text = MINIMAL.replace(
            "listen: 0.0.0.0:8080",
            "listen: 0.0.0.0:${LISTEN_PORT}\n            max_connections: ${MAX_CONN:-500}\n            header_read_timeout: ${HRT:-3s}",
        );
        let c = ok(&text);
        assert_eq!(c.listeners[0].listen, "0.0.0.0:8088".parse().unwrap());
        assert_eq!(c.listeners[0].max_connections, 500);
        assert_eq!(c.listeners[0].header_read_timeout, secs(3));
    }

    #[test]
    fn env_is_not_applied_to_keys() {
        let text = format!("{MINIMAL}\n        \"${{LISTEN_PORT}}\": 1\n");
        only(
            &text,
            10,
            1,
            "${LISTEN_PORT}",
            "unknown key \"${LISTEN_PORT}\"",
        );
    }

    #[test]
    fn dollar_dollar_escape() {
        let text = MINIMAL.replace(
            "- upstream: backend",
            "- upstream: backend\n                match: {path_prefix: \"/$$price/${NOPE:-x}\"}",
        );
        let c = ok(&text);
        assert_eq!(c.listeners[0].routes[0].path_prefix, "/$price/x");
    }

    #[test]
    fn bad_endpoint_url() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                routes: [{upstream: backend}]
            upstreams:
              backend:
                endpoints:
                  - http://127.0.0.1:3001/v1
                  - ftp://127.0.0.1
                  - http://user:secret@127.0.0.1:3001
                  - http://127.0.0.1:3001?x=1
                  - 127.0.0.1:3001
                  - http://127.0.0.1:80
                  - http://127.0.0.1/
            ",
        );
        assert_eq!(p.len(), 6, "{p:#?}");
        check(
            &p[0],
            8,
            9,
            "upstreams.backend.endpoints[0]",
            "endpoint URLs cannot have a path (\"/v1\"",
        );
        check(
            &p[1],
            9,
            9,
            "upstreams.backend.endpoints[1]",
            "unsupported scheme \"ftp\"",
        );
        check(
            &p[2],
            10,
            9,
            "upstreams.backend.endpoints[2]",
            "user info (user:password@) is not allowed",
        );
        assert!(!p[2].message.contains("secret"));
        check(
            &p[3],
            11,
            9,
            "upstreams.backend.endpoints[3]",
            "cannot have a query",
        );
        check(
            &p[4],
            12,
            9,
            "upstreams.backend.endpoints[4]",
            "expected a URL like",
        );
        check(
            &p[5],
            14,
            9,
            "upstreams.backend.endpoints[6]",
            "duplicate endpoint \"http://127.0.0.1:80/\" (first used at line 13)",
        );
    }

    #[test]
    fn lowercase_method() {
        let text = MINIMAL.replace("- upstream: backend", "- upstream: backend\n                match: {methods: [GET, post, \"BAD METHOD\", GET]}");
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:#?}");
        check(
            &p[0],
            6,
            32,
            "listeners[0].routes[0].match.methods[1]",
            "\"post\" must be upper case, did you mean \"POST\"?",
        );
        check(
            &p[1],
            6,
            38,
            "listeners[0].routes[0].match.methods[2]",
            "invalid HTTP method \"BAD METHOD\"",
        );
        check(
            &p[2],
            6,
            52,
            "listeners[0].routes[0].match.methods[3]",
            "duplicate method \"GET\"",
        );
    }

    #[test]
    fn extension_methods_are_accepted() {
        let text = MINIMAL.replace(
            "- upstream: backend",
            "- upstream: backend\n                match: {methods: [PROPFIND]}",
        );
        let c = ok(&text);
        assert_eq!(
            c.listeners[0].routes[0].methods,
            Some(vec![Method::from_bytes(b"PROPFIND").unwrap()])
        );
    }

    #[test]
    fn route_match_checks() {
        let text = MINIMAL.replace("- upstream: backend", "- upstream: backend\n                match: {path_prefix: api, host: \"*.example.com\"}");
        let p = problems(&text);
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            6,
            30,
            "listeners[0].routes[0].match.path_prefix",
            "must start with \"/\", got \"api\"",
        );
        check(
            &p[1],
            6,
            41,
            "listeners[0].routes[0].match.host",
            "wildcard hosts are not supported",
        );
    }

    #[test]
    fn trusted_proxies_are_checked() {
        let text = format!(
            "{MINIMAL}\n        trusted_proxies: [\"10.0.0.1/8\", \"10.0.0.0/33\", \"::1/129\", \"nope\", \"::/0\", \"0.0.0.0/0\"]\n"
        );
        let p = problems(&text);
        assert_eq!(p.len(), 4, "{p:#?}");
        check(
            &p[0],
            10,
            19,
            "trusted_proxies[0]",
            "\"10.0.0.1/8\" has host bits set: did you mean \"10.0.0.0/8\"?",
        );
        check(
            &p[1],
            10,
            33,
            "trusted_proxies[1]",
            "prefix /33 is out of range for an IPv4 address (0 to 32)",
        );
        check(
            &p[2],
            10,
            48,
            "trusted_proxies[2]",
            "prefix /129 is out of range for an IPv6 address",
        );
        check(
            &p[3],
            10,
            59,
            "trusted_proxies[3]",
            "expected an address or block",
        );
    }

    #[test]
    fn three_different_problems_are_all_returned() {
        let p = problems(
            "
            logging:
              format: yaml
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                header_read_timeout: 0s
                routes:
                  - upstream: nope
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 3, "{p:#?}");
        check(
            &p[0],
            2,
            11,
            "logging.format",
            "expected one of text, json, got \"yaml\"",
        );
        check(
            &p[1],
            6,
            26,
            "listeners[0].header_read_timeout",
            "must be greater than 0",
        );
        check(
            &p[2],
            8,
            19,
            "listeners[0].routes[0].upstream",
            "unknown upstream \"nope\" (known: backend)",
        );
    }

    #[test]
    fn null_values_mean_default() {
        let text = format!("{MINIMAL}\n        admin:\n        logging: ~\n");
        let c = ok(&text);
        assert_eq!(c.admin.listen, DEFAULT_ADMIN_LISTEN);
        assert_eq!(c.logging.level, "info");
    }

    #[test]
    fn suggestions_use_edit_distance() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("listn", "listen"), 1);
        assert_eq!(edit_distance("lsiten", "listen"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            suggest("upstreem", &["listeners", "upstreams"]),
            Some("upstreams")
        );
        assert_eq!(suggest("xyz", &["listeners", "upstreams"]), None);
        assert_eq!(suggest("a", &["b"]), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(secs(90)));
        assert_eq!(parse_duration("5m"), Ok(secs(300)));
        assert_eq!(parse_duration("1h"), Ok(secs(3600)));
        for bare in ["30", "1.5", "0"] {
            assert_eq!(
                parse_duration(bare),
                Err(format!(
                    "expected a duration like \"250ms\", \"30s\" or \"5m\", got \"{bare}\""
                ))
            );
        }
    }

    #[test]
    fn problems_display_one_per_line() {
        let err = parse_str("listeners: []\nupstreams: {}\n", "proxy.yaml", &env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "proxy.yaml:1:12: listeners: must list at least one listener\nproxy.yaml:2:12: upstreams: must define at least one upstream"
        );
    }

    // === redis and rate limits ===

    /// MINIMAL with `extra` (dedented) appended from line 10 and `route_extra` as line 6, a
    /// key of the only route.
    fn with_limits(extra: &str, route_extra: &str) -> String {
        format!(
            "listeners:\n  - name: inbound\n    listen: 0.0.0.0:8080\n    routes:\n      - upstream: backend\n        {route_extra}\nupstreams:\n  backend:\n    endpoints: [\"http://127.0.0.1:3001\"]\n{}",
            yaml(extra)
        )
    }

    #[test]
    fn rate_limits_with_every_key_and_defaults() {
        let config = ok(&with_limits(
            r#"
            redis:
              url: redis://:secret@127.0.0.1:6380/2
              timeout: 20ms
              pool: { max_size: 4 }
            replicas: 3
            rate_limits:
              api: { points: 10, per: 1s, block_for: off, key: "route+header:X-User", store: memory, ipv6_prefix: 48 }
              chat: {}
            "#,
            "rate_limits: [api, chat]",
        ));
        let redis = config.redis.clone().unwrap();
        assert_eq!(
            redis.target,
            RedisTarget::Url(Secret::new("redis://:secret@127.0.0.1:6380/2".into()))
        );
        assert!(!format!("{redis:?}").contains("secret"));
        let summary = config.summary();
        assert!(
            summary.contains(
                "redis     redis://:[redacted]@127.0.0.1:6380/2 (timeout 20ms, pool 4, replicas 3)"
            ),
            "{summary}"
        );
        assert_eq!(redis.timeout, Duration::from_millis(20));
        assert_eq!(redis.connect_timeout, Duration::from_millis(20));
        assert_eq!(redis.pool_max_size, 4);
        assert_eq!(config.replicas, 3);
        assert_eq!(
            config.rate_limits["api"],
            RateLimitConfig {
                name: "api".into(),
                points: 10,
                per: secs(1),
                block_for: None,
                key: RateLimitKey {
                    per_route: true,
                    by: KeySource::Header(http::HeaderName::from_static("x-user")),
                },
                store: RateLimitStore::Memory,
                ipv6_prefix: 48,
            }
        );
        // Defaults; the store is redis because a redis section exists.
        assert_eq!(
            config.rate_limits["chat"],
            RateLimitConfig {
                name: "chat".into(),
                points: 100,
                per: secs(60),
                block_for: Some(secs(60)),
                key: RateLimitKey {
                    per_route: false,
                    by: KeySource::ClientIp,
                },
                store: RateLimitStore::Redis,
                ipv6_prefix: 64,
            }
        );
        assert_eq!(config.listeners[0].routes[0].rate_limits, ["api", "chat"]);
        assert!(
            config
                .summary()
                .contains("ratelimit api 10 per 1s (block off, store memory)")
        );

        // Without a redis section the default store is memory.
        let config = ok(&with_limits("rate_limits: { a: {} }", ""));
        assert_eq!(config.rate_limits["a"].store, RateLimitStore::Memory);
        assert_eq!(config.redis, None);
    }

    #[test]
    fn redis_sentinel() {
        let config = ok(&with_limits(
            r#"
            redis:
              sentinel:
                master: mymaster
                addresses: ["10.0.0.1:26379", "sentinel-b:26379", "[::1]:26379"]
              timeout: 40ms
              connect_timeout: 200ms
            "#,
            "",
        ));
        let redis = config.redis.unwrap();
        assert_eq!(
            redis.target,
            RedisTarget::Sentinel {
                master: "mymaster".into(),
                addresses: vec![
                    "10.0.0.1:26379".into(),
                    "sentinel-b:26379".into(),
                    "[::1]:26379".into()
                ],
            }
        );
        assert_eq!(redis.connect_timeout, Duration::from_millis(200));
        assert_eq!(redis.pool_max_size, 16);
    }

    #[test]
    fn redis_needs_exactly_one_of_url_and_sentinel() {
        only(
            &with_limits("redis: { timeout: 10ms }", ""),
            10,
            8,
            "redis",
            "missing `url` (\"redis://host:port\") or `sentinel`",
        );
        only(
            &with_limits(
                r#"
                redis:
                  url: redis://127.0.0.1
                  sentinel: { master: m, addresses: ["a:1"] }
                "#,
                "",
            ),
            12,
            13,
            "redis.sentinel",
            "give either `url` or `sentinel`, not both",
        );
    }

    #[test]
    fn bad_redis_values() {
        let p = problems(&with_limits(
            r#"
            redis:
              url: "http://u:hunter2@127.0.0.1"
              timeout: 0ms
              pool: { max_size: 0 }
            "#,
            "",
        ));
        assert_eq!(p.len(), 3, "{p:#?}");
        check(
            &p[0],
            11,
            8,
            "redis.url",
            "expected a URL like \"redis://127.0.0.1:6379\", got a URL with credentials (not shown)",
        );
        assert!(!p[0].message.contains("hunter2"));
        check(&p[1], 12, 12, "redis.timeout", "must be greater than 0");
        check(
            &p[2],
            13,
            21,
            "redis.pool.max_size",
            "must be greater than 0",
        );

        only(
            &with_limits(r#"redis: { url: "rediss://h:6379" }"#, ""),
            10,
            15,
            "redis.url",
            "rediss://) is not supported",
        );
        let p = problems(&with_limits(
            r#"
            redis:
              sentinel:
                master: ""
                addresses: ["nohost", "h:0", "h:1", "h:1"]
            "#,
            "",
        ));
        assert_eq!(p.len(), 4, "{p:#?}");
        check(
            &p[0],
            12,
            13,
            "redis.sentinel.master",
            "expected the master's name",
        );
        check(
            &p[1],
            13,
            17,
            "redis.sentinel.addresses[0]",
            "expected host:port like",
        );
        check(
            &p[2],
            13,
            27,
            "redis.sentinel.addresses[1]",
            "expected host:port like",
        );
        check(
            &p[3],
            13,
            41,
            "redis.sentinel.addresses[3]",
            "duplicate sentinel address \"h:1\"",
        );
        only(
            &with_limits("redis: { sentinel: { master: m, addresses: [] } }", ""),
            10,
            44,
            "redis.sentinel.addresses",
            "must list at least one sentinel",
        );
    }

    #[test]
    fn store_redis_needs_a_redis_section() {
        only(
            &with_limits("rate_limits:\n  api: { store: redis }", ""),
            11,
            17,
            "rate_limits.api.store",
            "store redis needs a top-level `redis:` section",
        );
    }

    #[test]
    fn bad_policy_values() {
        let p = problems(&with_limits(
            r#"
            replicas: 0
            rate_limits:
              "bad name": {}
              api:
                points: 0
                per: 500us
                block_for: forever
                key: cookie:sid
                store: disk
                ipv6_prefix: 129
              h: { key: "header:bad name" }
            "#,
            "",
        ));
        let got: Vec<(usize, usize, &str)> = p
            .iter()
            .map(|p| (p.line, p.column, p.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (10, 11, "replicas"),
                (12, 3, "rate_limits.bad name"),
                (14, 13, "rate_limits.api.points"),
                (15, 10, "rate_limits.api.per"),
                (16, 16, "rate_limits.api.block_for"),
                (17, 10, "rate_limits.api.key"),
                (18, 12, "rate_limits.api.store"),
                (19, 18, "rate_limits.api.ipv6_prefix"),
                (20, 13, "rate_limits.h.key"),
            ],
            "{p:#?}"
        );
        assert!(
            p[1].message
                .contains("invalid rate limit policy name \"bad name\"")
        );
        assert!(p[3].message.contains("must be at least 1ms"));
        assert!(
            p[5].message
                .contains("expected client_ip, header:NAME, route+client_ip or route+header:NAME")
        );
        assert!(p[6].message.contains("expected one of redis, memory"));
        assert!(p[7].message.contains("must be at most 128"));
        assert!(p[8].message.contains("invalid header name \"bad name\""));
    }

    #[test]
    fn routes_refer_to_known_policies_once() {
        let p = problems(&with_limits(
            "rate_limits: { api: {}, chat: {} }",
            "rate_limits: [api, chta, api]",
        ));
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            6,
            28,
            "listeners[0].routes[0].rate_limits[1]",
            "unknown rate limit policy \"chta\" (known: api, chat)",
        );
        check(
            &p[1],
            6,
            34,
            "listeners[0].routes[0].rate_limits[2]",
            "duplicate rate limit policy \"api\"",
        );
        only(
            &with_limits("", "rate_limits: [api]"),
            6,
            23,
            "listeners[0].routes[0].rate_limits[0]",
            "unknown rate limit policy \"api\" (no `rate_limits` are defined)",
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
