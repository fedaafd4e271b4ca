//! Path normalisation: one spelling per path, so a route (and its rate limits) cannot be
//! escaped by writing its path another way (`//rl`, `/%72l`, `/x/../rl`, `/./rl`, `/rl;x`).
//!
//! In order, as Envoy's `normalize_path` and `merge_slashes` do (RFC 3986 6.2.2):
//! 1. percent-encodings are checked (`%` and two hex digits, else 400); the unreserved
//!    characters (`A-Z a-z 0-9 - . _ ~`) are decoded, the hex of the rest is upper-cased;
//!    an encoded slash or backslash (`%2F`, `%5C`) is refused or kept as `%2F`, `%5C`,
//!    never decoded (that would change the segments);
//! 2. dot segments are removed (RFC 3986 5.2.4); a `..` that would climb above the root is
//!    refused (nginx does the same; RFC 3986 would drop it silently, but no client that
//!    means well sends one);
//! 3. empty segments are dropped (`//a///b` -> `/a/b`) when slashes are merged;
//! 4. for matching only, each segment's parameters are cut (`/rl;x/y` -> `/rl/y`), as
//!    Tomcat, Jetty and Spring read them, so `/rl;x` matches `/rl`. A dot segment with
//!    parameters (`/..;x/`), which those servers resolve and others take literally, is
//!    refused: no reading of it is safe for every upstream.
//!
//! The query is never touched. A path that does not start with `/` (`*`, authority-form)
//! is left as it is.
//!
//! A leaf: the config checks route prefixes with it, the router matches with it.

use std::borrow::Cow;

/// How a path is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Options {
    pub merge_slashes: bool,
    /// An encoded slash or backslash is refused (else kept encoded): an upstream that
    /// decodes it before routing would see other segments than the ones matched.
    pub reject_escaped_slashes: bool,
    /// Cut each segment at its first `;` (the matching form).
    pub cut_params: bool,
}

/// Why a path was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathError {
    InvalidEncoding,
    EscapedSlash,
    AboveRoot,
    DotWithParams,
}

impl PathError {
    pub(crate) fn message(self) -> &'static str {
        match self {
            PathError::InvalidEncoding => "invalid percent-encoding in the path",
            PathError::EscapedSlash => "encoded slash or backslash in the path",
            PathError::AboveRoot => "path climbs above the root",
            PathError::DotWithParams => "dot segment with parameters in the path",
        }
    }
}

/// `path` normalised; borrowed when it already is.
pub(crate) fn normalize<'a>(path: &'a str, opts: Options) -> Result<Cow<'a, str>, PathError> {
    if !path.starts_with('/') || is_normal(path.as_bytes(), opts) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path.as_bytes(), opts.reject_escaped_slashes)?;
    let out = segments(&decoded, opts)?;
    // Only ASCII was added or changed (hex digits, decoded unreserved characters, `/`); every
    // other byte was copied whole from a `str`, in order, so this is valid UTF-8.
    match String::from_utf8(out) {
        Ok(s) => Ok(Cow::Owned(s)),
        Err(_) => Err(PathError::InvalidEncoding),
    }
}

/// The common case, in one pass: nothing to decode, no dot segment, no empty segment, no
/// parameter to cut.
fn is_normal(b: &[u8], opts: Options) -> bool {
    let mut prev = 0u8;
    for &c in b {
        match c {
            b'%' => return false,
            b';' if opts.cut_params => return false,
            b'/' if prev == b'/' && opts.merge_slashes => return false,
            b'.' if prev == b'/' => return false,
            _ => {}
        }
        prev = c;
    }
    true
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Step 1: percent-encodings checked, unreserved ones decoded, the rest upper-cased.
fn decode(b: &[u8], reject_escaped_slashes: bool) -> Result<Vec<u8>, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c != b'%' {
            out.push(c);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::InvalidEncoding);
        };
        let v = hi * 16 + lo;
        if is_unreserved(v) {
            out.push(v);
        } else if matches!(v, b'/' | b'\\') && reject_escaped_slashes {
            return Err(PathError::EscapedSlash);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(hi)], HEX[usize::from(lo)]]);
        }
        i += 3;
    }
    Ok(out)
}

