//! The reader API every section is written with: [`Ctx`] collects problems, [`Field`] is a
//! node with its key path, [`MapReader`] reads one mapping and refuses keys it was not asked
//! for (with a did-you-mean from [`suggest`]).

use std::collections::HashMap;
use std::fmt::Write as _;

use super::TimeoutSite;
use crate::config::raw::{Entry, Kind, Node, Pos, child_path, item_path};
use crate::config::{Problem, Secret};

/// Collects problems while the tree is read.
pub(super) struct Ctx<'e> {
    pub(super) env: &'e dyn Fn(&str) -> Option<String>,
    pub(super) problems: Vec<Problem>,
    /// Every route's timeouts and where they were written, for `layered_timeouts`.
    pub(super) timeout_sites: Vec<TimeoutSite>,
}

/// A node of the tree and its key path, as messages name it.
#[derive(Debug, Clone)]
pub(super) struct Field<'a> {
    pub(super) node: &'a Node,
    pub(super) path: String,
}

impl<'a> Field<'a> {
    pub(super) fn root(node: &'a Node) -> Self {
        Field::at(node, String::new())
    }

    pub(super) fn at(node: &'a Node, path: String) -> Self {
        Field { node, path }
    }

    pub(super) fn pos(&self) -> Pos {
        self.node.pos
    }
}

impl<'e> Ctx<'e> {
    pub(super) fn new(env: &'e dyn Fn(&str) -> Option<String>) -> Self {
        Ctx {
            env,
            problems: Vec::new(),
            timeout_sites: Vec::new(),
        }
    }

    pub(super) fn report(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            line: pos.line,
            column: pos.column,
            path: path.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn wrong_kind(&mut self, f: &Field, expected: &str) {
        let found = f.node.kind.describe();
        self.report(
            f.pos(),
            &f.path,
            format!("expected {expected}, found {found}"),
        );
    }

    /// A scalar's text with `${VAR}` substituted; anything else is reported.
    pub(super) fn text(&mut self, f: &Field, expected: &str) -> Option<String> {
        let Kind::Scalar(raw) = &f.node.kind else {
            self.wrong_kind(f, expected);
            return None;
        };
        match crate::config::env::interpolate(raw, self.env) {
            Ok(text) => Some(text),
            Err(messages) => {
                for m in messages {
                    self.report(f.pos(), &f.path, m);
                }
                None
            }
        }
    }

    /// A credential's text with `${VAR}` substituted. Problems never quote the value: a
    /// message that would (a malformed reference) says what is wrong without it.
    pub(super) fn secret(&mut self, f: &Field, expected: &str) -> Option<Secret<String>> {
        let Kind::Scalar(raw) = &f.node.kind else {
            self.wrong_kind(f, expected);
            return None;
        };
        match crate::config::env::interpolate(raw, self.env) {
            Ok(text) => Some(Secret::new(text)),
            Err(messages) => {
                for m in messages {
                    // "environment variable NAME is not set" names a variable, not the value.
                    let m = if m.starts_with("environment variable ") {
                        m
                    } else {
                        "invalid \"${...}\" reference (the value is not shown: it may hold a secret; \
                         write \"$$\" for a literal \"$\")"
                            .to_owned()
                    };
                    self.report(f.pos(), &f.path, m);
                }
                None
            }
        }
    }

    /// A credential read through `parse`, which must not quote it in its messages.
    pub(super) fn parse_secret<T>(
        &mut self,
        f: &Field,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<Secret<T>> {
        let text = self.secret(f, expected)?;
        match parse(text.expose()) {
            Ok(v) => Some(Secret::new(v)),
            Err(message) => {
                self.report(f.pos(), &f.path, message);
                None
            }
        }
    }

    /// Reads a scalar through `parse`, reporting its error message at the value.
    pub(super) fn parse_with<T>(
        &mut self,
        f: &Field,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.text(f, expected)?;
        match parse(&text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.report(f.pos(), &f.path, message);
                None
            }
        }
    }

    pub(super) fn list<'a>(&mut self, f: &Field<'a>, expected: &str) -> Option<Vec<Field<'a>>> {
        let Kind::List(items) = &f.node.kind else {
            self.wrong_kind(f, expected);
            return None;
        };
        Some(
            items
                .iter()
                .enumerate()
                .map(|(i, node)| Field::at(node, item_path(&f.path, i)))
                .collect(),
        )
    }

    /// A list of at most `spec.max` distinct strings, each read by `parse`; None when any
    /// entry, or the length, was refused (each one reported).
    pub(super) fn distinct_list(
        &mut self,
        f: &Field,
        spec: &ListSpec,
        parse: impl Fn(&str) -> Result<String, String>,
    ) -> Option<Vec<String>> {
        let items = self.list(f, spec.expected)?;
        if items.len() > spec.max {
            self.report(
                f.pos(),
                &f.path,
                format!(
                    "lists {} {}, at most {} are allowed",
                    items.len(),
                    spec.plural,
                    spec.max
                ),
            );
            return None;
        }
        let mut seen = Unique::default();
        let mut out = Vec::new();
        let mut ok = true;
        for item in &items {
            match self.parse_with(item, spec.one, &parse) {
                Some(v) if seen.insert(self, &v, item, spec.duplicate) => out.push(v),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// The entries of a mapping whose keys are names chosen by the user (`upstreams`).
    pub(super) fn entries<'a>(&mut self, f: &Field<'a>) -> Option<&'a [Entry]> {
        match &f.node.kind {
            Kind::Map(entries) => Some(entries),
            _ => {
                self.wrong_kind(f, "a mapping");
                None
            }
        }
    }
}

