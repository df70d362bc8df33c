//! The book: the journal's committed view of every account, in commit order.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::keys::{prefetch_lines, AccountKey};
use super::{credit, debit, validate_amount, Bounds, LedgerError, Limits, Status, SYSTEM_ACCOUNTS, TREASURY};

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
/// leads to an `Entry` holding the id next to the account, in one cache
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

/// What [`Book::fill`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    Placed,
    PastEnd,
    /// The number holds an account already.
    Taken,
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

impl Entry {
    /// An unfilled number's entry: no account has the empty id.
    fn blank() -> Entry {
        Entry { id: AccountKey::from(""), account: BookAccount::new(0, Status::Open, 0) }
    }
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
        let mut book = Book::empty(limits, SYSTEM_ACCOUNTS.len());
        for id in SYSTEM_ACCOUNTS {
            book.insert(id, BookAccount::new(0, Status::Open, 0));
        }
        book
    }

    /// A book with no accounts at all, with room for `n` (loading fills it).
    #[must_use]
    pub fn empty(limits: Limits, n: usize) -> Self {
        Book {
            index: HashTable::with_capacity(n),
            hasher: foldhash::fast::RandomState::default(),
            entries: Vec::with_capacity(n),
            limits,
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

    /// A book of `n` accounts numbered `0..n`, each to be put in place with
    /// [`Book::fill`]: loading reads the accounts in id order, not number
    /// order, and builds the book as it reads them.
    #[must_use]
    pub fn unfilled(limits: Limits, n: usize) -> Self {
        Book::unfilled_within(limits, n, n)
    }

    /// [`Book::unfilled`], with room for `capacity` accounts (at least
    /// `n`) that [`Book::refit_unfilled`] can take without moving it.
    #[must_use]
    pub fn unfilled_within(limits: Limits, n: usize, capacity: usize) -> Self {
        let mut entries = Vec::with_capacity(capacity.max(n));
        entries.resize(n, Entry::blank());
        Book {
            index: HashTable::with_capacity(capacity.max(n)),
            hasher: foldhash::fast::RandomState::default(),
            entries,
            limits,
        }
    }

    /// Makes this book (none of it filled yet) an [`Book::unfilled`] book
    /// of `n` accounts under `limits`.
    pub(crate) fn refit_unfilled(&mut self, limits: Limits, n: usize) {
        debug_assert!(self.index.is_empty(), "refitting a book being filled");
        self.entries.resize(n, Entry::blank());
        let (hasher, entries) = (&self.hasher, &self.entries);
        self.index.reserve(n, |&m| hasher.hash_one(entries[m as usize].id.as_str()));
        self.limits = limits;
    }

    /// Puts account `id` at number `num` of an [`Book::unfilled`] book,
    /// unless `num` is past its end or was filled already (nothing changes
    /// then). Until it is filled, `num` is found under no id.
    pub(crate) fn fill(&mut self, num: u32, id: AccountKey, account: BookAccount) -> Fill {
        let Some(entry) = self.entries.get_mut(num as usize) else {
            return Fill::PastEnd;
        };
        if !entry.id.as_str().is_empty() {
            return Fill::Taken;
        }
        *entry = Entry { id, account };
        let (hasher, entries) = (&self.hasher, &self.entries);
        let hash = hasher.hash_one(entries[num as usize].id.as_str());
        self.index.insert_unique(hash, num, |&n| hasher.hash_one(entries[n as usize].id.as_str()));
        Fill::Placed
    }

    /// The first number of an [`Book::unfilled`] book not filled yet. No
    /// account has the blank's empty id ([`validate_account_id`](super::validate_account_id));
    /// a stored one would count as unfilled, and loading refuses it.
    pub(crate) fn first_unfilled(&self) -> Option<u32> {
        self.entries.iter().position(|e| e.id.as_str().is_empty()).and_then(|n| u32::try_from(n).ok())
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

    /// Brings the part of the index where `id` goes into the cache: asked
    /// for an account a few ahead while the book is filled, so that its
    /// insert later finds the line cached. This read itself waits for the
    /// line, but beside the book's entry and the shard map's slot fetched
    /// for the same accounts, so their misses overlap (0.79x the loading
    /// time, docs/performance.md).
    pub fn prefetch_index(&self, id: &str) {
        // The table offers no prefetch: a read whose result is kept (from
        // the optimizer) brings the line in.
        std::hint::black_box(self.index.iter_hash(self.hasher.hash_one(id)).next());
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
    #[must_use]
    pub fn num_hinted(&self, id: &str, hint: Option<u32>) -> Option<u32> {
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

    /// Replays a record onto account `num`: its balance and its last
    /// transfer (recovery and cluster members; one lookup for both).
    pub fn replay_num(&mut self, num: u32, balance: i64, last: u64) {
        if let Some(e) = self.entries.get_mut(num as usize) {
            e.account.balance = balance;
            e.account.last = last;
            e.account.dirty = true;
        }
    }

    /// Puts back account `num`'s entry as it was (undoing a replay).
    pub fn restore_num(&mut self, num: u32, account: BookAccount) {
        if let Some(e) = self.entries.get_mut(num as usize) {
            e.account = account;
        }
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

    /// Puts an account back as it was (an atomic batch rolled back).
    pub fn restore(&mut self, id: &str, account: BookAccount) {
        if let Some(a) = self.get_mut(id) {
            *a = account;
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
