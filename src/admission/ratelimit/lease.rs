//! Quota leasing for `store: redis`, `cost: requests` policies (`lease:`, on by default).
//!
//! Per request, a Redis policy would cost one Lua call. Instead a replica takes a *slice*
//! of a key's points in one atomic call (redis.rs LEASE: `c += granted`) and admits
//! requests locally until the slice is spent or its lease ends; a busy key costs one call
//! per slice. What Redis has reserved is never admitted twice, so the sum admitted across
//! replicas never exceeds `points` per window.
//!
//! **Slice size.** A key's first call asks for 1 point: a key seen once costs one call and
//! is decided exactly as without leasing. The next ask doubles when the last slice was
//! spent within half its lease, stays when spent within it, halves when spent slower, and
//! shrinks to what was used when points came back unused; at most `lease.max`. Redis grants
//! at most `remaining / (2 * replicas)` (at least 1) and never more than remain, so near the
//! limit slices are single points and the last points of a window are exact.
//!
//! **Leases end.** A slice may be used for `min(window / 4, 1s)` and never past its
//! window's end (the local deadline counts from before the call, so it ends no later than
//! Redis's). Points unused when the lease ends go back to Redis: with the key's next call,
//! or by the returner task (every 100 ms) when the key got no more requests. A point given
//! back counts again only in the window it was leased in.
//!
//! **Refusals.** Nothing granted while a slice may still be held by some replica (Redis
//! keeps the end of the latest lease of more than one point, `d`): refused until 200 ms
//! after that end, no block starts; the holder spends it or gives it back by then.
//! Nothing granted and no slice out: the key has spent its points, refused (and blocked,
//! with `block_for`) as without leasing. A refusal is reused locally until its retry time,
//! at most one lease length, so a client hammering a spent key costs one call per lease
//! length, not one per request.
//!
//! **Headers.** `remaining` under leasing is the points nobody had reserved at this
//! replica's last call plus what this replica still holds: what it could still admit if
//! no other replica took more. It falls by one per request here and may drop further at
//! the next call. `reset` is the window's end; `retry_after` as Redis said.
//!
//! **Concurrency.** Per key, one call at a time (an async mutex): requests that find the
//! slice spent while a call is out wait for it and take from its slice (or the refusal),
//! and only call again if it is spent too. If the call they waited for failed, they go
//! straight to the memory fallback (fallback.rs) instead of waiting a timeout each. A slice
//! held while Redis fails is still spent (it was reserved). A call cut short (the request
//! was cancelled, a timeout) may have reserved points nobody holds: they are unused until
//! the window ends (under-admission, never over).
//!
//! **Memory.** Keys live in a sharded table bounded like memory.rs's: idle keys (no slice
//! held, nothing in flight, for 5 s) are dropped when a shard is swept; a full table leaves
//! new keys to the per-request script. About 250 bytes a key (100,000 keys per policy).
//! A key seen once costs a table entry more than without leasing, and the same one call.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::fallback::RedisStore;
use super::memory::Table;
use super::redis::{Ask, Grant};
use super::{Decision, Limits, Policy, Source};
use crate::redis::Budget;

const SHARDS: usize = 16;
/// How often a shard drops idle keys even when not full.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The longest a slice may be used: unused points come back within this (plus a tick).
const MAX_LEASE: Duration = Duration::from_secs(1);
/// How often the returner gives back slices whose lease ended unused.
const RETURN_TICK: Duration = Duration::from_millis(100);
/// A key's state is kept this long after its last lease or refusal ended (its slice size).
const IDLE: Duration = Duration::from_secs(5);
/// Slices waiting for their lease to end; beyond, a slice is not given back early.
const MAX_DUE: usize = 100_000;

/// How long a slice may be used: a quarter of the window (so unused points come back
/// while the window still runs), at most a second.
pub(crate) fn lease_length(window: Duration) -> Duration {
    (window / 4).clamp(Duration::from_millis(1), MAX_LEASE)
}

/// The next slice to ask for, from the last one: `slice` granted (0: none yet, or refused),
/// `unused` of it given back, `since` its ask, `lease` the lease length.
pub(crate) fn next_slice(
    slice: u64,
    unused: u64,
    since: Duration,
    lease: Duration,
    max: u64,
) -> u64 {
    let next = if slice == 0 {
        1
    } else if unused > 0 {
        slice.saturating_sub(unused)
    } else if since < lease / 2 {
        slice.saturating_mul(2)
    } else if since < lease {
        slice
    } else {
        slice / 2
    };
    next.clamp(1, max.max(1))
}

