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

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::constants::{ACCOUNT_ID_BYTES_MAX, KEY_BYTES_MAX, MEMO_BYTES_MAX};

/// A hash map from account id to `V` (foldhash: several times faster than
/// SipHash on short keys, still seeded per process), with a
/// [`AccountMap::prefetch`] that starts loading an entry without waiting,
/// which `std`'s map cannot offer.
pub struct AccountMap<V> {
    table: HashTable<(AccountKey, V)>,
    hasher: foldhash::fast::RandomState,
}

impl<V> Default for AccountMap<V> {
    fn default() -> Self {
        AccountMap { table: HashTable::new(), hasher: foldhash::fast::RandomState::default() }
    }
}

impl<V> AccountMap<V> {
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&V> {
        self.table.find(self.hasher.hash_one(id), |(k, _)| k.as_str() == id).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut V> {
        self.table.find_mut(self.hasher.hash_one(id), |(k, _)| k.as_str() == id).map(|(_, v)| v)
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: AccountKey, value: V) -> Option<V> {
        let AccountMap { table, hasher } = self;
        let hash = hasher.hash_one(key.as_str());
        match table.entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k.as_str())) {
            hashbrown::hash_table::Entry::Occupied(mut e) => Some(std::mem::replace(&mut e.get_mut().1, value)),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert((key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<V> {
        let hash = self.hasher.hash_one(id);
        let entry = self.table.find_entry(hash, |(k, _)| k.as_str() == id).ok()?;
        Some(entry.remove().0 .1)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Starts loading the entry of `id` (the first one whose hash tag
    /// matches) into the cache, without reading it; see [`Book::prefetch`].
    pub fn prefetch(&self, id: &str) {
        if let Some(e) = self.table.iter_hash(self.hasher.hash_one(id)).next() {
            prefetch_lines(e);
        }
    }
}

/// Longest id kept inside an [`AccountKey`] itself.
const KEY_INLINE_BYTES: usize = 30;

/// An account id as a map key. Ids of up to 30 bytes (nearly all) are kept
/// inline, so a lookup compares bytes next to the hash table's own entry
/// instead of following a pointer to a separate heap block: with 100,000
/// accounts that extra cache miss showed up in perf as ~13% of the server's
/// CPU (inside `memcmp`, called from the shards' and the book's lookups).
///
/// The representation is private: the only ways in are the `From`
/// conversions from `&str` and `Box<str>`, which is what makes the
/// unchecked UTF-8 read in [`AccountKey::as_str`] sound.
#[derive(Clone)]
pub struct AccountKey(KeyRepr);

#[derive(Clone)]
enum KeyRepr {
    Inline { len: u8, bytes: [u8; KEY_INLINE_BYTES] },
    Heap(Box<str>),
}

impl AccountKey {
    #[must_use]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // SAFETY: `bytes[..len]` was copied whole from a `&str` (see
            // `From<&str>`, the only constructor of `Inline`, unreachable
            // from outside this module), so it is valid UTF-8; skipping the
            // check saves a scan on every hash-map probe.
            KeyRepr::Inline { len, bytes } => unsafe { std::str::from_utf8_unchecked(&bytes[..usize::from(*len)]) },
            KeyRepr::Heap(s) => s,
        }
    }
}

impl From<&str> for AccountKey {
    fn from(s: &str) -> Self {
        if s.len() <= KEY_INLINE_BYTES {
            let mut bytes = [0u8; KEY_INLINE_BYTES];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            // `s.len() <= 30`, so the length fits in a u8.
            AccountKey(KeyRepr::Inline { len: s.len() as u8, bytes })
        } else {
            AccountKey(KeyRepr::Heap(s.into()))
        }
    }
}

impl From<Box<str>> for AccountKey {
    fn from(s: Box<str>) -> Self {
        if s.len() <= KEY_INLINE_BYTES {
            AccountKey::from(&*s)
        } else {
            AccountKey(KeyRepr::Heap(s))
        }
    }
}

impl std::borrow::Borrow<str> for AccountKey {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::ops::Deref for AccountKey {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

// Hashes and compares exactly as the `str` it holds, as `Borrow` requires.
impl std::hash::Hash for AccountKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq for AccountKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for AccountKey {}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

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

/// The kind of a transfer record (SPEC section 2).
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

/// Where a two-phase transfer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Open,
    Posted,
    Voided,
}

/// A two-phase transfer: `amount` held on `from` for `to`, then posted
/// (whole or in part; the rest is released) or voided, exactly once.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub status: HoldStatus,
    /// What went to `to` (0 unless posted).
    pub posted: i64,
    /// What went back to being available on `from`.
    pub released: i64,
}

impl Hold {
    #[must_use]
    pub fn new(from: &str, to: &str, amount: i64) -> Hold {
        Hold { from: from.to_owned(), to: to.to_owned(), amount, status: HoldStatus::Open, posted: 0, released: 0 }
    }

    fn open(&self) -> Result<(), LedgerError> {
        match self.status {
            HoldStatus::Open => Ok(()),
            s => Err(LedgerError::NotAllowed(format!("the hold is already {}", s.as_str()))),
        }
    }

    /// How much a post of `amount` (default: all) moves; the rest is released.
    pub fn post_amount(&self, amount: Option<i64>) -> Result<i64, LedgerError> {
        self.open()?;
        let x = amount.unwrap_or(self.amount);
        if !(1..=self.amount).contains(&x) {
            return Err(LedgerError::BadAmount(format!("a post moves 1..={} of this hold", self.amount)));
        }
        Ok(x)
    }

    /// Records a post of `x` (checked by `post_amount`).
    pub fn posted(&mut self, x: i64) {
        assert!(self.status == HoldStatus::Open && (1..=self.amount).contains(&x));
        self.status = HoldStatus::Posted;
        self.posted = x;
        self.released = self.amount - x;
    }

    /// Voids the hold: everything is released.
    pub fn void(&mut self) -> Result<i64, LedgerError> {
        self.open()?;
        self.status = HoldStatus::Voided;
        self.released = self.amount;
        Ok(self.amount)
    }
}

impl HoldStatus {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Open => "open",
            HoldStatus::Posted => "posted",
            HoldStatus::Voided => "voided",
        }
    }
}

/// The campus rules for user-to-user transfers (`[policy]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub min_events: u64,
    pub fee_same_group_bps: u32,
    pub fee_cross_group_bps: u32,
    pub fee_rounding: FeeRounding,
}

