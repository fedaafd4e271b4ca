//! Deployment files: the Dockerfile (checked without building: no base image can be
//! pulled here), examples/kubernetes/ (validated offline), the Grafana dashboard (against a
//! real scrape), the systemd unit and the PM2 entry, each against the shipped proxy.yaml.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use marked_yaml::Node;
use serde_json::Value;

use crate::support::Upstream;
use crate::support::process::{admin_get, free_port, temp_dir};

mod grafana;
mod host;
mod kubernetes;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const TOKEN: &str = "deploy-test-admin-token-0123";

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The Dockerfile's instructions, continuation lines joined, comments left out.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        cur.push_str(t.trim_end_matches('\\'));
        cur.push(' ');
        if !t.ends_with('\\') {
            let (op, rest) = cur.trim().split_once(' ').unwrap_or((cur.trim(), ""));
            out.push((op.to_ascii_uppercase(), rest.trim().to_owned()));
            cur.clear();
        }
    }
    out
}

/// `rustc -vV`'s host triple (the lock file's packages for this platform only: the others
/// are not in the offline registry).
fn host_triple() -> String {
    let out = Command::new("rustc").arg("-vV").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_owned()
}

/// "1.88" or "1.88.0" as (1, 88).
fn minor(version: &str) -> (u32, u32) {
    let mut it = version.split('.').map(|p| p.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap_or(0))
}

/// Every path the Dockerfile copies from the build context exists and is not excluded by
/// .dockerignore; with exactly those paths, cargo loads the manifest (every declared target
/// present) and the lock file is in step with it (`--locked`).
#[test]
fn the_dockerfile_copies_what_the_build_needs() {
    let ignore = read(".dockerignore");
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let context = temp_dir("docker-context");
    let mut copied = Vec::new();
    for (op, args) in dockerfile() {
        if op != "COPY" || args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            let path = Path::new(ROOT).join(src);
            assert!(
                path.exists(),
                "the Dockerfile copies {src}, which does not exist"
            );
            assert!(!ignored.contains(src), ".dockerignore excludes {src}");
            copy_tree(&path, &context.join(src));
            copied.push(src.to_string());
        }
    }
    assert!(copied.contains(&"Cargo.lock".to_owned()), "{copied:?}");
    let out = Command::new("cargo")
        .args(["fetch", "--locked", "--offline", "--target", &host_triple()])
        .current_dir(&context)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo in a context of only {copied:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

/// The build image's Rust is at least `rust-version`, and at least every locked
/// dependency's own `rust-version`.
#[test]
fn the_dockerfile_rust_satisfies_rust_version_and_the_lock_file() {
    let image = dockerfile()
        .into_iter()
        .find_map(|(op, args)| {
            let from = args.strip_prefix("rust:")?;
            (op == "FROM").then(|| from.split(['-', ' ']).next().unwrap().to_owned())
        })
        .expect("a FROM rust:X.Y stage");
    let image = minor(&image);
    let manifest = read("Cargo.toml");
    let ours = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version in Cargo.toml")
        .trim_matches('"');
    assert!(
        minor(ours) <= image,
        "rust-version {ours} > image {image:?}"
    );
    let out = Command::new("cargo")
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", &host_triple()])
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    assert!(packages.len() > 50, "{}", packages.len());
    let newest = packages
        .iter()
        .filter_map(|p| Some((minor(p["rust_version"].as_str()?), p["name"].as_str()?)))
        .max()
        .unwrap();
    assert!(
        newest.0 <= image,
        "{} needs Rust {:?}, the image has {image:?}",
        newest.1,
        newest.0
    );
}

/// The uid the image runs as: `useradd --uid N NAME` and `USER NAME`, N not 0.
fn image_uid() -> u32 {
    let instructions = dockerfile();
    let user = instructions
        .iter()
        .rev()
        .find_map(|(op, args)| (op == "USER").then(|| args.clone()))
        .expect("a USER");
    let uid = instructions
        .iter()
        .filter(|(op, _)| op == "RUN")
        .find_map(|(_, args)| {
            let rest = args.split("useradd").nth(1)?;
            let words: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(words.last(), Some(&user.as_str()), "useradd makes {user}");
            let i = words.iter().position(|w| *w == "--uid")?;
            words[i + 1].parse::<u32>().ok()
        })
        .expect("useradd --uid N");
    assert_ne!(uid, 0);
    uid
}

/// The image's environment (ENV), with the config and admin address given.
fn image_env(cmd: &mut Command, config: &Path, admin: &str) {
    let env = dockerfile()
        .into_iter()
        .filter(|(op, _)| op == "ENV")
        .map(|(_, args)| args)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        env.contains("RAMPART_CONFIG=/etc/rampart/proxy.yaml"),
        "{env}"
    );
    assert!(env.contains("RAMPART_ADMIN_LISTEN=0.0.0.0:9901"), "{env}");
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("RAMPART_CONFIG", config)
        .env("RAMPART_ADMIN_LISTEN", admin);
}

