//! Two state machines fed the same entries end with the same ledger; a
//! batch decided on another head is skipped by both; a snapshot carries a
//! new member to the same ledger and Raft position.

use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};

use super::*;
use crate::auth::{Principal, Role};
use crate::cluster::Batch;
use crate::contract::{Command, CreateCmd, HoldSpec, SettleCmd, SettleOp, TransferCmd};
use crate::journal::commit::RedbCold;
use crate::journal::machine::Machine;
use crate::ledger::{FeeRounding, Kind, Mode};
use crate::reply::ReplyTo;
use crate::store::AccountMeta;
use crate::wire::Shape;

const T0: u64 = 1_800_000_000_000;

fn create(account: &str, initial: i64) -> Command {
    Command::Create(Box::new(CreateCmd {
        account: account.into(),
        meta: AccountMeta { created: T0, ..AccountMeta::default() },
        initial,
        user: None,
        by: "admin".into(),
        reply: ReplyTo::channel().0,
    }))
}

fn transfer(from: &str, to: &str, amount: i64, key: &str) -> Command {
    Command::Transfer(Box::new(TransferCmd {
        kind: Kind::Transfer,
        from: from.into(),
        from_num: None,
        to: to.into(),
        amount,
        fee: 0,
        memo: None,
        key: Some(key.into()),
        mode: Mode::Unreserved,
        shape: Shape::Transfer,
        hold: None,
        by: Some(Principal::user("admin", Role::Admin).user),
        reply: ReplyTo::channel().0,
    }))
}

fn hold(from: &str, to: &str, amount: i64) -> Command {
    let Command::Transfer(mut t) = transfer(from, to, amount, "") else { unreachable!() };
    t.kind = Kind::Hold;
    t.key = None;
    t.shape = Shape::Hold { expires_at: 0 };
    t.hold = Some(Box::new(HoldSpec { expires_at: 0, fee_bps: 0, redeem: None }));
    Command::Transfer(t)
}

fn settle(hold: u64, op: SettleOp) -> Command {
    let by = Some(Principal::user("admin", Role::Admin));
    Command::Settle(Box::new(SettleCmd { hold, op, by, note: None, reply: ReplyTo::channel().0 }))
}

struct Member {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    machine: LedgerMachine,
}

fn member() -> Member {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("tally.redb")).unwrap());
    let machine = LedgerMachine::open(store.clone(), Limits::default()).unwrap();
    Member { _dir: dir, store, machine }
}

fn audit(m: &Member) -> crate::wire::AuditReply {
    store::audit(&m.store.db().unwrap(), m.store.history()).unwrap()
}

fn entry(index: u64, d: &DecidedRef<'_>) -> Entry<TypeConfig> {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(Batch(d.encode())) }
}

/// The leader's journal: decides `batch` on `leader`'s applied state.
fn decide(journal: &mut Machine, leader: &Member, batch: &[Command], time: u64) -> (Head, Writes) {
    let base = journal.head;
    let mut w = Writes::default();
    let db = leader.store.db().unwrap();
    journal.apply(&RedbCold::new(&db), batch, time, &mut w).unwrap();
    (base, w)
}

fn journal_on(m: &Member) -> Machine {
    let loaded = store::load(&m.store.db().unwrap(), Limits::default()).unwrap();
    Machine { book: loaded.book, head: loaded.head, expiring: Default::default(), fee_rounding: FeeRounding::Down }
}