/// How a fee that is not a whole number of units rounds (`policy.fee_rounding`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeeRounding {
    /// Toward zero: small transfers may pay no fee at all.
    #[default]
    Down,
    /// Away from zero: every transfer with a non-zero rate pays at least 1.
    Up,
}

/// A user taking part in a transfer.
#[derive(Clone, Copy, Debug)]
pub struct Party<'a> {
    pub user: &'a str,
    pub admin: bool,
    pub group: Option<&'a str>,
    pub events: u64,
}

/// Who receives a user's transfer.
#[derive(Clone, Copy, Debug)]
pub enum Receiver<'a> {
    /// An account owned by a user.
    User(Party<'a>),
    /// An account without an owner (e.g. a shop's till an admin created).
    Unowned,
    /// `@mint`, `@treasury`, `@redeemed`.
    System,
}

impl Policy {
    /// The fee a user (`sender`) pays to move `amount` to `receiver`, or
    /// why the transfer is refused: users cannot pay system or admin
    /// accounts; both users need `min_events`. Only user-to-user transfers
    /// pay a fee: the same-group rate when both users have the same group
    /// (or both none), the cross-group rate otherwise; it rounds as
    /// `fee_rounding` says, and a fee that would leave the receiver nothing
    /// is refused.
    pub fn user_transfer(&self, sender: &Party<'_>, receiver: &Receiver<'_>, amount: i64) -> Result<i64, LedgerError> {
        self.user_transfer_bps(sender, receiver).and_then(|bps| net_fee(amount, bps, self.fee_rounding))
    }