/// What [`Ctx::distinct_list`] says of a list: the whole (`expected`), its count
/// (`plural`), one entry (`one`), a repeated one (`duplicate`).
pub(super) struct ListSpec {
    pub(super) expected: &'static str,
    pub(super) max: usize,
    pub(super) plural: &'static str,
    pub(super) one: &'static str,
    pub(super) duplicate: &'static str,
}

/// Finds a value seen twice; the later one gets the problem.
#[derive(Default)]
pub(super) struct Unique {
    pub(super) seen: HashMap<String, Pos>,
}

impl Unique {
    /// False (and reported) if `value` was seen before.
    pub(super) fn insert(&mut self, ctx: &mut Ctx, value: &str, at: &Field, what: &str) -> bool {
        if let Some(first) = self.seen.get(value) {
            ctx.report(
                at.pos(),
                &at.path,
                format!(
                    "duplicate {what} \"{value}\" (first used at line {})",
                    first.line
                ),
            );
            false
        } else {
            self.seen.insert(value.to_owned(), at.pos());
            true
        }
    }
}

/// Reads one mapping with fixed keys. Remembers which keys were asked for, so `finish` can
/// refuse the others (typos, keys of another version) instead of ignoring them.
pub(super) struct MapReader<'a> {
    pub(super) entries: &'a [Entry],
    pub(super) path: String,
    pub(super) pos: Pos,
    /// The node was not a mapping (already reported) or absent: nothing is required of it.
    pub(super) quiet: bool,
    pub(super) known: Vec<&'static str>,
    pub(super) refused: Vec<&'static str>,
}

impl<'a> MapReader<'a> {
    /// Absent, null or not a mapping (reported) reads as an empty mapping.
    pub(super) fn open(ctx: &mut Ctx, f: Option<Field<'a>>) -> Self {
        let mut reader = MapReader {
            entries: &[],
            path: String::new(),
            pos: Pos::default(),
            quiet: true,
            known: Vec::new(),
            refused: Vec::new(),
        };
        if let Some(f) = f {
            match &f.node.kind {
                Kind::Map(entries) => {
                    reader.entries = entries;
                    reader.quiet = false;
                }
                _ => ctx.wrong_kind(&f, "a mapping"),
            }
            reader.pos = f.pos();
            reader.path = f.path;
        }
        reader
    }

    fn ask(&mut self, key: &'static str) {
        self.known.push(key);
        #[cfg(test)]
        if !self.quiet {
            super::doc_reference::record(&self.path, key);
        }
    }