#[tokio::test]
async fn members_fed_the_same_entries_end_with_the_same_ledger_and_skip_stale_batches_alike() {
    let (mut a, mut b) = (member(), member());
    let mut journal = journal_on(&a);
    let batches = [
        vec![create("alice", 500), create("bob", 0)],
        vec![transfer("alice", "bob", 120, "k1"), transfer("bob", "alice", 20, "k2")],
        vec![transfer("alice", "bob", 1_000, "k3"), create("carol", 7)],
    ];
    let mut index = 0;
    let mut stale = None;
    for (i, batch) in batches.iter().enumerate() {
        let (base, writes) = decide(&mut journal, &a, batch, T0 + i as u64);
        index += 1;
        let seq = index - 1;
        let e = entry(index, &DecidedRef { seq, base, head: journal.head, writes: &writes });
        if i == 1 {
            // Kept to be proposed again once the head has moved past it.
            stale = Some((seq, base, writes.clone(), journal.head));
        }
        assert_eq!(a.machine.apply(vec![e.clone()]).await.unwrap(), vec![Verdict::Applied]);
        assert_eq!(b.machine.apply(vec![e]).await.unwrap(), vec![Verdict::Applied]);
    }
    let before = audit(&a);
    // Two mints (alice's 500, carol's 7; bob starts at 0) and two
    // transfers; the 1,000 was refused.
    assert_eq!((before.transfers, before.sum, before.chain_ok), (4, 0, true));
    assert_eq!(before, audit(&b));
    let loaded = store::load(&b.store.db().unwrap(), Limits::default()).unwrap();
    assert_eq!(loaded.book.get("alice").map(|x| x.balance), Some(400));
    assert_eq!(loaded.book.get("bob").map(|x| x.balance), Some(100));
    assert_eq!(loaded.head, journal.head);

    let (seq, base, writes, head) = stale.unwrap();
    index += 1;
    let e = entry(index, &DecidedRef { seq, base, head, writes: &writes });
    assert_eq!(a.machine.apply(vec![e.clone()]).await.unwrap(), vec![Verdict::Stale]);
    assert_eq!(b.machine.apply(vec![e]).await.unwrap(), vec![Verdict::Stale]);
    assert_eq!(audit(&a), before);
    assert_eq!(audit(&b), before);

    // A batch that writes no record leaves the head alone: proposed twice
    // (a journal restarted while its first proposal was still in the log),
    // it applies once, and the second is skipped alike.
    let (base, writes) = decide(&mut journal, &a, &[create("dave", 0)], T0 + 9);
    assert_eq!(base, journal.head);
    index += 1;
    let once = entry(index, &DecidedRef { seq: 3, base, head: journal.head, writes: &writes });
    index += 1;
    let twice = entry(index, &DecidedRef { seq: 3, base, head: journal.head, writes: &writes });
    for m in [&mut a, &mut b] {
        assert_eq!(
            m.machine.apply(vec![once.clone(), twice.clone()]).await.unwrap(),
            vec![Verdict::Applied, Verdict::Stale]
        );
    }
    assert_eq!(audit(&a), audit(&b));
    assert_eq!(audit(&a).accounts, before.accounts + 1);
    assert_eq!(batches_applied(&b.store.db().unwrap()).unwrap(), 4);
    let (applied, _) = b.machine.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(index));

    // The position survives a reopen with the ledger it belongs to.
    let reopened = LedgerMachine::open(b.store.clone(), Limits::default()).unwrap();
    let (again, _) = { reopened }.applied_state().await.unwrap();
    assert_eq!(again, applied);
}

#[tokio::test]
async fn a_snapshot_carries_a_new_member_to_the_same_ledger_and_position() {
    let (mut a, mut c) = (member(), member());
    let mut journal = journal_on(&a);
    let (base, writes) = decide(&mut journal, &a, &[create("alice", 50), create("bob", 5)], T0);
    let e = entry(1, &DecidedRef { seq: 0, base, head: journal.head, writes: &writes });
    a.machine.apply(vec![e]).await.unwrap();
    let (base, writes) = decide(&mut journal, &a, &[transfer("alice", "bob", 8, "k")], T0 + 1);
    a.machine.apply(vec![entry(2, &DecidedRef { seq: 1, base, head: journal.head, writes: &writes })]).await.unwrap();

    let snap = a.machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));
    c.machine.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(audit(&c), audit(&a));
    assert_eq!(c.machine.applied_state().await.unwrap().0, snap.meta.last_log_id);
    let current = c.machine.get_current_snapshot().await.unwrap().expect("the installed snapshot");
    assert_eq!(current.meta, snap.meta);

    // The new member applies what comes after the snapshot.
    let (base, writes) = decide(&mut journal, &a, &[transfer("bob", "alice", 3, "k2")], T0 + 2);
    let e = entry(3, &DecidedRef { seq: 2, base, head: journal.head, writes: &writes });
    assert_eq!(a.machine.apply(vec![e.clone()]).await.unwrap(), vec![Verdict::Applied]);
    assert_eq!(c.machine.apply(vec![e]).await.unwrap(), vec![Verdict::Applied]);
    assert_eq!(audit(&c), audit(&a));
}