    /// The fee rate of [`Policy::user_transfer`], or why it is refused.
    pub fn user_transfer_bps(&self, sender: &Party<'_>, receiver: &Receiver<'_>) -> Result<u32, LedgerError> {
        let sender_eligible = |p: &Party<'_>| {
            if p.events >= self.min_events {
                Ok(())
            } else {
                Err(LedgerError::SenderIneligible { events: p.events, min: self.min_events })
            }
        };
        let receiver_eligible = |p: &Party<'_>| {
            if p.events >= self.min_events {
                Ok(())
            } else {
                Err(LedgerError::ReceiverIneligible { user: p.user.to_owned() })
            }
        };
        match receiver {
            Receiver::System => Err(LedgerError::NotAllowed("users cannot transfer to system accounts".into())),
            // Between one's own wallets: not user-to-user, so no fee and no rule.
            Receiver::User(r) if r.user == sender.user => Ok(0),
            Receiver::User(r) if r.admin => {
                Err(LedgerError::NotAllowed("users cannot transfer to an admin's account".into()))
            }
            Receiver::Unowned => {
                sender_eligible(sender)?;
                Ok(0)
            }
            Receiver::User(r) => {
                sender_eligible(sender)?;
                receiver_eligible(r)?;
                Ok(if sender.group == r.group { self.fee_same_group_bps } else { self.fee_cross_group_bps })
            }
        }
    }
}

/// The fee on `amount` (positive) at `bps` basis points, rounded as `rounding` says.
#[must_use]
pub fn fee(amount: i64, bps: u32, rounding: FeeRounding) -> i64 {
    // i128 so that amount * bps cannot overflow; the result is <= amount.
    let scaled = i128::from(amount) * i128::from(bps);
    let fee = match rounding {
        FeeRounding::Down => scaled / 10_000,
        FeeRounding::Up => (scaled + 9_999) / 10_000,
    };
    i64::try_from(fee).unwrap_or(amount).min(amount)
}

/// The fee on `amount` at `bps`, refused when it would leave the receiver
/// nothing (a rate below 100% never should: only rounding up can do that).
pub fn net_fee(amount: i64, bps: u32, rounding: FeeRounding) -> Result<i64, LedgerError> {
    let f = fee(amount, bps, rounding);
    if f > 0 && f >= amount {
        return Err(LedgerError::NothingLeft { amount, fee: f });
    }
    Ok(f)
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

/// Whether an account accepts changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Open,
    Deleted,
}

/// An account as its owning shard sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerAccount {
    /// Committed balance, as far as committed batches have been delivered.
    pub balance: i64,
    /// Debits reserved but not yet committed.
    pub reserved: i64,
    /// Held by open two-phase transfers (`hold`): still in the balance, not available.
    pub held: i64,
    pub status: Status,
}

impl OwnerAccount {
    #[must_use]
    pub fn new(balance: i64) -> Self {
        OwnerAccount { balance, reserved: 0, held: 0, status: Status::Open }
    }

    /// What can be spent now: the balance less every reservation and hold.
    #[must_use]
    pub fn available(&self) -> i64 {
        self.balance.saturating_sub(self.reserved).saturating_sub(self.held)
    }

    /// Reserves `amount` for a debit, or refuses it whole.
    pub fn reserve(&mut self, account: &str, amount: i64, bounds: Bounds) -> Result<(), LedgerError> {
        if self.status == Status::Deleted {
            return Err(LedgerError::Deleted(account.to_owned()));
        }
        validate_amount(amount)?;
        let reserved = self.reserved.checked_add(amount).ok_or(LedgerError::Underflow)?;
        let after =
            self.balance.checked_sub(reserved).and_then(|b| b.checked_sub(self.held)).ok_or(LedgerError::Underflow)?;
        if let Some(min) = bounds.min {
            if after < min {
                return Err(LedgerError::InsufficientFunds {
                    account: account.to_owned(),
                    available: self.available(),
                    amount,
                });
            }
        }
        self.reserved = reserved;
        Ok(())
    }

