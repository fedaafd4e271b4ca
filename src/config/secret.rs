//! [`Secret`]: a configured value that is a credential (the admin token, the Postgres and
//! Redis URLs, alert sink URLs). Redacting by searching text leaks through spellings nobody
//! thought of (`password = x`, `?pass%77ord=x`, quoted values), so the value is kept in a
//! type that cannot print it: `Debug`, `Display` and `Serialize` write `[redacted]`, so a
//! secret field added to a config type is redacted in `/admin/config` without anyone
//! thinking of it. The one way to the value is [`Secret::expose`], called where it is used
//! (connecting, comparing) and by the `*_shown` functions below, which show what of a URL
//! is not the credential.

use std::fmt;
use std::str::FromStr;

use bb8_postgres::tokio_postgres;
use serde::{Serialize, Serializer};
use serde_json::{Value, json};
use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};

use super::postgres_url_for_driver;

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

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// A libpq URL or key=value string, read by tokio-postgres' own parser (the one that
/// connects), shown field by field with the password left out. Searching the text for
/// `password=` misses `password = x`, `'quoted values'`, `\'` escapes and `?pass%77ord=x`;
/// the parser does not. A value that does not parse is shown as `[redacted]` whole.
fn postgres_shown(url: &Secret<String>) -> Value {
    let driver = postgres_url_for_driver(url.expose());
    let Ok(c) = tokio_postgres::Config::from_str(&driver) else {
        return json!(REDACTED);
    };
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    json!({
        "hosts": hosts,
        "hostaddrs": c.get_hostaddrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ports": c.get_ports(),
        "dbname": c.get_dbname(),
        "user": c.get_user(),
        "password": c.get_password().map(|_| REDACTED),
        "application_name": c.get_application_name(),
        "sslmode": match c.get_ssl_mode() {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            // rampart's require verifies the certificate and the name (verify-full).
            _ => "require",
        },
        "target_session_attrs": match c.get_target_session_attrs() {
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            _ => "any",
        },
        "connect_timeout": c
            .get_connect_timeout()
            .map(|t| humantime::format_duration(*t).to_string()),
    })
}

/// [`postgres_shown`], [`redis_url_shown`] and [`sink_url_shown`] as the `serialize_with`
/// of the fields they show: those fields show more than `[redacted]`.
pub(crate) fn postgres_url<S: Serializer>(url: &Secret<String>, s: S) -> Result<S::Ok, S::Error> {
    postgres_shown(url).serialize(s)
}

pub(crate) fn redis_url<S: Serializer>(url: &Secret<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redis_url_shown(url))
}

pub(crate) fn sink_url<S: Serializer>(url: &Secret<http::Uri>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&sink_url_shown(url))
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

    /// Every way libpq's grammar (as tokio-postgres reads it) can carry a password; each
    /// secret holds "zq", which nothing else in these strings does.
    const SPELLINGS: &[&str] = &[
        "host=db user=app password=zqsecret1 dbname=app",
        "host=db user=app password = zqsecret2 dbname=app",
        "host=db user=app password= zqsecret2b dbname=app",
        "host=db password='zq secret3' user=app",
        r"host=db password='zq\'sec\\ret4' user=app",
        r"host=db password=zq\ sec\'ret5 user=app",
        "host=db\tpassword=\tzqsecret6\nuser=app",
        "password=zqsecret7 host=db",
        "host=db password=zqfirst8 password=zqsecond8 user=app",
        "host=db1,db2 port=5432,5433 password=zqsecret9 dbname=app",
        "postgres://app:zqsecret10@db:5432/app",
        "postgresql://app:zq%20secret11@db/app",
        "postgres://app:zq%3Asec%40ret12@db/app",
        "postgres://app@db/app?password=zqsecret13",
        "postgres://db/app?pass%77ord=zqsecret14&user=app",
        "postgres://db/app?%70%61ssword=zqsecret15&user=app",
        "postgres://db/app?password=zq%26secret16&user=app",
        "postgres://app:zqfirst17@db/app?password=zqsecond17",
        "postgres://app:zqsecret18@db1:5432,db2:5433/app?target_session_attrs=read-write",
        "postgres://app:zqsecret19@[::1]:5432/app?sslmode=require",
        "postgres://app:zq:secret20@db/app",
    ];

    #[test]
    fn postgres_passwords_never_show_in_any_spelling() {
        for url in SPELLINGS {
            // A spelling rampart really runs with: validation (the driver's parser) takes it.
            let yaml = "listeners: [{ name: m, listen: \"127.0.0.1:0\", routes: [{ upstream: u }] }]\n\
                        upstreams: { u: { endpoints: [\"http://127.0.0.1:1\"] } }\n\
                        dependencies: { postgres: { url: \"${PG}\" } }\n";
            let c = crate::config::parse_str(yaml, "t.yaml", &|v| {
                (v == "PG").then(|| (*url).to_owned())
            })
            .unwrap_or_else(|e| panic!("{url}: {e}"));
            let pg = c.dependencies.postgres.as_ref().unwrap();
            let shown = postgres_shown(&pg.url);
            let whole = serde_json::to_value(&c).unwrap().to_string();
            let debug = format!("{c:?}");
            for text in [&shown.to_string(), &whole, &debug] {
                assert!(!text.contains("zq"), "{url} leaks: {text}");
                assert!(!text.contains("secret"), "{url} leaks: {text}");
            }
            assert_eq!(shown["password"], REDACTED, "{url}: {shown}");
            let hosts = shown["hosts"].to_string();
            assert!(
                hosts.contains("db") || hosts.contains("::1"),
                "{url}: {shown}"
            );
        }
        let multi = postgres_shown(&Secret::new(SPELLINGS[18].to_owned()));
        assert_eq!(multi["hosts"], json!(["db1", "db2"]));
        assert_eq!(multi["ports"], json!([5432, 5433]));
        assert_eq!(multi["target_session_attrs"], "read-write");
        assert_eq!(
            (multi["user"].as_str(), multi["dbname"].as_str()),
            (Some("app"), Some("app"))
        );
        // No password: nothing to hide, and nothing said.
        let plain = postgres_shown(&Secret::new("postgres://app@db/app".to_owned()));
        assert_eq!(plain["password"], Value::Null);
        // What does not parse is not shown at all.
        for bad in [
            "host=db password='zq unterminated",
            "postgres://db/app?zq=1",
        ] {
            assert_eq!(
                postgres_shown(&Secret::new(bad.to_owned())),
                json!(REDACTED)
            );
        }
    }

    #[test]
    fn formatting_never_shows_the_value() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:#?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&s)), "Some([redacted])");
        assert_eq!(serde_json::to_value(&s).unwrap(), "[redacted]");
        assert_eq!(serde_json::to_value(Some(&s)).unwrap(), "[redacted]");
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
