//! A counter kept per worker thread and added up when read.
//!
//! Every request bumps its route's counters; with one atomic shared by all workers, each
//! bump pulls the cache line away from the other cores. Each worker (and the rest of the
//! threads, together) writes its own cache line here instead; a scrape sums them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// One cache line per slot.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Line(pub(crate) AtomicU64);

/// Clones share the counts (a handle, like prometheus-client's `Counter`).
#[derive(Debug, Clone)]
pub(crate) struct ShardedCounter(Arc<[Line]>);

impl Default for ShardedCounter {
    fn default() -> Self {
        ShardedCounter(
            (0..crate::workers::slots())
                .map(|_| Line::default())
                .collect(),
        )
    }
}

impl ShardedCounter {
    pub(crate) fn inc(&self) {
        self.inc_by(1);
    }

    pub(crate) fn inc_by(&self, n: u64) {
        if let Some(line) = self.0.get(crate::workers::slot_in(self.0.len())) {
            line.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.iter().map(|l| l.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_every_thread_add_up() {
        let c = ShardedCounter::default();
        c.inc();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.inc_by(2);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get(), 8001);
    }
}
