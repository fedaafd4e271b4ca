//! Memory: the process's resident memory against what it may use: the cgroup limit of its
//! container (v2 `memory.max`, else v1 `memory.limit_in_bytes`), else the machine's total.
//! Heap counters say nothing about what the OOM killer sees; resident memory against the
//! cgroup limit is what it acts on.

use std::path::Path;

use super::{Probe, Value};

/// Where the limit came from, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitSource {
    CgroupV2,
    CgroupV1,
    Machine,
}

impl LimitSource {
    fn as_str(self) -> &'static str {
        match self {
            LimitSource::CgroupV2 => "cgroup v2",
            LimitSource::CgroupV1 => "cgroup v1",
            LimitSource::Machine => "machine",
        }
    }
}

pub(crate) fn probe(warn_above: f64) -> Probe {
    match measure(Path::new("/")) {
        Ok(m) => judge(&m, warn_above),
        Err(e) => Probe::failed(e),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Measure {
    pub rss: u64,
    pub limit: u64,
    pub source: LimitSource,
}

pub(crate) fn judge(m: &Measure, warn_above: f64) -> Probe {
    let share = if m.limit == 0 {
        0.0
    } else {
        m.rss as f64 / m.limit as f64
    };
    let warning = (share > warn_above).then(|| {
        format!(
            "resident memory {:.1}% of the {} limit, above {:.0}%",
            share * 100.0,
            m.source.as_str(),
            warn_above * 100.0
        )
    });
    Probe {
        ok: true,
        warning,
        error: None,
        refused: false,
        details: vec![
            ("used_pct", Value::Num(share * 100.0)),
            (
                "rss_bytes",
                Value::Int(i64::try_from(m.rss).unwrap_or(i64::MAX)),
            ),
            (
                "limit_bytes",
                Value::Int(i64::try_from(m.limit).unwrap_or(i64::MAX)),
            ),
            ("limit_source", Value::Str(m.source.as_str().into())),
        ],
    }
}

/// Reads everything under `root` ("/" in production, a fake tree in tests).
pub(crate) fn measure(root: &Path) -> Result<Measure, String> {
    let status = read(&root.join("proc/self/status"))?;
    let rss = kib_field(&status, "VmRSS:")
        .ok_or("no VmRSS in /proc/self/status")?
        .saturating_mul(1024);
    let meminfo = read(&root.join("proc/meminfo"))?;
    let total = kib_field(&meminfo, "MemTotal:")
        .ok_or("no MemTotal in /proc/meminfo")?
        .saturating_mul(1024);
    let cgroups = read(&root.join("proc/self/cgroup")).unwrap_or_default();
    let (limit, source) = match cgroup_limit(root, &cgroups) {
        // A limit above the machine's memory (v1's "unlimited" is 2^63 rounded) is none.
        Some((limit, source)) if limit < total => (limit, source),
        _ => (total, LimitSource::Machine),
    };
    Ok(Measure { rss, limit, source })
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `VmRSS:    123456 kB` -> 123456.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The limit of our own cgroup: v2 first (`0::/path`), then v1's memory controller. The
/// path inside a container is often not mounted; then the mount's root is our cgroup.
fn cgroup_limit(root: &Path, cgroups: &str) -> Option<(u64, LimitSource)> {
    let base = root.join("sys/fs/cgroup");
    let mut v2_path = None;
    let mut v1_path = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2_path = Some(path.trim_start_matches('/').to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1_path = Some(path.trim_start_matches('/').to_owned());
        }
    }
    min_limit(&base, v2_path.as_deref(), "memory.max")
        .map(|n| (n, LimitSource::CgroupV2))
        .or_else(|| {
            min_limit(
                &base.join("memory"),
                v1_path.as_deref(),
                "memory.limit_in_bytes",
            )
            .map(|n| (n, LimitSource::CgroupV1))
        })
}

/// The smallest numeric `file` in our group's directory and its ancestors up to the mount
/// (a parent's limit binds its children). "max" (v2) means none at that level.
fn min_limit(mount: &Path, group: Option<&str>, file: &str) -> Option<u64> {
    let mut dir = group.map(|g| mount.join(g));
    let mut found = None;
    while let Some(d) = dir {
        if let Ok(text) = std::fs::read_to_string(d.join(file))
            && let Ok(n) = text.trim().parse::<u64>()
        {
            found = Some(found.map_or(n, |f: u64| f.min(n)));
        }
        if d == mount {
            break;
        }
        dir = d
            .parent()
            .filter(|p| p.starts_with(mount))
            .map(Path::to_path_buf);
    }
    if group.is_none()
        && let Ok(text) = std::fs::read_to_string(mount.join(file))
        && let Ok(n) = text.trim().parse::<u64>()
    {
        found = Some(n);
    }
    found
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn tree(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("rampart-mem-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, text) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        root
    }

    const STATUS: &str = "Name:\trampart\nVmRSS:\t  102400 kB\nThreads:\t4\n";
    const MEMINFO: &str = "MemTotal:       16384000 kB\nMemFree: 1 kB\n";

    #[test]
    fn cgroup_v2_limit_of_our_own_group() {
        let root = tree(
            "v2",
            &[
                ("proc/self/status", STATUS),
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "0::/kubepods/pod1/c1\n"),
                ("sys/fs/cgroup/kubepods/pod1/c1/memory.max", "209715200\n"),
                ("sys/fs/cgroup/memory.max", "max\n"),
            ],
        );
        let m = measure(&root).unwrap();
        assert_eq!(
            m,
            Measure {
                rss: 100 * 1024 * 1024,
                limit: 200 * 1024 * 1024,
                source: LimitSource::CgroupV2
            }
        );
        let p = judge(&m, 0.8);
        assert!(p.ok && p.warning.is_none());
        let p = judge(&m, 0.4);
        assert!(
            p.ok && p.warning.as_deref().unwrap().contains("50.0%"),
            "{p:?}"
        );
    }

    #[test]
    fn cgroup_v1_unlimited_falls_back_to_the_machine() {
        let root = tree(
            "v1",
            &[
                ("proc/self/status", STATUS),
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "4:memory:/process_api/x\n0::/\n"),
                (
                    "sys/fs/cgroup/memory/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
            ],
        );
        let m = measure(&root).unwrap();
        assert_eq!(m.source, LimitSource::Machine);
        assert_eq!(m.limit, 16384000 * 1024);
    }

    #[test]
    fn cgroup_v1_limit_at_the_mount_root() {
        let root = tree(
            "v1root",
            &[
                ("proc/self/status", STATUS),
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "4:memory:/docker/abc\n"),
                ("sys/fs/cgroup/memory/memory.limit_in_bytes", "524288000\n"),
            ],
        );
        let m = measure(&root).unwrap();
        assert_eq!((m.limit, m.source), (524288000, LimitSource::CgroupV1));
    }

    #[test]
    fn this_process_can_be_measured() {
        let m = measure(Path::new("/")).unwrap();
        assert!(m.rss > 0 && m.limit >= m.rss, "{m:?}");
    }
}
