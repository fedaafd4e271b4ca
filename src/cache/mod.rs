//! HTTP response cache (issue 19): named `caches:` policies routes opt into. A memory tier
//! (LRU, bounded by bytes) in front of a Redis tier the replicas share; RFC 9111 rules for
//! what is stored and for how long; concurrent misses coalesced; stale entries answering
//! for a failing upstream (`stale_if_error`); purges that reach every replica.

pub(crate) mod control;
pub(crate) mod entry;
mod flight;
pub(crate) mod memory;
mod metrics;
mod policy;
mod purge;
mod registry;

pub(crate) use entry::Entry;
pub(crate) use metrics::CacheMetrics;
pub(crate) use policy::{
    Asked, Exchange, Found, Pending, Policy, X_CACHE, XCache, answer_head, not_modified,
};
pub(crate) use purge::Purge;
pub(crate) use registry::Registry;
