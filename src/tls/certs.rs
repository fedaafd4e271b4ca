//! Loading certificate/key pairs and choosing one per handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// A certificate chain and its private key, checked against each other.
#[derive(Debug)]
pub(crate) struct LoadedPair {
    pub key: Arc<CertifiedKey>,
    /// The leaf's subjectAltName DNS names, lowercased (`*.example.com` kept as written).
    pub names: Vec<String>,
    /// Where the pair was read from.
    pub paths: PairPaths,
}

impl LoadedPair {
    /// The leaf certificate, DER (its expiry is for the metrics).
    pub(crate) fn leaf(&self) -> &CertificateDer<'static> {
        // `load_pair` refuses an empty chain.
        &self.key.cert[0]
    }
}

/// A certificate file and its key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PairPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One served leaf certificate, for the metrics.
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    /// The certificate file.
    pub cert: PathBuf,
    pub names: Vec<String>,
    /// For the certificate expiry metrics.
    pub der: CertificateDer<'static>,
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Which file of a pair a problem is in (the configuration check reports it at that key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PairFile {
    Cert,
    /// Also a key that is not the certificate's.
    Key,
}

/// Reads the chain in `cert` (leaf first) and the private key in `key`, and checks that
/// the key is the leaf's. The messages name the file and say what is wrong with it.
pub(crate) fn load_pair(cert: &Path, key: &Path) -> Result<LoadedPair, String> {
    load_pair_detailed(cert, key).map_err(|(_, e)| e)
}

/// [`load_pair`], saying which file the problem is in.
pub(crate) fn load_pair_detailed(
    cert: &Path,
    key: &Path,
) -> Result<LoadedPair, (PairFile, String)> {
    let in_cert = |e: String| (PairFile::Cert, e);
    let in_key = |e: String| (PairFile::Key, e);
    let cert_pem =
        std::fs::read(cert).map_err(|e| in_cert(format!("cannot read {}: {e}", cert.display())))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| in_cert(format!("{}: bad PEM: {e}", cert.display())))?;
    let Some(leaf) = chain.first() else {
        return Err(in_cert(format!("{}: no certificate in it", cert.display())));
    };
    let names = dns_names(leaf).map_err(|e| in_cert(format!("{}: {e}", cert.display())))?;
    let key_pem =
        std::fs::read(key).map_err(|e| in_key(format!("cannot read {}: {e}", key.display())))?;
    let private = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(in_key(format!("{}: no private key in it", key.display())));
        }
        Err(e) => return Err(in_key(format!("{}: bad PEM: {e}", key.display()))),
    };
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| in_key(format!("{}: unusable private key: {e}", key.display())))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(in_key(format!(
                "{} is not the private key of the certificate in {}",
                key.display(),
                cert.display()
            )));
        }
        Err(e) => return Err(in_cert(format!("{}: {e}", cert.display()))),
    }
    Ok(LoadedPair {
        key: Arc::new(certified),
        names,
        paths: PairPaths {
            cert: cert.to_owned(),
            key: key.to_owned(),
        },
    })
}

/// The leaf's subjectAltName DNS names, lowercased.
fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("bad certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The CA certificates client certificates must chain to (`client_ca`).
pub(crate) fn load_client_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: bad CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(roots)
}

/// The pairs a listener serves. rustls asks it for a certificate at every handshake; a
/// reload swaps the whole list at once, so a handshake sees the old pairs or the new ones.
#[derive(Debug)]
pub(crate) struct CertStore {
    paths: Vec<PairPaths>,
    pairs: ArcSwap<Vec<LoadedPair>>,
}

impl CertStore {
    /// Loads every pair; the first is the default (no SNI, or no name matches).
    pub(crate) fn load(paths: Vec<PairPaths>) -> Result<CertStore, String> {
        let pairs = load_all(&paths)?;
        Ok(CertStore {
            paths,
            pairs: ArcSwap::from_pointee(pairs),
        })
    }

