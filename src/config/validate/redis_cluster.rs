//! `redis.cluster`: the seed nodes of a Redis Cluster and the credentials every node takes.

use super::reader::{Ctx, Field, MapReader, Unique};
use super::values::parse_host_port;
use crate::config::RedisTarget;

/// `{ nodes: [host:port, ...], username?, password? }`.
pub(super) fn cluster(ctx: &mut Ctx, f: Field) -> Option<RedisTarget> {
    let mut m = MapReader::open(ctx, Some(f));
    let nodes = m.required(ctx, "nodes").and_then(|f| {
        let items = ctx.list(&f, "a list of host:port")?;
        if items.is_empty() {
            ctx.report(f.pos(), &f.path, "must list at least one cluster node");
            return None;
        }
        let mut seen = Unique::default();
        let mut out = Vec::new();
        for item in &items {
            if let Some(a) = ctx.parse_with(item, "host:port", parse_host_port)
                && seen.insert(ctx, &a, item, "cluster node")
            {
                out.push(a);
            }
        }
        (out.len() == items.len()).then_some(out)
    });
    let username = m.optional("username").map(|f| {
        ctx.parse_with(&f, "an ACL user name", |s| {
            if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err(format!("expected an ACL user name, got \"{s}\""))
            } else {
                Ok(s.to_owned())
            }
        })
    });
    let password = m.optional("password").map(|f| {
        let p = ctx.secret(&f, "a password")?;
        if p.expose().is_empty() {
            ctx.report(f.pos(), &f.path, "must not be empty (leave it out instead)");
            return None;
        }
        Some(p)
    });
    m.finish(ctx);
    // Not written: None; written but wrong (reported): the whole target is None.
    Some(RedisTarget::Cluster {
        nodes: nodes?,
        username: match username {
            Some(u) => Some(u?),
            None => None,
        },
        password: match password {
            Some(p) => Some(p?),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::config::validate::test_support::*;

    /// MINIMAL with `extra` (dedented) appended from line 10.
    fn with(extra: &str) -> String {
        format!(
            "listeners:\n  - name: inbound\n    listen: 0.0.0.0:8080\n    routes:\n      - upstream: backend\n        \nupstreams:\n  backend:\n    endpoints: [\"http://127.0.0.1:3001\"]\n{}",
            yaml(extra)
        )
    }

    #[test]
    fn redis_cluster() {
        let config = ok(&with(
            r#"
            redis:
              cluster:
                nodes: ["10.0.0.1:6379", "redis-b:7000", "[::1]:7001"]
                username: app
                password: s3cret-cluster
              timeout: 40ms
            "#,
        ));
        let redis = config.redis.clone().unwrap();
        assert_eq!(
            redis.target,
            RedisTarget::Cluster {
                nodes: vec![
                    "10.0.0.1:6379".into(),
                    "redis-b:7000".into(),
                    "[::1]:7001".into()
                ],
                username: Some("app".into()),
                password: Some(Secret::new("s3cret-cluster".into())),
            }
        );
        assert_eq!(redis.timeout, std::time::Duration::from_millis(40));
        assert!(!format!("{redis:?}").contains("s3cret"));
        let summary = config.summary();
        assert!(
            summary.contains(
                "redis     cluster 10.0.0.1:6379, redis-b:7000, [::1]:7001 as app (timeout 40ms, pool 16, replicas 1)"
            ),
            "{summary}"
        );
        assert!(!summary.contains("s3cret"), "{summary}");

        // Credentials are optional.
        let config = ok(&with("redis: { cluster: { nodes: [\"127.0.0.1:7000\"] } }"));
        assert_eq!(
            config.redis.unwrap().target,
            RedisTarget::Cluster {
                nodes: vec!["127.0.0.1:7000".into()],
                username: None,
                password: None,
            }
        );
    }

    #[test]
    fn bad_redis_cluster() {
        only(
            &with("redis: { cluster: { nodes: [] } }"),
            10,
            28,
            "redis.cluster.nodes",
            "must list at least one cluster node",
        );
        only(
            &with("redis: { cluster: {} }"),
            10,
            19,
            "redis.cluster",
            "missing required key \"nodes\"",
        );
        let p = problems(&with(
            r#"
            redis:
              cluster:
                nodes: ["nohost", "h:0", "h:1", "h:1", "h:99999"]
                username: ""
                password: ""
                node: x
            "#,
        ));
        assert_eq!(p.len(), 7, "{p:#?}");
        check(
            &p[0],
            12,
            13,
            "redis.cluster.nodes[0]",
            "expected host:port like",
        );
        check(
            &p[1],
            12,
            23,
            "redis.cluster.nodes[1]",
            "expected host:port like",
        );
        check(
            &p[2],
            12,
            37,
            "redis.cluster.nodes[3]",
            "duplicate cluster node \"h:1\"",
        );
        check(
            &p[3],
            12,
            44,
            "redis.cluster.nodes[4]",
            "expected host:port like",
        );
        check(
            &p[4],
            13,
            15,
            "redis.cluster.username",
            "expected an ACL user name",
        );
        check(&p[5], 14, 15, "redis.cluster.password", "must not be empty");
        check(&p[6], 15, 5, "redis.cluster.node", "unknown key");
    }

    #[test]
    fn one_of_url_sentinel_and_cluster() {
        only(
            &with(
                r#"
                redis:
                  url: redis://127.0.0.1
                  cluster: { nodes: ["a:1"] }
                "#,
            ),
            12,
            12,
            "redis.cluster",
            "give one of `url`, `sentinel` and `cluster`, not several",
        );
        let p = problems(&with(
            r#"
            redis:
              cluster: { nodes: ["a:1"] }
              sentinel: { master: m, addresses: ["a:1"] }
              url: redis://127.0.0.1
            "#,
        ));
        assert_eq!(p.len(), 2, "{p:#?}");
        check(&p[0], 12, 13, "redis.sentinel", "not several");
        check(&p[1], 13, 8, "redis.url", "not several");
        only(
            &with("redis: { timeout: 10ms }"),
            10,
            8,
            "redis",
            "or `cluster` ({ nodes })",
        );
    }
}
