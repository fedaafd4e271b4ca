//! `caches.<name>`: the response-cache policies routes opt into with `cache: NAME`
//! (issue 19), and the route's reference to one.

use std::collections::BTreeMap;
use std::time::Duration;

use super::reader::{Ctx, Field, ListSpec, MapReader};
use super::values::{format_bytes, parse_duration};
use crate::config::raw::child_path;
use crate::config::{CacheConfig, CacheStore};

/// Longer than any body worth keeping in memory per entry: the route's `max_body` bound.
pub(super) const MAX_ENTRY_SIZE: u64 = 1 << 30;
pub(super) const MIN_MEMORY_MAX: u64 = 1 << 10;
pub(super) const MAX_MEMORY_MAX: u64 = 64 << 30;
/// A stale answer older than a week is more likely wrong than helpful.
pub(super) const MAX_STALE_IF_ERROR: Duration = Duration::from_secs(7 * 24 * 3600);
/// Waiters hold a request each: past a minute the client has given up anyway.
pub(super) const MAX_LOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Each listed header adds to every key; past a few the entries stop being shared.
pub(super) const MAX_VARY: usize = 16;
/// Not forwarded (RFC 9110 7.6.1), so an answer cannot depend on them.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The decoded policies, and the names a route may use: None when `caches` itself is
/// broken (reported once there, not again at each route).
pub(super) struct Caches {
    pub(super) configs: BTreeMap<String, CacheConfig>,
    pub(super) known: Option<Vec<String>>,
}

pub(super) fn caches(ctx: &mut Ctx, f: Option<Field>, redis_present: bool) -> Caches {
    let mut out = Caches {
        configs: BTreeMap::new(),
        known: Some(Vec::new()),
    };
    let Some(f) = f else { return out };
    let Some(entries) = ctx.entries(&f) else {
        out.known = None;
        return out;
    };
    for e in entries {
        let path = child_path(&f.path, &e.key);
        ctx.check_name(&e.key, e.key_pos, &path, "cache policy");
        // A broken policy is still a known name: its routes are not reported again.
        let config = cache(ctx, Field::at(&e.value, path), redis_present);
        out.configs.insert(e.key.clone(), config);
    }
    out.known = Some(out.configs.keys().cloned().collect());
    out
}

pub(super) fn cache(ctx: &mut Ctx, f: Field, redis_present: bool) -> CacheConfig {
    let default_store = if redis_present {
        CacheStore::Redis
    } else {
        CacheStore::Memory
    };
    let defaults = CacheConfig::with_store(default_store);
    let mut m = MapReader::open(ctx, Some(f));
    let ttl = m.read(ctx, "ttl", Ctx::duration).unwrap_or(defaults.ttl);
    let max_entry_field = m.optional("max_entry_size");
    let max_entry_size = max_entry_field
        .as_ref()
        .and_then(|f| ctx.bytes(f, 1, MAX_ENTRY_SIZE));
    let stale_if_error = m
        .read(ctx, "stale_if_error", stale_if_error)
        .unwrap_or(defaults.stale_if_error);
    let store = m
        .read(ctx, "store", |ctx, f| {
            let store = ctx.one_of(
                f,
                &[("redis", CacheStore::Redis), ("memory", CacheStore::Memory)],
            )?;
            if store == CacheStore::Redis && !redis_present {
                ctx.report(
                    f.pos(),
                    &f.path,
                    "store redis needs a top-level `redis:` section (url, sentinel or cluster)",
                );
                return None;
            }
            Some(store)
        })
        .unwrap_or(default_store);
    let vary = m.read(ctx, "vary", vary).unwrap_or_default();
    let memory_field = m.optional("memory_max");
    let memory_max = memory_field
        .as_ref()
        .and_then(|f| ctx.bytes(f, MIN_MEMORY_MAX, MAX_MEMORY_MAX));
    // The memory tier must hold at least one entry: reported at `memory_max` when written,
    // else at the `max_entry_size` that outgrew its default.
    let entry = max_entry_field
        .as_ref()
        .map_or(Some(defaults.max_entry_size), |_| max_entry_size);
    let memory = memory_field
        .as_ref()
        .map_or(Some(defaults.memory_max), |_| memory_max);
    if let (Some(entry), Some(memory)) = (entry, memory)
        && memory < entry
    {
        let default = if max_entry_field.is_none() {
            ", the default"
        } else {
            ""
        };
        match (&memory_field, &max_entry_field) {
            (Some(f), _) => ctx.report(
                f.pos(),
                &f.path,
                format!(
                    "must be at least max_entry_size ({}{default}), got {}: the memory tier must hold one entry",
                    format_bytes(entry),
                    format_bytes(memory)
                ),
            ),
            (None, Some(f)) => ctx.report(
                f.pos(),
                &f.path,
                format!(
                    "is larger than memory_max ({}, the default): raise memory_max to at least {}",
                    format_bytes(memory),
                    format_bytes(entry)
                ),
            ),
            (None, None) => {}
        }
    }
    let lock_timeout = m
        .read(ctx, "lock_timeout", |ctx, f| {
            ctx.duration_at_most(f, MAX_LOCK_TIMEOUT)
        })
        .unwrap_or(defaults.lock_timeout);
    m.finish(ctx);
    CacheConfig {
        ttl,
        max_entry_size: max_entry_size.unwrap_or(defaults.max_entry_size),
        stale_if_error,
        store,
        vary,
        memory_max: memory_max.unwrap_or(defaults.memory_max),
        lock_timeout,
    }
}

