//! Budgets for anything an attacker could try again and again: wrong codes,
//! wrong passwords, password resets, mails.
//!
//! Plain data with the clock as an argument (milliseconds), so the rules are
//! unit-tested without sleeping. Two shapes:
//!
//! - [`Backoff`]: a count of failures that allows `free` of them, then makes
//!   each further attempt wait twice as long as the one before (`base`,
//!   `2 base`, `4 base`, ... up to `cap`). It is forgiven (starts again at
//!   zero) after `forget` without a failure.
//! - [`Recent`]: the times of the last few events, for "at most N per hour"
//!   with an exact sliding window.
//!
//! [`Table`] holds either, keyed by user, address or both, with a bound on
//! its entries so that no sequence of requests can make it grow without
//! limit.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;

/// The rules of a [`Backoff`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffRule {
    /// Failures allowed before any wait.
    pub free: u32,
    /// The first wait, in ms.
    pub base_ms: u64,
    /// The longest wait, in ms.
    pub cap_ms: u64,
    /// Failures are forgotten after this long without one, in ms.
    pub forget_ms: u64,
}

impl BackoffRule {
    /// The wait after `failures` failures (0 while some are still free).
    #[must_use]
    pub fn wait_ms(&self, failures: u32) -> u64 {
        if failures < self.free {
            return 0;
        }
        let doublings = (failures - self.free).min(62);
        self.base_ms.saturating_mul(1u64 << doublings).min(self.cap_ms)
    }

    /// The most attempts this rule lets through in `window_ms`, starting
    /// from no failures, when every attempt fails: what an attacker gets.
    #[must_use]
    pub fn attempts_within(&self, window_ms: u64) -> u64 {
        let (mut failures, mut t, mut attempts) = (0u32, 0u64, 0u64);
        loop {
            // The next attempt is allowed at `t + wait`; a quiet gap of
            // `forget_ms` forgives everything.
            let wait = self.wait_ms(failures);
            let (at, next_failures) =
                if wait >= self.forget_ms { (t + self.forget_ms, 0) } else { (t + wait, failures) };
            if at >= window_ms && attempts > 0 {
                return attempts;
            }
            t = at;
            failures = next_failures + 1;
            attempts += 1;
        }
    }
}

/// Failures counted against one key under a [`BackoffRule`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    pub failures: u32,
    /// When the last failure happened, ms.
    pub last_ms: u64,
}

impl Backoff {
    /// How long until the next attempt may go ahead (0: now).
    #[must_use]
    pub fn wait_ms(&self, rule: &BackoffRule, now_ms: u64) -> u64 {
        if self.forgotten(rule, now_ms) {
            return 0;
        }
        let until = self.last_ms.saturating_add(rule.wait_ms(self.failures));
        until.saturating_sub(now_ms)
    }

    /// Counts one failure at `now_ms`.
    pub fn fail(&mut self, rule: &BackoffRule, now_ms: u64) {
        if self.forgotten(rule, now_ms) {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        self.last_ms = now_ms;
    }

    /// Whether the failures so far no longer count.
    #[must_use]
    pub fn forgotten(&self, rule: &BackoffRule, now_ms: u64) -> bool {
        self.failures == 0 || now_ms.saturating_sub(self.last_ms) >= rule.forget_ms
    }
}

/// The times of recent events, for "at most `max` per `window_ms`".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recent {
    times: VecDeque<u64>,
}

impl Recent {
    /// Records an event at `now_ms` if fewer than `max` happened in the
    /// last `window_ms`; otherwise says how long until one more may.
    pub fn take(&mut self, max: usize, window_ms: u64, now_ms: u64) -> Result<(), u64> {
        self.expire(window_ms, now_ms);
        if self.times.len() >= max {
            let oldest = self.times.front().copied().unwrap_or(now_ms);
            return Err(oldest.saturating_add(window_ms).saturating_sub(now_ms).max(1));
        }
        self.times.push_back(now_ms);
        Ok(())
    }

    /// Whether one more event would be allowed now (records nothing).
    #[must_use]
    pub fn allows(&self, max: usize, window_ms: u64, now_ms: u64) -> bool {
        self.times.iter().filter(|&&t| now_ms.saturating_sub(t) < window_ms).count() < max
    }

    fn expire(&mut self, window_ms: u64, now_ms: u64) {
        while self.times.front().is_some_and(|&t| now_ms.saturating_sub(t) >= window_ms) {
            self.times.pop_front();
        }
    }

    /// Whether nothing in the last `window_ms` is remembered.
    #[must_use]
    pub fn is_idle(&self, window_ms: u64, now_ms: u64) -> bool {
        self.times.back().is_none_or(|&t| now_ms.saturating_sub(t) >= window_ms)
    }
}

/// A map with a bound on its entries. Entries that no longer matter
/// (`stale`) are dropped when it fills; if it is still full, [`Table::entry`]
/// answers `None` and the caller refuses the request (fail closed: forgetting
/// a live budget would hand an attacker a fresh one).
pub struct Table<K, V> {
    map: HashMap<K, V>,
    max: usize,
}