/// A snapshot from a member not yet upgraded keeps one balance row per
/// account: an upgraded member checks it, installs it with its rows moved
/// into blocks, and holds the same ledger as the leader.
#[tokio::test]
async fn a_snapshot_with_rows_of_one_account_each_installs_in_blocks() {
    use crate::store::balances::{Rows, BALANCE_BLOCKS};
    let (mut a, mut c) = (member(), member());
    let mut journal = journal_on(&a);
    let (base, writes) = decide(&mut journal, &a, &[create("alice", 50), create("bob", 5)], T0);
    a.machine.apply(vec![entry(1, &DecidedRef { seq: 0, base, head: journal.head, writes: &writes })]).await.unwrap();
    let (base, writes) = decide(&mut journal, &a, &[transfer("alice", "bob", 8, "k")], T0 + 1);
    a.machine.apply(vec![entry(2, &DecidedRef { seq: 1, base, head: journal.head, writes: &writes })]).await.unwrap();
    let snap = a.machine.get_snapshot_builder().await.build_snapshot().await.unwrap();

    // The snapshot as an older leader would have sent it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.redb");
    std::fs::write(&path, snap.snapshot.get_ref()).unwrap();
    let old = redb::Database::open(&path).unwrap();
    let mut rows = Vec::new();
    Rows::open(&old.begin_read().unwrap())
        .unwrap()
        .for_each(|num, row| {
            rows.push((num, row));
            Ok(())
        })
        .unwrap();
    assert!(rows.iter().any(|&(_, (balance, last))| balance == 42 && last > 0), "alice's row: {rows:?}");
    let txn = old.begin_write().unwrap();
    assert!(txn.delete_table(BALANCE_BLOCKS).unwrap());
    assert!(txn.delete_table(redb::TableDefinition::<&str, &str>::new("balances")).unwrap());
    {
        let mut legacy = txn.open_table(redb::TableDefinition::<u32, (i64, u64)>::new("balances")).unwrap();
        for (num, row) in &rows {
            legacy.insert(num, row).unwrap();
        }
    }
    txn.commit().unwrap();
    assert!(matches!(Rows::open(&old.begin_read().unwrap()).unwrap(), Rows::Legacy(_)));
    drop(old);

    let bytes = std::fs::read(&path).unwrap();
    c.machine.install_snapshot(&snap.meta, Box::new(std::io::Cursor::new(bytes))).await.unwrap();
    assert_eq!(audit(&c), audit(&a));
    assert!(matches!(Rows::open(&c.store.db().unwrap().begin_read().unwrap()).unwrap(), Rows::Blocks(_)));
    let (base, writes) = decide(&mut journal, &a, &[transfer("bob", "alice", 3, "k2")], T0 + 2);
    let e = entry(3, &DecidedRef { seq: 2, base, head: journal.head, writes: &writes });
    assert_eq!(a.machine.apply(vec![e.clone()]).await.unwrap(), vec![Verdict::Applied]);
    assert_eq!(c.machine.apply(vec![e]).await.unwrap(), vec![Verdict::Applied]);
    assert_eq!(audit(&c), audit(&a));
    let balance = |m: &Member, id| m.machine.read(|book, _| Ok(book.get(id).map(|x| x.balance))).unwrap();
    assert_eq!((balance(&c, "alice"), balance(&c, "bob")), (Some(45), Some(10)));
}

