//! The journal's state machine without redb: batches applied to the ledger
//! in memory, cold rows from maps. The same state, batch and time give
//! byte-identical records and hashes; refused commands leave no trace; hold
//! timeouts follow the time passed in, not the wall clock.

use std::collections::BTreeMap;

use super::*;
use crate::auth::{Principal, Role};
use crate::contract::{CloseCmd, HoldSpec, ReapCmd, TagCmd};
use crate::ledger::Limits;
use crate::reply::ReplyTo;
use crate::store::{TransferRecord, GENESIS};
use crate::wire::Shape;

/// Cold rows kept in maps, updated from each batch's writes as a commit would.
#[derive(Default)]
struct MemCold {
    accounts: BTreeMap<String, AccountMeta>,
    users: BTreeMap<String, UserRecord>,
    holds: BTreeMap<u64, HoldRecord>,
    redeems: BTreeMap<u64, RedeemRecord>,
    tags: BTreeMap<(String, String), ()>,
    keys: BTreeMap<String, KeyRecord>,
    records: Vec<(u64, Vec<u8>)>,
}

impl Cold for MemCold {
    fn meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
        Ok(self.accounts.get(account).cloned())
    }
    fn user(&self, user: &str) -> Result<Option<UserRecord>, StoreError> {
        Ok(self.users.get(user).cloned())
    }
    fn hold(&self, id: u64) -> Result<Option<HoldRecord>, StoreError> {
        Ok(self.holds.get(&id).cloned())
    }
    fn redeem(&self, id: u64) -> Result<Option<RedeemRecord>, StoreError> {
        Ok(self.redeems.get(&id).cloned())
    }
    fn tagged(&self, tag: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.tags.keys().filter(|(t, _)| t == tag).map(|(_, a)| a.clone()).collect())
    }
    fn service_key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.keys.get(key_id).cloned())
    }
}

impl MemCold {
    fn absorb(&mut self, w: &Writes) {
        self.accounts.extend(w.accounts.clone());
        self.users.extend(w.users.clone());
        self.holds.extend(w.holds.clone());
        self.redeems.extend(w.redeems.clone());
        self.keys.extend(w.service_keys.clone());
        for (k, present) in &w.tags {
            if *present {
                self.tags.insert(k.clone(), ());
            } else {
                self.tags.remove(k);
            }
        }
        self.records.extend(w.each_record().map(|s| s.map(|s| (s.id, s.bytes.to_vec())).unwrap()));
    }
}

const T0: u64 = 1_800_000_000_000;

fn machine() -> Machine {
    let limits = Limits { min_balance: 0, max_balance: Some(1_000_000) };
    Machine {
        book: Book::new(limits),
        head: Head { id: 0, hash: GENESIS },
        expiring: BTreeSet::new(),
        fee_rounding: FeeRounding::Down,
    }
}

fn admin() -> Principal {
    Principal::user("admin", Role::Admin)
}

fn reply() -> ReplyTo {
    ReplyTo::channel().0
}

fn create(account: &str, initial: i64, tags: &[&str]) -> Command {
    let meta =
        AccountMeta { tags: tags.iter().map(|t| (*t).to_owned()).collect(), created: T0, ..AccountMeta::default() };
    Command::Create(Box::new(CreateCmd {
        account: account.into(),
        meta,
        initial,
        user: None,
        by: "admin".into(),
        reply: reply(),
    }))
}

fn transfer(from: &str, to: &str, amount: i64, key: Option<&str>) -> Command {
    Command::Transfer(Box::new(TransferCmd {
        kind: Kind::Transfer,
        from: from.into(),
        from_num: None,
        to: to.into(),
        amount,
        fee: 0,
        memo: Some("lunch".into()),
        key: key.map(Into::into),
        mode: Mode::Unreserved,
        shape: Shape::Transfer,
        hold: None,
        by: Some("admin".into()),
        reply: reply(),
    }))
}