/// One key's local state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Local {
    /// Points held, usable before `deadline`.
    left: u64,
    deadline: Instant,
    /// The window of the last call: its end in ms of Redis time (names it for giving
    /// back) and here.
    window: u64,
    window_end: Instant,
    /// Points nobody had reserved at the last call.
    redis_remaining: u64,
    /// The last slice granted (0: none, or refused), when it was asked for, and how much
    /// of it came back unused.
    slice: u64,
    asked: Instant,
    unused: u64,
    /// A refusal is reused until `refused_until`; a request may be allowed at `retry_at`.
    refused_until: Instant,
    retry_at: Instant,
    /// Calls made, and whether the last one failed: a request that waited for a failed call
    /// goes to the fallback.
    calls: u64,
    failed: bool,
}

impl Local {
    pub(crate) fn new(now: Instant) -> Local {
        Local {
            left: 0,
            deadline: now,
            window: 0,
            window_end: now,
            redis_remaining: 0,
            slice: 0,
            asked: now,
            unused: 0,
            refused_until: now,
            retry_at: now,
            calls: 0,
            failed: false,
        }
    }

    /// A decision without Redis: a fresh refusal again, or a point of the slice held.
    pub(crate) fn take(&mut self, now: Instant) -> Option<Decision> {
        if now < self.refused_until {
            return Some(Decision {
                allowed: false,
                remaining: 0,
                reset: self.window_end.saturating_duration_since(now),
                retry_after: self.retry_at.saturating_duration_since(now),
            });
        }
        if self.left > 0 && now < self.deadline {
            self.left -= 1;
            return Some(Decision {
                allowed: true,
                remaining: self.redis_remaining.saturating_add(self.left),
                reset: self.window_end.saturating_duration_since(now),
                retry_after: Duration::ZERO,
            });
        }
        None
    }

    /// The next call's question (after `take` found nothing): the slice to ask for, and the
    /// points of an ended lease given back with it (no longer held from now on).
    pub(crate) fn ask(&mut self, now: Instant, lease: Duration, max: u64, replicas: u64) -> Ask {
        let give_back = std::mem::take(&mut self.left);
        if give_back > 0 {
            self.unused = give_back;
        }
        Ask {
            want: next_slice(
                self.slice,
                self.unused,
                now.saturating_duration_since(self.asked),
                lease,
                max,
            ),
            give_back,
            window: self.window,
            replicas,
            lease,
        }
    }

    /// Takes Redis's answer to a call that started at `start` (the reply's durations are
    /// counted from a later instant: the local deadlines end no later than Redis's) and
    /// decides the request that made it, which spends the first point granted.
    pub(crate) fn grant(&mut self, start: Instant, g: &Grant, lease: Duration) -> Decision {
        self.calls += 1;
        self.failed = false;
        self.asked = start;
        self.unused = 0;
        self.window = g.window;
        self.window_end = start + g.reset;
        self.redis_remaining = g.remaining;
        if g.granted > 0 {
            self.slice = g.granted;
            self.left = g.granted - 1;
            self.deadline = start + g.lease;
            self.refused_until = start;
            return Decision {
                allowed: true,
                remaining: g.remaining.saturating_add(self.left),
                reset: g.reset,
                retry_after: Duration::ZERO,
            };
        }
        self.slice = 0;
        self.left = 0;
        self.retry_at = start + g.retry_after;
        self.refused_until = start + g.retry_after.min(lease);
        Decision {
            allowed: false,
            remaining: 0,
            reset: g.reset,
            retry_after: g.retry_after,
        }
    }

    fn failed(&mut self) {
        self.calls += 1;
        self.failed = true;
    }

    /// No slice held, nothing to reuse, for a while: the state may go.
    fn idle(&self, now: Instant) -> bool {
        let last = self.deadline.max(self.refused_until).max(self.asked);
        (self.left == 0 || now >= self.deadline) && now >= last + IDLE
    }