/// The built binary and the shipped proxy.yaml in a directory any uid can read, and a
/// command that runs the binary as `uid` (through setpriv when we are root).
struct AsImageUser {
    dir: PathBuf,
    uid: u32,
}

impl AsImageUser {
    fn new(test: &str, proxy_yaml: &str) -> AsImageUser {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir(test);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_rampart"), dir.join("rampart")).unwrap();
        std::fs::write(dir.join("proxy.yaml"), proxy_yaml).unwrap();
        std::fs::set_permissions(
            dir.join("proxy.yaml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        AsImageUser {
            dir,
            uid: image_uid(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let bin = self.dir.join("rampart");
        let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        let mut c = if root {
            let mut c = Command::new("setpriv");
            let id = self.uid.to_string();
            c.args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
                .arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        c.args(args).current_dir(&self.dir);
        c
    }
}

/// The shipped proxy.yaml with its fixed traffic ports moved to free ones (other tests run
/// at the same time), and the backend at `backend`.
fn shipped_on_free_ports(backend: &str) -> String {
    let text = read("proxy.yaml");
    assert!(text.contains("\"0.0.0.0:8080\"") && text.contains("\"127.0.0.1:8081\""));
    text.replace("0.0.0.0:8080", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{}", free_port()))
        .replace("http://127.0.0.1:3001", backend)
}

/// `rampart check` as the image's non-root user, with the image's environment and the
/// shipped config; the container's own address without a token is refused.
#[test]
fn the_image_user_checks_the_shipped_config() {
    let image = AsImageUser::new("image-check", &read("proxy.yaml"));
    let config = image.dir.join("proxy.yaml");
    let mut c = image.command(&["check"]);
    image_env(&mut c, &config, "0.0.0.0:9901");
    let out = c.env("RAMPART_ADMIN_TOKEN", TOKEN).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(": ok") && stdout.contains("admin     0.0.0.0:9901 (token)"),
        "{stdout}"
    );
    let mut c = image.command(&["check"]);
    image_env(&mut c, &config, "0.0.0.0:9901");
    let out = c.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running instance as the container runs it (non-root uid, the image's environment):
/// the HEALTHCHECK command passes, `probe readyz` follows the backend, and the legacy
/// sidecar's preStop command drains it to a clean exit.
#[tokio::test]
async fn healthcheck_and_prestop_commands_work_against_a_running_instance() {
    let up = Upstream::start().await;
    let image = AsImageUser::new("image-run", &shipped_on_free_ports(&up.url()));
    let port = free_port();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut c = image.command(&["run"]);
    image_env(
        &mut c,
        &image.dir.join("proxy.yaml"),
        &format!("0.0.0.0:{port}"),
    );
    let mut child = ChildGuard(
        c.env("RAMPART_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while admin_get(admin, "/livez").await.map(|r| r.0) != Some(200) {
        assert!(child.0.try_wait().unwrap().is_none(), "rampart exited");
        assert!(Instant::now() < deadline, "no /livez");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Serving, so past setpriv's exec: the child is rampart itself, as the image's user.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let uid = image.uid.to_string();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == uid),
        "{uid_line}"
    );
    let healthcheck = dockerfile()
        .into_iter()
        .find_map(|(op, args)| (op == "HEALTHCHECK").then_some(args))
        .expect("a HEALTHCHECK");
    let exec: Vec<String> =
        serde_json::from_str(healthcheck.split("CMD").nth(1).unwrap().trim()).unwrap();
    assert_eq!(exec[..2], ["/usr/local/bin/rampart", "probe"], "{exec:?}");
    let a = admin.to_string();
    let run = |args: &[String], token: bool| {
        let mut cmd = image.command(&args.iter().map(String::as_str).collect::<Vec<_>>());
        cmd.args(["--admin", &a]).env_remove("RAMPART_ADMIN_TOKEN");
        if token {
            cmd.env("RAMPART_ADMIN_TOKEN", TOKEN);
        }
        cmd.output().unwrap()
    };
    let out = run(&exec[1..], false);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let readyz = ["probe".to_owned(), "readyz".to_owned()];
    let deadline = Instant::now() + Duration::from_secs(15);
    while run(&readyz, false).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "never ready with the backend up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let legacy = docs("examples/kubernetes/sidecar-legacy/deployment.yaml");
    let pre_stop = pre_stop_command(&legacy[0], "rampart").expect("rampart's preStop");
    assert_eq!(pre_stop, ["/usr/local/bin/rampart", "drain"]);
    let out = run(&pre_stop[1..], true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&readyz, false);
    assert_eq!(out.status.code(), Some(1), "ready while draining");
    let drain = shipped_drain();
    let deadline = Instant::now() + drain + Duration::from_secs(3);
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "still running after the drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0));
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// accept_grace + timeout of the shipped proxy.yaml.
fn shipped_drain() -> Duration {
    let c = rampart::config::parse_str(&read("proxy.yaml"), "proxy.yaml", &|_| None).unwrap();
    c.drain.accept_grace + c.drain.timeout
}

/// The YAML documents of a file (split at `---` lines).
fn docs(rel: &str) -> Vec<Node> {
    read(rel)
        .split("\n---\n")
        .map(|d| marked_yaml::parse_yaml(0, d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

/// The node at `path` (mapping keys, or sequence indices as numbers).
fn at<'a>(node: &'a Node, path: &[&str]) -> Option<&'a Node> {
    path.iter().try_fold(node, |n, key| match n {
        Node::Mapping(m) => m.get_node(key),
        Node::Sequence(s) => s.get_node(key.parse().ok()?),
        Node::Scalar(_) => None,
    })
}

fn scalar<'a>(node: &'a Node, path: &[&str]) -> Option<&'a str> {
    Some(at(node, path)?.as_scalar()?.as_str())
}

/// The containers and init containers of a Deployment's pod template.
fn containers(deployment: &Node) -> Vec<&Node> {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|k| at(deployment, &["spec", "template", "spec", k])?.as_sequence())
        .flat_map(|s| s.iter())
        .collect()
}

fn container<'a>(deployment: &'a Node, name: &str) -> &'a Node {
    containers(deployment)
        .into_iter()
        .find(|c| scalar(c, &["name"]) == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn pre_stop_command(deployment: &Node, name: &str) -> Option<Vec<String>> {
    let cmd = at(
        container(deployment, name),
        &["lifecycle", "preStop", "exec", "command"],
    )?;
    Some(
        cmd.as_sequence()?
            .iter()
            .map(|n| n.as_scalar().unwrap().as_str().to_owned())
            .collect(),
    )
}

/// The longest `sleep N` preStop of the pod's containers.
fn longest_pre_stop_sleep(deployment: &Node) -> Duration {
    containers(deployment)
        .into_iter()
        .filter_map(|c| {
            let name = scalar(c, &["name"]).unwrap();
            let cmd = pre_stop_command(deployment, name)?;
            (cmd[0] == "sleep").then(|| Duration::from_secs(cmd[1].parse().unwrap()))
        })
        .max()
        .unwrap_or_default()
}

fn grace(deployment: &Node) -> Duration {
    let s = scalar(
        deployment,
        &["spec", "template", "spec", "terminationGracePeriodSeconds"],
    );
    Duration::from_secs(s.expect("terminationGracePeriodSeconds").parse().unwrap())
}

const MARGIN: Duration = Duration::from_secs(5);

/// Each pod's grace period covers its preStop sleep, rampart's whole drain (accept_grace +
/// timeout of the proxy.yaml it runs) and a margin; the backend's sleep covers what it must
/// (the accept grace beside a native sidecar, the whole drain beside a plain container).
/// The same for the systemd unit's TimeoutStopSec and PM2's kill_timeout.
#[test]
fn termination_grace_covers_the_drain() {
    let drain = shipped_drain();
    assert_eq!(
        drain,
        Duration::from_secs(35),
        "update the comments that say 5s + 30s"
    );
    let c = rampart::config::parse_str(&read("proxy.yaml"), "proxy.yaml", &|_| None).unwrap();
    for (file, backend_sleep) in [
        (
            "examples/kubernetes/sidecar/deployment.yaml",
            c.drain.accept_grace,
        ),
        ("examples/kubernetes/sidecar-legacy/deployment.yaml", drain),
    ] {
        let d = &docs(file)[0];
        let sleep = longest_pre_stop_sleep(d);
        assert!(
            sleep >= backend_sleep,
            "{file}: the backend sleeps {sleep:?}"
        );
        let need = sleep + drain + MARGIN;
        assert!(grace(d) >= need, "{file}: grace {:?} < {need:?}", grace(d));
    }
    let edge = docs("examples/kubernetes/edge/deployment.yaml");
    let edge_config = edge_config("edge-grace");
    let edge_drain = edge_config.drain.accept_grace + edge_config.drain.timeout;
    assert!(
        grace(&edge[0]) >= edge_drain + MARGIN,
        "edge grace {:?}",
        grace(&edge[0])
    );

    let unit = read("examples/systemd/rampart.service");
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec");
    assert!(
        Duration::from_secs(stop.parse().unwrap()) >= drain + MARGIN,
        "TimeoutStopSec={stop}"
    );
    let pm2 = read("examples/pm2/ecosystem.config.js");
    let kill = pm2
        .lines()
        .find_map(|l| l.trim().strip_prefix("kill_timeout: "))
        .expect("kill_timeout");
    let kill: u64 = kill.trim_end_matches(',').parse().unwrap();
    assert!(
        Duration::from_millis(kill) >= drain + MARGIN,
        "kill_timeout {kill}"
    );
}

/// The sidecar's ConfigMap carries the shipped proxy.yaml byte for byte (what the tests
/// check is what the pod runs).
#[test]
fn the_sidecar_configmap_is_the_shipped_proxy_yaml() {
    let d = &docs("examples/kubernetes/sidecar/configmap.yaml")[0];
    let text = scalar(d, &["data", "proxy.yaml"]).expect("data.proxy.yaml");
    assert!(
        text == read("proxy.yaml"),
        "the ConfigMap differs from proxy.yaml"
    );
    let deployment = &docs("examples/kubernetes/sidecar/deployment.yaml")[0];
    let name = scalar(
        deployment,
        &[
            "spec",
            "template",
            "spec",
            "volumes",
            "0",
            "configMap",
            "name",
        ],
    );
    assert_eq!(name, scalar(d, &["metadata", "name"]));
}

/// The edge's proxy.yaml with a certificate where the TLS Secret is mounted (in a temp
/// directory): its text and path.
fn edge_yaml_with_certs(test: &str) -> (String, PathBuf) {
    let dir = temp_dir(test);
    let cert = rcgen::generate_simple_self_signed(vec!["chat.example.com".to_owned()]).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
    let deployment = &docs("examples/kubernetes/edge/deployment.yaml")[0];
    let mount = scalar(
        container(deployment, "rampart"),
        &["volumeMounts", "1", "mountPath"],
    );
    assert_eq!(mount, Some("/etc/rampart-tls"));
    let d = &docs("examples/kubernetes/edge/configmap.yaml")[0];
    let text = scalar(d, &["data", "proxy.yaml"]).unwrap();
    assert!(text.contains("/etc/rampart-tls/tls.crt"));
    let text = text.replace("/etc/rampart-tls/", &format!("{}/", dir.display()));
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, &text).unwrap();
    (text, path)
}

/// The edge's proxy.yaml, parsed with the environment its pod has (the Secret's values).
fn edge_config(test: &str) -> rampart::config::Config {
    let (text, _) = edge_yaml_with_certs(test);
    let env = |n: &str| match n {
        "RAMPART_ADMIN_TOKEN" => Some(TOKEN.to_owned()),
        "REDIS_PASSWORD" => Some("pw".to_owned()),
        _ => None,
    };
    rampart::config::parse_str(&text, "edge.yaml", &env).unwrap_or_else(|e| panic!("{e}"))
}

/// `rampart check` accepts the edge's proxy.yaml with its pod's environment and a
/// certificate where the TLS Secret is mounted.
#[test]
fn the_edge_config_passes_rampart_check() {
    let (_, path) = edge_yaml_with_certs("edge-check");
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .arg("check")
        .arg(&path)
        .env("RAMPART_ADMIN_TOKEN", TOKEN)
        .env("REDIS_PASSWORD", "pw")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("listener  https on 0.0.0.0:8443"),
        "{stdout}"
    );
}

/// `replicas:` in the edge's proxy.yaml is the HPA's maxReplicas: the memory fallback
/// never grants more than a limit across the replicas the HPA may run.
#[test]
fn the_edge_replicas_follow_the_hpa() {
    let hpa = &docs("examples/kubernetes/edge/hpa.yaml")[0];
    let max: u32 = scalar(hpa, &["spec", "maxReplicas"])
        .unwrap()
        .parse()
        .unwrap();
    let min: u32 = scalar(hpa, &["spec", "minReplicas"])
        .unwrap()
        .parse()
        .unwrap();
    assert!(min >= 2 && min <= max);
    assert_eq!(edge_config("edge-replicas").replicas, max);
    let deployment = &docs("examples/kubernetes/edge/deployment.yaml")[0];
    assert!(
        at(deployment, &["spec", "replicas"]).is_none(),
        "the HPA owns the count"
    );
}

/// Every pod runs rampart as the image's uid, takes the admin token from a Secret, probes
/// the admin port without credentials, and has a memory limit (the memory check's cgroup).
#[test]
fn every_rampart_container_is_non_root_with_a_secret_token_and_open_probes() {
    let uid = image_uid().to_string();
    for file in [
        "examples/kubernetes/sidecar/deployment.yaml",
        "examples/kubernetes/sidecar-legacy/deployment.yaml",
        "examples/kubernetes/edge/deployment.yaml",
    ] {
        let d = &docs(file)[0];
        let c = container(d, "rampart");
        assert_eq!(
            scalar(c, &["securityContext", "runAsUser"]),
            Some(uid.as_str()),
            "{file}"
        );
        assert_eq!(
            scalar(c, &["securityContext", "runAsNonRoot"]),
            Some("true"),
            "{file}"
        );
        let env = at(c, &["env"]).unwrap().as_sequence().unwrap();
        let token = env
            .iter()
            .find(|e| scalar(e, &["name"]) == Some("RAMPART_ADMIN_TOKEN"))
            .unwrap_or_else(|| panic!("{file}: no RAMPART_ADMIN_TOKEN"));
        assert!(
            at(token, &["valueFrom", "secretKeyRef"]).is_some(),
            "{file}"
        );
        for (probe, path) in [
            ("startupProbe", "/livez"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/livez"),
        ] {
            assert_eq!(
                scalar(c, &[probe, "httpGet", "path"]),
                Some(path),
                "{file} {probe}"
            );
            assert_eq!(
                scalar(c, &[probe, "httpGet", "port"]),
                Some("admin"),
                "{file} {probe}"
            );
            assert!(
                at(c, &[probe, "httpGet", "httpHeaders"]).is_none(),
                "{file} {probe}"
            );
        }
        assert!(
            scalar(c, &["resources", "limits", "memory"]).is_some(),
            "{file}"
        );
        let native = scalar(c, &["restartPolicy"]) == Some("Always");
        assert_eq!(
            native,
            file.contains("/sidecar/"),
            "{file}: native sidecar or not"
        );
    }
}

/// The sidecar's Services target rampart's ports by number: the name of a native sidecar's
/// port resolves in a Service only from Kubernetes 1.32 on (and the files are for 1.29).
#[test]
fn the_sidecar_services_target_rampart_ports_by_number() {
    let deployment = &docs("examples/kubernetes/sidecar/deployment.yaml")[0];
    let ports: Vec<&str> = at(container(deployment, "rampart"), &["ports"])
        .and_then(Node::as_sequence)
        .unwrap()
        .iter()
        .map(|p| scalar(p, &["containerPort"]).unwrap())
        .collect();
    let services = docs("examples/kubernetes/sidecar/service.yaml");
    assert_eq!(services.len(), 2);
    for svc in &services {
        for port in at(svc, &["spec", "ports"])
            .and_then(Node::as_sequence)
            .unwrap()
            .iter()
        {
            let target = scalar(port, &["targetPort"]).unwrap();
            assert!(
                ports.contains(&target),
                "targetPort {target} is not one of {ports:?}"
            );
        }
    }
}