fn hold(from: &str, to: &str, amount: i64, expires_at: u64) -> Command {
    Command::Transfer(Box::new(TransferCmd {
        kind: Kind::Hold,
        from: from.into(),
        from_num: None,
        to: to.into(),
        amount,
        fee: 0,
        memo: None,
        key: None,
        mode: Mode::Unreserved,
        shape: Shape::Hold { expires_at },
        hold: Some(Box::new(HoldSpec { expires_at, fee_bps: 0, redeem: None })),
        by: Some("admin".into()),
        reply: reply(),
    }))
}

fn settle(hold: u64, op: SettleOp) -> Command {
    Command::Settle(Box::new(SettleCmd { hold, op, by: Some(admin()), note: None, reply: reply() }))
}

/// Applies `batch` at `time` and, as a commit would, keeps its writes.
fn run(m: &mut Machine, cold: &mut MemCold, batch: &[Command], time: u64) -> (Writes, Vec<Outcome>) {
    let mut w = Writes::default();
    let outcomes = m.apply(cold, batch, time, &mut w).expect("memory never fails");
    cold.absorb(&w);
    (w, outcomes)
}

/// An atomic batch of the transfers `(from, to, amount)`, reserved as
/// owners reserve (`Mode::Reserved`), with items numbered from 0.
fn atomic(items: &[(&str, &str, i64)]) -> Command {
    let items = items
        .iter()
        .enumerate()
        .map(|(i, (from, to, amount))| {
            let Command::Transfer(mut t) = transfer(from, to, *amount, None) else { unreachable!() };
            t.mode = Mode::Reserved;
            (i, t)
        })
        .collect();
    Command::Batch(Box::new(BatchCmd { items, refused: None }))
}

fn ok(o: &Outcome) -> bool {
    match o {
        Outcome::Transfer(r, _) => r.is_ok(),
        Outcome::Batch(r) => r.is_ok(),
        Outcome::Create(r) => r.is_ok(),
        Outcome::User(r) => r.is_ok(),
        Outcome::Key(r) => r.is_ok(),
        Outcome::Admin(r) => r.is_ok(),
        Outcome::Probe(r) => r.is_ok(),
    }
}

/// A batch of every kind of command that writes records or rows.
fn mixed_batch() -> Vec<Command> {
    vec![
        transfer("alice", "bob", 30, Some("k1")),
        transfer("bob", "carol", 5, None),
        hold("alice", "carol", 20, 0),
        Command::Tag(Box::new(TagCmd {
            account: "carol".into(),
            add: vec!["vip".into()],
            remove: vec![],
            reply: reply(),
        })),
        Command::Bulk(Box::new(crate::contract::BulkCmd {
            tag: "club".into(),
            delta: 7,
            memo: Some("bonus".into()),
            force: false,
            by: "admin".into(),
            reply: reply(),
        })),
        transfer("alice", "nobody", 1, None),
        Command::Close(Box::new(CloseCmd {
            account: "dave".into(),
            reason: "left".into(),
            by: "admin".into(),
            reply: reply(),
        })),
    ]
}

fn setup() -> (Machine, MemCold) {
    let (mut m, mut cold) = (machine(), MemCold::default());
    let batch = vec![
        create("alice", 100, &["club"]),
        create("bob", 0, &["club"]),
        create("carol", 0, &[]),
        create("dave", 9, &[]),
    ];
    let (_, outcomes) = run(&mut m, &mut cold, &batch, T0);
    assert!(outcomes.iter().all(ok));
    (m, cold)
}

