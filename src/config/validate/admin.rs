//! `admin:`, `logging:`, `readiness:`, `drain:` and `trusted_proxies:`: the process-wide
//! sections.

use std::net::IpAddr;

use super::Bind;
use super::reader::{Ctx, Field, MapReader, Unique};
use super::values::parse_cidr;
use crate::config::raw::{Kind, Node, Pos};
use crate::config::{
    AdminConfig, BreakerReadiness, Cidr, DrainConfig, LogFormat, LoggingConfig, ReadinessConfig,
};

pub(super) const MIN_ADMIN_TOKEN: usize = 16;
pub(super) const MAX_ADMIN_TOKEN: usize = 4096;
pub(super) const MAX_ADMIN_ALLOWED_HOSTS: usize = 64;

pub(super) fn admin(ctx: &mut Ctx, f: Option<Field>) -> (AdminConfig, Option<Bind>) {
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
        listen: addr.unwrap_or(AdminConfig::DEFAULT_LISTEN),
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
            addr: AdminConfig::DEFAULT_LISTEN,
            pos: Pos::default(),
            path: "admin.listen".into(),
            owner: "admin".into(),
            origin: format!("default {}", AdminConfig::DEFAULT_LISTEN),
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
pub(super) fn raw_variables(node: &Node) -> Option<String> {
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
pub(super) fn admin_allowed_hosts(ctx: &mut Ctx, f: &Field) -> Option<Vec<String>> {
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
pub(super) fn parse_allowed_host(s: &str) -> Result<String, String> {
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

pub(super) fn logging(ctx: &mut Ctx, f: Option<Field>) -> LoggingConfig {
    let mut m = MapReader::open(ctx, f);
    let config = LoggingConfig {
        level: m
            .read(ctx, "level", Ctx::log_filter)
            .unwrap_or_else(|| LoggingConfig::DEFAULT_LEVEL.into()),
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

pub(super) fn readiness(ctx: &mut Ctx, f: Option<Field>) -> ReadinessConfig {
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

pub(super) fn drain(ctx: &mut Ctx, f: Option<Field>) -> DrainConfig {
    let mut m = MapReader::open(ctx, f);
    let grace_field = m.optional("accept_grace");
    let accept_grace = grace_field
        .as_ref()
        .and_then(|f| ctx.duration_or_zero(f))
        .unwrap_or(DrainConfig::DEFAULT_ACCEPT_GRACE);
    let timeout_field = m.optional("timeout");
    let timeout = timeout_field
        .as_ref()
        .and_then(|f| ctx.duration(f))
        .unwrap_or(DrainConfig::DEFAULT_TIMEOUT);
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

pub(super) fn trusted_proxies(ctx: &mut Ctx, f: Option<Field>) -> Vec<Cidr> {
    let Some(f) = f else { return Vec::new() };
    ctx.list(&f, "a list of addresses")
        .unwrap_or_default()
        .iter()
        .filter_map(|item| ctx.parse_with(item, "an address", parse_cidr))
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::config::validate::test_support::*;
    use std::time::Duration;

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
}
