//! `listeners[]` and their `routes[]`: bind address, slow-client limits, HTTP/2, path
//! normalisation, route matching and per-route timeouts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use http::Method;

use super::reader::{Ctx, Field, MapReader, Unique};
use super::values::{parse_host, parse_path_prefix, parse_rate};
use super::{Bind, Known, Located, MAX_IN_FLIGHT, TimeoutSite};
use crate::config::{
    DrainMode, EscapedSlashes, Http1Server, Http2Config, ListenerConfig, NormalizePath, PathConfig,
    RateLimitCost, RouteConfig, RouteTimeouts, TokenCounting, UpstreamConfig,
};

/// hyper refuses a smaller HTTP/1 read buffer.
pub(super) const MIN_MAX_HEADER_BYTES: u64 = 8 * 1024;
/// Connections per listener: far above what one process serves, far below the Semaphore's
/// limit.
pub(super) const MAX_CONNECTIONS: u64 = 1_000_000;
/// Request head bytes: nginx's large_client_header_buffers default is 4 x 8 KiB.
pub(super) const MAX_MAX_HEADER_BYTES: u64 = 1024 * 1024;
/// Request headers; browsers send about 20.
pub(super) const MAX_HEADERS: u64 = 1000;
pub(super) const MAX_H2_CONCURRENT_STREAMS: u64 = 10_000;
pub(super) const MAX_H2_PENDING_ACCEPT_RESET_STREAMS: u64 = 10_000;
pub(super) const MAX_H2_LOCAL_ERROR_RESET_STREAMS: u64 = 100_000;
/// A chunked or HTTP/2 body is read whole before it is forwarded, so this is also what one
/// such request may hold in memory.
pub(super) const MAX_BODY_BYTES: u64 = 1 << 30;
pub(super) const MAX_H2_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
pub(super) const MAX_BODY_TIMEOUT: Duration = Duration::from_secs(3600);