    pub(super) fn entry(&self, key: &str) -> Option<&'a Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The value of `key`; None if absent or null (null means "use the default").
    pub(super) fn optional(&mut self, key: &'static str) -> Option<Field<'a>> {
        self.ask(key);
        let e = self.entry(key)?;
        match e.value.kind {
            Kind::Null => None,
            _ => Some(Field::at(&e.value, child_path(&self.path, key))),
        }
    }

    pub(super) fn required(&mut self, ctx: &mut Ctx, key: &'static str) -> Option<Field<'a>> {
        self.ask(key);
        let Some(e) = self.entry(key) else {
            if !self.quiet {
                ctx.report(
                    self.pos,
                    &self.path,
                    format!("missing required key \"{key}\""),
                );
            }
            return None;
        };
        let path = child_path(&self.path, key);
        if let Kind::Null = e.value.kind {
            ctx.report(
                e.key_pos,
                &path,
                format!("missing value for required key \"{key}\""),
            );
            return None;
        }
        Some(Field::at(&e.value, path))
    }

    /// An optional value through one of the `Ctx` readers.
    pub(super) fn read<'e, T>(
        &mut self,
        ctx: &mut Ctx<'e>,
        key: &'static str,
        reader: impl FnOnce(&mut Ctx<'e>, &Field<'a>) -> Option<T>,
    ) -> Option<T> {
        let f = self.optional(key)?;
        reader(ctx, &f)
    }

    /// A key this version knows about but does not accept.
    pub(super) fn refuse(&mut self, ctx: &mut Ctx, key: &'static str, message: String) {
        self.refused.push(key);
        if let Some(e) = self.entry(key) {
            ctx.report(e.key_pos, &child_path(&self.path, key), message);
        }
    }

    /// Reports every key that was neither read nor refused.
    pub(super) fn finish(self, ctx: &mut Ctx) {
        for e in self.entries {
            let key = e.key.as_str();
            if self.known.contains(&key) || self.refused.contains(&key) {
                continue;
            }
            let mut message = format!("unknown key \"{key}\"");
            if let Some(s) = suggest(key, &self.known) {
                let _ = write!(message, ", did you mean \"{s}\"?");
            }
            let _ = write!(message, " (known keys: {})", self.known.join(", "));
            ctx.report(e.key_pos, &child_path(&self.path, key), message);
        }
    }
}

/// The known key closest to `key`, if within 2 edits (and not a rewrite of a short key).
pub(super) fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2 && *d < key.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminConfig;
    use crate::config::validate::test_support::*;

