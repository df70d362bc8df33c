//! Proves the ledger rules keep money whole: random interleavings of owner
//! reservations, journal commits and late delivery of committed effects keep
//! the sum at 0 and every balance inside its bounds.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;

use super::*;

const USERS: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Clone, Debug)]
enum Step {
    Reserve { from: usize, to: usize, amount: i64, fee_bps: u32 },
    Mint { to: usize, amount: i64 },
    Commit,
    Deliver,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..4usize, 0..5usize, -3i64..60, prop_oneof![Just(0u32), Just(200), Just(3300)])
            .prop_map(|(from, to, amount, fee_bps)| Step::Reserve { from, to, amount, fee_bps }),
        1 => (0..5usize, 1i64..80).prop_map(|(to, amount)| Step::Mint { to, amount }),
        3 => Just(Step::Commit),
        2 => Just(Step::Deliver),
    ]
}

/// Index 4 is an account that never exists, to exercise `not_found`.
fn name(i: usize) -> &'static str {
    USERS.get(i).copied().unwrap_or("ghost")
}

struct World {
    book: Book,
    owners: HashMap<&'static str, OwnerAccount>,
    pending: VecDeque<(&'static str, &'static str, i64, i64)>,
    undelivered: Vec<(&'static str, i64, i64)>,
}

impl World {
    fn new(limits: Limits) -> World {
        let mut book = Book::new(limits);
        let mut owners = HashMap::new();
        for id in USERS.iter().copied().chain(SYSTEM_ACCOUNTS) {
            if !is_system(id) {
                book.create(id).unwrap();
            }
            owners.insert(id, OwnerAccount::new(0));
        }
        // Start every user at the minimum so that bounds hold from the start.
        for id in USERS {
            let delta = limits.min_balance;
            book.set(id, delta);
            let mint = book.get(MINT).unwrap().balance;
            book.set(MINT, mint - delta);
            owners.get_mut(id).unwrap().balance = delta;
            owners.get_mut(MINT).unwrap().balance -= delta;
        }
        World { book, owners, pending: VecDeque::new(), undelivered: Vec::new() }
    }

    fn reserve(&mut self, from: &'static str, to: &'static str, amount: i64, fee: i64) {
        let bounds = self.book.limits.bounds(from);
        if self.owners.get_mut(from).unwrap().reserve(from, amount, bounds).is_ok() {
            self.pending.push_back((from, to, amount, fee));
        }
    }

    fn commit(&mut self) {
        let Some((from, to, amount, fee)) = self.pending.pop_front() else {
            return;
        };
        match self.book.transfer(from, to, amount, fee, Mode::Reserved) {
            Ok(_) => {
                self.undelivered.push((from, -amount, amount));
                self.undelivered.push((to, amount - fee, 0));
                if fee > 0 {
                    self.undelivered.push((TREASURY, fee, 0));
                }
            }
            Err(e) => {
                // Nothing in this model debits without a reservation, so the
                // book refusing a reserved debit for its minimum would mean
                // the owner's view ran ahead of the book: a double spend.
                assert!(!matches!(e, LedgerError::BelowMin { .. }), "reserved debit refused: {e}");
                self.undelivered.push((from, 0, amount));
            }
        }
    }

    fn deliver(&mut self) {
        for (id, delta, release) in self.undelivered.drain(..) {
            if let Some(o) = self.owners.get_mut(id) {
                o.settle(delta, release);
            }
        }
    }

