//! A standalone host: the systemd unit and the PM2 entry; and every `examples/` path the
//! docs name exists.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{ROOT, read, temp_dir};
use crate::support::skip::{Need, skip};

/// `systemd-analyze verify` on the unit as shipped (binary path pointed at the built one:
/// verify checks that every command exists), and as an edge host with TLS on 443 (the
/// capability and the key's group switched on); no warning either way. The unit drains on stop and reloads on SIGHUP.
#[test]
fn the_systemd_unit_verifies() {
    let unit = read("examples/systemd/rampart.service");
    for line in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ExecStartPre=/usr/local/bin/rampart check /etc/rampart/proxy.yaml",
        "ExecStart=/usr/local/bin/rampart run /etc/rampart/proxy.yaml",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line}");
    }
    // The shipped proxy.yaml binds no port below 1024: no capability unless one is added.
    assert!(
        unit.lines()
            .filter(|l| l.contains("CAP_NET_BIND_SERVICE"))
            .all(|l| l.starts_with('#')),
        "a capability the shipped config does not need"
    );
    assert!(unit.lines().any(|l| l == "CapabilityBoundingSet="));
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        return skip(
            "deploy::host::the_systemd_unit_verifies",
            Need::SystemdAnalyze,
            "no systemd-analyze",
            "apt-get install systemd",
        );
    }
    let dir = temp_dir("systemd");
    let bin = env!("CARGO_BIN_EXE_rampart");
    let shipped = unit.replace("/usr/local/bin/rampart", bin);
    let low_ports = shipped
        .replace("CapabilityBoundingSet=\n", "")
        .replace("#AmbientCapabilities=", "AmbientCapabilities=")
        .replace("#CapabilityBoundingSet=", "CapabilityBoundingSet=")
        .replace("#SupplementaryGroups=", "SupplementaryGroups=");
    assert_ne!(low_ports, shipped);
    for (name, text) in [
        ("rampart.service", shipped),
        ("rampart-low.service", low_ports),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        assert!(!stderr.contains(name), "{name}: {stderr}");
    }
    // The check: a misspelt key is what verify reports (so the assertion above can fail).
    let bad = dir.join("bad.service");
    std::fs::write(
        &bad,
        unit.replace("/usr/local/bin/rampart", bin)
            .replace("KillMode=", "KilMode="),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown key"),
        "{out:?}"
    );
}

/// The PM2 entry, loaded by node as PM2 loads it: the binary without an interpreter, one
/// process, restarts that stop on a bad config, a kill timeout above the drain.
#[test]
fn the_pm2_entry_runs_the_binary_and_waits_for_the_drain() {
    let file = Path::new(ROOT).join("examples/pm2/ecosystem.config.js");
    let out = match Command::new("node")
        .args([
            "-e",
            "console.log(JSON.stringify(require(process.argv[1])))",
        ])
        .arg(&file)
        .env_remove("RAMPART_ADMIN_TOKEN")
        .output()
    {
        Ok(out) => out,
        Err(_) => {
            return skip(
                "deploy::host::the_pm2_entry_runs_the_binary_and_waits_for_the_drain",
                Need::Node,
                "no node",
                "apt-get install nodejs",
            );
        }
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let apps = v["apps"].as_array().unwrap();
    let app = apps
        .iter()
        .find(|a| a["name"] == "rampart")
        .expect("an app rampart");
    assert_eq!(app["script"], "/usr/local/bin/rampart");
    assert_eq!(app["args"], "run /etc/rampart/proxy.yaml");
    assert_eq!(app["interpreter"], "none");
    assert_eq!(app["exec_mode"], "fork");
    assert_eq!(app["instances"], 1);
    let stop: Vec<i64> = serde_json::from_value(app["stop_exit_codes"].clone()).unwrap();
    assert!(stop.contains(&2) && stop.contains(&64), "{stop:?}");
    let kill = app["kill_timeout"].as_u64().unwrap();
    assert!(
        std::time::Duration::from_millis(kill) >= super::shipped_drain() + super::MARGIN,
        "{kill}"
    );
    // Nothing secret in the file: the token comes from PM2's environment.
    assert_eq!(app["env"]["RAMPART_ADMIN_TOKEN"], "");
    // The args are what the binary accepts.
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("[FILE]"));
}

/// Every `examples/...` path named in the README, the docs, the Dockerfile, the sources and
/// the examples themselves exists (the Kubernetes files moved in issue 21).
#[test]
fn every_example_path_the_docs_name_exists() {
    let mut files = vec![
        Path::new(ROOT).join("README.md"),
        Path::new(ROOT).join("Dockerfile"),
    ];
    for dir in ["docs", "src", "examples", "tests/it"] {
        walk(&Path::new(ROOT).join(dir), &mut files);
    }
    let mut named = 0;
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let mut rest = text.as_str();
        while let Some(i) = rest.find("examples/") {
            let ok_before = i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric();
            let path: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || "/._-".contains(*c))
                .collect();
            rest = &rest[i + path.len()..];
            let path = path.trim_end_matches(['.', '/']);
            // A path being built in code (`examples/{dir}`) or this test's own pattern.
            if !ok_before || path == "examples" || path.contains("..") {
                continue;
            }
            named += 1;
            assert!(
                Path::new(ROOT).join(path).exists(),
                "{} names {path}, which does not exist",
                file.display()
            );
        }
    }
    assert!(named >= 10, "{named}");
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}
