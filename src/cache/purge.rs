//! Purges: `POST /admin/cache/purge` removes entries by policy, route or path prefix.
//!
//! The replica that takes it removes them from its memory tier at once and appends the
//! purge to a log in Redis (`rc:purges`, a sorted set by sequence number, the last
//! `LOG_LEN` kept); every replica reads the log each `POLL` and does the same. Entries in
//! Redis are not searched for (a SCAN does not reach every node of a cluster): each purge
//! stays known as a tombstone, and an entry read from Redis that one covers (stored at or
//! before the purge's time) is a miss. Times are each replica's own clock: a replica whose
//! clock runs ahead of the purging one's may write entries a purge misses, one that runs
//! behind entries it wrongly covers (a miss, no more). No margin is added for that: a
//! margin would make every entry refilled just after a purge look purged to the other
//! replicas, each of which would then go upstream once more.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::entry::Entry;
use super::policy::key_route_target;

pub(crate) const POLL: Duration = Duration::from_secs(1);
const LOG_LEN: usize = 1000;
pub(crate) const LOG_KEY: &str = "rc:purges";
pub(crate) const SEQ_KEY: &str = "rc:purges:seq";

/// What one purge removes: every entry matching all the fields given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// A misspelt field must not widen a purge to everything.
#[serde(deny_unknown_fields)]
pub struct Purge {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Of the path and query (`/api/agents` also matches `/api/agents?x=1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// When it was taken, unix ms (set by the replica that took it).
    #[serde(default)]
    pub at: u64,
}

impl Purge {
    pub(crate) fn matches(&self, policy: &str, e: &Entry) -> bool {
        if e.stored_at > self.at {
            return false;
        }
        if self.cache.as_deref().is_some_and(|c| c != policy) {
            return false;
        }
        let (route, target) = key_route_target(&e.key);
        if self.route.as_deref().is_some_and(|r| r != route) {
            return false;
        }
        self.prefix.as_deref().is_none_or(|p| target.starts_with(p))
    }
}

/// The purges this replica knows of, newest last, at most `LOG_LEN`.
#[derive(Debug, Default)]
pub(crate) struct Purges {
    list: Mutex<Vec<Purge>>,
    /// The last sequence number read from the log.
    pub(crate) seen: AtomicU64,
}

impl Purges {
    pub(crate) fn add(&self, p: Purge) {
        let mut list = crate::sync::lock(&self.list);
        if list.contains(&p) {
            return;
        }
        list.push(p);
        let over = list.len().saturating_sub(LOG_LEN);
        list.drain(..over);
    }

    /// Whether a purge removed this entry (read from Redis) after it was stored.
    pub(crate) fn covers(&self, policy: &str, e: &Entry) -> bool {
        crate::sync::lock(&self.list)
            .iter()
            .any(|p| p.matches(policy, e))
    }

    pub(crate) fn len(&self) -> usize {
        crate::sync::lock(&self.list).len()
    }

    pub(crate) fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

/// Appends a purge to the log in Redis.
pub(crate) async fn publish(redis: &crate::redis::Redis, p: &Purge) -> Result<u64, String> {
    let json = serde_json::to_string(p).map_err(|e| e.to_string())?;
    let seq: u64 = redis
        .query(redis::cmd("INCR").arg(SEQ_KEY))
        .await
        .map_err(|e| e.to_string())?;
    redis
        .query::<()>(redis::cmd("ZADD").arg(LOG_KEY).arg(seq).arg(json))
        .await
        .map_err(|e| e.to_string())?;
    // Keep the newest LOG_LEN.
    let keep = i64::try_from(LOG_LEN).unwrap_or(i64::MAX);
    redis
        .query::<()>(
            redis::cmd("ZREMRANGEBYRANK")
                .arg(LOG_KEY)
                .arg(0)
                .arg(-keep - 1),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(seq)
}

/// The purges logged after sequence `after`, with their numbers.
pub(crate) async fn read_since(
    redis: &crate::redis::Redis,
    after: u64,
) -> Result<Vec<(u64, Purge)>, String> {
    let rows: Vec<(String, f64)> = redis
        .query(
            redis::cmd("ZRANGEBYSCORE")
                .arg(LOG_KEY)
                .arg(format!("({after}"))
                .arg("+inf")
                .arg("WITHSCORES"),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .filter_map(|(json, score)| {
            // Scores are small integers: exact in an f64.
            let seq = score as u64;
            serde_json::from_str::<Purge>(&json).ok().map(|p| (seq, p))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderMap;

    fn entry(key: &str, stored_at: u64) -> Entry {
        Entry {
            key: key.to_owned(),
            status: 200,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            stored_at,
            fresh_until: stored_at + 1,
            stale_until: stored_at + 2,
            age_at_store: 0,
        }
    }

    #[test]
    fn a_purge_matches_policy_route_and_prefix_and_only_older_entries() {
        let e = entry("in\nagents\nhost\n/api/agents?x=1\n", 10_000);
        let p = |cache: Option<&str>, route: Option<&str>, prefix: Option<&str>, at| Purge {
            cache: cache.map(str::to_owned),
            route: route.map(str::to_owned),
            prefix: prefix.map(str::to_owned),
            at,
        };
        assert!(p(None, None, Some("/api/agents"), 10_000).matches("c", &e));
        assert!(p(Some("c"), Some("agents"), None, 10_000).matches("c", &e));
        assert!(!p(Some("d"), None, None, 10_000).matches("c", &e));
        assert!(!p(None, Some("chat"), None, 10_000).matches("c", &e));
        assert!(!p(None, None, Some("/api/chat"), 10_000).matches("c", &e));
        // Stored after the purge (a refill): kept, however soon; at or before it: removed.
        assert!(!p(None, None, None, 9_999).matches("c", &e));
        assert!(p(None, None, None, 10_000).matches("c", &e));
    }

    #[test]
    fn the_list_keeps_the_newest_and_no_duplicates() {
        let purges = Purges::default();
        for at in 0..(LOG_LEN as u64 + 10) {
            let p = Purge {
                cache: None,
                route: None,
                prefix: Some(format!("/{at}")),
                at,
            };
            purges.add(p.clone());
            purges.add(p);
        }
        let list = crate::sync::lock(&purges.list);
        assert_eq!(list.len(), LOG_LEN);
        assert_eq!(list[0].at, 10);
    }
}
