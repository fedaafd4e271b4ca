//! Helpers shared by the validator's tests: YAML written indented, a fixed environment,
//! and assertions on one problem's position, path and message.

use std::time::Duration;

use http::Uri;

use super::parse_str;
use crate::config::{Config, ConfigError, Problem};

/// indented in the test; line 1 is the first line after the opening quote.
pub(super) fn yaml(text: &str) -> String {
    let text = text.strip_prefix('\n').unwrap_or(text);
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    text.lines()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

pub(super) fn env(name: &str) -> Option<String> {
    match name {
        "BACKEND_URL" => Some("http://10.0.0.7:3001".into()),
        "LISTEN_PORT" => Some("8088".into()),
        _ => None,
    }
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_str(&yaml(text), "proxy.yaml", &env)
}

pub(super) fn problems(text: &str) -> Vec<Problem> {
    match parse(text) {
        Ok(c) => panic!("expected problems, got {c:#?}"),
        Err(e) => e.problems,
    }
}

/// Exactly one problem, at `line:column` with `path`, its message containing `message`.
pub(super) fn only(text: &str, line: usize, column: usize, path: &str, message: &str) {
    let p = problems(text);
    assert_eq!(p.len(), 1, "{p:#?}");
    check(&p[0], line, column, path, message);
}

pub(super) fn check(p: &Problem, line: usize, column: usize, path: &str, message: &str) {
    assert_eq!(
        (p.line, p.column, p.path.as_str()),
        (line, column, path),
        "{p:#?}"
    );
    assert!(
        p.message.contains(message),
        "message {:?} does not contain {message:?}",
        p.message
    );
}

pub(super) fn ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("unexpected problems:\n{e}"),
    }
}

pub(super) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(super) fn uri(s: &str) -> Uri {
    s.parse().unwrap()
}

pub(super) const MINIMAL: &str = "
        listeners:
          - name: inbound
            listen: 0.0.0.0:8080
            routes:
              - upstream: backend
        upstreams:
          backend:
            endpoints: [\"http://127.0.0.1:3001\"]
    ";
