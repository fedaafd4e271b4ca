//! examples/kubernetes/ through the offline validators of scripts/validate-manifests.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{ROOT, docs};
use crate::support::skip::{Need, skip};

/// The venv's python from .ci/run (`RAMPART_K8S_VENV`, else ~/.cache/rampart/k8s-venv).
fn validator_python() -> Option<PathBuf> {
    let venv = std::env::var_os("RAMPART_K8S_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            Some(PathBuf::from(std::env::var_os("HOME")?).join(".cache/rampart/k8s-venv"))
        })?;
    let python = venv.join("bin/python");
    python.exists().then_some(python)
}

fn manifests() -> Vec<String> {
    let mut files = Vec::new();
    let dir = Path::new(ROOT).join("examples/kubernetes");
    for sub in std::fs::read_dir(&dir).unwrap() {
        let sub = sub.unwrap().path();
        if !sub.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&sub).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "yaml") {
                files.push(f.strip_prefix(ROOT).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    files
}

fn validate(python: &Path, versions: &[&str], files: &[String]) -> (bool, String) {
    let mut c = Command::new(python);
    c.arg("scripts/validate-manifests").current_dir(ROOT);
    for v in versions {
        c.args(["-k", v]);
    }
    let out = c.args(files).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every manifest of examples/kubernetes/ validates offline against Kubernetes 1.29 (the
/// first with native sidecars), strictly (an unknown field fails); the Prometheus
/// Operator's kinds against its models; the legacy sidecar against 1.25 too. The native
/// sidecar fails against 1.27: the pin is what makes `restartPolicy` valid.
#[test]
fn every_manifest_validates_offline() {
    let Some(python) = validator_python() else {
        return skip(
            "deploy::kubernetes::every_manifest_validates_offline",
            Need::KubernetesValidate,
            "no venv at $RAMPART_K8S_VENV or ~/.cache/rampart/k8s-venv",
            "bash .ci/run makes it, or: python3 -m venv ~/.cache/rampart/k8s-venv && \
             ~/.cache/rampart/k8s-venv/bin/pip install -r scripts/requirements-k8s.txt",
        );
    };
    let files = manifests();
    let resources: usize = files.iter().map(|f| docs(f).len()).sum();
    assert!(files.len() >= 11 && resources >= 14, "{files:?}");
    let (ok, text) = validate(&python, &["1.29.0"], &files);
    assert!(ok, "{text}");
    let passed = text.lines().filter(|l| l.starts_with("OK ")).count();
    assert_eq!(passed, resources, "one OK per resource:\n{text}");
    assert!(
        text.contains("ServiceMonitor/rampart prometheus-operator v1"),
        "{text}"
    );
    assert!(
        text.contains("PrometheusRule/rampart prometheus-operator v1"),
        "{text}"
    );

    let legacy = ["examples/kubernetes/sidecar-legacy/deployment.yaml".to_owned()];
    let (ok, text) = validate(&python, &["1.25.0"], &legacy);
    assert!(ok, "{text}");
    let native = ["examples/kubernetes/sidecar/deployment.yaml".to_owned()];
    let (ok, text) = validate(&python, &["1.27.0"], &native);
    assert!(
        !ok && text.contains("'restartPolicy' was unexpected"),
        "{text}"
    );
}
