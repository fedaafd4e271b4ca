#![allow(dead_code, unused)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub key: String,
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
    pub stored_at: u64,
    pub fresh_until: u64,
    pub stale_until: u64,
    pub age_at_store: u64,
}
impl Entry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        vec![]
    }
    pub(crate) fn decode(bytes: &[u8]) -> Option<Entry> {
        None
    }
    pub(crate) fn weight(&self) -> usize {
        0
    }
}
