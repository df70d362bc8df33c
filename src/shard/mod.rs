//! Shard actors: each account is owned by exactly one of them, its single writer.
//!
//! Accounts are hashed onto a fixed pool of ractor actors. The owner checks
//! and reserves every debit of its accounts, in mailbox order, with no lock:
//! that is what makes double spending impossible. It then hands the transfer
//! to the journal and moves on; it never waits for the journal or for another
//! actor. Committed changes come back as [`Effect`]s, one message per batch.
//!
//! Why a pool and not one actor per account: a prototype measured ~8.4 KB
//! and several µs of message hops per live actor-per-account, against ~60 MB
//! for a million accounts and ~1.9x the throughput for a pool
//! (ARCHITECTURE.md).
//!
//! - [`slot`]: what a shard keeps per account; [`keys`]: idempotency keys;
//! - [`router`]: which shard owns an account, and the connection's outbox;
//! - [`fanout`]: after each commit, tells the owners and answers the clients.

pub mod fanout;
pub mod keys;
pub mod router;
pub mod slot;

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

pub use self::keys::KeyReader;
use self::keys::{Check, Fingerprint, Keys};
pub use self::router::{shard_index, Outbox, ShardRouter};
pub use self::slot::Slot;
use crate::auth::Principal;
use crate::contract::{Command, CreateCmd, HoldSpec, JournalHandle, TransferCmd};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{is_system, AccountKey, AccountMap, Kind, LedgerError, Limits, Mode, Status};
use crate::reply::ReplyTo;
use crate::store::{self, AccountMeta, Store};
use crate::wire::{BalanceReply, HistoryReply, Reply, Shape, TransferView};

/// A debit request: `transfer` or `mint` (from `@mint`).
pub struct DebitReq {
    pub kind: Kind,
    /// What the reply looks like (`transfer` or `add`).
    pub shape: Shape,
    pub from: Box<str>,
    pub to: Box<str>,
    pub amount: i64,
    pub memo: Option<Box<str>>,
    pub key: Option<Box<str>>,
    /// The part of `amount` that goes to `@treasury` (user-to-user fees).
    pub fee: i64,
    /// The terms of a hold (kind `Hold`).
    pub hold: Option<Box<HoldSpec>>,
    pub principal: Principal,
    pub reply: ReplyTo,
    /// Where it goes once reserved.
    pub then: Then,
}

/// Where a debit goes once its owner has reserved it.
pub enum Then {
    /// To the journal, on its own.
    Journal,
    /// Back to its atomic `transfer_batch` as item `.0`: the batch goes to
    /// the journal in one piece once every owner has reserved its part.
    Collect(usize, tokio::sync::mpsc::UnboundedSender<(usize, Box<TransferCmd>)>),
}

impl DebitReq {
    /// A debit request from one request's fields.
    #[allow(clippy::too_many_arguments)] // one request's fields, handed straight on
    #[must_use]
    pub fn new(
        kind: Kind,
        shape: Shape,
        from: impl Into<Box<str>>,
        to: impl Into<Box<str>>,
        amount: i64,
        memo: Option<String>,
        key: Option<String>,
        principal: Principal,
        reply: ReplyTo,
    ) -> DebitReq {
        // An owned `String` becomes the `Box<str>` in place (decoded strings
        // have no spare capacity), where a `&str` would be copied.
        DebitReq {
            kind,
            shape,
            from: from.into(),
            to: to.into(),
            amount,
            memo: memo.map(Into::into),
            key: key.map(Into::into),
            fee: 0,
            hold: None,
            principal,
            reply,
            then: Then::Journal,
        }
    }

    /// The same request as a hold with these terms.
    #[must_use]
    pub fn with_hold(mut self, spec: HoldSpec) -> DebitReq {
        self.hold = Some(Box::new(spec));
        self
    }

    /// The same request with a fee for `@treasury`.
    #[must_use]
    pub fn with_fee(mut self, fee: i64) -> DebitReq {
        self.fee = fee;
        self
    }

    /// The same request as item `item` of an atomic batch collected by `tx`.
    #[must_use]
    pub fn collected(
        mut self,
        item: usize,
        tx: tokio::sync::mpsc::UnboundedSender<(usize, Box<TransferCmd>)>,
    ) -> DebitReq {
        self.then = Then::Collect(item, tx);
        self
    }
}

/// What a read wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadKind {
    Balance,
    Account,
}

