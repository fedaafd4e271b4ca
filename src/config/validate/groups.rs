//! `upstreams.<name>.groups` and `sticky`: named endpoint groups that share an upstream's
//! traffic by weight (blue-green, canaries), in place of a plain `endpoints` list.

use http::Uri;

use super::reader::{Ctx, MapReader, Unique};
use super::upstreams::endpoints_unique;
use crate::config::raw::child_path;
use crate::config::{EndpointGroup, Sticky, UpstreamConfig};

/// `endpoints` or `groups` (exactly one of them), and `sticky`. Returns every endpoint
/// (group after group), the groups (empty for plain `endpoints`) and the sticky key.
pub(super) fn endpoints_or_groups(
    ctx: &mut Ctx,
    m: &mut MapReader,
) -> (Vec<Uri>, Vec<EndpointGroup>, Option<Sticky>) {
    let groups_field = m.optional("groups");
    let sticky_field = m.optional("sticky");
    let Some(gf) = groups_field else {
        let endpoints = m
            .required(ctx, "endpoints")
            .map(|f| super::upstreams::endpoints(ctx, &f))
            .unwrap_or_default();
        if let Some(sf) = &sticky_field {
            ctx.report(
                sf.pos(),
                &sf.path,
                "applies to an upstream with groups: this one lists plain endpoints",
            );
        }
        return (endpoints, Vec::new(), None);
    };
    if let Some(e) = m.entry("endpoints") {
        ctx.report(
            e.key_pos,
            &child_path(&m.path, "endpoints"),
            "\"endpoints\" and \"groups\" cannot both be set: list the endpoints under each group",
        );
    }
    // Asked for either way, so `finish` does not call it unknown.
    let _ = m.optional("endpoints");
    let mut groups = Vec::new();
    if let Some(entries) = ctx.entries(&gf) {
        if entries.is_empty() {
            ctx.report(gf.pos(), &gf.path, "must define at least one group");
        }
        if entries.len() > UpstreamConfig::MAX_GROUPS {
            ctx.report(
                gf.pos(),
                &gf.path,
                format!("at most {} groups", UpstreamConfig::MAX_GROUPS),
            );
        }
        let mut seen = Unique::default();
        let mut weights_read = true;
        for e in entries {
            let path = child_path(&gf.path, &e.key);
            ctx.check_name(&e.key, e.key_pos, &path, "group");
            let mut g = MapReader::open(ctx, Some(super::reader::Field::at(&e.value, path)));
            let endpoints = g
                .required(ctx, "endpoints")
                .map(|f| endpoints_unique(ctx, &f, &mut seen))
                .unwrap_or_default();
            let weight = g
                .required(ctx, "weight")
                .and_then(|f| ctx.int(&f, 0, u64::from(UpstreamConfig::MAX_GROUP_WEIGHT)))
                .and_then(|w| u32::try_from(w).ok());
            g.finish(ctx);
            weights_read &= weight.is_some();
            groups.push(EndpointGroup {
                name: e.key.clone(),
                endpoints,
                weight: weight.unwrap_or(0),
            });
        }
        // A weight that was missing or bad is reported already: not a second problem.
        if weights_read && !groups.is_empty() && groups.iter().all(|g| g.weight == 0) {
            ctx.report(
                gf.pos(),
                &gf.path,
                "every group has weight 0: at least one must take traffic",
            );
        }
    }
    let sticky = sticky_field.and_then(|f| ctx.parse_with(&f, "a sticky key", parse_sticky));
    let endpoints = groups
        .iter()
        .flat_map(|g| g.endpoints.iter().cloned())
        .collect();
    (endpoints, groups, sticky)
}

