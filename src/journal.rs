//! The journal: the one thread that writes redb, committing in groups.
//!
//! It takes every command queued since its last commit (up to
//! `commit_batch_max`), applies them in order to the [`Book`] and to one
//! write transaction, and commits with `Durability::Immediate` (fsync). Only
//! then does the fan-out thread tell the owning shards what changed and
//! answer the clients. An idle journal commits at once; under load the queue
//! fills while it syncs, so batches grow by themselves.
//!
//! The queue is an unbounded channel whose depth is bounded all the same: a
//! command exists only for a request holding one of the server's
//! `inflight_max` permits.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use redb::{Database, Durability, ReadableTable};

use crate::auth::{UserState, Users};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{Applied, Book, Kind, MINT, TREASURY};
use crate::protocol::{AccountView, Reply, TransferView};
use crate::reply::ReplyTo;
use crate::shard::{Effect, ShardMsg, ShardRouter};
use crate::stats::Stats;
use crate::store::{self, AccountMeta, Head, RecordRef, StoreError, UserRecord};

/// A full sweep of the balance rows takes at most this many commits, which
/// bounds the replay at start-up to about twice as many batches.
const SWEEP_COMMITS: usize = 64;
/// The fewest account numbers a commit sweeps.
const SWEEP_CHUNK_MIN: usize = 4096;

/// A transfer whose source has been checked (and, if `reserved`, reserved) by its owner.
pub struct TransferCmd {
    pub kind: Kind,
    pub from: Box<str>,
    pub to: Box<str>,
    pub amount: i64,
    pub fee: i64,
    pub memo: Option<Box<str>>,
    pub key: Option<Box<str>>,
    /// The source's owner reserved `amount` and waits for it to be settled.
    pub reserved: bool,
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
    Transfer(TransferCmd),
    Create(CreateCmd),
    User(UserCmd),
    /// Commit what is queued, write a full checkpoint, stop, then answer.
    Shutdown(tokio::sync::oneshot::Sender<()>),
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
    Transfer(TransferCmd, Result<Done, ApiError>),
    Create(CreateCmd, Result<Option<Done>, ApiError>),
    User(UserCmd, Result<UserRecord, ApiError>),
}

/// Handle used by shards to queue commands.
#[derive(Clone)]
pub struct JournalHandle {
    tx: Sender<Command>,
    stats: Arc<Stats>,
}

impl JournalHandle {
    /// Queues a command; gives it back if the journal has stopped.
    pub fn send(&self, cmd: Command) -> Result<(), Box<Command>> {
        Stats::add(&self.stats.journal_queue, 1);
        self.tx.send(cmd).map_err(|e| {
            self.stats.journal_queue.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            Box::new(e.into_inner())
        })
    }

    /// Commands waiting for the journal.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.tx.len()
    }
}

/// Creates the journal's queue.
#[must_use]
pub fn channel(stats: Arc<Stats>) -> (JournalHandle, Receiver<Command>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (JournalHandle { tx, stats }, rx)
}

pub struct Journal {
    pub db: Arc<Database>,
    pub book: Book,
    pub head: Head,
    pub batch_max: usize,
    pub stats: Arc<Stats>,
    /// Next account number the balance-row sweep writes.
    pub sweep_cursor: u32,
    /// The head when the current sweep began: once it completes, every
    /// balance row includes all transfers up to here.
    pub sweep_from: u64,
}

impl Journal {
    /// Runs until every [`JournalHandle`] is dropped, then returns after the
    /// last commit. Committed batches go to `fanout` in commit order.
    pub fn run(mut self, rx: &Receiver<Command>, fanout: &Sender<OutcomeBatch>) {
        let mut batch: Vec<Command> = Vec::with_capacity(self.batch_max);
        let mut buf = Vec::with_capacity(512);
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.stats.journal_queue.fetch_sub(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let outcomes = self.commit(&mut batch, &mut buf);
            if fanout.send(OutcomeBatch(outcomes)).is_err() {
                break;
            }
        }
        // Leave a full checkpoint so the next start replays nothing.
        if let Err(e) = self.final_checkpoint() {
            tracing::warn!(error = %e, "final checkpoint failed; the next start replays the tail");
        }
        tracing::info!(head = self.head.id, "journal stopped");
    }

