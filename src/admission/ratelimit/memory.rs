//! The in-memory limiter: the store of `store: memory` policies and the fallback of Redis
//! ones. `step` is the pure state machine (the same rules as the Lua script in redis.rs);
//! `Table` is its bounded, sharded home. Time is passed in, never read here.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::Duration;

use hashbrown::HashTable;
use tokio::time::Instant;

use super::{Decision, Limits};

/// One key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    count: u64,
    window_end: Instant,
    blocked_until: Option<Instant>,
}

impl Entry {
    pub(crate) fn new(now: Instant) -> Entry {
        // An ended window: the first step opens a new one.
        Entry {
            count: 0,
            window_end: now,
            blocked_until: None,
        }
    }

    /// When this entry no longer changes any decision.
    fn expires(&self) -> Instant {
        self.blocked_until
            .map_or(self.window_end, |b| b.max(self.window_end))
    }
}

/// Counts one request against `entry`: fixed window starting at the first request; past
/// `points` the key is refused until the window ends or `block` passes, whichever is later.
/// Refused requests during a block are not counted.
pub(crate) fn step(entry: &mut Entry, now: Instant, limits: &Limits) -> Decision {
    if let Some(b) = entry.blocked_until {
        if b > now {
            return Decision {
                allowed: false,
                remaining: 0,
                reset: entry.window_end.saturating_duration_since(now),
                retry_after: b.max(entry.window_end) - now,
            };
        }
        entry.blocked_until = None;
    }
    if entry.window_end <= now {
        entry.count = 0;
        entry.window_end = now + limits.window;
    }
    entry.count = entry.count.saturating_add(1);
    let reset = entry.window_end - now;
    if entry.count <= limits.points {
        return Decision {
            allowed: true,
            remaining: limits.points - entry.count,
            reset,
            retry_after: Duration::ZERO,
        };
    }
    let blocked_until = limits.block.map(|b| now + b);
    entry.blocked_until = blocked_until;
    Decision {
        allowed: false,
        remaining: 0,
        reset,
        retry_after: blocked_until.map_or(entry.window_end, |b| b.max(entry.window_end)) - now,
    }
}

/// `cost: tokens` admission: refused while blocked or with no points left, and nothing is
/// counted (the tokens are charged when the exchange ends, by [`charge`]).
pub(crate) fn peek(entry: &Entry, now: Instant, limits: &Limits) -> Decision {
    let window_end = entry.window_end.max(now);
    let blocked_until = entry.blocked_until.filter(|b| *b > now);
    // An ended window has all its points again.
    let used = if entry.window_end <= now {
        0
    } else {
        entry.count
    };
    let reset = window_end - now;
    if blocked_until.is_none() && used < limits.points {
        let reset = if used == 0 { limits.window } else { reset };
        return Decision {
            allowed: true,
            remaining: limits.points - used,
            reset,
            retry_after: Duration::ZERO,
        };
    }
    Decision {
        allowed: false,
        remaining: 0,
        reset,
        retry_after: blocked_until.map_or(window_end, |b| b.max(window_end)) - now,
    }
}

/// Charges `cost` points at once (the tokens of an exchange that ended). Spending the last
/// point blocks the key as a refused request would: the next one waits for the window (or
/// `block`).
pub(crate) fn charge(entry: &mut Entry, now: Instant, limits: &Limits, cost: u64) {
    if entry.window_end <= now {
        entry.count = 0;
        entry.window_end = now + limits.window;
    }
    entry.count = entry.count.saturating_add(cost);
    if entry.count >= limits.points
        && let Some(b) = limits.block
    {
        let until = now + b;
        entry.blocked_until = Some(entry.blocked_until.map_or(until, |old| old.max(until)));
    }
}

const SHARDS: usize = 16;
/// How often a shard drops expired entries even when not full.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Keys of one policy, bounded: expired entries are swept, and a full table refuses to
/// track new keys (the caller then lets the request through and counts it).
pub struct Table {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    max_per_shard: usize,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("shards", &self.shards.len())
            .field("max_per_shard", &self.max_per_shard)
            .finish_non_exhaustive()
    }
}

struct Shard {
    /// Keys and their entries, found by the hash that also picked the shard: one keyed
    /// hash of the key per request (a `HashMap` would hash it a second time).
    map: HashTable<(Box<str>, Entry)>,
    next_sweep: Option<Instant>,
}

