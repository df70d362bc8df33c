//! The result of every op, as it travels on the wire: one typed struct per
//! shape, declared once here and documented in protocol.md.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ledger::Kind;

#[derive(Clone, Debug, Default, Serialize)]
pub struct HelloReply {
    pub server: &'static str,
    /// The build, to logged-in callers only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    pub protocol: u32,
    /// In a cluster: this member's role (`leader`, `follower`, `candidate`
    /// or `learner`), the leader's client address (null when none is
    /// known), the term and this member's id. Absent on a single server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
}

/// `health`: the journal can commit.
#[derive(Clone, Debug, Serialize)]
pub struct HealthReply {
    pub status: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct LoginReply {
    pub token: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at: u64,
    pub user: String,
    pub role: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuthReply {
    pub user: String,
    pub role: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct BalanceReply {
    pub account: String,
    pub balance: i64,
    /// Part of the balance held by open holds.
    pub held: i64,
    /// The balance less what is held and what transfers not yet committed reserved.
    pub available: i64,
    /// A stale read's position: the id of the last record the member had
    /// applied when it answered (every record up to it is reflected, none
    /// after). Absent from the leader's answers, which are current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AccountView {
    pub account: String,
    pub owner: Option<String>,
    pub tags: Vec<String>,
    pub balance: i64,
    pub available: i64,
    pub status: &'static str,
    /// Milliseconds since the Unix epoch.
    pub created: u64,
    pub memo: Option<String>,
    /// A stale read's position: the id of the last record the member had
    /// applied when it answered (every record up to it is reflected, none
    /// after). Absent from the leader's answers, which are current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<u64>,
}

/// A 32-byte hash, sent as 64 lower-case hex digits. Kept as bytes until
/// it is written, so building a reply allocates no strings for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// The 64 lower-case hex digits, from a table of every byte's two.
    #[must_use]
    pub fn hex(&self) -> [u8; 64] {
        const PAIRS: [[u8; 2]; 256] = {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            let mut t = [[0u8; 2]; 256];
            let mut i = 0;
            while i < 256 {
                t[i] = [DIGITS[i >> 4], DIGITS[i & 0x0f]];
                i += 1;
            }
            t
        };
        let mut out = [0u8; 64];
        for (pair, &b) in out.chunks_exact_mut(2).zip(&self.0) {
            pair.copy_from_slice(&PAIRS[usize::from(b)]);
        }
        out
    }
}

impl Serialize for Hash32 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let out = self.hex();
        // Hex digits are ASCII, so this cannot fail.
        s.serialize_str(std::str::from_utf8(&out).unwrap_or_default())
    }
}

/// A transfer record as the wire shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TransferView {
    pub id: u64,
    pub kind: Kind,
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub fee: i64,
    pub memo: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub time: u64,
    pub key: Option<String>,
    /// Hash of the previous record (hex on the wire): the journal is a hash chain.
    pub prev: Hash32,
    /// Hash of this record (hex on the wire).
    pub hash: Hash32,
    /// Who made it: a user id, or `key:<key_id>` (absent: the server's own
    /// timer, or a record from before records said).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<Arc<str>>,
    /// Balance of `from` right after this transfer, in commit order (only in
    /// the reply to the request that made it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_balance: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_balance: Option<i64>,
}

impl TransferView {
    /// A user sees who made a transfer only when it was the user: staff
    /// user ids and key ids are not theirs to learn.
    pub fn shown_to(&mut self, reader: &str, staff: bool) {
        if !staff && self.by.as_deref().is_some_and(|b| b != reader) {
            self.by = None;
        }
    }

