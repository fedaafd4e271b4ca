//! Values at the edges of what `rampart check` accepts: every accepted configuration
//! starts, serves and reloads (a property test over each key's whole range), and a reload
//! that panics while it is applied is a failed reload, never the end of the process.

use std::time::Duration;

use rampart::reload::ReloadResult;

use crate::support::{self, Upstream, get, http1, one_route, send};

/// `apply` takes a configuration as it is, past validation: tokio's Semaphore panics when
/// a listener asks for more than 2^61 - 1 connections. Before: the supervisor task died
/// with the panic, and with it every listener and the process (`rampart run` exits when
/// the supervisor is gone).
#[tokio::test]
async fn a_panic_while_a_reload_is_applied_fails_the_reload_and_changes_nothing() {
    let up = Upstream::start().await;
    let yaml = one_route(&up.url(), "", "");
    let r = support::start(&yaml).await;
    let addr = r.addr("main").unwrap();
    assert_eq!(send(&http1(), get(addr, "/ok")).await.0.status(), 200);

    let mut bad = support::parse(&yaml);
    bad.listeners[0].max_connections = usize::MAX;
    // A second listener that would have been added: it must not stay behind either.
    let mut extra = bad.listeners[0].clone();
    extra.name = "extra".into();
    extra.max_connections = 10;
    bad.listeners.insert(0, extra);
    let report = tokio::time::timeout(Duration::from_secs(10), r.apply(bad))
        .await
        .expect("the reload answers");
    assert_eq!(report.result, ReloadResult::Error, "{report:?}");
    assert!(
        report.errors.iter().any(|e| e.contains("panicked")),
        "{report:?}"
    );
    // The running listener still serves, on the same address, and nothing was added.
    assert_eq!(r.addr("main"), Some(addr));
    assert_eq!(r.addr("extra"), None);
    for _ in 0..3 {
        assert_eq!(send(&http1(), get(addr, "/ok")).await.0.status(), 200);
    }
    // The reload machinery is still there: a good configuration applies.
    let report = r
        .apply(support::parse(
            &yaml.replace("connect_timeout: 1s", "connect_timeout: 2s"),
        ))
        .await;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(send(&http1(), get(addr, "/ok")).await.0.status(), 200);
    assert!(r.shutdown().await);
}

// === any accepted configuration starts, serves and reloads ===

mod property {
    use std::net::SocketAddr;
    use std::time::Duration;

    use proptest::prelude::*;
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::support::redis::{RedisServer, unique};
    use crate::support::{Upstream, refusing_addr};

    const DAY: u64 = 24 * 3600;
    const MAX_SECS: u64 = 365 * DAY;
    const MINUTE: Duration = Duration::from_secs(60);
    /// Each case starts a proxy, serves, reloads and stops it: about a second on a loaded
    /// machine (more when it has a Redis that is down).
    const CASES: u32 = 16;
    /// Longer than anything a request may wait for besides the upstream (a Redis that is
    /// down: up to `redis.timeout`, at most 5 s), with a margin for a loaded machine.
    const ENOUGH: Duration = Duration::from_secs(15);

    /// Each key's whole accepted range, its two bounds drawn often.
    fn int(min: u64, max: u64) -> BoxedStrategy<u64> {
        prop_oneof![1 => Just(min), 1 => Just(max), 2 => min..=max].boxed()
    }

    /// A duration > 0 up to the 365-day cap, as the file writes it.
    fn duration() -> BoxedStrategy<Duration> {
        prop_oneof![
            1 => Just(Duration::from_nanos(1)),
            1 => Just(Duration::from_secs(MAX_SECS)),
            1 => (1u64..=MAX_SECS * 1_000_000_000).prop_map(Duration::from_nanos),
            2 => (1u64..=MAX_SECS).prop_map(Duration::from_secs),
        ]
        .boxed()
    }

    /// A duration > 0 up to `max` (keys with a tighter cap than 365 days).
    fn duration_to(max: Duration) -> BoxedStrategy<Duration> {
        let max_ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        prop_oneof![
            1 => Just(Duration::from_nanos(1)),
            1 => Just(max),
            2 => (1u64..=max_ns).prop_map(Duration::from_nanos),
        ]
        .boxed()
    }

