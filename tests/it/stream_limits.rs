//! `max_streams`: open streams per key, against real sockets, a scripted SSE upstream that
//! holds its streams open until told, and real Redis servers (killed, shared by two
//! instances, outliving a killed rampart process).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::process::{Proc, free_port, temp_dir};
use crate::support::redis::{RedisServer, unique};
use crate::support::*;

// === a held SSE upstream ===

/// What a held stream does next.
#[derive(Debug, Clone, Copy)]
enum End {
    /// A last event and the chunked terminator.
    Finish,
    /// The connection closed in the middle of the body.
    Fail,
}

/// Answers every request with an event stream: the head and a first event at once, then
/// nothing until the test ends it (`finish_all`, `fail_all`).
struct HeldSse {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    held: Arc<Mutex<Vec<oneshot::Sender<End>>>>,
    task: JoinHandle<()>,
}

impl Drop for HeldSse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HeldSse {
    async fn start() -> HeldSse {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let held: Arc<Mutex<Vec<oneshot::Sender<End>>>> = Arc::default();
        let (acc, h) = (accepted.clone(), held.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let (tx, rx) = oneshot::channel();
                let h = h.clone();
                let acc = acc.clone();
                tokio::spawn(async move {
                    if let Some(s) = read_head(s).await {
                        h.lock().unwrap().push(tx);
                        acc.fetch_add(1, Ordering::SeqCst);
                        serve_held(s, rx).await;
                    }
                });
            }
        });
        HeldSse {
            addr,
            accepted,
            held,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn end_all(&self, end: End) -> usize {
        let held: Vec<_> = self.held.lock().unwrap().drain(..).collect();
        let n = held.len();
        for tx in held {
            let _ = tx.send(end);
        }
        n
    }
}

async fn read_head(mut s: TcpStream) -> Option<TcpStream> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(s)
}

fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

async fn serve_held(mut s: TcpStream, end: oneshot::Receiver<End>) {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{}",
        chunk("data: first\n\n")
    );
    if s.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    // Bounded: a test that forgets its streams does not leave them for ever.
    match tokio::time::timeout(Duration::from_secs(60), end).await {
        Ok(Ok(End::Finish)) => {
            let tail = format!("{}0\r\n\r\n", chunk("data: [DONE]\n\n"));
            let _ = s.write_all(tail.as_bytes()).await;
            let _ = s.flush().await;
        }
        Ok(Ok(End::Fail)) => {
            let _ = s.set_zero_linger();
        }
        _ => {}
    }
}

// === a client holding streams ===

/// One request on its own connection: the head read, the rest left on the socket.
struct Opened {
    status: u16,
    head: String,
    /// Bytes after the head read so far.
    rest: Vec<u8>,
    socket: TcpStream,
}

impl Opened {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// Reads to the end of the chunked body (within 5 s): the bytes after the head.
    async fn body_to_end(mut self) -> String {
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.rest.ends_with(b"0\r\n\r\n") {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.socket.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.rest.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&self.rest).into_owned()
    }
}

/// GET /chat with `x-user: user` on a fresh connection; the head within 5 s.
async fn open(addr: SocketAddr, user: &str) -> Opened {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /chat HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\nx-user: {user}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!("no head from {addr}: {other:?}"),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Opened {
        status,
        head,
        rest: buf[end..].to_vec(),
        socket: s,
    }
}

/// `n` streams opened at once; the 200s kept open, the others' heads returned.
async fn open_many(addr: SocketAddr, user: &str, n: usize) -> (Vec<Opened>, Vec<Opened>) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let user = user.to_owned();
            tokio::spawn(async move { open(addr, &user).await })
        })
        .collect();
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        let o = t.await.unwrap();
        if o.status == 200 {
            ok.push(o);
        } else {
            refused.push(o);
        }
    }
    (ok, refused)
}