    /// Applies a committed change: `delta` to the balance, and `release`
    /// taken off the reservations it was made under.
    pub fn settle(&mut self, delta: i64, release: i64) {
        self.balance = self
            .balance
            .checked_add(delta)
            .expect("the book refused any change that overflows, so its owner view cannot");
        self.reserved -= release;
        assert!(self.reserved >= 0, "released more than was reserved");
    }

    /// Applies a committed change to the held amount.
    pub fn settle_held(&mut self, delta: i64) {
        self.held += delta;
        assert!(self.held >= 0, "released more than was held");
    }
}

/// One account in the journal's committed view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BookAccount {
    pub balance: i64,
    /// Held by open holds: part of the balance that debits cannot take.
    pub held: i64,
    pub status: Status,
    /// Id of the last transfer touching the account (0: none): the head of
    /// its history list.
    pub last: u64,
    /// Changed since its balance row was last written.
    pub dirty: bool,
}

impl BookAccount {
    #[must_use]
    pub fn new(balance: i64, status: Status, last: u64) -> Self {
        BookAccount { balance, held: 0, status, last, dirty: false }
    }
}

/// The previous transfer of each party, linked from a new record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Links {
    pub from: u64,
    pub to: u64,
    /// Of `@treasury`, when the record carries a fee (0 otherwise).
    pub fee: u64,
}

/// How the book checks a transfer's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The source's owner reserved the amount. The book checks the bounds
    /// again: an admin change the owner did not reserve (`bulk_add`, `reap`)
    /// may have taken funds the reservation counted on, and then this debit
    /// is refused rather than applied.
    Reserved,
    /// Nothing was reserved (issuance from `@mint`, account funding).
    Unreserved,
    /// Bounds are ignored (closing an account, `bulk_add` with `force`).
    Force,
}

/// The outcome of applying a transfer to the book.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub from_balance: i64,
    pub to_balance: i64,
    /// The parties' account numbers, when the book looked them up already
    /// (saves the journal two hash lookups when it links the record).
    pub nums: Option<(u32, u32)>,
}

/// The journal's committed view of every account, in commit order.
///
/// Accounts are numbered densely in creation order (`num`); the number is
/// the key of the account's balance row, so a sweep over the numbers writes
/// the rows in key order.
///
/// The index holds only account numbers (4 bytes a bucket); each number
/// leads to an [`Entry`] holding the id next to the account, in one cache
/// line. A lookup thus touches the index's small arrays and the line it
/// needs anyway, where a map from id to number touched a 40-byte bucket and
/// then, for the account, another line: with 100,000 accounts the book's
/// lookups were ~9% of the server's CPU, nearly all of it cache misses.
#[derive(Clone, Default)]
pub struct Book {
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    entries: Vec<Entry>,
    pub limits: Limits,
}