    /// Gives up what is left of the lease ending at `deadline` (the returner), if it is
    /// still the one held and has ended.
    fn expire(&mut self, deadline: Instant, now: Instant) -> Option<u64> {
        if self.deadline != deadline || self.left == 0 || now < deadline {
            return None;
        }
        let unused = std::mem::take(&mut self.left);
        self.unused = unused;
        Some(unused)
    }
}

struct Slot {
    local: Local,
    /// Held by the request calling Redis for this key.
    call: Arc<tokio::sync::Mutex<()>>,
}

struct Shard {
    map: HashMap<Box<str>, Slot>,
    next_sweep: Option<Instant>,
}

/// A slice to give back if unused when its lease ends.
struct Due {
    at: Instant,
    key: Box<str>,
    redis_key: Box<str>,
    limits: Limits,
    replicas: u64,
}

/// What [`LeaseTable::step`] found.
enum Step {
    Done(Decision),
    /// Call Redis, after the call in flight if any: `calls` was the count seen.
    Call {
        turn: Arc<tokio::sync::Mutex<()>>,
        calls: u64,
    },
    /// The table is full of live keys: per request.
    Untracked,
}

/// The slices one policy holds, by key; kept across reloads with the policy's name.
pub(crate) struct LeaseTable {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    max_per_shard: usize,
    due: Mutex<Vec<Due>>,
    /// The client of the latest slice, for the returner.
    client: Mutex<Weak<RedisStore>>,
    returner: AtomicBool,
}

impl std::fmt::Debug for LeaseTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseTable")
            .field("max_per_shard", &self.max_per_shard)
            .finish_non_exhaustive()
    }
}

/// Where one request's leased decision is taken: the policy's parts it needs.
pub(crate) struct Lessee<'a> {
    pub(crate) policy: &'a Policy,
    pub(crate) client: &'a Arc<RedisStore>,
    pub(crate) fallback: &'a Table,
    pub(crate) limits: &'a Limits,
    /// `lease.max`.
    pub(crate) max: u64,
}

impl LeaseTable {
    pub(crate) fn new(max_keys: usize) -> LeaseTable {
        LeaseTable {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        next_sweep: None,
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
            due: Mutex::new(Vec::new()),
            client: Mutex::new(Weak::new()),
            returner: AtomicBool::new(false),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % self.shards.len()]
    }

    /// The fast path: a point of the slice held, or a fresh refusal, without awaiting.
    fn step(&self, key: &str, now: Instant) -> Step {
        let mut shard = crate::sync::lock(self.shard(key));
        if let Some(slot) = shard.map.get_mut(key) {
            if let Some(d) = slot.local.take(now) {
                return Step::Done(d);
            }
            return Step::Call {
                turn: slot.call.clone(),
                calls: slot.local.calls,
            };
        }
        let due = shard.next_sweep.is_none_or(|t| now >= t);
        if due || shard.map.len() >= self.max_per_shard {
            // Not a key a request is calling for (it holds `call`), nor one holding points.
            shard
                .map
                .retain(|_, s| Arc::strong_count(&s.call) > 1 || !s.local.idle(now));
            shard.next_sweep = Some(now + SWEEP_EVERY);
        }
        if shard.map.len() >= self.max_per_shard {
            return Step::Untracked;
        }
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        shard.map.insert(
            key.into(),
            Slot {
                local: Local::new(now),
                call: turn.clone(),
            },
        );
        Step::Call { turn, calls: 0 }
    }

    /// Decides one request of `key` from the slice held, or by one LEASE call.
    pub(crate) async fn decide(
        self: &Arc<Self>,
        l: &Lessee<'_>,
        key: &str,
        budget: &mut Budget,
    ) -> (Option<Decision>, Source) {
        // Most requests are decided from the slice held, without waiting: the waits are
        // boxed so that their futures (a Redis call's is several KiB) are made, and copied,
        // only by the requests that wait.
        match self.step(key, Instant::now()) {
            Step::Done(d) => (Some(d), Source::Redis),
            Step::Call { turn, calls } => Box::pin(self.call(l, key, turn, calls, budget)).await,
            Step::Untracked => Box::pin(self.per_request(l, key, budget)).await,
        }
    }

