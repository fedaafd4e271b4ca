//! The memory tier: entries by key, bounded by their weight in bytes, the least recently
//! used evicted first. One mutex over all of it: each operation is a few map updates, so
//! one lock is cheaper than sharding would be at the entry counts a replica holds.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use super::entry::Entry;
use crate::sync::lock;

/// Entries in memory, at most `max_bytes` of them by `Entry::weight`.
pub(crate) struct MemoryTier {
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<Arc<str>, Slot>,
    /// Keys by the tick of their last use: the first is the least recently used.
    order: BTreeMap<u64, Arc<str>>,
    /// Increases on every use; u64 does not wrap in practice.
    tick: u64,
    /// The sum of the held entries' weights.
    bytes: u64,
}

struct Slot {
    entry: Arc<Entry>,
    tick: u64,
    weight: u64,
}

impl Inner {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn remove(&mut self, key: &str) -> Option<Slot> {
        let slot = self.slots.remove(key)?;
        self.order.remove(&slot.tick);
        self.bytes -= slot.weight;
        Some(slot)
    }

    /// Removes every entry `pred` picks; how many.
    fn remove_where(&mut self, pred: impl Fn(&Entry) -> bool) -> usize {
        let doomed: Vec<Arc<str>> = self
            .slots
            .iter()
            .filter(|(_, s)| pred(&s.entry))
            .map(|(k, _)| Arc::clone(k))
            .collect();
        for key in &doomed {
            self.remove(key);
        }
        doomed.len()
    }
}

fn weight_of(entry: &Entry) -> u64 {
    u64::try_from(entry.weight()).unwrap_or(u64::MAX)
}

