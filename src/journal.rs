//! The journal: the one thread that writes redb, committing in groups.
//!
//! It takes every command queued since its last commit (up to
//! `commit_batch_max`), applies them in order to the [`Book`] and to one
//! write transaction, and commits with `Durability::Immediate` (fsync). Only
//! then does the fan-out task tell the owning shards what changed and
//! answer the clients. An idle journal commits at once; under load the queue
//! fills while it syncs, so batches grow by themselves.
//!
//! The queue is an unbounded channel whose depth is bounded all the same: a
//! command exists only for a request holding one of the server's
//! `inflight_max` permits.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use redb::{Database, Durability, ReadableTable};

use crate::auth::Principal;
use crate::auth::{UserState, Users};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{
    is_system, net_fee, Applied, Book, FeeRounding, Hold, HoldStatus, Kind, LedgerError, Mode, Status, MINT, TREASURY,
};
use crate::protocol::{AccountView, Reply, TransferView};
use crate::reply::ReplyTo;
use crate::shard::{Effect, ShardMsg, ShardRouter};
use crate::stats::Stats;
use crate::store::{
    self, AccountMeta, Head, HoldRecord, RecordRef, RedeemRecord, RedeemStatus, Store, StoreError, UserRecord,
};

/// A full sweep of the balance rows completes within about this many
/// records, which bounds the replay at start-up to about twice as many.
/// Each commit sweeps a slice in proportion to the records it wrote, so the
/// sweep costs the same per transfer whatever the batch size: small batches
/// under a pulsing load no longer each pay for a fixed slice, and an account
/// changed many times in one sweep has its row written once.
const SWEEP_RECORDS: usize = 262_144;
/// How long the journal waits for work before it sweeps on its own.
const IDLE_SWEEP_AFTER: std::time::Duration = std::time::Duration::from_millis(50);
/// The fewest account numbers a commit that wrote records sweeps.
const SWEEP_CHUNK_MIN: usize = 256;
/// The fewest account numbers a commit without records (the idle journal
/// catching up) sweeps.
const SWEEP_CHUNK_IDLE: usize = 4096;
/// An idle journal catches up in at most this many commits.
const SWEEP_IDLE_COMMITS: usize = 64;

/// A transfer whose source has been checked (and, with `Mode::Reserved`,
/// reserved) by its owner.
pub struct TransferCmd {
    pub kind: Kind,
    pub from: Box<str>,
    /// The source's number in the book, as its owner knows it (a hint).
    pub from_num: Option<u32>,
    pub to: Box<str>,
    pub amount: i64,
    pub fee: i64,
    pub memo: Option<Box<str>>,
    pub key: Option<Box<str>>,
    pub mode: Mode,
    /// What the reply looks like.
    pub shape: Shape,
    /// Set for a `hold` (kind `Hold`): its terms.
    pub hold: Option<Box<HoldSpec>>,
    pub reply: ReplyTo,
}

/// The terms of a hold beyond its source, destination and amount.
#[derive(Clone, Debug, Default)]
pub struct HoldSpec {
    /// Voided automatically from this time on (ms since the epoch); 0: never.
    pub expires_at: u64,
    /// The fee rate its post pays (a user's hold to another user).
    pub fee_bps: u32,
    /// Set when the hold backs a redeem request.
    pub redeem: Option<RedeemSpec>,
}

#[derive(Clone, Debug)]
pub struct RedeemSpec {
    pub user: String,
    pub item: String,
}

/// Settles a hold: `post`, `void`, its timeout, or an admin's decision on
/// the redeem request behind it.
pub struct SettleCmd {
    pub hold: u64,
    pub op: SettleOp,
    /// Who asks (`None`: the journal's own timer).
    pub by: Option<Principal>,
    pub note: Option<String>,
    pub reply: ReplyTo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleOp {
    /// Post this much (default: all); the rest is released.
    Post(Option<i64>),
    Void,
    /// The hold's timeout passed.
    Expire,
    /// `decide_redeem`: accept (post all to `@redeemed`) or reject (void).
    Decide {
        accept: bool,
    },
}

/// The reply a committed transfer gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The transfer record with both balances.
    Transfer,
    /// `add`: `{account, balance, change, transfer}`.
    Add { account: Box<str>, delta: i64 },
    /// `hold`: `{hold, status, expires_at, transfer}`.
    Hold { expires_at: u64 },
    /// A confirmed `redeem`: the new request.
    Redeem { user: Box<str>, item: Box<str>, memo: Option<Box<str>> },
}

/// The reply to a committed transfer (or a repeat of its key), in the shape
/// its op answers with. A repeat read back from disk carries no balances.
#[must_use]
pub fn shape_reply(shape: &Shape, v: Arc<TransferView>) -> Reply {
    match shape {
        Shape::Transfer => Reply::Transfer(v),
        Shape::Add { account, delta } => {
            let balance = if *delta > 0 { v.to_balance } else { v.from_balance };
            Reply::Json(
                serde_json::json!({ "account": account, "balance": balance, "change": delta, "transfer": v.id }),
            )
        }
        Shape::Hold { expires_at } => Reply::Json(serde_json::json!({
            "hold": v.id,
            "from": v.from,
            "to": v.to,
            "amount": v.amount,
            "status": HoldStatus::Open.as_str(),
            "expires_at": (*expires_at > 0).then_some(*expires_at),
            "transfer": &*v,
        })),
        Shape::Redeem { user, item, memo } => Reply::Json(serde_json::json!({
            "request": v.id,
            "user": user,
            "account": v.from,
            "item": item,
            "amount": v.amount,
            "memo": memo,
            "status": RedeemStatus::Pending.as_str(),
            "created": v.time,
        })),
    }
}

/// `delete_account`: move the balance to `@mint` and leave a tombstone.
pub struct CloseCmd {
    pub account: Box<str>,
    pub reason: String,
    pub reply: ReplyTo,
}

/// `tag`: change an account's tags.
pub struct TagCmd {
    pub account: Box<str>,
    pub add: Vec<String>,
    pub remove: Vec<String>,
    pub reply: ReplyTo,
}

/// `bulk_add`: add `delta` to every open account with `tag`, all or nothing.
pub struct BulkCmd {
    pub tag: String,
    pub delta: i64,
    pub memo: Option<String>,
    pub force: bool,
    pub reply: ReplyTo,
}

/// `reap`: delete every open client account whose balance is below `below`.
pub struct ReapCmd {
    pub below: i64,
    pub reason: String,
    pub reply: ReplyTo,
}

/// A new account, checked by its owner.
pub struct CreateCmd {
    pub account: Box<str>,
    pub meta: AccountMeta,
    /// Comes from `@mint` in the same transaction.
    pub initial: i64,
    /// Set for `signup`: the user created together with the account.
    pub user: Option<Box<UserRecord>>,
    pub reply: ReplyTo,
}

/// A change to one user's record.
pub enum UserChange {
    /// Revoke every token issued so far.
    NewEpoch,
    /// Set a new password hash (which also revokes every token).
    Password(String),
    /// Set the user's `events` (admin `set_events`).
    Events(u64),
}

/// A user change, answered through `done` once committed (the caller
/// awaits it: login, logout and password changes finish before the
/// connection's next request).
pub struct UserCmd {
    pub user: Box<str>,
    pub change: UserChange,
    pub done: tokio::sync::oneshot::Sender<Result<UserRecord, ApiError>>,
}

