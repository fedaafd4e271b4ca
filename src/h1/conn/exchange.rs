//! A request made from its parsed head, and the answer's head encoded: the two steps of an
//! exchange that only look at values, kept out of `run`'s async body.
//!
//! Why out: the connection's future holds every local of `run` that lives across an await,
//! and a local that was ever borrowed keeps its room there until its scope ends, even once
//! moved on. The head's parts, the request and the answer's parts are all borrowed while
//! they are read, so written in `run` they took ~1 KiB of every connection's future and
//! were copied into it (cold, with many connections) for every request. Here they live on
//! the stack, and `run` only moves what it keeps.

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode, Version};
use tokio::sync::oneshot;

use super::super::ContentLengthAndTransferEncoding;
use super::super::body::{Body, Source};
use super::super::decode::Decoder;
use super::super::encode::{self, BodyLen};
use super::super::head::{Framing, Parsed, has_token};
use super::super::upgrade::{self, Io, Upgraded};
use super::{ConnError, Settings, Shared};
use crate::sync::lock;

/// What the answer needs to know of its request.
pub(super) struct Asked {
    pub(super) method: Method,
    pub(super) version: Version,
    /// The client allows another request after this one.
    pub(super) keep_alive: bool,
    /// Trailers are sent only to a client that said it takes them (hyper's rule).
    pub(super) te_trailers: bool,
    /// Where the switched connection goes, when the request asked to upgrade.
    pub(super) upgrade_tx: Option<oneshot::Sender<Upgraded>>,
}

/// The service's request for a parsed head, its body reading from the connection.
pub(super) fn request<I: Io>(
    shared: &Arc<Mutex<Shared<I>>>,
    settings: &Settings,
    parsed: Parsed,
) -> (Request<Body>, Asked) {
    let Parsed {
        parts,
        framing,
        keep_alive,
        expect_continue,
        wants_upgrade,
        cl_and_te,
    } = parsed;
    let te_trailers = parts
        .headers
        .get_all(http::header::TE)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"trailers"));
    let body = {
        let mut s = lock(shared);
        s.generation += 1;
        s.answered = false;
        s.decoder = Decoder::new(framing, settings.max_head, settings.max_headers);
        if s.decoder.is_done() {
            Body::empty()
        } else {
            s.cont = expect_continue.then_some(0);
            let remaining = match framing {
                Framing::Length(n) => Some(n),
                Framing::Chunked => None,
            };
            let src: Arc<Mutex<dyn Source>> = shared.clone();
            Body::new(src, s.generation, remaining)
        }
    };
    let method = parts.method.clone();
    let version = parts.version;
    let mut req = Request::from_parts(parts, body);
    if cl_and_te {
        req.extensions_mut()
            .insert(ContentLengthAndTransferEncoding);
    }
    let upgrade_tx = wants_upgrade.then(|| {
        let (tx, on) = upgrade::pending();
        req.extensions_mut().insert(on);
        tx
    });
    let asked = Asked {
        method,
        version,
        keep_alive,
        te_trailers,
        upgrade_tx,
    };
    (req, asked)
}

/// Encodes the answer's head into `wbuf` (emptied first). Gives back the body still to
/// write, how, and whether the connection switches protocols after this head.
pub(super) fn answer<B>(
    wbuf: &mut Vec<u8>,
    resp: Response<B>,
    asked: &Asked,
    keep_alive: bool,
) -> Result<(B, encode::Written, bool), ConnError>
where
    B: http_body::Body + encode::HeadFields,
{
    let (rparts, rbody) = resp.into_parts();
    let status = rparts.status;
    let body_len = if rbody.is_end_stream() {
        BodyLen::Empty
    } else {
        match rbody.size_hint().exact() {
            Some(n) => BodyLen::Known(n),
            None => BodyLen::Unknown,
        }
    };
    let upgrading = asked.upgrade_tx.is_some()
        && (status == StatusCode::SWITCHING_PROTOCOLS
            || (asked.method == Method::CONNECT && status.is_success()));
    wbuf.clear();
    let written = encode::head(
        wbuf,
        status,
        &rparts.headers,
        body_len,
        encode::For {
            reason: rparts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| r.as_bytes()),
            method: &asked.method,
            version: asked.version,
            keep_alive,
            extra: encode::HeadFields::has_head_fields(&rbody)
                .then_some(&rbody as &dyn encode::HeadFields),
        },
    )?;
    Ok((rbody, written, upgrading))
}