    /// A timeout a request waits on: half the time long enough for the request to be
    /// served, so many cases check a real 200; the other half anything accepted.
    fn timeout() -> BoxedStrategy<Duration> {
        prop_oneof![
            1 => duration(),
            1 => prop_oneof![
                Just(ENOUGH),
                Just(Duration::from_secs(MAX_SECS)),
                (ENOUGH.as_secs()..=MAX_SECS).prop_map(Duration::from_secs),
            ],
        ]
        .boxed()
    }

    fn d(x: Duration) -> String {
        humantime::format_duration(x).to_string()
    }

    fn bytes(min: u64, max: u64) -> BoxedStrategy<String> {
        int(min, max).prop_map(|n| n.to_string()).boxed()
    }

    fn pct() -> BoxedStrategy<String> {
        prop_oneof![
            Just("100%".to_owned()),
            (1u32..=100).prop_map(|p| format!("{p}%"))
        ]
        .boxed()
    }

    #[derive(Debug, Clone)]
    struct Knobs {
        yaml: String,
        /// Every timeout a request meets is long enough: it must be answered 200.
        must_serve: bool,
    }

    prop_compose! {
        fn listener_keys()(
            max_connections in int(1, 1_000_000),
            header_read_timeout in timeout(),
            max_header_bytes in bytes(8 * 1024, 1024 * 1024),
            max_headers in int(1, 1000),
            streams in int(1, 10_000),
            resets in int(1, 10_000),
            errors in int(1, 100_000),
            in_flight in int(1, 1_000_000),
            egress in any::<bool>(),
            edge in (0usize..3, any::<bool>(), any::<bool>(), duration_to(Duration::from_secs(DAY))),
        ) -> (String, Duration) {
            let (normalize, merge, keep_escaped, h2_idle) = edge;
            (format!(
                "    max_connections: {max_connections}\n\
                 \x20   header_read_timeout: {}\n\
                 \x20   max_header_bytes: {max_header_bytes}\n\
                 \x20   max_headers: {max_headers}\n\
                 \x20   http2: {{ max_concurrent_streams: {streams}, max_pending_accept_reset_streams: {resets}, max_local_error_reset_streams: {errors}, idle_timeout: {} }}\n\
                 \x20   max_in_flight: {in_flight}\n\
                 \x20   drain: {}\n\
                 \x20   normalize_path: {}\n\
                 \x20   merge_slashes: {merge}\n\
                 \x20   escaped_slashes: {}\n",
                d(header_read_timeout),
                d(h2_idle),
                if egress { "egress" } else { "inbound" },
                ["match", "forward", "off"][normalize],
                if keep_escaped { "keep" } else { "reject" },
            ), header_read_timeout)
        }
    }

    prop_compose! {
        fn route_keys()(
            connect in timeout(),
            first_byte in timeout(),
            idle in timeout(),
            total in prop::option::of(timeout()),
            max_body in bytes(1, 1 << 30),
            body in (duration_to(Duration::from_secs(3600)), prop::option::of(int(1, 1 << 30)), any::<bool>()),
        ) -> (String, Duration) {
            // A GET without a body meets neither body timer: they do not bound the answer.
            let (body_timeout, min_rate, case_insensitive) = body;
            let shortest = [Some(connect), Some(first_byte), Some(idle), total]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or_default();
            (format!(
                "        timeouts: {{ connect: {}, first_byte: {}, idle: {}, total: {}, body: {}, min_body_rate: {} }}\n\
                 \x20       max_body: {max_body}\n\
                 \x20       match: {{ path_prefix: /, case_insensitive: {case_insensitive} }}\n",
                d(connect),
                d(first_byte),
                d(idle),
                total.map_or("off".to_owned(), d),
                d(body_timeout),
                min_rate.map_or("off".to_owned(), |r| format!("{r}B/s")),
            ), shortest)
        }
    }