fn parse_sticky(s: &str) -> Result<Sticky, String> {
    let bad = || format!("expected header:NAME, cookie:NAME or client_ip, got {s:?}");
    if s == "client_ip" {
        return Ok(Sticky::ClientIp);
    }
    if let Some(name) = s.strip_prefix("header:") {
        return http::HeaderName::from_bytes(name.as_bytes())
            .map(Sticky::Header)
            .map_err(|_| format!("{name:?} is not a header name"));
    }
    if let Some(name) = s.strip_prefix("cookie:") {
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        return if token {
            Ok(Sticky::Cookie(name.to_owned()))
        } else {
            Err(format!("{name:?} is not a cookie name"))
        };
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::config::Sticky;

    const HEAD: &str = "
        listeners:
          - name: inbound
            listen: 0.0.0.0:8080
            routes:
              - upstream: backend
        upstreams:
          backend:
    ";

    fn with(upstream: &str) -> String {
        format!("{}{upstream}", HEAD.trim_end())
    }

    #[test]
    fn groups_with_weights_and_a_sticky_key() {
        let c = ok(&with("
            groups:
              blue: { endpoints: [\"http://127.0.0.1:3001\", \"http://127.0.0.1:3002\"], weight: 95 }
              green: { endpoints: [\"http://127.0.0.1:3003\"], weight: 5 }
            sticky: header:X-User
    "));
        let u = &c.upstreams["backend"];
        let names: Vec<(&str, u32, usize)> = u
            .groups
            .iter()
            .map(|g| (g.name.as_str(), g.weight, g.endpoints.len()))
            .collect();
        assert_eq!(names, [("blue", 95, 2), ("green", 5, 1)]);
        assert_eq!(u.endpoints.len(), 3, "every endpoint, group after group");
        assert_eq!(u.endpoints[2], uri("http://127.0.0.1:3003"));
        assert_eq!(u.sticky, Some(Sticky::Header("x-user".parse().unwrap())));
        // `rampart check` shows the split.
        assert!(
            c.summary().contains(
                "groups: blue weight 95 (95.0%) -> http://127.0.0.1:3001/, http://127.0.0.1:3002/; \
                 green weight 5 (5.0%) -> http://127.0.0.1:3003/; sticky header:x-user"
            ),
            "{}",
            c.summary()
        );
        let plain = ok(MINIMAL);
        assert!(plain.upstreams["backend"].groups.is_empty());
        assert_eq!(plain.upstreams["backend"].sticky, None);
        for (text, want) in [
            ("cookie:sid", Sticky::Cookie("sid".into())),
            ("client_ip", Sticky::ClientIp),
        ] {
            let c = ok(&with(&format!(
                "
            groups: {{ a: {{ endpoints: [\"http://127.0.0.1:1\"], weight: 1 }} }}
            sticky: {text}
    "
            )));
            assert_eq!(c.upstreams["backend"].sticky, Some(want));
        }
    }

    #[test]
    fn bad_groups_are_refused_where_they_are_written() {
        // Line 8 is the upstream's first key ("backend:" is line 7).
        only(
            &with(
                "
            endpoints: [\"http://127.0.0.1:1\"]
            groups: { a: { endpoints: [\"http://127.0.0.1:2\"], weight: 1 } }
    ",
            ),
            8,
            5,
            "upstreams.backend.endpoints",
            "\"endpoints\" and \"groups\" cannot both be set: list the endpoints under each group",
        );
        only(
            &with("
            groups: { a: { endpoints: [\"http://127.0.0.1:1\"], weight: 0 }, b: { endpoints: [\"http://127.0.0.1:2\"], weight: 0 } }
    "),
            8,
            13,
            "upstreams.backend.groups",
            "every group has weight 0: at least one must take traffic",
        );
        only(
            &with(
                "
            groups: { a: { endpoints: [\"http://127.0.0.1:1\"], weight: 10001 } }
    ",
            ),
            8,
            63,
            "upstreams.backend.groups.a.weight",
            "must be at most 10000",
        );
        only(
            &with("
            groups: { a: { endpoints: [\"http://127.0.0.1:1\"], weight: 1 }, b: { endpoints: [\"http://127.0.0.1:1\"], weight: 1 } }
    "),
            8,
            85,
            "upstreams.backend.groups.b.endpoints[0]",
            "duplicate endpoint \"http://127.0.0.1:1/\" (first used at line 8)",
        );
        only(
            &with(
                "
            groups: { a: { endpoints: [\"http://127.0.0.1:1\"] } }
    ",
            ),
            8,
            18,
            "upstreams.backend.groups.a",
            "missing required key \"weight\"",
        );
        only(
            &with(
                "
            groups: { \"a b\": { endpoints: [\"http://127.0.0.1:1\"], weight: 1 } }
    ",
            ),
            8,
            15,
            "upstreams.backend.groups.a b",
            "invalid group name \"a b\": use letters, digits, \"_\" and \"-\" only",
        );
        only(
            &with(
                "
            groups: {}
    ",
            ),
            8,
            13,
            "upstreams.backend.groups",
            "must define at least one group",
        );
        only(
            &with(
                "
            groups: { a: { endpoints: [\"http://127.0.0.1:1\"], weight: 1 } }
            sticky: session
    ",
            ),
            9,
            13,
            "upstreams.backend.sticky",
            "expected header:NAME, cookie:NAME or client_ip, got \"session\"",
        );
        only(
            &with(
                "
            endpoints: [\"http://127.0.0.1:1\"]
            sticky: client_ip
    ",
            ),
            9,
            13,
            "upstreams.backend.sticky",
            "applies to an upstream with groups: this one lists plain endpoints",
        );
        only(
            &with(
                "
            connect_timeout: 1s
    ",
            ),
            8,
            5,
            "upstreams.backend",
            "missing required key \"endpoints\"",
        );
    }
}