impl MemoryTier {
    pub(crate) fn new(max_bytes: u64) -> MemoryTier {
        MemoryTier {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The entry for `key`, marked as used; None when there is none or it is past its
    /// `stale_until` (then it is removed: an entry lives while `now_ms < stale_until`).
    pub(crate) fn get(&self, key: &str, now_ms: u64) -> Option<Arc<Entry>> {
        let mut inner = lock(&self.inner);
        let (old_tick, expired) = {
            let slot = inner.slots.get(key)?;
            (slot.tick, now_ms >= slot.entry.stale_until)
        };
        if expired {
            inner.remove(key);
            return None;
        }
        let tick = inner.next_tick();
        let shared = inner.order.remove(&old_tick)?;
        inner.order.insert(tick, shared);
        let slot = inner.slots.get_mut(key)?;
        slot.tick = tick;
        Some(Arc::clone(&slot.entry))
    }

    /// Stores `entry` under its key, replacing what was there, then evicts the least
    /// recently used until the total fits. An entry heavier than the bound is not stored,
    /// and an older entry of its key is removed (it is outdated).
    pub(crate) fn put(&self, entry: Arc<Entry>) {
        let weight = weight_of(&entry);
        let mut inner = lock(&self.inner);
        inner.remove(&entry.key);
        if weight > self.max_bytes {
            return;
        }
        let key: Arc<str> = Arc::from(entry.key.as_str());
        let tick = inner.next_tick();
        inner.order.insert(tick, Arc::clone(&key));
        inner.slots.insert(
            key,
            Slot {
                entry,
                tick,
                weight,
            },
        );
        inner.bytes += weight;
        // The new entry has the highest tick and fits alone, so it is never evicted here.
        while inner.bytes > self.max_bytes {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some(slot) = inner.slots.remove(&oldest) {
                inner.bytes -= slot.weight;
            }
        }
    }

    /// Removes every entry `pred` picks (a purge); how many.
    pub(crate) fn remove_if(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        lock(&self.inner).remove_where(pred)
    }

    /// Removes the entries past their `stale_until`; how many.
    pub(crate) fn sweep(&self, now_ms: u64) -> usize {
        lock(&self.inner).remove_where(|e| now_ms >= e.stale_until)
    }

    /// The sum of the held entries' weights.
    pub(crate) fn bytes(&self) -> u64 {
        lock(&self.inner).bytes
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).slots.len()
    }

    pub(crate) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}

impl fmt::Debug for MemoryTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("MemoryTier")
            .field("max_bytes", &self.max_bytes)
            .field("bytes", &inner.bytes)
            .field("len", &inner.slots.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::HeaderMap;
    use proptest::prelude::*;

    use super::*;

    fn entry(key: &str, body: usize, stale_until: u64) -> Arc<Entry> {
        Arc::new(Entry {
            key: key.to_owned(),
            status: 200,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
            stored_at: 0,
            fresh_until: stale_until,
            stale_until,
            age_at_store: 0,
        })
    }

    /// The weight of `entry(key, body, _)`.
    fn w(key: &str, body: usize) -> u64 {
        weight_of(&entry(key, body, 0))
    }

    fn keys(t: &MemoryTier) -> Vec<String> {
        let inner = lock(&t.inner);
        inner.order.values().map(|k| k.to_string()).collect()
    }

    /// The tier's own accounting agrees with what it holds.
    fn check(t: &MemoryTier) {
        let inner = lock(&t.inner);
        let sum: u64 = inner.slots.values().map(|s| weight_of(&s.entry)).sum();
        assert_eq!(inner.bytes, sum);
        assert!(
            inner.bytes <= t.max_bytes,
            "{} > {}",
            inner.bytes,
            t.max_bytes
        );
        assert_eq!(inner.order.len(), inner.slots.len());
        for (tick, key) in &inner.order {
            assert_eq!(inner.slots[key].tick, *tick);
            assert_eq!(&*inner.slots[key].entry.key, &**key);
        }
    }

    #[test]
    fn evicts_the_least_recently_used_and_get_refreshes() {
        let t = MemoryTier::new(3 * w("a", 100));
        for k in ["a", "b", "c"] {
            t.put(entry(k, 100, u64::MAX));
        }
        assert_eq!(keys(&t), ["a", "b", "c"]);
        assert!(t.get("a", 0).is_some());
        assert_eq!(keys(&t), ["b", "c", "a"]);
        t.put(entry("d", 100, u64::MAX));
        assert_eq!(keys(&t), ["c", "a", "d"]);
        assert!(t.get("b", 0).is_none());
        assert_eq!(t.len(), 3);
        assert_eq!(t.bytes(), 3 * w("a", 100));
        check(&t);
    }

    #[test]
    fn a_large_entry_evicts_as_many_as_it_needs() {
        let t = MemoryTier::new(4 * w("a", 100));
        for k in ["a", "b", "c", "d"] {
            t.put(entry(k, 100, u64::MAX));
        }
        t.put(entry("e", 250, u64::MAX));
        assert_eq!(keys(&t), ["c", "d", "e"]);
        check(&t);
    }

    #[test]
    fn replacing_a_key_adjusts_the_bytes() {
        let t = MemoryTier::new(10_000);
        t.put(entry("a", 100, u64::MAX));
        t.put(entry("b", 100, u64::MAX));
        t.put(entry("a", 500, u64::MAX));
        assert_eq!(t.len(), 2);
        assert_eq!(t.bytes(), w("a", 500) + w("b", 100));
        assert_eq!(t.get("a", 0).unwrap().body.len(), 500);
        assert_eq!(keys(&t), ["b", "a"]);
        t.put(entry("a", 10, u64::MAX));
        assert_eq!(t.bytes(), w("a", 10) + w("b", 100));
        check(&t);
    }

    #[test]
    fn an_entry_heavier_than_the_bound_is_refused_and_removes_its_key() {
        let t = MemoryTier::new(w("a", 100));
        t.put(entry("a", 100, u64::MAX));
        assert_eq!(t.bytes(), w("a", 100));
        t.put(entry("a", 101, u64::MAX));
        assert_eq!((t.len(), t.bytes()), (0, 0));
        assert!(t.get("a", 0).is_none());
        t.put(entry("b", 100, u64::MAX));
        t.put(entry("c", 1000, u64::MAX));
        assert_eq!(keys(&t), ["b"]);
        check(&t);
    }

    #[test]
    fn an_entry_past_stale_until_is_removed_on_get_and_by_sweep() {
        let t = MemoryTier::new(10_000);
        t.put(entry("a", 10, 1000));
        t.put(entry("b", 10, 2000));
        t.put(entry("c", 10, 3000));
        assert!(t.get("a", 999).is_some());
        assert!(t.get("a", 1000).is_none());
        assert_eq!(t.len(), 2);
        assert_eq!(t.sweep(1999), 0);
        assert_eq!(t.sweep(2000), 1);
        assert_eq!(keys(&t), ["c"]);
        assert_eq!(t.bytes(), w("c", 10));
        check(&t);
    }

    #[test]
    fn remove_if_purges_what_it_picks() {
        let t = MemoryTier::new(100_000);
        for k in ["GET /a", "GET /b", "GET /a?x", "GET /c"] {
            t.put(entry(k, 10, u64::MAX));
        }
        assert_eq!(t.remove_if(|e| e.key.starts_with("GET /a")), 2);
        assert_eq!(keys(&t), ["GET /b", "GET /c"]);
        assert_eq!(t.remove_if(|_| false), 0);
        check(&t);
        assert_eq!(t.remove_if(|_| true), 2);
        assert_eq!((t.len(), t.bytes()), (0, 0));
        assert_eq!(t.max_bytes(), 100_000);
        let shown = format!("{t:?}");
        assert!(shown.contains("bytes: 0"), "{shown}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, usize, u64),
        Get(u8, u64),
        Sweep(u64),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..16, 0usize..600, 0u64..100).prop_map(|(k, b, s)| Op::Put(k, b, s)),
            3 => (0u8..16, 0u64..100).prop_map(|(k, n)| Op::Get(k, n)),
            1 => (0u64..100).prop_map(Op::Sweep),
            1 => (0u8..16).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #[test]
        fn the_bound_and_the_accounting_hold(
            max in 0u64..3000,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let t = MemoryTier::new(max);
            for op in ops {
                match op {
                    Op::Put(k, body, stale) => {
                        let e = entry(&k.to_string(), body, stale);
                        let fits = weight_of(&e) <= max;
                        t.put(Arc::clone(&e));
                        // A put that fits is held right after, even past its time.
                        let held = lock(&t.inner).slots.get(e.key.as_str()).map(|s| Arc::clone(&s.entry));
                        prop_assert_eq!(held.is_some(), fits);
                    }
                    Op::Get(k, now) => {
                        if let Some(e) = t.get(&k.to_string(), now) {
                            prop_assert!(now < e.stale_until);
                        }
                    }
                    Op::Sweep(now) => {
                        t.sweep(now);
                        prop_assert!(lock(&t.inner).slots.values().all(|s| now < s.entry.stale_until));
                    }
                    Op::Remove(k) => {
                        let key = k.to_string();
                        t.remove_if(|e| e.key == key);
                        prop_assert!(t.get(&key, 0).is_none());
                    }
                }
                check(&t);
            }
        }
    }
}