#[test]
fn a_batch_applied_twice_from_the_same_state_gives_byte_identical_records() {
    let (m, cold) = setup();
    let batch = mixed_batch();
    let (mut one, mut two) = (m.clone(), m.clone());
    let (mut w1, mut w2) = (Writes::default(), Writes::default());
    let o1 = one.apply(&cold, &batch, T0 + 5, &mut w1).unwrap();
    let o2 = two.apply(&cold, &batch, T0 + 5, &mut w2).unwrap();
    assert_eq!(w1, w2, "the writes differ");
    assert_eq!(one.head, two.head);
    assert_eq!(format!("{:?}", one.book), format!("{:?}", two.book));
    assert_eq!(o1.iter().map(ok).collect::<Vec<_>>(), o2.iter().map(ok).collect::<Vec<_>>());
    // Every command but the one to a missing account went through.
    assert_eq!(o1.iter().map(ok).collect::<Vec<_>>(), [true, true, true, true, true, false, true]);
    // Records: 2 transfers, the hold, 2 bulk adjustments, the close.
    assert_eq!(w1.ends.len(), 6);
    assert_eq!(one.head.id, 2 + 6, "after the two funding mints of the setup");
    // The records chain: each one's prev is the hash of the one before.
    let mut prev = m.head.hash;
    for stored in w1.each_record() {
        let stored = stored.unwrap();
        let r = stored.record().unwrap();
        assert_eq!((r.id, r.prev, r.time), (stored.id, prev, T0 + 5));
        assert_eq!(stored.hash, crate::store::chained_hash(&prev, stored.bytes));
        prev = stored.hash;
    }
    assert_eq!(prev, one.head.hash);
    // Six records are one chunk, which starts with the hash before it.
    assert_eq!(w1.chunks().count(), 1);
    assert_eq!(w1.records[0], crate::store::CHUNK_V3);
    assert_eq!(w1.records[1..33], m.head.hash);
    // Another time gives other records.
    let mut three = m.clone();
    let mut w3 = Writes::default();
    three.apply(&cold, &batch, T0 + 6, &mut w3).unwrap();
    assert_ne!(three.head.hash, one.head.hash);
}

#[test]
fn refused_commands_leave_no_trace() {
    let (mut m, mut cold) = setup();
    let before = (m.head, format!("{:?}", m.book));
    let batch = vec![
        transfer("alice", "bob", 101, None),
        transfer("alice", "ghost", 1, None),
        hold("bob", "alice", 1, 0),
        settle(999, SettleOp::Void),
        Command::Reap(Box::new(ReapCmd { below: i64::MIN, reason: "none".into(), by: "admin".into(), reply: reply() })),
    ];
    let (w, outcomes) = run(&mut m, &mut cold, &batch, T0 + 1);
    assert_eq!(outcomes.iter().map(ok).collect::<Vec<_>>(), [false, false, false, false, true]);
    assert_eq!((m.head, format!("{:?}", m.book)), before);
    assert!(w.ends.is_empty() && w.holds.is_empty() && w.accounts.is_empty(), "{w:?}");
}

#[test]
fn a_hold_expires_by_the_time_given_not_the_wall_clock() {
    let (mut m, mut cold) = setup();
    let (_, o) = run(&mut m, &mut cold, &[hold("alice", "bob", 40, T0 + 1000)], T0);
    let Outcome::Transfer(Ok(done), _) = &o[0] else { panic!("the hold was refused") };
    let id = done.id;
    assert_eq!(m.expiring.first(), Some(&(T0 + 1000, id)));
    assert_eq!(m.book.get("alice").unwrap().held, 40);
    // Not due a millisecond early, whatever the wall clock says.
    let (_, o) = run(&mut m, &mut cold, &[settle(id, SettleOp::Expire)], T0 + 999);
    assert!(matches!(&o[0], Outcome::Admin(Err(e)) if e.message == "not due"));
    let (w, o) = run(&mut m, &mut cold, &[settle(id, SettleOp::Expire)], T0 + 1000);
    assert!(ok(&o[0]));
    assert_eq!(w.holds[&id].hold.status, HoldStatus::Voided);
    assert_eq!(w.open_holds.get(&id), Some(&false));
    assert_eq!((m.book.get("alice").unwrap().held, m.book.get("alice").unwrap().balance), (0, 100));
    assert!(m.expiring.is_empty());
}

