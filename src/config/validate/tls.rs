//! `listeners[].tls`: the certificate/key pairs a listener serves, its client CA and its
//! handshake timeout. The files are read here, with the code the listener reads them with
//! (`crate::tls`), so that `rampart check` refuses a pair the listener could not serve.

use std::path::PathBuf;
use std::time::Duration;

use super::reader::{Ctx, Field, MapReader};
use crate::config::{ListenerTls, TlsPair};
use crate::tls::{PairFile, load_client_roots, load_pair_detailed};

/// Far above any real handshake; a client that has not finished one by then is not coming.
pub(super) const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);
/// Each look opens and hashes the files: not a busy loop.
const MIN_WATCH: Duration = Duration::from_millis(100);

pub(super) fn listener_tls(ctx: &mut Ctx, f: Option<Field>) -> Option<ListenerTls> {
    let f = f?;
    let at = f.clone();
    let mut m = MapReader::open(ctx, Some(f));
    let cert = m.optional("cert");
    let key = m.optional("key");
    let mut pairs: Vec<(Field, Field)> = Vec::new();
    match (cert, key) {
        (Some(c), Some(k)) => pairs.push((c, k)),
        (Some(_), None) => ctx.report(at.pos(), &at.path, "\"cert\" needs \"key\" with it"),
        (None, Some(_)) => ctx.report(at.pos(), &at.path, "\"key\" needs \"cert\" with it"),
        (None, None) => {}
    }
    let default_given = !pairs.is_empty();
    if let Some(list) = m.optional("certificates")
        && let Some(items) = ctx.list(&list, "a list of {cert, key}")
    {
        for item in items {
            let mut p = MapReader::open(ctx, Some(item));
            let c = p.required(ctx, "cert");
            let k = p.required(ctx, "key");
            p.finish(ctx);
            if let Some(pair) = c.zip(k) {
                pairs.push(pair);
            }
        }
    }
    let client_ca = m.optional("client_ca").and_then(|f| {
        let path = PathBuf::from(ctx.text(&f, "a file path")?);
        match load_client_roots(&path) {
            Ok(_) => Some(path),
            Err(e) => {
                ctx.report(f.pos(), &f.path, e);
                None
            }
        }
    });
    let handshake_timeout = m
        .read(ctx, "handshake_timeout", |ctx, f| {
            ctx.duration_at_most(f, MAX_HANDSHAKE_TIMEOUT)
        })
        .unwrap_or(ListenerTls::DEFAULT_HANDSHAKE_TIMEOUT);
    let watch = m
        .read(ctx, "watch", |ctx, f| {
            let w = ctx.duration_or_off(f)?;
            if w.is_some_and(|d| d < MIN_WATCH) {
                ctx.report(f.pos(), &f.path, "must be at least 100ms, or off");
                return None;
            }
            Some(w)
        })
        .unwrap_or(Some(ListenerTls::DEFAULT_WATCH));
    m.finish(ctx);
    if pairs.is_empty() {
        ctx.report(
            at.pos(),
            &at.path,
            "needs a certificate: \"cert\" and \"key\", or \"certificates\"",
        );
        return None;
    }
    let mut loaded = Vec::new();
    for (c, k) in &pairs {
        let (Some(cert), Some(key)) = (ctx.text(c, "a file path"), ctx.text(k, "a file path"))
        else {
            continue;
        };
        let pair = TlsPair {
            cert: cert.into(),
            key: key.into(),
        };
        match load_pair_detailed(&pair.cert, &pair.key) {
            Ok(_) => loaded.push(pair),
            Err((PairFile::Cert, e)) => ctx.report(c.pos(), &c.path, e),
            Err((PairFile::Key, e)) => ctx.report(k.pos(), &k.path, e),
        }
    }
    if loaded.len() != pairs.len() {
        return None;
    }
    let (cert, key, certificates) = if default_given {
        let first = loaded.remove(0);
        (Some(first.cert), Some(first.key), loaded)
    } else {
        (None, None, loaded)
    };
    Some(ListenerTls {
        cert,
        key,
        certificates,
        client_ca,
        handshake_timeout,
        watch,
    })
}