/// A committed change, sent back to the owner after the commit.
pub enum Effect {
    /// Add `delta` to the balance and drop `release` from the reservations.
    /// (An inline key: ids up to 30 bytes are not allocated, and there are
    /// two of these per transfer.)
    Settle { account: AccountKey, delta: i64, release: i64, id: u64 },
    /// The transfer made under an idempotency key is settled.
    KeyDone { from: Box<str>, key: Box<str>, result: Result<Arc<TransferView>, ApiError> },
    /// A create finished: `meta` is `None` when it was refused.
    Created { account: Box<str>, balance: i64, last: u64, meta: Option<Box<AccountMeta>> },
    /// The account was deleted (`delete_account` or `reap`).
    Deleted(Box<str>),
    /// The account's tags changed.
    Tagged(Box<str>, Vec<String>),
    /// What is held on the account changed (a hold committed, or was posted or voided).
    Held { account: Box<str>, delta: i64 },
}

/// A `balance` or `account` read.
pub struct ReadReq {
    pub account: Box<str>,
    pub kind: ReadKind,
    pub principal: Principal,
    pub reply: ReplyTo,
}

/// A `history` page request.
pub struct HistoryReq {
    pub account: Box<str>,
    pub after: Option<u64>,
    pub limit: usize,
    pub principal: Principal,
    pub reply: ReplyTo,
}

pub enum ShardMsg {
    /// Debits in the order they were read (from a connection's [`Outbox`],
    /// or one at a time through [`ShardRouter::debit`]).
    Debits(Vec<DebitReq>),
    /// Passed on to the journal as it is, once the owner has checked it.
    Create(Box<CreateCmd>),
    Read(Box<ReadReq>),
    History(Box<HistoryReq>),
    Effects(Vec<Effect>),
    /// Keys looked up on disk (off the shard's path): the records they name.
    KeysFound(Box<KeysFound>),
    /// Test builds only (`fault-injection`): panic, as a bug would.
    #[cfg(feature = "fault-injection")]
    Panic,
}

/// The answers of one disk lookup of keys, in the order asked.
pub struct KeysFound {
    pub wanted: Vec<(Box<str>, Box<str>)>,
    pub found: Result<Vec<Result<Option<TransferView>, ApiError>>, ApiError>,
}

pub struct ShardState {
    /// This shard, for the answers of its own disk lookups.
    myself: ActorRef<ShardMsg>,
    /// Keys to look up on disk once the message at hand is handled.
    lookups: Vec<(Box<str>, Box<str>)>,
    key_reader: KeyReader,
    accounts: AccountMap<Slot>,
    keys: Keys,
    journal: JournalHandle,
    limits: Limits,
    store: Arc<Store>,
}

pub struct ShardArgs {
    pub accounts: AccountMap<Slot>,
    pub key_reader: KeyReader,
    pub journal: JournalHandle,
    pub limits: Limits,
    pub store: Arc<Store>,
    pub keys_cached_max: usize,
}

pub struct ShardActor;

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(&self, myself: ActorRef<ShardMsg>, args: ShardArgs) -> Result<ShardState, ActorProcessingErr> {
        Ok(ShardState {
            myself,
            lookups: Vec::new(),
            key_reader: args.key_reader,
            accounts: args.accounts,
            keys: Keys::new(args.keys_cached_max),
            journal: args.journal,
            limits: args.limits,
            store: args.store,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Debits(reqs) => {
                for r in &reqs {
                    state.accounts.prefetch(&r.from);
                }
                for req in reqs {
                    state.debit(req, false);
                }
                state.look_up();
            }
            ShardMsg::KeysFound(k) => state.keys_found(*k),
            ShardMsg::Create(c) => state.create(c),
            ShardMsg::Read(r) => state.read(&r.account, r.kind, &r.principal, r.reply),
            ShardMsg::History(req) => state.history(*req),
            #[cfg(feature = "fault-injection")]
            ShardMsg::Panic => panic!("fault injection: a shard panics"),
            ShardMsg::Effects(effects) => {
                // Most are settlements of accounts not touched for a while
                // (the receivers): let their cache misses overlap.
                for e in &effects {
                    if let Effect::Settle { account, .. } = e {
                        state.accounts.prefetch(account);
                    }
                }
                for e in effects {
                    state.apply(e);
                }
            }
        }
        Ok(())
    }
}

/// What the caller wants of an account: to read it, or to move money out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Read,
    Debit,
}

fn may_use(principal: &Principal, slot: &Slot, account: &str, what: Use) -> bool {
    match what {
        Use::Read => principal.sees_any() || slot.owner() == Some(&*principal.user),
        Use::Debit => principal.may_debit(account, || slot.owner()),
    }
}