    fn commit(&mut self, batch: &mut Vec<Command>, buf: &mut Vec<u8>) -> Vec<Outcome> {
        let head_before = self.head;
        let items = batch.len() as u64;
        let mut outcomes = Vec::with_capacity(batch.len());
        if let Err(e) = self.write(batch.drain(..), buf, &mut outcomes) {
            tracing::error!(error = %e, "commit failed; the batch is refused");
            // Nothing of this batch reached the disk. Rebuild the book from
            // what did; if even that fails the disk is gone, and stopping is
            // the only answer that cannot serve wrong balances.
            let loaded = store::load(&self.db, self.book.limits)
                .unwrap_or_else(|e| panic!("cannot reload the ledger after a failed commit: {e}"));
            assert_eq!(loaded.head, head_before, "a failed commit moved the head");
            self.book = loaded.book;
            self.head = loaded.head;
            self.sweep_cursor = 0;
            self.sweep_from = self.head.id;
            let failed = ApiError::internal("the journal could not commit; nothing was changed");
            for o in &mut outcomes {
                match o {
                    Outcome::Transfer(_, r) => *r = Err(failed.clone()),
                    Outcome::Create(_, r) => *r = Err(failed.clone()),
                    Outcome::User(_, r) => *r = Err(failed.clone()),
                }
            }
            return outcomes;
        }
        self.stats.record_batch(items, self.head.id - head_before.id);
        outcomes
    }

    /// Appends one record: links it into its parties' histories, hashes it
    /// onto the chain and moves the head.
    fn append(
        &mut self,
        transfers: &mut redb::Table<'_, u64, &[u8]>,
        keys: &mut redb::Table<'_, (&str, &str), u64>,
        buf: &mut Vec<u8>,
        fields: Fields<'_>,
        applied: Applied,
    ) -> Result<Done, StoreError> {
        let id = self.head.id + 1;
        let links = self.book.link(id, fields.from, fields.to, fields.fee > 0);
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
        transfers.insert(id, &buf[..])?;
        if let Some(key) = fields.key {
            keys.insert((fields.from, key), id)?;
        }
        let prev = self.head.hash;
        self.head = Head { id, hash };
        Ok(Done { id, time: fields.time, prev, hash, applied })
    }

    /// Writes every dirty balance row and a checkpoint at the head.
    fn final_checkpoint(&mut self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        let all = u32::try_from(self.book.len()).unwrap_or(u32::MAX);
        store::write_rows(&txn, &mut self.book, 0..all)?;
        store::write_checkpoint(&txn, self.head.id)?;
        txn.commit()?;
        Ok(())
    }

