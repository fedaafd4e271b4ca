//! [`Secret`]: a configured value that is a credential (the admin token, the Postgres and
//! Redis URLs, alert sink URLs). Redacting by searching text leaks through spellings nobody
//! thought of (`password = x`, `?pass%77ord=x`, quoted values), so the value is kept in a
//! type that cannot print it: `Debug` and `Display` write `[redacted]`, and it implements
//! no `Serialize`, so `json!` and friends refuse it at compile time. The one way to the
//! value is [`Secret::expose`], called where it is used (connecting, comparing), never
//! where something is formatted.

use std::fmt;

pub const REDACTED: &str = "[redacted]";

#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The value itself: to connect or compare with, never to print.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A Redis URL as it may be shown: parsed by the Redis client's own parser, with the
/// host, port, database and user, and the password replaced. `[redacted]` as a whole when
/// it does not parse.
pub fn redis_url_shown(url: &Secret<String>) -> String {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let Ok(info) = url.expose().as_str().into_connection_info() else {
        return REDACTED.to_owned();
    };
    let (scheme, host, port) = match info.addr() {
        ConnectionAddr::Tcp(host, port) => ("redis", host.clone(), *port),
        // Only redis:// passes validation; anything else is shown as nothing at all.
        _ => return REDACTED.to_owned(),
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let redis = info.redis_settings();
    let userinfo = match (redis.username(), redis.password()) {
        (Some(user), Some(_)) => format!("{user}:{REDACTED}@"),
        (None, Some(_)) => format!(":{REDACTED}@"),
        (Some(user), None) => format!("{user}@"),
        (None, None) => String::new(),
    };
    format!("{scheme}://{userinfo}{host}:{port}/{}", redis.db())
}

/// An alert sink URL as it may be shown: scheme and host only (webhook URLs carry their
/// secret in the path or query).
pub fn sink_url_shown(u: &Secret<http::Uri>) -> String {
    let u = u.expose();
    format!(
        "{}://{}/{REDACTED}",
        u.scheme_str().unwrap_or("http"),
        u.authority().map(|a| a.host()).unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:#?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&s)), "Some([redacted])");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn redis_urls_keep_everything_but_the_password() {
        let shown = |u: &str| redis_url_shown(&Secret::new(u.to_owned()));
        assert_eq!(
            shown("redis://:hunter2@10.0.0.5:6379/0"),
            "redis://:[redacted]@10.0.0.5:6379/0"
        );
        assert_eq!(
            shown("redis://app:p%40ss@10.0.0.5/3"),
            "redis://app:[redacted]@10.0.0.5:6379/3"
        );
        // The last @ ends the user info, as the client reads it.
        assert_eq!(
            shown("redis://app:p@ss@cache"),
            "redis://app:[redacted]@cache:6379/0"
        );
        assert_eq!(shown("redis://127.0.0.1"), "redis://127.0.0.1:6379/0");
        assert_eq!(shown("redis://[::1]:6380"), "redis://[::1]:6380/0");
        assert_eq!(shown("not a url with hunter2"), "[redacted]");
    }
}