/// Followers answer stale reads from the machine's book: after every
/// batch, holds opened, posted and voided included, its balances, held
/// amounts and last records are what a start-up would load from the same
/// database, and what the deciding journal holds.
#[tokio::test]
async fn the_book_a_follower_reads_from_is_the_one_its_database_loads() {
    let mut a = member();
    let mut journal = journal_on(&a);
    let mut opened: Vec<u64> = Vec::new();
    for i in 0..5u64 {
        // A hold is a record: the next one's id is the head's next.
        let next = journal.head.id + 1;
        let batch = match i {
            0 => vec![create("alice", 500), create("bob", 0), create("carol", 0)],
            1 => vec![hold("alice", "bob", 30), hold("alice", "carol", 20), transfer("alice", "bob", 5, "k1")],
            2 => vec![settle(opened[0], SettleOp::Post(None)), settle(opened[1], SettleOp::Void)],
            // Opened and posted in one batch: nothing stays held.
            3 => vec![hold("bob", "carol", 7), settle(next, SettleOp::Post(Some(3)))],
            _ => vec![hold("bob", "alice", 11)],
        };
        let (base, writes) = decide(&mut journal, &a, &batch, T0 + i);
        opened.extend(writes.open_holds.iter().filter(|(_, &open)| open).map(|(&id, _)| id));
        let open_flags: Vec<bool> = writes.open_holds.values().copied().collect();
        let want_flags = match i {
            1 => vec![true, true],
            2 => vec![false, false],
            3 => vec![false],
            4 => vec![true],
            _ => vec![],
        };
        assert_eq!(open_flags, want_flags, "batch {i} opens and closes what it should");
        let e = entry(i + 1, &DecidedRef { seq: i, base, head: journal.head, writes: &writes });
        assert_eq!(a.machine.apply(vec![e]).await.unwrap(), vec![Verdict::Applied]);
        let loaded = store::load(&a.store.db().unwrap(), Limits::default()).unwrap();
        for id in ["alice", "bob", "carol"] {
            let seen =
                a.machine.read(|book, _| Ok(book.get(id).copied())).unwrap().map(|x| (x.balance, x.held, x.last));
            let want = loaded.book.get(id).map(|x| (x.balance, x.held, x.last));
            assert_eq!(seen, want, "{id} after batch {i}");
            assert_eq!(seen, journal.book.get(id).map(|x| (x.balance, x.held, x.last)), "{id} after batch {i}");
        }
    }
    let held = |id| a.machine.read(|book, _| Ok(book.held(id))).unwrap();
    assert_eq!((held("alice"), held("bob"), held("carol")), (0, 11, 0));
}

/// A snapshot's copy is made outside the machine's lock: an entry applies
/// while a build is under way, and the snapshot is the state its read
/// began on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_apply_while_a_snapshot_is_copied() {
    let (mut a, mut c) = (member(), member());
    let mut journal = journal_on(&a);
    let (base, writes) = decide(&mut journal, &a, &[create("alice", 50), create("bob", 5)], T0);
    a.machine.apply(vec![entry(1, &DecidedRef { seq: 0, base, head: journal.head, writes: &writes })]).await.unwrap();
    let before = audit(&a);

    let (arrived_tx, arrived) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    a.machine.build_gate.arm(arrived_tx, go_rx);
    let mut builder = a.machine.get_snapshot_builder().await;
    let building = tokio::spawn(async move { builder.build_snapshot().await });
    tokio::task::spawn_blocking(move || arrived.recv()).await.unwrap().expect("the build began");

    let (base, writes) = decide(&mut journal, &a, &[transfer("alice", "bob", 8, "k")], T0 + 1);
    let e = entry(2, &DecidedRef { seq: 1, base, head: journal.head, writes: &writes });
    let applied = tokio::time::timeout(std::time::Duration::from_secs(10), a.machine.apply(vec![e])).await;
    go.send(()).unwrap();
    assert_eq!(applied.expect("the apply waited for the copy").unwrap(), vec![Verdict::Applied]);

    let snap = building.await.unwrap().unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(1));
    c.machine.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(audit(&c), before);
    assert_ne!(audit(&a), before);
}

