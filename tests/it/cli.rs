//! The built binary: `check`, `run` refusing a bad file, and `demo` from the shipped
//! proxy.yaml with no environment set.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::process::{Proc, admin_get, free_port, one_shot, proc_kib, temp_dir};
use crate::support::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rampart"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    // A fresh machine: none of our variables set.
    for var in [
        "RAMPART_CONFIG",
        "RAMPART_WORKERS",
        "FASTGPT_URL",
        "RAMPART_LOG",
        "RAMPART_ADMIN_LISTEN",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rampart-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_accepts_the_shipped_config_and_prints_a_summary() {
    let out = bin()
        .args(["check", "--config", "proxy.yaml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("listener  inbound on 0.0.0.0:8080"),
        "{stdout}"
    );
    assert!(
        stdout.contains("listener  fastgpt on 127.0.0.1:8081"),
        "{stdout}"
    );
    assert!(
        stdout.contains("upstream  backend -> http://127.0.0.1:3001"),
        "{stdout}"
    );
    assert!(stdout.contains("admin     127.0.0.1:9901"), "{stdout}");
}

/// The summary shows, per upstream, the settings that matter most in an outage: breaker,
/// retry and health check.
#[test]
fn check_summary_lists_each_upstreams_breaker_retry_and_health_check() {
    let out = bin()
        .args(["check", "--config", "proxy.yaml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for line in [
        "  breaker per route: 5 failures, open 1m (max 5m), closes after 2 successes",
        "  retry   2 attempts on connect_error, backoff 50ms..1s, budget 20% + 3/s",
        "  health  GET /health every 5s, timeout 2s, down after 3, up after 2, critical",
        "  health  none (passive ejection only: 3 failures)",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    // Each upstream's lines follow its own `upstream` line.
    let backend = stdout.find("upstream  backend").unwrap();
    let fastgpt = stdout.find("upstream  fastgpt").unwrap();
    let hc = stdout.find("  health  GET /health").unwrap();
    assert!(backend < hc && hc < fastgpt, "{stdout}");
}

/// Timeouts that layer: the app's own timeout on its egress call must answer before the
/// inbound route's, so its clean error reaches the client. The shipped file follows the
/// rule; one that does not gets a warning (exit 0) naming both positions.
#[test]
fn check_warns_when_an_inbound_timeout_is_not_longer_than_an_egress_one() {
    let out = bin()
        .args(["check", "--config", "proxy.yaml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");

    let text = r#"listeners:
  - name: inbound
    listen: "127.0.0.1:0"
    routes:
      - name: api
        upstream: backend
        timeouts: { first_byte: 30s, idle: 90s }
      - name: health
        match: { path_prefix: /health }
        upstream: backend
  - name: fastgpt
    listen: "127.0.0.1:0"
    drain: egress
    routes:
      - name: llm
        upstream: fastgpt
        timeouts:
          first_byte: 30s
          idle: 60s
upstreams:
  backend: { endpoints: ["http://127.0.0.1:3001"] }
  fastgpt: { endpoints: ["http://127.0.0.1:3000"] }
"#;
    let path = temp_file("layers.yaml", text);
    let out = bin()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    // api's first_byte (written), health's first_byte and idle (defaults 30s and 1m,
    // located at the route); api's idle of 90s is longer, as it should be.
    assert_eq!(warnings.len(), 3, "{stderr}");
    let name = path.display().to_string();
    assert!(
        warnings[0].starts_with(&format!(
            "{name}:7:33: warning: listeners[0].routes[0].timeouts.first_byte: 30s is not longer than the egress route fastgpt/llm's first_byte (30s at {name}:18:23)"
        )),
        "{stderr}"
    );
    assert!(
        warnings[1].starts_with(&format!(
            "{name}:8:9: warning: listeners[0].routes[1].timeouts.first_byte: 30s (default) is not longer than the egress route fastgpt/llm's first_byte (30s at {name}:18:23)"
        )),
        "{stderr}"
    );
    assert!(
        warnings[2].starts_with(&format!(
            "{name}:8:9: warning: listeners[0].routes[1].timeouts.idle: 1m (default) is not longer than the egress route fastgpt/llm's idle (1m at {name}:19:17)"
        )),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn the_shipped_config_is_the_users_topology() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.yaml")).unwrap();
    let cfg = rampart::config::parse_str(&text, "proxy.yaml", &|_| None).unwrap();
    let inbound = &cfg.listeners[0];
    assert_eq!(
        (inbound.name.as_str(), inbound.listen.to_string().as_str()),
        ("inbound", "0.0.0.0:8080")
    );
    assert_eq!(inbound.routes[0].upstream, "backend");
    let fastgpt = &cfg.listeners[1];
    assert_eq!(
        (fastgpt.name.as_str(), fastgpt.listen.to_string().as_str()),
        ("fastgpt", "127.0.0.1:8081")
    );
    assert_eq!(fastgpt.routes[0].upstream, "fastgpt");
    // The backend's outbound path stays open while it finishes its own work in a drain.
    assert_eq!(fastgpt.drain, rampart::config::DrainMode::Egress);
    assert_eq!(inbound.drain, rampart::config::DrainMode::Inbound);
    assert_eq!(
        fastgpt.routes[0].timeouts.total, None,
        "no total timeout on streams"
    );
    // Timeouts that layer: inbound waits longer than the app's egress calls.
    let (i, e) = (&inbound.routes[0].timeouts, &fastgpt.routes[0].timeouts);
    assert_eq!(
        (i.first_byte, i.idle, e.first_byte, e.idle),
        (
            Duration::from_secs(35),
            Duration::from_secs(75),
            Duration::from_secs(30),
            Duration::from_secs(60)
        )
    );
    assert_eq!(
        cfg.upstreams["backend"].endpoints[0].to_string(),
        "http://127.0.0.1:3001/"
    );
    assert_eq!(cfg.admin.listen.to_string(), "127.0.0.1:9901");
    // Readiness follows the backend's own /health.
    let hc = cfg.upstreams["backend"].resilience.health_check.as_ref();
    assert_eq!(
        hc.map(|h| (h.path.as_str(), h.check.critical)),
        Some(("/health", true))
    );
    // The alerts written out are exactly the defaults.
    assert_eq!(cfg.alerts, rampart::config::AlertsConfig::default());
    // FASTGPT_URL and BACKEND_URL override the stand-in defaults (in a container,
    // 127.0.0.1 is the container itself).
    let cfg = rampart::config::parse_str(&text, "proxy.yaml", &|v| match v {
        "FASTGPT_URL" => Some("http://10.1.2.3:3000".to_string()),
        "BACKEND_URL" => Some("http://10.1.2.4:3001".to_string()),
        _ => None,
    })
    .unwrap();
    let authority = |name: &str| {
        cfg.upstreams[name].endpoints[0]
            .authority()
            .unwrap()
            .as_str()
            .to_string()
    };
    assert_eq!(authority("fastgpt"), "10.1.2.3:3000");
    assert_eq!(authority("backend"), "10.1.2.4:3001");
}

#[test]
fn bad_config_is_refused_with_every_problem_and_exit_2_binding_nothing() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = format!(
        r#"listeners:
  - name: main
    listen: "127.0.0.1:{port}"
    max_connections: 0
    routes:
      - match: {{ path_prefix: / }}
        upstream: fastgtp
upstreams:
  backend: {{ endpoints: ["http://127.0.0.1:3001"] }}
  fastgpt: {{ endpoints: ["http://127.0.0.1:3000"] }}
"#
    );
    let path = temp_file("bad.yaml", &text);
    for cmd in ["check", "run"] {
        let out = bin().args([cmd, "--config"]).arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
        assert!(
            stderr.contains("bad.yaml:7:19: listeners[0].routes[0].upstream: unknown upstream \"fastgtp\" (known: backend, fastgpt)"),
            "{cmd}: {stderr}"
        );
        assert!(
            stderr.contains("bad.yaml:4:22: listeners[0].max_connections"),
            "{cmd}: {stderr}"
        );
    }
    // Nothing was bound: the port is still free.
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[test]
fn missing_env_var_names_the_variable_and_line() {
    let path = temp_file(
        "env.yaml",
        "listeners:\n  - name: m\n    listen: \"127.0.0.1:0\"\n    routes: [{ upstream: u }]\nupstreams:\n  u: { endpoints: [\"${RAMPART_IT_UNSET_URL}\"] }\n",
    );
    let out = bin()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("env.yaml:6:"), "{stderr}");
    assert!(stderr.contains("RAMPART_IT_UNSET_URL"), "{stderr}");
}

#[test]
fn version_prints() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("rampart "));
}

/// A base for `rampart demo --port-base`: five consecutive ports free now (on 0.0.0.0, as
/// the inbound listener binds), below the ephemeral range so clients' ports rarely collide.
fn free_port_base() -> u16 {
    // Tests in this process running at once each start elsewhere.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = std::process::id().wrapping_add(calls.wrapping_mul(1_009));
    for i in 0..200u32 {
        // 20000..29995 in steps of 5, starting somewhere per process.
        let base = (20_000 + (seed.wrapping_add(i.wrapping_mul(389)) % 2_000) * 5) as u16;
        let free = (base..base + 5).all(|p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no five consecutive free ports found");
}

/// Ends a child that a failed assertion would otherwise leave running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `rampart demo --port-base N` with a port taken (each of the stand-ins' and rampart's
/// own): it fails naming the address, and never prints the "Try:" lines.
#[test]
fn demo_with_a_port_taken_names_the_address_and_prints_no_try_lines() {
    let base = free_port_base();
    // inbound (0.0.0.0), the stand-in backend, the admin listener.
    for (offset, ip) in [(0u16, "0.0.0.0"), (4, "127.0.0.1"), (2, "127.0.0.1")] {
        let taken = std::net::TcpListener::bind((ip, base + offset)).unwrap();
        let out = bin()
            .args(["demo", "--workers", "1", "--port-base", &base.to_string()])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        drop(taken);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("{ip}:{}", base + offset)) && stderr.contains("in use"),
            "offset {offset}: {stderr}"
        );
        assert!(!stderr.contains("Try:"), "offset {offset}: {stderr}");
    }
}

/// `rampart demo` from proxy.yaml on a fresh machine, moved by `--port-base` onto free
/// ports: inbound N, egress N+1, admin N+2, stand-in LLM N+3, stand-in backend N+4.
#[tokio::test]
async fn demo_serves_json_and_sse_from_the_shipped_config_then_exits_0_on_sigterm() {
    let base = free_port_base();
    let child = bin()
        .args(["demo", "--workers", "2", "--port-base", &base.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", base + 2).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "demo did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let inbound = format!("127.0.0.1:{base}").parse().unwrap();
    let (resp, body) = send(&http1(), get(inbound, "/api/agents")).await;
    assert_eq!(resp.status(), 200);
    assert!(String::from_utf8_lossy(&body).contains("\"service\":\"backend\""));
    let fastgpt = format!("127.0.0.1:{}", base + 1).parse().unwrap();
    let resp = send_streaming(&http1(), get(fastgpt, "/api/v1/chat/completions")).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    drop(resp);
    // Ready once the backend's health check (proxy.yaml) has passed: its first run is at
    // start, so within moments.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (resp, body) = send(&http1(), get(admin, "/readyz")).await;
        if resp.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (resp, body) = send(&http1(), get(admin, "/health")).await;
    assert_eq!(resp.status(), 200);
    assert!(
        String::from_utf8_lossy(&body).contains("\"upstream:backend\":{\"status\":\"healthy\""),
        "{body:?}"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(35);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            panic!("demo did not exit after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    // The "Try:" lines name the moved ports.
    let mut stderr = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr).unwrap();
    }
    assert!(
        stderr.contains(&format!("curl -s http://127.0.0.1:{base}/api/agents")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("curl -s http://127.0.0.1:{}/readyz", base + 2)),
        "{stderr}"
    );
}

// === issue 14: the command line ===

/// README's `rampart check proxy.yaml`: the path may come positionally, for `check` and
/// `run`, as well as with `--config`.
#[test]
fn the_config_path_may_be_given_positionally() {
    let out = bin().args(["check", "proxy.yaml"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("proxy.yaml: ok"), "{stdout}");
    // `run` reads the positional file too: a bad one is refused (exit 2), naming it.
    let path = temp_file("positional.yaml", "listeners: 3\n");
    let out = bin().arg("run").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("positional.yaml:1:"), "{stderr}");
}

/// Scripts tell a usage error (64, EX_USAGE) from an invalid config (2).
#[test]
fn usage_errors_exit_64() {
    for args in [
        vec!["frobnicate"],
        vec!["check", "--no-such-flag"],
        vec!["check", "a.yaml", "--config", "b.yaml"],
        vec!["probe", "startz"],
        vec![],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Asking for help is not an error.
    let out = bin().args(["check", "--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_missing_config_file_is_named_without_a_position() {
    for cmd in ["check", "run"] {
        let out = bin()
            .args([cmd, "--config", "/nonexistent/rampart.yaml"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
        assert!(
            stderr.starts_with("cannot read /nonexistent/rampart.yaml: No such file"),
            "{cmd}: {stderr}"
        );
        assert!(!stderr.contains(":0:0:"), "{cmd}: {stderr}");
    }
}

#[test]
fn a_misspelt_enum_value_gets_a_suggestion() {
    let path = temp_file(
        "enum.yaml",
        "listeners:\n  - name: m\n    listen: \"127.0.0.1:0\"\n    routes: [{ upstream: u }]\nupstreams:\n  u:\n    endpoints: [\"http://127.0.0.1:3001\"]\n    load_balancing: round-robin\n",
    );
    let out = bin().arg("check").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "enum.yaml:8:21: upstreams.u.load_balancing: expected one of round_robin, least_outstanding, got \"round-robin\", did you mean \"round_robin\"?"
        ),
        "{stderr}"
    );
}

/// The summary in words a reader takes in at a glance.
#[test]
fn check_summary_reads_naturally() {
    let out = bin()
        .args(["check", "--config", "proxy.yaml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("listener  inbound on 0.0.0.0:8080 (1 route, max 10000 connections)"),
        "{stdout}"
    );
    assert!(stdout.contains("total off, body 10 MiB)"), "{stdout}");
    assert!(!stdout.contains(" B)"), "{stdout}");
    // The memory check takes no timeout, so shows none.
    assert!(stdout.contains("check     memory every 10s\n"), "{stdout}");
    // The upstreams' lines stay.
    assert!(
        stdout.contains("  health  none (passive ejection only: 3 failures)"),
        "{stdout}"
    );
}

const TOKEN: &str = "it-admin-token-0123456789";

/// A rampart on free ports with a token on its admin listener; its config path.
fn admin_config(test: &str) -> (PathBuf, std::net::SocketAddr) {
    let (port, admin) = (free_port(), free_port());
    let text = format!(
        r#"admin: {{ listen: "127.0.0.1:{admin}", token: "{TOKEN}" }}
logging: {{ level: info, access_log: false }}
drain: {{ accept_grace: 2s, timeout: 4s }}
listeners:
  - name: main
    listen: "127.0.0.1:{port}"
    routes: [{{ upstream: up }}]
upstreams:
  up: {{ endpoints: ["http://127.0.0.1:9"] }}
"#
    );
    let path = temp_dir(test).join("admin.yaml");
    std::fs::write(&path, text).unwrap();
    (path, std::net::SocketAddr::from(([127, 0, 0, 1], admin)))
}

fn admin_cmd(args: &[&str]) -> std::process::Output {
    let mut c = bin();
    c.env_remove("RAMPART_ADMIN_TOKEN");
    c.args(args).output().unwrap()
}

/// `rampart probe livez|readyz` for a container HEALTHCHECK: exit 0 on 2xx, 1 otherwise
/// with a one-line reason; the address from `--admin`, or from `--config`'s file.
#[tokio::test]
async fn probe_answers_by_exit_status() {
    let (path, admin) = admin_config("probe");
    let mut px = Proc::spawn(&path, admin);
    px.wait_ready().await;
    let a = admin.to_string();
    for args in [
        vec!["probe", "livez", "--admin", &a],
        vec!["probe", "readyz", "--admin", &a],
        vec!["probe", "readyz", "--config", path.to_str().unwrap()],
    ] {
        let out = admin_cmd(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(px);
    // Nothing listening: exit 1, one line naming the address.
    let out = admin_cmd(&["probe", "livez", "--admin", &a]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&a), "{stderr}");
}

/// `rampart drain` for a Kubernetes preStop exec hook: POST /admin/drain with the token
/// from RAMPART_ADMIN_TOKEN; readiness then fails.
#[tokio::test]
async fn drain_posts_with_the_token_from_the_environment() {
    let (path, admin) = admin_config("drain-cmd");
    let mut px = Proc::spawn(&path, admin);
    px.wait_ready().await;
    let a = admin.to_string();
    // Without the token: refused, exit 1 with the status.
    let out = admin_cmd(&["drain", "--admin", &a]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert_eq!(admin_get(admin, "/readyz").await.map(|r| r.0), Some(200));

    let out = bin()
        .env("RAMPART_ADMIN_TOKEN", TOKEN)
        .args(["drain", "--admin", &a])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Draining: not ready, and `probe readyz` says so.
    let out = admin_cmd(&["probe", "readyz", "--admin", &a]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("503"), "{stderr}");
    // The drain ends the process (after the 2s accept grace).
    let status = px.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

#[tokio::test]
async fn logs_to_a_pipe_are_plain_and_each_listener_stops_accepting_once() {
    use crate::support::process::{Proc, free_port, temp_dir};
    let up = Upstream::start().await;
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let yaml = one_route(&up.url(), "", "")
        .replace("127.0.0.1:0\" }", &format!("{admin}\" }}"))
        .replace("level: warn", "level: info");
    let path = temp_dir("plain-logs").join("proxy.yaml");
    std::fs::write(&path, yaml).unwrap();
    // No NO_COLOR: stderr is a pipe, which alone must turn colour off.
    let mut p = Proc::spawn_with(&path, admin, |_| {});
    p.wait_ready().await;
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some(), "still running:\n{}", p.stderr());
    let log = p.stderr();
    assert!(!log.contains('\u{1b}'), "colour escapes in a pipe:\n{log}");
    let stopped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stopped accepting"))
        .collect();
    assert_eq!(stopped.len(), 1, "{log}");
    assert!(stopped[0].contains("listener=\"main\""), "{log}");
}

/// An idle rampart's resident size, at most: 9-11 MiB in release builds (glibc or
/// mimalloc), ~27 MiB in the tests' debug build (its larger code); with mimalloc's huge
/// pages, 12 MiB more.
const RSS_IDLE_MAX_KIB: u64 = 36 * 1024;

/// The binary's allocator (mimalloc by default, Cargo feature `mimalloc`) keeps an idle
/// rampart small after it has served: no transparent huge pages (mimalloc 2.1+ asks the
/// kernel for them on its arenas unless built `no_thp`, and an idle rampart then held 22
/// MiB, 12 of them huge pages, against 9-11 MiB) and a resident size near the system
/// allocator's.
#[tokio::test]
async fn an_idle_rampart_holds_no_huge_pages_and_little_memory() {
    let up = crate::support::upstream::Upstream::start().await;
    let (port, admin) = (free_port(), free_port());
    let text = format!(
        r#"admin: {{ listen: "127.0.0.1:{admin}" }}
logging: {{ level: warn, access_log: false }}
listeners:
  - name: main
    listen: "127.0.0.1:{port}"
    routes: [{{ upstream: up }}]
upstreams:
  up: {{ endpoints: ["http://{}"] }}
"#,
        up.addr
    );
    let path = temp_dir("idle-memory").join("rampart.yaml");
    std::fs::write(&path, text).unwrap();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let listener = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut px = Proc::spawn(&path, admin);
    px.wait_ready().await;
    // Served first, so that the allocator has made its heaps: requests through the proxy
    // and the metrics they leave.
    for _ in 0..200 {
        let (status, body) = one_shot(listener, "GET", "/", b"")
            .await
            .expect("an answer");
        assert_eq!(status, 200, "{body}");
    }
    for _ in 0..20 {
        let (status, body) = admin_get(admin, "/metrics").await.expect("/metrics");
        assert_eq!(status, 200, "{body}");
    }
    let pid = px.pid();
    let huge = proc_kib(pid, "smaps_rollup", "AnonHugePages:").expect("smaps_rollup");
    let rss = proc_kib(pid, "status", "VmRSS:").expect("VmRSS");
    eprintln!("idle after serving: VmRSS {rss} KiB, AnonHugePages {huge} KiB");
    if cfg!(feature = "mimalloc") {
        // The process asks for none (mimalloc's `no_thp` disables them for it), whatever
        // /sys/kernel/mm/transparent_hugepage/enabled says.
        assert_eq!(
            huge, 0,
            "{huge} KiB of transparent huge pages, RSS {rss} KiB"
        );
    }
    assert!(rss < RSS_IDLE_MAX_KIB, "an idle rampart holds {rss} KiB");
}
