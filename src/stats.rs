//! Server counters reported by `stats`. Plain relaxed atomics: they describe
//! the server, they never decide anything about money.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub ops: AtomicU64,
    pub transfers: AtomicU64,
    pub commits: AtomicU64,
    pub batch_items: AtomicU64,
    pub batch_max: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn record_batch(&self, items: u64, transfers: u64) {
        self.commits.fetch_add(1, Relaxed);
        crate::metrics::COMMIT_ITEMS.observe(items);
        self.batch_items.fetch_add(items, Relaxed);
        self.transfers.fetch_add(transfers, Relaxed);
        self.batch_max.fetch_max(items, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
