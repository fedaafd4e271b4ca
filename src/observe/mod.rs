//! The one Prometheus registry. Each subsystem has `Metrics::register(&mut Registry) -> Self`
//! (style: linkerd2-proxy) and keeps the handles; the registry is frozen behind an `Arc` once
//! everything registered, and `/metrics` on the admin listener encodes it.
//!
//! Labels are small enums and configured names only: never raw paths, never client IPs.
//!
//! - `certs.rs`: when each loaded TLS certificate expires, computed at scrape time;
//! - `histogram.rs`: the lock-free duration histogram the request path observes into;
//! - `http.rs`: request, stream, byte, connection and upstream-error metrics, with the
//!   per-route handles a `Snapshot` holds;
//! - `series.rs`: the in-memory time series the alert rules and the status page read.

pub(crate) mod access_log;
pub(crate) mod certs;
pub(crate) mod histogram;
pub(crate) mod http;
pub(crate) mod series;
pub(crate) mod sharded;
pub(crate) mod signals;
pub(crate) mod tokens;

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// OpenMetrics text, the format prometheus-client encodes (with `# EOF`).
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry with every metric prefixed `rampart_` and the build info already in it.
pub(crate) fn new_registry() -> Registry {
    let mut registry = Registry::with_prefix("rampart");
    let build = Family::<Vec<(String, String)>, Gauge>::default();
    build
        .get_or_create(&vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )])
        .set(1);
    registry.register("build_info", "rampart build, always 1", build);
    registry
}

pub(crate) fn encode_registry(registry: &Arc<Registry>) -> String {
    let mut out = String::new();
    // Encoding into a String cannot fail on I/O; an error would mean a broken metric.
    if let Err(e) = encode(&mut out, registry) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_is_exported_with_the_prefix() {
        let text = encode_registry(&Arc::new(new_registry()));
        assert!(text.contains("rampart_build_info{version=\""), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