    /// After the call in flight, if any: from the slice it brought, or by a LEASE call.
    async fn call(
        self: &Arc<Self>,
        l: &Lessee<'_>,
        key: &str,
        turn: Arc<tokio::sync::Mutex<()>>,
        seen: u64,
        budget: &mut Budget,
    ) -> (Option<Decision>, Source) {
        // Waiting for another request's call is waiting for Redis: within the budget too.
        let left = budget.left(l.client.redis.timeout());
        let Ok(_turn) = tokio::time::timeout(left, turn.lock()).await else {
            return Self::in_memory(l, key);
        };
        let lease = lease_length(l.limits.window);
        let start = Instant::now();
        // Present: a key is never dropped while a request holds its `call`.
        let ask = self.with_slot(key, |local| {
            if let Some(d) = local.take(start) {
                return Err(Some(d));
            }
            if local.calls != seen && local.failed {
                return Err(None);
            }
            Ok(local.ask(start, lease, l.max, l.policy.replicas))
        });
        let ask = match ask {
            Some(Ok(ask)) => ask,
            Some(Err(Some(d))) => return (Some(d), Source::Redis),
            Some(Err(None)) => return Self::in_memory(l, key),
            None => return self.per_request(l, key, budget).await,
        };
        if budget.left(l.client.redis.timeout()).is_zero() {
            // Not asked, so not a failure of the key's calls: the waiters ask themselves.
            return Self::in_memory(l, key);
        }
        let redis_key = l.policy.redis_key("", key);
        let reply = l.client.lease(&redis_key, l.limits, &ask, budget).await;
        let (decision, held_until) = self
            .with_slot(key, |local| match reply {
                Some(g) => {
                    let d = local.grant(start, &g, lease);
                    (Some(d), (local.left > 0).then_some(local.deadline))
                }
                None => {
                    local.failed();
                    (None, None)
                }
            })
            .unwrap_or((None, None));
        let Some(d) = decision else {
            return Self::in_memory(l, key);
        };
        if let Some(at) = held_until {
            self.hold(l, at, key, redis_key);
        }
        (Some(d), Source::Redis)
    }

    /// `f` on `key`'s state, if tracked.
    fn with_slot<T>(&self, key: &str, f: impl FnOnce(&mut Local) -> T) -> Option<T> {
        let mut shard = crate::sync::lock(self.shard(key));
        shard.map.get_mut(key).map(|slot| f(&mut slot.local))
    }

    /// The script of `lease: off`, for keys the full table cannot track.
    async fn per_request(
        &self,
        l: &Lessee<'_>,
        key: &str,
        budget: &mut Budget,
    ) -> (Option<Decision>, Source) {
        let redis_key = l.policy.redis_key("", key);
        let fallback = l.policy.fallback_limits.as_ref().unwrap_or(l.limits);
        l.client
            .check(&redis_key, l.limits, l.fallback, key, fallback, budget)
            .await
    }

    /// Redis failed: this request as the fallback decides it (fallback.rs).
    fn in_memory(l: &Lessee<'_>, key: &str) -> (Option<Decision>, Source) {
        let fallback = l.policy.fallback_limits.as_ref().unwrap_or(l.limits);
        match l.fallback.check(key, Instant::now(), fallback) {
            Some(d) => (Some(d), Source::Memory),
            None => (None, Source::FailOpen),
        }
    }

    /// Remembers a slice to give back if still unused at `at`, and starts the returner.
    fn hold(self: &Arc<Self>, l: &Lessee<'_>, at: Instant, key: &str, redis_key: String) {
        {
            let mut due = crate::sync::lock(&self.due);
            if due.len() >= MAX_DUE {
                return;
            }
            due.push(Due {
                at,
                key: key.into(),
                redis_key: redis_key.into(),
                limits: *l.limits,
                replicas: l.policy.replicas,
            });
        }
        let mut client = crate::sync::lock(&self.client);
        if !std::ptr::eq(client.as_ptr(), Arc::as_ptr(l.client)) {
            *client = Arc::downgrade(l.client);
        }
        drop(client);
        self.start_returner();
    }

    /// One task per table gives back slices whose lease ended unused; it ends with the
    /// table.
    fn start_returner(self: &Arc<Self>) {
        if self.returner.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.returner.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        handle.spawn(async move {
            loop {
                tokio::time::sleep(RETURN_TICK).await;
                let Some(table) = weak.upgrade() else { return };
                table.give_back_due(Instant::now()).await;
            }
        });
    }