pub enum Command {
    // Boxed: commands are moved several times on their way (channel, batch,
    // outcome, fan-out), and a pointer is cheaper to move than ~200 bytes.
    Transfer(Box<TransferCmd>),
    Create(Box<CreateCmd>),
    User(Box<UserCmd>),
    Close(Box<CloseCmd>),
    Tag(Box<TagCmd>),
    Bulk(Box<BulkCmd>),
    Reap(Box<ReapCmd>),
    Settle(Box<SettleCmd>),
    /// Commit what is queued, write a full checkpoint, stop, then answer.
    Shutdown(tokio::sync::oneshot::Sender<()>),
    /// `health`: answered once the batch it rides in is committed (or not).
    Probe(tokio::sync::oneshot::Sender<Result<(), ApiError>>),
}

impl Command {
    /// The reply of an admin command (close, tag, bulk, reap, settle);
    /// `None` for the others, which answer in their own shapes.
    #[must_use]
    pub fn admin_reply(self) -> Option<ReplyTo> {
        match self {
            Command::Close(c) => Some(c.reply),
            Command::Tag(c) => Some(c.reply),
            Command::Bulk(c) => Some(c.reply),
            Command::Reap(c) => Some(c.reply),
            Command::Settle(c) => Some(c.reply),
            Command::Transfer(_) | Command::Create(_) | Command::User(_) | Command::Shutdown(_) | Command::Probe(_) => {
                None
            }
        }
    }
}

/// What a committed transfer got.
pub struct Done {
    pub id: u64,
    pub time: u64,
    pub prev: [u8; 32],
    pub hash: [u8; 32],
    pub applied: Applied,
}

enum Outcome {
    /// A transfer, and the user whose `events` a `mint` counted up.
    Transfer(Box<TransferCmd>, Result<Done, ApiError>, Option<Box<UserRecord>>),
    Create(Box<CreateCmd>, Result<Option<Done>, ApiError>),
    User(Box<UserCmd>, Result<Box<UserRecord>, ApiError>),
    /// An admin change: its reply, and the changes owners must hear of.
    Admin(ReplyTo, Result<(Reply, Vec<AdminEffect>), ApiError>),
    /// A `health` probe: whether its batch committed.
    Probe(tokio::sync::oneshot::Sender<Result<(), ApiError>>, Result<(), ApiError>),
}

/// What an admin change did to one account, for its owner.
enum AdminEffect {
    /// A committed transfer the owners did not reserve.
    Moved {
        from: Box<str>,
        to: Box<str>,
        amount: i64,
        id: u64,
    },
    Deleted(Box<str>),
    Tagged(Box<str>, Vec<String>),
    /// What is held on the account changed by `delta`.
    Held {
        account: Box<str>,
        delta: i64,
    },
}

/// Handle used by shards to queue commands.
#[derive(Clone)]
pub struct JournalHandle {
    tx: Sender<Command>,
}

impl JournalHandle {
    /// Queues a command; gives it back if the journal has stopped.
    pub fn send(&self, cmd: Command) -> Result<(), Box<Command>> {
        self.tx.send(cmd).map_err(|e| Box::new(e.into_inner()))
    }

    /// Commands waiting for the journal.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.tx.len()
    }
}

/// Creates the journal's queue.
#[must_use]
pub fn channel() -> (JournalHandle, Receiver<Command>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (JournalHandle { tx }, rx)
}

/// Whether the journal can commit, for the `health` op: shared between
/// the journal (which sets it) and every connection (which reads it).
#[derive(Default)]
pub struct Health {
    /// Why the journal cannot commit; `None` while it can.
    failure: std::sync::Mutex<Option<String>>,
    /// When a commit last succeeded, ms since the Unix epoch.
    last_commit_ms: std::sync::atomic::AtomicU64,
}

impl Health {
    /// `Err(reason)` while the journal cannot commit.
    pub fn status(&self) -> Result<(), String> {
        match self.failure.lock() {
            Ok(f) => f.clone().map_or(Ok(()), Err),
            Err(_) => Err("the health state is poisoned".into()),
        }
    }

    /// When a commit last succeeded (ms since the epoch; 0: none yet).
    #[must_use]
    pub fn last_commit_ms(&self) -> u64 {
        self.last_commit_ms.load(std::sync::atomic::Ordering::Acquire)
    }

    fn committed(&self, now_ms: u64) {
        self.last_commit_ms.store(now_ms, std::sync::atomic::Ordering::Release);
        if let Ok(mut f) = self.failure.lock() {
            if f.is_some() {
                *f = None;
            }
        }
    }

    fn failing(&self, reason: String) {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(reason);
        }
    }
}

/// How often a journal that cannot commit tries to reopen the database.
const RECOVERY_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// The answer of every command while the journal cannot commit.
fn unavailable() -> ApiError {
    ApiError::new(ErrorCode::Unavailable, "the journal could not commit; nothing was changed; try again shortly")
}

/// A journal that cannot commit: why, and the database it took out of the
/// store, kept until every reader has let go of it.
struct Failure {
    reason: String,
    retired: Option<Arc<Database>>,
}

pub struct Journal {
    store: Arc<Store>,
    book: Book,
    head: Head,
    batch_max: usize,
    stats: Arc<Stats>,
    health: Arc<Health>,
    /// Next account number the balance-row sweep writes.
    sweep_cursor: u32,
    /// The head when the current sweep began: once it completes, every
    /// balance row includes all transfers up to here.
    sweep_from: u64,
    /// Every balance row includes all transfers up to here (as last written).
    checkpoint: u64,
    /// Open holds with a timeout: (expires_at, hold id).
    expiring: std::collections::BTreeSet<(u64, u64)>,
    /// How a posted hold's fee rounds (`policy.fee_rounding`).
    fee_rounding: FeeRounding,
    /// Set while the journal cannot commit.
    failure: Option<Failure>,
}

/// What the journal starts from.
pub struct JournalArgs {
    pub store: Arc<Store>,
    /// The ledger as loaded at start-up.
    pub loaded: store::Loaded,
    pub batch_max: usize,
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
    pub fee_rounding: FeeRounding,
}

impl Journal {
    #[must_use]
    pub fn new(a: JournalArgs) -> Journal {
        let store::Loaded { book, head, expiring, .. } = a.loaded;
        Journal {
            store: a.store,
            book,
            head,
            batch_max: a.batch_max,
            stats: a.stats,
            health: a.health,
            sweep_cursor: 0,
            sweep_from: head.id,
            checkpoint: 0,
            expiring: expiring.into_iter().collect(),
            fee_rounding: a.fee_rounding,
            failure: None,
        }
    }

