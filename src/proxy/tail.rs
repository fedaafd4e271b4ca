//! What a request still owes when its response body ends: the access-log line, the
//! breaker's verdict (a stream that dies mid-way is a failure, a client that leaves is not),
//! and the in-flight slots it holds. Attached to the response body so all of it happens when
//! the body is really done, not when the headers went out.

use crate::breaker::Outcome;
use crate::proxy::access_log::AccessRecord;
use crate::proxy::body::BodyError;
use crate::proxy::resilience::{BreakerTicket, InFlight};

#[derive(Default)]
pub struct Tail {
    pub log: Option<AccessRecord>,
    pub ticket: Option<BreakerTicket>,
    pub listener_slot: Option<InFlight>,
    pub upstream_slot: Option<InFlight>,
    pub endpoint_slot: Option<InFlight>,
    /// `RateLimit-*` headers for whatever answer the route gives (set by the rate limit).
    pub rate_limit_headers: Option<http::HeaderMap>,
}

impl Tail {
    pub fn on_data(&mut self, n: usize) {
        if let Some(log) = &mut self.log {
            log.bytes_out += n as u64;
        }
    }

    pub fn on_complete(&mut self) {
        if let Some(log) = &mut self.log {
            log.body_complete();
        }
        if let Some(t) = &mut self.ticket {
            t.report(Outcome::Success);
        }
    }

    pub fn on_error(&mut self, err: &BodyError) {
        if let Some(log) = &mut self.log {
            log.body_failed(err);
        }
        // Silence or a reset in the middle of a stream: the upstream failed.
        if let Some(t) = &mut self.ticket {
            t.report(Outcome::Failure);
        }
    }
}
