//! The built binary as a child process: config in a temp file, stderr kept, signals sent with
//! `kill`, bounded waits.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::load::{Attempt, Http1Conn};

/// A field of `/proc/PID/FILE` in KiB (`VmRSS:   9052 kB`); None when unreadable.
pub fn proc_kib(pid: u32, file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resident memory of process `pid` in KiB (0 when unreadable).
pub fn vm_rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "status", "VmRSS:").unwrap_or(0)
}

/// A port that was free a moment ago (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A fresh directory per test for config files. The first call also removes the directories
/// earlier runs left (`rampart-it-PID-...` of a process that is gone), so /tmp holds at most
/// the running ones'.
pub fn temp_dir(test: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_stale_dirs);
    let dir = std::env::temp_dir().join(format!("rampart-it-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes `rampart-it-PID-*` directories whose process no longer runs (`/proc/PID`).
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("rampart-it-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub struct Proc {
    child: Child,
    stderr: Arc<Mutex<String>>,
    pub admin: SocketAddr,
}

impl Proc {
    /// `rampart run --config path --workers 2`, with `admin` the admin address in the file.
    pub fn spawn(config: &Path, admin: SocketAddr) -> Proc {
        Proc::spawn_with(config, admin, |c| {
            // Plain log lines to search in.
            c.env("NO_COLOR", "1");
        })
    }

    /// `spawn`, with `env` adjusting the command first.
    pub fn spawn_with(config: &Path, admin: SocketAddr, env: impl FnOnce(&mut Command)) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rampart"));
        cmd.args(["run", "--workers", "2", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("RAMPART_CONFIG")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        env(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc {
            child,
            stderr,
            admin,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until `/readyz` answers 200, at most 10 s.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((200, _)) = admin_get(self.admin, "/readyz").await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("rampart exited early ({status}):\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "rampart not ready:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The exit status, if it came within `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request on a fresh connection: (status, body), or None if nothing answered.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    one_shot(addr, "GET", path, b"").await
}

pub async fn one_shot(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<(u16, String)> {
    let mut c = Http1Conn::new(addr);
    match c.request(method, path, body).await {
        Attempt::Response(r) => Some((r.status, String::from_utf8_lossy(&r.body).into_owned())),
        _ => None,
    }
}