    /// Runs until every [`JournalHandle`] is dropped or a
    /// [`Command::Shutdown`] arrives, then writes a full checkpoint and
    /// returns. Committed batches go to `fanout` in commit order.
    pub fn run(mut self, rx: &Receiver<Command>, fanout: &tokio::sync::mpsc::UnboundedSender<OutcomeBatch>) {
        let mut batch: Vec<Command> = Vec::with_capacity(self.batch_max);
        let mut buf = Vec::with_capacity(512);
        loop {
            if self.failure.is_some() {
                match self.run_failing(rx, fanout, &mut buf) {
                    Some(()) => continue,
                    None => return,
                }
            }
            self.due_holds(&mut batch);
            if batch.is_empty() {
                match rx.recv_timeout(self.idle_wait()) {
                    Ok(c) => batch.push(c),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        self.catch_up(rx, &mut buf);
                        continue;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
            }
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let mut stops = Vec::new();
            batch.retain_mut(|c| match c {
                Command::Shutdown(done) => {
                    let (placeholder, _) = tokio::sync::oneshot::channel();
                    stops.push(std::mem::replace(done, placeholder));
                    false
                }
                _ => true,
            });
            let outcomes = self.commit(&mut batch, &mut buf);
            if fanout.send(OutcomeBatch(outcomes)).is_err() {
                break;
            }
            if !stops.is_empty() {
                self.stop();
                for done in stops {
                    let _ = done.send(());
                }
                return;
            }
        }
        self.stop();
    }

    /// One round of a journal that cannot commit: refuses whatever is
    /// queued (`unavailable`, through the fan-out so that owners release
    /// their reservations), and now and then tries to reopen the database.
    /// `None` when the journal must stop.
    fn run_failing(
        &mut self,
        rx: &Receiver<Command>,
        fanout: &tokio::sync::mpsc::UnboundedSender<OutcomeBatch>,
        buf: &mut Vec<u8>,
    ) -> Option<()> {
        let first = match rx.recv_timeout(RECOVERY_RETRY) {
            Ok(c) => Some(c),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return None,
        };
        let mut refused_now = Vec::new();
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            if let Command::Shutdown(done) = cmd {
                let _ = fanout.send(OutcomeBatch(refused_now));
                tracing::warn!("stopping while the journal cannot commit; the next start recovers");
                let _ = done.send(());
                return None;
            }
            refused_now.extend(refused(cmd, &unavailable()));
        }
        if !refused_now.is_empty() && fanout.send(OutcomeBatch(refused_now)).is_err() {
            return None;
        }
        self.try_recover(buf);
        Some(())
    }

    /// Records a failed commit: health turns failing, and the database is
    /// taken out of the store to be reopened (redb refuses everything after
    /// an IO error until then).
    fn fail(&mut self, e: &StoreError) {
        let reason = e.to_string();
        tracing::error!(error = %reason, "the journal cannot commit; refusing writes until the storage recovers");
        self.health.failing(reason.clone());
        let retired = self.store.take();
        self.failure = Some(Failure { reason, retired });
    }

