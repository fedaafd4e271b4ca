//! The bodies both ways under their timers, what a response still owes when its body ends
//! (`tail`), the final event a drain writes into an event stream, and upgraded tunnels.

pub(crate) mod body;
pub(crate) mod events;
pub(crate) mod finale;
pub(crate) mod sse;
pub(crate) mod tail;
pub(crate) mod upgrade;
pub(crate) mod usage;
