//! HTTP/1.1 to the upstreams: one connection, one exchange at a time, driven by the
//! request's own task.
//!
//! hyper's client connection hands every request to a dispatcher through a channel, gets
//! the response back through another, and runs a generic state machine in between: about a
//! fifth of rampart's instructions per proxied request. A proxy needs much less: write the
//! head, stream the body, read the response head, stream the response body. Here that is
//! done straight on the socket, and header values and body chunks are slices of the one
//! read buffer, not copies. Upgrades (101) still go through hyper (`pool::exchange_upgrade`).
//!
//! Responses are read as RFC 9112 says, as strictly as hyper's client: a final response
//! after any 1xx; no body for HEAD, 204 and 304; chunked when the last transfer coding is
//! chunked (refused if Content-Length came too, as nginx and Envoy do); otherwise
//! Content-Length (all values must agree); otherwise until the upstream closes. Anything
//! else is an invalid response, answered 502 before the head or as a cut stream after it.
//!
//! The parts, in the order an exchange meets them: `encode` writes the request, `reader`
//! holds the read buffer and walks the body's framing, `head` parses the response head,
//! and `conn` is the state machine that drives one exchange over a socket.

mod conn;
mod encode;
mod head;
mod reader;
#[cfg(test)]
mod testing;

use crate::body::BodyError;

pub(crate) use crate::body::WireError;
// The pool, the forwarder and the fuzz targets name these by `client::…`.
pub(crate) use conn::{Conn, exchange};
pub(crate) use head::{Head, MAX_HEAD, MAX_HEADERS};
pub(crate) use reader::{Reader, Snapshot, Step, parse_chunk_size};

/// Why an exchange failed: the connection, or the client's own request body.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("request body: {0}")]
    RequestBody(BodyError),
}
