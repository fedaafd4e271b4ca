//! What a request still owes when its response body ends: the access-log line, the
//! request metrics, the breaker's verdict (a stream that dies mid-way is a failure, a client
//! that leaves is not), and the in-flight slots it holds. Attached to the response body so
//! all of it happens when the body is really done, not when the headers went out.

use std::sync::Arc;

use tokio::time::Instant;

use crate::admission::ratelimit::Hold;
use crate::body::BodyError;
use crate::observe::access_log::AccessRecord;
use crate::observe::http::{RouteMetrics, StreamEnd, UpstreamErrorKind};
use crate::stream::usage::{Usage, UsageMeter};
use crate::upstream::breaker::Outcome;
use crate::upstream::resilience::{BreakerTicket, InFlight};

/// `repr(C)`, hot fields first: what every chunk of a long stream touches (`on_data`) sits
/// in the allocation's first line, not spread over its ~550 bytes.
#[derive(Default)]
#[repr(C)]
pub(crate) struct Tail {
    /// Reads the token counts of a JSON answer as its body passes (`stream::usage`; an
    /// event stream's are read by its guard, `stream::events`).
    pub meter: Option<Box<UsageMeter>>,
    /// The route's cache: what the lookup found, and the answer being stored as it passes.
    pub cache: Option<Box<crate::cache::Exchange>>,
    /// Body bytes handed on; added to the log's and the metrics' counts when the tail is
    /// dropped (before they are).
    sent: u64,
    /// Boxed: most requests are not logged, and the record is larger than all the rest.
    pub log: Option<Box<AccessRecord>>,
    pub obs: Option<Observed>,
    pub ticket: Option<BreakerTicket>,
    pub listener_slot: Option<InFlight>,
    pub upstream_slot: Option<InFlight>,
    pub endpoint_slot: Option<InFlight>,
    /// `RateLimit-*` headers for whatever answer the route gives (set by the rate limit).
    pub rate_limit_headers: Option<crate::admission::ratelimit::RateLimitHeaders>,
    /// What the request owes its rate-limit policies until the exchange ends: its
    /// `max_streams` permits, given back when the tail is dropped (body done, client gone,
    /// timeout, drain), and the `cost: tokens` policies [`Tail::tokens_used`] charges.
    pub rate_limit_hold: Hold,
}

impl Drop for Tail {
    fn drop(&mut self) {
        if let Some(log) = &mut self.log {
            log.bytes_out += self.sent;
        }
        if let Some(o) = &mut self.obs {
            o.bytes_out += self.sent;
        }
    }
}

/// What the request metrics record when the exchange ends.
pub(crate) struct Observed {
    pub start: Instant,
    /// The route's handles (the listener's unrouted ones when no route took it).
    pub route: Arc<RouteMetrics>,
    pub method: usize,
    pub status: u16,
    /// An event stream: counted active since its first byte.
    pub stream: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Observed {
    pub(crate) fn new(start: Instant, route: Arc<RouteMetrics>, method: usize) -> Self {
        Observed {
            start,
            route,
            method,
            status: 0,
            stream: false,
            bytes_in: 0,
            bytes_out: 0,
        }
    }
}

impl Tail {
    /// The tokens the exchange used (prompt + completion, from the response), charged to
    /// the key of every `cost: tokens` policy the request passed: at once in memory, by a
    /// task of its own in Redis. Each call charges what it is given: call it once per
    /// usage report.
    pub(crate) fn tokens_used(&mut self, prompt: u64, completion: u64) {
        self.rate_limit_hold
            .tokens_used(prompt.saturating_add(completion));
    }

    pub(crate) fn on_data(&mut self, data: &[u8]) {
        let n = data.len();
        if let Some(m) = &mut self.meter {
            m.feed(data);
        }
        if let Some(c) = &mut self.cache {
            c.data(data);
        }
        self.sent += n as u64;
    }

    /// The answer's token counts, once its body is over however it ended (tokens spent
    /// before a failure were spent): the metric, the access log, the `cost: tokens`
    /// policies. Once.
    fn settle_usage(&mut self) {
        if let Some(usage) = self.meter.take().and_then(|m| m.usage()) {
            self.record_usage(usage);
        }
    }

    /// An answer's token counts: the metric, the access log, the `cost: tokens` policies.
    pub(crate) fn record_usage(&mut self, usage: Usage) {
        if let Some(o) = &self.obs {
            o.route.tokens(&usage);
        }
        if let Some(log) = &mut self.log {
            log.usage = Some(usage);
        }
        self.tokens_used(usage.prompt, usage.completion);
    }

    pub(crate) fn on_complete(&mut self) {
        self.settle_usage();
        if let Some(c) = &mut self.cache {
            c.complete();
        }
        if let Some(log) = &mut self.log {
            log.body_complete();
        }
        if let Some(t) = &mut self.ticket {
            t.report(Outcome::Success);
        }
    }

    pub(crate) fn on_error(&mut self, err: &BodyError) {
        self.settle_usage();
        if let Some(log) = &mut self.log {
            log.body_failed(err);
        }
        if let Some(o) = &self.obs {
            o.route.upstream_error(match err {
                BodyError::Idle => UpstreamErrorKind::IdleTimeout,
                BodyError::Total => UpstreamErrorKind::TotalTimeout,
                _ => UpstreamErrorKind::Reset,
            });
        }
        // Silence or a reset in the middle of a stream: the upstream failed.
        if let Some(t) = &mut self.ticket {
            t.report(Outcome::Failure);
        }
    }
}

impl Tail {
    /// An event stream carried an in-band error event: the upstream failed though it
    /// answered 200 (the first verdict counts; the stream goes on).
    pub(crate) fn on_in_band_error(&mut self) {
        if let Some(t) = &mut self.ticket {
            t.report(Outcome::Failure);
        }
    }

    /// An event stream ended (`stream::events`): early ends reached the client as a final
    /// event, so the body itself did not fail.
    pub(crate) fn on_stream_end(&mut self, how: StreamEnd) {
        let (failure, kind) = match how {
            StreamEnd::Complete | StreamEnd::InBandError => {
                self.on_complete();
                if let (StreamEnd::InBandError, Some(log)) = (how, &mut self.log) {
                    log.stream_ended(how);
                }
                return;
            }
            // Told elsewhere (the drain marks the log; a client gone is the tail's drop).
            StreamEnd::ClientGone | StreamEnd::Drain => return,
            StreamEnd::FirstEventTimeout | StreamEnd::Stalled => {
                (true, UpstreamErrorKind::IdleTimeout)
            }
            // rampart's own limit on a stream that was still flowing: not the upstream's
            // failure.
            StreamEnd::MaxDuration => (false, UpstreamErrorKind::TotalTimeout),
            StreamEnd::UpstreamError => (true, UpstreamErrorKind::Reset),
        };
        self.settle_usage();
        if let Some(log) = &mut self.log {
            log.stream_ended(how);
        }
        if let Some(o) = &self.obs {
            o.route.upstream_error(kind);
        }
        if let Some(t) = &mut self.ticket {
            t.report(if failure {
                Outcome::Failure
            } else {
                Outcome::Ignored
            });
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let elapsed = crate::clock::now().saturating_duration_since(self.start);
        let duration = if self.stream {
            // Its latency was recorded at the first byte.
            self.route.stream_ended(elapsed);
            None
        } else {
            Some(elapsed)
        };
        // No status: the client left before the answer (nginx's 499), not a server error.
        let status = if self.status == 0 { 499 } else { self.status };
        self.route
            .finished(self.method, status, duration, self.bytes_in, self.bytes_out);
    }
}
