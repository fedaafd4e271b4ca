//! The certificates a TLS listener serves: PEM files read and checked ([`load_pair`]), and
//! the [`CertStore`] rustls asks for a certificate at every handshake (SNI), which a reload
//! swaps without touching open connections.
//!
//! Low in the layering on purpose: the configuration check reads the same files the same
//! way, so a pair `rampart check` accepts is a pair the listener can serve. Depends on
//! rustls and x509-parser only.

mod certs;

pub(crate) use certs::{CertStore, PairFile, PairPaths, load_client_roots, load_pair_detailed};
// For the certificate expiry metrics and the file watcher, which read the served leaves
// (`CertStore::leaves`) and check a pair on their own.
#[allow(unused_imports)]
pub(crate) use certs::{Leaf, LoadedPair, load_pair};
