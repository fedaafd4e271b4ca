use super::*;
use crate::config::RateLimitKey;
use crate::stream::tail::Tail;
use http::HeaderName;
use tokio::time::Instant;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn ipv6_is_masked() {
    assert_eq!(mask(ip("2001:db8:1:2:3:4:5:6"), 64), ip("2001:db8:1:2::"));
    assert_eq!(
        mask(ip("2001:db8:1:2:3:4:5:6"), 128),
        ip("2001:db8:1:2:3:4:5:6")
    );
    assert_eq!(mask(ip("192.0.2.1"), 64), ip("192.0.2.1"));
}

fn memory_store() -> Store {
    Store::Memory {
        table: Arc::new(Table::new(10)),
        streams: Arc::new(StreamTable::new(10)),
    }
}

impl Policy {
    /// A request counted against `key`.
    async fn decide_key(&self, key: &str) -> (Option<Decision>, Source) {
        let limits = self.limits.expect("a points limit");
        self.decide(&limits, key, &mut Budget::default()).await
    }
}

fn policy(by: KeySource, per_route: bool) -> Policy {
    let mut reg = PromRegistry::default();
    let metrics = Metrics::register(&mut reg);
    let pc = RateLimitConfig {
        name: "api".into(),
        points: Some(10),
        per: Duration::from_millis(1500),
        block_for: None,
        key: RateLimitKey { per_route, by },
        store: RateLimitStore::Memory,
        ipv6_prefix: 64,
        cost: RateLimitCost::Requests,
        max_streams: None,
        stream_lease: Duration::from_secs(30),
        lease: Some(64),
    };
    Policy::new(&pc, 3, memory_store(), &metrics)
}

#[test]
fn keys() {
    let h: HeaderMap = [(
        HeaderName::from_static("x-user"),
        HeaderValue::from_static("alice"),
    )]
    .into_iter()
    .collect();
    let c = ip("2001:db8::1");
    let by_ip = policy(KeySource::ClientIp, false);
    assert_eq!(by_ip.key("chat", &h, c), "ip:2001:db8::");
    let by_user = policy(KeySource::Header(HeaderName::from_static("x-user")), true);
    assert_eq!(by_user.key("chat", &h, c), "chat/h:alice");
    // Without the header: by address.
    assert_eq!(
        by_user.key("chat", &HeaderMap::new(), c),
        "chat/ip:2001:db8::"
    );
    let long = "x".repeat(200);
    let h: HeaderMap = [(
        HeaderName::from_static("x-user"),
        HeaderValue::from_str(&long).unwrap(),
    )]
    .into_iter()
    .collect();
    let k = by_user.key("chat", &h, c);
    assert!(k.starts_with("chat/h:#") && k.ends_with("-200"), "{k}");
    assert!(k.len() < 40);
}

#[test]
fn policy_header_item_and_fallback_share() {
    let p = policy(KeySource::ClientIp, false);
    assert_eq!(p.policy_item, "\"api\";q=10;w=2");
    // 10 points over 3 replicas.
    assert_eq!(p.fallback_limits.unwrap().points, 3);
    assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
    assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
}

fn config_with(policies: &str) -> Config {
    let yaml = format!(
        "listeners:\n  - name: l\n    listen: 127.0.0.1:0\n    routes: [{{upstream: u}}]\nupstreams:\n  u:\n    endpoints: [\"http://127.0.0.1:1\"]\nrate_limits:\n{policies}"
    );
    crate::config::parse_str(&yaml, "t.yaml", &|_| None).unwrap()
}

#[tokio::test]
async fn a_reload_keeps_the_counts_of_the_names_it_keeps() {
    let mut reg = PromRegistry::default();
    let registry = Registry::new(Metrics::register(&mut reg));
    let one = "  a: { points: 1, store: memory }\n  b: { points: 1, store: memory }\n";
    let policies = registry.update(&config_with(one)).unwrap();
    for name in ["a", "b"] {
        assert!(policies[name].decide_key("k").await.0.unwrap().allowed);
    }
    // Same names, another limit for a: its count is kept (and now allows one more).
    let two = "  a: { points: 2, store: memory }\n  b: { points: 1, store: memory }\n";
    let policies = registry.update(&config_with(two)).unwrap();
    assert!(policies["a"].decide_key("k").await.0.unwrap().allowed);
    assert!(!policies["a"].decide_key("k").await.0.unwrap().allowed);
    assert!(!policies["b"].decide_key("k").await.0.unwrap().allowed);
    // A name dropped and added back starts afresh.
    registry
        .update(&config_with("  a: { points: 2, store: memory }\n"))
        .unwrap();
    let policies = registry.update(&config_with(two)).unwrap();
    assert!(policies["b"].decide_key("k").await.0.unwrap().allowed);
}