/// `stale_if_error`: a duration up to 7 days, or `off`. `0s` is refused rather than read
/// as off, so turning stale answers off is written the one way the summary shows.
fn stale_if_error(ctx: &mut Ctx, f: &Field) -> Option<Option<Duration>> {
    ctx.parse_with(f, "a duration or off", |s| {
        let t = s.trim();
        if t == "off" {
            return Ok(None);
        }
        if t == "0" || humantime::parse_duration(t).is_ok_and(|d| d.is_zero()) {
            return Err(format!(
                "must be greater than 0, got \"{s}\"; write off to never answer from a stale entry"
            ));
        }
        let d = parse_duration(s)?;
        if d > MAX_STALE_IF_ERROR {
            return Err(format!("must be at most 7 days (168h), got \"{s}\""));
        }
        Ok(Some(d))
    })
}

/// `vary`: request header names, lowercased, each once; None when any was refused.
fn vary(ctx: &mut Ctx, f: &Field) -> Option<Vec<String>> {
    ctx.distinct_list(
        f,
        &ListSpec {
            expected: "a list of request header names",
            max: MAX_VARY,
            plural: "headers",
            one: "a header name",
            duplicate: "vary header",
        },
        parse_vary_header,
    )
}

fn parse_vary_header(s: &str) -> Result<String, String> {
    if s.trim() == "*" {
        return Err(
            "\"*\" is not allowed: an answer that varies on everything cannot be cached; list the request headers the answers depend on"
                .into(),
        );
    }
    let name = http::HeaderName::from_bytes(s.trim().as_bytes())
        .map_err(|_| format!("invalid header name \"{s}\""))?;
    let name = name.as_str();
    if HOP_BY_HOP.contains(&name) {
        return Err(format!(
            "\"{name}\" is a hop-by-hop header: it is not forwarded, so an answer cannot depend on it"
        ));
    }
    Ok(name.to_owned())
}

