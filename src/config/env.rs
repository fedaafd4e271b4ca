//! `${VAR}` and `${VAR:-default}` inside scalar values.
//!
//! Applied to a value's text after the YAML is parsed, so positions stay exact and a
//! variable can never add keys or change a value's kind. `$$` is a literal `$`; a `$` not
//! followed by `{` or `$` is kept as is. The substituted text is not scanned again.

/// Replaces every `${...}` in `text`. On failure returns every problem found in it.
pub(super) fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<String>> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                problems.push(format!(
                    "unterminated \"${{\" in \"{text}\" (expected \"}}\"; write \"$$\" for a literal \"$\")"
                ));
                rest = "";
                break;
            };
            match substitute(&body[..end], env) {
                Ok(value) => out.push_str(&value),
                Err(message) => problems.push(message),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// `inner` is what sits between `${` and `}`.
fn substitute(inner: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, default) = match inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        None => (inner, None),
        Some(i) => match inner[i..].strip_prefix(":-") {
            Some(default) => (&inner[..i], Some(default)),
            None => {
                return Err(format!(
                    "invalid variable reference \"${{{inner}}}\": expected ${{NAME}} or ${{NAME:-default}}"
                ));
            }
        },
    };
    if !is_valid_name(name) {
        return Err(format!(
            "invalid environment variable name \"{name}\" in \"${{{inner}}}\" (names are letters, digits and _, not starting with a digit)"
        ));
    }
    match (env(name), default) {
        // Shell semantics: `:-` also covers a variable that is set but empty.
        (Some(value), Some(default)) if value.is_empty() => Ok(default.to_owned()),
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_owned()),
        (None, None) => Err(format!(
            "environment variable {name} is not set (give a default with ${{{name}:-...}})"
        )),
    }
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.5".into()),
            "PORT" => Some("3001".into()),
            "EMPTY" => Some(String::new()),
            "TRICKY" => Some("${HOST}".into()),
            _ => None,
        }
    }

    fn run(text: &str) -> Result<String, Vec<String>> {
        interpolate(text, &env)
    }

    #[test]
    fn plain_text_is_untouched() {
        assert_eq!(run("http://a:1").as_deref(), Ok("http://a:1"));
        assert_eq!(run("").as_deref(), Ok(""));
    }

    #[test]
    fn variables_are_substituted() {
        assert_eq!(
            run("http://${HOST}:${PORT}/").as_deref(),
            Ok("http://10.0.0.5:3001/")
        );
    }

    #[test]
    fn default_used_when_unset_or_empty() {
        assert_eq!(run("${NOPE:-5s}").as_deref(), Ok("5s"));
        assert_eq!(run("${EMPTY:-5s}").as_deref(), Ok("5s"));
        assert_eq!(run("${PORT:-80}").as_deref(), Ok("3001"));
        assert_eq!(run("${NOPE:-}").as_deref(), Ok(""));
        assert_eq!(run("${EMPTY}").as_deref(), Ok(""));
        // The default is literal text.
        assert_eq!(run("${NOPE:-a:-b $x}").as_deref(), Ok("a:-b $x"));
    }

    #[test]
    fn dollar_dollar_is_a_literal_dollar() {
        assert_eq!(run("$${HOST}").as_deref(), Ok("${HOST}"));
        assert_eq!(run("a$$b").as_deref(), Ok("a$b"));
        assert_eq!(run("$$$${HOST}").as_deref(), Ok("$${HOST}"));
        assert_eq!(run("$$${HOST}").as_deref(), Ok("$10.0.0.5"));
    }

    #[test]
    fn lone_dollar_is_kept() {
        assert_eq!(run("cost $5").as_deref(), Ok("cost $5"));
        assert_eq!(run("end$").as_deref(), Ok("end$"));
        assert_eq!(run("$HOME").as_deref(), Ok("$HOME"));
    }

    #[test]
    fn substituted_text_is_not_rescanned() {
        assert_eq!(run("${TRICKY}").as_deref(), Ok("${HOST}"));
    }

    #[test]
    fn missing_variable_names_it_and_suggests_a_default() {
        let err = run("${FASTGPT_URL}").unwrap_err();
        assert_eq!(
            err,
            vec![
                "environment variable FASTGPT_URL is not set (give a default with ${FASTGPT_URL:-...})"
            ]
        );
    }

    #[test]
    fn every_problem_in_a_value_is_reported() {
        let err = run("${A}-${B}").unwrap_err();
        assert_eq!(err.len(), 2);
        assert!(err[0].contains(" A "), "{err:?}");
        assert!(err[1].contains(" B "), "{err:?}");
    }

    #[test]
    fn unterminated_reference_is_a_problem() {
        let err = run("http://${HOST").unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(err[0].starts_with("unterminated \"${\""), "{err:?}");
    }

    #[test]
    fn bad_names_and_syntax_are_problems() {
        for text in ["${}", "${1X}", "${A-B}", "${A:B}", "${ A }", "${é}"] {
            let err = run(text).unwrap_err();
            assert_eq!(err.len(), 1, "{text}: {err:?}");
        }
        assert!(run("${1X}").unwrap_err()[0].contains("invalid environment variable name \"1X\""));
        assert!(run("${A:B}").unwrap_err()[0].contains("expected ${NAME}"));
    }
}
