//! Postgres for the tests. `PgServer::any` uses `RAMPART_TEST_PG_URL` when set (shared: never
//! killed), else starts one; `PgServer::own` always starts one, for tests that kill, freeze
//! or promote it. A started server is a private cluster (`initdb` in a temp dir, trust
//! auth, user `postgres`) on a free port of 127.0.0.1, stopped and removed on drop. As root
//! the binaries run as user `postgres` (Postgres refuses root).
//!
//! The binaries are looked up on PATH, then in /usr/lib/postgresql/*/bin. Without them the
//! test is skipped through `support::skip`, except under `CI=true`, where it fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rampart::error_chain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::process::free_port;
use super::redis::unique;

pub struct PgServer {
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub url: String,
    /// None for the external one.
    own: Option<Own>,
}

struct Own {
    bin: PathBuf,
    dir: PathBuf,
    as_postgres: bool,
    running: bool,
    frozen: Vec<u32>,
    /// Extra server options (`-c name=value ...`).
    options: String,
}

fn missing(test: &str, what: &str) -> Option<PgServer> {
    super::skip::skip(
        test,
        super::skip::Need::Postgres,
        what,
        "install postgresql (.ci/run does) or set RAMPART_TEST_PG_URL",
    );
    None
}

/// The directory holding `initdb`, `pg_ctl` and `pg_basebackup`.
fn find_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    // Highest version first.
    versions.sort_by_key(|p| {
        std::cmp::Reverse(
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    // A PATH entry may be a symlink into the real directory, where pg_basebackup also is.
    on_path
        .into_iter()
        .filter_map(|d| std::fs::canonicalize(d.join("initdb")).ok())
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .chain(versions)
        .find(|d| {
            ["initdb", "pg_ctl", "pg_basebackup", "postgres"]
                .iter()
                .all(|b| d.join(b).exists())
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PgServer {
    pub async fn any(test: &str) -> Option<PgServer> {
        if let Ok(url) = std::env::var("RAMPART_TEST_PG_URL") {
            let cfg: bb8_postgres::tokio_postgres::Config =
                url.parse().expect("RAMPART_TEST_PG_URL is a Postgres URL");
            let port = cfg.get_ports().first().copied().unwrap_or(5432);
            return Some(PgServer {
                port,
                url,
                own: None,
            });
        }
        Self::own(test).await
    }

    pub async fn own(test: &str) -> Option<PgServer> {
        Self::own_with(test, "", &[]).await
    }

    /// A private server with extra `-c` options and files written into its data directory
    /// (mode 0600, owned by the server), such as a TLS certificate and key.
    pub async fn own_with(test: &str, options: &str, files: &[(&str, String)]) -> Option<PgServer> {
        let Some(bin) = find_bin() else {
            return missing(test, "initdb/pg_ctl not found");
        };
        let as_postgres = is_root();
        if as_postgres
            && !Command::new("id")
                .arg("postgres")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            return missing(test, "running as root without a `postgres` user");
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("rampart-it-pg-{port}-{}", unique("")));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = PgServer {
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            own: Some(Own {
                bin,
                dir,
                as_postgres,
                running: false,
                frozen: Vec::new(),
                options: options.to_owned(),
            }),
        };
        let own = server.own.as_ref().expect("own");
        own.chown();
        own.run(
            "initdb",
            &[
                "-D",
                own.data().to_str().expect("utf-8 temp dir"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "--no-instructions",
            ],
        );
        for (name, text) in files {
            use std::os::unix::fs::PermissionsExt;
            let path = own.data().join(name);
            std::fs::write(&path, text).expect("write into the data directory");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
        }
        own.chown();
        server.start();
        Some(server)
    }

    /// A streaming replica of this (own) server, made with `pg_basebackup -R`, started.
    pub async fn replica(&self, test: &str) -> PgServer {
        let own = self.own.as_ref().expect("a replica of our own server");
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("rampart-it-pg-{port}-{}", unique("")));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let replica = Own {
            bin: own.bin.clone(),
            dir,
            as_postgres: own.as_postgres,
            running: false,
            frozen: Vec::new(),
            options: own.options.clone(),
        };
        replica.chown();
        replica.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                replica.data().to_str().expect("utf-8 temp dir"),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        let mut server = PgServer {
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            own: Some(replica),
        };
        server.start();
        // Streaming: the primary sees its WAL sender.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let n = self
                .query_one("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
                .await;
            if n.as_deref() == Some("1") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{test}: the replica on {port} did not start streaming"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn start(&mut self) {
        let port = self.port;
        let own = self.own.as_mut().expect("our own server");
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=16MB \
             -c max_connections=30 -c wal_level=replica -c max_wal_senders=4 \
             -c hot_standby=on {}",
            own.dir.display(),
            own.options
        );
        own.run(
            "pg_ctl",
            &[
                "-D",
                own.data().to_str().expect("utf-8"),
                "-l",
                own.dir.join("log").to_str().expect("utf-8"),
                "-o",
                &opts,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        own.running = true;
    }

    /// `pg_ctl stop -m immediate`: every process exits at once, as in a crash.
    pub fn kill(&mut self) {
        self.stop("immediate");
    }

    /// A clean shutdown (`-m fast`).
    pub fn stop_fast(&mut self) {
        self.stop("fast");
    }

    fn stop(&mut self, mode: &str) {
        let own = self.own.as_mut().expect("our own server");
        own.thaw();
        own.run(
            "pg_ctl",
            &[
                "-D",
                own.data().to_str().expect("utf-8"),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        );
        own.running = false;
    }

    /// Starts again on the same port (after `kill`).
    pub fn restart(&mut self) {
        assert!(
            !self.own.as_ref().expect("own").running,
            "restart after kill"
        );
        self.start();
    }

    /// SIGSTOP to the postmaster and every backend: sockets stay open, nothing answers.
    pub fn freeze(&mut self) {
        let own = self.own.as_mut().expect("our own server");
        let pid = own.postmaster_pid();
        let mut pids = vec![pid];
        pids.extend(children(pid));
        for p in &pids {
            signal(*p, "-STOP");
        }
        own.frozen = pids;
    }

    pub fn thaw(&mut self) {
        self.own.as_mut().expect("our own server").thaw();
    }

    /// `pg_ctl promote`: a replica becomes a primary.
    pub fn promote(&mut self) {
        let own = self.own.as_ref().expect("our own server");
        own.run(
            "pg_ctl",
            &["-D", own.data().to_str().expect("utf-8"), "-w", "promote"],
        );
    }

    /// The first column of the first row, as text; None on any error.
    pub async fn query_one(&self, sql: &str) -> Option<String> {
        let attempt = async {
            let (client, conn) = bb8_postgres::tokio_postgres::connect(
                &self.url,
                bb8_postgres::tokio_postgres::NoTls,
            )
            .await
            .map_err(|e| error_chain(&e))
            .ok()?;
            tokio::spawn(conn);
            let rows = client.simple_query(sql).await.ok()?;
            rows.iter().find_map(|m| match m {
                bb8_postgres::tokio_postgres::SimpleQueryMessage::Row(r) => {
                    r.get(0).map(str::to_owned)
                }
                _ => None,
            })
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .ok()
            .flatten()
    }
}

impl Own {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn chown(&self) {
        if self.as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown {}", self.dir.display());
        }
    }

    /// Runs a Postgres binary (as user postgres when we are root), panicking on failure
    /// with its output and the server log.
    fn run(&self, name: &str, args: &[&str]) {
        let bin = self.bin.join(name);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        // The temp dir is ours; a working directory root may not let postgres in.
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = cmd.output().unwrap_or_else(|e| panic!("run {name}: {e}"));
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            panic!(
                "{name} {args:?} failed ({}):\n{}{}\n--- server log ---\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn postmaster_pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .expect("postmaster.pid of a running server");
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("a pid in postmaster.pid")
    }

    fn thaw(&mut self) {
        for p in std::mem::take(&mut self.frozen) {
            signal(p, "-CONT");
        }
    }
}

/// Children of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(own) = self.own.as_mut() {
            own.thaw();
            if own.running {
                let bin = own.bin.join("pg_ctl");
                let data = own.data();
                let mut cmd = if own.as_postgres {
                    let mut c = Command::new("runuser");
                    c.args(["-u", "postgres", "--"]).arg(bin);
                    c
                } else {
                    Command::new(bin)
                };
                let _ = cmd
                    .arg("-D")
                    .arg(&data)
                    .args(["-m", "immediate", "-w", "stop"])
                    .current_dir(&own.dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = std::fs::remove_dir_all(&own.dir);
        }
    }
}

/// A TCP relay in front of a Postgres server that counts the queries clients send
/// (`Query` and `Parse` messages of the frontend protocol), to prove what did or did not
/// reach the database.
pub struct CountingRelay {
    pub addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingRelay {
    pub async fn start(target: SocketAddr) -> CountingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let q = queries.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let q = q.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    });
                    let _ = relay_counting(&mut cr, &mut sw, &q).await;
                    let _ = sw.shutdown().await;
                    let _ = down.await;
                });
            }
        });
        CountingRelay {
            addr,
            queries,
            task,
        }
    }

    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies frontend messages one by one, counting Query ('Q') and Parse ('P').
async fn relay_counting(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    queries: &AtomicUsize,
) -> std::io::Result<()> {
    // Untyped messages first: SSL/GSS requests (refused by the server), then the startup.
    loop {
        let len = from.read_i32().await?;
        let mut body = vec![0u8; usize::try_from(len - 4).unwrap_or(0)];
        from.read_exact(&mut body).await?;
        to.write_all(&len.to_be_bytes()).await?;
        to.write_all(&body).await?;
        let code = body
            .get(..4)
            .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        if !matches!(code, Some(80877103 | 80877104)) {
            break;
        }
    }
    loop {
        let kind = from.read_u8().await?;
        let len = from.read_i32().await?;
        let mut body = vec![0u8; usize::try_from(len - 4).unwrap_or(0)];
        from.read_exact(&mut body).await?;
        if matches!(kind, b'Q' | b'P') {
            queries.fetch_add(1, Ordering::SeqCst);
        }
        to.write_all(&[kind]).await?;
        to.write_all(&len.to_be_bytes()).await?;
        to.write_all(&body).await?;
    }
}
