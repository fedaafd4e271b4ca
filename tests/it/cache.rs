//! The response cache (issue 19) through real sockets: a scripted upstream whose answers
//! each test sets (status, headers, body, delay), real Redis servers for the shared tier.
//! Hits and misses, TTL, Cache-Control both ways, coalescing, stale-if-error with the
//! upstream killed, Redis killed, two instances sharing entries and purges.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::assert_eventually;
use crate::support::redis::{RedisServer, unique};
use crate::support::*;

/// What the scripted upstream answers on a path.
#[derive(Clone)]
pub(crate) struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    delay: Duration,
}

impl Reply {
    pub(crate) fn ok(body: &str) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-type", "application/json".into())],
            body: Bytes::from(body.to_owned()),
            delay: Duration::ZERO,
        }
    }

    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub(crate) fn status(mut self, s: u16) -> Reply {
        self.status = s;
        self
    }

    fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

#[derive(Default)]
pub(crate) struct Script {
    replies: Mutex<HashMap<String, Reply>>,
    /// Requests per path.
    seen: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    /// The request headers of the last request.
    last: Mutex<Option<http::HeaderMap>>,
}

/// An upstream answering what its script says, until stopped (its listener and every
/// connection closed, as a process that died).
pub(crate) struct Scripted {
    pub(crate) addr: SocketAddr,
    script: Arc<Script>,
    tasks: JoinSet<()>,
}

impl Scripted {
    pub(crate) async fn start(script: Arc<Script>) -> Scripted {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Scripted::serve(l, script)
    }

