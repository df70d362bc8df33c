//! What the shards (and the ops that bypass them) send the journal, and
//! what the journal says happened: the one contract both sides import, so
//! that neither imports the other.
//!
//! A [`Command`] is data plus the address of its answer (a [`ReplyTo`] or a
//! oneshot). The journal's state machine reads only the data; after the
//! commit the fan-out (`shard::fanout`) pairs each command with its
//! [`Outcome`], tells the owning shards and answers.
//!
//! The queue is an unbounded channel whose depth is bounded all the same: a
//! command exists only for a request holding reply slots, and there are
//! `limits.inflight_max` of those.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::ledger::{Applied, Kind, Mode};
use crate::reply::ReplyTo;
use crate::store::{AccountMeta, KeyRecord, UserRecord};
use crate::wire::{Reply, Shape};

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
    /// Who asked: the record names them. (An `Option` only so that the
    /// fan-out can move it into the reply rather than count one more
    /// reference on another thread; it is always set.)
    pub by: Option<Arc<str>>,
    pub reply: ReplyTo,
}

/// The items of an atomic `transfer_batch`, each reserved by its owner:
/// committed all together, or none of them.
pub struct BatchCmd {
    /// Each item with its place in the request.
    pub items: Vec<(usize, Box<TransferCmd>)>,
    /// Set when an owner refused an item before the journal: nothing is
    /// applied, every reservation is released, every item answers this.
    pub refused: Option<ApiError>,
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

/// `delete_account`: move the balance to `@mint` and leave a tombstone.
pub struct CloseCmd {
    pub account: Box<str>,
    pub reason: String,
    pub by: Arc<str>,
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
    pub by: Arc<str>,
    pub reply: ReplyTo,
}

/// `reap`: delete every open client account whose balance is below `below`.
pub struct ReapCmd {
    pub below: i64,
    pub reason: String,
    pub by: Arc<str>,
    pub reply: ReplyTo,
}

/// A new account, checked by its owner.
pub struct CreateCmd {
    pub account: Box<str>,
    /// Its metadata; `num` is assigned by the journal (in the outcome).
    pub meta: AccountMeta,
    /// Comes from `@mint` in the same transaction.
    pub initial: i64,
    /// Set for `signup` and `create_user`: the user created together with
    /// the account.
    pub user: Option<Box<UserRecord>>,
    /// Who asked (the funding record names them).
    pub by: Arc<str>,
    pub reply: ReplyTo,
}

/// A change to one user's record.
#[derive(Clone, Debug)]
pub enum UserChange {
    /// A new staff user (`create_user`; a user with accounts is created
    /// with its account, by [`CreateCmd`]).
    Create(Box<UserRecord>),
    /// Revoke every token issued so far.
    NewEpoch,
    /// Set a new password hash (which also revokes every token).
    Password(String),
    /// Set the user's `events` (admin `set_events`).
    Events(u64),
    /// Revoke one token (`logout` with several sessions), until it expires
    /// at `exp_ms` (ms since the epoch).
    RevokeToken { jti: String, exp_ms: u64 },
}

/// A change to the service keys, answered through `done` once committed.
pub struct KeyCmd {
    pub change: KeyChange,
    pub done: tokio::sync::oneshot::Sender<Result<KeyRecord, ApiError>>,
}

pub enum KeyChange {
    /// A new key (its record holds only the secret's hash).
    Create(Box<KeyRecord>),
    /// Revoke a key; connections bound with it stop at their next request.
    Revoke { key_id: String, by: String },
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
    Batch(Box<BatchCmd>),
    Create(Box<CreateCmd>),
    User(Box<UserCmd>),
    Close(Box<CloseCmd>),
    Tag(Box<TagCmd>),
    Bulk(Box<BulkCmd>),
    Reap(Box<ReapCmd>),
    Settle(Box<SettleCmd>),
    Key(Box<KeyCmd>),
    /// `health`: answered once the batch it rides in is committed (or not).
    Probe(tokio::sync::oneshot::Sender<Result<(), ApiError>>),
    /// Commit what is queued, write a full checkpoint, stop, then answer.
    Shutdown(tokio::sync::oneshot::Sender<()>),
}

impl Command {
    /// How many commands this one counts for in a commit batch: an atomic
    /// batch its items, every other command one.
    #[must_use]
    pub fn weight(&self) -> usize {
        match self {
            Command::Batch(b) => b.items.len().max(1),
            _ => 1,
        }
    }

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
            Command::Transfer(_)
            | Command::Batch(_)
            | Command::Create(_)
            | Command::User(_)
            | Command::Key(_)
            | Command::Shutdown(_)
            | Command::Probe(_) => None,
        }
    }
}

/// What a committed record got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub id: u64,
    pub time: u64,
    pub prev: [u8; 32],
    pub hash: [u8; 32],
    pub applied: Applied,
}

/// What a command did, as the state machine decided.
pub enum Outcome {
    /// A transfer, and the user whose `events` a `mint` counted up.
    Transfer(Result<Done, ApiError>, Option<Box<UserRecord>>),
    /// An atomic batch: every item's record, or the first failing item's
    /// error (naming the item).
    Batch(Result<Vec<Done>, ApiError>),
    /// A create: the account's number and its funding record, if any.
    Create(Result<(u32, Option<Done>), ApiError>),
    User(Result<Box<UserRecord>, ApiError>),
    Key(Result<Box<KeyRecord>, ApiError>),
    /// An admin change: its reply, and the changes owners must hear of.
    Admin(Result<(Reply, Vec<AdminEffect>), ApiError>),
    /// A `health` probe: whether its batch committed.
    Probe(Result<(), ApiError>),
}

impl Outcome {
    /// The same outcome, refused with `e` (a commit that failed).
    pub fn fail(&mut self, e: &ApiError) {
        match self {
            Outcome::Transfer(r, rewarded) => {
                *r = Err(e.clone());
                *rewarded = None;
            }
            Outcome::Batch(r) => *r = Err(e.clone()),
            Outcome::Create(r) => *r = Err(e.clone()),
            Outcome::User(r) => *r = Err(e.clone()),
            Outcome::Key(r) => *r = Err(e.clone()),
            Outcome::Admin(r) => *r = Err(e.clone()),
            Outcome::Probe(r) => *r = Err(e.clone()),
        }
    }

    /// The refusal of `cmd` with `e`, for a command the journal will not
    /// apply (`None` for a shutdown, which has no outcome).
    #[must_use]
    pub fn refused(cmd: &Command, e: &ApiError) -> Option<Outcome> {
        Some(match cmd {
            Command::Transfer(_) => Outcome::Transfer(Err(e.clone()), None),
            Command::Batch(_) => Outcome::Batch(Err(e.clone())),
            Command::Create(_) => Outcome::Create(Err(e.clone())),
            Command::User(_) => Outcome::User(Err(e.clone())),
            Command::Key(_) => Outcome::Key(Err(e.clone())),
            Command::Probe(_) => Outcome::Probe(Err(e.clone())),
            Command::Close(_) | Command::Tag(_) | Command::Bulk(_) | Command::Reap(_) | Command::Settle(_) => {
                Outcome::Admin(Err(e.clone()))
            }
            Command::Shutdown(_) => return None,
        })
    }
}

/// What an admin change did to one account, for its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminEffect {
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

/// One committed batch on its way to the fan-out: each command with what
/// it did, in commit order.
pub struct Committed(pub Vec<(Command, Outcome)>);

/// Handle used by shards and ops to queue commands.
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