pub(super) fn listeners(
    ctx: &mut Ctx,
    f: Option<Field>,
    known: &Known,
) -> (Vec<ListenerConfig>, Vec<Bind>) {
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
pub(super) fn listener<'a>(
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
            .unwrap_or(ListenerConfig::DEFAULT_MAX_CONNECTIONS),
        header_read_timeout: m
            .read(ctx, "header_read_timeout", Ctx::duration)
            .unwrap_or(ListenerConfig::DEFAULT_HEADER_READ_TIMEOUT),
        max_header_bytes: m
            .read(ctx, "max_header_bytes", |ctx, f| {
                ctx.bytes(f, MIN_MAX_HEADER_BYTES, MAX_MAX_HEADER_BYTES)
            })
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(ListenerConfig::DEFAULT_MAX_HEADER_BYTES),
        max_headers: m
            .read(ctx, "max_headers", |ctx, f| ctx.count(f, 1, MAX_HEADERS))
            .unwrap_or(ListenerConfig::DEFAULT_MAX_HEADERS),
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
        tls: super::tls::listener_tls(ctx, m.optional("tls")),
        redirect_to_https: m
            .read(ctx, "redirect_to_https", Ctx::boolean)
            .unwrap_or(false),
        http1_server: m
            .read(ctx, "http1_server", |ctx, f| {
                ctx.one_of(
                    f,
                    &[
                        ("rampart", Http1Server::Rampart),
                        ("hyper", Http1Server::Hyper),
                    ],
                )
            })
            .unwrap_or_default(),
        routes: m
            .required(ctx, "routes")
            .map(|f| routes(ctx, &f, &name, known))
            .unwrap_or_default(),
        listen: listen.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
        name,
    };
    if config.redirect_to_https
        && config.tls.is_some()
        && let Some(e) = m.entry("redirect_to_https")
    {
        ctx.report(
            e.value.pos,
            &format!("{path}.redirect_to_https"),
            "a TLS listener is already https: redirect_to_https is for a plain listener",
        );
    }
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
pub(super) fn path_config(ctx: &mut Ctx, m: &mut MapReader) -> PathConfig {
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

pub(super) fn http2(ctx: &mut Ctx, f: Option<Field>) -> Http2Config {
    let mut m = MapReader::open(ctx, f);
    let config = Http2Config {
        max_concurrent_streams: m
            .read(ctx, "max_concurrent_streams", |ctx, f| {
                ctx.int(f, 1, MAX_H2_CONCURRENT_STREAMS)
            })
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(Http2Config::DEFAULT_MAX_CONCURRENT_STREAMS),
        max_pending_accept_reset_streams: m
            .read(ctx, "max_pending_accept_reset_streams", |ctx, f| {
                ctx.count(f, 1, MAX_H2_PENDING_ACCEPT_RESET_STREAMS)
            })
            .unwrap_or(Http2Config::DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS),
        max_local_error_reset_streams: m
            .read(ctx, "max_local_error_reset_streams", |ctx, f| {
                ctx.count(f, 1, MAX_H2_LOCAL_ERROR_RESET_STREAMS)
            })
            .unwrap_or(Http2Config::DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS),
        idle_timeout: m
            .read(ctx, "idle_timeout", |ctx, f| {
                ctx.duration_at_most(f, MAX_H2_IDLE_TIMEOUT)
            })
            .unwrap_or(Http2Config::DEFAULT_IDLE_TIMEOUT),
    };
    m.finish(ctx);
    config
}

pub(super) fn routes(ctx: &mut Ctx, f: &Field, listener: &str, known: &Known) -> Vec<RouteConfig> {
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
pub(super) fn route<'a>(
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
        .map_or(UpstreamConfig::DEFAULT_CONNECT_TIMEOUT, |u| {
            u.connect_timeout
        });
    let (timeouts, first_byte, idle) =
        route_timeouts(ctx, m.optional("timeouts"), connect_default, &whole);
    ctx.timeout_sites.push(TimeoutSite {
        listener: listener.to_owned(),
        route: name.clone(),
        first_byte,
        idle,
    });
    let mut config = RouteConfig {
        name,
        path_prefix,
        host,
        methods,
        case_insensitive,
        upstream: upstream.unwrap_or_default(),
        timeouts,
        max_body_bytes: m
            .read(ctx, "max_body", |ctx, f| ctx.bytes(f, 1, MAX_BODY_BYTES))
            .unwrap_or(RouteConfig::DEFAULT_MAX_BODY_BYTES),
        rate_limits: m
            .read(ctx, "rate_limits", |ctx, f| {
                ctx.policy_refs(f, &known.policies)
            })
            .unwrap_or_default(),
        cache: m.read(ctx, "cache", |ctx, f| {
            super::caches::cache_ref(ctx, f, &known.caches)
        }),
        upgrades: m
            .read(ctx, "upgrades", super::upgrades::upgrades)
            .unwrap_or_else(|| {
                RouteConfig::DEFAULT_UPGRADES
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect()
            }),
        stream: super::streams::stream(ctx, m.optional("stream")),
        tokens: TokenCounting::Streams,
    };
    if let Some(f) = m.optional("tokens") {
        let choices = [
            ("streams", TokenCounting::Streams),
            ("all", TokenCounting::All),
            ("off", TokenCounting::Off),
        ];
        if let Some(t) = ctx.one_of(&f, &choices) {
            let charged = config.rate_limits.iter().find(|p| {
                known
                    .policies
                    .configs
                    .get(*p)
                    .is_some_and(|c| c.cost == RateLimitCost::Tokens)
            });
            match charged {
                Some(p) if t == TokenCounting::Off => ctx.report(
                    f.pos(),
                    &f.path,
                    format!(
                        "cannot be off: the route's policy \"{p}\" charges tokens, which rampart reads from the answers"
                    ),
                ),
                _ => config.tokens = t,
            }
        }
    }
    m.finish(ctx);
    (config, name_field.unwrap_or(whole))
}

/// `match`: path prefix, host, methods, case_insensitive.
pub(super) type RouteMatch = (String, Option<String>, Option<Vec<Method>>, bool);

pub(super) fn route_match(ctx: &mut Ctx, f: Option<Field>) -> RouteMatch {
    let mut m = MapReader::open(ctx, f);
    let path_prefix = m
        .read(ctx, "path_prefix", |ctx, f| {
            ctx.parse_with(f, "a path", parse_path_prefix)
        })
        .unwrap_or_else(|| RouteConfig::DEFAULT_PATH_PREFIX.into());
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
pub(super) fn route_timeouts(
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
        .unwrap_or(RouteTimeouts::DEFAULT_FIRST_BYTE);
    let idle_at = m.optional("idle");
    let idle = idle_at
        .as_ref()
        .and_then(|f| ctx.duration(f))
        .unwrap_or(RouteTimeouts::DEFAULT_IDLE);
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
            .unwrap_or(RouteTimeouts::DEFAULT_BODY),
        min_body_rate: m
            .read(ctx, "min_body_rate", |ctx, f| {
                ctx.parse_with(f, "a rate or off", parse_rate)
            })
            .unwrap_or(Some(RouteTimeouts::DEFAULT_MIN_BODY_RATE)),
    };
    m.finish(ctx);
    (config, first_byte_at, idle_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::parse_str;
    use crate::config::validate::test_support::*;

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
}
