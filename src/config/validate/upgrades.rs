//! A route's `upgrades:`: the protocols it tunnels after the upstream's 101 (issue 12, item
//! 5; Envoy's per-route `upgrade_configs`). A child of `validate` for its reader API.

use super::reader::{Ctx, Field, ListSpec};

/// More than a route could mean: the list is searched for every upgrade request.
const MAX_UPGRADES: usize = 16;
/// Longest protocol token (`name` or `name/version`); registered ones are a few letters.
const MAX_PROTOCOL_LEN: usize = 64;

/// The list, lowercased (tokens compare case-insensitively, RFC 9110 7.8); None when any
/// entry was refused (each one reported).
pub(super) fn upgrades(ctx: &mut Ctx, f: &Field) -> Option<Vec<String>> {
    ctx.distinct_list(
        f,
        &ListSpec {
            expected: "a list of protocol tokens (e.g. [websocket], or [] for none)",
            max: MAX_UPGRADES,
            plural: "protocols",
            one: "a protocol token",
            duplicate: "protocol",
        },
        parse_protocol,
    )
}

/// `protocol-name ["/" protocol-version]`, each an RFC 9110 token; never h2c.
fn parse_protocol(s: &str) -> Result<String, String> {
    let expected = || {
        format!(
            "expected a protocol token as in an Upgrade header (`websocket`, `name/version`, at most {MAX_PROTOCOL_LEN} characters), got \"{s}\""
        )
    };
    if s.len() > MAX_PROTOCOL_LEN {
        return Err(expected());
    }
    let (name, version) = match s.split_once('/') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    };
    if !is_token(name) || version.is_some_and(|v| !is_token(v)) {
        return Err(expected());
    }
    if name.eq_ignore_ascii_case("h2c") {
        return Err(
            "h2c is never forwarded: rampart speaks HTTP/2 to clients itself, and a request with `Upgrade: h2c` is served as plain HTTP/1.1"
                .into(),
        );
    }
    Ok(s.to_ascii_lowercase())
}

/// RFC 9110 5.6.2 `token`.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_tokens_and_never_h2c() {
        assert_eq!(parse_protocol("WebSocket").unwrap(), "websocket");
        assert_eq!(parse_protocol("foo/2.0").unwrap(), "foo/2.0");
        for bad in [
            "",
            "web socket",
            "a/",
            "/1",
            "a/b/c",
            "ws,x",
            "é",
            &"x".repeat(65),
        ] {
            assert!(parse_protocol(bad).is_err(), "{bad:?} accepted");
        }
        for h2c in ["h2c", "H2C", "h2c/1"] {
            assert!(parse_protocol(h2c).unwrap_err().contains("never"), "{h2c}");
        }
    }
}
