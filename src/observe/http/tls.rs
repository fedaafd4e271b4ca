//! `rampart_tls_*` counters of the TLS listeners (the certificates' expiry is
//! `observe::certs`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsLabels {
    listener: String,
    result: &'static str,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct TlsMetrics {
    handshakes: Family<TlsLabels, Counter>,
    cert_reloads: Family<TlsLabels, Counter>,
}

impl TlsMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "tls_handshakes",
            "TLS handshakes on TLS listeners, by result: ok, timeout, error, plain_http (an HTTP request sent to the TLS port)",
            self.handshakes.clone(),
        );
        registry.register(
            "tls_cert_reloads",
            "Certificate reloads of TLS listeners, by result: ok, error (the certificates served before stay)",
            self.cert_reloads.clone(),
        );
    }

    /// A TLS listener's handshake counter for `result` (ok, timeout, error, plain_http).
    pub(crate) fn handshakes(&self, listener: &str, result: &'static str) -> Counter {
        Self::get(&self.handshakes, listener, result)
    }

    /// A TLS listener's certificate reload counter for `result` (ok, error).
    pub(crate) fn cert_reloads(&self, listener: &str, result: &'static str) -> Counter {
        Self::get(&self.cert_reloads, listener, result)
    }

    fn get(family: &Family<TlsLabels, Counter>, listener: &str, result: &'static str) -> Counter {
        family
            .get_or_create(&TlsLabels {
                listener: listener.to_owned(),
                result,
            })
            .clone()
    }
}