    /// Tries once to reopen the database and carry on from what it holds.
    fn try_recover(&mut self, buf: &mut Vec<u8>) {
        let Some(failure) = self.failure.as_mut() else { return };
        if let Some(old) = failure.retired.take() {
            if Arc::strong_count(&old) > 1 {
                // A reader (a backup, a page of history) still holds it.
                failure.retired = Some(old);
                return;
            }
            drop(old);
        }
        let db = match store::open(self.store.path()) {
            Ok(db) => db,
            Err(e) => {
                if e.to_string() != failure.reason {
                    tracing::warn!(error = %e, "the database cannot be reopened yet");
                    failure.reason = e.to_string();
                    self.health.failing(failure.reason.clone());
                }
                return;
            }
        };
        let loaded = match store::load(&db, self.book.limits) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "the reopened database cannot be loaded yet");
                return;
            }
        };
        if loaded.head != self.head {
            // The failed commit reached the disk after all, so its commands
            // were refused but applied: the owners' views are wrong. Only a
            // fresh start rebuilds everything from the disk.
            tracing::error!(
                disk = loaded.head.id,
                memory = self.head.id,
                "a commit reported as failed is on disk; stopping so that a restart rebuilds the ledger"
            );
            std::process::abort();
        }
        self.book = loaded.book;
        self.expiring = loaded.expiring.into_iter().collect();
        self.sweep_cursor = 0;
        self.sweep_from = self.head.id;
        self.store.put(Arc::new(db));
        // Healthy only once a commit has gone through.
        let reason = self.failure.take().map(|f| f.reason).unwrap_or_default();
        let mut none = Vec::new();
        let outcomes = self.commit(&mut none, buf);
        debug_assert!(outcomes.is_empty());
        if self.failure.is_none() {
            tracing::warn!(after = %reason, "the storage recovered; the journal commits again");
        }
    }

    /// Queues a void for every hold whose timeout has passed (at most a
    /// batch's worth at a time).
    fn due_holds(&mut self, batch: &mut Vec<Command>) {
        let now = store::now_ms();
        while batch.len() < self.batch_max {
            let Some(&(expires_at, hold)) = self.expiring.first() else { break };
            if expires_at > now {
                break;
            }
            self.expiring.pop_first();
            // Nobody waits for this answer.
            let (reply, _) = ReplyTo::channel();
            batch.push(Command::Settle(Box::new(SettleCmd {
                hold,
                op: SettleOp::Expire,
                by: None,
                note: None,
                reply,
            })));
        }
    }

    /// How long to wait for work: until the next hold expires, at most
    /// until the idle sweep.
    fn idle_wait(&self) -> std::time::Duration {
        let now = store::now_ms();
        self.expiring.first().map_or(IDLE_SWEEP_AFTER, |&(at, _)| {
            IDLE_SWEEP_AFTER.min(std::time::Duration::from_millis(at.saturating_sub(now)))
        })
    }

    /// While idle, keeps sweeping until the checkpoint reaches the head, so
    /// that start-up, `audit` and `list_accounts` replay almost nothing.
    /// Stops as soon as real work arrives.
    fn catch_up(&mut self, rx: &Receiver<Command>, buf: &mut Vec<u8>) {
        while self.checkpoint < self.head.id && rx.is_empty() && self.failure.is_none() {
            let before = (self.checkpoint, self.sweep_cursor);
            let mut none = Vec::new();
            let outcomes = self.commit(&mut none, buf);
            debug_assert!(outcomes.is_empty());
            if (self.checkpoint, self.sweep_cursor) == before {
                // The commit failed (it was logged): try again on the next
                // idle period rather than spinning on a sick disk.
                break;
            }
        }
    }

    /// Leaves a full checkpoint, so the next start replays nothing.
    fn stop(&mut self) {
        if let Err(e) = self.final_checkpoint() {
            tracing::warn!(error = %e, "final checkpoint failed; the next start replays the tail");
        }
        tracing::info!(head = self.head.id, "journal stopped");
    }

    fn commit(&mut self, batch: &mut Vec<Command>, buf: &mut Vec<u8>) -> Vec<Outcome> {
        // Start loading every book entry the batch's transfers touch, so
        // their cache misses overlap instead of stalling one by one.
        for c in batch.iter() {
            if let Command::Transfer(t) = c {
                self.book.prefetch(&t.from, t.from_num);
                self.book.prefetch(&t.to, None);
            }
        }
        let head_before = self.head;
        let items = batch.len() as u64;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut commands = batch.drain(..);
        let written = self.write(&mut commands, buf, &mut outcomes);
        if let Err(e) = written {
            // Every command still gets an answer: those not reached too.
            let failed = unavailable();
            outcomes.extend(commands.filter_map(|c| refused(c, &failed)));
            // Nothing of this batch reached the disk: the book goes back to
            // what did when the database is reopened (see `try_recover`).
            self.head = head_before;
            for o in &mut outcomes {
                match o {
                    Outcome::Transfer(_, r, rewarded) => {
                        *r = Err(failed.clone());
                        *rewarded = None;
                    }
                    Outcome::Create(_, r) => *r = Err(failed.clone()),
                    Outcome::User(_, r) => *r = Err(failed.clone()),
                    Outcome::Admin(_, r) => *r = Err(failed.clone()),
                    Outcome::Probe(_, r) => *r = Err(failed.clone()),
                }
            }
            self.fail(&e);
            return outcomes;
        }
        self.health.committed(store::now_ms());
        self.stats.record_batch(items, self.head.id - head_before.id);
        outcomes
    }

    /// Appends one record: links it into its parties' histories, hashes it
    /// onto the chain and moves the head.
    fn append(
        &mut self,
        t: &mut Tables<'_>,
        buf: &mut Vec<u8>,
        fields: Fields<'_>,
        applied: Applied,
    ) -> Result<Done, StoreError> {
        let id = self.head.id + 1;
        let links = match applied.nums {
            Some((f, t)) => self.book.link_nums(id, f, t, fields.fee > 0),
            None => self.book.link(id, fields.from, fields.to, fields.fee > 0),
        };
        let rec = RecordRef {
            id,
            kind: fields.kind,
            from: fields.from,
            to: fields.to,
            amount: fields.amount,
            fee: fields.fee,
            memo: fields.memo,
            time: fields.time,
            key: fields.key,
            prev: &self.head.hash,
            links,
        };
        buf.clear();
        rec.encode(buf);
        let hash = store::record_hash(buf);
        t.pending.push(&mut t.chunks, id, buf)?;
        if let Some(key) = fields.key {
            t.keys.insert((fields.from, key), id)?;
        }
        let prev = self.head.hash;
        self.head = Head { id, hash };
        Ok(Done { id, time: fields.time, prev, hash, applied })
    }

    /// Writes every dirty balance row and a checkpoint at the head.
    fn final_checkpoint(&mut self) -> Result<(), StoreError> {
        let db = self.store.db()?;
        let txn = store::begin_write(&db)?;
        let all = u32::try_from(self.book.len()).unwrap_or(u32::MAX);
        store::write_rows(&txn, &mut self.book, 0..all)?;
        store::write_checkpoint(&txn, self.head.id)?;
        txn.commit()?;
        self.checkpoint = self.head.id;
        Ok(())
    }

    /// Writes the next slice of balance rows; completes the sweep (and moves
    /// the checkpoint) when the slice reaches the last account.
    fn sweep(&mut self, txn: &redb::WriteTransaction, records: u64) -> Result<(), StoreError> {
        let len = self.book.len();
        let chunk = sweep_chunk(len, usize::try_from(records).unwrap_or(usize::MAX));
        let start = self.sweep_cursor as usize;
        let end = (start + chunk).min(len);
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        store::write_rows(txn, &mut self.book, to_u32(start)..to_u32(end))?;
        if end >= len {
            store::write_checkpoint(txn, self.sweep_from)?;
            self.checkpoint = self.sweep_from;
            self.sweep_cursor = 0;
            // The next sweep covers everything this commit adds.
            self.sweep_from = self.head.id;
        } else {
            self.sweep_cursor = to_u32(end);
        }
        Ok(())
    }

    fn write(
        &mut self,
        commands: &mut impl Iterator<Item = Command>,
        buf: &mut Vec<u8>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        let head_before = self.head.id;
        let db = self.store.db()?;
        let mut txn = store::begin_write(&db)?;
        txn.set_durability(Durability::Immediate).map_err(|e| StoreError::Corrupt(format!("durability: {e}")))?;
        {
            let mut tables = Tables {
                chunks: txn.open_table(store::CHUNKS)?,
                pending: store::ChunkWriter::default(),
                keys: txn.open_table(store::KEYS)?,
                accounts: txn.open_table(store::ACCOUNTS)?,
                users: txn.open_table(store::USERS)?,
                tags: txn.open_table(store::TAGS)?,
                owners: txn.open_table(store::OWNERS)?,
                holds: txn.open_table(store::HOLDS)?,
                open_holds: txn.open_table(store::OPEN_HOLDS)?,
                redeems: txn.open_table(store::REDEEMS)?,
                user_redeems: txn.open_table(store::USER_REDEEMS)?,
            };
            let time = store::now_ms();
            for cmd in commands.by_ref() {
                self.apply(&mut tables, buf, time, cmd, outcomes)?;
            }
            tables.pending.flush(&mut tables.chunks)?;
            self.sweep(&txn, self.head.id - head_before)?;
            let mut meta = txn.open_table(store::META)?;
            meta.insert("head", &self.head.encode()[..])?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Applies one command and records its outcome, also when storage fails
    /// (then the outcome is an error and the whole commit is abandoned).
    fn apply(
        &mut self,
        t: &mut Tables<'_>,
        buf: &mut Vec<u8>,
        time: u64,
        cmd: Command,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        match cmd {
            Command::Transfer(c) => {
                let (r, e) = split(self.apply_transfer(t, buf, time, &c));
                let (r, rewarded) = match r {
                    Ok((done, rewarded)) => (Ok(done), rewarded),
                    Err(e) => (Err(e), None),
                };
                outcomes.push(Outcome::Transfer(c, r, rewarded));
                e
            }
            Command::Create(mut c) => {
                let (r, e) = split(self.apply_create(t, buf, time, &mut c));
                outcomes.push(Outcome::Create(c, r));
                e
            }
            Command::User(u) => {
                let (r, e) = split(apply_user(t, &u));
                outcomes.push(Outcome::User(u, r.map(Box::new)));
                e
            }
            Command::Close(c) => {
                let r = self.close(t, buf, time, &c.account, &c.reason).map(|r| {
                    r.map(|(deleted, effects)| (Reply::Json(serde_json::json!({ "deleted": deleted })), effects))
                });
                let (r, e) = split(r);
                outcomes.push(Outcome::Admin(c.reply, r));
                e
            }
            Command::Tag(c) => {
                let (r, e) = split(self.tag(t, &c.account, &c.add, &c.remove));
                outcomes.push(Outcome::Admin(c.reply, r));
                e
            }
            Command::Bulk(c) => {
                let (r, e) = split(self.bulk(t, buf, time, &c));
                outcomes.push(Outcome::Admin(c.reply, r));
                e
            }
            Command::Reap(c) => {
                let (r, e) = split(self.reap(t, buf, time, c.below, &c.reason));
                outcomes.push(Outcome::Admin(c.reply, r));
                e
            }
            Command::Settle(c) => {
                let (r, e) = split(self.settle_hold(t, buf, time, &c));
                outcomes.push(Outcome::Admin(c.reply, r));
                e
            }
            // Taken out of the batch before writing.
            Command::Shutdown(done) => {
                let _ = done.send(());
                Ok(())
            }
            // Answered when the batch is committed.
            Command::Probe(done) => {
                outcomes.push(Outcome::Probe(done, Ok(())));
                Ok(())
            }
        }
    }

    /// Applies a transfer; a `mint` to a user's account also counts one
    /// event for that user (SPEC: events = rewards received).
    fn apply_transfer(
        &mut self,
        t: &mut Tables<'_>,
        buf: &mut Vec<u8>,
        time: u64,
        c: &TransferCmd,
    ) -> Admin<(Done, Option<Box<UserRecord>>)> {
        if c.kind == Kind::Hold {
            return self.apply_hold(t, buf, time, c);
        }
        let applied = match self.book.transfer_hinted(&c.from, c.from_num, &c.to, c.amount, c.fee, c.mode) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e.into())),
        };
        let done = self.append(t, buf, Fields::of(c, time), applied)?;
        let rewarded = if c.kind == Kind::Mint { count_event(t, &c.to)? } else { None };
        Ok(Ok((done, rewarded)))
    }

    /// Both balances as they stand, for a record that moves nothing.
    fn balances(&self, from: &str, to: &str) -> Applied {
        let balance = |id: &str| self.book.get(id).map_or(0, |a| a.balance);
        Applied { from_balance: balance(from), to_balance: balance(to), nums: None }
    }

    /// A hold: nothing moves, the amount stops being spendable on `from`,
    /// and the hold (with its redeem request, if any) is written down.
    fn apply_hold(
        &mut self,
        t: &mut Tables<'_>,
        buf: &mut Vec<u8>,
        time: u64,
        c: &TransferCmd,
    ) -> Admin<(Done, Option<Box<UserRecord>>)> {
        let spec = c.hold.as_deref().cloned().unwrap_or_default();
        if let Err(e) = self.book.hold(&c.from, &c.to, c.amount) {
            return Ok(Err(e.into()));
        }
        let applied = self.balances(&c.from, &c.to);
        let done = self.append(t, buf, Fields::of(c, time), applied)?;
        let record = HoldRecord {
            id: done.id,
            hold: Hold::new(&c.from, &c.to, c.amount),
            memo: c.memo.as_deref().map(str::to_owned),
            expires_at: spec.expires_at,
            fee_bps: spec.fee_bps,
            redeem: spec.redeem.is_some(),
            created: time,
        };
        t.holds.insert(done.id, &record.encode()[..])?;
        t.open_holds.insert(done.id, ())?;
        if let Some(r) = &spec.redeem {
            let request = RedeemRecord {
                request: done.id,
                user: r.user.clone(),
                account: c.from.to_string(),
                item: r.item.clone(),
                amount: c.amount,
                memo: record.memo.clone(),
                status: RedeemStatus::Pending,
                created: time,
                decided_by: None,
                decided_at: None,
                note: None,
                settled_by: None,
            };
            t.redeems.insert(done.id, &request.encode()[..])?;
            t.user_redeems.insert((r.user.as_str(), done.id), ())?;
        }
        if spec.expires_at > 0 {
            self.expiring.insert((spec.expires_at, done.id));
        }
        Ok(Ok((done, None)))
    }

    /// Posts or voids a hold, exactly once, for its source's owner or an
    /// admin (a redeem's hold only through `decide_redeem`), or when its
    /// timeout has passed.
    fn settle_hold(
        &mut self,
        t: &mut Tables<'_>,
        buf: &mut Vec<u8>,
        time: u64,
        c: &SettleCmd,
    ) -> Admin<(Reply, Vec<AdminEffect>)> {
        let refuse = |e: ApiError| Ok(Err(e));
        let Some(mut record) = t.holds.get(c.hold)?.map(|v| HoldRecord::decode(v.value())).transpose()? else {
            return refuse(ApiError::not_found(format!("hold {}", c.hold)));
        };
        let mut request = if record.redeem {
            t.redeems.get(c.hold)?.map(|v| RedeemRecord::decode(v.value())).transpose()?
        } else {
            None
        };
        let due = record.hold.status == HoldStatus::Open && record.expires_at > 0 && time >= record.expires_at;
        if c.op == SettleOp::Expire && !due {
            // Settled in the meantime: nothing to do.
            return refuse(ApiError::bad_request("not due"));
        }
        match (c.op, &c.by) {
            (SettleOp::Expire, _) => {}
            (SettleOp::Decide { .. }, _) => {
                let Some(r) = &request else {
                    return refuse(ApiError::not_found(format!("redeem request {}", c.hold)));
                };
                if r.status != RedeemStatus::Pending {
                    let status = r.status.as_str();
                    return refuse(LedgerError::NotAllowed(format!("request {} was already {status}", c.hold)).into());
                }
            }
            (_, _) if record.redeem => {
                return refuse(ApiError::forbidden("a redeem's hold is settled by decide_redeem"));
            }
            (_, Some(p)) if !p.is_admin() => {
                let owner = t.meta(&record.hold.from)?.and_then(|m| m.owner);
                if owner.as_deref() != Some(&*p.user) {
                    return refuse(ApiError::forbidden(format!("hold {} is not yours", c.hold)));
                }
            }
            _ => {}
        }
        let (from, to, held) = (record.hold.from.clone(), record.hold.to.clone(), record.hold.amount);
        let post = match c.op {
            SettleOp::Post(x) => Some(x),
            SettleOp::Decide { accept: true } => Some(None),
            _ => None,
        };
        // A post moves `x` (its fee to `@treasury`) and releases the rest; a
        // void releases everything and moves nothing. Either way the hold
        // stops counting against `from`.
        let (kind, amount, fee, applied) = if let Some(x) = post {
            let x = match record.hold.post_amount(x) {
                Ok(x) => x,
                Err(e) => return refuse(e.into()),
            };
            let fee = if is_system(&to) {
                0
            } else {
                match net_fee(x, record.fee_bps, self.fee_rounding) {
                    Ok(f) => f,
                    Err(e) => return refuse(e.into()),
                }
            };
            match self.book.post(&from, &to, held, x, fee) {
                Ok(applied) => {
                    record.hold.posted(x);
                    (Kind::Post, x, fee, applied)
                }
                Err(e) => return refuse(e.into()),
            }
        } else {
            if let Err(e) = record.hold.void() {
                return refuse(e.into());
            }
            self.book.release(&from, held);
            (Kind::Void, held, 0, self.balances(&from, &to))
        };
        let memo = format!("hold {}", c.hold);
        let fields = Fields { kind, from: &from, to: &to, amount, fee, memo: Some(&memo), key: None, time };
        let done = self.append(t, buf, fields, applied)?;
        let moved = if kind == Kind::Post { amount - fee } else { 0 };
        // A zero move still tells both owners of the record (their history).
        let mut effects = vec![
            AdminEffect::Held { account: from.as_str().into(), delta: -held },
            AdminEffect::Moved { from: from.as_str().into(), to: to.as_str().into(), amount: moved, id: done.id },
        ];
        if fee > 0 {
            effects.push(AdminEffect::Moved {
                from: from.as_str().into(),
                to: TREASURY.into(),
                amount: fee,
                id: done.id,
            });
        }
        self.expiring.remove(&(record.expires_at, c.hold));
        t.holds.insert(c.hold, &record.encode()[..])?;
        t.open_holds.remove(c.hold)?;
        let reply = match (&mut request, c.op) {
            (Some(r), SettleOp::Decide { accept }) => {
                r.status = if accept { RedeemStatus::Accepted } else { RedeemStatus::Rejected };
                r.decided_by = c.by.as_ref().map(|p| p.user.to_string());
                r.decided_at = Some(time);
                r.note.clone_from(&c.note);
                r.settled_by = Some(done.id);
                t.redeems.insert(c.hold, &r.encode()[..])?;
                Reply::Json(serde_json::to_value(&*r).unwrap_or_default())
            }
            _ => {
                let view = TransferView {
                    id: done.id,
                    kind,
                    from,
                    to,
                    amount,
                    fee,
                    memo: Some(memo),
                    time,
                    key: None,
                    prev: crate::protocol::Hash32(done.prev),
                    hash: crate::protocol::Hash32(done.hash),
                    from_balance: Some(done.applied.from_balance),
                    to_balance: Some(done.applied.to_balance),
                };
                Reply::Json(serde_json::json!({
                    "hold": c.hold,
                    "status": record.hold.status.as_str(),
                    "posted": record.hold.posted,
                    "released": record.hold.released,
                    "transfer": view,
                }))
            }
        };
        Ok(Ok((reply, effects)))
    }

    /// Creates an account (and, for a signup, its user), funded from `@mint`
    /// in the same step.
    fn apply_create(
        &mut self,
        t: &mut Tables<'_>,
        buf: &mut Vec<u8>,
        time: u64,
        c: &mut CreateCmd,
    ) -> Admin<Option<Done>> {
        if let Some(u) = &c.user {
            if t.users.get(u.user.as_str())?.is_some() {
                return Ok(Err(ApiError::new(ErrorCode::Exists, format!("user {} exists", c.account))));
            }
        }
        let num = match self.book.create(&c.account) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e.into())),
        };
        c.meta.num = num;
        if c.initial > 0 {
            let applied = match self.book.transfer(MINT, &c.account, c.initial, 0, Mode::Unreserved) {
                Ok(a) => a,
                Err(e) => {
                    // The account and its funding are one step: undo the create.
                    self.book.uncreate(&c.account);
                    return Ok(Err(e.into()));
                }
            };
            if let Some(u) = &c.user {
                t.users.insert(u.user.as_str(), &u.encode()[..])?;
            }
            t.put_account(&c.account, &c.meta)?;
            let fields = Fields {
                kind: Kind::Mint,
                from: MINT,
                to: &c.account,
                amount: c.initial,
                fee: 0,
                memo: c.meta.memo.as_deref(),
                key: None,
                time,
            };
            return Ok(Ok(Some(self.append(t, buf, fields, applied)?)));
        }
        if let Some(u) = &c.user {
            t.users.insert(u.user.as_str(), &u.encode()[..])?;
        }
        t.put_account(&c.account, &c.meta)?;
        Ok(Ok(None))
    }
}

