//! The ledger as openraft's state machine: every member, the leader
//! included, writes each committed batch into its own `tally.redb`.
//!
//! Why every member ends with the same ledger:
//!
//! - **One decision, written everywhere.** The leader's journal decides a
//!   batch as a single server does (the pure `journal::machine`) and
//!   proposes what it decided, a [`Decided`]: the records, the rows they
//!   change, the head before and after. Members do not re-run commands;
//!   they write exactly these rows, replay the records onto their balances
//!   (the replay rule start-up uses) and sweep balance rows as the journal
//!   does. So every member's chain of records, and its head, is the
//!   leader's.
//! - **A batch applies only onto the state it was decided on.** A deposed
//!   leader's journal may have decided batches on a state that a new
//!   leader has since moved past; such an entry can still reach the log
//!   (it was appended before the deposition). Every member checks that
//!   the batch was decided after exactly the batches it has applied
//!   (`seq`: every batch moves it on, where a batch of accounts or users
//!   leaves the head alone) and on its head and, failing either, skips the
//!   entry and answers [`Verdict::Stale`]: the same verdict everywhere,
//!   since all apply the same log in the same order from the same state.
//!   So is a batch that does not fit the ledger (records that do not
//!   chain, an account numbered otherwise: a leader's bug), with whatever
//!   it changed in the book undone, rather than an error that would stop
//!   Raft on every member.
//! - **The Raft position is in the same transaction.** The last applied
//!   log id and the membership are written to the ledger's `meta` table in
//!   the transaction that writes the entries, committed with fsync: after
//!   a crash a member is exactly at some applied entry, and openraft
//!   re-applies the committed entries after it (`log.rs` keeps the
//!   committed index), so nothing acknowledged is ever missing. (Applying
//!   without fsync, durable once in N applies, gained nothing measurable
//!   and doubled p99: the durable commit then writes N batches at once.)
//! - **Snapshots are the database.** A snapshot is a consistent copy of
//!   `tally.redb` through one read transaction (`backup`), which carries its
//!   own Raft position; installing one replaces the member's file. The
//!   read transaction is begun under the machine's lock and the copy made
//!   after it is released: applies go on meanwhile (on a large ledger the
//!   copy takes seconds, longer than a proposal may wait).

// openraft's StorageError is what its storage traits return.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StoredMembership,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::log::failed;
use super::{Member, TypeConfig, Verdict};
use crate::journal::commit::{self, Sweep};
use crate::journal::machine::Writes;
use crate::ledger::{Book, BookAccount, Limits};
use crate::store::key_index::KeyPlan;
use crate::store::{self, Head, Store, StoreError};

type Error = StorageError<u64>;

/// The Raft position in the ledger's `meta` table.
const APPLIED: &str = "raft_applied";
const MEMBERSHIP: &str = "raft_membership";
/// How many decided batches were applied (8 bytes BE).
const BATCHES: &str = "raft_batches";

/// One batch as the leader's journal decided it: the payload of a Raft entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Decided {
    /// How many batches had been applied when it was decided: every
    /// applied batch moves this on, where many (accounts, users, keys,
    /// tags) leave the head where it was.
    pub seq: u64,
    /// The head the batch was decided on.
    pub base: Head,
    /// The head after it.
    pub head: Head,
    pub writes: Writes,
}

/// A [`Decided`] to encode, borrowing the journal's writes (same bytes).
#[derive(Serialize)]
pub struct DecidedRef<'a> {
    pub seq: u64,
    pub base: Head,
    pub head: Head,
    pub writes: &'a Writes,
}

impl DecidedRef<'_> {
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a batch always encodes")
    }
}

/// The ledger as a state machine. Clones share it (openraft builds
/// snapshots through a clone).
#[derive(Clone)]
pub struct LedgerMachine {
    inner: Arc<Mutex<Inner>>,
    /// The same store as `inner`'s, readable without its lock (an install
    /// swaps the database inside it).
    store: Arc<Store>,
    /// Set when an apply failed (the book may be ahead of the database,
    /// and Raft stops) or the machine was closed: nothing is read from it
    /// any more.
    broken: Arc<std::sync::atomic::AtomicBool>,
    /// Only on the copy given to Raft ([`LedgerMachine::for_raft`]), which
    /// its state-machine worker holds until it has run everything queued
    /// and quit: a member's stop waits for this to be dropped.
    _in_raft: Option<Arc<()>>,
    /// Where a test holds a snapshot build once its copy is begun.
    #[cfg(test)]
    build_gate: testing::Gate,
}