#[test]
fn a_batch_reads_its_own_writes() {
    let (mut m, mut cold) = setup();
    // Created, tagged and bulk-credited in one batch: the bulk sees the tag.
    let batch = vec![
        create("erin", 0, &[]),
        Command::Tag(Box::new(TagCmd {
            account: "erin".into(),
            add: vec!["club".into()],
            remove: vec![],
            reply: reply(),
        })),
        Command::Bulk(Box::new(crate::contract::BulkCmd {
            tag: "club".into(),
            delta: 3,
            memo: None,
            force: false,
            by: "admin".into(),
            reply: reply(),
        })),
    ];
    let (w, o) = run(&mut m, &mut cold, &batch, T0 + 2);
    assert!(o.iter().all(ok));
    let Outcome::Admin(Ok((Reply::Bulk(b), _))) = &o[2] else { panic!("bulk_add: {:?}", ok(&o[2])) };
    assert_eq!(b.count, 3, "alice, bob and erin");
    assert_eq!(m.book.get("erin").unwrap().balance, 3);
    assert_eq!(w.accounts["erin"].tags, ["club"]);
}

/// Raft entries written before version 3 carry chunks of version 2
/// records (`len u32 | record`, each with its id and `prev`): a member
/// reads them, chain included, as it reads its own.
#[test]
fn writes_of_version_2_records_still_read() {
    let (mut m, cold) = setup();
    let mut w = Writes::default();
    m.apply(&cold, &mixed_batch(), T0 + 5, &mut w).unwrap();
    let mut old = Writes { first_id: w.first_id, ..Writes::default() };
    let mut prev = GENESIS;
    for s in w.each_record() {
        let r = TransferRecord { prev, ..s.unwrap().record().unwrap().owned() };
        let mut bytes = Vec::new();
        r.encode_v2(&mut bytes);
        prev = crate::store::record_hash(&bytes);
        old.records.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
        old.records.extend_from_slice(&bytes);
        old.ends.push(old.records.len());
    }
    let (mut read, mut prev) = (Vec::new(), GENESIS);
    for s in old.each_record() {
        let s = s.unwrap();
        let r = s.record().unwrap().owned();
        assert_eq!((r.id, r.prev, s.prev), (s.id, prev, prev), "record {} chains", s.id);
        prev = s.hash;
        read.push(TransferRecord { prev: GENESIS, ..r });
    }
    let new: Vec<_> =
        w.each_record().map(|s| TransferRecord { prev: GENESIS, ..s.unwrap().record().unwrap().owned() }).collect();
    assert_eq!(read.len(), 6);
    assert_eq!(read, new);
}

fn by_of(w: &Writes) -> Vec<(Kind, Option<String>)> {
    w.each_record()
        .map(|s| {
            let r = s.unwrap().record().unwrap();
            (r.kind, r.by.map(String::from))
        })
        .collect()
}

#[test]
fn every_record_names_who_made_it() {
    let (mut m, mut cold) = setup();
    let mut t = transfer("alice", "bob", 3, None);
    if let Command::Transfer(c) = &mut t {
        c.by = Some("key:0123456789ab".into());
    }
    let (w, o) = run(&mut m, &mut cold, &[t, hold("alice", "carol", 4, T0 + 10)], T0 + 1);
    assert!(o.iter().all(ok));
    assert_eq!(by_of(&w), [(Kind::Transfer, Some("key:0123456789ab".into())), (Kind::Hold, Some("admin".into()))]);
    let Outcome::Transfer(Ok(held), _) = &o[1] else { panic!("the hold was refused") };
    // An expiry is the server's own doing: nobody made it.
    let expire = Command::Settle(Box::new(SettleCmd {
        hold: held.id,
        op: SettleOp::Expire,
        by: None,
        note: None,
        reply: reply(),
    }));
    let (w, o) = run(&mut m, &mut cold, &[expire], T0 + 10);
    assert!(ok(&o[0]));
    assert_eq!(by_of(&w), [(Kind::Void, None)]);
}