    /// The one place a transfer's view is put together, from a stored
    /// record, a command just committed or a settled hold.
    #[allow(clippy::too_many_arguments)] // the record's fields, in order
    #[must_use]
    pub fn new(
        id: u64,
        kind: Kind,
        from: String,
        to: String,
        (amount, fee): (i64, i64),
        memo: Option<String>,
        time: u64,
        key: Option<String>,
        (prev, hash): ([u8; 32], [u8; 32]),
        balances: Option<(i64, i64)>,
        by: Option<Arc<str>>,
    ) -> TransferView {
        TransferView {
            id,
            kind,
            from,
            to,
            amount,
            fee,
            memo,
            time,
            key,
            prev: Hash32(prev),
            hash: Hash32(hash),
            by,
            from_balance: balances.map(|b| b.0),
            to_balance: balances.map(|b| b.1),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct HistoryReply {
    pub account: String,
    pub transfers: Vec<TransferView>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next: Option<u64>,
    /// A stale read's position: the id of the last record the member had
    /// applied when it answered (every record up to it is reflected, none
    /// after). Absent from the leader's answers, which are current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditReply {
    pub accounts: u64,
    pub sum: i64,
    pub transfers: u64,
    pub chain_ok: bool,
    /// The hash of the last record (hex on the wire).
    pub head: Hash32,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatsReply {
    pub connections: u64,
    pub connections_total: u64,
    pub ops: u64,
    pub transfers: u64,
    pub commits: u64,
    pub batch_items: u64,
    pub batch_max: u64,
    pub batch_mean: f64,
    pub journal_queue: u64,
    /// Reply slots in use (a request holds one, a page several).
    pub inflight: u64,
    /// OTP sessions pending (expired ones are dropped every second).
    pub otp_sessions: u64,
}

/// An operation waiting for its code.
#[derive(Clone, Debug, Serialize)]
pub struct PendingReply {
    /// The session id to pass to `confirm` and `resend`.
    pub pending: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at: u64,
    /// Whether the mail with the code went out; if not, `mail_error` says
    /// why and `resend` tries again. Absent from `reset_password` (and its
    /// resends), which answer before the mail goes out and the same way
    /// whether or not the user exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mail_error: Option<String>,
}

/// The `ok` value of any reply. Large shapes are boxed: replies move
/// through channels on the hot path, and a small enum moves cheaply.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Text(&'static str),
    List(&'static [&'static str]),
    Hello(HelloReply),
    Health(HealthReply),
    Login(LoginReply),
    Auth(AuthReply),
    LoggedOut(LoggedOut),
    PasswordReset(PasswordReset),
    User(Box<UserView>),
    Balance(BalanceReply),
    Account(Box<AccountView>),
    Transfer(Arc<TransferView>),
    /// One item of a `transfer_batch`, on its way to the batch's reply.
    Item(BatchItem),
    Batch(BatchReply),
    Added(AddReply),
    Hold(Box<HoldReply>),
    Settled(Box<SettleReply>),
    NewRedeem(Box<NewRedeem>),
    Redeem(Box<Redeem>),
    Redeems(RedeemsPage),
    History(HistoryReply),
    Accounts(AccountsPage),
    Deleted(DeletedReply),
    DeleteReason(DeleteReasonReply),
    Tags(TagsReply),
    Bulk(BulkReply),
    Count(CountReply),
    Backup(BackupReply),
    Members(MembersReply),
    Audit(AuditReply),
    Stats(StatsReply),
    Pending(PendingReply),
    KeyCreated(Box<KeyCreated>),
    Keys(KeysPage),
    Key(Box<KeyView>),
}

/// `create_key`: the secret, shown this once (only its hash is kept).
#[derive(Clone, Serialize)]
pub struct KeyCreated {
    pub key_id: String,
    pub secret: String,
    pub name: String,
    pub role: String,
    pub accounts: Option<Vec<String>>,
    pub expires_at: Option<u64>,
}

impl std::fmt::Debug for KeyCreated {
    // The secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCreated").field("key_id", &self.key_id).field("role", &self.role).finish_non_exhaustive()
    }
}

/// A service key as `list_keys` shows it: never the secret.
#[derive(Clone, Debug, Serialize)]
pub struct KeyView {
    pub key_id: String,
    pub name: String,
    pub role: String,
    pub accounts: Option<Vec<String>>,
    pub created: u64,
    pub created_by: String,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
    pub revoked_by: Option<String>,
}

/// `list_keys`.
#[derive(Clone, Debug, Serialize)]
pub struct KeysPage {
    pub keys: Vec<KeyView>,
    /// The `after` of the next page, if there is one.
    pub next: Option<String>,
}

/// A user as the wire shows it: never the password hash or token epoch.
#[derive(Clone, Debug, Serialize)]
pub struct UserView {
    pub user: String,
    pub name: String,
    pub email: String,
    pub role: String,
    pub group: Option<String>,
    pub events: u64,
}

/// `logout`.
#[derive(Clone, Debug, Serialize)]
pub struct LoggedOut {
    pub logged_out: bool,
}

/// A password reset confirmed by its code.
#[derive(Clone, Debug, Serialize)]
pub struct PasswordReset {
    pub user: String,
    pub password_reset: bool,
}

/// `add`: the account's balance after the change (absent when a repeated
/// key answers from the stored record, which keeps no balances).
#[derive(Clone, Debug, Serialize)]
pub struct AddReply {
    pub account: String,
    pub balance: Option<i64>,
    pub change: i64,
    pub transfer: u64,
}

/// `hold`: the hold just made.
#[derive(Clone, Debug, Serialize)]
pub struct HoldReply {
    pub hold: u64,
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub status: &'static str,
    /// When it is voided by itself (ms since the epoch); absent: never.
    pub expires_at: Option<u64>,
    pub transfer: Arc<TransferView>,
}

/// `post` and `void`: the hold settled, and the record that settled it.
#[derive(Clone, Debug, Serialize)]
pub struct SettleReply {
    pub hold: u64,
    pub status: &'static str,
    pub posted: i64,
    pub released: i64,
    pub transfer: TransferView,
}

/// Where a redeem request stands; it is decided once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RedeemStatus {
    Pending,
    Accepted,
    Rejected,
}

impl RedeemStatus {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RedeemStatus::Pending => "pending",
            RedeemStatus::Accepted => "accepted",
            RedeemStatus::Rejected => "rejected",
        }
    }
}

