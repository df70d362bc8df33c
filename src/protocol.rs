//! Arguments and results of every op, as they travel on the wire.
//!
//! Argument structs refuse unknown fields: in a money system a misspelt
//! `from` must be an error, not a transfer from the caller's default account.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ledger::Kind;

/// Protocol version spoken by this server.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every op the server knows, as listed by `help`.
pub const OPS: &[&str] = &[
    "hello",
    "ping",
    "health",
    "help",
    "signup",
    "login",
    "auth",
    "whoami",
    "logout",
    "change_password",
    "reset_password",
    "confirm",
    "resend",
    "balance",
    "account",
    "transfer",
    "mint",
    "create_account",
    "history",
    "get_transfer",
    "add",
    "delete_account",
    "delete_reason",
    "list_accounts",
    "tag",
    "bulk_add",
    "reap",
    "backup",
    "set_events",
    "hold",
    "post",
    "void",
    "redeem",
    "redeems",
    "my_redeems",
    "decide_redeem",
    "audit",
    "stats",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginArgs {
    pub user: String,
    pub password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthArgs {
    pub token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountArg {
    pub account: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferArgs {
    pub from: Option<String>,
    pub to: String,
    pub amount: i64,
    pub memo: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintArgs {
    pub to: String,
    pub amount: i64,
    pub memo: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccountArgs {
    pub account: String,
    pub owner: Option<String>,
    pub tags: Option<Vec<String>>,
    pub initial: Option<i64>,
    pub memo: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryArgs {
    pub account: Option<String>,
    pub after: Option<u64>,
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetTransferArgs {
    pub id: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct HelloReply {
    pub server: &'static str,
    /// The build, to logged-in callers only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    pub protocol: u32,
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
    /// Balance of `from` right after this transfer, in commit order (only in
    /// the reply to the request that made it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_balance: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_balance: Option<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HistoryReply {
    pub account: String,
    pub transfers: Vec<TransferView>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditReply {
    pub accounts: u64,
    pub sum: i64,
    pub transfers: u64,
    pub chain_ok: bool,
    pub head: String,
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
    pub inflight: u64,
}

/// A user as the wire shows it: never the password hash or token epoch.
#[must_use]
pub fn user_view(u: &crate::store::UserRecord) -> serde_json::Value {
    serde_json::json!({
        "user": u.user, "name": u.name, "email": u.email, "role": u.role,
        "group": u.group, "events": u.events,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupArgs {
    pub user: String,
    pub name: String,
    pub email: String,
    pub password: String,
    pub group: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldArgs {
    pub from: Option<String>,
    pub to: String,
    pub amount: i64,
    pub memo: Option<String>,
    pub key: Option<String>,
    /// Voided automatically after this many seconds; absent: never.
    pub timeout_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostArgs {
    pub hold: u64,
    /// Default: the whole hold. The rest is released.
    pub amount: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoidArgs {
    pub hold: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeemArgs {
    pub item: String,
    pub amount: i64,
    pub memo: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeemsArgs {
    /// An unknown status is refused by serde, as `bad_request`.
    pub status: Option<crate::store::RedeemStatus>,
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideRedeemArgs {
    pub request: u64,
    pub accept: bool,
    pub note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetEventsArgs {
    pub user: String,
    pub events: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetPasswordArgs {
    pub user: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmArgs {
    pub pending: String,
    /// Six digits, as a string (`"012345"`) or an integer (`12345`).
    #[serde(deserialize_with = "otp_code")]
    pub otp: String,
    pub new_password: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResendArgs {
    pub pending: String,
}

/// A code is six digits; the text mode turns `otp=012345` into a number,
/// so numbers below 1,000,000 are read back as six digits.
fn otp_code<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(u64),
    }
    let code = match Raw::deserialize(d)? {
        Raw::Text(t) => t,
        Raw::Number(n) if n < 1_000_000 => format!("{n:06}"),
        Raw::Number(_) => String::new(),
    };
    if code.len() != crate::otp::CODE_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(serde::de::Error::custom("otp must be 6 digits"));
    }
    Ok(code)
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordArgs {
    pub old_password: String,
    pub new_password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddArgs {
    pub account: String,
    pub delta: i64,
    pub memo: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteAccountArgs {
    pub account: String,
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountOnly {
    pub account: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListAccountsArgs {
    pub owner: Option<String>,
    pub tag: Option<String>,
    pub balance_min: Option<i64>,
    pub balance_max: Option<i64>,
    pub after: Option<String>,
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagArgs {
    pub account: String,
    pub add: Option<Vec<String>>,
    pub remove: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkAddArgs {
    pub tag: String,
    pub delta: i64,
    pub memo: Option<String>,
    pub force: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReapArgs {
    pub reason: String,
    pub below: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupArgs {
    /// A file name; the copy is written to `DATA/backups/<out>`.
    pub out: String,
}

/// The `ok` value of any reply.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Text(&'static str),
    List(&'static [&'static str]),
    Hello(HelloReply),
    Health(HealthReply),
    Login(LoginReply),
    Auth(AuthReply),
    Balance(BalanceReply),
    Account(Box<AccountView>),
    Transfer(Arc<TransferView>),
    History(HistoryReply),
    Audit(AuditReply),
    Stats(StatsReply),
    Pending(PendingReply),
    Json(serde_json::Value),
}