/// `check` of one policy, with a fresh request's Redis budget.
async fn check_one(p: &Arc<Policy>, h: &HeaderMap, peer: IpAddr) -> Verdict {
    check(
        std::slice::from_ref(p),
        "r",
        h,
        || peer,
        &mut Budget::default(),
    )
    .await
}

#[tokio::test]
async fn check_sets_headers_and_retry_after() {
    let p = Arc::new(policy(KeySource::ClientIp, false));
    let h = HeaderMap::new();
    let peer = ip("192.0.2.1");
    for i in 0..10u64 {
        let v = check_one(&p, &h, peer).await;
        assert_eq!(v.retry_after_secs, None);
        let headers = v.headers.unwrap().into_map();
        assert_eq!(headers["ratelimit-policy"], "\"api\";q=10;w=2");
        assert_eq!(
            headers["ratelimit"],
            format!("\"api\";r={};t=2", 9 - i).as_str()
        );
        assert_eq!(headers["x-ratelimit-limit"], "10");
        assert_eq!(
            headers["x-ratelimit-remaining"],
            (9 - i).to_string().as_str()
        );
    }
    let v = check_one(&p, &h, peer).await;
    assert!(matches!(v.retry_after_secs, Some(1 | 2)), "{v:?}");
}

// === streams and tokens ===

fn registry() -> Registry {
    let mut reg = PromRegistry::default();
    Registry::new(Metrics::register(&mut reg))
}

/// A Tail holding what `check` let `key` through with (as the pipeline keeps it).
async fn admit(policy: &Arc<Policy>, key: &str) -> Result<Tail, Verdict> {
    let h: HeaderMap = [(
        HeaderName::from_static("x-user"),
        HeaderValue::from_str(key).unwrap(),
    )]
    .into_iter()
    .collect();
    let v = check_one(policy, &h, ip("192.0.2.1")).await;
    if v.retry_after_secs.is_some() {
        return Err(v);
    }
    let mut tail = Tail::default();
    tail.rate_limit_hold = v.hold;
    Ok(tail)
}

async fn refuse(policy: &Arc<Policy>, key: &str) -> Verdict {
    match admit(policy, key).await {
        Err(v) => v,
        Ok(_) => panic!("{key} admitted"),
    }
}

/// The shared Redis of the tests (`RAMPART_TEST_REDIS_URL`, else 127.0.0.1:6379); None
/// (a visible skip) when it does not answer, except under CI, where that fails.
async fn shared_redis(test: &str) -> Option<String> {
    let url =
        std::env::var("RAMPART_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let addr = url.trim_start_matches("redis://").trim_end_matches('/');
    let up = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(addr.to_owned()),
    )
    .await
    .is_ok_and(|c| c.is_ok());
    if !up {
        assert!(
            std::env::var("CI").is_err(),
            "{test}: no Redis at {url} under CI"
        );
        eprintln!("SKIPPED {test}: no Redis at {url}");
        return None;
    }
    Some(url)
}