impl Table {
    pub fn new(max_keys: usize) -> Table {
        Table {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashTable::new(),
                        next_sweep: None,
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// None when the table is full of live keys and `key` is new: nothing can decide.
    pub fn check(&self, key: &str, now: Instant, limits: &Limits) -> Option<Decision> {
        self.with_entry(key, now, |e| step(e, now, limits))
    }

    /// [`peek`] for `cost: tokens`. A key not seen has every point.
    pub(crate) fn peek(&self, key: &str, now: Instant, limits: &Limits) -> Option<Decision> {
        self.with_entry(key, now, |e| peek(e, now, limits))
    }

    /// [`charge`]; false when the table is full and the key new (the tokens go uncounted).
    pub(crate) fn charge(&self, key: &str, now: Instant, limits: &Limits, cost: u64) -> bool {
        self.with_entry(key, now, |e| charge(e, now, limits, cost))
            .is_some()
    }

    /// `f` on `key`'s entry, made when new; None when the table is full of live keys.
    fn with_entry<T>(&self, key: &str, now: Instant, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        // Keyed (SipHash, random per table): the keys are the clients' addresses and header
        // values, so nobody can aim many of them at one shard or one probe sequence. Bits
        // 32-35 pick the shard: hashbrown places a key by the low bits and tags it with the
        // top 7, so within a shard those still vary.
        let hash = self.hasher.hash_one(key);
        let index = (hash >> 32) as usize % SHARDS;
        // A poisoned shard only means another request panicked mid-update; its counts are
        // still usable.
        let mut shard = crate::sync::lock(&self.shards[index]);
        if let Some((_, entry)) = shard.map.find_mut(hash, |(k, _)| &**k == key) {
            return Some(f(entry));
        }
        let due = shard.next_sweep.is_none_or(|t| now >= t);
        if due || shard.map.len() >= self.max_per_shard {
            shard.map.retain(|(_, e)| e.expires() > now);
            shard.next_sweep = Some(now + SWEEP_EVERY);
        }
        if shard.map.len() >= self.max_per_shard {
            return None;
        }
        let mut entry = Entry::new(now);
        let out = f(&mut entry);
        let rehash = |(k, _): &(Box<str>, Entry)| self.hasher.hash_one(&**k);
        shard.map.insert_unique(hash, (key.into(), entry), rehash);
        Some(out)
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| crate::sync::lock(s).map.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Open streams per key, for `max_streams` (the store of `store: memory` policies and the
/// fallback of Redis ones). Bounded like [`Table`]: a key leaves when its count is back to
/// 0, and a full table lets new keys through untracked (the caller counts fail_open).
pub(crate) struct StreamTable {
    shards: Box<[Mutex<StreamShard>]>,
    hasher: RandomState,
    max_per_shard: usize,
}

impl std::fmt::Debug for StreamTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTable").finish_non_exhaustive()
    }
}

/// Streams held per key, for the keys holding any.
type StreamShard = HashMap<Box<str>, u64>;

/// What [`StreamTable::acquire`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquired {
    /// Taken: this many are left for the key.
    Yes {
        remaining: u64,
    },
    No,
    /// The table is full: not tracked.
    Untracked,
}

impl StreamTable {
    pub(crate) fn new(max_keys: usize) -> StreamTable {
        StreamTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<StreamShard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % self.shards.len()]
    }

    pub(crate) fn acquire(&self, key: &str, max: u64) -> Acquired {
        let mut shard = crate::sync::lock(self.shard(key));
        if let Some(n) = shard.get_mut(key) {
            if *n >= max {
                return Acquired::No;
            }
            *n += 1;
            return Acquired::Yes {
                remaining: max - *n,
            };
        }
        if shard.len() >= self.max_per_shard {
            return Acquired::Untracked;
        }
        if max == 0 {
            return Acquired::No;
        }
        shard.insert(key.into(), 1);
        Acquired::Yes { remaining: max - 1 }
    }

    pub(crate) fn release(&self, key: &str) {
        let mut shard = crate::sync::lock(self.shard(key));
        if let Some(n) = shard.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                shard.remove(key);
            }
        }
    }

    /// Streams held for `key`.
    #[cfg(test)]
    pub(crate) fn held(&self, key: &str) -> u64 {
        crate::sync::lock(self.shard(key))
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(points: u64, window_s: u64, block_s: Option<u64>) -> Limits {
        Limits {
            points,
            window: Duration::from_secs(window_s),
            block: block_s.map(Duration::from_secs),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn allows_points_per_window_then_refuses_until_the_window_ends() {
        let t0 = Instant::now();
        let l = limits(3, 10, None);
        let mut e = Entry::new(t0);
        for remaining in [2, 1, 0] {
            let d = step(&mut e, t0, &l);
            assert!(d.allowed);
            assert_eq!(d.remaining, remaining);
            assert_eq!(d.reset, secs(10));
        }
        let d = step(&mut e, t0 + secs(4), &l);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, secs(6));
        // The window started at the first request; at its end everything is new.
        let d = step(&mut e, t0 + secs(10), &l);
        assert!(d.allowed);
        assert_eq!(d.remaining, 2);
        assert_eq!(d.reset, secs(10));
    }

    #[test]
    fn block_outlasts_the_window_and_refused_requests_do_not_count() {
        let t0 = Instant::now();
        let l = limits(2, 10, Some(60));
        let mut e = Entry::new(t0);
        assert!(step(&mut e, t0, &l).allowed);
        assert!(step(&mut e, t0 + secs(1), &l).allowed);
        let d = step(&mut e, t0 + secs(2), &l);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, secs(60));
        // Past the window but still blocked.
        let d = step(&mut e, t0 + secs(30), &l);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, secs(32));
        let d = step(&mut e, t0 + secs(62), &l);
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.remaining, 1);
    }

    #[test]
    fn a_short_block_still_waits_for_the_window() {
        let t0 = Instant::now();
        let l = limits(1, 10, Some(2));
        let mut e = Entry::new(t0);
        assert!(step(&mut e, t0, &l).allowed);
        let d = step(&mut e, t0 + secs(1), &l);
        assert_eq!(d.retry_after, secs(9));
        // Block over, window not: still refused (and counted, the block being over).
        let d = step(&mut e, t0 + secs(4), &l);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, secs(6));
    }

    #[test]
    fn tokens_peek_does_not_count_and_charge_spends_the_window() {
        let t0 = Instant::now();
        let l = limits(100, 10, None);
        let mut e = Entry::new(t0);
        for _ in 0..5 {
            let d = peek(&e, t0, &l);
            assert!(d.allowed);
            assert_eq!(d.remaining, 100);
        }
        charge(&mut e, t0, &l, 40);
        let d = peek(&e, t0 + secs(1), &l);
        assert!(d.allowed);
        assert_eq!(d.remaining, 60);
        assert_eq!(d.reset, secs(9));
        // Overspent: the stream that did it finished; the next is refused until the window
        // ends.
        charge(&mut e, t0 + secs(2), &l, 70);
        let d = peek(&e, t0 + secs(3), &l);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.retry_after, secs(7));
        let d = peek(&e, t0 + secs(10), &l);
        assert!(d.allowed);
        assert_eq!(d.remaining, 100);
    }

    #[test]
    fn tokens_spent_to_the_last_point_block_for_block() {
        let t0 = Instant::now();
        let l = limits(100, 10, Some(60));
        let mut e = Entry::new(t0);
        charge(&mut e, t0, &l, 100);
        let d = peek(&e, t0 + secs(20), &l);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, secs(40));
        assert!(peek(&e, t0 + secs(60), &l).allowed);
    }

    #[test]
    fn stream_table_counts_and_releases() {
        let t = StreamTable::new(100);
        assert_eq!(t.acquire("a", 2), Acquired::Yes { remaining: 1 });
        assert_eq!(t.acquire("a", 2), Acquired::Yes { remaining: 0 });
        assert_eq!(t.acquire("a", 2), Acquired::No);
        assert_eq!(t.acquire("b", 2), Acquired::Yes { remaining: 1 });
        t.release("a");
        assert_eq!(t.held("a"), 1);
        // A lower limit after a reload: held permits stay, new ones count against it.
        assert_eq!(t.acquire("a", 1), Acquired::No);
        t.release("a");
        assert_eq!(t.held("a"), 0);
        assert_eq!(t.acquire("a", 1), Acquired::Yes { remaining: 0 });
    }

    #[test]
    fn stream_table_is_bounded_and_frees_idle_keys() {
        let t = StreamTable::new(SHARDS);
        let mut untracked = 0;
        for i in 0..200 {
            if t.acquire(&format!("k{i}"), 1) == Acquired::Untracked {
                untracked += 1;
            }
        }
        assert!(untracked >= 200 - SHARDS, "{untracked}");
        for i in 0..200 {
            t.release(&format!("k{i}"));
        }
        for i in 0..SHARDS {
            assert_ne!(t.acquire(&format!("fresh{i}"), 1), Acquired::No);
        }
    }

    #[test]
    fn table_keys_are_independent() {
        let t = Table::new(100);
        let now = Instant::now();
        let l = limits(1, 10, None);
        assert!(t.check("a", now, &l).unwrap().allowed);
        assert!(!t.check("a", now, &l).unwrap().allowed);
        assert!(t.check("b", now, &l).unwrap().allowed);
    }

    #[test]
    fn table_spreads_keys_over_its_shards() {
        // Room for 1,600 keys, 100 a shard: 1,000 keys fit when the shards share them
        // (a shard gets ~62), and only 100 would if they all went to one.
        let t = Table::new(1600);
        let now = Instant::now();
        let l = limits(5, 10, None);
        let tracked = (0..1000)
            .filter(|i| {
                t.check(&format!("10.0.{}.{}", i / 256, i % 256), now, &l)
                    .is_some()
            })
            .count();
        assert_eq!(tracked, 1000);
        assert_eq!(t.len(), 1000);
        // Every key is found again: its entry counts on.
        for i in [0, 499, 999] {
            let d = t.check(&format!("10.0.{}.{}", i / 256, i % 256), now, &l);
            assert_eq!(d.map(|d| d.remaining), Some(3));
        }
    }

    #[test]
    fn table_is_bounded_and_sweeps_expired_keys() {
        // One key per shard at most.
        let t = Table::new(SHARDS);
        let now = Instant::now();
        let l = limits(5, 1, None);
        let mut refused = 0;
        for i in 0..200 {
            if t.check(&format!("k{i}"), now, &l).is_none() {
                refused += 1;
            }
        }
        assert!(t.len() <= SHARDS);
        assert_eq!(refused, 200 - t.len());
        // Once the windows ended, new keys fit again.
        let later = now + secs(2);
        assert!(t.check("fresh", later, &l).is_some());
        assert!(t.len() <= SHARDS);
    }
}