    async fn give_back_due(&self, now: Instant) {
        let ended: Vec<Due> = {
            let mut due = crate::sync::lock(&self.due);
            if due.iter().all(|d| d.at > now) {
                return;
            }
            let (ended, pending) = std::mem::take(&mut *due)
                .into_iter()
                .partition(|d| d.at <= now);
            *due = pending;
            ended
        };
        let Some(client) = crate::sync::lock(&self.client).upgrade() else {
            return;
        };
        for d in ended {
            let back = {
                let mut shard = crate::sync::lock(self.shard(&d.key));
                shard
                    .map
                    .get_mut(&*d.key)
                    .and_then(|s| s.local.expire(d.at, now).map(|n| (n, s.local.window)))
            };
            let Some((give_back, window)) = back else {
                continue;
            };
            let ask = Ask {
                want: 0,
                give_back,
                window,
                replicas: d.replicas,
                lease: lease_length(d.limits.window),
            };
            // Failed: the points stay reserved until the window ends (never over-admits).
            let _ = client
                .lease(&d.redis_key, &d.limits, &ask, &mut Budget::default())
                .await;
        }
    }

    /// Keys tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| crate::sync::lock(s).map.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn grant(granted: u64, remaining: u64, reset_ms: u64, retry_ms: u64, lease_ms: u64) -> Grant {
        Grant {
            granted,
            remaining,
            reset: MS * u32::try_from(reset_ms).unwrap(),
            retry_after: MS * u32::try_from(retry_ms).unwrap(),
            window: 1_000_000 + reset_ms,
            lease: MS * u32::try_from(lease_ms).unwrap(),
        }
    }

    #[test]
    fn slices_start_at_one_grow_while_spent_fast_and_shrink_when_not() {
        let lease = Duration::from_millis(500);
        // Never seen, or just refused: one point.
        assert_eq!(next_slice(0, 0, Duration::ZERO, lease, 64), 1);
        // Spent within half the lease: double, up to max.
        assert_eq!(next_slice(1, 0, MS * 10, lease, 64), 2);
        assert_eq!(next_slice(32, 0, MS * 249, lease, 64), 64);
        assert_eq!(next_slice(64, 0, MS, lease, 64), 64);
        assert_eq!(next_slice(48, 0, MS, lease, 64), 64);
        // Spent within the lease: the same; slower: half, never below 1.
        assert_eq!(next_slice(8, 0, MS * 250, lease, 64), 8);
        assert_eq!(next_slice(8, 0, MS * 500, lease, 64), 4);
        assert_eq!(next_slice(1, 0, Duration::from_secs(9), lease, 64), 1);
        // Points came back unused: what was used.
        assert_eq!(next_slice(16, 10, MS, lease, 64), 6);
        assert_eq!(next_slice(16, 16, MS, lease, 64), 1);
        // A lower max after a reload.
        assert_eq!(next_slice(64, 0, MS, lease, 8), 8);
        assert_eq!(next_slice(64, 0, MS, lease, 0), 1);
    }

    #[test]
    fn lease_length_is_a_quarter_window_at_most_a_second() {
        assert_eq!(lease_length(Duration::from_secs(2)), MS * 500);
        assert_eq!(
            lease_length(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
        assert_eq!(lease_length(MS), MS);
    }

    #[test]
    fn a_slice_is_spent_locally_then_asked_again_with_a_bigger_want() {
        let t0 = Instant::now();
        let lease = MS * 500;
        let mut l = Local::new(t0);
        assert_eq!(l.take(t0), None);
        let ask = l.ask(t0, lease, 64, 2);
        assert_eq!((ask.want, ask.give_back), (1, 0));
        // 1 granted: the asking request spends it; remaining is Redis's.
        let d = l.grant(t0, &grant(1, 99, 2000, 0, 500), lease);
        assert!(d.allowed);
        assert_eq!(d.remaining, 99);
        assert_eq!(l.take(t0 + MS), None);
        let ask = l.ask(t0 + MS * 5, lease, 64, 2);
        assert_eq!((ask.want, ask.give_back), (2, 0));
        let d = l.grant(t0 + MS * 5, &grant(4, 95, 1995, 0, 500), lease);
        // remaining = not reserved + still held here.
        assert_eq!((d.allowed, d.remaining), (true, 98));
        for remaining in [97, 96, 95] {
            let d = l.take(t0 + MS * 6).unwrap();
            assert_eq!((d.allowed, d.remaining), (true, remaining));
            assert_eq!(d.reset, MS * 1994);
        }
        assert_eq!(l.take(t0 + MS * 6), None);
        assert_eq!(l.ask(t0 + MS * 7, lease, 64, 2).want, 8);
    }

    #[test]
    fn a_slice_never_outlives_its_lease_and_its_rest_goes_back() {
        let t0 = Instant::now();
        let lease = MS * 500;
        let mut l = Local::new(t0);
        l.slice = 4;
        l.grant(t0, &grant(8, 50, 300, 0, 300), lease);
        assert!(l.take(t0 + MS * 299).is_some());
        // The window (so the lease) ends at 300 ms: 6 points unused.
        assert_eq!(l.take(t0 + MS * 300), None);
        let ask = l.ask(t0 + MS * 300, lease, 64, 2);
        assert_eq!((ask.want, ask.give_back, ask.window), (2, 6, 1_000_300));
        // Given back once only.
        assert_eq!(l.ask(t0 + MS * 301, lease, 64, 2).give_back, 0);
    }

    #[test]
    fn the_returner_takes_only_an_ended_lease_still_held() {
        let t0 = Instant::now();
        let lease = MS * 500;
        let mut l = Local::new(t0);
        l.grant(t0, &grant(5, 50, 2000, 0, 500), lease);
        let end = t0 + MS * 500;
        assert_eq!(l.expire(end, t0 + MS * 499), None);
        assert_eq!(l.expire(t0, t0 + MS * 600), None, "another lease");
        assert_eq!(l.expire(end, end), Some(4));
        assert_eq!(l.expire(end, end), None);
        // The next ask sizes down to what was used.
        assert_eq!(l.ask(end, lease, 64, 2).want, 1);
    }

    #[test]
    fn refusals_are_reused_until_retry_at_most_a_lease() {
        let t0 = Instant::now();
        let lease = MS * 500;
        let mut l = Local::new(t0);
        // Points held elsewhere until 120 ms.
        let d = l.grant(t0, &grant(0, 0, 1500, 120, 0), lease);
        assert_eq!((d.allowed, d.retry_after), (false, MS * 120));
        let d = l.take(t0 + MS * 100).unwrap();
        assert_eq!(
            (d.allowed, d.retry_after, d.reset),
            (false, MS * 20, MS * 1400)
        );
        assert_eq!(l.take(t0 + MS * 120), None);
        assert_eq!(l.ask(t0 + MS * 120, lease, 64, 2).want, 1);
        // Spent (or blocked) for 60 s: asked again after one lease.
        l.grant(t0, &grant(0, 0, 1500, 60_000, 0), lease);
        let d = l.take(t0 + MS * 499).unwrap();
        assert_eq!(d.retry_after, MS * 59_501);
        assert_eq!(l.take(t0 + MS * 500), None);
    }

    #[test]
    fn idle_keys_leave_and_a_full_table_leaves_new_keys_per_request() {
        let t = LeaseTable::new(SHARDS);
        let t0 = Instant::now();
        let mut untracked = 0;
        for i in 0..100 {
            match t.step(&format!("k{i}"), t0) {
                Step::Untracked => untracked += 1,
                Step::Call { calls, .. } => assert_eq!(calls, 0),
                Step::Done(_) => panic!("a new key decided locally"),
            }
        }
        assert!(t.len() <= SHARDS);
        assert_eq!(untracked, 100 - t.len());
        // Idle for IDLE: the key in "x"'s shard goes, "x" is tracked.
        let later = t0 + IDLE + MS;
        let Step::Call { turn, .. } = t.step("x", later) else {
            panic!("an idle key was not dropped");
        };
        // Never a key a request is calling Redis for.
        let shard = |k: &str| (t.hasher.hash_one(k) as usize) % SHARDS;
        let other = (0..)
            .map(|i| format!("o{i}"))
            .find(|k| shard(k) == shard("x"))
            .unwrap();
        let much_later = later + IDLE * 2;
        assert!(matches!(t.step(&other, much_later), Step::Untracked));
        drop(turn);
        assert!(matches!(t.step(&other, much_later), Step::Call { .. }));
    }
}