/// Counts one event for the user owning `account`, if any.
fn count_event(t: &mut Tables<'_>, account: &str) -> Result<Option<Box<UserRecord>>, StoreError> {
    let Some(meta) = t.accounts.get(account)?.map(|v| AccountMeta::decode(v.value())).transpose()? else {
        return Ok(None);
    };
    let Some(owner) = meta.owner else { return Ok(None) };
    let Some(mut user) = t.users.get(owner.as_str())?.map(|v| UserRecord::decode(v.value())).transpose()? else {
        return Ok(None);
    };
    user.events = user.events.saturating_add(1);
    t.users.insert(owner.as_str(), &user.encode()[..])?;
    Ok(Some(Box::new(user)))
}

/// Revokes a user's tokens (and maybe sets a new password hash), or sets
/// their events.
fn apply_user(t: &mut Tables<'_>, u: &UserCmd) -> Admin<UserRecord> {
    let existing = t.users.get(&*u.user)?.map(|v| UserRecord::decode(v.value())).transpose()?;
    let Some(mut record) = existing else {
        return Ok(Err(ApiError::not_found(format!("user {}", u.user))));
    };
    match &u.change {
        UserChange::NewEpoch => record.token_epoch += 1,
        UserChange::Password(hash) => {
            record.password_hash.clone_from(hash);
            record.token_epoch += 1;
        }
        // An admin's count of events attended; tokens stay valid.
        UserChange::Events(n) => record.events = *n,
    }
    t.users.insert(&*u.user, &record.encode()[..])?;
    Ok(Ok(record))
}