    prop_compose! {
        fn upstream_keys()(
            connect in timeout(),
            idle in duration(),
            max_idle in int(0, 10_000),
            least in any::<bool>(),
            breaker in (int(1, 1_000_000), duration(), duration(), int(1, 1_000_000), int(1, 1_000_000), pct(), duration(), int(1, 1_000_000), any::<bool>()),
            ejection in (int(1, 1_000_000), duration(), duration()),
            // connect_wait: up to 3 s here (a request below must end within 10 s; a 1 ns
            // connect timeout waits it all); its 5m bound is pinned in config::validate.
            // backoff.max: up to 500 ms here, for the same reason: a request whose every
            // attempt fails (a 1 ns connect timeout) sleeps up to 9 pauses of at most it.
            // Drawn up to a minute, a CI run slept past 10 s (8 attempts, max 29 s); the
            // base still goes to a minute, and the 1m bounds are pinned in config::validate.
            retry in (int(1, 10), duration_to(MINUTE), duration_to(Duration::from_millis(500)), 0.0f64..=1.0, int(0, 1_000_000), bytes(0, 64 << 20), prop::option::of(duration_to(Duration::from_secs(3)))),
            in_flight in int(1, 1_000_000),
            // fast_interval: 10ms to 1m.
            check in (duration(), duration(), int(1, 1_000_000), int(1, 1_000_000), any::<bool>(), duration(), duration_to(MINUTE).prop_map(|d| d.max(Duration::from_millis(10)))),
            hyper in any::<bool>(),
        ) -> (String, Duration) {
            let (failures, open_for, max_open_for, successes, probes, threshold, window, min_calls, count) = breaker;
            let (consecutive, base, max) = ejection;
            let (attempts, backoff_base, backoff_max, ratio, min_per_s, retry_body, connect_wait) = retry;
            let (interval, check_timeout, unhealthy, healthy, critical, unhealthy_interval, fast_interval) = check;
            (format!(
                "    connect_timeout: {}\n\
                 \x20   pool: {{ idle_timeout: {}, max_idle_per_endpoint: {max_idle} }}\n\
                 \x20   load_balancing: {}\n\
                 \x20   circuit_breaker: {{ scope: {}, failures: {failures}, open_for: {}, max_open_for: {}, half_open_successes: {successes}, half_open_max_probes: {probes}, failure_rate: {{ threshold: {threshold}, window: {}, min_calls: {min_calls} }}, count_500: {count}, count_backoff: {count} }}\n\
                 \x20   ejection: {{ consecutive_failures: {consecutive}, base_ejection: {}, max_ejection: {} }}\n\
                 \x20   retry: {{ attempts: {attempts}, backoff: {{ base: {}, max: {} }}, on: [connect_error, reset, 503], budget: {{ ratio: {ratio}, min_per_s: {min_per_s} }}, max_body: {retry_body}, connect_wait: {} }}\n\
                 \x20   max_in_flight: {in_flight}\n\
                 \x20   client: {}\n\
                 \x20   health_check: {{ path: /ok, interval: {}, unhealthy_interval: {}, fast_interval: {}, timeout: {}, unhealthy_after: {unhealthy}, healthy_after: {healthy}, critical: {critical} }}\n",
                d(connect), d(idle),
                if least { "least_outstanding" } else { "round_robin" },
                if count { "upstream" } else { "route" },
                d(open_for), d(max_open_for), d(window), d(base), d(max), d(backoff_base), d(backoff_max),
                connect_wait.map_or("off".to_owned(), d),
                if hyper { "hyper" } else { "rampart" },
                d(interval), d(unhealthy_interval), d(fast_interval), d(check_timeout),
            ), connect)
        }
    }

