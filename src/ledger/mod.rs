//! The ledger rules as plain functions over plain data: no IO, no async, no actors.
//!
//! Two views of every balance exist at run time, and this module defines both:
//!
//! - the *owner's view* ([`OwnerAccount`]), kept by the shard actor that is the
//!   account's single writer. A debit is *reserved* there before it is
//!   committed, so concurrent debits can never spend the same unit twice;
//!   credits arrive only after they are durable.
//! - the *book* ([`Book`]), the journal's committed view, in commit order. It
//!   decides what the owner cannot know alone (does the receiver exist, would
//!   the credit cross its cap or overflow) and is what gets persisted.
//!
//! Because the owner subtracts debits early and adds credits late, its
//! available amount never exceeds the committed balance, which is why a check
//! against the owner's view is enough to keep the book above every minimum.
//!
//! # Layout
//!
//! - [`keys`]: account ids as map keys, and the map the owners keep.
//! - [`account`]: an account as its owner sees it ([`OwnerAccount`]).
//! - [`book`]: the journal's committed view ([`Book`]).
//! - [`holds`]: two-phase transfers ([`Hold`]).
//! - [`policy`]: the campus rules and fees ([`Policy`]).
//! - here: errors, kinds, bounds and the checks of a single request.

use crate::limits::{ACCOUNT_ID_BYTES_MAX, KEY_BYTES_MAX, MEMO_BYTES_MAX};

pub mod account;
pub mod book;
pub mod holds;
pub mod keys;
pub mod policy;

pub use account::{OwnerAccount, Status};
pub use book::{Applied, Book, BookAccount, Links, Mode};
pub use holds::{Hold, HoldStatus};
pub use keys::{AccountKey, AccountMap};
pub use policy::{fee, net_fee, FeeRounding, Party, Policy, Receiver};

/// Issuance account: every unit in circulation came from here; unbounded.
pub const MINT: &str = "@mint";
/// Collects fees.
pub const TREASURY: &str = "@treasury";
/// Receives value handed out for goods.
pub const REDEEMED: &str = "@redeemed";
/// The system accounts, present from the first start.
pub const SYSTEM_ACCOUNTS: [&str; 3] = [MINT, TREASURY, REDEEMED];

/// A violated money rule. Every variant is a refusal: nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient funds in {account}: available {available}, needed {amount}")]
    InsufficientFunds { account: String, available: i64, amount: i64 },
    #[error("{account} would exceed its maximum balance {max}")]
    AboveMax { account: String, max: i64 },
    #[error("{account} would fall below its minimum balance {min}")]
    BelowMin { account: String, min: i64 },
    #[error("the balance would overflow a 64-bit integer")]
    Overflow,
    #[error("the balance would underflow a 64-bit integer")]
    Underflow,
    #[error("account {0} not found")]
    NotFound(String),
    #[error("account {0} was deleted")]
    Deleted(String),
    #[error("account {0} exists")]
    Exists(String),
    #[error("bad amount: {0}")]
    BadAmount(String),
    #[error("bad id: {0}")]
    BadId(String),
    /// A free-text field (memo, idempotency key) out of its bounds.
    #[error("{0}")]
    BadField(String),
    #[error("from and to are the same account")]
    SameAccount,
    /// The sender has attended too few events (its own figures: they are the caller's).
    #[error("you have attended {events} {}; transfers need at least {min}", if *.events == 1 { "event" } else { "events" })]
    SenderIneligible { events: u64, min: u64 },
    /// The receiving user has attended too few events. No figures: they
    /// are another user's.
    #[error("{user} cannot receive transfers yet (too few events attended)")]
    ReceiverIneligible { user: String },
    /// The fee would take the whole amount, so the receiver would get nothing.
    #[error("a fee of {fee} would take the whole amount of {amount}; send more")]
    NothingLeft { amount: i64, fee: i64 },
    #[error("{0}")]
    NotAllowed(String),
}

/// The kind of a transfer record (protocol.md, "Transfer record").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Transfer,
    Mint,
    Adjust,
    Redeem,
    Close,
    Hold,
    Post,
    Void,
}