/// A redeem request, as shown and as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redeem {
    pub request: u64,
    pub user: String,
    pub account: String,
    pub item: String,
    pub amount: i64,
    pub memo: Option<String>,
    pub status: RedeemStatus,
    pub created: u64,
    pub decided_by: Option<String>,
    pub decided_at: Option<u64>,
    pub note: Option<String>,
    /// The transfer that moved it to `@redeemed` (accepted) or released it (rejected).
    pub settled_by: Option<u64>,
}

/// A confirmed `redeem`: the new request, still pending.
#[derive(Clone, Debug, Serialize)]
pub struct NewRedeem {
    pub request: u64,
    pub user: String,
    pub account: String,
    pub item: String,
    pub amount: i64,
    pub memo: Option<String>,
    pub status: RedeemStatus,
    pub created: u64,
}

/// `redeems` and `my_redeems`, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct RedeemsPage {
    pub requests: Vec<Redeem>,
}

/// One account of a `list_accounts` page.
#[derive(Clone, Debug, Serialize)]
pub struct ListedAccount {
    pub account: String,
    pub owner: Option<String>,
    pub tags: Vec<String>,
    pub balance: i64,
    pub created: u64,
    pub memo: Option<String>,
}

/// `list_accounts`: a page, and the cursor of the next one.
#[derive(Clone, Debug, Serialize)]
pub struct AccountsPage {
    pub accounts: Vec<ListedAccount>,
    pub next: Option<String>,
}

/// `delete_account`.
#[derive(Clone, Debug, Serialize)]
pub struct DeletedReply {
    pub deleted: bool,
}

/// `delete_reason`.
#[derive(Clone, Debug, Serialize)]
pub struct DeleteReasonReply {
    pub account: String,
    pub reason: String,
    pub time: u64,
}

/// `tag`.
#[derive(Clone, Debug, Serialize)]
pub struct TagsReply {
    pub account: String,
    pub tags: Vec<String>,
}

/// `transfer_batch`: one result per item, in the request's order.
#[derive(Clone, Debug, Serialize)]
pub struct BatchReply {
    pub results: Vec<BatchItem>,
    /// Items committed (or replayed by their key), and items refused.
    pub applied: usize,
    pub failed: usize,
}

/// One item's result: its record's id and the balances right after it
/// (absent for a key replayed from disk), or its error.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum BatchItem {
    Done {
        id: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        from_balance: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to_balance: Option<i64>,
    },
    Failed {
        code: crate::error::ErrorCode,
        message: String,
    },
}

impl BatchItem {
    /// A committed item (or a repeat of its key).
    #[must_use]
    pub fn done(v: &TransferView) -> BatchItem {
        BatchItem::Done { id: v.id, from_balance: v.from_balance, to_balance: v.to_balance }
    }
}

/// `bulk_add`.
#[derive(Clone, Debug, Serialize)]
pub struct BulkReply {
    pub tag: String,
    pub delta: i64,
    pub count: usize,
}

/// `reap`.
#[derive(Clone, Debug, Serialize)]
pub struct CountReply {
    pub count: usize,
}

/// `add_node`, `remove_node`: the voters once the change is committed.
#[derive(Clone, Debug, Serialize)]
pub struct MembersReply {
    pub voters: Vec<u64>,
}

/// `backup`.
#[derive(Clone, Debug, Serialize)]
pub struct BackupReply {
    pub path: String,
    pub transfers: u64,
    pub head: Hash32,
}

/// What the reply to a committed transfer looks like: the op that made it
/// decides (a `transfer`, an `add`, a `hold`, a `redeem`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The transfer record with both balances.
    Transfer,
    /// An item of `transfer_batch`: its id and both balances, all the
    /// batch's reply shows of it.
    Item,
    /// `add`: `{account, balance, change, transfer}`.
    Add { account: Box<str>, delta: i64 },
    /// `hold`: `{hold, status, expires_at, transfer}`.
    Hold { expires_at: u64 },
    /// A confirmed `redeem`: the new request.
    Redeem { user: Box<str>, item: Box<str>, memo: Option<Box<str>> },
}

impl Shape {
    /// The reply to a committed transfer (or to a repeat of its key), in
    /// this shape. A repeat read back from disk carries no balances.
    #[must_use]
    pub fn reply(&self, v: Arc<TransferView>) -> Reply {
        match self {
            Shape::Transfer => Reply::Transfer(v),
            Shape::Item => Reply::Item(BatchItem::done(&v)),
            Shape::Add { account, delta } => Reply::Added(AddReply {
                account: account.to_string(),
                balance: if *delta > 0 { v.to_balance } else { v.from_balance },
                change: *delta,
                transfer: v.id,
            }),
            Shape::Hold { expires_at } => Reply::Hold(Box::new(HoldReply {
                hold: v.id,
                from: v.from.clone(),
                to: v.to.clone(),
                amount: v.amount,
                status: "open",
                expires_at: (*expires_at > 0).then_some(*expires_at),
                transfer: v,
            })),
            Shape::Redeem { user, item, memo } => Reply::NewRedeem(Box::new(NewRedeem {
                request: v.id,
                user: user.to_string(),
                account: v.from.clone(),
                item: item.to_string(),
                amount: v.amount,
                memo: memo.as_deref().map(str::to_owned),
                status: RedeemStatus::Pending,
                created: v.time,
            })),
        }
    }
}