/// Opens streams until one is admitted, for up to `within`: the admitted one.
async fn admitted_within(addr: SocketAddr, user: &str, within: Duration) -> Opened {
    let deadline = Instant::now() + within;
    loop {
        let o = open(addr, user).await;
        match o.status {
            200 => return o,
            429 => {}
            s => panic!("unexpected status {s}:\n{}", o.head),
        }
        assert!(
            Instant::now() < deadline,
            "not admitted within {within:?}:\n{}",
            o.head
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_refused(o: &Opened, policy: &str, max: u64) {
    assert_eq!(o.status, 429, "{}", o.head);
    assert_eq!(o.header("retry-after").as_deref(), Some("1"), "{}", o.head);
    assert_eq!(
        o.header("ratelimit-policy"),
        Some(format!("\"{policy}\";q={max};qu=\"concurrent-requests\"")),
        "{}",
        o.head
    );
    assert_eq!(
        o.header("ratelimit"),
        Some(format!("\"{policy}\";r=0;t=1")),
        "{}",
        o.head
    );
    assert_eq!(o.header("x-ratelimit-remaining").as_deref(), Some("0"));
}

// === configurations ===

/// One route `/` to `up` limited by `policy` (a line of `rate_limits:`), after `top`.
fn config(up: &str, name: &str, policy: &str, top: &str) -> String {
    let mut s = one_route(up, &format!("        rate_limits: [{name}]"), "");
    s.push_str(top);
    s.push_str(&format!("\nrate_limits:\n  {name}: {policy}\n"));
    s
}

fn redis_top(url: &str, replicas: u32) -> String {
    format!("\nredis:\n  url: \"{url}\"\n  timeout: 200ms\nreplicas: {replicas}\n")
}

async fn metrics(admin: SocketAddr) -> String {
    let (_, body) = send(&http1(), get(admin, "/metrics")).await;
    String::from_utf8_lossy(&body).into_owned()
}

// === tests ===

async fn five_streams_three_admitted(store: &str, top: &str) {
    let up = HeldSse::start().await;
    let p = unique("five");
    let px = start(&config(
        &up.url(),
        &p,
        &format!("{{ max_streams: 3, key: \"header:x-user\", store: {store} }}"),
        top,
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let (ok, refused) = open_many(addr, "alice", 5).await;
    assert_eq!((ok.len(), refused.len()), (3, 2));
    for o in &refused {
        assert_refused(o, &p, 3);
    }
    assert_eq!(up.requests(), 3, "refused streams never reach the upstream");
    // Another key has streams of its own.
    let bob = open(addr, "bob").await;
    assert_eq!(bob.status, 200, "{}", bob.head);
    let m = metrics(px.admin_addr).await;
    let held = format!("rampart_ratelimit_streams_held{{policy=\"{p}\"}}");
    assert_eq!(sample(&m, &held), Some(4.0), "{m}");
    let source = if store == "redis" { "redis" } else { "memory" };
    let limited = format!(
        "rampart_ratelimit_stream_decisions_total{{policy=\"{p}\",result=\"limited\",source=\"{source}\"}}"
    );
    assert_eq!(sample(&m, &limited), Some(2.0), "{m}");
    up.end_all(End::Finish);
    drop((ok, bob));
    px.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_streams_three_admitted_in_memory() {
    five_streams_three_admitted("memory", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_streams_three_admitted_in_redis() {
    let Some(redis) = RedisServer::any("five_streams_three_admitted_in_redis").await else {
        return;
    };
    five_streams_three_admitted("redis", &redis_top(&redis.url, 1)).await;
}

/// The permit goes back when the exchange ends, however it ends.
async fn released_however_the_stream_ends(store: &str, top: &str) {
    let up = HeldSse::start().await;
    let p = unique("rel");
    let px = start(&config(
        &up.url(),
        &p,
        &format!("{{ max_streams: 1, key: \"header:x-user\", store: {store} }}"),
        top,
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let wait = Duration::from_secs(3);

    // Completed: all of it arrives, then the next is admitted.
    let first = open(addr, "alice").await;
    assert_eq!(first.status, 200, "{}", first.head);
    assert_refused(&open(addr, "alice").await, &p, 1);
    assert_eq!(up.end_all(End::Finish), 1);
    let body = first.body_to_end().await;
    assert!(body.contains("data: [DONE]"), "{body}");
    let second = admitted_within(addr, "alice", wait).await;

    // The client leaves in the middle.
    assert_refused(&open(addr, "alice").await, &p, 1);
    drop(second);
    let third = admitted_within(addr, "alice", wait).await;

    // The upstream fails in the middle.
    assert_refused(&open(addr, "alice").await, &p, 1);
    assert!(up.end_all(End::Fail) >= 1);
    let body = third.body_to_end().await;
    assert!(!body.contains("[DONE]"), "{body}");
    let fourth = admitted_within(addr, "alice", wait).await;
    up.end_all(End::Finish);
    drop(fourth);
    px.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_however_the_stream_ends_in_memory() {
    released_however_the_stream_ends("memory", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_however_the_stream_ends_in_redis() {
    let Some(redis) = RedisServer::any("released_however_the_stream_ends_in_redis").await else {
        return;
    };
    released_however_the_stream_ends("redis", &redis_top(&redis.url, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_count_in_redis() {
    let Some(redis) = RedisServer::any("two_instances_share_the_count_in_redis").await else {
        return;
    };
    let up = HeldSse::start().await;
    let p = unique("share");
    let yaml = config(
        &up.url(),
        &p,
        "{ max_streams: 3, key: \"header:x-user\" }",
        &redis_top(&redis.url, 2),
    );
    let a = start(&yaml).await;
    let b = start(&yaml).await;
    let (addr_a, addr_b) = (a.addr("main").unwrap(), b.addr("main").unwrap());
    let (on_a, refused) = open_many(addr_a, "alice", 2).await;
    assert_eq!((on_a.len(), refused.len()), (2, 0));
    let on_b = open(addr_b, "alice").await;
    assert_eq!(on_b.status, 200, "{}", on_b.head);
    assert_refused(&open(addr_a, "alice").await, &p, 3);
    assert_refused(&open(addr_b, "alice").await, &p, 3);
    // One ends on A: B may take it.
    drop(on_a);
    let again = admitted_within(addr_b, "alice", Duration::from_secs(3)).await;
    up.end_all(End::Finish);
    drop((on_b, again));
    a.shutdown().await;
    b.shutdown().await;
}

/// A rampart killed with 3 streams open: its permits expire with their lease (3 s), then
/// another instance admits the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_frees_its_streams_within_the_lease() {
    let test = "a_killed_replica_frees_its_streams_within_the_lease";
    let Some(redis) = RedisServer::own(test).await else {
        return;
    };
    let up = HeldSse::start().await;
    let p = unique("kill");
    let lease = Duration::from_secs(3);
    let policy = "{ max_streams: 3, stream_lease: 3s, key: \"header:x-user\" }";
    let (port, admin) = (free_port(), free_port());
    let file = format!(
        "admin: {{ listen: \"127.0.0.1:{admin}\" }}\nlisteners:\n  - name: main\n    listen: \"127.0.0.1:{port}\"\n    routes: [{{ upstream: up, rate_limits: [{p}] }}]\nupstreams:\n  up: {{ endpoints: [\"{}\"] }}\n{}\nrate_limits:\n  {p}: {policy}\n",
        up.url(),
        redis_top(&redis.url, 2)
    );
    let path = temp_dir(test).join("rampart.yaml");
    std::fs::write(&path, file).unwrap();
    let mut proc_a = Proc::spawn(&path, SocketAddr::from(([127, 0, 0, 1], admin)));
    proc_a.wait_ready().await;
    let addr_a = SocketAddr::from(([127, 0, 0, 1], port));
    let (held, refused) = open_many(addr_a, "alice", 3).await;
    assert_eq!((held.len(), refused.len()), (3, 0));
    // Past one lease while alive: renewed, still counted.
    tokio::time::sleep(lease + Duration::from_secs(1)).await;
    let b = start(&config(&up.url(), &p, policy, &redis_top(&redis.url, 2))).await;
    let addr_b = b.addr("main").unwrap();
    assert_refused(&open(addr_b, "alice").await, &p, 3);

    proc_a.signal("KILL");
    assert!(proc_a.wait_exit(Duration::from_secs(5)).await.is_some());
    let killed = Instant::now();
    // Still refused right after: the leases run on.
    assert_refused(&open(addr_b, "alice").await, &p, 3);
    let admitted = admitted_within(addr_b, "alice", lease + Duration::from_secs(2)).await;
    eprintln!("{test}: admitted {:?} after the kill", killed.elapsed());
    drop((held, admitted));
    up.end_all(End::Finish);
    b.shutdown().await;
}

/// Redis killed with permits held in it: new streams are decided in memory at
/// `max_streams / replicas` (rounded up), nothing fails, and the streams held in Redis end
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_while_streams_are_held_falls_back_to_memory() {
    let test = "redis_killed_while_streams_are_held_falls_back_to_memory";
    let Some(mut redis) = RedisServer::own(test).await else {
        return;
    };
    let up = HeldSse::start().await;
    let p = unique("down");
    let px = start(&config(
        &up.url(),
        &p,
        "{ max_streams: 3, key: \"header:x-user\" }",
        &redis_top(&redis.url, 2),
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let (in_redis, _) = open_many(addr, "alice", 2).await;
    assert_eq!(in_redis.len(), 2);

    redis.kill();
    // ceil(3 / 2) = 2 in memory, whatever Redis held.
    let mut fallback = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let o = open(addr, "alice").await;
        statuses.push(o.status);
        if o.status == 200 {
            fallback.push(o);
        }
    }
    assert_eq!(
        statuses,
        [200, 200, 429, 429],
        "2 from memory, then refused"
    );
    // The Redis ones end; their releases fail against the dead Redis, harmlessly.
    up.end_all(End::Finish);
    for o in in_redis.into_iter().chain(fallback) {
        let body = o.body_to_end().await;
        assert!(body.contains("[DONE]"), "{body}");
    }
    // The memory permits went back to memory.
    let again = admitted_within(addr, "alice", Duration::from_secs(3)).await;
    let m = metrics(px.admin_addr).await;
    let allowed = format!(
        "rampart_ratelimit_stream_decisions_total{{policy=\"{p}\",result=\"allowed\",source=\"memory\"}}"
    );
    assert!(sample(&m, &allowed).unwrap_or(0.0) >= 3.0, "{m}");
    up.end_all(End::Finish);
    drop(again);
    px.shutdown().await;
}

/// A reload that keeps the policy's name keeps its permits; a lower `max_streams` counts
/// the new streams against the new limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lowering_max_streams_keeps_the_held_permits() {
    let up = HeldSse::start().await;
    let p = unique("reload");
    let yaml = |max: u32| {
        config(
            &up.url(),
            &p,
            &format!("{{ max_streams: {max}, key: \"header:x-user\", store: memory }}"),
            "",
        )
    };
    let px = start(&yaml(3)).await;
    let addr = px.addr("main").unwrap();
    let (mut held, _) = open_many(addr, "alice", 2).await;
    assert_eq!(held.len(), 2);
    let report = px.apply(parse(&yaml(1))).await;
    assert!(report.is_ok(), "{report:?}");
    // Both held streams still flow; a new one counts against 1.
    assert_refused(&open(addr, "alice").await, &p, 1);
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_refused(&open(addr, "alice").await, &p, 1);
    drop(held);
    let again = admitted_within(addr, "alice", Duration::from_secs(3)).await;
    assert_refused(&open(addr, "alice").await, &p, 1);
    up.end_all(End::Finish);
    drop(again);
    px.shutdown().await;
}

/// A WebSocket tunnel is an open stream for as long as it stays open, not just its 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_tunnel_holds_its_permit_until_it_closes() {
    let up = Upstream::start().await;
    let p = unique("ws");
    let px = start(&config(
        &up.url(),
        &p,
        "{ max_streams: 1, key: \"header:x-user\", store: memory }",
        "",
    ))
    .await;
    let addr = px.addr("main").unwrap();
    let upgrade = |addr: SocketAddr| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nhost: {addr}\r\nx-user: alice\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                other => panic!("no head: {other:?}"),
            }
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        (head, s)
    };
    let (head, mut tunnel) = upgrade(addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The tunnel carries bytes, and the permit is still held well after the 101.
    tunnel.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (head, _) = upgrade(addr).await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    drop(tunnel);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (head, _s) = upgrade(addr).await;
        if head.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {head}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    px.shutdown().await;
}

/// A draining replica ends its streams (final event, then close) and gives their permits
/// back: the other replica admits the key at once, not a lease later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_gives_the_streams_back() {
    let Some(redis) = RedisServer::any("a_drain_gives_the_streams_back").await else {
        return;
    };
    let up = HeldSse::start().await;
    let p = unique("drain");
    let top = format!(
        "{}drain: {{ accept_grace: 0s, timeout: 1s }}\n",
        redis_top(&redis.url, 2)
    );
    let yaml = config(
        &up.url(),
        &p,
        "{ max_streams: 1, stream_lease: 1m, key: \"header:x-user\" }",
        &top,
    );
    let a = start(&yaml).await;
    let b = start(&yaml).await;
    let held = open(a.addr("main").unwrap(), "alice").await;
    assert_eq!(held.status, 200, "{}", held.head);
    let addr_b = b.addr("main").unwrap();
    assert_refused(&open(addr_b, "alice").await, &p, 1);
    let drained = Instant::now();
    a.shutdown().await;
    let body = held.body_to_end().await;
    assert!(body.contains("data: first"), "{body}");
    // Well within the 1 minute lease.
    let again = admitted_within(addr_b, "alice", Duration::from_secs(5)).await;
    eprintln!(
        "drain: admitted on B {:?} after A's drain began",
        drained.elapsed()
    );
    up.end_all(End::Finish);
    drop(again);
    b.shutdown().await;
}

/// A stream ended by the route's idle timeout (the upstream went silent) gives its permit
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ended_by_a_timeout_gives_its_permit_back() {
    let up = HeldSse::start().await;
    let p = unique("idle");
    let yaml = config(
        &up.url(),
        &p,
        "{ max_streams: 1, key: \"header:x-user\", store: memory }",
        "",
    )
    .replace(
        "        rate_limits:",
        "        timeouts: { idle: 500ms }\n        rate_limits:",
    );
    let px = start(&yaml).await;
    let addr = px.addr("main").unwrap();
    let first = open(addr, "alice").await;
    assert_eq!(first.status, 200, "{}", first.head);
    assert_refused(&open(addr, "alice").await, &p, 1);
    // The silent upstream is cut after 500 ms; the client still holds its socket.
    let again = admitted_within(addr, "alice", Duration::from_secs(3)).await;
    up.end_all(End::Finish);
    drop((first, again));
    px.shutdown().await;
}