/// Asks the CPU to bring the cache lines of `*p` in: its first and last
/// byte's, which covers values up to 65 bytes (a hint: it never faults and
/// changes nothing).
#[inline]
fn prefetch_lines<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let first = std::ptr::from_ref(p).cast::<i8>();
        let last = first.wrapping_add(std::mem::size_of::<T>().saturating_sub(1));
        // SAFETY: `_mm_prefetch` only hints the cache; both addresses are
        // inside the value `p` refers to.
        unsafe {
            _mm_prefetch::<{ _MM_HINT_T0 }>(first);
            _mm_prefetch::<{ _MM_HINT_T0 }>(last);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Matches the index slot of account `id`.
fn is_entry<'a>(entries: &'a [Entry], id: &'a str) -> impl Fn(&u32) -> bool + 'a {
    move |&n| entries[n as usize].id.as_str() == id
}

/// An account of the book with its id, one cache line.
#[derive(Clone)]
#[repr(align(64))]
struct Entry {
    id: AccountKey,
    account: BookAccount,
}

impl std::fmt::Debug for Book {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Book {
    /// A book holding only the system accounts (numbered 0, 1, 2).
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        let mut book = Book::empty(limits);
        for id in SYSTEM_ACCOUNTS {
            book.insert(id, BookAccount::new(0, Status::Open, 0));
        }
        book
    }

    /// A book with no accounts at all (loading fills it).
    #[must_use]
    pub fn empty(limits: Limits) -> Self {
        Book { index: HashTable::new(), hasher: foldhash::fast::RandomState::default(), entries: Vec::new(), limits }
    }

    /// Sets the last transfer of one account (recovery replay).
    pub fn link_one(&mut self, id: &str, last: u64) {
        if let Some(a) = self.get_mut(id) {
            a.last = last;
        }
    }

    /// Adds an account under the next number and returns that number.
    pub fn insert(&mut self, id: &str, account: BookAccount) -> u32 {
        let num = u32::try_from(self.entries.len()).expect("fewer than 2^32 accounts");
        let (hasher, entries) = (&self.hasher, &self.entries);
        self.index.insert_unique(hasher.hash_one(id), num, |&n| hasher.hash_one(entries[n as usize].id.as_str()));
        self.entries.push(Entry { id: id.into(), account });
        num
    }

    /// Number of accounts, deleted ones included.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[must_use]
    pub fn num(&self, id: &str) -> Option<u32> {
        self.index.find(self.hasher.hash_one(id), is_entry(&self.entries, id)).copied()
    }

    /// Starts loading account `id`'s entry into the cache (at `hint`, or
    /// where the index's first candidate for its hash points), without
    /// waiting for it: a pass over a batch lets the cache misses of its
    /// lookups overlap instead of stalling one after another. Reads only the
    /// index; a wrong guess costs one wasted load.
    pub fn prefetch(&self, id: &str, hint: Option<u32>) {
        let n = hint.or_else(|| self.index.iter_hash(self.hasher.hash_one(id)).next().copied());
        if let Some(e) = n.and_then(|n| self.entries.get(n as usize)) {
            prefetch_lines(e);
        }
    }

    /// The number of account `id`, trying `hint` first: an owner that knows
    /// the number saves the hash lookup, and a wrong hint costs nothing but
    /// the lookup it would have saved.
    fn num_hinted(&self, id: &str, hint: Option<u32>) -> Option<u32> {
        match hint {
            Some(n) if self.entries.get(n as usize).is_some_and(|e| e.id.as_str() == id) => Some(n),
            _ => self.num(id),
        }
    }

    #[must_use]
    pub fn get(&self, id: &str) -> Option<&BookAccount> {
        self.num(id).map(|n| &self.entries[n as usize].account)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut BookAccount> {
        let n = self.num(id)?;
        Some(&mut self.entries[n as usize].account)
    }

    /// The account numbered `num`.
    #[must_use]
    pub fn by_num(&self, num: u32) -> Option<&BookAccount> {
        self.entries.get(num as usize).map(|e| &e.account)
    }

    /// Marks account `num` as written to its balance row.
    pub fn mark_clean(&mut self, num: u32) {
        if let Some(e) = self.entries.get_mut(num as usize) {
            e.account.dirty = false;
        }
    }

    /// Every account with its id, in number order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &BookAccount)> {
        self.entries.iter().map(|e| (e.id.as_str(), &e.account))
    }

    /// The index of an open account (one hash lookup, none with a right
    /// hint; the rest of a transfer then works on the index).
    fn open_num(&self, id: &str, hint: Option<u32>) -> Result<usize, LedgerError> {
        let n = self.num_hinted(id, hint).ok_or_else(|| LedgerError::NotFound(id.to_owned()))? as usize;
        if self.entries[n].account.status == Status::Deleted {
            return Err(LedgerError::Deleted(id.to_owned()));
        }
        Ok(n)
    }

    /// Creates an open account with a zero balance.
    pub fn create(&mut self, id: &str) -> Result<u32, LedgerError> {
        match self.get(id) {
            Some(a) if a.status == Status::Deleted => Err(LedgerError::Deleted(id.to_owned())),
            Some(_) => Err(LedgerError::Exists(id.to_owned())),
            None => {
                let mut a = BookAccount::new(0, Status::Open, 0);
                a.dirty = true;
                Ok(self.insert(id, a))
            }
        }
    }

    /// Takes back the account created last, if it is `id` and untouched.
    pub fn uncreate(&mut self, id: &str) {
        let Ok(e) = self.index.find_entry(self.hasher.hash_one(id), is_entry(&self.entries, id)) else { return };
        if *e.get() as usize + 1 == self.entries.len() {
            e.remove();
            self.entries.pop();
        }
    }

    /// Moves `amount` from `from` to `to`, of which `fee` goes to `@treasury`.
    /// Either every balance changes or none does. `mode` says how bounds are
    /// checked; overflow is refused in every mode.
    pub fn transfer(
        &mut self,
        from: &str,
        to: &str,
        amount: i64,
        fee: i64,
        mode: Mode,
    ) -> Result<Applied, LedgerError> {
        self.transfer_hinted(from, None, to, amount, fee, mode)
    }

    /// [`Book::transfer`] with the source's number as its owner knows it
    /// (checked against the id before it is used).
    pub fn transfer_hinted(
        &mut self,
        from: &str,
        from_num: Option<u32>,
        to: &str,
        amount: i64,
        fee: i64,
        mode: Mode,
    ) -> Result<Applied, LedgerError> {
        validate_amount(amount)?;
        if from == to {
            return Err(LedgerError::SameAccount);
        }
        if !(0..=amount).contains(&fee) {
            return Err(LedgerError::BadAmount("fee outside 0..=amount".into()));
        }
        if fee > 0 && (from == TREASURY || to == TREASURY) {
            return Err(LedgerError::BadAmount("no fee on transfers with @treasury".into()));
        }
        let (f, t) = (self.open_num(from, from_num)?, self.open_num(to, None)?);
        let (source, dest) = (self.entries[f].account, self.entries[t].account);
        let bounds =
            |id: &str| if mode == Mode::Force { Bounds { min: None, max: None } } else { self.limits.bounds(id) };
        // Held funds stay in the balance but no debit may take them, unless forced.
        let spendable = if mode == Mode::Force { source.balance } else { source.balance.saturating_sub(source.held) };
        debit(from, spendable, amount, bounds(from))?;
        let from_after = source.balance.checked_sub(amount).ok_or(LedgerError::Underflow)?;
        let to_after = credit(to, dest.balance, amount - fee, bounds(to))?;
        let treasury_after = if fee > 0 {
            let n = self.open_num(TREASURY, None)?;
            Some((n, credit(TREASURY, self.entries[n].account.balance, fee, bounds(TREASURY))?))
        } else {
            None
        };
        for (n, balance) in [(f, from_after), (t, to_after)].into_iter().chain(treasury_after) {
            let a = &mut self.entries[n].account;
            a.balance = balance;
            a.dirty = true;
        }
        let nums = u32::try_from(f).ok().zip(u32::try_from(t).ok());
        Ok(Applied { from_balance: from_after, to_balance: to_after, nums })
    }

    /// Holds `amount` of `from` for a later `post` to `to`: the balance
    /// stays, what debits can take shrinks. Refused like a debit would be.
    pub fn hold(&mut self, from: &str, to: &str, amount: i64) -> Result<(), LedgerError> {
        validate_amount(amount)?;
        if from == to {
            return Err(LedgerError::SameAccount);
        }
        let (f, _) = (self.open_num(from, None)?, self.open_num(to, None)?);
        let source = self.entries[f].account;
        let held = source.held.checked_add(amount).ok_or(LedgerError::Overflow)?;
        let spendable = source.balance.checked_sub(held).ok_or(LedgerError::Underflow)?;
        if let Some(min) = self.limits.bounds(from).min {
            if spendable < min {
                return Err(LedgerError::InsufficientFunds {
                    account: from.to_owned(),
                    available: source.balance.saturating_sub(source.held),
                    amount,
                });
            }
        }
        self.entries[f].account.held = held;
        Ok(())
    }

    /// Releases `amount` held on `from` (a void, or the first step of a post).
    pub fn release(&mut self, from: &str, amount: i64) {
        if let Some(a) = self.get_mut(from) {
            a.held -= amount;
            assert!(a.held >= 0, "released more than was held on {from}");
        }
    }

    /// Posts a hold of `held` on `from`: releases it and moves `amount`
    /// (at most `held`) to `to`, `fee` of it to `@treasury`. All or nothing:
    /// if the move is refused (a cap on `to`), the hold stays.
    pub fn post(&mut self, from: &str, to: &str, held: i64, amount: i64, fee: i64) -> Result<Applied, LedgerError> {
        if !(1..=held).contains(&amount) {
            return Err(LedgerError::BadAmount(format!("post 1..={held}")));
        }
        self.release(from, held);
        match self.transfer(from, to, amount, fee, Mode::Unreserved) {
            Ok(a) => Ok(a),
            Err(e) => {
                if let Some(a) = self.get_mut(from) {
                    a.held += held;
                }
                Err(e)
            }
        }
    }

    /// What is held on an account.
    #[must_use]
    pub fn held(&self, id: &str) -> i64 {
        self.get(id).map_or(0, |a| a.held)
    }

    /// Sets what is held on an account (loading).
    pub fn set_held(&mut self, id: &str, held: i64) {
        if let Some(a) = self.get_mut(id) {
            a.held = held;
        }
    }

    fn set_balance(&mut self, id: &str, balance: i64) {
        if let Some(a) = self.get_mut(id) {
            a.balance = balance;
            a.dirty = true;
        }
    }

    /// Marks an account deleted: it takes no more transfers.
    pub fn delete(&mut self, id: &str) {
        if let Some(a) = self.get_mut(id) {
            a.status = Status::Deleted;
            a.dirty = true;
        }
    }

    /// Sets a balance directly (recovery replay and tests).
    pub fn set(&mut self, id: &str, balance: i64) {
        self.set_balance(id, balance);
    }

    /// Makes transfer `id` the head of the history lists of its parties and
    /// returns the heads it replaces.
    pub fn link(&mut self, id: u64, from: &str, to: &str, fee: bool) -> Links {
        // The row holds `last` too: a record that moves nothing (a hold, a
        // void) still has to reach the balance rows.
        let mut swap = |account: &str| {
            self.get_mut(account).map_or(0, |a| {
                a.dirty = true;
                std::mem::replace(&mut a.last, id)
            })
        };
        let from = swap(from);
        let to = swap(to);
        let fee = if fee { swap(TREASURY) } else { 0 };
        Links { from, to, fee }
    }

    /// [`Book::link`] for parties already looked up by number.
    pub fn link_nums(&mut self, id: u64, from: u32, to: u32, fee: bool) -> Links {
        let treasury = if fee { self.num(TREASURY) } else { None };
        let mut swap = |n: u32| {
            self.entries.get_mut(n as usize).map_or(0, |e| {
                e.account.dirty = true;
                std::mem::replace(&mut e.account.last, id)
            })
        };
        let (from, to) = (swap(from), swap(to));
        let fee = treasury.map_or(0, swap);
        Links { from, to, fee }
    }

    /// The sum of every balance; 0 whenever the book is consistent.
    #[must_use]
    pub fn sum(&self) -> i128 {
        self.entries.iter().map(|e| i128::from(e.account.balance)).sum()
    }
}

#[cfg(test)]
mod tests;
