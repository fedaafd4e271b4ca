//! rampart's own HTTP/1.1 server side (`listeners[].http1_server: rampart`, the default).
//!
//! Why not hyper's: hyper's server connection allocates an 8 KiB read buffer and an 8 KiB
//! write buffer for every connection's life, plus ~4 KiB of state, whatever the traffic.
//! With 1,000 open SSE streams or keep-alive connections that is most of rampart's memory
//! (issues 16 and 18 measured 24 KiB per stream against nginx's 14). Here buffers are sized
//! by what arrives and freed between exchanges (see `conn`).
//!
//! It reads and frames requests exactly as hyper's server does, and writes answers with the
//! same bytes: `head` parses, `decode` walks a body's framing, `encode` writes the answer's
//! head and framing, `conn` drives a connection, `body` is the request body the pipeline
//! reads, `upgrade` hands the socket over after a 101. hyper's server stays behind the
//! switch (`http1_server: hyper`) as the reference the wire tests compare against.
//!
//! Unlike hyper's, this server sees `Content-Length` next to `Transfer-Encoding` itself, so
//! it needs no byte-level guard (`listener::h1_guard`) in front: it marks such a request
//! ([`ContentLengthAndTransferEncoding`]) for the pipeline to refuse, and closes after.

mod body;
mod conn;
mod decode;
mod encode;
mod head;
mod upgrade;

pub(crate) use body::{Body, BodyError};
pub(crate) use conn::{Connection, Settings};
pub(crate) use encode::{HeadFields, Waits};
pub(crate) use upgrade::{OnUpgrade, Upgraded};

// The fuzz targets drive the parsers on their own.
#[allow(unused_imports, reason = "for the fuzz targets")]
pub(crate) use conn::may_end_head;
#[allow(unused_imports, reason = "for the fuzz targets")]
pub(crate) use decode::{Decoded, Decoder};
#[allow(unused_imports, reason = "for the fuzz targets")]
pub(crate) use head::{Framing, HeadError, parse_head};
// The HTTP/1 guard (hyper's side) reads framing headers the same way.
pub(crate) use head::{digits, is_chunked};

/// In the extensions of a request that had both `Content-Length` and `Transfer-Encoding`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ContentLengthAndTransferEncoding;