    #[test]
    fn duplicate_key() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listen: 0.0.0.0:8080
                listen: 0.0.0.0:8081
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 1, "{p:#?}");
        check(
            &p[0],
            4,
            5,
            "listeners[0].listen",
            "duplicate key \"listen\" (first defined at line 3)",
        );
    }

    #[test]
    fn duplicate_key_does_not_hide_other_problems() {
        let p = problems(
            "
            logging:
              format: xml
            listeners:
              - name: inbound
                name: again
                listen: 0.0.0.0:8080
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            2,
            11,
            "logging.format",
            "expected one of text, json, got \"xml\"",
        );
        check(&p[1], 5, 5, "listeners[0].name", "duplicate key \"name\"");
    }

    #[test]
    fn unknown_key_with_suggestion() {
        let p = problems(
            "
            listeners:
              - name: inbound
                listn: 0.0.0.0:8080
                routes:
                  - upstream: backend
            upstreams:
              backend:
                endpoints: [\"http://127.0.0.1:3001\"]
            ",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        check(
            &p[0],
            2,
            5,
            "listeners[0]",
            "missing required key \"listen\"",
        );
        check(
            &p[1],
            3,
            5,
            "listeners[0].listn",
            "unknown key \"listn\", did you mean \"listen\"? (known keys: name, listen, max_connections, header_read_timeout, max_header_bytes, max_headers, http2, max_in_flight, drain, health_path, normalize_path, merge_slashes, escaped_slashes, tls, redirect_to_https, http1_server, routes)",
        );
    }

    #[test]
    fn unknown_key_far_from_any_gets_no_suggestion() {
        let p = problems(&format!("{MINIMAL}\n        frobnicate: 1\n"));
        assert_eq!(p.len(), 1, "{p:#?}");
        check(
            &p[0],
            10,
            1,
            "frobnicate",
            "unknown key \"frobnicate\" (known keys: admin,",
        );
        assert!(!p[0].message.contains("did you mean"));
    }

    #[test]
    fn a_broken_reference_in_a_secret_never_quotes_it() {
        for (value, message) in [
            (
                "\"zqsecret${BROKEN\"",
                "invalid \"${...}\" reference (the value is not shown",
            ),
            (
                "\"zqsecret${1X}zq\"",
                "invalid \"${...}\" reference (the value is not shown",
            ),
            (
                "\"zqsecret${UNSET_VAR}\"",
                "environment variable UNSET_VAR is not set",
            ),
        ] {
            for key in [
                format!("admin: {{ token: {value} }}"),
                format!("redis: {{ url: {value} }}"),
                format!("alerts: {{ sinks: [{{ type: webhook, url: {value} }}] }}"),
                format!("dependencies: {{ postgres: {{ url: {value} }} }}"),
            ] {
                let text = format!("{MINIMAL}\n        {key}\n");
                let err = parse(&text).unwrap_err().to_string();
                assert!(err.contains(message), "{key}: {err}");
                assert!(!err.contains("zq"), "{key}: {err}");
            }
        }
    }

    #[test]
    fn missing_required_key() {
        let p = problems(
            "
            listeners:
              - name: inbound
                routes:
                  - match: {path_prefix: /api}
            ",
        );
        assert_eq!(p.len(), 3, "{p:#?}");
        check(&p[0], 1, 1, "", "missing required key \"upstreams\"");
        check(
            &p[1],
            2,
            5,
            "listeners[0]",
            "missing required key \"listen\"",
        );
        check(
            &p[2],
            4,
            9,
            "listeners[0].routes[0]",
            "missing required key \"upstream\"",
        );
        // Without upstreams there is nothing to check the reference against: no cascade.
    }

    #[test]
    fn required_key_without_value() {
        let text = MINIMAL.replace("listen: 0.0.0.0:8080", "listen:");
        only(
            &text,
            3,
            5,
            "listeners[0].listen",
            "missing value for required key \"listen\"",
        );
    }

    #[test]
    fn empty_lists() {
        let p = problems(
            "
            listeners: []
            upstreams: {}
            ",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        check(&p[0], 1, 12, "listeners", "must list at least one listener");
        check(
            &p[1],
            2,
            12,
            "upstreams",
            "must define at least one upstream",
        );
    }

    #[test]
    fn missing_env_var() {
        let text = MINIMAL.replace(
            "\"http://127.0.0.1:3001\"",
            "\"http://127.0.0.1:3001\", \"${FASTGPT_URL}\"",
        );
        only(
            &text,
            8,
            42,
            "upstreams.backend.endpoints[1]",
            "environment variable FASTGPT_URL is not set (give a default with ${FASTGPT_URL:-...})",
        );
    }

    #[test]
    fn unterminated_env_reference() {
        let text = MINIMAL.replace("listen: 0.0.0.0:8080", "listen: \"0.0.0.0:${LISTEN_PORT\"");
        only(&text, 3, 13, "listeners[0].listen", "unterminated \"${\"");
    }

    #[test]
    fn env_values_and_defaults_are_used() {
        let text = MINIMAL
            .replace("0.0.0.0:8080", "\"0.0.0.0:${LISTEN_PORT}\"")
            .replace(
                "\"http://127.0.0.1:3001\"",
                "\"${BACKEND_URL}\", \"${SPARE_URL:-http://10.0.0.8:3001}\"",
            )
            .replace(
                "  - upstream: backend",
                "  - upstream: backend\n                timeouts: {idle: \"${IDLE:-90s}\"}",
            );
        let c = ok(&text);
        assert_eq!(c.listeners[0].listen, "0.0.0.0:8088".parse().unwrap());
        assert_eq!(
            c.upstreams["backend"].endpoints,
            vec![uri("http://10.0.0.7:3001/"), uri("http://10.0.0.8:3001/")]
        );
        assert_eq!(c.listeners[0].routes[0].timeouts.idle, secs(90));
    }

    #[test]
    fn env_in_plain_block_values_is_typed_after_substitution() {
        let text = MINIMAL.replace(
            "listen: 0.0.0.0:8080",
            "listen: 0.0.0.0:${LISTEN_PORT}\n            max_connections: ${MAX_CONN:-500}\n            header_read_timeout: ${HRT:-3s}",
        );
        let c = ok(&text);
        assert_eq!(c.listeners[0].listen, "0.0.0.0:8088".parse().unwrap());
        assert_eq!(c.listeners[0].max_connections, 500);
        assert_eq!(c.listeners[0].header_read_timeout, secs(3));
    }

    #[test]
    fn env_is_not_applied_to_keys() {
        let text = format!("{MINIMAL}\n        \"${{LISTEN_PORT}}\": 1\n");
        only(
            &text,
            10,
            1,
            "${LISTEN_PORT}",
            "unknown key \"${LISTEN_PORT}\"",
        );
    }

    #[test]
    fn dollar_dollar_escape() {
        let text = MINIMAL.replace(
            "- upstream: backend",
            "- upstream: backend\n                match: {path_prefix: \"/$$price/${NOPE:-x}\"}",
        );
        let c = ok(&text);
        assert_eq!(c.listeners[0].routes[0].path_prefix, "/$price/x");
    }

    #[test]
    fn null_values_mean_default() {
        let text = format!("{MINIMAL}\n        admin:\n        logging: ~\n");
        let c = ok(&text);
        assert_eq!(c.admin.listen, AdminConfig::DEFAULT_LISTEN);
        assert_eq!(c.logging.level, "info");
    }

    #[test]
    fn suggestions_use_edit_distance() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("listn", "listen"), 1);
        assert_eq!(edit_distance("lsiten", "listen"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            suggest("upstreem", &["listeners", "upstreams"]),
            Some("upstreams")
        );
        assert_eq!(suggest("xyz", &["listeners", "upstreams"]), None);
        assert_eq!(suggest("a", &["b"]), None);
    }
}