struct Inner {
    store: Arc<Store>,
    /// The users and keys registry of the ledger running on this member,
    /// if any ([`LedgerMachine::hand_over`]): every applied change of a
    /// user or key goes there too, so that a follower checks tokens and
    /// keys against the cluster's current rows (a revoked key stops
    /// working on every member).
    registry: Option<Arc<crate::auth::Users>>,
    /// Balances and last records only, for the balance rows (the journal
    /// keeps its own book for deciding).
    book: Book,
    head: Head,
    /// Decided batches applied so far ([`Decided::seq`]).
    batches: u64,
    sweep: Sweep,
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, Member>,
    limits: Limits,
    /// The last snapshot built or installed: its meta and file.
    snapshot: Option<(SnapshotMeta<u64, Member>, PathBuf)>,
    /// How many snapshots were built, for their ids.
    built: u64,
    /// Set by [`LedgerMachine::close`]: nothing touches the database any
    /// more.
    closed: bool,
}

impl LedgerMachine {
    /// The state machine over `store`, at the position its database holds.
    pub fn open(store: Arc<Store>, limits: Limits) -> Result<LedgerMachine, StoreError> {
        let db = store.db()?;
        let loaded = store::load(&db, limits)?;
        let (applied, membership) = read_position(&db)?;
        let batches = batches_applied(&db)?;
        drop(db);
        let sweep = Sweep { cursor: 0, from: loaded.head.id, checkpoint: 0 };
        let inner = Inner {
            store,
            registry: None,
            book: loaded.book,
            head: loaded.head,
            batches,
            sweep,
            applied,
            membership,
            limits,
            snapshot: None,
            built: 0,
            closed: false,
        };
        Ok(LedgerMachine {
            store: inner.store.clone(),
            inner: Arc::new(Mutex::new(inner)),
            broken: Arc::default(),
            _in_raft: None,
            #[cfg(test)]
            build_gate: testing::Gate::default(),
        })
    }

