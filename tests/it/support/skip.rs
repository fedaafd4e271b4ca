//! Skipped tests: one helper for every fixture a machine may lack (redis-server, the
//! Postgres binaries, Chromium, the deployment checkers). Each skip writes one line straight to the process's stderr
//! (libtest captures only `print!`/`eprint!`, and hides what it captured for a passing
//! test), and is counted for the summary line that `zz_summary` prints once every other
//! test has started. Under `CI=true` a skip fails instead: CI must not pass by testing
//! nothing.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Redis,
    Postgres,
    Chromium,
    /// The venv of scripts/requirements-k8s.txt (`kubernetes-validate`), made by .ci/run.
    KubernetesValidate,
    SystemdAnalyze,
    Node,
}

impl Need {
    const ALL: [Need; 6] = [
        Need::Redis,
        Need::Postgres,
        Need::Chromium,
        Need::KubernetesValidate,
        Need::SystemdAnalyze,
        Need::Node,
    ];

    fn name(self) -> &'static str {
        match self {
            Need::Redis => "redis-server",
            Need::Postgres => "postgres",
            Need::Chromium => "chromium",
            Need::KubernetesValidate => "kubernetes-validate",
            Need::SystemdAnalyze => "systemd-analyze",
            Need::Node => "node",
        }
    }
}

static COUNTS: [AtomicUsize; Need::ALL.len()] = [const { AtomicUsize::new(0) }; Need::ALL.len()];

/// Skips `test` (the caller returns at once), or panics under `CI=true`. `what` says what
/// is missing, `hint` how to get it.
pub fn skip(test: &str, need: Need, what: &str, hint: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {what}, and CI=true: {hint}");
    }
    COUNTS[need as usize].fetch_add(1, Ordering::Relaxed);
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs {}: {what} ({hint})",
        need.name()
    );
}

/// The skips so far, by need, in `Need::ALL`'s order.
pub fn counts() -> Vec<(Need, usize)> {
    Need::ALL
        .iter()
        .map(|&n| (n, COUNTS[n as usize].load(Ordering::Relaxed)))
        .collect()
}

/// "N tests skipped: need redis-server (9), postgres (6), chromium (1)"; None without skips.
pub fn summary_line(counts: &[(Need, usize)]) -> Option<String> {
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let needs: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(need, n)| format!("{} ({n})", need.name()))
        .collect();
    let tests = if total == 1 { "test" } else { "tests" };
    Some(format!(
        "{total} {tests} skipped: need {}",
        needs.join(", ")
    ))
}

/// Writes the summary line where the skip lines go.
pub fn print_summary() {
    if let Some(line) = summary_line(&counts()) {
        let _ = writeln!(std::io::stderr(), "\n{line}\n");
    }
}

#[test]
fn the_summary_line_counts_each_need() {
    assert_eq!(
        summary_line(&[(Need::Redis, 9), (Need::Postgres, 6), (Need::Chromium, 1)]).as_deref(),
        Some("16 tests skipped: need redis-server (9), postgres (6), chromium (1)")
    );
    assert_eq!(
        summary_line(&[(Need::Redis, 0), (Need::Postgres, 1), (Need::Chromium, 0)]).as_deref(),
        Some("1 test skipped: need postgres (1)")
    );
    assert_eq!(summary_line(&[(Need::Redis, 0)]), None);
}