/// A page of `account`'s history as `principal` sees it: from its last
/// record `last`, or from before the cursor `after`. Its caller checked
/// that `principal` may read the account. (The shards' `history`, and a
/// follower's stale one.)
pub(crate) fn history_page(
    db: &redb::Database,
    records: &crate::store::History,
    account: &str,
    last: u64,
    after: Option<u64>,
    limit: usize,
    principal: &Principal,
) -> Result<Reply, ApiError> {
    let start = match after {
        None => last,
        Some(cursor) => store::history_after(db, records, account, cursor)?
            .ok_or_else(|| ApiError::bad_request(format!("after={cursor} is not a transfer of {account}")))?,
    };
    let (mut transfers, next) = store::history(db, records, account, start, limit)?;
    for t in &mut transfers {
        t.shown_to(&principal.user, principal.sees_any());
    }
    Ok(Reply::History(HistoryReply { account: account.to_owned(), transfers, next, as_of: None }))
}

/// The slot found for `account`, if `principal` may use it for `what`.
fn usable<S: std::ops::Deref<Target = Slot>>(
    found: Option<S>,
    account: &str,
    principal: &Principal,
    what: Use,
) -> Result<S, ApiError> {
    match found {
        Some(s) if !s.creating => {
            if !may_use(principal, &s, account, what) {
                let why = if principal.sees_any() { "is not one this key may debit" } else { "is not yours" };
                return Err(ApiError::forbidden(format!("account {account} {why}")));
            }
            if s.acct.status == Status::Deleted {
                return Err(ApiError::new(ErrorCode::Deleted, format!("account {account} was deleted")));
            }
            Ok(s)
        }
        _ => Err(ApiError::not_found(format!("account {account}"))),
    }
}

impl ShardState {
    fn slot(&self, account: &str, principal: &Principal, what: Use) -> Result<&Slot, ApiError> {
        usable(self.accounts.get(account), account, principal, what)
    }

    fn slot_mut(&mut self, account: &str, principal: &Principal) -> Result<&mut Slot, ApiError> {
        usable(self.accounts.get_mut(account), account, principal, Use::Debit)
    }

    fn read(&self, account: &str, kind: ReadKind, principal: &Principal, reply: ReplyTo) {
        let slot = match self.slot(account, principal, Use::Read) {
            Ok(s) => s,
            Err(e) => return reply.err(e),
        };
        let r = match kind {
            ReadKind::Balance => Reply::Balance(BalanceReply {
                account: account.to_owned(),
                balance: slot.acct.balance,
                held: slot.acct.held,
                available: slot.acct.available(),
                as_of: None,
            }),
            ReadKind::Account => Reply::Account(Box::new(slot.view(account))),
        };
        reply.ok(r);
    }