    /// Runs `f` on the applied state as of one moment: the book (balances,
    /// held amounts, last records) and the database it was applied to.
    /// Blocks while an apply runs: call it off the async threads.
    /// Followers answer stale reads through it.
    pub fn read<T>(&self, f: impl FnOnce(&Book, &Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        Ok(self.read_at(f)?.0)
    }

    /// The same, with the id of the last record applied at that moment.
    pub fn read_at<T>(
        &self,
        f: impl FnOnce(&Book, &Database) -> Result<T, StoreError>,
    ) -> Result<(T, u64), StoreError> {
        let guard = self.lock()?;
        self.check()?;
        let db = guard.store.db()?;
        Ok((f(&guard.book, &db)?, guard.head.id))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner.lock().map_err(|_| poisoned())
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.broken.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Unavailable);
        }
        Ok(())
    }

    /// The last log entry applied.
    pub fn applied(&self) -> Result<Option<LogId<u64>>, StoreError> {
        Ok(self.lock()?.applied)
    }

    /// The copy to give Raft, and what tells when its state-machine worker
    /// has let go of it: openraft 0.9's `shutdown` does not wait for that
    /// worker, which runs what it has queued (entries to apply, a snapshot
    /// to install) after the core has stopped, then quits.
    #[must_use]
    pub fn for_raft(&self) -> (LedgerMachine, std::sync::Weak<()>) {
        let token = Arc::new(());
        let weak = Arc::downgrade(&token);
        (LedgerMachine { _in_raft: Some(token), ..self.clone() }, weak)
    }

    /// Refuses every apply, install and snapshot build from now on, once
    /// the apply or install running (if any) has ended; reads get
    /// `Unavailable` too. A snapshot build already copying goes on (it
    /// holds the database, which then closes only once it is done).
    ///
    /// For a member's stop, after waiting for Raft's state-machine worker
    /// ([`Self::for_raft`]): if the worker did not finish in time, what it
    /// still runs must not touch the file the server closes (an install
    /// would replace and reopen it). Entries refused here stay in the log
    /// and are applied at the next start. Blocks while an apply runs:
    /// call it off the async threads.
    pub fn close(&self) -> Result<(), StoreError> {
        self.lock()?.closed = true;
        self.broken.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Makes `users` (a ledger just started on this member) the registry
    /// every applied user and key goes to, and fills it from the database
    /// under the machine's lock. The ledger loaded its users before; one
    /// applied in between would otherwise be missed until its next start
    /// (a key revoked there would keep working on this member). Under the
    /// lock no apply interleaves, so no row read here overwrites a newer
    /// one an apply hands over.
    pub fn hand_over(&self, users: Arc<crate::auth::Users>) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if inner.closed {
            return Err(StoreError::Unavailable);
        }
        users.load(&*inner.store.db()?)?;
        inner.registry = Some(users);
        Ok(())
    }

    /// The database applied to, for reads that need no single moment with
    /// the book (records, which never change once written); without the
    /// machine's lock, so such reads never wait for an apply.
    pub fn database(&self) -> Result<Arc<Database>, StoreError> {
        self.check()?;
        self.store.db()
    }

    /// The old records' segments (a member seals none, but reads those of
    /// a folder that has them).
    #[must_use]
    pub fn history(&self) -> &store::History {
        self.store.history()
    }

    /// [`Self::blocking`] for an apply or an install: if it fails, the book
    /// may no longer match the database (one ahead of the other), so
    /// nothing is read from the machine after (marked before the lock is
    /// let go, so no read sees the mismatch).
    async fn changing<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let broken = self.broken.clone();
        self.blocking(move |s| {
            let changed = f(s);
            if changed.is_err() {
                broken.store(true, std::sync::atomic::Ordering::Release);
            }
            changed
        })
        .await
    }

    /// Runs `f` on the state on tokio's blocking pool: it fsyncs.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = inner.lock().map_err(|_| poisoned())?;
            if guard.closed {
                return Err(StoreError::Unavailable);
            }
            f(&mut guard)
        })
        .await
        .map_err(|e| failed(ErrorSubject::StateMachine, ErrorVerb::Write, e))?
        .map_err(|e| failed(ErrorSubject::StateMachine, ErrorVerb::Write, e))
    }
}

fn poisoned() -> StoreError {
    StoreError::Corrupt("the state machine is poisoned".into())
}

/// What fitting a batch to the book changed, to put back if it does not fit.
#[derive(Default)]
struct Undo {
    /// Accounts created, in order.
    created: Vec<String>,
    /// Entries as they were before each change, in order.
    entries: Vec<(u32, BookAccount)>,
}

/// The last applied log id and the membership as of it.
type Position = (Option<LogId<u64>>, StoredMembership<u64, Member>);

