//! Rate limits on a real Redis Cluster started by the test (3 masters, and 3 replicas for
//! the fail-over): keys spread over the masters with exact counts shared by two instances,
//! a master killed under load (per-request fallback, no 5xx, no hang, back on Redis once
//! its replica is promoted), and `redis.cluster` refused at file:line:column when wrong.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::assert_eventually;
use crate::support::process::free_port;
use crate::support::redis::{self, RedisServer, unique};
use crate::support::*;

/// A Redis Cluster of `masters` masters with `replicas` replicas each, made by
/// `redis-cli --cluster create` from `redis-server --cluster-enabled yes` nodes on free
/// ports, each in a temp dir of its own; stopped on drop.
struct Cluster {
    nodes: Vec<RedisServer>,
    /// `requirepass` (and `masterauth`) of every node.
    password: Option<String>,
}

impl Cluster {
    async fn start(
        test: &str,
        masters: usize,
        replicas: usize,
        password: Option<&str>,
    ) -> Option<Cluster> {
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            // The bus port defaults to port + 10000, which may be taken or beyond 65535.
            let bus = free_port().to_string();
            nodes.push(
                RedisServer::spawn(
                    test,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &bus,
                        // In the node's own temp dir.
                        "--cluster-config-file",
                        "nodes.conf",
                        // A dead master is failed over in about 4 s.
                        "--cluster-node-timeout",
                        "2000",
                        // Replicas sync at once, not after the default 5 s.
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
                .await?,
            );
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = Cluster {
            nodes,
            password: None,
        };
        let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
        cluster.wait_ok(&ports, Duration::from_secs(30)).await;
        // A replica that never synced cannot be elected: wait for every link.
        let deadline = Instant::now() + Duration::from_secs(30);
        for p in &ports {
            loop {
                let info = cluster.cmd(*p, &["INFO", "replication"]).await;
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {p} never synced: {info}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Set once the cluster is up (the support code's PING knows no AUTH).
        if let Some(pw) = password {
            for p in &ports {
                for setting in ["masterauth", "requirepass"] {
                    let reply = redis::command(*p, &["CONFIG", "SET", setting, pw]).await;
                    assert!(reply.starts_with("+OK"), "CONFIG SET {setting}: {reply}");
                }
            }
            cluster.password = Some(pw.to_owned());
        }
        Some(cluster)
    }

    /// Until every node in `ports` says `cluster_state:ok`; panics after `limit`.
    async fn wait_ok(&self, ports: &[u16], limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let mut ok = true;
            for p in ports {
                let info = self.cmd(*p, &["CLUSTER", "INFO"]).await;
                ok &= info.contains("cluster_state:ok");
            }
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {limit:?} on {ports:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One command on `port`, after AUTH when the cluster has a password (its `+OK` left
    /// out of the reply).
    async fn cmd(&self, port: u16, args: &[&str]) -> String {
        let Some(pw) = &self.password else {
            return redis::command(port, args).await;
        };
        let resp = |args: &[&str]| {
            let mut req = format!("*{}\r\n", args.len());
            for a in args {
                req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
            }
            req
        };
        let req = resp(&["AUTH", pw]) + &resp(args);
        let attempt = async {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            s.write_all(req.as_bytes()).await.ok()?;
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            // Replies here are small: read until a short pause.
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            Some(String::from_utf8_lossy(&out).into_owned())
        };
        let reply = tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        match reply.strip_prefix("+OK\r\n") {
            Some(rest) => rest.to_owned(),
            None => panic!("AUTH refused on {port}: {reply}"),
        }
    }

    fn seeds(&self) -> String {
        self.nodes
            .iter()
            .take(3)
            .map(|n| format!("\"127.0.0.1:{}\"", n.port))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The index of the live node that serves `key` as a master: the one that answers
    /// for it instead of redirecting (`-MOVED`; a replica redirects too).
    async fn owner(&self, key: &str, skip: Option<usize>) -> usize {
        self.find_owner(key, skip)
            .await
            .unwrap_or_else(|| panic!("no node serves {key}"))
    }

    async fn find_owner(&self, key: &str, skip: Option<usize>) -> Option<usize> {
        for (i, n) in self.nodes.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let reply = self.cmd(n.port, &["EXISTS", key]).await;
            if reply.starts_with(':') {
                return Some(i);
            }
        }
        None
    }

    async fn exists(&self, node: usize, key: &str) -> bool {
        self.cmd(self.nodes[node].port, &["EXISTS", key]).await == ":1\r\n"
    }
}

fn yaml(up: &str, p: &str, cluster: &Cluster, timeout: &str, points: u64) -> String {
    let mut s = one_route(up, &format!("        rate_limits: [{p}]"), "");
    let auth = match &cluster.password {
        Some(pw) => format!("    username: default\n    password: \"{pw}\"\n"),
        None => String::new(),
    };
    s.push_str(&format!(
        "redis:\n  cluster:\n    nodes: [{}]\n{auth}  timeout: {timeout}\n  connect_timeout: 2s\n\
         replicas: 2\nrate_limits:\n  {p}: {{ points: {points}, per: 60s, key: \"header:x-user\", store: redis }}\n",
        cluster.seeds()
    ));
    s
}

/// The key the limiter keeps for `user` under policy `p` (`redis_key`).
fn key_of(p: &str, user: &str) -> String {
    let escaped = user
        .replace('%', "%25")
        .replace('{', "%7B")
        .replace('}', "%7D");
    format!("rl:{{{p}:h:{escaped}}}")
}

fn request(addr: SocketAddr, user: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}/ok"))
        .header("x-user", user)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn metrics(admin: SocketAddr) -> String {
    let (_, body) = send(&http1(), get(admin, "/metrics")).await;
    String::from_utf8_lossy(&body).into_owned()
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or(0.0)
}

fn decisions(policy: &str, result: &str, source: &str) -> String {
    format!(
        "rampart_ratelimit_decisions_total{{policy=\"{policy}\",result=\"{result}\",source=\"{source}\"}}"
    )
}

/// `n` requests for `user`, alternating between `addrs`: (200s, 429s, other).
async fn burst(addrs: &[SocketAddr], user: &str, n: usize) -> (usize, usize, usize) {
    let client = http1();
    let mut counts = (0, 0, 0);
    for i in 0..n {
        let (resp, _) = send(&client, request(addrs[i % addrs.len()], user)).await;
        match resp.status().as_u16() {
            200 => counts.0 += 1,
            429 => counts.1 += 1,
            _ => counts.2 += 1,
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_exact_with_keys_spread_over_the_masters_and_shared_by_two_instances() {
    let test = "limits_are_exact_with_keys_spread_over_the_masters_and_shared_by_two_instances";
    // With a password on every node, given with the ACL user.
    let Some(cluster) = Cluster::start(test, 3, 0, Some("cl-secret-7")).await else {
        return;
    };
    let anonymous = redis::command(cluster.nodes[0].port, &["EXISTS", "x"]).await;
    assert!(anonymous.starts_with("-NOAUTH"), "{anonymous}");
    let up = Upstream::start().await;
    let p = unique("cl");
    let yaml = yaml(&up.url(), &p, &cluster, "500ms", 5)
        + "dependencies:\n  redis: { check: { interval: 500ms, timeout: 1s } }\n";
    // One on worker threads (a cluster connection per worker), one on the test's runtime.
    let a = start_on_workers(&yaml, 2).await;
    let b = start(&yaml).await;
    let addrs = [a.addr("main").unwrap(), b.addr("main").unwrap()];

    // Users until every master holds one; braces in a value must not end the hash tag.
    let mut users = vec!["a}b{c".to_owned(), "{x}".to_owned()];
    let mut owners = BTreeSet::new();
    for u in &users {
        owners.insert(cluster.owner(&key_of(&p, u), None).await);
    }
    let mut i = 0;
    while owners.len() < 3 {
        assert!(i < 200, "3 masters, yet 200 keys never reached all");
        let u = format!("user-{i}");
        owners.insert(cluster.owner(&key_of(&p, &u), None).await);
        users.push(u);
        i += 1;
    }
    let mut slots = BTreeSet::new();
    for u in &users {
        let slot = cluster
            .cmd(
                cluster.nodes[0].port,
                &["CLUSTER", "KEYSLOT", &key_of(&p, u)],
            )
            .await;
        slots.insert(slot);
    }
    assert!(
        slots.len() >= 3,
        "one slot per key, not per policy: {slots:?}"
    );

    for u in &users {
        let got = burst(&addrs, u, 12).await;
        assert_eq!(got, (5, 7, 0), "user {u:?}: 5 in all across both instances");
    }
    let mut by_master: HashMap<usize, usize> = HashMap::new();
    for u in &users {
        let key = key_of(&p, u);
        let owner = cluster.owner(&key, None).await;
        assert!(cluster.exists(owner, &key).await, "{key} on its master");
        *by_master.entry(owner).or_default() += 1;
    }
    assert_eq!(by_master.len(), 3, "keys on every master: {by_master:?}");

    let (ma, mb) = (metrics(a.admin_addr).await, metrics(b.admin_addr).await);
    let allowed = value(&ma, &decisions(&p, "allowed", "redis"))
        + value(&mb, &decisions(&p, "allowed", "redis"));
    let limited = value(&ma, &decisions(&p, "limited", "redis"))
        + value(&mb, &decisions(&p, "limited", "redis"));
    let n = users.len() as f64;
    assert_eq!((allowed, limited), (5.0 * n, 7.0 * n), "{ma}\n{mb}");

    // The health check asks the cluster for its state (every slot served).
    let health = || async {
        let (_, body) = send(&http1(), get(b.admin_addr, "/admin/health")).await;
        String::from_utf8_lossy(&body).into_owned()
    };
    assert_eventually!(
        health().await.contains("\"role\":\"cluster\""),
        "redis check: {}",
        health().await
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[derive(Default, Debug)]
struct LoadReport {
    statuses: HashMap<u16, usize>,
    max_latency: Duration,
}

/// `tasks` clients, each request with a fresh user (keys on every master, never limited),
/// until `stop`, at most 5_000 requests each and 60 s in all.
fn load(addr: SocketAddr, tasks: usize, stop: Arc<AtomicBool>) -> JoinHandle<LoadReport> {
    tokio::spawn(async move {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let stop = stop.clone();
            handles.push(tokio::spawn(async move {
                let client = http1();
                let mut report = LoadReport::default();
                let deadline = Instant::now() + Duration::from_secs(60);
                for i in 0..5_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let started = Instant::now();
                    let (resp, _) = send(&client, request(addr, &format!("load-{t}-{i}"))).await;
                    report.max_latency = report.max_latency.max(started.elapsed());
                    *report.statuses.entry(resp.status().as_u16()).or_default() += 1;
                    // Keep the 2 shared cores usable for the cluster's fail-over.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                report
            }));
        }
        let mut all = LoadReport::default();
        for h in handles {
            let r = h.await.unwrap();
            all.max_latency = all.max_latency.max(r.max_latency);
            for (s, n) in r.statuses {
                *all.statuses.entry(s).or_default() += n;
            }
        }
        all
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_falls_back_per_request_and_comes_back_after_failover() {
    let test = "a_master_killed_under_load_falls_back_per_request_and_comes_back_after_failover";
    let Some(mut cluster) = Cluster::start(test, 3, 1, None).await else {
        return;
    };
    let up = Upstream::start().await;
    let p = unique("clf");
    let timeout = Duration::from_millis(200);
    let px = start_on_workers(&yaml(&up.url(), &p, &cluster, "200ms", 20), 2).await;
    let addr = px.addr("main").unwrap();
    let admin = px.admin_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(addr, 3, stop.clone());

    let redis_allowed = decisions(&p, "allowed", "redis");
    let memory_allowed = decisions(&p, "allowed", "memory");
    assert_eventually!(
        value(&metrics(admin).await, &redis_allowed) >= 20.0,
        "decisions go to the cluster at first"
    );

    // SIGKILL the master of the victim's slot.
    let victim = cluster.owner(&key_of(&p, "victim"), None).await;
    let victim_port = cluster.nodes[victim].port;
    cluster.nodes[victim].kill();
    let killed = Instant::now();
    assert_eventually!(
        value(&metrics(admin).await, &memory_allowed) >= 5.0,
        "requests whose master is gone are decided from memory"
    );

    // Its replica takes over (cluster-node-timeout 2 s), then every live node says ok.
    let deadline = Instant::now() + Duration::from_secs(30);
    let promoted = loop {
        if let Some(i) = cluster
            .find_owner(&key_of(&p, "victim"), Some(victim))
            .await
        {
            break i;
        }
        assert!(Instant::now() < deadline, "no replica promoted within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let live: Vec<u16> = cluster
        .nodes
        .iter()
        .map(|n| n.port)
        .filter(|p| *p != victim_port)
        .collect();
    cluster.wait_ok(&live, Duration::from_secs(30)).await;
    eprintln!(
        "{test}: replica promoted {:?} after the kill",
        killed.elapsed()
    );

    // Back on Redis for that slot: a new key lands on the promoted master.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        let user = format!("back-{n}");
        let key = key_of(&p, &user);
        if cluster.owner(&key, Some(victim)).await == promoted {
            burst(&[addr], &user, 1).await;
            if cluster.exists(promoted, &key).await {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never back on the promoted master"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{test}: back on Redis {:?} after the kill",
        killed.elapsed()
    );
    assert_eventually!(
        value(&metrics(admin).await, "rampart_ratelimit_fallback_active") == 0.0,
        "the fallback closes"
    );
    stop.store(true, Ordering::Relaxed);
    let report = running.await.unwrap();
    eprintln!("{test}: load {report:?}");

    // Exact again on the promoted master: points, not points / replicas.
    let mut user = String::new();
    for i in 0.. {
        user = format!("exact-{i}");
        if cluster.owner(&key_of(&p, &user), Some(victim)).await == promoted {
            break;
        }
    }
    let before = value(&metrics(admin).await, &redis_allowed);
    assert_eq!(burst(&[addr], &user, 25).await, (20, 5, 0));
    assert_eq!(
        value(&metrics(admin).await, &redis_allowed) - before,
        20.0,
        "decided by Redis"
    );

    let server_errors: usize = report
        .statuses
        .iter()
        .filter(|(s, _)| **s >= 500)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(server_errors, 0, "{report:?}");
    assert!(
        report.statuses.get(&200).copied().unwrap_or(0) > 100,
        "{report:?}"
    );
    assert!(
        report.max_latency < timeout + Duration::from_millis(800),
        "a request waited {:?}",
        report.max_latency
    );
    px.shutdown().await;
}

/// Every node down at once, then back (same ports, same `nodes.conf`, data gone): the
/// cluster connections kept through the outage find the nodes again by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_restarted_decisions_return_to_redis() {
    let test = "the_whole_cluster_restarted_decisions_return_to_redis";
    let Some(mut cluster) = Cluster::start(test, 3, 0, None).await else {
        return;
    };
    let up = Upstream::start().await;
    let p = unique("clr");
    let px = start_on_workers(&yaml(&up.url(), &p, &cluster, "200ms", 3), 2).await;
    let addr = px.addr("main").unwrap();
    let admin = px.admin_addr;
    assert_eq!(burst(&[addr], "before", 5).await, (3, 2, 0));

    for n in &mut cluster.nodes {
        n.kill();
    }
    let started = Instant::now();
    // Decided from memory at points / replicas (3 / 2, rounded down to 1), quickly.
    let (ok, limited, other) = burst(&[addr], "during", 4).await;
    assert_eq!((ok + limited, other), (4, 0));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        value(&metrics(admin).await, &decisions(&p, "allowed", "memory")) >= 1.0,
        "the memory fallback decided"
    );

    for n in &mut cluster.nodes {
        n.restart().await;
    }
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    cluster.wait_ok(&ports, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        let user = format!("after-{i}");
        burst(&[addr], &user, 1).await;
        let key = key_of(&p, &user);
        if cluster.exists(cluster.owner(&key, None).await, &key).await {
            break;
        }
        assert!(Instant::now() < deadline, "never back on Redis");
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eventually!(
        value(&metrics(admin).await, "rampart_ratelimit_fallback_active") == 0.0,
        "the fallback closes"
    );
    assert_eq!(burst(&[addr], "exact-after", 5).await, (3, 2, 0));
    assert!(
        cluster
            .exists(
                cluster.owner(&key_of(&p, "exact-after"), None).await,
                &key_of(&p, "exact-after")
            )
            .await
    );
    px.shutdown().await;
}

#[test]
fn redis_cluster_config_is_checked_at_file_line_column() {
    let dir = std::env::temp_dir().join(format!("rampart-it-cluster-{}", unique("")));
    std::fs::create_dir_all(&dir).unwrap();
    let head = "listeners:\n  - name: main\n    listen: 127.0.0.1:0\n    routes: [{ upstream: up }]\nupstreams:\n  up: { endpoints: [\"http://127.0.0.1:1\"] }\n";
    let check = |name: &str, redis: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{head}{redis}")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, stdout, stderr) = check(
        "good.yaml",
        "redis:\n  cluster:\n    nodes: [\"10.0.0.1:7000\", \"10.0.0.2:7000\"]\n    password: pw-not-shown\n",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("redis     cluster 10.0.0.1:7000, 10.0.0.2:7000 (timeout 50ms"),
        "{stdout}"
    );
    assert!(!stdout.contains("pw-not-shown"), "{stdout}");

    let (code, _, stderr) = check("empty.yaml", "redis:\n  cluster: { nodes: [] }\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr
            .contains("empty.yaml:8:21: redis.cluster.nodes: must list at least one cluster node"),
        "{stderr}"
    );

    let (code, _, stderr) = check(
        "bad.yaml",
        "redis:\n  cluster:\n    nodes: [\"10.0.0.1:7000\", \"10.0.0.2\"]\n",
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.yaml:9:30: redis.cluster.nodes[1]: expected host:port like"),
        "{stderr}"
    );

    let (code, _, stderr) = check(
        "two.yaml",
        "redis:\n  url: redis://127.0.0.1:6379\n  cluster: { nodes: [\"10.0.0.1:7000\"] }\n",
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "two.yaml:9:12: redis.cluster: give one of `url`, `sentinel` and `cluster`, not several"
        ),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
