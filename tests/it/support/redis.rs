//! Redis for the tests. `RedisServer::any` uses `RAMPART_TEST_REDIS_URL` when set (shared:
//! tests use their own key names and never kill it), else starts one; `RedisServer::own`
//! always starts one, for tests that kill or freeze it. A started server is a
//! `redis-server` on a free port of 127.0.0.1 in a temp dir, without persistence, stopped on
//! drop.
//!
//! Without `redis-server` the test is skipped through `support::skip` (a visible line, in
//! the summary), except under `CI=true`, where it fails: CI must not pass by testing nothing.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RedisServer {
    pub url: String,
    pub port: u16,
    /// None for the external one.
    child: Option<Child>,
    dir: Option<PathBuf>,
    args: Vec<String>,
    frozen: bool,
}

/// Unique names for keys and policies, so tests sharing one Redis never meet.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn missing(test: &str, what: &str) -> Option<RedisServer> {
    super::skip::skip(
        test,
        super::skip::Need::Redis,
        what,
        "install redis-server (.ci/run does) or set RAMPART_TEST_REDIS_URL",
    );
    None
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

impl RedisServer {
    pub async fn any(test: &str) -> Option<RedisServer> {
        if let Ok(url) = std::env::var("RAMPART_TEST_REDIS_URL") {
            let port = url
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').parse().ok())
                .unwrap_or(6379);
            return Some(RedisServer {
                url,
                port,
                child: None,
                dir: None,
                args: Vec::new(),
                frozen: false,
            });
        }
        Self::own(test).await
    }

    pub async fn own(test: &str) -> Option<RedisServer> {
        Self::spawn(test, &[]).await
    }

    /// A redis-server with extra arguments (such as `--replicaof`).
    pub async fn spawn(test: &str, extra: &[&str]) -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            return missing(test, "redis-server is not installed");
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("rampart-it-redis-{port}-{}", unique("")));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().expect("utf-8 temp dir"),
            "--logfile",
            "redis.log",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = RedisServer {
            url: format!("redis://127.0.0.1:{port}"),
            port,
            child: None,
            dir: Some(dir),
            args,
            frozen: false,
        };
        server.start().await;
        Some(server)
    }

    async fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ping(self.port).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on {} did not answer within 10 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("our own redis-server").id()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("our own redis-server");
        let _ = child.kill();
        let _ = child.wait();
        self.frozen = false;
    }

    /// Starts again on the same port (after `kill`).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill");
        self.start().await;
    }

    /// SIGSTOP: the socket stays open and the kernel still accepts; nothing answers.
    pub fn freeze(&mut self) {
        signal(self.pid(), "-STOP");
        self.frozen = true;
    }

    pub fn thaw(&mut self) {
        signal(self.pid(), "-CONT");
        self.frozen = false;
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.frozen {
                signal(child.id(), "-CONT");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One inline PING, bounded by 500 ms.
pub async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}

/// One command through redis-cli-free raw RESP, for assertions (`KEYS`, `SENTINEL ...`).
pub async fn command(port: u16, args: &[&str]) -> String {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Replies here are small: read until a short pause.
        loop {
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// A Sentinel watching `master` (quorum 1, so one sentinel can fail it over), on a free
/// port, stopped on drop.
pub struct Sentinel {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Sentinel {
    pub async fn start(master_name: &str, master_port: u16) -> Sentinel {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("rampart-it-sentinel-{port}-{}", unique("")));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let conf = dir.join("sentinel.conf");
        // Sentinel rewrites its own config file: it must be writable.
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nlogfile sentinel.log\n\
                 sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {master_name} 1000\n\
                 sentinel failover-timeout {master_name} 5000\n",
                dir.display()
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let sentinel = Sentinel { port, child, dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ping(port).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "sentinel on {port} did not answer within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sentinel
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
