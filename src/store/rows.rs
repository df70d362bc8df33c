//! The rows besides records: account metadata, users, holds and redeem
//! requests, each stored as MessagePack with field names.

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::wire::UserView;

/// Everything about an account except its balance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountMeta {
    /// Dense number in creation order: the key of the balance row.
    pub num: u32,
    pub owner: Option<String>,
    pub tags: Vec<String>,
    /// Milliseconds since the Unix epoch.
    pub created: u64,
    /// The reason given at creation.
    pub memo: Option<String>,
    pub deleted: Option<Tombstone>,
}

/// The rarely set parts of an account, as its owning shard keeps them:
/// most accounts have none, so a slot holds these behind an `Option<Box>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountExtra {
    pub owner: Option<Box<str>>,
    pub tags: Box<[Box<str>]>,
    pub memo: Option<Box<str>>,
}

impl AccountExtra {
    /// These parts, when any is set.
    #[must_use]
    pub fn new(owner: Option<Box<str>>, tags: Box<[Box<str>]>, memo: Option<Box<str>>) -> Option<Box<AccountExtra>> {
        (owner.is_some() || !tags.is_empty() || memo.is_some()).then(|| Box::new(AccountExtra { owner, tags, memo }))
    }

    /// The extra parts of `meta`, when it has any.
    #[must_use]
    pub fn of(meta: &AccountMeta) -> Option<Box<AccountExtra>> {
        AccountExtra::new(
            meta.owner.as_deref().map(Into::into),
            meta.tags.iter().map(|t| t.as_str().into()).collect(),
            meta.memo.as_deref().map(Into::into),
        )
    }
}

/// What is left of a deleted account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub reason: String,
    pub time: u64,
}

impl AccountMeta {
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("account metadata always encodes")
    }
    pub fn decode(bytes: &[u8]) -> Result<AccountMeta, StoreError> {
        rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("account: {e}")))
    }
}

/// `encode` / `decode` for a record stored as MessagePack with field names
/// (readable by any later version that adds optional fields).
macro_rules! named_record {
    ($ty:ident, $what:literal) => {
        impl $ty {
            #[must_use]
            pub fn encode(&self) -> Vec<u8> {
                rmp_serde::to_vec_named(self).expect(concat!($what, " records always encode"))
            }
            pub fn decode(bytes: &[u8]) -> Result<$ty, StoreError> {
                rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!(concat!($what, ": {}"), e)))
            }
        }
    };
}

/// A user who logs in. Only the argon2 PHC string of the password is kept.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user: String,
    pub name: String,
    pub email: String,
    pub password_hash: String,
    pub role: String,
    pub group: Option<String>,
    pub events: u64,
    /// Tokens issued under an older epoch are revoked.
    pub token_epoch: u64,
    /// Tokens revoked one by one (`logout` with several sessions): their
    /// id and expiry (ms), dropped once expired.
    #[serde(default)]
    pub revoked_tokens: Vec<(String, u64)>,
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord").field("user", &self.user).field("role", &self.role).finish_non_exhaustive()
    }
}

named_record!(UserRecord, "user");

/// A service key as stored: never its secret, only the secret's BLAKE3.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub name: String,
    pub role: String,
    /// A key limited to these accounts moves money out of them only.
    pub accounts: Option<Vec<String>>,
    pub hash: [u8; 32],
    pub created: u64,
    pub created_by: String,
    /// Dead from this time on (ms since the epoch); `None`: never.
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
    pub revoked_by: Option<String>,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord").field("key_id", &self.key_id).field("role", &self.role).finish_non_exhaustive()
    }
}

named_record!(KeyRecord, "key");

impl From<&KeyRecord> for crate::wire::KeyView {
    fn from(k: &KeyRecord) -> crate::wire::KeyView {
        crate::wire::KeyView {
            key_id: k.key_id.clone(),
            name: k.name.clone(),
            role: k.role.clone(),
            accounts: k.accounts.clone(),
            created: k.created,
            created_by: k.created_by.clone(),
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            revoked_by: k.revoked_by.clone(),
        }
    }
}

/// A two-phase transfer as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRecord {
    pub id: u64,
    pub hold: crate::ledger::Hold,
    pub memo: Option<String>,
    /// Voided automatically at this time (ms since the epoch); 0: never.
    pub expires_at: u64,
    /// The fee rate a post pays (a user's hold to another user).
    pub fee_bps: u32,
    /// Behind a redeem request: only `decide_redeem` settles it.
    pub redeem: bool,
    pub created: u64,
}

named_record!(HoldRecord, "hold");

/// A redeem request as stored: the shape `redeems` shows.
pub use crate::wire::{Redeem as RedeemRecord, RedeemStatus};

named_record!(RedeemRecord, "redeem");

impl From<&UserRecord> for UserView {
    fn from(u: &UserRecord) -> UserView {
        UserView {
            user: u.user.clone(),
            name: u.name.clone(),
            email: u.email.clone(),
            role: u.role.clone(),
            group: u.group.clone(),
            events: u.events,
        }
    }
}
