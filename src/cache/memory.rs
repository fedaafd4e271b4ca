#![allow(dead_code, unused)]
use super::entry::Entry;
use std::sync::Arc;
#[derive(Debug)]
pub(crate) struct MemoryTier;
impl MemoryTier {
    pub(crate) fn new(max_bytes: u64) -> MemoryTier {
        MemoryTier
    }
    pub(crate) fn get(&self, key: &str, now_ms: u64) -> Option<Arc<Entry>> {
        None
    }
    pub(crate) fn put(&self, entry: Arc<Entry>) {}
    pub(crate) fn remove_if(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        0
    }
    pub(crate) fn sweep(&self, now_ms: u64) -> usize {
        0
    }
    pub(crate) fn bytes(&self) -> u64 {
        0
    }
    pub(crate) fn len(&self) -> usize {
        0
    }
    pub(crate) fn max_bytes(&self) -> u64 {
        0
    }
}