fn key_record(id: &str) -> KeyRecord {
    KeyRecord {
        key_id: id.into(),
        name: "shop".into(),
        role: "operator".into(),
        accounts: None,
        hash: [9; 32],
        created: T0,
        created_by: "admin".into(),
        expires_at: None,
        revoked_at: None,
        revoked_by: None,
    }
}

fn key_cmd(change: KeyChange) -> Command {
    Command::Key(Box::new(KeyCmd { change, done: tokio::sync::oneshot::channel().0 }))
}

#[test]
fn a_key_is_made_once_and_revoked_once() {
    let (mut m, mut cold) = setup();
    let id = "0123456789ab";
    let batch =
        [key_cmd(KeyChange::Create(Box::new(key_record(id)))), key_cmd(KeyChange::Create(Box::new(key_record(id))))];
    let (w, o) = run(&mut m, &mut cold, &batch, T0 + 1);
    assert!(ok(&o[0]));
    assert!(matches!(&o[1], Outcome::Key(Err(e)) if e.code == ErrorCode::Exists), "the second create sees the first");
    assert_eq!(w.service_keys[id], key_record(id));
    let revoke = |by: &str| key_cmd(KeyChange::Revoke { key_id: id.into(), by: by.into() });
    let (w, _) = run(&mut m, &mut cold, &[revoke("ann")], T0 + 2);
    assert_eq!((w.service_keys[id].revoked_at, w.service_keys[id].revoked_by.as_deref()), (Some(T0 + 2), Some("ann")));
    // Revoking again keeps the first revocation.
    let (_, o) = run(&mut m, &mut cold, &[revoke("bea")], T0 + 3);
    let Outcome::Key(Ok(k)) = &o[0] else { panic!("revoke refused") };
    assert_eq!((k.revoked_at, k.revoked_by.as_deref()), (Some(T0 + 2), Some("ann")));
    let (_, o) =
        run(&mut m, &mut cold, &[key_cmd(KeyChange::Revoke { key_id: "nope".into(), by: "x".into() })], T0 + 4);
    assert!(matches!(&o[0], Outcome::Key(Err(e)) if e.code == ErrorCode::NotFound));
}

fn user_cmd(user: &str, change: UserChange) -> Command {
    Command::User(Box::new(UserCmd { user: user.into(), change, done: tokio::sync::oneshot::channel().0 }))
}

#[test]
fn tokens_are_revoked_one_by_one_until_the_list_is_full() {
    let (mut m, mut cold) = setup();
    let new = UserRecord {
        user: "ops".into(),
        name: "Ops".into(),
        email: "ops@example.org".into(),
        password_hash: String::new(),
        role: "operator".into(),
        group: None,
        events: 0,
        token_epoch: 0,
        revoked_tokens: Vec::new(),
    };
    let batch = [
        user_cmd("ops", UserChange::Create(Box::new(new.clone()))),
        user_cmd("ops", UserChange::Create(Box::new(new))),
    ];
    let (_, o) = run(&mut m, &mut cold, &batch, T0);
    assert!(ok(&o[0]));
    assert!(matches!(&o[1], Outcome::User(Err(e)) if e.code == ErrorCode::Exists));
    // Expired entries go first: the one expiring at T0 + 1 is gone at T0 + 1.
    let revoke = |i: usize, exp_ms: u64| user_cmd("ops", UserChange::RevokeToken { jti: format!("t{i}"), exp_ms });
    run(&mut m, &mut cold, &[revoke(0, T0 + 1)], T0);
    let batch: Vec<Command> = (1..REVOKED_TOKENS_PER_USER_MAX).map(|i| revoke(i, T0 + 1_000_000)).collect();
    let (w, _) = run(&mut m, &mut cold, &batch, T0 + 1);
    let u = &w.users["ops"];
    assert_eq!((u.revoked_tokens.len(), u.token_epoch), (REVOKED_TOKENS_PER_USER_MAX - 1, 0));
    assert!(!u.revoked_tokens.iter().any(|(j, _)| j == "t0"));
    // One more fits; the next one revokes every token instead.
    let (w, _) = run(&mut m, &mut cold, &[revoke(5000, T0 + 1_000_000)], T0 + 2);
    assert_eq!((w.users["ops"].revoked_tokens.len(), w.users["ops"].token_epoch), (REVOKED_TOKENS_PER_USER_MAX, 0));
    let (w, _) = run(&mut m, &mut cold, &[revoke(5001, T0 + 1_000_000)], T0 + 3);
    assert_eq!((w.users["ops"].revoked_tokens.len(), w.users["ops"].token_epoch), (0, 1));
}