/// The Raft position a ledger database holds.
fn read_position(db: &Database) -> Result<Position, StoreError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(store::META)?;
    let applied = match meta.get(APPLIED)? {
        Some(v) => decode(v.value())?,
        None => None,
    };
    let membership = match meta.get(MEMBERSHIP)? {
        Some(v) => decode(v.value())?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// How many decided batches the ledger in `db` has applied: where a
/// leader's journal starts counting.
pub fn batches_applied(db: &Database) -> Result<u64, StoreError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(store::META)?;
    let n = match meta.get(BATCHES)? {
        Some(v) => u64::from_be_bytes(v.value().try_into().map_err(|_| StoreError::Corrupt("raft_batches".into()))?),
        None => 0,
    };
    Ok(n)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("raft position: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("a position always encodes")
}

impl Inner {
    /// Applies entries in one transaction, committed with fsync.
    fn apply(&mut self, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<Verdict>, StoreError> {
        let db = self.store.db()?;
        let mut txn = store::begin_write(&db)?;
        txn.set_durability(Durability::Immediate).map_err(|e| StoreError::Corrupt(format!("durability: {e}")))?;
        let mut verdicts = Vec::with_capacity(entries.len());
        let (mut users, mut keys, mut idempotency) = (Vec::new(), Vec::new(), Vec::new());
        let mut plan = self.store.keys().plan()?;
        for e in entries {
            self.applied = Some(e.log_id);
            let verdict = match e.payload {
                EntryPayload::Blank => Verdict::Applied,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    Verdict::Applied
                }
                EntryPayload::Normal(batch) => match rmp_serde::from_slice::<Decided>(&batch.0) {
                    Ok(d) if d.seq == self.batches && d.base == self.head => {
                        if self.write(&txn, &d, &mut plan)? {
                            self.batches += 1;
                            users.extend(d.writes.users.into_values());
                            keys.extend(d.writes.service_keys.into_values());
                            idempotency.extend(d.writes.keys);
                            Verdict::Applied
                        } else {
                            Verdict::Stale
                        }
                    }
                    Ok(d) => {
                        tracing::warn!(
                            seq = d.seq,
                            batches = self.batches,
                            base = d.base.id,
                            head = self.head.id,
                            "a batch decided on another state is skipped"
                        );
                        Verdict::Stale
                    }
                    Err(err) => {
                        // Every member skips it alike; nobody was told it applied.
                        tracing::error!(error = %err, index = e.log_id.index, "an entry that is not a batch is skipped");
                        Verdict::Stale
                    }
                },
            };
            verdicts.push(verdict);
        }
        {
            let mut meta = txn.open_table(store::META)?;
            meta.insert(APPLIED, encode(&self.applied).as_slice())?;
            meta.insert(MEMBERSHIP, encode(&self.membership).as_slice())?;
            meta.insert(BATCHES, &self.batches.to_be_bytes()[..])?;
        }
        txn.commit()?;
        self.store.keys().committed(plan, idempotency, self.head.id)?;
        if let Some(registry) = &self.registry {
            for u in &users {
                registry.set(&u.user, crate::auth::UserState::of(u));
            }
            for k in &keys {
                registry.set_key(&k.key_id, crate::auth::KeyState::of(k));
            }
        }
        Ok(verdicts)
    }

    /// Writes one decided batch: the accounts it creates, its records
    /// replayed onto the balances (checked to chain from the head), its
    /// rows, a slice of balance rows and its head. `Ok(false)`: the batch
    /// does not fit this ledger (an account numbered otherwise, records
    /// that do not chain, a hold that was not open): nothing of it is kept,
    /// neither in the book nor in the transaction. Every member holds the
    /// same ledger, so every member skips it alike, where an error would
    /// stop Raft on all of them.
    fn write(&mut self, txn: &redb::WriteTransaction, d: &Decided, keys: &mut KeyPlan) -> Result<bool, StoreError> {
        let mut undo = Undo::default();
        match self.fit(txn, d, &mut undo) {
            Ok(()) => {
                commit::put(txn, &d.writes, &mut self.book, d.head, &mut self.sweep, keys)?;
                self.head = d.head;
                Ok(true)
            }
            Err(StoreError::Corrupt(why)) => {
                for (num, before) in undo.entries.into_iter().rev() {
                    self.book.restore_num(num, before);
                }
                for id in undo.created.iter().rev() {
                    self.book.uncreate(id);
                }
                tracing::error!(base = d.base.id, why = %why, "a batch that does not fit this ledger is skipped");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Brings the book to the batch, noting in `undo` what it changed:
    /// the accounts it creates, its records replayed and its holds.
    fn fit(&mut self, txn: &redb::WriteTransaction, d: &Decided, undo: &mut Undo) -> Result<(), StoreError> {
        let corrupt = |what: String| StoreError::Corrupt(format!("batch after {}: {what}", d.base.id));
        let mut created: Vec<(&String, u32)> = d
            .writes
            .accounts
            .iter()
            .filter(|(_, m)| m.num as usize >= self.book.len())
            .map(|(id, m)| (id, m.num))
            .collect();
        created.sort_unstable_by_key(|&(_, num)| num);
        for (id, num) in created {
            let got = self.book.create(id).map_err(|e| corrupt(e.to_string()))?;
            undo.created.push(id.clone());
            if got != num {
                return Err(corrupt(format!("account {id} is number {num} here, {got} on the leader")));
            }
        }
        let mut prev = self.head;
        let mut count = 0;
        for (i, stored) in d.writes.each_record().enumerate() {
            let stored = stored?;
            let (id, r) = (stored.id, stored.record()?);
            // The rows stored and the sweep go by `ends`: each record must
            // end where `ends` says, so what was checked is what is stored.
            let end = stored.bytes.as_ptr() as usize + stored.bytes.len() - d.writes.records.as_ptr() as usize;
            if d.writes.ends.get(i) != Some(&end) {
                return Err(corrupt(format!("record {id} does not end where the entry says")));
            }
            count += 1;
            if r.id != id || id != prev.id + 1 || r.prev != prev.hash {
                return Err(corrupt(format!("record {id} does not chain")));
            }
            let nums = d.writes.nums_of(i);
            store::replay_noting(&mut self.book, &r, nums, |num, before| undo.entries.push((num, before)))?;
            prev = Head { id, hash: stored.hash };
        }
        if prev != d.head || count != d.writes.ends.len() {
            return Err(corrupt("its records do not end at its head".into()));
        }
        self.hold_changes(txn, d, undo)
    }

    /// What the batch's holds do to the held amounts of the book (which
    /// followers' stale reads answer from): an opened hold holds its
    /// amount on its payer, a closed one gives it back. Checked against
    /// the open-hold index before the batch's rows are written, since a
    /// hold opened and closed in one batch changes nothing.
    fn hold_changes(&mut self, txn: &redb::WriteTransaction, d: &Decided, undo: &mut Undo) -> Result<(), StoreError> {
        if d.writes.open_holds.is_empty() {
            return Ok(());
        }
        let open_now = txn.open_table(store::OPEN_HOLDS)?;
        for (id, &open) in &d.writes.open_holds {
            let was = open_now.get(*id)?.is_some();
            if open == was {
                continue;
            }
            let h = d.writes.holds.get(id).ok_or_else(|| StoreError::Corrupt(format!("hold {id} has no row")))?;
            let corrupt = || StoreError::Corrupt(format!("held on {}", h.hold.from));
            let num = self.book.num(&h.hold.from).ok_or_else(corrupt)?;
            let before = *self.book.by_num(num).ok_or_else(corrupt)?;
            let delta = if open { h.hold.amount } else { -h.hold.amount };
            let held = before.held.checked_add(delta).filter(|&v| v >= 0).ok_or_else(corrupt)?;
            undo.entries.push((num, before));
            self.book.restore_num(num, BookAccount { held, ..before });
        }
        Ok(())
    }

    /// Replaces the database with a snapshot's, and the state with its.
    fn install(&mut self, meta: &SnapshotMeta<u64, Member>, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = self.store.path().with_extension("snapshots");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("installing.redb");
        std::fs::write(&path, bytes)?;
        std::fs::File::open(&path)?.sync_all()?;
        // Check it before anything is replaced.
        let check = Database::open(&path)?;
        let loaded = store::load(&check, self.limits)?;
        let (applied, membership) = read_position(&check)?;
        let batches = batches_applied(&check)?;
        drop(check);
        if applied != meta.last_log_id {
            return Err(StoreError::Corrupt("a snapshot whose position is not its meta's".into()));
        }
        let live = self.store.path().to_owned();
        let retired = self.store.take();
        if let Some(db) = retired {
            drop(db);
        }
        let swapped = std::fs::rename(&path, &live)
            .and_then(|()| std::fs::File::open(live.parent().unwrap_or(&live))?.sync_all());
        // Whatever happened, the live file is opened again (the snapshot's if
        // it was renamed, the old one otherwise) rather than left closed.
        self.store.put(Arc::new(store::open(&live)?))?;
        swapped?;
        self.book = loaded.book;
        self.head = loaded.head;
        self.batches = batches;
        self.sweep = Sweep { cursor: 0, from: loaded.head.id, checkpoint: 0 };
        self.applied = applied;
        self.membership = membership;
        tracing::info!(head = self.head.id, index = applied.map_or(0, |l| l.index), "installed a snapshot");
        let kept = dir.join(format!("installed-{}.redb", meta.snapshot_id));
        let _ = std::fs::remove_file(&kept);
        self.store.db().and_then(|db| store::backup(&db, self.store.history(), &kept).map(|_| ()))?;
        if let Some((_, old)) = self.snapshot.replace((meta.clone(), kept)) {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }
}

impl LedgerMachine {
    /// A consistent copy of the database, with the position it holds;
    /// the lock is held only to begin the copy's read transaction.
    fn build(&self) -> Result<(SnapshotMeta<u64, Member>, Vec<u8>), StoreError> {
        let (db, src, store, built, path) = {
            let mut inner = self.lock()?;
            if inner.closed {
                return Err(StoreError::Unavailable);
            }
            let db = inner.store.db()?;
            let src = db.begin_read()?;
            let store = inner.store.clone();
            let dir = inner.store.path().with_extension("snapshots");
            std::fs::create_dir_all(&dir)?;
            inner.built += 1;
            let built = inner.built;
            (db, src, store, built, dir.join(format!("built-{built}.redb")))
        };
        #[cfg(test)]
        self.build_gate.pass();
        let _ = std::fs::remove_file(&path);
        store::backup_txn(&src, store.history(), &path)?;
        drop(src);
        drop(db);
        let copy = Database::open(&path)?;
        let (applied, membership) = read_position(&copy)?;
        drop(copy);
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!("{}-{built}", applied.map_or(0, |l| l.index)),
        };
        let bytes = std::fs::read(&path)?;
        let mut inner = self.lock()?;
        // A snapshot installed meanwhile is newer than this one: keep it.
        let newer = inner.snapshot.as_ref().is_some_and(|(m, _)| m.last_log_id > meta.last_log_id);
        if newer {
            let _ = std::fs::remove_file(&path);
        } else if let Some((_, old)) = inner.snapshot.replace((meta.clone(), path)) {
            let _ = std::fs::remove_file(old);
        }
        Ok((meta, bytes))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for LedgerMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let machine = self.clone();
        let (meta, bytes) = tokio::task::spawn_blocking(move || machine.build())
            .await
            .map_err(|e| failed(ErrorSubject::StateMachine, ErrorVerb::Read, e))?
            .map_err(|e| failed(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for LedgerMachine {
    type SnapshotBuilder = LedgerMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, Member>), Error> {
        self.blocking(|s| Ok((s.applied, s.membership.clone()))).await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Verdict>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        self.changing(move |s| s.apply(entries)).await
    }

    async fn get_snapshot_builder(&mut self) -> LedgerMachine {
        // A build may copy for a long time: a stop does not wait for it.
        LedgerMachine { _in_raft: None, ..self.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let meta = meta.clone();
        let bytes = snapshot.into_inner();
        self.changing(move |s| s.install(&meta, &bytes)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        self.blocking(|s| {
            let Some((meta, path)) = &s.snapshot else { return Ok(None) };
            let bytes = std::fs::read(path)?;
            Ok(Some(Snapshot { meta: meta.clone(), snapshot: Box::new(Cursor::new(bytes)) }))
        })
        .await
    }
}

#[cfg(test)]
mod testing {
    use std::sync::mpsc::{Receiver, Sender};
    use std::sync::{Arc, Mutex};

    /// Where a build says it arrived, and what it waits on.
    type Armed = (Sender<()>, Receiver<()>);

    /// Once armed, the next snapshot build says it arrived and waits.
    #[derive(Clone, Default)]
    pub struct Gate(Arc<Mutex<Option<Armed>>>);

    impl Gate {
        pub fn arm(&self, arrived: Sender<()>, go: Receiver<()>) {
            *self.0.lock().unwrap() = Some((arrived, go));
        }

        pub fn pass(&self) {
            let armed = self.0.lock().unwrap().take();
            if let Some((arrived, go)) = armed {
                let _ = arrived.send(());
                let _ = go.recv();
            }
        }
    }
}

#[cfg(test)]
mod tests;
