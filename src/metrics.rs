//! Counters for `/metrics` that the `stats` op does not keep: requests by
//! op and result code, in-flight requests, commit sizes and fsync times,
//! mails. Plain relaxed atomics, like [`crate::stats`]: they describe the
//! server and decide nothing. They are process-wide (one server per
//! process; a test that counts starts its own process), so that the paths
//! that count (a reply sent, a mail delivered, a commit) need no handle.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::error::{ApiError, ErrorCode};
use crate::wire::Op;

/// The op slots: one per op, and one for a request whose op is unknown or
/// could not be read.
pub const OP_SLOTS: usize = Op::ALL.len() + 1;
/// The result slots: `ok`, then one per error code.
pub const RESULT_SLOTS: usize = ErrorCode::ALL.len() + 1;

static REQUESTS: [[AtomicU64; RESULT_SLOTS]; OP_SLOTS] =
    [const { [const { AtomicU64::new(0) }; RESULT_SLOTS] }; OP_SLOTS];
static INFLIGHT: AtomicI64 = AtomicI64::new(0);
pub static MAILS_SENT: AtomicU64 = AtomicU64::new(0);
pub static MAILS_FAILED: AtomicU64 = AtomicU64::new(0);
pub static LOGINS_FAILED: AtomicU64 = AtomicU64::new(0);

/// Commands per commit.
pub static COMMIT_ITEMS: Histogram<13> = Histogram::new([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], 1.0);
/// Time of a commit's durable write (redb's commit: the fsyncs), in µs.
pub static FSYNC_MICROS: Histogram<12> =
    Histogram::new([100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000], 1e-6);

/// The slot of a request for `op` (`None`: unknown or unreadable).
#[must_use]
pub fn op_slot(op: Option<Op>) -> u8 {
    op.map_or(Op::ALL.len(), |op| op as usize) as u8
}

/// A request has started (it is answered by [`answered`]).
pub fn started() {
    INFLIGHT.fetch_add(1, Relaxed);
}

/// A request counted by [`started`] was answered with `result`.
pub fn answered<T>(op_slot: u8, result: &Result<T, ApiError>) {
    let code = match result {
        Ok(_) => 0,
        Err(e) => 1 + e.code as usize,
    };
    REQUESTS[usize::from(op_slot).min(OP_SLOTS - 1)][code].fetch_add(1, Relaxed);
    INFLIGHT.fetch_sub(1, Relaxed);
}

/// Requests answered for the op slot and result slot so far.
#[must_use]
pub fn requests(op_slot: usize, result_slot: usize) -> u64 {
    REQUESTS[op_slot][result_slot].load(Relaxed)
}

/// Requests started and not yet answered.
#[must_use]
pub fn inflight() -> u64 {
    u64::try_from(INFLIGHT.load(Relaxed)).unwrap_or(0)
}

/// The name of an op slot, as the `op` label shows it.
#[must_use]
pub fn op_name(slot: usize) -> &'static str {
    Op::ALL.get(slot).map_or("unknown", |op| op.name())
}

/// The name of a result slot, as the `code` label shows it.
#[must_use]
pub fn result_name(slot: usize) -> &'static str {
    if slot == 0 {
        "ok"
    } else {
        ErrorCode::ALL[slot - 1].as_str()
    }
}

/// Requests answered with `code`, over every op.
#[must_use]
pub fn answered_with(code: ErrorCode) -> u64 {
    (0..OP_SLOTS).map(|op| requests(op, 1 + code as usize)).sum()
}

/// A histogram with `N` fixed upper bounds (integers, in units of `scale`
/// when shown), kept in atomics.
pub struct Histogram<const N: usize> {
    bounds: [u64; N],
    scale: f64,
    /// Observations at or below each bound (not cumulative), and above the last.
    counts: [AtomicU64; N],
    above: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    const fn new(bounds: [u64; N], scale: f64) -> Self {
        Histogram {
            bounds,
            scale,
            counts: [const { AtomicU64::new(0) }; N],
            above: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: u64) {
        match self.bounds.iter().position(|&b| v <= b) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.above.fetch_add(1, Relaxed),
        };
        self.sum.fetch_add(v, Relaxed);
    }

    /// (sum, count, per-bucket counts by upper bound, the last `+Inf`) in
    /// shown units: the encoder makes them cumulative.
    #[must_use]
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> =
            self.bounds.iter().zip(&self.counts).map(|(b, c)| (*b as f64 * self.scale, c.load(Relaxed))).collect();
        buckets.push((f64::INFINITY, self.above.load(Relaxed)));
        let count = buckets.iter().map(|(_, c)| c).sum();
        (self.sum.load(Relaxed) as f64 * self.scale, count, buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_cumulatively_and_above_the_last_bound() {
        let h: Histogram<3> = Histogram::new([1, 10, 100], 0.5);
        for v in [0, 1, 5, 10, 11, 1000] {
            h.observe(v);
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!((sum, count), (1027.0 * 0.5, 6));
        assert_eq!(buckets, vec![(0.5, 2), (5.0, 2), (50.0, 1), (f64::INFINITY, 1)]);
    }

    #[test]
    fn every_op_and_code_has_its_own_slot() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "Op::ALL is in declaration order");
        }
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "ErrorCode::ALL is in declaration order");
        }
        assert_eq!(op_name(op_slot(Some(Op::Transfer)).into()), "transfer");
        assert_eq!(op_name(op_slot(None).into()), "unknown");
        assert_eq!(result_name(0), "ok");
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(result_name(i + 1), code.as_str());
        }
    }
}