impl<K: Hash + Eq + Clone, V: Default> Table<K, V> {
    #[must_use]
    pub fn new(max: usize) -> Self {
        Table { map: HashMap::new(), max }
    }

    /// The entry for `key`, made if needed; `None` when the table is full of
    /// entries that still matter.
    pub fn entry(&mut self, key: &K, stale: impl Fn(&V) -> bool) -> Option<&mut V> {
        if !self.map.contains_key(key) && self.map.len() >= self.max {
            self.map.retain(|_, v| !stale(v));
            if self.map.len() >= self.max {
                return None;
            }
        }
        Some(self.map.entry(key.clone()).or_default())
    }

    #[must_use]
    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key)
    }

    /// Drops every entry that no longer matters.
    pub fn sweep(&mut self, stale: impl Fn(&V) -> bool) {
        self.map.retain(|_, v| !stale(v));
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The part of an address that one party controls: an IPv4 address, or an
/// IPv6 /64 (one host usually holds a whole /64, so counting single IPv6
/// addresses would give it 2^64 fresh budgets).
#[must_use]
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// "in 3 s", "in 2 min", "in 1 h": how long a refused caller should wait.
#[must_use]
pub fn wait_text(wait_ms: u64) -> String {
    let s = wait_ms.div_ceil(1000).max(1);
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s.div_ceil(60))
    } else {
        format!("{} h", s.div_ceil(3600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: BackoffRule = BackoffRule { free: 5, base_ms: 60_000, cap_ms: 86_400_000, forget_ms: 86_400_000 };

    #[test]
    fn free_failures_then_waits_that_double_up_to_the_cap() {
        assert_eq!((0..5).map(|n| RULE.wait_ms(n)).collect::<Vec<_>>(), [0; 5]);
        assert_eq!(RULE.wait_ms(5), 60_000);
        assert_eq!(RULE.wait_ms(6), 120_000);
        assert_eq!(RULE.wait_ms(7), 240_000);
        assert_eq!(RULE.wait_ms(30), 86_400_000);
        assert_eq!(RULE.wait_ms(u32::MAX), 86_400_000);
    }

    #[test]
    fn a_backoff_counts_waits_and_forgives() {
        let mut b = Backoff::default();
        for t in 0..5 {
            assert_eq!(b.wait_ms(&RULE, t), 0);
            b.fail(&RULE, t);
        }
        assert_eq!(b.wait_ms(&RULE, 4), 60_000);
        assert_eq!(b.wait_ms(&RULE, 60_003), 1);
        assert_eq!(b.wait_ms(&RULE, 60_004), 0);
        b.fail(&RULE, 60_004);
        assert_eq!(b.wait_ms(&RULE, 60_004), 120_000);
        // A day without failures forgives everything.
        let later = 60_004 + 86_400_000;
        assert_eq!(b.wait_ms(&RULE, later), 0);
        b.fail(&RULE, later);
        assert_eq!(b.failures, 1);
    }

    #[test]
    fn what_an_attacker_gets_per_day() {
        // 5 free, then after 1, 2, 4, ... 512 minutes: 15 in the first 24 h.
        assert_eq!(RULE.attempts_within(86_400_000), 15);
        assert_eq!(RULE.attempts_within(3_600_000), 5 + 5);
        // Brute-force check of the same figure with the Backoff itself.
        let (mut b, mut t, mut n) = (Backoff::default(), 0u64, 0u64);
        while t < 86_400_000 {
            let w = b.wait_ms(&RULE, t);
            if w > 0 {
                t += w;
                continue;
            }
            b.fail(&RULE, t);
            n += 1;
        }
        assert_eq!(n, 15);
    }

    #[test]
    fn recent_is_an_exact_sliding_window() {
        let mut r = Recent::default();
        for t in [0, 10, 20] {
            assert_eq!(r.take(3, 1000, t), Ok(()));
        }
        assert_eq!(r.take(3, 1000, 500), Err(500));
        assert!(!r.allows(3, 1000, 999));
        assert!(r.allows(3, 1000, 1000));
        assert_eq!(r.take(3, 1000, 1000), Ok(()));
        assert_eq!(r.take(3, 1000, 1005), Err(5));
        assert!(!r.is_idle(1000, 1500));
        assert!(r.is_idle(1000, 2000));
    }

    #[test]
    fn a_full_table_drops_stale_entries_and_then_refuses() {
        let mut t: Table<u32, u32> = Table::new(2);
        *t.entry(&1, |_| false).unwrap() = 1;
        *t.entry(&2, |_| false).unwrap() = 2;
        // Full of live entries: refused, nothing forgotten.
        assert!(t.entry(&3, |_| false).is_none());
        assert_eq!(t.get(&1), Some(&1));
        // An existing key is always found.
        assert_eq!(t.entry(&2, |_| false).copied(), Some(2));
        // Stale ones make room.
        assert!(t.entry(&3, |v| *v == 1).is_some());
        assert_eq!((t.get(&1), t.len()), (None, 2));
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        let v4: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(source_key(v4), "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(wait_text(1), "1 s");
        assert_eq!(wait_text(61_000), "61 s");
        assert_eq!(wait_text(600_000), "10 min");
        assert_eq!(wait_text(86_400_000), "24 h");
    }
}
