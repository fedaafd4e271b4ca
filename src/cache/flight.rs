//! Coalescing of concurrent misses for one key: the first goes upstream (it leads), the
//! others wait for it, bounded by the policy's `lock_timeout`, then look again (nginx's
//! `proxy_cache_lock`). A leader that stores nothing (an answer not storable, a failure,
//! a client gone) wakes them all the same: they go upstream themselves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

#[derive(Debug, Default)]
pub(crate) struct Flights {
    by_key: Mutex<HashMap<Arc<str>, watch::Receiver<()>>>,
}

/// Held by the request that went upstream for a key; its drop wakes the waiters (after the
/// entry, if any, is in the memory tier).
#[derive(Debug)]
pub(crate) struct Lead {
    flights: Arc<Flights>,
    key: Arc<str>,
    _done: watch::Sender<()>,
}

impl Drop for Lead {
    fn drop(&mut self) {
        crate::sync::lock(&self.flights.by_key).remove(&self.key);
        // `_done` is dropped after this: the waiters' `changed()` returns.
    }
}

/// What a miss is to do.
#[derive(Debug)]
pub(crate) enum Turn {
    Lead(Lead),
    /// Another request is fetching this key: wait for it.
    Wait(watch::Receiver<()>),
}

impl Flights {
    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Turn {
        let mut map = crate::sync::lock(&self.by_key);
        if let Some(rx) = map.get(key) {
            return Turn::Wait(rx.clone());
        }
        let key: Arc<str> = Arc::from(key);
        let (tx, rx) = watch::channel(());
        map.insert(key.clone(), rx);
        Turn::Lead(Lead {
            flights: self.clone(),
            key,
            _done: tx,
        })
    }

    /// Keys being fetched now.
    pub(crate) fn len(&self) -> usize {
        crate::sync::lock(&self.by_key).len()
    }
}

/// Waits until the leader is done, or `limit` passed. True when the leader finished.
pub(crate) async fn wait(mut rx: watch::Receiver<()>, limit: std::time::Duration) -> bool {
    // `changed` fails when the sender is gone: that is the leader finishing.
    tokio::time::timeout(limit, rx.changed()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_first_leads_the_others_wait_until_it_is_dropped() {
        let f = Arc::new(Flights::default());
        let Turn::Lead(lead) = f.join("k") else {
            panic!("first must lead")
        };
        let Turn::Wait(rx) = f.join("k") else {
            panic!("second must wait")
        };
        assert!(matches!(f.join("other"), Turn::Lead(_)));
        let waiter = tokio::spawn(wait(rx, Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(lead);
        assert!(waiter.await.unwrap());
        assert_eq!(f.len(), 0);
        assert!(matches!(f.join("k"), Turn::Lead(_)));
    }

    #[tokio::test]
    async fn a_waiter_gives_up_after_its_limit() {
        let f = Arc::new(Flights::default());
        let _lead = f.join("k");
        let Turn::Wait(rx) = f.join("k") else {
            panic!("second must wait")
        };
        assert!(!wait(rx, Duration::from_millis(30)).await);
    }
}