/// A user and a key applied while no ledger's registry was handed over
/// (between a new ledger's load and its hand-over) reach the registry
/// handed over next; later ones are pushed to it as they apply.
#[tokio::test]
async fn a_registry_handed_over_holds_users_and_keys_applied_before_it() {
    let mut a = member();
    let head = journal_on(&a).head;
    let user = crate::store::UserRecord {
        user: "ann".into(),
        name: "Ann".into(),
        email: "ann@example.com".into(),
        password_hash: String::new(),
        role: "user".into(),
        group: None,
        events: 0,
        token_epoch: 7,
        revoked_tokens: Vec::new(),
    };
    let key = crate::store::KeyRecord {
        key_id: "k1".into(),
        name: "shop".into(),
        role: "operator".into(),
        accounts: None,
        hash: [0; 32],
        created: T0,
        created_by: "admin".into(),
        expires_at: None,
        revoked_at: None,
        revoked_by: None,
    };
    let mut writes = Writes::default();
    writes.users.insert("ann".into(), user.clone());
    writes.service_keys.insert("k1".into(), key.clone());
    let e = entry(1, &DecidedRef { seq: 0, base: head, head, writes: &writes });
    assert_eq!(a.machine.apply(vec![e]).await.unwrap(), vec![Verdict::Applied]);

    let users = Arc::new(crate::auth::Users::default());
    a.machine.hand_over(users.clone()).unwrap();
    assert_eq!(users.get("ann").map(|u| u.epoch), Some(7));
    assert_eq!(users.key("k1").map(|k| k.revoked), Some(false));

    let mut writes = Writes::default();
    writes.service_keys.insert("k1".into(), crate::store::KeyRecord { revoked_at: Some(T0 + 1), ..key });
    let e = entry(2, &DecidedRef { seq: 1, base: head, head, writes: &writes });
    assert_eq!(a.machine.apply(vec![e]).await.unwrap(), vec![Verdict::Applied]);
    assert_eq!(users.key("k1").map(|k| k.revoked), Some(true));
}

/// A batch that does not fit the ledger (here: records that do not end at
/// the head it names, found after its account was created and its records
/// replayed) is skipped by every member, with nothing of it kept, and the
/// entries after it apply: where it used to stop Raft on every member.
#[tokio::test]
async fn a_batch_that_does_not_fit_is_skipped_whole_and_the_log_goes_on() {
    let (mut a, mut b) = (member(), member());
    let mut journal = journal_on(&a);
    let (base, writes) = decide(&mut journal, &a, &[create("alice", 50), create("bob", 5)], T0);
    let first = entry(1, &DecidedRef { seq: 0, base, head: journal.head, writes: &writes });
    let (base, writes) = decide(&mut journal, &a, &[create("carol", 0), transfer("alice", "carol", 8, "k")], T0 + 1);
    let wrong = Head { id: journal.head.id, hash: [7; 32] };
    let misfit = entry(2, &DecidedRef { seq: 1, base, head: wrong, writes: &writes });
    for m in [&mut a, &mut b] {
        assert_eq!(m.machine.apply(vec![first.clone()]).await.unwrap(), vec![Verdict::Applied]);
    }
    // Decided afresh on what was applied: carol does not exist there.
    let mut journal = journal_on(&a);
    let (base, writes) = decide(&mut journal, &a, &[transfer("alice", "bob", 3, "k2")], T0 + 2);
    let third = entry(3, &DecidedRef { seq: 1, base, head: journal.head, writes: &writes });

    assert_eq!(
        a.machine.apply(vec![misfit.clone(), third.clone()]).await.unwrap(),
        vec![Verdict::Stale, Verdict::Applied]
    );
    assert_eq!(b.machine.apply(vec![misfit]).await.unwrap(), vec![Verdict::Stale]);
    assert_eq!(b.machine.apply(vec![third]).await.unwrap(), vec![Verdict::Applied]);
    assert_eq!(audit(&a), audit(&b));
    let loaded = store::load(&a.store.db().unwrap(), Limits::default()).unwrap();
    assert!(loaded.book.get("carol").is_none());
    for id in ["alice", "bob", "carol"] {
        let seen = a.machine.read(|book, _| Ok(book.get(id).map(|x| (x.balance, x.held, x.last)))).unwrap();
        assert_eq!(seen, loaded.book.get(id).map(|x| (x.balance, x.held, x.last)), "{id}");
    }
    assert_eq!(loaded.book.get("alice").map(|x| x.balance), Some(47));
}