/// Separates a command's own result from a storage failure that fails the
/// whole commit (the command is then answered with an error too).
fn split<T>(r: Admin<T>) -> (Result<T, ApiError>, Result<(), StoreError>) {
    match r {
        Ok(r) => (r, Ok(())),
        Err(e) => (Err(ApiError::internal("the journal could not commit; nothing was changed")), Err(e)),
    }
}

/// The refusal of a command the journal will not apply.
fn refused(cmd: Command, error: &ApiError) -> Option<Outcome> {
    Some(match cmd {
        Command::Transfer(c) => Outcome::Transfer(c, Err(error.clone()), None),
        Command::Create(c) => Outcome::Create(c, Err(error.clone())),
        Command::User(u) => Outcome::User(u, Err(error.clone())),
        Command::Probe(done) => Outcome::Probe(done, Err(error.clone())),
        Command::Shutdown(done) => {
            let _ = done.send(());
            return None;
        }
        admin => Outcome::Admin(admin.admin_reply()?, Err(error.clone())),
    })
}

/// How many account numbers a commit that wrote `records` records sweeps,
/// of `len`: a full sweep takes about [`SWEEP_RECORDS`] records.
fn sweep_chunk(len: usize, records: usize) -> usize {
    if records == 0 {
        return (len / SWEEP_IDLE_COMMITS).max(SWEEP_CHUNK_IDLE);
    }
    len.saturating_mul(records).div_ceil(SWEEP_RECORDS).max(SWEEP_CHUNK_MIN)
}

/// The tables one commit writes.
struct Tables<'t> {
    chunks: redb::Table<'t, u64, &'static [u8]>,
    /// This commit's records not yet inserted (a chunk is inserted when full).
    pending: store::ChunkWriter,
    keys: redb::Table<'t, (&'static str, &'static str), u64>,
    accounts: redb::Table<'t, &'static str, &'static [u8]>,
    users: redb::Table<'t, &'static str, &'static [u8]>,
    tags: redb::Table<'t, (&'static str, &'static str), ()>,
    owners: redb::Table<'t, (&'static str, &'static str), ()>,
    holds: redb::Table<'t, u64, &'static [u8]>,
    open_holds: redb::Table<'t, u64, ()>,
    redeems: redb::Table<'t, u64, &'static [u8]>,
    user_redeems: redb::Table<'t, (&'static str, u64), ()>,
}

impl Tables<'_> {
    /// Writes an account's metadata and its owner and tag index entries.
    fn put_account(&mut self, id: &str, meta: &AccountMeta) -> Result<(), StoreError> {
        self.accounts.insert(id, &meta.encode()[..])?;
        if let Some(owner) = &meta.owner {
            self.owners.insert((owner.as_str(), id), ())?;
        }
        for tag in &meta.tags {
            self.tags.insert((tag.as_str(), id), ())?;
        }
        Ok(())
    }

    fn meta(&self, id: &str) -> Result<Option<AccountMeta>, StoreError> {
        self.accounts.get(id)?.map(|v| AccountMeta::decode(v.value())).transpose()
    }
}

/// A user error, or a storage error that fails the whole commit.
type Admin<T> = Result<Result<T, ApiError>, StoreError>;

impl Journal {
    /// Moves an account's whole balance to `@mint` (a `close` record) and
    /// leaves a tombstone with the reason. `Ok(false)` if it was already gone.
    fn close(
        &mut self,
        t: &mut Tables<'_>,
        buf: &mut Vec<u8>,
        time: u64,
        account: &str,
        reason: &str,
    ) -> Admin<(bool, Vec<AdminEffect>)> {
        if is_system(account) {
            return Ok(Err(ApiError::forbidden("system accounts cannot be deleted")));
        }
        let Some(a) = self.book.get(account).copied() else {
            return Ok(Err(ApiError::not_found(format!("account {account}"))));
        };
        if a.status == Status::Deleted {
            return Ok(Ok((false, Vec::new())));
        }
        if a.held > 0 {
            return Ok(Err(LedgerError::NotAllowed(format!(
                "{account} has {} held by open holds: post or void them first",
                a.held
            ))
            .into()));
        }
        let mut effects = Vec::new();
        if a.balance != 0 {
            let (from, to) = if a.balance > 0 { (account, MINT) } else { (MINT, account) };
            let Some(amount) = a.balance.checked_abs() else {
                return Ok(Err(ApiError::bad_request("balance cannot be closed")));
            };
            let applied = match self.book.transfer(from, to, amount, 0, Mode::Force) {
                Ok(a) => a,
                Err(e) => return Ok(Err(e.into())),
            };
            let fields = Fields { kind: Kind::Close, from, to, amount, fee: 0, memo: Some(reason), key: None, time };
            let done = self.append(t, buf, fields, applied)?;
            effects.push(AdminEffect::Moved { from: from.into(), to: to.into(), amount, id: done.id });
        }
        self.book.delete(account);
        let mut meta = t.meta(account)?.ok_or_else(|| StoreError::Corrupt(format!("no metadata for {account}")))?;
        meta.deleted = Some(store::Tombstone { reason: reason.to_owned(), time });
        t.accounts.insert(account, &meta.encode()[..])?;
        effects.push(AdminEffect::Deleted(account.into()));
        Ok(Ok((true, effects)))
    }