impl Kind {
    /// The name on the wire (as serde writes it).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Transfer => "transfer",
            Kind::Mint => "mint",
            Kind::Adjust => "adjust",
            Kind::Redeem => "redeem",
            Kind::Close => "close",
            Kind::Hold => "hold",
            Kind::Post => "post",
            Kind::Void => "void",
        }
    }

    /// Stable one-byte tag used in the stored record format.
    #[must_use]
    pub fn to_u8(self) -> u8 {
        match self {
            Kind::Transfer => 0,
            Kind::Mint => 1,
            Kind::Adjust => 2,
            Kind::Redeem => 3,
            Kind::Close => 4,
            Kind::Hold => 5,
            Kind::Post => 6,
            Kind::Void => 7,
        }
    }
    #[must_use]
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Transfer,
            1 => Kind::Mint,
            2 => Kind::Adjust,
            3 => Kind::Redeem,
            4 => Kind::Close,
            5 => Kind::Hold,
            6 => Kind::Post,
            7 => Kind::Void,
            _ => return None,
        })
    }
}

/// `min_balance` and `max_balance` from config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub min_balance: i64,
    pub max_balance: Option<i64>,
}

/// The inclusive range one account's balance must stay in; `None` is unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub min: Option<i64>,
    pub max: Option<i64>,
}

impl Limits {
    /// Bounds of an account: `@mint` is unbounded (its balance is minus
    /// everything issued), the other system accounts cannot go negative and
    /// have no cap, client accounts follow config.
    #[must_use]
    pub fn bounds(&self, account: &str) -> Bounds {
        if account == MINT {
            Bounds { min: None, max: None }
        } else if is_system(account) {
            Bounds { min: Some(0), max: None }
        } else {
            Bounds { min: Some(self.min_balance), max: self.max_balance }
        }
    }
}

/// True for ids that only the server may create.
#[must_use]
pub fn is_system(account: &str) -> bool {
    account.starts_with('@')
}

/// Checks an account id: 1-64 bytes of `A-Za-z0-9._:@-`.
pub fn validate_account_id(id: &str) -> Result<(), LedgerError> {
    if id.is_empty() || id.len() > ACCOUNT_ID_BYTES_MAX {
        return Err(LedgerError::BadId(format!("account ids are 1-{ACCOUNT_ID_BYTES_MAX} bytes")));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-')) {
        return Err(LedgerError::BadId("account ids use only A-Za-z0-9._:@-".into()));
    }
    Ok(())
}

/// Checks a transfer amount: a positive integer.
pub fn validate_amount(amount: i64) -> Result<(), LedgerError> {
    if amount <= 0 {
        return Err(LedgerError::BadAmount(format!("amount must be a positive integer, got {amount}")));
    }
    Ok(())
}

/// Checks the optional free-text fields of a transfer.
pub fn validate_memo_key(memo: Option<&str>, key: Option<&str>) -> Result<(), LedgerError> {
    if memo.is_some_and(|m| m.len() > MEMO_BYTES_MAX) {
        return Err(LedgerError::BadField(format!("memo is longer than {MEMO_BYTES_MAX} bytes")));
    }
    if key.is_some_and(|k| k.is_empty() || k.len() > KEY_BYTES_MAX) {
        return Err(LedgerError::BadField(format!("key must be 1-{KEY_BYTES_MAX} bytes")));
    }
    Ok(())
}

/// `balance - amount`, refused if it would leave `bounds`.
pub fn debit(account: &str, balance: i64, amount: i64, bounds: Bounds) -> Result<i64, LedgerError> {
    let after = balance.checked_sub(amount).ok_or(LedgerError::Underflow)?;
    if let Some(min) = bounds.min {
        if after < min {
            return Err(LedgerError::BelowMin { account: account.to_owned(), min });
        }
    }
    Ok(after)
}

/// `balance + amount`, refused if it would leave `bounds`.
pub fn credit(account: &str, balance: i64, amount: i64, bounds: Bounds) -> Result<i64, LedgerError> {
    let after = balance.checked_add(amount).ok_or(LedgerError::Overflow)?;
    if let Some(max) = bounds.max {
        if after > max {
            return Err(LedgerError::AboveMax { account: account.to_owned(), max });
        }
    }
    Ok(after)
}

/// Applies a signed change within bounds (admin `add`).
pub fn adjust(account: &str, balance: i64, delta: i64, bounds: Bounds) -> Result<i64, LedgerError> {
    if delta >= 0 {
        credit(account, balance, delta, bounds)
    } else {
        let magnitude = delta.checked_neg().ok_or(LedgerError::Underflow)?;
        debit(account, balance, magnitude, bounds)
    }
}

#[cfg(test)]
mod tests;