/// A batch carries its parties' account numbers on the deciding book;
/// a member given wrong ones (swapped, off by one, unknown, or none, as
/// in entries written before they existed) looks the ids up instead and
/// ends with the same ledger.
#[tokio::test]
async fn account_numbers_a_batch_carries_are_checked_before_use() {
    let mut a = member();
    let mut others: Vec<Member> = (0..4).map(|_| member()).collect();
    let mut journal = journal_on(&a);
    let batches = [
        vec![create("alice", 500), create("bob", 0), create("carol", 40)],
        vec![transfer("alice", "bob", 120, "k1"), transfer("carol", "alice", 15, "k2"), hold("bob", "carol", 9)],
        vec![transfer("bob", "carol", 30, "k3"), transfer("alice", "carol", 1, "k4")],
    ];
    for (i, batch) in batches.iter().enumerate() {
        let (base, writes) = decide(&mut journal, &a, batch, T0 + i as u64);
        assert_eq!(writes.nums.len(), 2 * writes.ends.len(), "batch {i}: two numbers per record");
        if i == 2 {
            let num = |id| journal.book.num(id).unwrap();
            assert_eq!(writes.nums, vec![num("bob"), num("carol"), num("alice"), num("carol")]);
        }
        let seq = i as u64;
        let e = entry(seq + 1, &DecidedRef { seq, base, head: journal.head, writes: &writes });
        assert_eq!(a.machine.apply(vec![e]).await.unwrap(), vec![Verdict::Applied]);
        let wrong: [Vec<u32>; 4] = [
            writes.nums.chunks(2).flat_map(|p| [p[1], p[0]]).collect(),
            writes.nums.iter().map(|n| n.wrapping_add(1)).collect(),
            vec![u32::MAX; writes.nums.len()],
            Vec::new(),
        ];
        for (m, nums) in others.iter_mut().zip(wrong) {
            let w = Writes { nums, ..writes.clone() };
            let e = entry(seq + 1, &DecidedRef { seq, base, head: journal.head, writes: &w });
            assert_eq!(m.machine.apply(vec![e]).await.unwrap(), vec![Verdict::Applied], "batch {i}");
        }
    }
    let want = a.machine.read(|book, _| Ok(format!("{book:?}"))).unwrap();
    for m in &others {
        assert_eq!(m.machine.read(|book, _| Ok(format!("{book:?}"))).unwrap(), want);
        assert_eq!(audit(m), audit(&a));
    }
}

/// A member's stop closes the machine before it closes the file: what
/// openraft's state-machine worker still sends after that (an entry, a
/// snapshot that would replace and reopen the file) is refused and leaves
/// the file as it was, for the log to bring again at the next start.
#[tokio::test]
async fn a_closed_machine_applies_installs_and_builds_nothing() {
    let (mut a, mut c) = (member(), member());
    let mut journal = journal_on(&a);
    let (base, writes) = decide(&mut journal, &a, &[create("alice", 50)], T0);
    let e = entry(1, &DecidedRef { seq: 0, base, head: journal.head, writes: &writes });
    a.machine.apply(vec![e.clone()]).await.unwrap();
    let snap = a.machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let before = audit(&c);

    c.machine.close().unwrap();
    assert!(c.machine.apply(vec![e]).await.is_err());
    assert!(c.machine.install_snapshot(&snap.meta, snap.snapshot).await.is_err());
    assert!(c.machine.get_snapshot_builder().await.build_snapshot().await.is_err());
    assert!(c.machine.read(|_, _| Ok(())).is_err());
    // Nothing else holds the database: it closes, and reopens unchanged.
    let db = Arc::try_unwrap(c.store.take().unwrap()).expect("no one else holds the database");
    db.close().unwrap();
    let reopened = Store::open(c.store.path()).unwrap();
    assert_eq!(store::audit(&reopened.db().unwrap(), reopened.history()).unwrap(), before);
}

/// A member's stop waits for the copy Raft's state-machine worker holds,
/// not for a snapshot build, which may copy for a long time.
#[tokio::test]
async fn only_the_copy_given_to_raft_is_waited_for() {
    let a = member();
    let (mut copy, worker) = a.machine.for_raft();
    let builder = copy.get_snapshot_builder().await;
    assert_eq!(worker.strong_count(), 1);
    drop(copy);
    assert_eq!(worker.strong_count(), 0);
    drop(builder);
}