    /// Adds and removes tags, keeping the tag index in step.
    fn tag(
        &mut self,
        t: &mut Tables<'_>,
        account: &str,
        add: &[String],
        remove: &[String],
    ) -> Admin<(Reply, Vec<AdminEffect>)> {
        let Some(mut meta) = t.meta(account)? else {
            return Ok(Err(ApiError::not_found(format!("account {account}"))));
        };
        if meta.deleted.is_some() {
            return Ok(Err(ApiError::new(ErrorCode::Deleted, format!("account {account} was deleted"))));
        }
        let mut tags: std::collections::BTreeSet<String> = meta.tags.iter().cloned().collect();
        for r in remove {
            tags.remove(r);
        }
        tags.extend(add.iter().cloned());
        if tags.len() > crate::constants::TAGS_PER_ACCOUNT_MAX {
            return Ok(Err(ApiError::bad_request(format!("at most {} tags", crate::constants::TAGS_PER_ACCOUNT_MAX))));
        }
        for old in &meta.tags {
            if !tags.contains(old) {
                t.tags.remove((old.as_str(), account))?;
            }
        }
        for new in &tags {
            t.tags.insert((new.as_str(), account), ())?;
        }
        meta.tags = tags.into_iter().collect();
        t.accounts.insert(account, &meta.encode()[..])?;
        let reply = Reply::Json(serde_json::json!({ "account": account, "tags": meta.tags }));
        Ok(Ok((reply, vec![AdminEffect::Tagged(account.into(), meta.tags)])))
    }

    /// Adds `delta` to every open account with the tag: checks all first,
    /// then applies all, so it is all or nothing. With `force` the bounds are
    /// ignored (overflow never is).
    fn bulk(
        &mut self,
        t: &mut Tables<'_>,
        buf: &mut Vec<u8>,
        time: u64,
        c: &BulkCmd,
    ) -> Admin<(Reply, Vec<AdminEffect>)> {
        let mut members = Vec::new();
        for row in t.tags.range((c.tag.as_str(), "")..)? {
            let (k, ()) = row.map(|(k, v)| (k, v.value()))?;
            let (tag, account) = k.value();
            if tag != c.tag {
                break;
            }
            if self.book.get(account).is_some_and(|a| a.status == Status::Open) {
                members.push(account.to_owned());
            }
        }
        let n = i64::try_from(members.len()).unwrap_or(i64::MAX);
        let mint = self.book.get(MINT).map_or(0, |a| a.balance);
        if c.delta.checked_mul(n).and_then(|total| mint.checked_sub(total)).is_none() {
            return Ok(Err(ApiError::new(ErrorCode::BelowMin, "the total would overflow @mint")));
        }
        for account in &members {
            let a = self.book.get(account).copied().unwrap_or(crate::ledger::BookAccount::new(0, Status::Open, 0));
            let bounds =
                if c.force { crate::ledger::Bounds { min: None, max: None } } else { self.book.limits.bounds(account) };
            if let Err(e) = crate::ledger::adjust(account, a.balance, c.delta, bounds) {
                return Ok(Err(ApiError::from(e)));
            }
        }
        let mode = if c.force { Mode::Force } else { Mode::Unreserved };
        let mut effects = Vec::with_capacity(members.len());
        for account in &members {
            let (from, to, amount) =
                if c.delta > 0 { (MINT, account.as_str(), c.delta) } else { (account.as_str(), MINT, -c.delta) };
            // Every change was checked above: a refusal here is a bug, and
            // failing the commit undoes the whole bulk change.
            let applied = self
                .book
                .transfer(from, to, amount, 0, mode)
                .map_err(|e| StoreError::Corrupt(format!("bulk_add passed its checks but failed: {e}")))?;
            let fields =
                Fields { kind: Kind::Adjust, from, to, amount, fee: 0, memo: c.memo.as_deref(), key: None, time };
            let done = self.append(t, buf, fields, applied)?;
            effects.push(AdminEffect::Moved { from: from.into(), to: to.into(), amount, id: done.id });
        }
        let reply = Reply::Json(serde_json::json!({ "tag": c.tag, "delta": c.delta, "count": members.len() }));
        Ok(Ok((reply, effects)))
    }

    /// Deletes every open client account whose balance is below `below`.
    fn reap(
        &mut self,
        t: &mut Tables<'_>,
        buf: &mut Vec<u8>,
        time: u64,
        below: i64,
        reason: &str,
    ) -> Admin<(Reply, Vec<AdminEffect>)> {
        let mut doomed: Vec<String> = self
            .book
            .iter()
            .filter(|(id, a)| !is_system(id) && a.status == Status::Open && a.held == 0 && a.balance < below)
            .map(|(id, _)| id.to_owned())
            .collect();
        doomed.sort();
        let mut effects = Vec::new();
        for account in &doomed {
            match self.close(t, buf, time, account, reason)? {
                Ok((_, e)) => effects.extend(e),
                Err(e) => return Err(StoreError::Corrupt(format!("reap could not close {account}: {}", e.message))),
            }
        }
        Ok(Ok((Reply::Json(serde_json::json!({ "count": doomed.len() })), effects)))
    }
}

/// The fields of a record about to be appended.
struct Fields<'a> {
    kind: Kind,
    from: &'a str,
    to: &'a str,
    amount: i64,
    fee: i64,
    memo: Option<&'a str>,
    key: Option<&'a str>,
    time: u64,
}