fn redis_config(url: &str, replicas: u32, policies: &str) -> Config {
    let yaml = format!(
        "listeners:\n  - name: l\n    listen: 127.0.0.1:0\n    routes: [{{upstream: u}}]\nupstreams:\n  u:\n    endpoints: [\"http://127.0.0.1:1\"]\nredis: {{ url: \"{url}\", timeout: 1s }}\nreplicas: {replicas}\nrate_limits:\n{policies}"
    );
    crate::config::parse_str(&yaml, "t.yaml", &|_| None).unwrap()
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[tokio::test(start_paused = true)]
async fn tokens_used_in_memory_refuses_the_key_until_the_window_ends() {
    let registry = registry();
    let policies = registry
        .update(&config_with(
            "  t: { points: 100, per: 10s, block_for: off, cost: tokens, key: \"header:x-user\", store: memory }\n",
        ))
        .unwrap();
    let p = &policies["t"];
    // Admission charges nothing: many requests pass while no tokens are reported.
    for _ in 0..5 {
        admit(p, "alice").await.unwrap();
    }
    let mut tail = admit(p, "alice").await.unwrap();
    tail.tokens_used(40, 70);
    let refused = refuse(p, "alice").await;
    assert!(
        matches!(refused.retry_after_secs, Some(9 | 10)),
        "{refused:?}"
    );
    let headers = refused.headers.unwrap().into_map();
    assert_eq!(headers["ratelimit-policy"], "\"t\";q=100;w=10");
    assert!(
        headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"t\";r=0;"),
        "{headers:?}"
    );
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    // Another key is unaffected.
    let bob = admit(p, "bob").await.unwrap();
    drop(bob);
    tokio::time::advance(Duration::from_secs(10)).await;
    admit(p, "alice").await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn tokens_below_the_budget_leave_the_rest() {
    let registry = registry();
    let policies = registry
        .update(&config_with(
            "  t: { points: 100, per: 10s, cost: tokens, key: \"header:x-user\", store: memory }\n",
        ))
        .unwrap();
    let p = &policies["t"];
    let mut tail = admit(p, "alice").await.unwrap();
    tail.tokens_used(30, 10);
    let tail = admit(p, "alice").await.unwrap();
    drop(tail);
    let v = check(
        std::slice::from_ref(p),
        "r",
        &[(
            HeaderName::from_static("x-user"),
            HeaderValue::from_static("alice"),
        )]
        .into_iter()
        .collect(),
        || ip("192.0.2.1"),
        &mut Budget::default(),
    )
    .await;
    assert_eq!(v.headers.unwrap().into_map()["x-ratelimit-remaining"], "60");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_used_in_redis_refuses_the_key_until_the_window_ends() {
    let test = "tokens_used_in_redis_refuses_the_key_until_the_window_ends";
    let Some(url) = shared_redis(test).await else {
        return;
    };
    let name = unique("tok");
    let registry = registry();
    let policies = registry
        .update(&redis_config(
            &url,
            1,
            &format!(
                "  {name}: {{ points: 100, per: 2s, block_for: off, cost: tokens, key: \"header:x-user\" }}\n"
            ),
        ))
        .unwrap();
    let p = &policies[&name];
    let mut tail = admit(p, "alice").await.unwrap();
    tail.tokens_used(40, 70);
    // Charged by a task of its own: refused within a bounded wait.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        match admit(p, "alice").await {
            Err(v) => break v,
            Ok(_) => {
                assert!(Instant::now() < deadline, "the charge never landed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(
        matches!(refused.retry_after_secs, Some(1 | 2)),
        "{refused:?}"
    );
    assert_eq!(refused.source, Some("redis"));
    admit(p, "bob").await.unwrap();
    // The window ends in Redis's time: allowed again within it and a margin.
    let deadline = Instant::now() + Duration::from_secs(4);
    while admit(p, "alice").await.is_err() {
        assert!(Instant::now() < deadline, "still refused after the window");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn streams_in_memory_are_held_until_dropped_and_a_reload_keeps_them() {
    let registry = registry();
    let one = "  s: { max_streams: 2, key: \"header:x-user\", store: memory }\n";
    let policies = registry.update(&config_with(one)).unwrap();
    let p = &policies["s"];
    assert!(p.limits.is_none(), "max_streams alone limits no requests");
    let a = admit(p, "alice").await.unwrap();
    let b = admit(p, "alice").await.unwrap();
    assert_eq!(a.rate_limit_hold.permits(), 1);
    let refused = refuse(p, "alice").await;
    assert_eq!(refused.retry_after_secs, Some(1));
    let h = refused.headers.unwrap().into_map();
    assert_eq!(
        h["ratelimit-policy"],
        "\"s\";q=2;qu=\"concurrent-requests\""
    );
    assert_eq!(h["ratelimit"], "\"s\";r=0;t=1");
    assert_eq!(h["x-ratelimit-limit"], "2");
    // Another key has its own.
    let _c = admit(p, "bob").await.unwrap();
    drop(a);
    let a = admit(p, "alice").await.unwrap();

    // Lowered to 1 by a reload: the 2 held stay until released; new ones count
    // against 1.
    let lower = "  s: { max_streams: 1, key: \"header:x-user\", store: memory }\n";
    let policies = registry.update(&config_with(lower)).unwrap();
    let p = &policies["s"];
    refuse(p, "alice").await;
    drop(a);
    refuse(p, "alice").await;
    drop(b);
    let _d = admit(p, "alice").await.unwrap();
    refuse(p, "alice").await;
}

#[tokio::test(start_paused = true)]
async fn streams_and_points_both_apply_and_a_refusal_holds_nothing() {
    let registry = registry();
    let policies = registry
        .update(&config_with(
            "  b: { points: 3, per: 60s, max_streams: 2, key: \"header:x-user\", store: memory }\n",
        ))
        .unwrap();
    let p = &policies["b"];
    let a = admit(p, "alice").await.unwrap();
    let b = admit(p, "alice").await.unwrap();
    // Third: a point is left, no stream.
    let v = refuse(p, "alice").await;
    assert_eq!(v.retry_after_secs, Some(1));
    drop(a);
    drop(b);
    // The points are spent (3 requests counted): refused for the window, and the
    // refusal took no permit.
    let v = refuse(p, "alice").await;
    assert!(v.retry_after_secs.unwrap() > 1, "{v:?}");
    let Store::Memory { streams, .. } = &p.store else {
        panic!("memory store")
    };
    assert_eq!(streams.held("h:alice"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_redis_are_shared_renewed_and_released() {
    let test = "streams_in_redis_are_shared_renewed_and_released";
    let Some(url) = shared_redis(test).await else {
        return;
    };
    let name = unique("st");
    let policy =
        format!("  {name}: {{ max_streams: 3, stream_lease: 3s, key: \"header:x-user\" }}\n");
    // Two replicas: two registries, two Redis clients.
    let (ra, rb) = (registry(), registry());
    let pa = ra.update(&redis_config(&url, 2, &policy)).unwrap();
    let pb = rb.update(&redis_config(&url, 2, &policy)).unwrap();
    let (pa, pb) = (&pa[&name], &pb[&name]);
    let a1 = admit(pa, "alice").await.unwrap();
    let a2 = admit(pa, "alice").await.unwrap();
    let b1 = admit(pb, "alice").await.unwrap();
    let refused = refuse(pb, "alice").await;
    assert_eq!(refused.source, Some("redis"));
    refuse(pa, "alice").await;
    let Store::Redis { client, .. } = &pa.store else {
        panic!("redis store")
    };
    assert_eq!(client.leases_held(), 2);
    // Held past two leases: renewed by their replicas, still counted.
    tokio::time::sleep(Duration::from_secs(7)).await;
    refuse(pa, "alice").await;
    // Released: the next is admitted (the release is a task: bounded wait).
    drop(b1);
    let deadline = Instant::now() + Duration::from_secs(3);
    let a3 = loop {
        match admit(pa, "alice").await {
            Ok(t) => break t,
            Err(_) => {
                assert!(Instant::now() < deadline, "the release never landed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(client.leases_held(), 3);
    drop((a1, a2, a3));
    assert_eq!(client.leases_held(), 0);
}

/// rampart's HTTP/1.1 server writes the fields as head lines (`write_head`), the others put
/// them in the map (`write_to`): the same names and values either way, for one policy and
/// for several (their items joined), and a value that is no field value is left out of both.
#[test]
fn the_head_lines_say_what_the_map_says() {
    use super::fields::Fields;
    let one = {
        let mut f = Fields::new();
        let item = "\"api\";q=10;w=2";
        f.add_policy(item, &HeaderValue::from_static("\"api\";q=10;w=2"));
        f.add(b"\"api\"", 10, 7, Duration::from_millis(1500));
        f.headers()
    };
    let two = {
        let mut f = Fields::new();
        f.add_policy(
            "\"a\";q=10;w=2",
            &HeaderValue::from_static("\"a\";q=10;w=2"),
        );
        f.add(b"\"a\"", 10, 7, Duration::from_secs(2));
        f.add_policy(
            "\"b\";q=3;w=60",
            &HeaderValue::from_static("\"b\";q=3;w=60"),
        );
        f.add(b"\"b\"", 3, 1, Duration::from_secs(59));
        f.headers()
    };
    let broken = {
        let mut f = Fields::new();
        f.add(b"\"bad\r\nx-injected: 1\"", 10, 7, Duration::from_secs(2));
        f.headers()
    };
    for h in [one, two, broken] {
        let mut lines = Vec::new();
        h.write_head(&mut lines);
        let text = String::from_utf8(lines).unwrap();
        let from_head: Vec<(String, String)> = text
            .split_terminator("\r\n")
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_string(), v.to_string())
            })
            .collect();
        let map = h.into_map();
        let from_map: Vec<(String, String)> = map
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(from_head, from_map, "{text}");
        for (name, _) in &from_map {
            assert!(RateLimitHeaders::replaces(&name.parse().unwrap()), "{name}");
        }
        assert!(!from_head.iter().any(|(n, _)| n == "x-injected"), "{text}");
    }
    for other in [
        "ratelimits",
        "x-ratelimit-used",
        "retry-after",
        "content-length",
        "r",
        "x",
    ] {
        assert!(
            !RateLimitHeaders::replaces(&other.parse().unwrap()),
            "{other}"
        );
    }
}
