//! How an event stream ended: the `reason` label of `rampart_http_streams_ended_total`, and
//! the access log's outcome for streams rampart ended.

/// How an event stream ended (`rampart_http_streams_ended_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// The upstream ended it.
    Complete,
    /// The client left (or was cut for taking no data) first.
    ClientGone,
    FirstEventTimeout,
    /// `between_events`, or the route's `idle`, passed without an event.
    Stalled,
    /// `max_duration`, or the route's `total`.
    MaxDuration,
    /// Ended with a final event at the drain deadline.
    Drain,
    /// The upstream's body failed (reset, bad chunk).
    UpstreamError,
    /// The upstream ended it after an in-band error event.
    InBandError,
}

impl StreamEnd {
    pub(super) const ALL: [StreamEnd; 8] = [
        StreamEnd::Complete,
        StreamEnd::ClientGone,
        StreamEnd::FirstEventTimeout,
        StreamEnd::Stalled,
        StreamEnd::MaxDuration,
        StreamEnd::Drain,
        StreamEnd::UpstreamError,
        StreamEnd::InBandError,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StreamEnd::Complete => "complete",
            StreamEnd::ClientGone => "client_gone",
            StreamEnd::FirstEventTimeout => "first_event_timeout",
            StreamEnd::Stalled => "stalled",
            StreamEnd::MaxDuration => "max_duration",
            StreamEnd::Drain => "drain",
            StreamEnd::UpstreamError => "upstream_error",
            StreamEnd::InBandError => "in_band_error",
        }
    }
}