impl<'a> Fields<'a> {
    /// The fields of a transfer command's record.
    fn of(c: &'a TransferCmd, time: u64) -> Fields<'a> {
        Fields {
            kind: c.kind,
            from: &c.from,
            to: &c.to,
            amount: c.amount,
            fee: c.fee,
            memo: c.memo.as_deref(),
            key: c.key.as_deref(),
            time,
        }
    }
}

/// One committed batch on its way to the fan-out task.
pub struct OutcomeBatch(Vec<Outcome>);

/// Runs the fan-out: for each committed batch, first tells every owning
/// shard what changed (one message per shard per batch), then answers the
/// clients. Owners hear before clients do, so a client that reads right
/// after its reply sees its own transfer.
///
/// A task on the runtime rather than a thread of its own: its sends then
/// wake the shards and writers on the same worker (no cross-thread wake-up),
/// and one thread fewer competes with the journal for the cores (measured:
/// ~6% less CPU per transfer on 2 cores).
pub async fn run_fanout(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<OutcomeBatch>,
    router: ShardRouter,
    users: Arc<Users>,
) {
    let (router, users) = (&router, &*users);
    let n = router.len();
    let mut per_shard: Vec<Vec<Effect>> = (0..n).map(|_| Vec::new()).collect();
    let mut replies = Vec::new();
    while let Some(OutcomeBatch(outcomes)) = rx.recv().await {
        for o in outcomes {
            fan_out(o, router, users, &mut per_shard, &mut replies);
        }
        for (i, effects) in per_shard.iter_mut().enumerate() {
            if !effects.is_empty() {
                router.cast(i, ShardMsg::Effects(std::mem::take(effects)));
            }
        }
        for (reply, result) in replies.drain(..) {
            ReplyTo::send(reply, result);
        }
    }
}

/// Queues a settlement for `account`'s owner; `id` is the committed
/// transfer (0 when only a reservation is released).
fn settle(router: &ShardRouter, per_shard: &mut [Vec<Effect>], account: &str, delta: i64, release: i64, id: u64) {
    if delta != 0 || release != 0 || id != 0 {
        per_shard[router.shard_of(account)].push(Effect::Settle { account: account.into(), delta, release, id });
    }
}

/// The record of a committed transfer, taking the command's strings
/// (`Box<str>` to `String` moves, it does not copy).
fn view_of(t: &mut TransferCmd, d: &Done) -> TransferView {
    let take = |s: &mut Box<str>| std::mem::take(s).into_string();
    TransferView {
        id: d.id,
        kind: t.kind,
        from: take(&mut t.from),
        to: take(&mut t.to),
        amount: t.amount,
        fee: t.fee,
        memo: t.memo.take().map(str::into_string),
        time: d.time,
        key: t.key.as_deref().map(str::to_owned),
        prev: crate::protocol::Hash32(d.prev),
        hash: crate::protocol::Hash32(d.hash),
        from_balance: Some(d.applied.from_balance),
        to_balance: Some(d.applied.to_balance),
    }
}

fn fan_out(
    o: Outcome,
    router: &ShardRouter,
    users: &Users,
    per_shard: &mut [Vec<Effect>],
    replies: &mut Vec<(ReplyTo, Result<Reply, ApiError>)>,
) {
    match o {
        Outcome::Transfer(mut t, result, rewarded) => {
            if let Some(u) = rewarded {
                users.set(&u.user, UserState::of(&u));
            }
            let release = if t.mode == Mode::Reserved { t.amount } else { 0 };
            let result = match result {
                Ok(done) if t.kind == Kind::Hold => {
                    // Nothing moved: the reservation becomes a hold.
                    settle(router, per_shard, &t.from, 0, release, done.id);
                    settle(router, per_shard, &t.to, 0, 0, done.id);
                    per_shard[router.shard_of(&t.from)].push(Effect::Held { account: t.from.clone(), delta: t.amount });
                    Ok(Arc::new(view_of(&mut t, &done)))
                }
                Ok(done) => {
                    settle(router, per_shard, &t.from, -t.amount, release, done.id);
                    settle(router, per_shard, &t.to, t.amount - t.fee, 0, done.id);
                    if t.fee > 0 {
                        settle(router, per_shard, TREASURY, t.fee, 0, done.id);
                    }
                    let view = Arc::new(view_of(&mut t, &done));
                    Ok(view)
                }
                Err(e) => {
                    settle(router, per_shard, &t.from, 0, release, 0);
                    Err(e)
                }
            };
            if let Some(key) = t.key {
                // The view took `from` (a refusal left it in place).
                let from: Box<str> =
                    result.as_ref().map_or_else(|_| std::mem::take(&mut t.from), |v| v.from.as_str().into());
                per_shard[router.shard_of(&from)].push(Effect::KeyDone { from, key, result: result.clone() });
            }
            replies.push((t.reply, result.map(|v| shape_reply(&t.shape, v))));
        }
        Outcome::Create(c, result) => {
            let shard = router.shard_of(&c.account);
            match result {
                Ok(done) => {
                    let last = done.as_ref().map_or(0, |d| d.id);
                    if last != 0 {
                        settle(router, per_shard, MINT, -c.initial, 0, last);
                    }
                    let reply = match &c.user {
                        // A signup answers with the user, never the password hash.
                        Some(u) => {
                            users.set(&u.user, UserState::of(u));
                            Reply::Json(crate::protocol::user_view(u))
                        }
                        None => Reply::Account(Box::new(AccountView {
                            account: c.account.to_string(),
                            owner: c.meta.owner.clone(),
                            tags: c.meta.tags.clone(),
                            balance: c.initial,
                            available: c.initial,
                            status: "open",
                            created: c.meta.created,
                            memo: c.meta.memo.clone(),
                        })),
                    };
                    per_shard[shard].push(Effect::Created {
                        account: c.account,
                        balance: c.initial,
                        last,
                        meta: Some(Box::new(c.meta)),
                    });
                    replies.push((c.reply, Ok(reply)));
                }
                Err(e) => {
                    per_shard[shard].push(Effect::Created { account: c.account, balance: 0, last: 0, meta: None });
                    replies.push((c.reply, Err(e)));
                }
            }
        }
        Outcome::Admin(reply, result) => {
            let result = result.map(|(r, effects)| {
                for e in effects {
                    match e {
                        AdminEffect::Moved { from, to, amount, id } => {
                            settle(router, per_shard, &from, -amount, 0, id);
                            settle(router, per_shard, &to, amount, 0, id);
                        }
                        AdminEffect::Deleted(account) => {
                            per_shard[router.shard_of(&account)].push(Effect::Deleted(account));
                        }
                        AdminEffect::Tagged(account, tags) => {
                            per_shard[router.shard_of(&account)].push(Effect::Tagged(account, tags));
                        }
                        AdminEffect::Held { account, delta } => {
                            per_shard[router.shard_of(&account)].push(Effect::Held { account, delta });
                        }
                    }
                }
                r
            });
            replies.push((reply, result));
        }
        Outcome::Probe(done, result) => {
            let _ = done.send(result);
        }
        Outcome::User(u, result) => {
            // The registry changes before anyone hears of it, so a revoked
            // token fails on every connection from the next request on.
            if let Ok(record) = &result {
                users.set(&record.user, UserState::of(record));
            }
            let _ = u.done.send(result.map(|r| *r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commits of `batch` records each until a sweep of `len` accounts
    /// completes: how many records that took.
    fn records_per_sweep(len: usize, batch: usize) -> usize {
        let (mut cursor, mut records) = (0, 0);
        while cursor < len {
            cursor += sweep_chunk(len, batch);
            records += batch;
        }
        records
    }

    #[test]
    fn a_sweep_takes_about_sweep_records_whatever_the_batches() {
        for len in [3, 1_000, 100_000, 1_000_000, 10_000_000] {
            for batch in [1, 7, 100, 1024, 8192] {
                let records = records_per_sweep(len, batch);
                // The replay bound: a full sweep within SWEEP_RECORDS (plus
                // the batch that completes it).
                assert!(records <= SWEEP_RECORDS + batch, "len {len} batch {batch}: {records}");
                // And no commit sweeps less than the minimum.
                assert!(sweep_chunk(len, batch) >= SWEEP_CHUNK_MIN);
            }
        }
        // Proportional: a batch of 1,024 over 1M accounts sweeps 3,907 of them.
        assert_eq!(sweep_chunk(1_000_000, 1024), 3907);
        // Idle commits: at least 1/64 of the accounts, at least 4,096.
        assert_eq!(sweep_chunk(1_000_000, 0), 15_625);
        assert_eq!(sweep_chunk(1_000, 0), SWEEP_CHUNK_IDLE);
    }
}
