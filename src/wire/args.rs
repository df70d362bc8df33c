//! The arguments of every op, as they travel on the wire.
//!
//! Argument structs refuse unknown fields: in a money system a misspelt
//! `from` must be an error, not a transfer from the caller's default account.

use schemars::JsonSchema;
use serde::Deserialize;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

// No Debug: it holds a secret, which must never reach a log line.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginArgs {
    pub user: String,
    pub password: String,
}

// No Debug: it holds a secret, which must never reach a log line.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthArgs {
    /// A login token...
    pub token: Option<String>,
    /// ...or a service key's secret.
    pub key: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogoutArgs {
    /// End every token of the user, not only this connection's.
    pub all: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyArgs {
    pub name: String,
    /// `admin`, `operator` or `auditor`.
    pub role: String,
    /// Limit the key to moving money out of these accounts.
    pub accounts: Option<Vec<String>>,
    /// Dead after this many seconds; absent: until revoked.
    pub expires_s: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListKeysArgs {
    /// The page after this key id.
    pub after: Option<String>,
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeKeyArgs {
    pub key_id: String,
}

// No Debug: it holds a secret, which must never reach a log line.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserArgs {
    pub user: String,
    pub role: String,
    pub name: String,
    pub email: String,
    pub password: String,
    pub group: Option<String>,
}

/// How current a read must be. In a cluster, the leader answers every
/// read as of now; a member that does not lead answers a `stale` read
/// from what it has applied so far (possibly behind the leader), and
/// refuses any other with `not_leader`. A single server is always current.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    #[default]
    Linearizable,
    Stale,
}

/// Only the `consistency` of a read's arguments, whatever else they hold.
#[derive(Debug, Deserialize)]
pub struct ConsistencyArg {
    pub consistency: Option<Consistency>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountArg {
    pub account: Option<String>,
    pub consistency: Option<Consistency>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferArgs {
    pub from: Option<String>,
    pub to: String,
    pub amount: i64,
    pub memo: Option<String>,
    pub key: Option<String>,
}

/// `transfer_batch`: each item as `transfer` takes it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferBatchArgs {
    pub transfers: Vec<TransferArgs>,
    pub atomic: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MintArgs {
    pub to: String,
    pub amount: i64,
    pub memo: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccountArgs {
    pub account: String,
    pub owner: Option<String>,
    pub tags: Option<Vec<String>>,
    pub initial: Option<i64>,
    pub memo: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryArgs {
    pub account: Option<String>,
    pub after: Option<u64>,
    pub limit: Option<u64>,
    pub consistency: Option<Consistency>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetTransferArgs {
    pub id: u64,
    pub consistency: Option<Consistency>,
}

// No Debug: it holds a secret, which must never reach a log line.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignupArgs {
    pub user: String,
    pub name: String,
    pub email: String,
    pub password: String,
    pub group: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
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

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostArgs {
    pub hold: u64,
    /// Default: the whole hold. The rest is released.
    pub amount: Option<i64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidArgs {
    pub hold: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedeemArgs {
    pub item: String,
    pub amount: i64,
    pub memo: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedeemsArgs {
    /// An unknown status is refused by serde, as `bad_request`.
    pub status: Option<super::replies::RedeemStatus>,
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideRedeemArgs {
    pub request: u64,
    pub accept: bool,
    pub note: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetEventsArgs {
    pub user: String,
    pub events: u64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPasswordArgs {
    pub user: String,
}

// No Debug: it holds a secret, which must never reach a log line.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmArgs {
    pub pending: String,
    /// Six digits, as a string (`"012345"`) or an integer (`12345`).
    #[serde(deserialize_with = "otp_code")]
    #[schemars(with = "OtpCode")]
    pub otp: String,
    pub new_password: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResendArgs {
    pub pending: String,
}

/// What `otp` accepts, for the OpenAPI document.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only its schema is used
enum OtpCode {
    Text(#[schemars(regex(pattern = r"^[0-9]{6}$"))] String),
    Number(#[schemars(range(max = 999_999))] u32),
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
    if code.len() != crate::limits::OTP_CODE_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(serde::de::Error::custom("otp must be 6 digits"));
    }
    Ok(code)
}

// No Debug: it holds a secret, which must never reach a log line.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordArgs {
    pub old_password: String,
    pub new_password: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddArgs {
    pub account: String,
    pub delta: i64,
    pub memo: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteAccountArgs {
    pub account: String,
    pub reason: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountOnly {
    pub account: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListAccountsArgs {
    pub owner: Option<String>,
    pub tag: Option<String>,
    pub balance_min: Option<i64>,
    pub balance_max: Option<i64>,
    pub after: Option<String>,
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TagArgs {
    pub account: String,
    pub add: Option<Vec<String>>,
    pub remove: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkAddArgs {
    pub tag: String,
    pub delta: i64,
    pub memo: Option<String>,
    pub force: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReapArgs {
    pub reason: String,
    pub below: Option<i64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupArgs {
    /// A file name; the copy is written to `DATA/backups/<out>`.
    pub out: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNodeArgs {
    /// The new member's `[cluster] id`.
    pub id: u64,
    /// Where clients reach it.
    pub client: String,
    /// Where the members reach its `raft_listen`.
    pub raft: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveNodeArgs {
    pub id: u64,
}

/// The JSON Schema of each op's arguments, as its handler decodes them
/// (`api::dispatch` names the handler, the handler its `args!` type).
pub fn schema_of(op: super::Op, g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    use super::Op;
    match op {
        Op::Hello | Op::Ping | Op::Health | Op::Help | Op::Whoami | Op::MyRedeems | Op::Audit | Op::Stats => {
            g.subschema_for::<NoArgs>()
        }
        Op::Signup => g.subschema_for::<SignupArgs>(),
        Op::Login => g.subschema_for::<LoginArgs>(),
        Op::Auth => g.subschema_for::<AuthArgs>(),
        Op::Logout => g.subschema_for::<LogoutArgs>(),
        Op::ChangePassword => g.subschema_for::<ChangePasswordArgs>(),
        Op::ResetPassword => g.subschema_for::<ResetPasswordArgs>(),
        Op::Confirm => g.subschema_for::<ConfirmArgs>(),
        Op::Resend => g.subschema_for::<ResendArgs>(),
        Op::Balance | Op::Account => g.subschema_for::<AccountArg>(),
        Op::Transfer => g.subschema_for::<TransferArgs>(),
        Op::TransferBatch => g.subschema_for::<TransferBatchArgs>(),
        Op::Mint => g.subschema_for::<MintArgs>(),
        Op::CreateAccount => g.subschema_for::<CreateAccountArgs>(),
        Op::History => g.subschema_for::<HistoryArgs>(),
        Op::GetTransfer => g.subschema_for::<GetTransferArgs>(),
        Op::Add => g.subschema_for::<AddArgs>(),
        Op::DeleteAccount => g.subschema_for::<DeleteAccountArgs>(),
        Op::DeleteReason => g.subschema_for::<AccountOnly>(),
        Op::ListAccounts => g.subschema_for::<ListAccountsArgs>(),
        Op::Tag => g.subschema_for::<TagArgs>(),
        Op::BulkAdd => g.subschema_for::<BulkAddArgs>(),
        Op::Reap => g.subschema_for::<ReapArgs>(),
        Op::Backup => g.subschema_for::<BackupArgs>(),
        Op::SetEvents => g.subschema_for::<SetEventsArgs>(),
        Op::Hold => g.subschema_for::<HoldArgs>(),
        Op::Post => g.subschema_for::<PostArgs>(),
        Op::Void => g.subschema_for::<VoidArgs>(),
        Op::Redeem => g.subschema_for::<RedeemArgs>(),
        Op::Redeems => g.subschema_for::<RedeemsArgs>(),
        Op::DecideRedeem => g.subschema_for::<DecideRedeemArgs>(),
        Op::CreateKey => g.subschema_for::<CreateKeyArgs>(),
        Op::ListKeys => g.subschema_for::<ListKeysArgs>(),
        Op::RevokeKey => g.subschema_for::<RevokeKeyArgs>(),
        Op::CreateUser => g.subschema_for::<CreateUserArgs>(),
        Op::AddNode => g.subschema_for::<AddNodeArgs>(),
        Op::RemoveNode => g.subschema_for::<RemoveNodeArgs>(),
    }
}