    fn check(&self) {
        assert_eq!(self.book.sum(), 0, "sum of balances");
        for (id, a) in self.book.iter() {
            let bounds = self.book.limits.bounds(id);
            if let Some(min) = bounds.min {
                assert!(a.balance >= min, "{id} below min: {}", a.balance);
            }
            if let Some(max) = bounds.max {
                assert!(a.balance <= max, "{id} above max: {}", a.balance);
            }
            // The owner may never believe more is available than is committed.
            let owner = &self.owners[id];
            assert!(owner.available() <= a.balance, "{id} owner view ahead of the book");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_interleavings_keep_sum_zero_and_bounds(
        min_balance in -20i64..5,
        max_balance in prop::option::of(40i64..200),
        steps in prop::collection::vec(step(), 1..200),
    ) {
        let limits = Limits { min_balance, max_balance };
        let mut w = World::new(limits);
        for s in steps {
            match s {
                Step::Reserve { from, to, amount, fee_bps } => {
                    w.reserve(name(from), name(to), amount, fee(amount.max(0), fee_bps, FeeRounding::Down));
                }
                Step::Mint { to, amount } => w.reserve(MINT, name(to), amount, 0),
                Step::Commit => w.commit(),
                Step::Deliver => w.deliver(),
            }
            w.check();
        }
        while !w.pending.is_empty() {
            w.commit();
        }
        w.deliver();
        w.check();
        for (id, o) in &w.owners {
            prop_assert_eq!(o.reserved, 0);
            prop_assert_eq!(o.balance, w.book.get(id).unwrap().balance);
        }
    }
}

#[test]
fn fee_rounds_down_and_never_exceeds_amount() {
    assert_eq!(fee(100, 200, FeeRounding::Down), 2);
    assert_eq!(fee(100, 3300, FeeRounding::Down), 33);
    assert_eq!(fee(49, 200, FeeRounding::Down), 0);
    assert_eq!(fee(i64::MAX, 10_000, FeeRounding::Down), i64::MAX);
    // Rounding up: every transfer with a rate pays at least 1.
    assert_eq!(fee(49, 200, FeeRounding::Up), 1);
    assert_eq!(fee(50, 200, FeeRounding::Up), 1);
    assert_eq!(fee(51, 200, FeeRounding::Up), 2);
    assert_eq!(fee(3, 3300, FeeRounding::Up), 1);
    assert_eq!(fee(100, 0, FeeRounding::Up), 0);
    assert_eq!(fee(i64::MAX, 10_000, FeeRounding::Up), i64::MAX);
    assert_eq!(fee(i64::MAX, 1, FeeRounding::Up), i64::MAX / 10_000 + 1);
    // A fee that would leave the receiver nothing is refused.
    assert_eq!(net_fee(1, 3300, FeeRounding::Up), Err(LedgerError::NothingLeft { amount: 1, fee: 1 }));
    assert_eq!(net_fee(2, 3300, FeeRounding::Up), Ok(1));
    assert_eq!(net_fee(1, 3300, FeeRounding::Down), Ok(0));
}

#[test]
fn credit_overflow_is_an_error_not_a_wrap() {
    let unbounded = Bounds { min: None, max: None };
    assert_eq!(credit("x", i64::MAX, 1, unbounded), Err(LedgerError::Overflow));
    assert_eq!(debit("x", i64::MIN, 1, unbounded), Err(LedgerError::Underflow));
}

#[test]
fn account_ids() {
    assert!(validate_account_id("alice.w-1:x@y_z").is_ok());
    assert!(validate_account_id("").is_err());
    assert!(validate_account_id(&"a".repeat(65)).is_err());
    assert!(validate_account_id("a b").is_err());
    assert!(validate_account_id("é").is_err());
}

#[test]
fn transfer_to_missing_or_same_account_changes_nothing() {
    let mut book = Book::new(Limits::default());
    book.create("a").unwrap();
    book.transfer(MINT, "a", 10, 0, Mode::Unreserved).unwrap();
    let before: Vec<(String, BookAccount)> = book.iter().map(|(k, v)| (k.to_owned(), *v)).collect();
    assert_eq!(book.transfer("a", "nobody", 5, 0, Mode::Reserved), Err(LedgerError::NotFound("nobody".into())));
    assert_eq!(book.transfer("a", "a", 5, 0, Mode::Reserved), Err(LedgerError::SameAccount));
    let after: Vec<(String, BookAccount)> = book.iter().map(|(k, v)| (k.to_owned(), *v)).collect();
    assert_eq!(after, before);
}

mod policy {
    use crate::ledger::{FeeRounding, LedgerError, Party, Policy, Receiver};

    const CAMPUS: Policy =
        Policy { min_events: 6, fee_same_group_bps: 200, fee_cross_group_bps: 3300, fee_rounding: FeeRounding::Down };

    fn user<'a>(name: &'a str, group: Option<&'a str>, events: u64) -> Party<'a> {
        Party { user: name, admin: false, group, events }
    }

    #[test]
    fn fees_round_down_by_group() {
        let a = user("a", Some("Y19"), 6);
        let b = user("b", Some("Y19"), 9);
        let c = user("c", Some("Y20"), 6);
        assert_eq!(CAMPUS.user_transfer(&a, &Receiver::User(b), 100), Ok(2));
        assert_eq!(CAMPUS.user_transfer(&a, &Receiver::User(c), 100), Ok(33));
        assert_eq!(CAMPUS.user_transfer(&a, &Receiver::User(b), 49), Ok(0));
        assert_eq!(CAMPUS.user_transfer(&a, &Receiver::User(c), 99), Ok(32));
        assert_eq!(CAMPUS.user_transfer(&a, &Receiver::User(b), i64::MAX), Ok(i64::MAX / 50));
        assert_eq!(CAMPUS.user_transfer(&a, &Receiver::Unowned, 100), Ok(0));
        let none = user("n", None, 6);
        assert_eq!(CAMPUS.user_transfer(&none, &Receiver::User(user("m", None, 6)), 100), Ok(2));
        assert_eq!(CAMPUS.user_transfer(&none, &Receiver::User(a), 100), Ok(33));
        // Between two wallets of one user: no fee, whatever the events.
        let newcomer = user("new", Some("Y19"), 0);
        assert_eq!(CAMPUS.user_transfer(&newcomer, &Receiver::User(newcomer), 100), Ok(0));
    }

    #[test]
    fn both_users_need_the_minimum_events() {
        let ok = user("ok", Some("Y19"), 6);
        let low = user("low", Some("Y19"), 5);
        let e = CAMPUS.user_transfer(&low, &Receiver::User(ok), 10).unwrap_err();
        assert_eq!(e, LedgerError::SenderIneligible { events: 5, min: 6 });
        assert_eq!(e.to_string(), "you have attended 5 events; transfers need at least 6");
        let one = user("one", Some("Y19"), 1);
        let e = CAMPUS.user_transfer(&one, &Receiver::User(ok), 10).unwrap_err();
        assert_eq!(e.to_string(), "you have attended 1 event; transfers need at least 6");
        // The receiver's figures are not the sender's to know.
        let e = CAMPUS.user_transfer(&ok, &Receiver::User(low), 10).unwrap_err();
        assert_eq!(e, LedgerError::ReceiverIneligible { user: "low".into() });
        assert!(!e.to_string().contains('5'), "{e}");
        assert!(CAMPUS.user_transfer(&low, &Receiver::Unowned, 10).is_err());
        assert_eq!(Policy::default().user_transfer(&low, &Receiver::User(low), 10), Ok(0));
    }

    #[test]
    fn users_cannot_pay_admins_or_system_accounts() {
        let a = user("a", None, 10);
        let admin = Party { user: "admin", admin: true, group: None, events: 10 };
        assert!(matches!(CAMPUS.user_transfer(&a, &Receiver::User(admin), 1), Err(LedgerError::NotAllowed(_))));
        assert!(matches!(CAMPUS.user_transfer(&a, &Receiver::System, 1), Err(LedgerError::NotAllowed(_))));
    }
}

/// Holds against the book: random holds, posts (whole or part), voids and
/// plain debits. What is available never goes below the minimum, each hold
/// settles at most once with posted + released == its amount (and nothing
/// while open), the book holds exactly the open holds, and the sum stays 0.
mod holds {
    use proptest::prelude::*;

    use crate::ledger::{Book, Hold, HoldStatus, Limits, Mode, MINT};

    const ACCOUNTS: [&str; 3] = ["a", "b", "c"];

    #[derive(Clone, Debug)]
    enum Op {
        Hold { from: usize, to: usize, amount: i64 },
        Post { hold: usize, amount: Option<i64> },
        Void { hold: usize },
        Debit { from: usize, to: usize, amount: i64 },
        Mint { to: usize, amount: i64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3usize, 0..3usize, -2i64..50).prop_map(|(from, to, amount)| Op::Hold { from, to, amount }),
            2 => (0..12usize, prop::option::of(-2i64..60)).prop_map(|(hold, amount)| Op::Post { hold, amount }),
            2 => (0..12usize).prop_map(|hold| Op::Void { hold }),
            2 => (0..3usize, 0..3usize, 1i64..50).prop_map(|(from, to, amount)| Op::Debit { from, to, amount }),
            1 => (0..3usize, 1i64..80).prop_map(|(to, amount)| Op::Mint { to, amount }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn holds_never_overspend_and_settle_once(ops in prop::collection::vec(op(), 1..80), min in -20i64..=0) {
            let mut book = Book::new(Limits { min_balance: min, max_balance: Some(200) });
            for id in ACCOUNTS {
                book.create(id).unwrap();
            }
            let mut holds: Vec<Hold> = Vec::new();
            for op in ops {
                match op {
                    Op::Hold { from, to, amount } => {
                        if book.hold(ACCOUNTS[from], ACCOUNTS[to], amount).is_ok() {
                            holds.push(Hold::new(ACCOUNTS[from], ACCOUNTS[to], amount));
                        }
                    }
                    Op::Post { hold, amount } => {
                        if let Some(h) = holds.get_mut(hold) {
                            if let Ok(x) = h.post_amount(amount) {
                                if book.post(&h.from, &h.to, h.amount, x, 0).is_ok() {
                                    h.posted(x);
                                }
                            } else {
                                prop_assert!(h.status != HoldStatus::Open || amount.is_some_and(|a| !(1..=h.amount).contains(&a)));
                            }
                        }
                    }
                    Op::Void { hold } => {
                        if let Some(h) = holds.get_mut(hold) {
                            if let Ok(released) = h.void() {
                                book.release(&h.from, released);
                            }
                        }
                    }
                    Op::Debit { from, to, amount } => {
                        let _ = book.transfer(ACCOUNTS[from], ACCOUNTS[to], amount, 0, Mode::Unreserved);
                    }
                    Op::Mint { to, amount } => {
                        let _ = book.transfer(MINT, ACCOUNTS[to], amount, 0, Mode::Unreserved);
                    }
                }
                prop_assert_eq!(book.sum(), 0);
                for id in ACCOUNTS {
                    let a = book.get(id).unwrap();
                    prop_assert!(a.balance - a.held >= min, "{id}: balance {} held {} min {min}", a.balance, a.held);
                    prop_assert!(a.balance <= 200);
                    let open: i64 = holds.iter().filter(|h| h.from == id && h.status == HoldStatus::Open).map(|h| h.amount).sum();
                    prop_assert_eq!(a.held, open);
                }
                for h in &holds {
                    match h.status {
                        HoldStatus::Open => prop_assert_eq!((h.posted, h.released), (0, 0)),
                        _ => prop_assert_eq!(h.posted + h.released, h.amount),
                    }
                }
            }
        }
    }

    #[test]
    fn a_hold_settles_exactly_once() {
        let mut h = Hold::new("a", "b", 10);
        assert_eq!(h.post_amount(Some(11)).map_err(|_| ()), Err(()));
        assert_eq!(h.post_amount(None), Ok(10));
        h.posted(4);
        assert_eq!((h.posted, h.released, h.status), (4, 6, HoldStatus::Posted));
        assert!(h.post_amount(None).is_err());
        assert!(h.void().is_err());
        let mut v = Hold::new("a", "b", 10);
        assert_eq!(v.void(), Ok(10));
        assert!(v.void().is_err() && v.post_amount(Some(1)).is_err());
    }
}

#[test]
fn uncreate_takes_back_only_the_last_account() {
    let mut book = Book::new(Limits::default());
    let before = book.len();
    let a = book.create("a").unwrap();
    book.uncreate("a");
    assert_eq!((book.num("a"), book.len()), (None, before));
    // The id is free again and gets the same number.
    assert_eq!(book.create("a").unwrap(), a);
    let b = book.create("b").unwrap();
    book.uncreate("a");
    assert_eq!((book.num("a"), book.num("b"), book.len()), (Some(a), Some(b), before + 2));
    book.uncreate("b");
    assert_eq!((book.num("a"), book.num("b"), book.len()), (Some(a), None, before + 1));
    book.uncreate("nobody");
    assert_eq!(book.len(), before + 1);
}

/// A map made with its memory written once is empty, and finds what is
/// put in it.
#[test]
fn a_touched_account_map_is_empty_and_keeps_what_is_inserted() {
    for n in [0, 1, 7, 1_000] {
        let mut m: AccountMap<u64> = AccountMap::with_capacity_touched(n, || u64::MAX);
        assert_eq!((m.len(), m.get("")), (0, None), "{n}");
        for i in 0..n {
            assert_eq!(m.insert(AccountKey::from(format!("a{i}").as_str()), i as u64), None);
        }
        assert!((0..n).all(|i| m.get(&format!("a{i}")) == Some(&(i as u64))), "{n}");
        assert_eq!((m.len(), m.get("")), (n, None), "{n}");
    }
}

#[test]
fn account_map_inserts_replaces_and_removes_by_id() {
    let mut m: AccountMap<i64> = AccountMap::default();
    let long = "a-very-long-account-id-that-is-kept-on-the-heap";
    for (i, id) in ["alice", "bob", long].iter().enumerate() {
        assert_eq!(m.insert(AccountKey::from(*id), i as i64), None);
    }
    // A prefetch changes nothing, for present and absent ids alike.
    m.prefetch("alice");
    m.prefetch("nobody");
    assert_eq!(m.insert(AccountKey::from("bob"), 10), Some(1));
    assert_eq!((m.get("alice"), m.get("bob"), m.get(long), m.get("carol")), (Some(&0), Some(&10), Some(&2), None));
    *m.get_mut(long).unwrap() += 5;
    assert_eq!(m.remove("alice"), Some(0));
    assert_eq!(m.remove("alice"), None);
    assert_eq!((m.len(), m.get(long), m.get("alice")), (2, Some(&7), None));
    // Many ids: every one found again after the table grew.
    for i in 0..10_000 {
        m.insert(AccountKey::from(format!("acct-{i}").as_str()), i);
    }
    assert!((0..10_000).all(|i| m.get(&format!("acct-{i}")) == Some(&i)));
    assert_eq!(m.len(), 10_002);
}