    fn serve(listener: TcpListener, script: Arc<Script>) -> Scripted {
        let addr = listener.local_addr().unwrap();
        let mut tasks = JoinSet::new();
        let s = script.clone();
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let c2 = conns.clone();
        tasks.spawn(async move {
            let _keep = c2.clone();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                c2.lock().unwrap().spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(answer(&s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        // Aborting the accept task drops `conns` (the last handle): every connection ends.
        drop(conns);
        Scripted {
            addr,
            script,
            tasks,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Down: nothing listens, every connection closed.
    fn stop(&mut self) {
        self.tasks.abort_all();
    }

    /// Up again on the same port.
    async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        let l = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebind {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        *self = Scripted::serve(l, self.script.clone());
    }
}

async fn answer(s: &Script, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    s.total.fetch_add(1, Ordering::SeqCst);
    *s.seen.lock().unwrap().entry(path.clone()).or_default() += 1;
    *s.last.lock().unwrap() = Some(req.headers().clone());
    let reply = s
        .replies
        .lock()
        .unwrap()
        .get(req.uri().path())
        .cloned()
        .unwrap_or_else(|| Reply::ok("{\"default\":true}"));
    tokio::time::sleep(reply.delay).await;
    let mut r = Response::new(Full::new(reply.body));
    *r.status_mut() = StatusCode::from_u16(reply.status).unwrap();
    for (k, v) in reply.headers {
        r.headers_mut().append(k, v.parse().unwrap());
    }
    r
}

impl Script {
    pub(crate) fn set(&self, path: &str, r: Reply) {
        self.replies.lock().unwrap().insert(path.to_owned(), r);
    }

    pub(crate) fn seen(&self, path_and_query: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .get(path_and_query)
            .copied()
            .unwrap_or(0)
    }
}

/// A proxy with one route `all` cached under policy `c` (`policy` is its YAML mapping),
/// and `top` (e.g. a `redis:` section).
fn config(up: &str, policy: &str, top: &str) -> String {
    config_named(up, "c", policy, top)
}

fn config_named(up: &str, name: &str, policy: &str, top: &str) -> String {
    let mut s = one_route(up, &format!("        cache: {name}"), "");
    s.push_str(top);
    s.push_str(&format!("\ncaches:\n  {name}: {policy}\n"));
    s
}

struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Got {
    fn x_cache(&self) -> &str {
        self.headers
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn req(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (resp, body) = send(&http1(), b.body(Full::new(Bytes::new())).unwrap()).await;
    Got {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body,
    }
}

async fn get_(addr: SocketAddr, path: &str) -> Got {
    req(addr, "GET", path, &[]).await
}

#[tokio::test]
async fn a_second_get_is_a_hit_with_age_and_head_is_answered_from_it() {
    let script = Arc::new(Script::default());
    script.set(
        "/agents",
        Reply::ok("[\"a\",\"b\"]").header("etag", "\"v1\""),
    );
    let up = Scripted::start(script.clone()).await;
    let p = start(&config(&up.url(), "{ ttl: 60s, store: memory }", "")).await;
    let addr = p.addr("main").unwrap();

    let first = get_(addr, "/agents").await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = get_(addr, "/agents").await;
    assert_eq!((second.status, second.x_cache()), (200, "HIT"));
    assert_eq!(second.body, first.body);
    assert_eq!(second.headers["content-type"], "application/json");
    let age: u64 = second.headers["age"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&age), "age {age}");
    assert_eq!(script.seen("/agents"), 1);
    // Each answer has its own request id, not the stored one.
    assert_ne!(
        first.headers["x-request-id"],
        second.headers["x-request-id"]
    );

    let head = req(addr, "HEAD", "/agents", &[]).await;
    assert_eq!((head.status, head.x_cache()), (200, "HIT"));
    assert!(head.body.is_empty());
    assert_eq!(head.headers["content-length"], "9");

    // A conditional request the entry satisfies: 304 from the cache.
    let cond = req(addr, "GET", "/agents", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!((cond.status, cond.x_cache()), (304, "HIT"));
    assert!(cond.body.is_empty());
    let other = req(addr, "GET", "/agents", &[("if-none-match", "\"v0\"")]).await;
    assert_eq!((other.status, other.body.len()), (200, 9));

    // A conditional miss asks the upstream for the whole answer, which is then stored.
    let miss = req(addr, "GET", "/cond", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!((miss.status, miss.x_cache()), (200, "MISS"));
    let forwarded = script.last.lock().unwrap().clone().unwrap();
    assert!(!forwarded.contains_key("if-none-match"), "{forwarded:?}");
    assert_eq!(get_(addr, "/cond").await.x_cache(), "HIT");

    // Another query string is another entry.
    assert_eq!(get_(addr, "/agents?page=2").await.x_cache(), "MISS");
    assert_eq!(script.seen("/agents"), 1);
    assert_eq!(script.seen("/agents?page=2"), 1);

    let m = p.encode_metrics();
    assert_eq!(
        sample(
            &m,
            "rampart_cache_lookups_total{cache=\"c\",result=\"hit\"}"
        ),
        Some(5.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "rampart_cache_lookups_total{cache=\"c\",result=\"miss\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&m, "rampart_cache_memory_entries{cache=\"c\"}"),
        Some(3.0)
    );
}

#[tokio::test]
async fn an_entry_expires_after_its_ttl_or_the_upstreams_max_age() {
    let script = Arc::new(Script::default());
    script.set(
        "/short",
        Reply::ok("s").header("cache-control", "max-age=1"),
    );
    let up = Scripted::start(script.clone()).await;
    let p = start(&config(&up.url(), "{ ttl: 1s, store: memory }", "")).await;
    let addr = p.addr("main").unwrap();
    for path in ["/plain", "/short"] {
        assert_eq!(get_(addr, path).await.x_cache(), "MISS");
        assert_eq!(get_(addr, path).await.x_cache(), "HIT");
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for path in ["/plain", "/short"] {
        assert_eq!(get_(addr, path).await.x_cache(), "MISS", "{path}");
        assert_eq!(script.seen(path), 2);
    }
}

#[tokio::test]
async fn what_the_upstream_says_decides_what_is_stored() {
    let script = Arc::new(Script::default());
    let cases: Vec<(&str, Reply, bool)> = vec![
        (
            "/no-store",
            Reply::ok("x").header("cache-control", "no-store"),
            false,
        ),
        (
            "/private",
            Reply::ok("x").header("cache-control", "private, max-age=60"),
            false,
        ),
        (
            "/no-cache",
            Reply::ok("x").header("cache-control", "no-cache"),
            false,
        ),
        (
            "/cookie",
            Reply::ok("x").header("set-cookie", "sid=1"),
            false,
        ),
        ("/vary-star", Reply::ok("x").header("vary", "*"), false),
        (
            "/vary-other",
            Reply::ok("x").header("vary", "Accept-Encoding"),
            false,
        ),
        (
            "/vary-listed",
            Reply::ok("x").header("vary", "Accept-Language"),
            true,
        ),
        (
            "/s-maxage",
            Reply::ok("x").header("cache-control", "max-age=0, s-maxage=60"),
            true,
        ),
        (
            "/max-age-0",
            Reply::ok("x").header("cache-control", "max-age=0"),
            false,
        ),
        ("/error", Reply::ok("x").status(500), false),
        ("/created", Reply::ok("x").status(201), false),
        ("/missing", Reply::ok("x").status(404), true),
        (
            "/moved",
            Reply::ok("x").status(301).header("location", "/x"),
            true,
        ),
        (
            "/events",
            Reply::ok("data: 1\n\n").header("content-type", "text/event-stream"),
            false,
        ),
    ];
    for (path, reply, _) in &cases {
        script.set(path, reply.clone());
    }
    let up = Scripted::start(script.clone()).await;
    let policy = "{ ttl: 60s, store: memory, vary: [accept-language] }";
    let p = start(&config(&up.url(), policy, "")).await;
    let addr = p.addr("main").unwrap();
    for (path, reply, stored) in &cases {
        let a = get_(addr, path).await;
        assert_eq!((a.status, a.x_cache()), (reply.status, "MISS"), "{path}");
        let b = get_(addr, path).await;
        let want = if *stored { "HIT" } else { "MISS" };
        assert_eq!((b.status, b.x_cache()), (reply.status, want), "{path}");
        assert_eq!(script.seen(path), if *stored { 1 } else { 2 }, "{path}");
    }
    // `vary` splits entries by the listed header.
    let de = req(addr, "GET", "/vary-listed", &[("accept-language", "de")]).await;
    assert_eq!(de.x_cache(), "MISS");
    let de = req(addr, "GET", "/vary-listed", &[("accept-language", "de")]).await;
    assert_eq!(de.x_cache(), "HIT");
}

#[tokio::test]
async fn what_the_client_says_is_honoured_and_private_requests_are_not_shared() {
    let script = Arc::new(Script::default());
    let up = Scripted::start(script.clone()).await;
    let p = start(&config(&up.url(), "{ ttl: 60s, store: memory }", "")).await;
    let addr = p.addr("main").unwrap();
    assert_eq!(get_(addr, "/a").await.x_cache(), "MISS");
    assert_eq!(get_(addr, "/a").await.x_cache(), "HIT");
    // no-cache: fetched anew, and what came is stored.
    let fresh = req(addr, "GET", "/a", &[("cache-control", "no-cache")]).await;
    assert_eq!(fresh.x_cache(), "MISS");
    assert_eq!(script.seen("/a"), 2);
    let pragma = req(addr, "GET", "/a", &[("pragma", "no-cache")]).await;
    assert_eq!(pragma.x_cache(), "MISS");
    assert_eq!(get_(addr, "/a").await.x_cache(), "HIT");
    // no-store: passed by.
    let by = req(addr, "GET", "/b", &[("cache-control", "no-store")]).await;
    assert_eq!(by.x_cache(), "BYPASS");
    assert_eq!(get_(addr, "/b").await.x_cache(), "MISS");
    // Authorization, not in `vary`: never from nor into the cache.
    for _ in 0..2 {
        let auth = req(addr, "GET", "/a", &[("authorization", "Bearer t")]).await;
        assert_eq!(auth.x_cache(), "BYPASS");
    }
    assert_eq!(script.seen("/a"), 5);
    // Other methods pass by; their answers carry X-Cache too.
    let post = req(addr, "POST", "/a", &[]).await;
    assert_eq!((post.status, post.x_cache()), (200, "BYPASS"));
    let range = req(addr, "GET", "/a", &[("range", "bytes=0-1")]).await;
    assert_eq!(range.x_cache(), "BYPASS");
}

#[tokio::test]
async fn authorization_is_cached_only_when_the_policy_keys_on_it() {
    let script = Arc::new(Script::default());
    let up = Scripted::start(script.clone()).await;
    let policy = "{ ttl: 60s, store: memory, vary: [authorization] }";
    let p = start(&config(&up.url(), policy, "")).await;
    let addr = p.addr("main").unwrap();
    let alice = [("authorization", "Bearer alice")];
    let bob = [("authorization", "Bearer bob")];
    assert_eq!(req(addr, "GET", "/me", &alice).await.x_cache(), "MISS");
    assert_eq!(req(addr, "GET", "/me", &alice).await.x_cache(), "HIT");
    assert_eq!(req(addr, "GET", "/me", &bob).await.x_cache(), "MISS");
    assert_eq!(get_(addr, "/me").await.x_cache(), "MISS");
    assert_eq!(script.seen("/me"), 3);
}

#[tokio::test]
async fn a_hundred_concurrent_misses_make_one_upstream_request() {
    let script = Arc::new(Script::default());
    script.set(
        "/slow",
        Reply::ok("slow answer").delay(Duration::from_millis(400)),
    );
    let up = Scripted::start(script.clone()).await;
    let p = start(&config(&up.url(), "{ ttl: 60s, store: memory }", "")).await;
    let addr = p.addr("main").unwrap();
    let mut tasks = JoinSet::new();
    for _ in 0..100 {
        tasks.spawn(async move { get_(addr, "/slow").await });
    }
    let mut by = HashMap::<String, usize>::new();
    while let Some(got) = tasks.join_next().await {
        let got = got.unwrap();
        assert_eq!((got.status, &got.body[..]), (200, &b"slow answer"[..]));
        *by.entry(got.x_cache().to_owned()).or_default() += 1;
    }
    assert_eq!(script.seen("/slow"), 1, "{by:?}");
    assert_eq!(by.get("MISS"), Some(&1), "{by:?}");
    assert_eq!(by.get("HIT"), Some(&99), "{by:?}");
    let m = p.encode_metrics();
    assert_eq!(
        sample(&m, "rampart_cache_coalesced_total{cache=\"c\"}"),
        Some(99.0)
    );
}

#[tokio::test]
async fn waiters_go_themselves_when_the_leader_stores_nothing_or_is_too_slow() {
    let script = Arc::new(Script::default());
    script.set(
        "/nostore",
        Reply::ok("x")
            .header("cache-control", "no-store")
            .delay(Duration::from_millis(300)),
    );
    script.set("/slower", Reply::ok("y").delay(Duration::from_millis(1500)));
    let up = Scripted::start(script.clone()).await;
    let policy = "{ ttl: 60s, store: memory, lock_timeout: 200ms }";
    let p = start(&config(&up.url(), policy, "")).await;
    let addr = p.addr("main").unwrap();
    for path in ["/nostore", "/slower"] {
        let mut tasks = JoinSet::new();
        for _ in 0..5 {
            tasks.spawn(async move { get_(addr, path).await });
        }
        let started = Instant::now();
        while let Some(got) = tasks.join_next().await {
            assert_eq!(got.unwrap().status, 200, "{path}");
        }
        // Every one went upstream, and none waited past its lock timeout for the leader.
        assert_eq!(script.seen(path), 5, "{path}");
        assert!(started.elapsed() < Duration::from_millis(2500), "{path}");
    }
}

#[tokio::test]
async fn oversized_answers_pass_whole_and_are_not_stored() {
    let script = Arc::new(Script::default());
    let big = "x".repeat(4096);
    script.set("/big", Reply::ok(&big));
    let up = Scripted::start(script.clone()).await;
    let policy = "{ ttl: 60s, store: memory, max_entry_size: 1KiB }";
    let p = start(&config(&up.url(), policy, "")).await;
    let addr = p.addr("main").unwrap();
    for _ in 0..2 {
        let got = get_(addr, "/big").await;
        assert_eq!((got.x_cache(), got.body.len()), ("MISS", 4096));
    }
    assert_eq!(script.seen("/big"), 2);
}

#[tokio::test]
async fn a_stale_entry_answers_while_the_upstream_is_down_or_failing() {
    let script = Arc::new(Script::default());
    let mut up = Scripted::start(script.clone()).await;
    let yaml = config(
        &up.url(),
        "{ ttl: 1s, store: memory, stale_if_error: 1m }",
        "",
    );
    let p = start(&yaml).await;
    let addr = p.addr("main").unwrap();
    let first = get_(addr, "/agents").await;
    assert_eq!(first.x_cache(), "MISS");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Down: connections refused.
    up.stop();
    let stale = get_(addr, "/agents").await;
    assert_eq!((stale.status, stale.x_cache()), (200, "STALE"));
    assert_eq!(stale.body, first.body);
    // A key never fetched has nothing stale: the error as it is.
    let none = get_(addr, "/never").await;
    assert_eq!((none.status, none.x_cache()), (502, "MISS"));

    // Up, but failing: a 503 is replaced too.
    up.restart().await;
    script.set("/agents", Reply::ok("busy").status(503));
    let stale = get_(addr, "/agents").await;
    assert_eq!((stale.status, stale.x_cache()), (200, "STALE"));
    // Healthy again: fresh.
    script.set("/agents", Reply::ok("[\"new\"]"));
    let fresh = get_(addr, "/agents").await;
    assert_eq!((fresh.status, fresh.x_cache()), (200, "MISS"));
    assert_eq!(&fresh.body[..], b"[\"new\"]");
    assert_eq!(get_(addr, "/agents").await.x_cache(), "HIT");

    // With `stale_if_error: off` the failure goes through.
    let mut up2 = Scripted::start(Arc::new(Script::default())).await;
    let p2 = start(&config(
        &up2.url(),
        "{ ttl: 1s, store: memory, stale_if_error: off }",
        "",
    ))
    .await;
    let addr2 = p2.addr("main").unwrap();
    assert_eq!(get_(addr2, "/agents").await.x_cache(), "MISS");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    up2.stop();
    assert_eq!(get_(addr2, "/agents").await.status, 502);
}

#[tokio::test]
async fn a_stale_entry_answers_while_the_breaker_is_open() {
    let script = Arc::new(Script::default());
    let mut up = Scripted::start(script.clone()).await;
    let mut yaml = config(&up.url(), "{ ttl: 1s, store: memory }", "");
    yaml = yaml.replace(
        "    connect_timeout: 1s\n",
        "    connect_timeout: 1s\n    circuit_breaker: { failures: 2, open_for: 30s }\n",
    );
    let p = start(&yaml).await;
    let addr = p.addr("main").unwrap();
    assert_eq!(get_(addr, "/agents").await.x_cache(), "MISS");
    up.stop();
    // Two failures open the breaker (on an uncached path: errors as they are).
    for _ in 0..2 {
        assert_eq!(get_(addr, "/other").await.status, 502);
    }
    assert_eq!(get_(addr, "/other").await.status, 503);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = get_(addr, "/agents").await;
    assert_eq!((stale.status, stale.x_cache()), (200, "STALE"));
}

#[tokio::test]
async fn two_instances_share_entries_through_redis_and_purges_reach_both() {
    let Some(redis) = RedisServer::any("cache_shared").await else {
        return;
    };
    let script = Arc::new(Script::default());
    let up = Scripted::start(script.clone()).await;
    let top = format!("\nredis:\n  url: \"{}\"\n", redis.url);
    let name = unique("c");
    let yaml = config_named(&up.url(), &name, "{ ttl: 60s, store: redis }", &top);
    let a = start(&yaml).await;
    let b = start(&yaml).await;
    let (aa, ba) = (a.addr("main").unwrap(), b.addr("main").unwrap());

    assert_eq!(get_(aa, "/api/agents").await.x_cache(), "MISS");
    // B has never seen it: Redis has (written in a task of its own, so allow a moment).
    assert_eventually!(
        get_(ba, "/api/agents").await.x_cache() == "HIT",
        "B never found A's entry in Redis"
    );
    assert_eq!(script.seen("/api/agents"), 1);
    assert_eq!(get_(ba, "/api/other").await.x_cache(), "MISS");

    // Purge on A, by prefix: gone from A at once, from B within its poll of the log, and
    // Redis's copy counts as gone for both.
    let purge = Request::post(format!("http://{}/admin/cache/purge", a.admin_addr))
        .body(Full::new(Bytes::from_static(
            b"{\"prefix\":\"/api/agents\"}",
        )))
        .unwrap();
    let (resp, body) = send(&http1(), purge).await;
    assert_eq!(resp.status(), 200, "{body:?}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["propagated"], true, "{v}");
    assert_eq!(get_(aa, "/api/agents").await.x_cache(), "MISS");
    assert_eq!(script.seen("/api/agents"), 2);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let after = get_(ba, "/api/agents").await.x_cache().to_owned();
    // B either fetched it anew or found the entry A stored after the purge: never the
    // purged one (stored before the purge).
    assert!(after == "MISS" || after == "HIT", "{after}");
    assert_eq!(get_(ba, "/api/other").await.x_cache(), "HIT");

    let (_, doc) = send(&http1(), get(a.admin_addr, "/admin/cache")).await;
    let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    assert_eq!(doc["caches"][0]["store"], "redis", "{doc}");
}

#[tokio::test]
async fn a_purge_reaches_a_replica_that_still_holds_the_entry_in_memory() {
    let Some(redis) = RedisServer::any("cache_purge").await else {
        return;
    };
    let script = Arc::new(Script::default());
    let up = Scripted::start(script.clone()).await;
    let top = format!("\nredis:\n  url: \"{}\"\n", redis.url);
    let yaml = config(&up.url(), "{ ttl: 60s, store: redis }", &top);
    let a = start(&yaml).await;
    let b = start(&yaml).await;
    let (aa, ba) = (a.addr("main").unwrap(), b.addr("main").unwrap());
    assert_eq!(get_(ba, "/x").await.x_cache(), "MISS");
    assert_eq!(get_(ba, "/x").await.x_cache(), "HIT");
    let purge = Request::post(format!("http://{}/admin/cache/purge", a.admin_addr))
        .body(Full::new(Bytes::from_static(b"{\"route\":\"all\"}")))
        .unwrap();
    assert_eq!(send(&http1(), purge).await.0.status(), 200);
    // B drops it from memory within its poll, and does not take Redis's old copy.
    assert_eventually!(
        get_(ba, "/x").await.x_cache() == "MISS",
        "B kept serving a purged entry"
    );
    // B's new entry, stored after the purge, is A's too: A's first look finds it in Redis
    // (B writes it in a task of its own: a moment for that).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_(aa, "/x").await.x_cache(), "HIT");
}

#[tokio::test]
async fn with_redis_killed_the_memory_tier_answers_and_misses_are_served() {
    let Some(mut redis) = RedisServer::own("cache_redis_killed").await else {
        return;
    };
    let script = Arc::new(Script::default());
    let up = Scripted::start(script.clone()).await;
    let top = format!("\nredis:\n  url: \"{}\"\n  timeout: 200ms\n", redis.url);
    let p = start(&config(&up.url(), "{ ttl: 60s, store: redis }", &top)).await;
    let addr = p.addr("main").unwrap();
    assert_eq!(get_(addr, "/kept").await.x_cache(), "MISS");
    redis.kill();
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get_(addr, "/kept").await.x_cache(), "HIT");
    }
    for i in 0..20 {
        let got = get_(addr, &format!("/new/{i}")).await;
        assert_eq!((got.status, got.x_cache()), (200, "MISS"));
    }
    // After the first failures Redis is skipped: 40 requests take nowhere near 40 timeouts.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Stored in memory while Redis was down.
    assert_eq!(get_(addr, "/new/0").await.x_cache(), "HIT");
    let m = p.encode_metrics();
    assert!(
        sample(
            &m,
            "rampart_cache_store_errors_total{cache=\"c\",op=\"get\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
            || sample(
                &m,
                "rampart_cache_store_errors_total{cache=\"c\",op=\"set\"}"
            )
            .unwrap_or(0.0)
                >= 1.0,
        "{m}"
    );

    // Redis back: used again (an entry stored now reaches it).
    redis.restart().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..5 {
        get_(addr, &format!("/after/{i}")).await;
    }
    let port = redis.port;
    assert_eventually!(
        crate::support::redis::command(port, &["DBSIZE"])
            .await
            .trim()
            != ":0",
        "nothing reached Redis after it came back"
    );
}

/// The users' drill: the backend down for 10 s while clients loop on a cached
/// `GET /api/agents`. No error reaches a client (stale answers), and within one TTL of
/// its return the answers are fresh again (the TTL is short here so the test is too).
#[tokio::test]
async fn drill_backend_down_for_10s_cached_get_never_fails() {
    let script = Arc::new(Script::default());
    script.set("/api/agents", Reply::ok("[\"v1\"]"));
    let mut up = Scripted::start(script.clone()).await;
    // As the shipped proxy.yaml has it: the backend's health check, which turns the
    // breaker half-open as soon as the backend answers again.
    let yaml = config(&up.url(), "{ ttl: 3s, store: memory }", "").replace(
        "    connect_timeout: 1s\n",
        "    connect_timeout: 1s\n    health_check: { path: /health }\n",
    );
    let p = start(&yaml).await;
    let addr = p.addr("main").unwrap();
    assert_eq!(get_(addr, "/api/agents").await.status, 200);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let looper = tokio::spawn(async move {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s2.load(Ordering::SeqCst) && Instant::now() < deadline {
            let got = get_(addr, "/api/agents").await;
            seen.push((
                Instant::now(),
                got.status,
                got.x_cache().to_owned(),
                got.body,
            ));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    up.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    script.set("/api/agents", Reply::ok("[\"v2\"]"));
    up.restart().await;
    let back = Instant::now();
    tokio::time::sleep(Duration::from_millis(4000)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = looper.await.unwrap();

    let failed: Vec<_> = seen.iter().filter(|s| s.1 != 200).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(seen.iter().filter(|s| s.2 == "STALE").count() > 50);
    // Fresh within one TTL (3 s) of the backend's return.
    assert!(
        seen.iter().any(|s| s.0 > back
            && s.0 < back + Duration::from_millis(3000)
            && &s.3[..] == b"[\"v2\"]"),
        "not fresh again within one TTL"
    );
    assert_eq!(&seen.last().unwrap().3[..], b"[\"v2\"]");
}

#[tokio::test]
async fn reload_keeps_the_memory_tier_and_a_new_config_with_a_cache_serves() {
    let script = Arc::new(Script::default());
    let up = Scripted::start(script.clone()).await;
    let p = start(&config(&up.url(), "{ ttl: 60s, store: memory }", "")).await;
    let addr = p.addr("main").unwrap();
    assert_eq!(get_(addr, "/r").await.x_cache(), "MISS");
    let again = parse(&config(&up.url(), "{ ttl: 30s, store: memory }", ""));
    let report = p.apply(again).await;
    assert!(format!("{report:?}").contains("Ok"), "{report:?}");
    assert_eq!(get_(addr, "/r").await.x_cache(), "HIT");
    assert_eq!(script.seen("/r"), 1);
    drop(script.last.lock().unwrap().take());
    assert_eq!(script.total.load(Ordering::SeqCst), 1);
}

/// An upstream that dies in the middle of a cacheable body: the client's answer is cut (a
/// truncated JSON must not look complete) and nothing is stored.
#[tokio::test]
async fn a_body_cut_mid_way_is_not_stored() {
    let up = crate::support::upstream::Upstream::start().await;
    let yaml = one_route(
        &up.url(),
        "        cache: c\n        timeouts: { idle: 300ms }",
        "",
    ) + "\ncaches:\n  c: { ttl: 60s, store: memory }\n";
    let p = start(&yaml).await;
    let addr = p.addr("main").unwrap();
    for _ in 0..2 {
        let resp = send_streaming(&http1(), get(addr, "/stall?after=10")).await;
        assert_eq!(resp.headers()["x-cache"], "MISS");
        let body = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert!(body.is_err(), "a cut body must fail, not end");
    }
    assert_eq!(up.requests(), 2);
    let m = p.encode_metrics();
    assert_eq!(
        sample(&m, "rampart_cache_stored_total{cache=\"c\"}"),
        Some(0.0)
    );
}

/// A leader whose client leaves before the answer is stored: the requests waiting on it
/// wake at once (not after `lock_timeout`) and go upstream themselves.
#[tokio::test]
async fn waiters_wake_when_the_leaders_client_leaves() {
    let up = crate::support::upstream::Upstream::start().await;
    let yaml = one_route(
        &up.url(),
        "        cache: c\n        timeouts: { idle: 2s }",
        "",
    ) + "\ncaches:\n  c: { ttl: 60s, store: memory, lock_timeout: 10s }\n";
    let p = start(&yaml).await;
    let addr = p.addr("main").unwrap();
    // The leader: its headers come, the body stalls; then its client goes.
    let leader = send_streaming(&http1(), get(addr, "/stall?after=10")).await;
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let resp = send_streaming(&http1(), get(addr, "/stall?after=10")).await;
        (started.elapsed(), resp.headers()["x-cache"].clone())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the second request must wait for the first"
    );
    drop(leader);
    let (waited, how) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter woke")
        .unwrap();
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    assert_eq!(how, "MISS");
    assert_eq!(up.requests(), 2);
}

/// What Redis holds is read as untrusted bytes: garbage, or another key's entry, under a
/// key is a miss, never a panic or a wrong answer.
#[tokio::test]
async fn garbage_or_a_foreign_entry_in_redis_is_a_miss() {
    let Some(redis) = RedisServer::own("cache_garbage").await else {
        return;
    };
    let script = Arc::new(Script::default());
    script.set("/x", Reply::ok("right"));
    script.set("/y", Reply::ok("wrong"));
    let up = Scripted::start(script.clone()).await;
    let top = format!("\nredis:\n  url: \"{}\"\n", redis.url);
    let yaml = config(&up.url(), "{ ttl: 60s, store: redis }", &top);
    let a = start(&yaml).await;
    let aa = a.addr("main").unwrap();
    let key = |path: &str| format!("rc:c:main\nall\n127.0.0.1\n{path}\n");
    // /y's entry, stored by A and copied under /x's key.
    assert_eq!(get_(aa, "/y").await.x_cache(), "MISS");
    assert_eventually!(
        crate::support::redis::command(redis.port, &["EXISTS", &key("/y")])
            .await
            .trim()
            == ":1",
        "A never stored /y in Redis"
    );
    let reply = crate::support::redis::command(redis.port, &["COPY", &key("/y"), &key("/x")]).await;
    assert_eq!(reply.trim(), ":1", "{reply}");
    // A fresh instance (empty memory tier) reads /x from Redis: another key's entry.
    let b = start(&yaml).await;
    let ba = b.addr("main").unwrap();
    let got = get_(ba, "/x").await;
    assert_eq!((got.x_cache(), &got.body[..]), ("MISS", &b"right"[..]));
    // Garbage under a key.
    for junk in ["", "RPCE", "\u{1}\u{2}\u{3}", "not an entry at all"] {
        let c = start(&yaml).await;
        let ca = c.addr("main").unwrap();
        crate::support::redis::command(redis.port, &["SET", &key("/g"), junk]).await;
        let got = get_(ca, "/g").await;
        assert_eq!((got.status, got.x_cache()), (200, "MISS"), "{junk:?}");
    }
}

/// The purge endpoint refuses what it cannot act on, with a clear answer.
#[tokio::test]
async fn the_purge_endpoint_refuses_bad_requests() {
    let script = Arc::new(Script::default());
    let up = Scripted::start(script.clone()).await;
    let p = start(&config(&up.url(), "{ ttl: 60s, store: memory }", "")).await;
    let admin = p.admin_addr;
    let post = |body: &'static [u8], origin: bool| {
        let mut b = Request::post(format!("http://{admin}/admin/cache/purge"));
        if origin {
            b = b.header("origin", "http://evil.example");
        }
        b.body(Full::new(Bytes::from_static(body))).unwrap()
    };
    let cases: [(&[u8], bool, u16); 6] = [
        (b"not json", false, 400),
        (b"{}", false, 400),
        (b"{\"prefix\": 7}", false, 400),
        // A misspelt field must not widen the purge.
        (b"{\"prefix\": \"/\", \"rout\": \"all\"}", false, 400),
        (b"{\"prefix\": \"/\"}", true, 403),
        (b"{\"route\": \"all\"}", false, 200),
    ];
    for (body, origin, want) in cases {
        let (resp, text) = send(&http1(), post(body, origin)).await;
        assert_eq!(
            resp.status(),
            want,
            "{:?}: {text:?}",
            String::from_utf8_lossy(body)
        );
    }
    let big = vec![b' '; 64 * 1024];
    let req = Request::post(format!("http://{admin}/admin/cache/purge"))
        .body(Full::new(Bytes::from(big)))
        .unwrap();
    assert_eq!(send(&http1(), req).await.0.status(), 400);
    let (resp, _) = send(&http1(), get(admin, "/admin/cache/purge")).await;
    assert_eq!(resp.status(), 405);
    // Without Redis the purge says it stayed here.
    let req = post(b"{\"prefix\": \"/\"}", false);
    let (_, text) = send(&http1(), req).await;
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(v["propagated"], false, "{v}");
}

/// The cache's lookups feed the `cache_hit_rate` signal: the LowCacheHitRate rule fires on
/// misses and resolves on hits.
#[tokio::test]
async fn the_hit_rate_feeds_the_low_cache_hit_rate_rule() {
    let script = Arc::new(Script::default());
    let up = Scripted::start(script.clone()).await;
    let alerts = "\nalerts:\n  interval: 1s\n  rules:\n    - { name: LowCacheHitRate, signal: cache_hit_rate, threshold: 50%, window: 2s, min_samples: 3 }\n";
    let p = start(&config(&up.url(), "{ ttl: 60s, store: memory }", alerts)).await;
    let addr = p.addr("main").unwrap();
    let state = |admin: SocketAddr| async move {
        let (_, body) = send(&http1(), get(admin, "/admin/alerts")).await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["rules"][0]["state"].as_str().unwrap_or("").to_owned()
    };
    for i in 0..6 {
        assert_eq!(get_(addr, &format!("/miss/{i}")).await.x_cache(), "MISS");
    }
    assert_eventually!(
        state(p.admin_addr).await == "firing",
        "never fired on misses"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for _ in 0..10 {
            assert_eq!(get_(addr, "/miss/0").await.x_cache(), "HIT");
        }
        if state(p.admin_addr).await == "inactive" {
            break;
        }
        assert!(Instant::now() < deadline, "never resolved on hits");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An upstream that stops answering in time: the stale entry answers at the first-byte
/// timeout.
#[tokio::test]
async fn a_stale_entry_answers_for_an_upstream_that_times_out() {
    let script = Arc::new(Script::default());
    let up = Scripted::start(script.clone()).await;
    let yaml = one_route(
        &up.url(),
        "        cache: c\n        timeouts: { first_byte: 300ms }",
        "",
    ) + "\ncaches:\n  c: { ttl: 1s, store: memory }\n";
    let p = start(&yaml).await;
    let addr = p.addr("main").unwrap();
    assert_eq!(get_(addr, "/t").await.x_cache(), "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    script.set("/t", Reply::ok("late").delay(Duration::from_secs(3)));
    let started = Instant::now();
    let got = get_(addr, "/t").await;
    assert_eq!((got.status, got.x_cache()), (200, "STALE"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(&got.body[..], b"{\"default\":true}");
}
