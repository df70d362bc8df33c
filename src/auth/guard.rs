//! Login throttling: wrong passwords counted per user and address, per
//! user, and per address.

use std::net::IpAddr;

use crate::error::{ApiError, ErrorCode};
use crate::guard::{source_key, Backoff, Table};
use crate::limits::{GUARD_ENTRIES_MAX, LOGIN_PAIR, LOGIN_SOURCE, LOGIN_UNDER_ATTACK, LOGIN_USER_FAILURES_MAX};

/// Wrong passwords, counted three ways so that guessing is slow and a
/// guesser cannot lock anyone else out (the rules are in `src/limits.rs`):
///
/// - per (user, source address): 5 free, then waits from 1 s doubling;
///   this is what a guesser from one address meets.
/// - per user, from any address: past `LOGIN_USER_FAILURES_MAX` the user is
///   under attack, and each address that has failed for the user gets one
///   free try, then waits from a minute. An address with no failure for
///   the user is let through at once: the right password from elsewhere
///   always gets its try.
/// - per source address, whatever the user: a spray across many user ids
///   gets 20 free, then waits from 1 s doubling.
///
/// The tables are bounded; when one is full of live entries, a new key is
/// refused (`rate_limited`) rather than forgetting someone's failures.
pub struct LoginGuard {
    inner: std::sync::Mutex<GuardTables>,
}

struct GuardTables {
    pairs: Table<(Box<str>, IpAddr), Backoff>,
    users: Table<Box<str>, Backoff>,
    sources: Table<IpAddr, Backoff>,
}

impl Default for LoginGuard {
    fn default() -> Self {
        LoginGuard {
            inner: std::sync::Mutex::new(GuardTables {
                pairs: Table::new(GUARD_ENTRIES_MAX),
                users: Table::new(GUARD_ENTRIES_MAX),
                sources: Table::new(GUARD_ENTRIES_MAX),
            }),
        }
    }
}

fn refused(wait_ms: u64) -> ApiError {
    ApiError::new(
        ErrorCode::RateLimited,
        format!("too many failed logins; try again in {}", crate::guard::wait_text(wait_ms)),
    )
}

impl LoginGuard {
    /// `Err(rate_limited)` while a password from `source` for `user` must
    /// wait; the password is then not even checked.
    pub fn check(&self, user: &str, source: IpAddr, now_ms: u64) -> Result<(), ApiError> {
        let source = source_key(source);
        let Ok(t) = self.inner.lock() else { return Err(refused(1000)) };
        if let Some(s) = t.sources.get(&source) {
            let wait = s.wait_ms(&LOGIN_SOURCE, now_ms);
            if wait > 0 {
                return Err(refused(wait));
            }
        }
        let Some(pair) = t.pairs.get(&(user.into(), source)) else {
            // No failure from here for this user: the first try is never refused.
            return Ok(());
        };
        let under_attack = t
            .users
            .get(&Box::<str>::from(user))
            .is_some_and(|u| !u.forgotten(&LOGIN_PAIR, now_ms) && u.failures >= LOGIN_USER_FAILURES_MAX);
        let rule = if under_attack { &LOGIN_UNDER_ATTACK } else { &LOGIN_PAIR };
        let wait = pair.wait_ms(rule, now_ms);
        if wait > 0 {
            return Err(refused(wait));
        }
        Ok(())
    }

    /// Counts a wrong password for `user` from `source`.
    pub fn failed(&self, user: &str, source: IpAddr, now_ms: u64) {
        crate::stats::Stats::add(&crate::metrics::LOGINS_FAILED, 1);
        let source = source_key(source);
        let Ok(mut t) = self.inner.lock() else { return };
        let under_attack = t
            .users
            .get(&Box::<str>::from(user))
            .is_some_and(|u| !u.forgotten(&LOGIN_PAIR, now_ms) && u.failures >= LOGIN_USER_FAILURES_MAX);
        let rule = if under_attack { LOGIN_UNDER_ATTACK } else { LOGIN_PAIR };
        // A full table forgets nothing: the failure simply is not counted
        // there, and `check` keeps refusing whoever is already waiting.
        if let Some(p) = t.pairs.entry(&(user.into(), source), |b| b.forgotten(&LOGIN_UNDER_ATTACK, now_ms)) {
            p.fail(&rule, now_ms);
        }
        if let Some(u) = t.users.entry(&user.into(), |b| b.forgotten(&LOGIN_PAIR, now_ms)) {
            u.fail(&LOGIN_PAIR, now_ms);
        }
        if let Some(s) = t.sources.entry(&source, |b| b.forgotten(&LOGIN_SOURCE, now_ms)) {
            s.fail(&LOGIN_SOURCE, now_ms);
        }
    }

    /// A right password from `source`: its failures for `user` are forgiven.
    pub fn succeeded(&self, user: &str, source: IpAddr) {
        if let Ok(mut t) = self.inner.lock() {
            t.pairs.remove(&(user.into(), source_key(source)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn one_address_gets_five_tries_then_waits_that_double() {
        let g = LoginGuard::default();
        for t in 0..5 {
            g.check("alice", ip(2), t).unwrap();
            g.failed("alice", ip(2), t);
        }
        let e = g.check("alice", ip(2), 4).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        g.check("alice", ip(2), 4 + 1000).unwrap();
        g.failed("alice", ip(2), 1004);
        assert!(g.check("alice", ip(2), 1004 + 1999).is_err());
        g.check("alice", ip(2), 1004 + 2000).unwrap();
        // Other addresses and other users are not affected.
        g.check("alice", ip(1), 1005).unwrap();
        g.check("bob", ip(2), 1005).unwrap();
        // The right password forgives that address.
        g.succeeded("alice", ip(2));
        g.check("alice", ip(2), 1005).unwrap();
    }

    #[test]
    fn a_user_under_attack_slows_every_failing_address_but_never_a_new_one() {
        let g = LoginGuard::default();
        // 20 failures from 20 addresses, one each.
        for n in 0..20 {
            g.failed("admin", ip(10 + n), 0);
        }
        // Now a failing address waits a minute after its first failure...
        g.failed("admin", ip(100), 1);
        assert!(g.check("admin", ip(100), 59_000).is_err());
        g.check("admin", ip(100), 60_001).unwrap();
        // ...but an address that never failed for the user goes straight in.
        g.check("admin", ip(1), 2).unwrap();
    }

    #[test]
    fn a_spray_across_users_from_one_address_is_slowed_per_address() {
        let g = LoginGuard::default();
        for n in 0..20 {
            let user = format!("user{n}");
            g.check(&user, ip(2), 0).unwrap();
            g.failed(&user, ip(2), 0);
        }
        assert_eq!(g.check("someone-else", ip(2), 0).unwrap_err().code, ErrorCode::RateLimited);
        g.check("someone-else", ip(2), 1000).unwrap();
        g.check("someone-else", ip(3), 0).unwrap();
    }
}