    /// Checks the caller here, where the account's last transfer is known,
    /// then reads the page on the blocking pool: the shard does not wait.
    fn history(&self, req: HistoryReq) {
        let last = match self.slot(&req.account, &req.principal, Use::Read) {
            Ok(s) => s.last,
            Err(e) => return req.reply.err(e),
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let HistoryReq { account, after, limit, reply, principal } = req;
            reply.send(
                store
                    .db()
                    .map_err(ApiError::from)
                    .and_then(|db| history_page(&db, store.history(), &account, last, after, limit, &principal)),
            );
        });
    }

    /// A debit: its key checked (or looked up on disk first), then its
    /// amount reserved and the transfer handed on. `looked_up`: its key
    /// was just looked up and not found.
    fn debit(&mut self, req: DebitReq, looked_up: bool) {
        // Only a keyed request needs its fingerprint (two string copies).
        let (req, fingerprint) = match &req.key {
            Some(_) => {
                // The account is checked before its key (one more lookup,
                // for keyed requests only; the reservation below looks again).
                if let Err(e) = self.slot(&req.from, &req.principal, Use::Debit) {
                    return req.reply.err(e);
                }
                let fingerprint =
                    Fingerprint { kind: req.kind, to: req.to.clone(), amount: req.amount, memo: req.memo.clone() };
                let key_reader = &self.key_reader;
                let known_new = |from: &str, key: &str| looked_up || key_reader.is_new(from, key);
                match self.keys.check(req, &fingerprint, known_new) {
                    Check::New(req) => (req, Some(fingerprint)),
                    Check::Taken => return,
                    Check::Unknown(req) => return self.queue_lookup(req),
                }
            }
            None => (req, None),
        };
        let DebitReq { kind, shape, from, to, amount, memo, key, fee, hold, principal, reply, then } = req;
        let collected = matches!(then, Then::Collect(..));
        let bounds = self.limits.bounds(&from);
        let slot = match self.slot_mut(&from, &principal) {
            Ok(s) => s,
            Err(e) => return reply.err(e),
        };
        let from_num = Some(slot.num);
        if let Err(e) = slot.acct.reserve(&from, amount, bounds) {
            // An `add` that would cross the minimum says so in its own terms.
            let e = match (e, &shape) {
                (LedgerError::InsufficientFunds { account, .. }, Shape::Add { .. }) => {
                    LedgerError::BelowMin { account, min: bounds.min.unwrap_or(i64::MIN) }
                }
                (e, _) => e,
            };
            return reply.err(e.into());
        }
        if let (Some(key), Some(fingerprint)) = (&key, fingerprint) {
            self.keys.pending(from.clone(), key.clone(), fingerprint, collected);
        }
        let cmd = Box::new(TransferCmd {
            kind,
            from,
            from_num,
            to,
            amount,
            fee,
            memo,
            key,
            mode: Mode::Reserved,
            shape,
            hold,
            by: Some(principal.user),
            reply,
        });
        let unsent = match then {
            Then::Journal => match self.journal.send(Command::Transfer(cmd)).map_err(|c| *c) {
                Err(Command::Transfer(t)) => Some(t),
                _ => None,
            },
            Then::Collect(item, tx) => tx.send((item, cmd)).err().map(|e| e.0 .1),
        };
        if let Some(t) = unsent {
            self.accounts.get_mut(&t.from).expect("checked above").acct.settle(0, t.amount);
            if let Some(key) = &t.key {
                self.keys.forget(&t.from, key);
            }
            t.reply.err(ApiError::internal("the journal or the batch has stopped"));
        }
    }

    /// Queues `req` behind the disk lookup of its key; the first request
    /// of a key adds the key to the next lookup ([`ShardState::look_up`]).
    fn queue_lookup(&mut self, req: DebitReq) {
        let wanted = (req.from.clone(), req.key.clone().unwrap_or_default());
        if self.keys.looking(req) {
            self.lookups.push(wanted);
        }
    }

    /// Looks up the keys queued while handling one message, all in one
    /// read by the [`KeyReader`]; the answers come back as one
    /// [`ShardMsg::KeysFound`].
    fn look_up(&mut self) {
        if self.lookups.is_empty() {
            return;
        }
        let lookup = keys::Lookup { wanted: std::mem::take(&mut self.lookups), shard: self.myself.clone() };
        if let Err(lookup) = self.key_reader.send(lookup) {
            let found = Err(ApiError::internal("the key reader has stopped"));
            self.keys_found(KeysFound { wanted: lookup.wanted, found });
        }
    }

    /// The disk's answers: the waiting requests go through again, now
    /// against what it said.
    fn keys_found(&mut self, k: KeysFound) {
        let KeysFound { wanted, found } = k;
        let found = match found {
            Ok(found) => found,
            Err(e) => wanted.iter().map(|_| Err(e.clone())).collect(),
        };
        for ((from, key), found) in wanted.into_iter().zip(found) {
            match found {
                Ok(found) => {
                    for req in self.keys.found(from, key, found) {
                        self.debit(req, true);
                    }
                }
                Err(e) => {
                    for req in self.keys.found(from, key, None) {
                        req.reply.err(e.clone());
                    }
                }
            }
        }
        self.look_up();
    }

    fn create(&mut self, c: Box<CreateCmd>) {
        if let Some(s) = self.accounts.get(&c.account) {
            let account = &c.account;
            let e = if s.acct.status == Status::Deleted {
                ApiError::new(ErrorCode::Deleted, format!("account {account} was deleted and cannot be created again"))
            } else {
                ApiError::new(ErrorCode::Exists, format!("account {account} exists"))
            };
            return c.reply.err(e);
        }
        debug_assert!(!is_system(&c.account));
        self.accounts.insert(c.account.clone().into(), Slot { creating: true, ..Slot::new(&c.meta, 0, 0) });
        if let Err(Command::Create(c)) = self.journal.send(Command::Create(c)).map_err(|c| *c) {
            self.accounts.remove(&c.account);
            c.reply.err(ApiError::internal("the journal has stopped"));
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Settle { account, delta, release, id } => {
                if let Some(s) = self.accounts.get_mut(&account) {
                    s.acct.settle(delta, release);
                    s.last = s.last.max(id);
                }
            }
            Effect::KeyDone { from, key, result } => self.keys.settled(&from, &key, result),
            Effect::Deleted(account) => {
                if let Some(s) = self.accounts.get_mut(&account) {
                    s.acct.status = Status::Deleted;
                }
            }
            Effect::Held { account, delta } => {
                if let Some(s) = self.accounts.get_mut(&account) {
                    s.acct.settle_held(delta);
                }
            }
            Effect::Tagged(account, tags) => {
                if let Some(s) = self.accounts.get_mut(&account) {
                    let extra = s.extra.get_or_insert_with(Box::default);
                    extra.tags = tags.iter().map(|t| t.as_str().into()).collect();
                }
            }
            Effect::Created { account, balance, last, meta } => match meta {
                Some(meta) => {
                    self.accounts.insert(account.into(), Slot::new(&meta, balance, last));
                }
                None => {
                    if self.accounts.get(&account).is_some_and(|s| s.creating) {
                        self.accounts.remove(&account);
                    }
                }
            },
        }
    }
}
