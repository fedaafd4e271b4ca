//! The one place YAML is parsed: text -> a small tree whose every node knows its line and
//! column. The tree hides marked-yaml's quirks (where a block mapping's mark lands, how a
//! missing value looks) so `validate/` only sees positions a user can act on.

use std::panic::{self, AssertUnwindSafe};

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoadError, LoaderOptions, Span};

use super::Problem;

/// 1-based line and column, as editors show them. 0:0 means "unknown".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(super) struct Pos {
    pub line: usize,
    pub column: usize,
}

/// One value of the file.
#[derive(Debug, Clone)]
pub(super) struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub(super) enum Kind {
    /// `~`, `null` or nothing at all after `key:`.
    Null,
    /// Any other scalar, quoted or not, as text: typing is the reader's job, so `"30"` and
    /// `30` read the same.
    Scalar(String),
    List(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

impl Kind {
    /// For messages: "expected a string, found a mapping".
    pub(super) fn describe(&self) -> &'static str {
        match self {
            Kind::Null => "nothing",
            Kind::Scalar(_) => "a string",
            Kind::List(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

/// `listeners[0]` + `routes` -> `listeners[0].routes`.
pub(super) fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// `listeners` + 0 -> `listeners[0]`.
pub(super) fn item_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Content may start at most this far right (in characters): a bound on how deeply the
/// blocks of a file can nest.
const MAX_DEPTH_COLUMN: usize = 256;

const EMPTY_MESSAGE: &str =
    "empty configuration: expected a mapping with `listeners` and `upstreams`";

/// Parses `text` into a tree. A problem that stops the parser (bad syntax) leaves no tree;
/// a duplicate key or a second document is reported and the tree is still returned, so the
/// rest of the file gets checked too.
pub(super) fn parse(text: &str) -> (Option<Node>, Vec<Problem>) {
    if is_empty_document(text) {
        return (
            None,
            vec![problem(Pos { line: 1, column: 1 }, "", EMPTY_MESSAGE)],
        );
    }
    // Before the parser, which recurses once per nested collection with no limit of its
    // own for block ones: a stack overflow aborts, whatever catches panics.
    if let Some((pos, column)) = too_deep(text) {
        return (
            None,
            vec![problem(
                pos,
                "",
                format!(
                    "nested too deep: this line's content starts at column {column}, beyond \
                     {MAX_DEPTH_COLUMN} (a configuration needs a handful of levels)"
                ),
            )],
        );
    }
    match load(text, true) {
        Loaded::Panicked => (None, vec![panicked()]),
        Loaded::Done(Ok(root)) => {
            let problems = trailing_content(text, &root).into_iter().collect();
            (Some(convert_root(&root)), problems)
        }
        Loaded::Done(Err(LoadError::DuplicateKey(dup))) => {
            // marked-yaml stops at the first duplicate and does not say where the mapping is;
            // a second, tolerant load finds the key's path and lets validation go on (with the
            // later value, as most YAML readers would silently do).
            let first = pos_of_span(dup.prev_key.span());
            let second = pos_of_span(dup.key.span());
            let (root, path, trailing) = match load(text, false) {
                Loaded::Done(Ok(raw_root)) => {
                    let root = convert_root(&raw_root);
                    let path = find_key_path(&root, first, "").unwrap_or_default();
                    (Some(root), path, trailing_content(text, &raw_root))
                }
                Loaded::Done(Err(_)) | Loaded::Panicked => (None, String::new(), None),
            };
            let message = format!(
                "duplicate key \"{}\" (first defined at line {})",
                dup.key.as_str(),
                first.line
            );
            let mut problems = vec![problem(second, &path, message)];
            problems.extend(trailing);
            (root, problems)
        }
        Loaded::Done(Err(e)) => (None, vec![load_error(e)]),
    }
}

/// The first line whose content starts beyond [`MAX_DEPTH_COLUMN`], counting its
/// indentation and the block indicators in front of it (`- `, `? `, `: `), and that column.
/// Each open block collection has a column of its own, further right than the one it is
/// in, so this bounds how deep block collections nest; flow ones (`[`, `{`) the scanner
/// already stops at 255.
fn too_deep(text: &str) -> Option<(Pos, usize)> {
    for (i, line) in text.lines().enumerate() {
        let mut chars = line.chars().peekable();
        let mut column = 0usize;
        let mut indicators = false;
        loop {
            match chars.peek() {
                Some(' ') => {}
                Some('-' | '?' | ':') => {
                    let mut ahead = chars.clone();
                    ahead.next();
                    if !matches!(ahead.peek(), None | Some(' ' | '\t')) {
                        break;
                    }
                    indicators = true;
                }
                _ => break,
            }
            chars.next();
            column += 1;
        }
        // Blank and comment lines open nothing.
        let content = indicators || chars.peek().is_some_and(|c| *c != '#');
        if column > MAX_DEPTH_COLUMN && content {
            return Some((
                Pos {
                    line: i + 1,
                    column: 1,
                },
                column + 1,
            ));
        }
    }
    None
}

/// What came of one load: marked-yaml's result, or a panic inside it.
enum Loaded {
    Done(Result<marked_yaml::Node, LoadError>),
    Panicked,
}

fn load(text: &str, strict_keys: bool) -> Loaded {
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(strict_keys)
        // Keeps "was this scalar plain?" so only an unquoted `~`/`null` means null.
        .prevent_coercion(true);
    // marked-yaml has `unreachable!()`s on parser states; a reload must never take the
    // process down because of a strange file, so a panic becomes a problem instead.
    match panic::catch_unwind(AssertUnwindSafe(|| {
        marked_yaml::parse_yaml_with_options(0, text, options)
    })) {
        Ok(result) => Loaded::Done(result),
        Err(_) => Loaded::Panicked,
    }
}

fn panicked() -> Problem {
    problem(
        Pos { line: 1, column: 1 },
        "",
        "the YAML parser failed on this file; please check its syntax",
    )
}

fn load_error(e: LoadError) -> Problem {
    match e {
        LoadError::ScanError(mark, scan) => problem(
            pos_of_marker(&mark),
            "",
            format!("YAML syntax error: {}", scan.info()),
        ),
        LoadError::TopLevelMustBeMapping(mark) | LoadError::TopLevelMustBeSequence(mark) => {
            problem(
                pos_of_marker(&mark),
                "",
                "expected a mapping with `listeners` and `upstreams` at the top level",
            )
        }
        LoadError::UnexpectedAnchor(mark) => problem(
            pos_of_marker(&mark),
            "",
            "YAML anchors and aliases (&name, *name) are not supported",
        ),
        LoadError::UnexpectedTag(mark) => problem(
            pos_of_marker(&mark),
            "",
            "YAML tags (such as !!str) are not supported",
        ),
        LoadError::MappingKeyMustBeScalar(mark) => problem(
            pos_of_marker(&mark),
            "",
            "mapping keys must be plain strings, not lists or mappings",
        ),
        LoadError::DuplicateKey(dup) => problem(
            pos_of_span(dup.key.span()),
            "",
            format!("duplicate key \"{}\"", dup.key.as_str()),
        ),
    }
}

fn problem(pos: Pos, path: &str, message: impl Into<String>) -> Problem {
    Problem {
        line: pos.line,
        column: pos.column,
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Nothing but blank lines, comments and document markers.
fn is_empty_document(text: &str) -> bool {
    text.lines().all(|line| {
        let t = line.trim();
        t.is_empty() || t.starts_with('#') || is_marker_line(t, "---") || is_marker_line(t, "...")
    })
}

/// `---` or `...` alone on a line (perhaps with a comment).
fn is_marker_line(trimmed: &str, marker: &str) -> bool {
    trimmed
        .strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '#']))
}

/// marked-yaml reads the first document only and ignores whatever follows; a second
/// document would be silently dropped, so anything after the first one is a problem.
fn trailing_content(text: &str, root: &marked_yaml::Node) -> Option<Problem> {
    let end = root.span().end()?;
    let mut rest: String = text.chars().skip(end.character()).collect();
    let mut first_column = end.column();
    if rest.starts_with('}') {
        // A flow mapping's end mark is its closing brace.
        rest.remove(0);
        first_column += 1;
    }
    for (i, line) in rest.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || is_marker_line(t, "...") {
            continue;
        }
        let indent = line.chars().take_while(|c| c.is_whitespace()).count();
        let column = if i == 0 {
            first_column + indent
        } else {
            indent + 1
        };
        let pos = Pos {
            line: end.line() + i,
            column,
        };
        let message = if is_marker_line(t, "---") {
            "only one YAML document is allowed"
        } else {
            "unexpected content after the end of the YAML document (check its indentation)"
        };
        return Some(problem(pos, "", message));
    }
    None
}

fn pos_of_marker(m: &marked_yaml::Marker) -> Pos {
    Pos {
        line: m.line(),
        column: m.column(),
    }
}

fn pos_of_span(span: &Span) -> Pos {
    span.start().map(pos_of_marker).unwrap_or_default()
}

fn convert_root(node: &marked_yaml::Node) -> Node {
    convert(node, None)
}

/// `key_pos` is where the value's key is: a missing value has no position of its own (the
/// parser marks the next token), so it borrows its key's.
fn convert(node: &marked_yaml::Node, key_pos: Option<Pos>) -> Node {
    match node {
        marked_yaml::Node::Scalar(s) => {
            if is_null(s) {
                Node {
                    pos: key_pos.unwrap_or_else(|| pos_of_span(s.span())),
                    kind: Kind::Null,
                }
            } else {
                Node {
                    pos: pos_of_span(s.span()),
                    kind: Kind::Scalar(s.as_str().to_owned()),
                }
            }
        }
        marked_yaml::Node::Sequence(seq) => Node {
            pos: pos_of_span(seq.span()),
            kind: Kind::List(seq.iter().map(|n| convert(n, None)).collect()),
        },
        marked_yaml::Node::Mapping(map) => convert_map(map),
    }
}

fn convert_map(map: &MarkedMappingNode) -> Node {
    let entries: Vec<Entry> = map
        .iter()
        .map(|(k, v)| {
            let key_pos = pos_of_span(k.span());
            Entry {
                key: k.as_str().to_owned(),
                key_pos,
                value: convert(v, Some(key_pos)),
            }
        })
        .collect();
    // A flow mapping starts at its `{`, but a block mapping's start mark lands after its
    // first key: the earlier of the two is where a reader looks.
    let start = pos_of_span(map.span());
    let pos = entries.first().map_or(start, |e| {
        if start.line == 0 {
            e.key_pos
        } else {
            e.key_pos.min(start)
        }
    });
    Node {
        pos,
        kind: Kind::Map(entries),
    }
}

fn is_null(s: &MarkedScalarNode) -> bool {
    // With coercion prevented, `may_coerce` is true exactly for plain (unquoted) scalars.
    s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
}

/// The path of the mapping key at `pos`, if any.
fn find_key_path(node: &Node, pos: Pos, path: &str) -> Option<String> {
    match &node.kind {
        Kind::Map(entries) => entries.iter().find_map(|e| {
            let p = child_path(path, &e.key);
            if e.key_pos == pos {
                Some(p)
            } else {
                find_key_path(&e.value, pos, &p)
            }
        }),
        Kind::List(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, n)| find_key_path(n, pos, &item_path(path, i))),
        Kind::Null | Kind::Scalar(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        parse(text).1
    }

    #[test]
    fn empty_and_comment_only_files_are_one_problem() {
        for text in ["", "\n\n", "# nothing\n  # here\n", "---\n", "---\n...\n"] {
            let (root, p) = parse(text);
            assert!(root.is_none(), "{text:?}");
            assert_eq!(p.len(), 1, "{text:?}");
            assert_eq!((p[0].line, p[0].column), (1, 1));
            assert!(p[0].message.starts_with("empty configuration"), "{p:?}");
        }
    }

    #[test]
    fn top_level_must_be_a_mapping() {
        let p = problems("- a\n- b\n");
        assert_eq!((p[0].line, p[0].column), (1, 1));
        assert!(p[0].message.contains("expected a mapping"), "{p:?}");
    }

    #[test]
    fn anchors_and_tags_are_refused_with_position() {
        let p = problems("a: &x 1\nb: *x\n");
        assert_eq!((p[0].line, p[0].column), (1, 7));
        assert!(p[0].message.contains("anchors"), "{p:?}");
        let p = problems("a:\n  b: !!str 1\n");
        assert_eq!((p[0].line, p[0].column), (2, 12));
        assert!(p[0].message.contains("tags"), "{p:?}");
    }

    #[test]
    fn duplicate_key_has_path_and_tree_is_kept() {
        let (root, p) = parse("a:\n  b: 1\n  c: 2\n  b: 3\n");
        assert!(root.is_some());
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].line, p[0].column), (4, 3));
        assert_eq!(p[0].path, "a.b");
        assert!(p[0].message.contains("first defined at line 2"), "{p:?}");
    }

    #[test]
    fn second_document_is_refused() {
        let (root, p) = parse("a: 1\n---\nb: 2\n");
        assert!(root.is_some());
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].line, p[0].column), (2, 1));
        assert!(p[0].message.contains("only one YAML document"), "{p:?}");
        let (_, p) = parse("{a: 1}  # fine\n");
        assert!(p.is_empty(), "{p:?}");
        let (_, p) = parse("{a: 1} x\n");
        assert_eq!((p[0].line, p[0].column), (1, 8), "{p:?}");
        let (_, p) = parse("a: 1\n...\n# end\n");
        assert!(p.is_empty(), "{p:?}");
        // An indented first key makes the parser stop at the first line less indented.
        let (_, p) = parse("  a: 1\nb: 2\n");
        assert_eq!((p[0].line, p[0].column), (2, 1), "{p:?}");
        assert!(p[0].message.contains("indentation"), "{p:?}");
    }

    #[test]
    fn null_values_take_their_key_position() {
        let (root, _) = parse("a:\nb: 1\n");
        let Some(Node {
            kind: Kind::Map(entries),
            ..
        }) = root
        else {
            panic!("not a map")
        };
        assert!(matches!(entries[0].value.kind, Kind::Null));
        assert_eq!(entries[0].value.pos, Pos { line: 1, column: 1 });
        // Quoted "null" is a string.
        let (root, _) = parse("a: 'null'\n");
        let Some(Node {
            kind: Kind::Map(entries),
            ..
        }) = root
        else {
            panic!("not a map")
        };
        assert!(matches!(&entries[0].value.kind, Kind::Scalar(s) if s == "null"));
    }

    /// The YAML parser recurses once per nested block collection, and nothing bounds the
    /// depth of `- - - - x`: 50,000 levels overflowed the stack (found by the `config` fuzz
    /// target), an abort that no catch_unwind stops, in `check` and in a reload alike. Run
    /// here on 2 MiB, the stack of the runtime's threads the reload reads the file on.
    #[test]
    fn nesting_too_deep_is_a_problem_not_a_stack_overflow() {
        let deep = [
            format!("{}x", "- ".repeat(50_000)),
            format!("a:\n{}x", "- ".repeat(50_000)),
            format!("{}x", "? ".repeat(50_000)),
            format!("{}a: 1", " ".repeat(50_000)),
            "- ".repeat(50_000),
            format!("{}-", "- ".repeat(50_000)),
        ];
        let found = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || deep.iter().map(|t| problems(t)).collect::<Vec<_>>())
            .unwrap()
            .join()
            .unwrap();
        for p in &found {
            assert_eq!(p.len(), 1, "{p:#?}");
            assert!(p[0].message.contains("nested too deep"), "{p:#?}");
        }
        assert_eq!((found[0][0].line, found[0][0].column), (1, 1));
        assert_eq!(found[1][0].line, 2);
        assert!(
            found[0][0].message.contains("column 100001"),
            "{:?}",
            found[0]
        );
        // What a real configuration needs is far below the limit; the deepest file allowed,
        // with flow collections as deep as the scanner takes on top, parses on 2 MiB.
        let fine = format!(
            "{}{}x",
            "- ".repeat(MAX_DEPTH_COLUMN / 2 - 1),
            "[".repeat(300)
        );
        let p = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || problems(&fine))
            .unwrap()
            .join()
            .unwrap();
        assert!(
            p.iter().all(|p| !p.message.contains("nested too deep")),
            "{p:#?}"
        );
    }

    #[test]
    fn garbage_never_panics() {
        // Odd inputs around the parser's state machine.
        for text in [
            "{",
            "}",
            "]",
            "[",
            ":",
            "- - -",
            "? a\n? a\n",
            "a: *b",
            "&a a: 1",
            "!x {}",
            "a: |\n",
            "\t",
            "a:\n\t- b",
            "%YAML 1.2\n---\na: 1",
            "a: [&x 1, *x]",
            "? [a]: 1",
            "\u{feff}a: 1",
            "a: 1\n---\n---\n",
            "'",
            "\"\\x\"",
            "a: b: c",
            "? - a\n",
            "a: {b: [c: d]}",
        ] {
            let _ = parse(text);
        }
    }
}