#[test]
fn an_atomic_batch_applies_whole_or_leaves_no_trace() {
    let (mut m, mut cold) = setup();
    let before = (m.head, format!("{:?}", m.book));
    // The third item asks alice for more than the first two left her.
    let failing = atomic(&[("alice", "bob", 60), ("bob", "carol", 50), ("alice", "dave", 41)]);
    let (w, outcomes) = run(&mut m, &mut cold, &[failing], T0 + 1);
    let Outcome::Batch(Err(e)) = &outcomes[0] else { panic!("the batch should fail") };
    assert_eq!((e.code, e.item), (ErrorCode::BelowMin, Some(2)));
    assert_eq!((m.head, format!("{:?}", m.book)), before, "a failed batch changes nothing");
    assert!(w.ends.is_empty() && w.records.is_empty() && w.keys.is_empty() && w.nums.is_empty(), "{w:?}");

    // Here items see the balances the items before them left: bob pays
    // on what alice just paid him. (Over the wire the owners reserve each
    // item first, against committed balances, which is stricter.)
    let passing = atomic(&[("alice", "bob", 60), ("bob", "carol", 50), ("alice", "dave", 40)]);
    let (w, outcomes) = run(&mut m, &mut cold, &[passing, transfer("carol", "alice", 1, None)], T0 + 2);
    let Outcome::Batch(Ok(done)) = &outcomes[0] else { panic!("the batch should pass") };
    assert_eq!(done.iter().map(|d| d.id).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(
        done.iter().map(|d| (d.applied.from_balance, d.applied.to_balance)).collect::<Vec<_>>(),
        [(40, 60), (10, 50), (0, 49)]
    );
    assert!(ok(&outcomes[1]), "a command after the batch sees its writes");
    assert_eq!(w.ends.len(), 4);
    let balance = |m: &Machine, id: &str| m.book.get(id).map(|a| a.balance);
    assert_eq!(["alice", "bob", "carol", "dave"].map(|id| balance(&m, id)), [Some(1), Some(10), Some(49), Some(49)]);
}

/// A batch of more than one chunk's records, with an atomic batch that
/// fails across the chunk boundary (its records written, then taken
/// back): the chunks still start every 64 records, each with the hash
/// of the record before it, and the records chain from the head before
/// to the head after.
#[test]
fn chunks_start_every_64_records_whatever_an_atomic_batch_took_back() {
    for before in [62, 63, 64] {
        let (mut m, mut cold) = setup();
        let start = m.head;
        let mut batch: Vec<Command> = (0..before).map(|_| transfer("alice", "bob", 1, None)).collect();
        // Two records written, the third item refused: all three taken back.
        batch.push(atomic(&[("alice", "bob", 1), ("alice", "bob", 1), ("alice", "bob", 1000)]));
        batch.extend((0..5).map(|_| transfer("alice", "bob", 1, None)));
        let (w, outcomes) = run(&mut m, &mut cold, &batch, T0 + 1);
        assert_eq!(outcomes.iter().filter(|o| !ok(o)).count(), 1);
        assert_eq!(w.ends.len(), before + 5);
        assert_eq!(m.head.id, start.id + before as u64 + 5);
        let chunks: Vec<_> = w.chunks().collect();
        assert_eq!(chunks.iter().map(|(first, _)| first - start.id).collect::<Vec<_>>(), [1, 65], "{before}");
        let mut prev = start.hash;
        let mut seen = 0;
        for (first, bytes) in chunks {
            assert_eq!(bytes[0], crate::store::CHUNK_V3);
            assert_eq!(bytes[1..33], prev, "chunk {first} starts with the hash before it");
            for s in crate::store::chunk_records(first, bytes) {
                let s = s.unwrap();
                let r = s.record().unwrap();
                assert_eq!((s.id, s.prev, r.from, r.to, r.amount), (start.id + 1 + seen, prev, "alice", "bob", 1));
                prev = s.hash;
                seen += 1;
            }
        }
        assert_eq!(seen, before as u64 + 5);
        assert_eq!(prev, m.head.hash, "{before}: the records chain to the head");
    }
}

#[test]
fn a_batch_refused_before_the_journal_applies_nothing() {
    let (mut m, mut cold) = setup();
    let before = (m.head, format!("{:?}", m.book));
    let Command::Batch(mut b) = atomic(&[("alice", "bob", 1)]) else { unreachable!() };
    b.refused = Some(ApiError::forbidden("no").at_item(1));
    let (w, outcomes) = run(&mut m, &mut cold, &[Command::Batch(b)], T0 + 1);
    let Outcome::Batch(Err(e)) = &outcomes[0] else { panic!("the batch should fail") };
    assert_eq!((e.code, e.item), (ErrorCode::Forbidden, Some(1)));
    assert_eq!((m.head, format!("{:?}", m.book)), before);
    assert!(w.ends.is_empty());
}

mod batches {
    use proptest::prelude::*;

    use super::*;

    const ACCOUNTS: [&str; 4] = ["alice", "bob", "carol", "dave"];

    fn item() -> impl Strategy<Value = (usize, usize, i64)> {
        (0..ACCOUNTS.len(), 0..ACCOUNTS.len(), 1i64..=80)
    }

    proptest! {
        /// Whatever batches come, atomic or not, in any mix: the sum stays
        /// 0, every balance stays within its bounds, an atomic batch
        /// applies all its items or none, and the head moves by exactly
        /// the records written.
        #[test]
        fn random_batches_keep_the_sum_and_the_bounds(
            batches in prop::collection::vec((any::<bool>(), prop::collection::vec(item(), 1..8)), 1..12),
        ) {
            let (mut m, mut cold) = setup();
            let mut commands = Vec::new();
            for (is_atomic, items) in &batches {
                let items: Vec<(&str, &str, i64)> =
                    items.iter().map(|&(f, t, a)| (ACCOUNTS[f], ACCOUNTS[t], a)).collect();
                if *is_atomic {
                    commands.push(atomic(&items));
                } else {
                    commands.extend(items.iter().map(|&(f, t, a)| transfer(f, t, a, None)));
                }
            }
            let head = m.head.id;
            let (w, outcomes) = run(&mut m, &mut cold, &commands, T0 + 1);
            prop_assert_eq!(m.book.sum(), 0);
            for (id, a) in m.book.iter() {
                if !id.starts_with('@') {
                    prop_assert!((0..=1_000_000).contains(&a.balance), "{} at {}", id, a.balance);
                }
            }
            let mut records = 0;
            for (c, o) in commands.iter().zip(&outcomes) {
                match (c, o) {
                    (Command::Batch(b), Outcome::Batch(Ok(done))) => {
                        prop_assert_eq!(done.len(), b.items.len());
                        records += done.len();
                    }
                    (Command::Batch(b), Outcome::Batch(Err(e))) => {
                        prop_assert!(e.item.is_some_and(|i| i < b.items.len()));
                    }
                    (_, o) => records += usize::from(ok(o)),
                }
            }
            prop_assert_eq!(w.ends.len(), records);
            // Two account numbers per record, a rolled-back batch's included.
            prop_assert_eq!(w.nums.len(), 2 * records);
            prop_assert_eq!(m.head.id, head + records as u64);
        }
    }
}