    prop_compose! {
        fn top_keys()(
            replicas in int(1, 10_000),
            redis in prop::option::of((duration_to(Duration::from_secs(5)), duration_to(MINUTE), int(1, 1024))),
            limit in (int(1, 1_000_000_000_000_000), duration(), prop::option::of(duration()), int(1, 128)),
            drain in (int(1, MAX_SECS), 0.0f64..1.0),
            alerts in (int(1, MAX_SECS), int(1, 3600), duration(), int(1, 1_000_000_000), duration(), int(1, 20)),
            memory in (duration(), pct(), duration()),
            breaker_ready in any::<bool>(),
        ) -> String {
            // The test's own redis-server (when installed): the limits count there.
            let redis = redis.map_or(String::new(), |(timeout, connect, pool)| format!(
                "redis: {{ url: \"redis://{{REDIS}}\", timeout: {}, connect_timeout: {}, pool: {{ max_size: {pool} }} }}\n",
                d(timeout), d(connect),
            ));
            let (points, per, block_for, prefix) = limit;
            // At least 1ms, as Redis and the memory limiter count in milliseconds.
            let per = per.max(Duration::from_millis(1));
            let (drain_timeout, grace_share) = drain;
            let grace = Duration::from_secs_f64(drain_timeout as f64 * grace_share);
            let (interval, window, for_, min_samples, sink_timeout, attempts) = alerts;
            let (mem_interval, warn, mem_unhealthy) = memory;
            format!(
                "replicas: {replicas}\n\
                 {redis}\
                 rate_limits:\n  {{POLICY}}: {{ points: {points}, per: {}, block_for: {}, ipv6_prefix: {prefix} }}\n\
                 drain: {{ accept_grace: {}, timeout: {} }}\n\
                 alerts:\n  interval: {}\n  rules:\n    - {{ name: r, signal: error_rate, threshold: 5%, window: {}, for: {}, min_samples: {min_samples} }}\n\
                 \x20 sinks: [{{ type: webhook, url: \"http://{{REFUSED}}/hook\", timeout: {}, max_attempts: {attempts} }}]\n\
                 dependencies:\n  memory: {{ check: {{ interval: {}, unhealthy_interval: {}, warn_above: {warn} }} }}\n\
                 readiness: {{ breaker_open: {} }}\n",
                d(per),
                block_for.map_or("off".to_owned(), d),
                if grace.is_zero() { "0s".to_owned() } else { d(grace) },
                d(Duration::from_secs(drain_timeout)),
                d(Duration::from_secs(interval.max(1))),
                d(Duration::from_secs(window)), d(for_), d(sink_timeout), d(mem_interval),
                d(mem_unhealthy),
                if breaker_ready { "not_ready" } else { "ignore" },
            )
        }
    }

    prop_compose! {
        /// A `caches:` policy the route uses (its store follows the optional `redis:`).
        fn cache_keys()(
            ttl in duration(),
            entry in int(1, 1 << 30),
            extra in int(0, 64 << 30),
            stale in prop::option::of(duration_to(Duration::from_secs(7 * DAY))),
            lock in duration_to(MINUTE),
            vary in 0usize..3,
        ) -> String {
            let memory_max = entry.max(1024).saturating_add(extra).min(64 << 30);
            format!(
                "caches:\n  c: {{ ttl: {}, max_entry_size: {entry}, stale_if_error: {}, memory_max: {memory_max}, lock_timeout: {}, vary: {} }}\n",
                d(ttl),
                stale.map_or("off".to_owned(), d),
                d(lock),
                ["[]", "[accept-language]", "[authorization, accept-language]"][vary],
            )
        }
    }

    fn knobs() -> impl Strategy<Value = Knobs> {
        (
            listener_keys(),
            route_keys(),
            upstream_keys(),
            top_keys(),
            cache_keys(),
            prop::option::of((int(1, 10_000), 0usize..4)),
        )
            .prop_map(
            |((listener, head_timeout), (route, shortest), (upstream, connect), top, caches, groups)| {
                // The endpoint alone, or as the one group (with a weight and a sticky key).
                let endpoints = match groups {
                    None => "    endpoints: [\"{UP}\"]\n".to_owned(),
                    Some((weight, sticky)) => format!(
                        "    groups: {{ a: {{ endpoints: [\"{{UP}}\"], weight: {weight} }} }}\n{}",
                        ["", "    sticky: client_ip\n", "    sticky: header:x-user\n", "    sticky: cookie:sid\n"][sticky],
                    ),
                };
                let yaml = format!(
                    "admin: {{ listen: \"127.0.0.1:0\" }}\n\
                     logging: {{ level: error, access_log: false }}\n\
                     listeners:\n  - name: main\n    listen: \"127.0.0.1:0\"\n{listener}\
                     \x20   routes:\n      - upstream: up\n        rate_limits: [{{POLICY}}]\n        cache: c\n{route}\
                     upstreams:\n  up:\n{endpoints}{upstream}{top}{caches}"
                );
                Knobs {
                    yaml,
                    must_serve: head_timeout >= ENOUGH && shortest >= ENOUGH && connect >= ENOUGH,
                }
            },
        )
    }