    /// Writes the next slice of balance rows; completes the sweep (and moves
    /// the checkpoint) when the slice reaches the last account.
    fn sweep(&mut self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        let len = self.book.len();
        let chunk = (len / SWEEP_COMMITS).max(SWEEP_CHUNK_MIN);
        let start = self.sweep_cursor as usize;
        let end = (start + chunk).min(len);
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        store::write_rows(txn, &mut self.book, to_u32(start)..to_u32(end))?;
        if end >= len {
            store::write_checkpoint(txn, self.sweep_from)?;
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
        commands: impl Iterator<Item = Command>,
        buf: &mut Vec<u8>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate).map_err(|e| StoreError::Corrupt(format!("durability: {e}")))?;
        {
            let mut transfers = txn.open_table(store::TRANSFERS)?;
            let mut keys = txn.open_table(store::KEYS)?;
            let mut accounts = txn.open_table(store::ACCOUNTS)?;
            let mut users = txn.open_table(store::USERS)?;
            let time = store::now_ms();
            for cmd in commands {
                match cmd {
                    Command::Transfer(t) => {
                        let result = match self.book.transfer(&t.from, &t.to, t.amount, t.fee, t.reserved) {
                            Err(e) => Err(ApiError::from(e)),
                            Ok(applied) => {
                                let fields = Fields {
                                    kind: t.kind,
                                    from: &t.from,
                                    to: &t.to,
                                    amount: t.amount,
                                    fee: t.fee,
                                    memo: t.memo.as_deref(),
                                    key: t.key.as_deref(),
                                    time,
                                };
                                Ok(self.append(&mut transfers, &mut keys, buf, fields, applied)?)
                            }
                        };
                        outcomes.push(Outcome::Transfer(t, result));
                    }
                    // Taken out of the batch before writing.
                    Command::Shutdown(_) => {}
                    Command::User(u) => {
                        let existing = users.get(&*u.user)?.map(|v| UserRecord::decode(v.value())).transpose()?;
                        let result = match existing {
                            None => Err(ApiError::not_found(format!("user {}", u.user))),
                            Some(mut record) => {
                                if let UserChange::Password(hash) = &u.change {
                                    record.password_hash.clone_from(hash);
                                }
                                record.token_epoch += 1;
                                users.insert(&*u.user, &record.encode()[..])?;
                                Ok(record)
                            }
                        };
                        outcomes.push(Outcome::User(u, result));
                    }
                    Command::Create(mut c) => {
                        let taken = match &c.user {
                            Some(u) => users.get(u.user.as_str())?.is_some(),
                            None => false,
                        };
                        let created = if taken {
                            Err(ApiError::new(ErrorCode::Exists, format!("user {} exists", c.account)))
                        } else {
                            self.book.create(&c.account).map_err(ApiError::from)
                        };
                        let result = match created {
                            Err(e) => Err(e),
                            Ok(num) => {
                                c.meta.num = num;
                                if let Some(u) = &c.user {
                                    users.insert(u.user.as_str(), &u.encode()[..])?;
                                }
                                accounts.insert(&*c.account, &c.meta.encode()[..])?;
                                if c.initial > 0 {
                                    match self.book.transfer(MINT, &c.account, c.initial, 0, false) {
                                        Err(e) => {
                                            // The account and its funding are one step: undo the create.
                                            self.book.uncreate(&c.account);
                                            accounts.remove(&*c.account)?;
                                            Err(ApiError::from(e))
                                        }
                                        Ok(applied) => {
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
                                            Ok(Some(self.append(&mut transfers, &mut keys, buf, fields, applied)?))
                                        }
                                    }
                                } else {
                                    Ok(None)
                                }
                            }
                        };
                        outcomes.push(Outcome::Create(c, result));
                    }
                }
            }
            self.sweep(&txn)?;
            let mut meta = txn.open_table(store::META)?;
            meta.insert("head", &self.head.encode()[..])?;
        }
        txn.commit()?;
        Ok(())
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

/// One committed batch on its way to the fan-out thread.
pub struct OutcomeBatch(Vec<Outcome>);

/// Runs the fan-out: for each committed batch, first tells every owning
/// shard what changed (one message per shard per batch), then answers the
/// clients. Owners hear before clients do, so a client that reads right
/// after its reply sees its own transfer.
pub fn run_fanout(rx: &Receiver<OutcomeBatch>, router: &ShardRouter, users: &Users) {
    let n = router.len();
    let mut per_shard: Vec<Vec<Effect>> = (0..n).map(|_| Vec::new()).collect();
    let mut replies = Vec::new();
    while let Ok(OutcomeBatch(outcomes)) = rx.recv() {
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

fn view_of(t: &TransferCmd, d: &Done) -> TransferView {
    TransferView {
        id: d.id,
        kind: t.kind,
        from: t.from.to_string(),
        to: t.to.to_string(),
        amount: t.amount,
        fee: t.fee,
        memo: t.memo.as_deref().map(str::to_owned),
        time: d.time,
        key: t.key.as_deref().map(str::to_owned),
        prev: store::hex(&d.prev),
        hash: store::hex(&d.hash),
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
        Outcome::Transfer(t, result) => {
            let release = if t.reserved { t.amount } else { 0 };
            let result = match result {
                Ok(done) => {
                    settle(router, per_shard, &t.from, -t.amount, release, done.id);
                    settle(router, per_shard, &t.to, t.amount - t.fee, 0, done.id);
                    if t.fee > 0 {
                        settle(router, per_shard, TREASURY, t.fee, 0, done.id);
                    }
                    let view = Arc::new(view_of(&t, &done));
                    Ok(view)
                }
                Err(e) => {
                    settle(router, per_shard, &t.from, 0, release, 0);
                    Err(e)
                }
            };
            if let Some(key) = t.key {
                per_shard[router.shard_of(&t.from)].push(Effect::KeyDone { from: t.from, key, result: result.clone() });
            }
            replies.push((t.reply, result.map(Reply::Transfer)));
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
                        meta: Some(c.meta),
                    });
                    replies.push((c.reply, Ok(reply)));
                }
                Err(e) => {
                    per_shard[shard].push(Effect::Created { account: c.account, balance: 0, last: 0, meta: None });
                    replies.push((c.reply, Err(e)));
                }
            }
        }
        Outcome::User(u, result) => {
            // The registry changes before anyone hears of it, so a revoked
            // token fails on every connection from the next request on.
            if let Ok(record) = &result {
                users.set(&record.user, UserState::of(record));
            }
            let _ = u.done.send(result);
        }
    }
}