/// Steps 2 to 4 on a decoded path that starts with `/`.
fn segments(decoded: &[u8], opts: Options) -> Result<Vec<u8>, PathError> {
    // With the segment, whether it is "transparent": parameters only (`;a`) while slashes
    // are merged. Its matching form is an empty segment, which merging drops, so a `..`
    // after it must go past it too, or the forwarded path and the path matched would
    // differ (`/x/;a/../y` is `/y` both ways).
    let mut kept: Vec<(&[u8], bool)> = Vec::new();
    // The first piece is the empty one before the leading `/`.
    let mut pieces = decoded.split(|&c| c == b'/').skip(1).peekable();
    let mut trailing = false;
    while let Some(seg) = pieces.next() {
        let last = pieces.peek().is_none();
        let (name, has_params) = match seg.iter().position(|&c| c == b';') {
            Some(at) => (&seg[..at], true),
            None => (seg, false),
        };
        let dot = name == b"." || name == b"..";
        if dot && has_params {
            return Err(PathError::DotWithParams);
        }
        let seg = if opts.cut_params { name } else { seg };
        trailing = last && (seg.is_empty() || dot);
        if name == b".." {
            while kept.last().is_some_and(|&(_, transparent)| transparent) {
                kept.pop();
            }
            if kept.pop().is_none() {
                return Err(PathError::AboveRoot);
            }
        } else if dot || (seg.is_empty() && (last || opts.merge_slashes)) {
            // Nothing kept: `.`, a merged empty segment, or the trailing slash.
        } else {
            kept.push((seg, opts.merge_slashes && name.is_empty()));
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for (seg, _) in &kept {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if out.is_empty() || trailing {
        out.push(b'/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MATCH: Options = Options {
        merge_slashes: true,
        reject_escaped_slashes: true,
        cut_params: true,
    };
    const FORWARD: Options = Options {
        cut_params: false,
        ..MATCH
    };

    fn n(path: &str, opts: Options) -> Result<String, PathError> {
        normalize(path, opts).map(Cow::into_owned)
    }

    #[test]
    fn every_spelling_of_a_path_matches_as_the_path() {
        for spelling in [
            "/rl",
            "//rl",
            "/%72l",
            "/%72%6C",
            "/x/../rl",
            "/./rl",
            "/rl;x",
            "///rl",
            "/rl/.",
            "/a/b/../../rl",
            "/%2e/rl",
            "/x/%2E%2E/rl",
            "/rl;a=1;b",
            "/;x/rl",
        ] {
            let want = if spelling.ends_with("/.") {
                "/rl/"
            } else {
                "/rl"
            };
            assert_eq!(n(spelling, MATCH).as_deref(), Ok(want), "{spelling}");
        }
    }

    #[test]
    fn rfc_3986_dot_segments_and_trailing_slashes() {
        for (from, to) in [
            ("/", "/"),
            ("//", "/"),
            ("/a/", "/a/"),
            ("/a//", "/a/"),
            ("/a/b/..", "/a/"),
            ("/a/b/../", "/a/"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/a/./b/../../c", "/c"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/...", "/a/..."),
            ("/a/..b/.c", "/a/..b/.c"),
        ] {
            assert_eq!(n(from, MATCH).as_deref(), Ok(to), "{from}");
        }
    }

    #[test]
    fn percent_encodings_are_decoded_only_when_unreserved() {
        assert_eq!(n("/%41%7a%2D%2e%5F%7E", MATCH).as_deref(), Ok("/Az-._~"));
        // Reserved and other bytes stay encoded, hex upper-cased.
        assert_eq!(
            n("/a%3fb%20c%25%3b%c3%a9", MATCH).as_deref(),
            Ok("/a%3Fb%20c%25%3B%C3%A9")
        );
        // Decoding happens once: `%252e` is `%25` then `2e`, not a dot.
        assert_eq!(n("/%252e%252e/x", MATCH).as_deref(), Ok("/%252e%252e/x"));
        for bad in ["/%", "/%4", "/%zz", "/a%g1", "/%%41"] {
            assert_eq!(n(bad, MATCH), Err(PathError::InvalidEncoding), "{bad}");
        }
    }

    #[test]
    fn encoded_slashes_are_refused_or_kept_never_decoded() {
        for p in ["/rl%2fx", "/rl%2Fx", "/a%5cb", "/a%5C"] {
            assert_eq!(n(p, MATCH), Err(PathError::EscapedSlash), "{p}");
        }
        let keep = Options {
            reject_escaped_slashes: false,
            ..MATCH
        };
        assert_eq!(n("/rl%2fx", keep).as_deref(), Ok("/rl%2Fx"));
        assert_eq!(n("/a/%2e%2e%2fb", keep).as_deref(), Ok("/a/..%2Fb"));
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        for p in ["/..", "/../x", "/a/../../x", "/%2e%2e/x", "/./../x"] {
            assert_eq!(n(p, MATCH), Err(PathError::AboveRoot), "{p}");
        }
    }

    #[test]
    fn parameters_are_cut_for_matching_and_kept_for_forwarding() {
        assert_eq!(n("/rl;x/y;z", MATCH).as_deref(), Ok("/rl/y"));
        assert_eq!(n("/rl;x/y;z", FORWARD).as_deref(), Ok("/rl;x/y;z"));
        assert_eq!(n("//rl;x/./y", FORWARD).as_deref(), Ok("/rl;x/y"));
        for p in ["/a/..;x/rl", "/a/.;/rl", "/..;"] {
            assert_eq!(n(p, MATCH), Err(PathError::DotWithParams), "{p}");
            assert_eq!(n(p, FORWARD), Err(PathError::DotWithParams), "{p}");
        }
    }

    #[test]
    fn a_dot_dot_goes_past_parameter_only_segments_as_matching_does() {
        for (raw, forwarded, matched) in [
            ("/x/;a/../y", "/y", "/y"),
            ("/;a/x/../y", "/;a/y", "/y"),
            ("/x/;a/..", "/", "/"),
            (
                "/z./;t/././zz./.t/;a/c/./././/./../../g/g",
                "/z./;t/zz./g/g",
                "/z./zz./g/g",
            ),
        ] {
            assert_eq!(n(raw, FORWARD).as_deref(), Ok(forwarded), "{raw}");
            assert_eq!(n(raw, MATCH).as_deref(), Ok(matched), "{raw}");
            assert_eq!(n(forwarded, MATCH).as_deref(), Ok(matched), "{raw}");
        }
        assert_eq!(n("/;a/..", FORWARD), Err(PathError::AboveRoot));
        assert_eq!(n("/;a/..", MATCH), Err(PathError::AboveRoot));
        // Not merged, an empty segment is a segment: `..` takes it alone.
        let keep = Options {
            merge_slashes: false,
            ..FORWARD
        };
        assert_eq!(n("/x/;a/../y", keep).as_deref(), Ok("/x/y"));
    }

    #[test]
    fn slashes_kept_when_not_merged() {
        let keep = Options {
            merge_slashes: false,
            ..MATCH
        };
        assert_eq!(n("//a//b/", keep).as_deref(), Ok("//a//b/"));
        assert_eq!(n("/a//../b", keep).as_deref(), Ok("/a/b"));
        assert_eq!(n("//", keep).as_deref(), Ok("//"));
    }

    #[test]
    fn normal_paths_are_borrowed_and_others_left_alone() {
        for p in ["/", "/api/chat", "/a-b_c~d/e.f", "*", ""] {
            assert!(matches!(normalize(p, MATCH), Ok(Cow::Borrowed(_))), "{p}");
        }
    }
}
