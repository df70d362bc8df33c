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

use std::collections::HashMap;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use redb::{Database, Durability};

use crate::error::ApiError;
use crate::ledger::{Applied, Book, BookAccount, Kind, MINT, TREASURY};
use crate::protocol::{AccountView, Reply, TransferView};
use crate::reply::ReplyTo;
use crate::shard::{Effect, ShardMsg, ShardRouter};
use crate::stats::Stats;
use crate::store::{self, AccountMeta, Head, RecordRef, StoreError};

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
    pub reply: ReplyTo,
}

pub enum Command {
    Transfer(TransferCmd),
    Create(CreateCmd),
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
            self.stats
                .journal_queue
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
}

impl Journal {
    /// Runs until every [`JournalHandle`] is dropped, then returns after the
    /// last commit. Committed batches go to `fanout` in commit order.
    pub fn run(mut self, rx: &Receiver<Command>, fanout: &Sender<Vec<OutcomeBatch>>) {
        let mut batch: Vec<Command> = Vec::with_capacity(self.batch_max);
        let mut undo: HashMap<Box<str>, Option<BookAccount>> = HashMap::new();
        let mut buf = Vec::with_capacity(512);
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.stats
                .journal_queue
                .fetch_sub(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let outcomes = self.commit(&mut batch, &mut undo, &mut buf);
            if fanout.send(vec![OutcomeBatch(outcomes)]).is_err() {
                break;
            }
        }
        tracing::info!(head = self.head.id, "journal stopped");
    }

    fn commit(
        &mut self,
        batch: &mut Vec<Command>,
        undo: &mut HashMap<Box<str>, Option<BookAccount>>,
        buf: &mut Vec<u8>,
    ) -> Vec<Outcome> {
        undo.clear();
        let head_before = self.head;
        let items = batch.len() as u64;
        let mut outcomes = Vec::with_capacity(batch.len());
        let written = self.write(batch.drain(..), undo, buf, &mut outcomes);
        if let Err(e) = written {
            tracing::error!(error = %e, "commit failed; the batch is refused");
            // Nothing reached the disk: put the book and head back as they were.
            for (id, before) in undo.drain() {
                match before {
                    Some(a) => {
                        self.book.accounts.insert(id, a);
                    }
                    None => {
                        self.book.accounts.remove(&id);
                    }
                }
            }
            self.head = head_before;
            let failed = ApiError::internal("the journal could not commit; nothing was changed");
            for o in &mut outcomes {
                match o {
                    Outcome::Transfer(_, r) => *r = Err(failed.clone()),
                    Outcome::Create(_, r) => *r = Err(failed.clone()),
                }
            }
            return outcomes;
        }
        let transfers = self.head.id - head_before.id;
        self.stats.record_batch(items, transfers);
        outcomes
    }

    fn remember(&self, undo: &mut HashMap<Box<str>, Option<BookAccount>>, id: &str) {
        if !undo.contains_key(id) {
            undo.insert(id.into(), self.book.accounts.get(id).copied());
        }
    }

