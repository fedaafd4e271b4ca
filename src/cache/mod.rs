//! HTTP response cache: which responses a shared cache may store and for how long
//! (`control`), the stored form of an entry (`entry`), and the per-replica memory tier
//! (`memory`).
// Used by the pipeline next.
#![allow(dead_code)]

pub(crate) mod control;
pub(crate) mod entry;
pub(crate) mod memory;