/// A route's `cache`: the name of a `caches:` policy.
pub(super) fn cache_ref(ctx: &mut Ctx, f: &Field, caches: &Caches) -> Option<String> {
    let name = ctx.text(f, "a cache policy name")?;
    if let Some(known) = &caches.known
        && !known.contains(&name)
    {
        let message = if known.is_empty() {
            format!("unknown cache policy \"{name}\" (no `caches` are defined)")
        } else {
            format!(
                "unknown cache policy \"{name}\" (known: {})",
                known.join(", ")
            )
        };
        ctx.report(f.pos(), &f.path, message);
        return None;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::test_support::*;

    /// MINIMAL with `extra` (dedented) appended from line 10 and `route_extra` as line 6, a
    /// key of the only route.
    fn with_caches(extra: &str, route_extra: &str) -> String {
        format!(
            "listeners:\n  - name: inbound\n    listen: 0.0.0.0:8080\n    routes:\n      - upstream: backend\n        {route_extra}\nupstreams:\n  backend:\n    endpoints: [\"http://127.0.0.1:3001\"]\n{}",
            yaml(extra)
        )
    }

    /// Every problem, as `rampart check` prints them.
    fn printed(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("expected problems, got {c:#?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_and_every_key() {
        let config = ok(&with_caches(
            r#"
            caches:
              plain: {}
              agents:
                ttl: 30s
                max_entry_size: 256KiB
                stale_if_error: "off"
                store: memory
                vary: [Accept-Language, authorization]
                memory_max: 8MiB
                lock_timeout: 2s
            "#,
            "cache: agents",
        ));
        let plain = &config.caches["plain"];
        assert_eq!(plain, &CacheConfig::with_store(CacheStore::Memory));
        assert_eq!(plain.ttl, secs(3600));
        assert_eq!(plain.max_entry_size, 1 << 20);
        assert_eq!(plain.stale_if_error, Some(secs(600)));
        assert_eq!(plain.store, CacheStore::Memory);
        assert!(plain.vary.is_empty());
        assert_eq!(plain.memory_max, 64 << 20);
        assert_eq!(plain.lock_timeout, secs(5));
        assert_eq!(
            config.caches["agents"],
            CacheConfig {
                ttl: secs(30),
                max_entry_size: 256 << 10,
                stale_if_error: None,
                store: CacheStore::Memory,
                vary: vec!["accept-language".into(), "authorization".into()],
                memory_max: 8 << 20,
                lock_timeout: secs(2),
            }
        );
        assert_eq!(
            config.listeners[0].routes[0].cache.as_deref(),
            Some("agents")
        );
        let summary = config.summary();
        assert!(
            summary.contains(
                "cache     agents ttl 30s (stale_if_error off, max entry 256 KiB, store memory, \
                 memory 8 MiB, vary accept-language,authorization)"
            ),
            "{summary}"
        );
        assert!(
            summary.contains(
                "cache     plain ttl 1h (stale_if_error 10m, max entry 1 MiB, store memory, memory 64 MiB)\n"
            ),
            "{summary}"
        );
        assert!(summary.contains("body 10 MiB, cache agents)"), "{summary}");

        // Without `cache:` a route caches nothing.
        assert_eq!(
            ok(&with_caches("caches: { a: {} }", "")).listeners[0].routes[0].cache,
            None
        );
    }

    #[test]
    fn the_default_store_follows_the_redis_section() {
        let config = ok(&with_caches(
            r#"
            redis: { url: "redis://127.0.0.1:6379" }
            caches:
              shared: {}
              local: { store: memory }
              explicit: { store: redis }
            "#,
            "",
        ));
        assert_eq!(
            config.caches["shared"],
            CacheConfig::with_store(CacheStore::Redis)
        );
        assert_eq!(config.caches["local"].store, CacheStore::Memory);
        assert_eq!(config.caches["explicit"].store, CacheStore::Redis);
        assert!(config.summary().contains(
            "cache     shared ttl 1h (stale_if_error 10m, max entry 1 MiB, store redis,"
        ));
    }

    #[test]
    fn store_redis_needs_a_redis_section() {
        assert_eq!(
            printed(&with_caches("caches:\n  api: { store: redis }", "")),
            "proxy.yaml:11:17: caches.api.store: store redis needs a top-level `redis:` section (url, sentinel or cluster)"
        );
        assert_eq!(
            printed(&with_caches("caches:\n  api: { store: disk }", "")),
            "proxy.yaml:11:17: caches.api.store: expected one of redis, memory, got \"disk\""
        );
    }

    #[test]
    fn every_bound_is_refused_where_it_is_written() {
        let text = with_caches(
            r#"
            caches:
              low:
                ttl: 0s
                max_entry_size: 0
                stale_if_error: 0s
                memory_max: 1023
                lock_timeout: 0s
              high:
                ttl: 366d
                max_entry_size: 2GiB
                stale_if_error: 8d
                memory_max: 65GiB
                lock_timeout: 61s
              "bad name": { tll: 1h }
            "#,
            "",
        );
        let want = [
            r#"proxy.yaml:12:10: caches.low.ttl: must be greater than 0, got "0s""#,
            "proxy.yaml:13:21: caches.low.max_entry_size: must be greater than 0, got 0",
            r#"proxy.yaml:14:21: caches.low.stale_if_error: must be greater than 0, got "0s"; write off to never answer from a stale entry"#,
            "proxy.yaml:15:17: caches.low.memory_max: must be at least 1KiB (1024 bytes), got 1023",
            r#"proxy.yaml:16:19: caches.low.lock_timeout: must be greater than 0, got "0s""#,
            r#"proxy.yaml:18:10: caches.high.ttl: must be at most 365 days, got "366d""#,
            "proxy.yaml:19:21: caches.high.max_entry_size: must be at most 1GiB (1073741824 bytes), got 2GiB",
            r#"proxy.yaml:20:21: caches.high.stale_if_error: must be at most 7 days (168h), got "8d""#,
            "proxy.yaml:21:17: caches.high.memory_max: must be at most 64GiB (68719476736 bytes), got 65GiB",
            r#"proxy.yaml:22:19: caches.high.lock_timeout: must be at most 1m, got "61s""#,
            r#"proxy.yaml:23:3: caches.bad name: invalid cache policy name "bad name": use letters, digits, "_" and "-" only"#,
            r#"proxy.yaml:23:17: caches.bad name.tll: unknown key "tll", did you mean "ttl"? (known keys: ttl, max_entry_size, stale_if_error, store, vary, memory_max, lock_timeout)"#,
        ];
        assert_eq!(printed(&text), want.join("\n"));

        // The bounds themselves are allowed.
        let config = ok(&with_caches(
            r#"
            caches:
              low: { ttl: 1ms, max_entry_size: 1, stale_if_error: 1ms, memory_max: 1KiB, lock_timeout: 1ms }
              high: { ttl: 365d, max_entry_size: 1GiB, stale_if_error: 7d, memory_max: 64GiB, lock_timeout: 60s }
            "#,
            "",
        ));
        assert_eq!(config.caches["low"].memory_max, 1024);
        assert_eq!(config.caches["high"].max_entry_size, 1 << 30);
        assert_eq!(
            config.caches["high"].stale_if_error,
            Some(secs(7 * 24 * 3600))
        );
    }

    #[test]
    fn memory_max_holds_at_least_one_entry() {
        assert_eq!(
            printed(&with_caches(
                "caches:\n  a: { max_entry_size: 2MiB, memory_max: 1MiB }",
                ""
            )),
            "proxy.yaml:11:42: caches.a.memory_max: must be at least max_entry_size (2MiB), got 1MiB: the memory tier must hold one entry"
        );
        assert_eq!(
            printed(&with_caches("caches:\n  a: { memory_max: 512KiB }", "")),
            "proxy.yaml:11:20: caches.a.memory_max: must be at least max_entry_size (1MiB, the default), got 512KiB: the memory tier must hold one entry"
        );
        assert_eq!(
            printed(&with_caches("caches:\n  a: { max_entry_size: 100MiB }", "")),
            "proxy.yaml:11:24: caches.a.max_entry_size: is larger than memory_max (64MiB, the default): raise memory_max to at least 100MiB"
        );
        // Equal is enough.
        let config = ok(&with_caches(
            "caches:\n  a: { max_entry_size: 2MiB, memory_max: 2MiB }",
            "",
        ));
        assert_eq!(config.caches["a"].memory_max, 2 << 20);
    }

    #[test]
    fn vary_names_request_headers_once() {
        let text = with_caches(
            r#"
            caches:
              a:
                vary: [Accept, accept, Connection, "*", "bad name", TE, Upgrade]
            "#,
            "",
        );
        let want = [
            r#"proxy.yaml:12:20: caches.a.vary[1]: duplicate vary header "accept" (first used at line 12)"#,
            r#"proxy.yaml:12:28: caches.a.vary[2]: "connection" is a hop-by-hop header: it is not forwarded, so an answer cannot depend on it"#,
            r#"proxy.yaml:12:40: caches.a.vary[3]: "*" is not allowed: an answer that varies on everything cannot be cached; list the request headers the answers depend on"#,
            r#"proxy.yaml:12:45: caches.a.vary[4]: invalid header name "bad name""#,
            r#"proxy.yaml:12:57: caches.a.vary[5]: "te" is a hop-by-hop header: it is not forwarded, so an answer cannot depend on it"#,
            r#"proxy.yaml:12:61: caches.a.vary[6]: "upgrade" is a hop-by-hop header: it is not forwarded, so an answer cannot depend on it"#,
        ];
        assert_eq!(printed(&text), want.join("\n"));
        for hop in ["keep-alive", "Trailer", "transfer-encoding"] {
            assert!(
                printed(&with_caches(
                    &format!("caches: {{ a: {{ vary: [{hop}] }} }}"),
                    ""
                ))
                .contains("is a hop-by-hop header"),
                "{hop}"
            );
        }

        let seventeen: Vec<String> = (0..17).map(|i| format!("x-h{i}")).collect();
        assert_eq!(
            printed(&with_caches(
                &format!("caches:\n  a: {{ vary: [{}] }}", seventeen.join(", ")),
                ""
            )),
            "proxy.yaml:11:14: caches.a.vary: lists 17 headers, at most 16 are allowed"
        );
        let sixteen = &seventeen[..16];
        let config = ok(&with_caches(
            &format!("caches:\n  a: {{ vary: [{}] }}", sixteen.join(", ")),
            "",
        ));
        assert_eq!(config.caches["a"].vary, sixteen);
        assert_eq!(
            printed(&with_caches("caches:\n  a: { vary: accept }", "")),
            "proxy.yaml:11:14: caches.a.vary: expected a list of request header names, found a string"
        );
    }

    #[test]
    fn routes_refer_to_known_caches() {
        assert_eq!(
            printed(&with_caches(
                "caches: { agents: {}, models: {} }",
                "cache: agnets"
            )),
            r#"proxy.yaml:6:16: listeners[0].routes[0].cache: unknown cache policy "agnets" (known: agents, models)"#
        );
        assert_eq!(
            printed(&with_caches("", "cache: agents")),
            r#"proxy.yaml:6:16: listeners[0].routes[0].cache: unknown cache policy "agents" (no `caches` are defined)"#
        );
        assert_eq!(
            printed(&with_caches("caches: { agents: {} }", "cache: [agents]")),
            "proxy.yaml:6:16: listeners[0].routes[0].cache: expected a cache policy name, found a list"
        );
        // A broken policy, or a broken section, is reported once: not again at the route.
        assert_eq!(
            printed(&with_caches(
                "caches: { agents: { ttl: soon } }",
                "cache: agents"
            )),
            r#"proxy.yaml:10:26: caches.agents.ttl: expected a duration like "250ms", "30s" or "5m", got "soon""#
        );
        assert_eq!(
            printed(&with_caches("caches: [agents]", "cache: agents")),
            "proxy.yaml:10:9: caches: expected a mapping, found a list"
        );
    }
}
