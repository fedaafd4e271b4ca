//! `releases:` and `releases_state:` (issue 20), and the same release document as
//! `POST /admin/releases` takes it (JSON is YAML, so one reader serves both).

use std::time::Duration;

use super::reader::{Ctx, Field, MapReader};
use super::upstreams::{Upstreams, parse_percent};
use super::values::bound_text;
use crate::config::raw::{self, Kind};
use crate::config::{ReleaseConfig, ReleaseGate};

pub(super) fn releases(
    ctx: &mut Ctx,
    f: Option<Field>,
    upstreams: &Upstreams,
) -> Vec<ReleaseConfig> {
    let Some(f) = f else { return Vec::new() };
    let Some(items) = ctx.list(&f, "a list of releases") else {
        return Vec::new();
    };
    let mut out: Vec<ReleaseConfig> = Vec::new();
    for item in items {
        let Some(r) = release(ctx, item.clone(), upstreams.known.as_deref()) else {
            continue;
        };
        // One release per upstream at a time: two entries would fight over its weights.
        if out.iter().any(|o| o.upstream == r.upstream) {
            ctx.report(
                item.pos(),
                &item.path,
                format!(
                    "a second release for upstream \"{}\": one release per upstream at a time",
                    r.upstream
                ),
            );
            continue;
        }
        out.push(r);
    }
    out
}

pub(super) fn releases_state(ctx: &mut Ctx, f: Option<Field>) -> Option<std::path::PathBuf> {
    let f = f?;
    let text = ctx.text(&f, "a file path")?;
    if text.is_empty() || text.ends_with('/') {
        ctx.report(
            f.pos(),
            &f.path,
            format!("expected a file path, got \"{text}\""),
        );
        return None;
    }
    Some(std::path::PathBuf::from(text))
}

/// One release; `known` is the upstream names (None: not checked).
fn release(ctx: &mut Ctx, f: Field, known: Option<&[String]>) -> Option<ReleaseConfig> {
    let mut m = MapReader::open(ctx, Some(f));
    let upstream = m.required(ctx, "upstream").and_then(|f| {
        let name = ctx.text(&f, "an upstream name")?;
        if let Some(known) = known
            && !known.contains(&name)
        {
            ctx.report(
                f.pos(),
                &f.path,
                format!("unknown upstream \"{name}\" (known: {})", known.join(", ")),
            );
            return None;
        }
        Some(name)
    });
    let to = m
        .required(ctx, "to")
        .and_then(|f| ctx.name(&f, "endpoint group"));
    let steps = m.required(ctx, "steps").and_then(|f| steps(ctx, &f));
    let step_for = m.required(ctx, "step_for").and_then(|f| {
        ctx.parse_with(&f, "a duration", |s| {
            let d = super::values::parse_duration(s)?;
            if d < ReleaseConfig::MIN_STEP_FOR || d > ReleaseConfig::MAX_STEP_FOR {
                return Err(format!(
                    "must be at least {} and at most {}, got \"{s}\"",
                    bound_text(ReleaseConfig::MIN_STEP_FOR),
                    bound_text(ReleaseConfig::MAX_STEP_FOR)
                ));
            }
            Ok(d)
        })
    });
    let gate = m.required(ctx, "gate").and_then(|f| gate(ctx, f));
    m.finish(ctx);
    Some(ReleaseConfig {
        upstream: upstream?,
        to: to?,
        steps: steps?,
        step_for: step_for?,
        gate: gate?,
    })
}

fn steps(ctx: &mut Ctx, f: &Field) -> Option<Vec<u32>> {
    let items = ctx.list(f, "a list of percentages such as [5, 25, 50, 100]")?;
    let mut out = Vec::new();
    for item in &items {
        let n = ctx.int(item, 1, 100)?;
        out.push(u32::try_from(n).ok()?);
    }
    if let Err(message) = ReleaseConfig::check_steps(&out) {
        ctx.report(f.pos(), &f.path, message);
        return None;
    }
    Some(out)
}

