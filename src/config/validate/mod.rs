//! The tree from `raw.rs` -> the typed [`Config`], collecting EVERY problem.
//!
//! Decoding never stops at a problem: a bad value is reported and replaced by its default so
//! the rest of the file is still checked. Each section is one function taking its node (or
//! `None` when absent) and returning its typed value; a new top-level section is one more
//! such function and one line in [`decode`].

mod admin;
mod alerts;
mod caches;
#[cfg(test)]
mod doc_reference;
mod groups;
mod health;
mod limits;
mod listeners;
mod reader;
mod redis_cluster;
mod releases;
mod scalars;
mod streams;
#[cfg(test)]
mod test_support;
mod tls;
mod upgrades;
mod upstreams;
mod values;

pub(crate) use admin::is_loopback;
pub use health::postgres_url_for_driver;
pub(crate) use releases::release_from_json;

use std::net::SocketAddr;
use std::time::Duration;

use super::raw::{self, Node, Pos};
use super::{Config, ConfigError, DrainMode, ListenerConfig};
use admin::{admin, drain, logging, readiness, trusted_proxies};
use alerts::alerts;
use caches::{Caches, caches};
use limits::{Policies, rate_limits, redis};
use listeners::listeners;
use reader::{Ctx, Field, MapReader};
use upstreams::{Upstreams, upstreams};

// Defaults live on the types (`crate::config::ListenerConfig::DEFAULT_MAX_CONNECTIONS`, ...);
// the upper bounds, which only the validator enforces, stay beside the code that checks them.

/// Requests in flight on a listener or to an upstream.
const MAX_IN_FLIGHT: u64 = 1_000_000;
/// Sections a later version reads: refused by name so the message says why.
const FUTURE_SECTIONS: &[&str] = &["tls"];

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
        .unwrap_or(Config::DEFAULT_REPLICAS);
    // Upstreams, policies and caches first: routes refer to them (and inherit the
    // upstream's connect timeout).
    let known = Known {
        upstreams: upstreams(ctx, upstreams_node),
        policies: rate_limits(ctx, m.optional("rate_limits"), redis.is_some()),
        caches: caches(ctx, m.optional("caches"), redis.is_some()),
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
    let releases = releases::releases(ctx, m.optional("releases"), &known.upstreams);
    let releases_state = releases::releases_state(ctx, m.optional("releases_state"));
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
        caches: known.caches.configs,
        drain,
        dependencies,
        alerts,
        readiness,
        releases,
        releases_state,
    }
}

/// What routes may refer to by name.
struct Known {
    upstreams: Upstreams,
    policies: Policies,
    caches: Caches,
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::test_support::*;
    use crate::config::{
        AdminConfig, AlertsConfig, Cidr, DependenciesConfig, DrainConfig, Http2Config, LogFormat,
        LoggingConfig, PathConfig, PoolConfig, ReadinessConfig, Resilience, RouteConfig,
        RouteTimeouts, StreamConfig, TokenCounting, UpstreamClient, UpstreamConfig,
    };
    use http::Method;
    use std::collections::BTreeMap;
    use std::time::Duration;

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
                tls: None,
                redirect_to_https: false,
                http1_server: Default::default(),
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
                    cache: None,
                    upgrades: vec!["websocket".into()],
                    stream: StreamConfig::default(),
                    tokens: TokenCounting::Streams,
                }],
            }],
            upstreams: BTreeMap::from([(
                "backend".to_string(),
                UpstreamConfig {
                    name: "backend".into(),
                    endpoints: vec![uri("http://127.0.0.1:3001/")],
                    groups: vec![],
                    sticky: None,
                    connect_timeout: secs(5),
                    client: UpstreamClient::Rampart,
                    tls: Default::default(),
                    resilience: Resilience::default(),
                    pool: PoolConfig {
                        idle_timeout: secs(4),
                        max_idle_per_endpoint: 10_000,
                    },
                },
            )]),
            redis: None,
            replicas: 1,
            rate_limits: BTreeMap::new(),
            caches: BTreeMap::new(),
            drain: DrainConfig {
                accept_grace: secs(5),
                timeout: secs(30),
            },
            dependencies: DependenciesConfig::default(),
            readiness: ReadinessConfig::default(),
            alerts: AlertsConfig::default(),
            releases: Vec::new(),
            releases_state: None,
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
                tls: None,
                redirect_to_https: false,
                http1_server: Default::default(),
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
                        cache: None,
                        max_body_bytes: 2_000_000,
                        upgrades: vec!["websocket".into()],
                        stream: StreamConfig::default(),
                        tokens: TokenCounting::Streams,
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
                        cache: None,
                        max_body_bytes: 1_048_576,
                        upgrades: vec!["websocket".into()],
                        stream: StreamConfig::default(),
                        tokens: TokenCounting::Streams,
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
                        groups: vec![],
                        sticky: None,
                        connect_timeout: secs(2),
                        client: UpstreamClient::Rampart,
                        tls: Default::default(),
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
                        groups: vec![],
                        sticky: None,
                        connect_timeout: secs(5),
                        client: UpstreamClient::Rampart,
                        tls: Default::default(),
                        resilience: Resilience::default(),
                        pool: PoolConfig {
                            idle_timeout: secs(4),
                            max_idle_per_endpoint: 10_000,
                        },
                    },
                ),
            ]),
            redis: None,
            replicas: 1,
            rate_limits: BTreeMap::new(),
            caches: BTreeMap::new(),
            drain: DrainConfig {
                accept_grace: Duration::ZERO,
                timeout: secs(60),
            },
            dependencies: DependenciesConfig::default(),
            readiness: ReadinessConfig::default(),
            alerts: AlertsConfig::default(),
            releases: Vec::new(),
            releases_state: None,
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
    fn future_sections_are_refused_by_name() {
        only(
            &format!("{MINIMAL}\n        tls: {{}}\n"),
            10,
            1,
            "tls",
            "section \"tls\" is not supported by this version of rampart",
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
    fn problems_display_one_per_line() {
        let err = parse_str("listeners: []\nupstreams: {}\n", "proxy.yaml", &env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "proxy.yaml:1:12: listeners: must list at least one listener\nproxy.yaml:2:12: upstreams: must define at least one upstream"
        );
    }
}
