//! What a check reports: a status with details, cached in a slot that `/health`, `/readyz`
//! and the metrics read without waiting on the check.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Healthy,
    /// Passing with a warning (memory or connections above their threshold), or a
    /// non-critical check failing (only in the aggregate).
    Degraded,
    Unhealthy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }

    /// The gauge value: 2 healthy, 1 degraded, 0 unhealthy.
    pub fn as_gauge(self) -> i64 {
        match self {
            Status::Healthy => 2,
            Status::Degraded => 1,
            Status::Unhealthy => 0,
        }
    }
}

/// A value in a check's JSON report.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    /// Written with one decimal.
    Num(f64),
    Bool(bool),
    Object(Vec<(String, Value)>),
}

/// What one probe found.
#[derive(Debug, Clone, Default)]
pub(crate) struct Probe {
    pub ok: bool,
    /// Passing but above a warning threshold: the check reads degraded.
    pub warning: Option<String>,
    pub error: Option<String>,
    /// No connection could be made, and at once (refused, most often; not a timeout):
    /// nothing reached the probed thing, so probing it again soon costs it nothing.
    pub refused: bool,
    /// Check-specific fields (role, connections_used_pct, ...).
    pub details: Vec<(&'static str, Value)>,
}

impl Probe {
    pub(crate) fn failed(error: impl Into<String>) -> Probe {
        Probe {
            ok: false,
            error: Some(error.into()),
            ..Probe::default()
        }
    }
}

/// The cached state of one probed thing: what `/health` shows.
#[derive(Debug, Clone)]
pub struct View {
    pub verdict: Verdict,
    pub status: Status,
    pub latency: Option<Duration>,
    /// Why the last probe failed (shown while it keeps failing), or the warning.
    pub error: Option<String>,
    pub details: Vec<(&'static str, Value)>,
    pub checked_at: Option<Instant>,
    /// Consecutive failed probes.
    pub failures: u32,
}

impl View {
    pub(super) fn pending() -> View {
        View {
            verdict: Verdict::Unknown,
            status: Status::Unhealthy,
            latency: None,
            error: Some("not checked yet".into()),
            details: Vec::new(),
            checked_at: None,
            failures: 0,
        }
    }
}

pub(crate) type Slot = Arc<ArcSwap<View>>;

pub(super) fn new_slot() -> Slot {
    Arc::new(ArcSwap::from_pointee(View::pending()))
}

/// One named check (`postgres`, `redis`, `memory`, `upstream:<name>`) and its cached
/// results: one slot, or one per endpoint for an upstream.
#[derive(Debug)]
pub struct Check {
    pub name: String,
    pub critical: bool,
    pub slots: Vec<(String, Slot)>,
}

impl Check {
    /// The check's own status: an upstream is healthy when every endpoint is, degraded
    /// when some are, unhealthy when none is.
    pub fn status(&self) -> Status {
        let statuses: Vec<Status> = self.slots.iter().map(|(_, s)| s.load().status).collect();
        aggregate::combine_endpoints(&statuses)
    }
}