    /// One request with a single header (`max_headers` may be 1), read to the end of its
    /// answer: the status, or None if the connection closed without one (a timeout at its
    /// lower bound may do that). Err if neither came within 10 s.
    async fn one_request(addr: SocketAddr) -> Result<Option<(u16, String)>, &'static str> {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            return Ok(None);
        };
        if s.write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .is_err()
        {
            return Ok(None);
        }
        let mut buf = Vec::new();
        let read = async {
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    if length.is_some_and(|n| buf.len() >= end + 4 + n) {
                        return;
                    }
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .is_err()
        {
            return Err("neither an answer nor a close within 10 s");
        }
        let status = buf
            .get(9..12)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse().ok());
        Ok(status.map(|s| (s, String::from_utf8_lossy(&buf).into_owned())))
    }

    fn check_served(
        what: &str,
        answer: Result<Option<(u16, String)>, &str>,
        must_serve: bool,
        yaml: &str,
    ) {
        let answer = answer.unwrap_or_else(|e| panic!("{what}: {e}\n{yaml}"));
        let status = answer.as_ref().map(|(s, _)| *s);
        let text = answer.as_ref().map_or("", |(_, t)| t.as_str());
        if must_serve {
            assert_eq!(status, Some(200), "{what}: {text}\n{yaml}");
        } else if let Some(s) = status {
            // Only what a timeout at its lower bound explains.
            assert!(
                matches!(s, 200 | 408 | 502 | 503 | 504),
                "{what}: {text}\n{yaml}"
            );
        }
    }

    #[test]
    fn any_accepted_configuration_starts_serves_and_reloads() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (up, _refused_hold, refused, redis) = rt.block_on(async {
            let (hold, addr) = refusing_addr();
            let redis =
                RedisServer::own("any_accepted_configuration_starts_serves_and_reloads").await;
            (Upstream::start().await, hold, addr, redis)
        });
        let fill = |k: &Knobs| {
            let mut yaml = k.yaml.clone();
            if redis.is_none() {
                yaml = yaml
                    .lines()
                    .filter(|l| !l.starts_with("redis:"))
                    .map(|l| format!("{l}\n"))
                    .collect();
            }
            // A fresh policy name per configuration: counts in Redis outlive a case.
            let policy = unique("p");
            yaml.replace("{UP}", &up.url())
                .replace("{REFUSED}", &refused.to_string())
                .replace(
                    "{REDIS}",
                    &format!("127.0.0.1:{}", redis.as_ref().map_or(0, |r| r.port)),
                )
                .replace("{POLICY}", &policy)
        };
        let started = std::time::Instant::now();
        let mut runner = TestRunner::new(RunnerConfig {
            cases: CASES,
            failure_persistence: None,
            // Each case starts a proxy: shrink a little, the configuration is in the message.
            max_shrink_iters: 8,
            ..RunnerConfig::default()
        });
        runner
            .run(&(knobs(), knobs()), |(first, second)| {
                let (a, b) = (fill(&first), fill(&second));
                // What the generator writes is inside every bound: `check` takes it.
                let ca = rampart::config::parse_str(&a, "a.yaml", &|_| None)
                    .unwrap_or_else(|e| panic!("refused:\n{e}\n{a}"));
                let cb = rampart::config::parse_str(&b, "b.yaml", &|_| None)
                    .unwrap_or_else(|e| panic!("refused:\n{e}\n{b}"));
                rt.block_on(async {
                    let r = rampart::app::start(ca).await.expect("starts");
                    let answer = one_request(r.addr("main").unwrap()).await;
                    let served = matches!(&answer, Ok(Some((200, _))));
                    check_served("first config", answer, first.must_serve, &a);
                    let report = r.apply(cb).await;
                    assert!(report.is_ok(), "{report:?}\n{a}\n---\n{b}");
                    let answer = one_request(r.addr("main").unwrap()).await;
                    // The breaker keeps its state across a reload (by upstream name): one the
                    // first configuration's failure opened may still be open.
                    let still_open = !served
                        && matches!(&answer, Ok(Some((503, t))) if t.contains("CIRCUIT_OPEN"));
                    if !still_open {
                        check_served("after the reload", answer, second.must_serve, &b);
                    }
                    let done = tokio::time::timeout(Duration::from_secs(20), r.shutdown()).await;
                    assert!(done.is_ok(), "shutdown hung\n{b}");
                });
                Ok(())
            })
            .unwrap();
        eprintln!(
            "bounds: {CASES} random pairs of accepted configurations started, served and reloaded in {:?}",
            started.elapsed()
        );
    }
}