    fn write(
        &mut self,
        commands: impl Iterator<Item = Command>,
        undo: &mut HashMap<Box<str>, Option<BookAccount>>,
        buf: &mut Vec<u8>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Corrupt(format!("durability: {e}")))?;
        {
            let mut transfers = txn.open_table(store::TRANSFERS)?;
            let mut history = txn.open_table(store::HISTORY)?;
            let mut keys = txn.open_table(store::KEYS)?;
            let mut accounts = txn.open_table(store::ACCOUNTS)?;
            let now = store::now_ms();
            let mut append = |journal: &mut Journal,
                              rec: &RecordRef<'_>,
                              applied: Applied|
             -> Result<Done, StoreError> {
                buf.clear();
                rec.encode(buf);
                let hash = store::record_hash(buf);
                transfers.insert(rec.id, &buf[..])?;
                history.insert((rec.from, rec.id), ())?;
                history.insert((rec.to, rec.id), ())?;
                if rec.fee > 0 && rec.to != TREASURY {
                    history.insert((TREASURY, rec.id), ())?;
                }
                if let Some(key) = rec.key {
                    keys.insert((rec.from, key), rec.id)?;
                }
                assert!(
                    rec.id == journal.head.id + 1,
                    "transfer ids are strictly increasing"
                );
                journal.head = Head { id: rec.id, hash };
                Ok(Done {
                    id: rec.id,
                    time: rec.time,
                    prev: *rec.prev,
                    hash,
                    applied,
                })
            };
            for cmd in commands {
                match cmd {
                    Command::Transfer(t) => {
                        self.remember(undo, &t.from);
                        self.remember(undo, &t.to);
                        if t.fee > 0 {
                            self.remember(undo, TREASURY);
                        }
                        let result = match self
                            .book
                            .transfer(&t.from, &t.to, t.amount, t.fee, t.reserved)
                        {
                            Err(e) => Err(ApiError::from(e)),
                            Ok(applied) => {
                                let prev = self.head.hash;
                                let rec = RecordRef {
                                    id: self.head.id + 1,
                                    kind: t.kind,
                                    from: &t.from,
                                    to: &t.to,
                                    amount: t.amount,
                                    fee: t.fee,
                                    memo: t.memo.as_deref(),
                                    time: now,
                                    key: t.key.as_deref(),
                                    prev: &prev,
                                };
                                Ok(append(self, &rec, applied)?)
                            }
                        };
                        outcomes.push(Outcome::Transfer(t, result));
                    }
                    Command::Create(c) => {
                        self.remember(undo, &c.account);
                        let result = match self.book.create(&c.account) {
                            Err(e) => Err(ApiError::from(e)),
                            Ok(()) => {
                                accounts.insert(&*c.account, &c.meta.encode()[..])?;
                                if c.initial > 0 {
                                    self.remember(undo, MINT);
                                    match self.book.transfer(MINT, &c.account, c.initial, 0, false)
                                    {
                                        Err(e) => {
                                            // Undo the create too: the account and its funding are one step.
                                            self.book.accounts.remove(&*c.account);
                                            accounts.remove(&*c.account)?;
                                            Err(ApiError::from(e))
                                        }
                                        Ok(applied) => {
                                            let prev = self.head.hash;
                                            let rec = RecordRef {
                                                id: self.head.id + 1,
                                                kind: Kind::Mint,
                                                from: MINT,
                                                to: &c.account,
                                                amount: c.initial,
                                                fee: 0,
                                                memo: c.meta.memo.as_deref(),
                                                time: now,
                                                key: None,
                                                prev: &prev,
                                            };
                                            Ok(Some(append(self, &rec, applied)?))
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
            let mut balances = txn.open_table(store::BALANCES)?;
            for id in undo.keys() {
                if let Some(a) = self.book.accounts.get(id) {
                    balances.insert(&**id, a.balance)?;
                }
            }
            let mut meta = txn.open_table(store::META)?;
            meta.insert("head", &self.head.encode()[..])?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// One committed batch on its way to the fan-out thread.
pub struct OutcomeBatch(Vec<Outcome>);

/// Runs the fan-out: for each committed batch, first tells every owning
/// shard what changed (one message per shard per batch), then answers the
/// clients. Owners hear before clients do, so a client that reads right
/// after its reply sees its own transfer.
pub fn run_fanout(rx: &Receiver<Vec<OutcomeBatch>>, router: &ShardRouter) {
    let n = router.len();
    let mut per_shard: Vec<Vec<Effect>> = (0..n).map(|_| Vec::new()).collect();
    let mut replies = Vec::new();
    while let Ok(batches) = rx.recv() {
        for OutcomeBatch(outcomes) in batches {
            for o in outcomes {
                fan_out(o, router, &mut per_shard, &mut replies);
            }
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

fn settle(
    router: &ShardRouter,
    per_shard: &mut [Vec<Effect>],
    account: &str,
    delta: i64,
    release: i64,
) {
    if delta != 0 || release != 0 {
        per_shard[router.shard_of(account)].push(Effect::Settle {
            account: account.into(),
            delta,
            release,
        });
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
    per_shard: &mut [Vec<Effect>],
    replies: &mut Vec<(ReplyTo, Result<Reply, ApiError>)>,
) {
    match o {
        Outcome::Transfer(t, result) => {
            let release = if t.reserved { t.amount } else { 0 };
            let result = match result {
                Ok(done) => {
                    settle(router, per_shard, &t.from, -t.amount, release);
                    settle(router, per_shard, &t.to, t.amount - t.fee, 0);
                    settle(router, per_shard, TREASURY, t.fee, 0);
                    let view = Arc::new(view_of(&t, &done));
                    Ok(view)
                }
                Err(e) => {
                    settle(router, per_shard, &t.from, 0, release);
                    Err(e)
                }
            };
            if let Some(key) = t.key {
                per_shard[router.shard_of(&t.from)].push(Effect::KeyDone {
                    from: t.from,
                    key,
                    result: result.clone(),
                });
            }
            replies.push((t.reply, result.map(Reply::Transfer)));
        }
        Outcome::Create(c, result) => {
            let shard = router.shard_of(&c.account);
            match result {
                Ok(done) => {
                    settle(router, per_shard, MINT, -c.initial, 0);
                    let view = AccountView {
                        account: c.account.to_string(),
                        owner: c.meta.owner.clone(),
                        tags: c.meta.tags.clone(),
                        balance: c.initial,
                        available: c.initial,
                        status: "open",
                        created: c.meta.created,
                        memo: c.meta.memo.clone(),
                    };
                    debug_assert!(done.is_some() == (c.initial > 0));
                    per_shard[shard].push(Effect::Created {
                        account: c.account,
                        balance: c.initial,
                        meta: Some(c.meta),
                    });
                    replies.push((c.reply, Ok(Reply::Account(Box::new(view)))));
                }
                Err(e) => {
                    per_shard[shard].push(Effect::Created {
                        account: c.account,
                        balance: 0,
                        meta: None,
                    });
                    replies.push((c.reply, Err(e)));
                }
            }
        }
    }
}