fn gate(ctx: &mut Ctx, f: Field) -> Option<ReleaseGate> {
    let mut m = MapReader::open(ctx, Some(f));
    let max_error_rate = m
        .required(ctx, "max_error_rate")
        .and_then(|f| ctx.parse_with(&f, "a percentage", parse_percent));
    let max_p95 = m.required(ctx, "max_p95").and_then(|f| {
        ctx.parse_with(&f, "a duration", |s| {
            let d = super::values::parse_duration(s)?;
            let max = Duration::from_secs(60);
            if d > max {
                return Err(format!("must be at most {}, got \"{s}\"", bound_text(max)));
            }
            Ok(d)
        })
    });
    let min_requests = m
        .required(ctx, "min_requests")
        .and_then(|f| ctx.int(&f, 1, ReleaseConfig::MAX_MIN_REQUESTS));
    m.finish(ctx);
    Some(ReleaseGate {
        max_error_rate: max_error_rate?,
        max_p95: max_p95?,
        min_requests: min_requests?,
    })
}

/// `POST /admin/releases`: the body read as one release, `upstreams` the names that exist.
/// Errors are one line each: `path: message` (with the body's line:column when it has
/// more than one line).
pub(crate) fn release_from_json(
    body: &str,
    upstreams: &[String],
) -> Result<ReleaseConfig, Vec<String>> {
    // The file's reader would speak of `listeners` and `upstreams` for another document.
    if !body.trim_start().starts_with('{') {
        return Err(vec![
            "expected a JSON object: {\"upstream\", \"to\", \"steps\", \"step_for\", \"gate\": {\"max_error_rate\", \"max_p95\", \"min_requests\"}}".into(),
        ]);
    }
    let (root, mut problems) = raw::parse(body);
    let mut ctx = Ctx::new(&|_| None);
    let release = match &root {
        Some(node) if matches!(node.kind, Kind::Map(_)) => {
            release(&mut ctx, Field::root(node), Some(upstreams))
        }
        Some(node) => {
            ctx.wrong_kind(&Field::root(node), "a JSON object");
            None
        }
        None => None,
    };
    problems.append(&mut ctx.problems);
    problems.sort_by_key(|p| (p.line, p.column));
    match release {
        Some(r) if problems.is_empty() => Ok(r),
        _ => Err(problems
            .iter()
            .map(|p| {
                let at = if body.lines().count() > 1 && p.line > 0 {
                    format!("{}:{}: ", p.line, p.column)
                } else {
                    String::new()
                };
                if p.path.is_empty() {
                    format!("{at}{}", p.message)
                } else {
                    format!("{at}{}: {}", p.path, p.message)
                }
            })
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{check, ok, problems};
    use super::*;

    const BASE: &str = "
        listeners: [{ name: a, listen: \"127.0.0.1:0\", routes: [{ upstream: backend }] }]
        upstreams: { backend: { endpoints: [\"http://127.0.0.1:3001\"] } }
    ";

    fn with(section: &str) -> String {
        format!("{BASE}\n{section}")
    }

    #[test]
    fn releases_are_read() {
        let c = ok(&with(
            "
        releases_state: /var/lib/rampart/releases.json
        releases:
          - upstream: backend
            to: green
            steps: [5, 25, 50, 100]
            step_for: 2m
            gate: { max_error_rate: 1%, max_p95: 500ms, min_requests: 100 }
        ",
        ));
        assert_eq!(
            c.releases,
            vec![ReleaseConfig {
                upstream: "backend".into(),
                to: "green".into(),
                steps: vec![5, 25, 50, 100],
                step_for: Duration::from_secs(120),
                gate: ReleaseGate {
                    max_error_rate: 0.01,
                    max_p95: Duration::from_millis(500),
                    min_requests: 100,
                },
            }]
        );
        assert_eq!(
            c.releases_state,
            Some(std::path::PathBuf::from("/var/lib/rampart/releases.json"))
        );
        let summary = c.summary();
        assert!(
            summary.contains(
                "release   backend -> green steps [5, 25, 50, 100] every 2m (gate errors <= 1%, p95 <= 500ms, min 100 requests)\n\
                 release   state kept in /var/lib/rampart/releases.json\n"
            ),
            "{summary}"
        );
        let none = ok(BASE);
        assert!(none.releases.is_empty());
        assert_eq!(none.releases_state, None);
    }

    #[test]
    fn release_problems_are_located() {
        // Lines: BASE is lines 1-2, a blank line 3, the section from line 4.
        let p = problems(&with(
            "
        releases:
          - upstream: backnd
            to: \"gr een\"
            steps: [5, 50, 25]
            step_for: 500ms
            gate: { max_error_rate: 150%, max_p95: 2m, min_requests: 0, extra: 1 }
          - { upstream: backend, to: green, steps: [50], step_for: 1m, gate: { max_error_rate: 1%, max_p95: 1s, min_requests: 1 } }
        ",
        ));
        assert_eq!(p.len(), 9, "{p:#?}");
        check(
            &p[0],
            6,
            15,
            "releases[0].upstream",
            "unknown upstream \"backnd\" (known: backend)",
        );
        check(&p[1], 7, 9, "releases[0].to", "invalid endpoint group name");
        check(
            &p[2],
            8,
            12,
            "releases[0].steps",
            "steps must rise, got [5, 50, 25]",
        );
        check(
            &p[3],
            9,
            15,
            "releases[0].step_for",
            "must be at least 1s and at most 24h",
        );
        check(
            &p[4],
            10,
            29,
            "releases[0].gate.max_error_rate",
            "at most 100%",
        );
        check(
            &p[5],
            10,
            44,
            "releases[0].gate.max_p95",
            "must be at most 1m",
        );
        check(
            &p[6],
            10,
            62,
            "releases[0].gate.min_requests",
            "must be greater than 0",
        );
        check(
            &p[7],
            10,
            65,
            "releases[0].gate.extra",
            "unknown key \"extra\"",
        );
        check(
            &p[8],
            11,
            44,
            "releases[1].steps",
            "the last step must be 100",
        );

        let p = problems(&with(
            "
        releases:
          - { upstream: backend, to: green, steps: [100], step_for: 1m, gate: { max_error_rate: 1%, max_p95: 1s, min_requests: 1 } }
          - { upstream: backend, to: blue, steps: [100], step_for: 1m, gate: { max_error_rate: 1%, max_p95: 1s, min_requests: 1 } }
        releases_state: /var/lib/
        ",
        ));
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            7,
            5,
            "releases[1]",
            "one release per upstream at a time",
        );
        check(&p[1], 8, 17, "releases_state", "expected a file path");

        let p = problems(&with(
            "\n        releases: [{ upstream: backend }]\n        ",
        ));
        let missing: Vec<&str> = p.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            missing,
            [
                "missing required key \"to\"",
                "missing required key \"steps\"",
                "missing required key \"step_for\"",
                "missing required key \"gate\""
            ]
        );
    }

    #[test]
    fn the_admin_document_is_read_by_the_same_rules() {
        let names = vec!["backend".to_owned()];
        let r = release_from_json(
            r#"{"upstream":"backend","to":"green","steps":[5,25,50,100],"step_for":"2m","gate":{"max_error_rate":"1%","max_p95":"500ms","min_requests":100}}"#,
            &names,
        )
        .unwrap();
        assert_eq!(r.steps, vec![5, 25, 50, 100]);
        assert_eq!(r.gate.min_requests, 100);
        let e = release_from_json(
            r#"{"upstream":"nope","to":"green","steps":[5,25],"step_for":"2m","gate":{"max_error_rate":"1","max_p95":"500ms","min_requests":100}}"#,
            &names,
        )
        .unwrap_err();
        assert_eq!(
            e,
            [
                "upstream: unknown upstream \"nope\" (known: backend)",
                "steps: the last step must be 100 (the target gets all the weight), got [5, 25]",
                "gate.max_error_rate: expected a percentage like \"50%\", got \"1\""
            ]
        );
        assert_eq!(
            release_from_json("[1, 2]", &names).unwrap_err(),
            [
                "expected a JSON object: {\"upstream\", \"to\", \"steps\", \"step_for\", \"gate\": {\"max_error_rate\", \"max_p95\", \"min_requests\"}}"
            ]
        );
        assert!(release_from_json("{\"upstream\": ", &names).is_err());
    }
}