    /// Reads the same files again. All or nothing: on any error the pairs served so far
    /// stay, and the error says which file and why.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let pairs = load_all(&self.paths)?;
        self.pairs.store(Arc::new(pairs));
        Ok(())
    }

    /// The leaf certificates served now, in configuration order.
    pub(crate) fn leaves(&self) -> Vec<Leaf> {
        self.pairs
            .load()
            .iter()
            .map(|p| Leaf {
                cert: p.paths.cert.clone(),
                names: p.names.clone(),
                der: p.leaf().clone(),
            })
            .collect()
    }

    /// The pair for `sni`: an exact SAN match first, then a wildcard covering one label,
    /// else the default (as nginx does rather than failing the handshake).
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let pairs = self.pairs.load();
        let chosen = sni
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|name| {
                let exact = pairs.iter().find(|p| p.names.contains(&name));
                exact.or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    pairs.iter().find(|p| {
                        p.names
                            .iter()
                            .any(|n| n.strip_prefix("*.").is_some_and(|w| w == parent))
                    })
                })
            })
            .or_else(|| pairs.first());
        chosen.map(|p| p.key.clone())
    }
}

fn load_all(paths: &[PairPaths]) -> Result<Vec<LoadedPair>, String> {
    if paths.is_empty() {
        return Err("no certificate configured".into());
    }
    paths.iter().map(|p| load_pair(&p.cert, &p.key)).collect()
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(test: &str) -> Files {
            let dir =
                std::env::temp_dir().join(format!("rampart-tls-{test}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Files { dir }
        }

        /// A self-signed pair for `names`, written as `<stem>.crt` / `<stem>.key`.
        fn pair(&self, stem: &str, names: &[&str]) -> PairPaths {
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            let c = rcgen::generate_simple_self_signed(names).unwrap();
            let paths = PairPaths {
                cert: self.dir.join(format!("{stem}.crt")),
                key: self.dir.join(format!("{stem}.key")),
            };
            std::fs::write(&paths.cert, c.cert.pem()).unwrap();
            std::fs::write(&paths.key, c.signing_key.serialize_pem()).unwrap();
            paths
        }
    }

    fn names_of(store: &CertStore, sni: Option<&str>) -> Vec<String> {
        let key = store.pick(sni).unwrap();
        dns_names(&key.cert[0]).unwrap()
    }

    #[test]
    fn sni_picks_exact_then_one_label_wildcard_then_the_default() {
        let f = Files::new("pick");
        let store = CertStore::load(vec![
            f.pair("default", &["default.test"]),
            f.pair("wild", &["*.example.com"]),
            f.pair("exact", &["api.example.com"]),
        ])
        .unwrap();
        assert_eq!(
            names_of(&store, Some("API.Example.com")),
            ["api.example.com"]
        );
        assert_eq!(names_of(&store, Some("www.example.com")), ["*.example.com"]);
        // A wildcard covers exactly one label.
        assert_eq!(names_of(&store, Some("a.b.example.com")), ["default.test"]);
        assert_eq!(names_of(&store, Some("example.com")), ["default.test"]);
        assert_eq!(names_of(&store, None), ["default.test"]);
        assert_eq!(names_of(&store, Some("other.test")), ["default.test"]);
    }

    #[test]
    fn a_mismatched_pair_an_empty_file_and_a_missing_key_are_refused() {
        let f = Files::new("refuse");
        let a = f.pair("a", &["a.test"]);
        let b = f.pair("b", &["b.test"]);
        let e = load_pair(&a.cert, &b.key).unwrap_err();
        assert!(e.contains("is not the private key"), "{e}");
        let empty = f.dir.join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let e = load_pair(&empty, &a.key).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        let e = load_pair(&a.cert, &empty).unwrap_err();
        assert!(e.contains("no private key"), "{e}");
        let e = load_pair(&f.dir.join("absent.crt"), &a.key).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
        // The certificate file is not a key file.
        let e = load_pair(&a.cert, &a.cert).unwrap_err();
        assert!(e.contains("no private key"), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_pairs_served() {
        let f = Files::new("reload");
        let a = f.pair("a", &["a.test"]);
        let store = CertStore::load(vec![a.clone()]).unwrap();
        let before = store.leaves()[0].der.clone();
        // The key of another certificate.
        let other = f.pair("other", &["other.test"]);
        std::fs::copy(&other.key, &a.key).unwrap();
        assert!(store.reload().is_err());
        assert_eq!(store.leaves()[0].der, before);
        // A good new pair at the same paths.
        std::fs::copy(&other.cert, &a.cert).unwrap();
        store.reload().unwrap();
        assert_eq!(store.leaves()[0].names, ["other.test"]);
    }
}
