//! How the config types write their values in `/admin/config` (their `#[derive(Serialize)]`
//! points here with `serialize_with`): durations, rates and shares the way the file takes
//! them ("30s", "500B/s", "80%"), so what an operator reads can be pasted back.

use std::fmt::Display;
use std::time::Duration;

use serde::Serializer;

/// "30s", "1m 30s" (humantime's form, which the file reads back).
pub(crate) fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// A duration the file may turn `off`.
pub(crate) fn duration_or_off<S: Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => duration(d, s),
        None => s.serialize_str("off"),
    }
}

/// A share 0..=1 as the percentage the file takes ("25%").
pub(crate) fn percent<S: Serializer>(share: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{}%", share * 100.0))
}

/// Values without a `Serialize` of their own (URIs), as their text.
pub(crate) fn display_all<T: Display, S: Serializer>(items: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(items.iter().map(ToString::to_string))
}

/// A path shown as text (lossily when it is not UTF-8, rather than refused).
pub(crate) fn path<S: Serializer>(p: &Option<std::path::PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.collect_str(&p.display()),
        None => s.serialize_none(),
    }
}

/// A `tls.ca_file` under its own key, as the file nests it; a path that is not UTF-8 is
/// shown lossily rather than refused.
pub(crate) fn tls_ca_file<S: Serializer>(
    ca_file: &Option<std::path::PathBuf>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(serde::Serialize)]
    struct Tls {
        ca_file: Option<String>,
    }
    serde::Serialize::serialize(
        &Tls {
            ca_file: ca_file.as_ref().map(|p| p.display().to_string()),
        },
        s,
    )
}
