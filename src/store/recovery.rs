//! Loading the ledger: the balance rows, then the records after the
//! checkpoint replayed by the one replay rule (`legs`), checked to chain
//! onto each other and end at the head. Used at start-up, by the journal
//! after a storage failure, and by `audit`.

use super::record::{for_each_record, with_record};
use super::*;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::ledger::{Book, BookAccount, Kind, Limits, Status, TREASURY};

/// An account as loaded at start-up.
pub struct LoadedAccount {
    pub id: String,
    pub meta: AccountMeta,
    pub balance: i64,
    /// Its last transfer (head of its history list).
    pub last: u64,
    /// Held by open holds.
    pub held: i64,
}

/// The committed state: every account with its balance, and the head.
pub struct Loaded {
    pub accounts: Vec<LoadedAccount>,
    pub book: Book,
    pub head: Head,
    /// Open holds that expire: (expires_at, id).
    pub expiring: Vec<(u64, u64)>,
}

pub(super) fn read_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let a: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt("meta".into()))?;
    Ok(u64::from_be_bytes(a))
}

pub(super) fn read_checkpoint(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(META)?;
    let v = meta.get(CHECKPOINT)?;
    v.map_or(Ok(0), |v| read_u64(v.value()))
}

/// What a record does to balances: `(account, change)` for each leg. The
/// one replay rule, used by start-up, `audit` and `list_accounts` alike: a
/// hold and a void move nothing (what is held comes from the holds table,
/// written in the same transactions), every other record moves `amount`
/// out of `from`, `amount - fee` into `to` and `fee` into `@treasury`.
pub(super) fn legs<'a>(r: &RecordRef<'a>) -> Result<[(&'a str, i64); 3], StoreError> {
    let moved = if matches!(r.kind, Kind::Hold | Kind::Void) { 0 } else { r.amount };
    let out = moved.checked_neg().ok_or_else(|| StoreError::Corrupt(format!("transfer {}: amount", r.id)))?;
    let fee = if moved == 0 { 0 } else { r.fee };
    Ok([(r.from, out), (r.to, moved - fee), (TREASURY, fee)])
}

/// Applies one replayed record to the book. Each leg is applied only if the
/// account's balance row does not include it yet (its `last` is older).
pub fn replay(book: &mut Book, r: &RecordRef<'_>) -> Result<(), StoreError> {
    replay_noting(book, r, None, |_, _| {})
}

/// [`replay`], telling `before` each account's number and entry before it
/// changes it (a cluster member undoes a batch that does not fit); `nums`:
/// the parties' numbers on the deciding book, tried before a lookup.
pub fn replay_noting(
    book: &mut Book,
    r: &RecordRef<'_>,
    nums: Option<(u32, u32)>,
    mut before: impl FnMut(u32, BookAccount),
) -> Result<(), StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("replaying transfer {}: {what}", r.id));
    for (i, (account, delta)) in legs(r)?.into_iter().enumerate() {
        // Every record links its two parties; the fee leg only when it moves something.
        if i == 2 && delta == 0 {
            continue;
        }
        let hint = nums.and_then(|(f, t)| [Some(f), Some(t), None][i]);
        let num = book.num_hinted(account, hint).ok_or_else(|| corrupt("unknown account"))?;
        let a = *book.by_num(num).ok_or_else(|| corrupt("unknown account"))?;
        if r.id > a.last {
            let balance = a.balance.checked_add(delta).ok_or_else(|| corrupt("overflow"))?;
            before(num, a);
            book.replay_num(num, balance, r.id);
        }
    }
    Ok(())
}

/// Reads the balance rows and replays the records after the checkpoint,
/// checking that they chain onto each other and end at the head. Used at
/// start-up, by the journal to recover from a failed commit, and by `audit`.
pub fn load(db: &Database, limits: Limits) -> Result<Loaded, StoreError> {
    let txn = db.begin_read()?;
    load_txn(&txn, limits)
}

pub(super) fn load_txn(txn: &redb::ReadTransaction, limits: Limits) -> Result<Loaded, StoreError> {
    let head = read_head(txn)?;
    let checkpoint = read_checkpoint(txn)?;
    // The balance rows are read in key (number) order and joined to the
    // accounts by number: one pass over each table, where a lookup per
    // account read the balances tree in random order (~40 s of a 62 s
    // start with 10M accounts).
    let accounts_table = txn.open_table(ACCOUNTS)?;
    let n = usize::try_from(accounts_table.len()?).unwrap_or(0);
    let mut balances: Vec<(i64, u64)> = vec![(0, 0); n];
    for row in txn.open_table(BALANCES)?.iter()? {
        let (num, v) = row?;
        *balances
            .get_mut(num.value() as usize)
            .ok_or_else(|| StoreError::Corrupt("balance rows without accounts".into()))? = v.value();
    }
    // Each account goes straight to its place by number (sorting ~150-byte
    // entries moved gigabytes with 10M accounts).
    let mut by_num: Vec<Option<LoadedAccount>> = Vec::with_capacity(n);
    by_num.resize_with(n, || None);
    for row in accounts_table.iter()? {
        let (k, v) = row?;
        let meta = AccountMeta::decode(v.value())?;
        let num = meta.num as usize;
        let (balance, last) = balances.get(num).copied().unwrap_or((0, 0));
        let place =
            by_num.get_mut(num).ok_or_else(|| StoreError::Corrupt(format!("account number {num} out of range")))?;
        if place.is_some() {
            return Err(StoreError::Corrupt(format!("account number {num} is used twice")));
        }
        *place = Some(LoadedAccount { id: k.value().to_owned(), meta, balance, last, held: 0 });
    }
    drop(balances);
    let mut book = Book::empty(limits, n);
    let mut accounts = Vec::with_capacity(n);
    for (expected, a) in by_num.into_iter().enumerate() {
        let a = a.ok_or_else(|| StoreError::Corrupt(format!("account numbers skip {expected}")))?;
        let status = if a.meta.deleted.is_some() { Status::Deleted } else { Status::Open };
        book.insert(&a.id, BookAccount::new(a.balance, status, a.last));
        accounts.push(a);
    }
    let chunks = txn.open_table(CHUNKS)?;
    let mut prev = match checkpoint {
        0 => GENESIS,
        id => with_record(&chunks, id, |stored| Ok(record_hash(stored)))?
            .ok_or_else(|| StoreError::Corrupt(format!("checkpoint record {id} is missing")))?,
    };
    let mut expected = checkpoint + 1;
    for_each_record(&chunks, checkpoint + 1, |id, stored| {
        let r = RecordRef::decode(stored)?;
        if r.id != id || r.id != expected || *r.prev != prev {
            return Err(StoreError::Corrupt(format!("the journal breaks at transfer {id}")));
        }
        replay(&mut book, &r)?;
        prev = record_hash(stored);
        expected += 1;
        Ok(true)
    })?;
    if expected - 1 != head.id || prev != head.hash {
        return Err(StoreError::Corrupt(format!(
            "the journal ends at transfer {} but its head says {}",
            expected - 1,
            head.id
        )));
    }
    // What is held: the open holds, committed with the records above.
    let mut expiring = Vec::new();
    let holds = txn.open_table(HOLDS)?;
    for row in txn.open_table(OPEN_HOLDS)?.iter()? {
        let id = row?.0.value();
        let stored = holds.get(id)?.ok_or_else(|| StoreError::Corrupt(format!("open hold {id} is missing")))?;
        let h = HoldRecord::decode(stored.value())?;
        if h.hold.status != crate::ledger::HoldStatus::Open {
            return Err(StoreError::Corrupt(format!("hold {id} is listed open but is {}", h.hold.status.as_str())));
        }
        let held =
            book.held(&h.hold.from).checked_add(h.hold.amount).ok_or_else(|| StoreError::Corrupt("held".into()))?;
        book.set_held(&h.hold.from, held);
        if h.expires_at > 0 {
            expiring.push((h.expires_at, h.id));
        }
    }
    // The book numbered the accounts in this order.
    for (num, a) in (0u32..).zip(&mut accounts) {
        let b = book.by_num(num).expect("inserted above");
        a.balance = b.balance;
        a.last = b.last;
        a.held = b.held;
    }
    Ok(Loaded { accounts, book, head, expiring })
}

pub(super) fn read_head(txn: &redb::ReadTransaction) -> Result<Head, StoreError> {
    let meta = txn.open_table(META)?;
    let head = meta.get(HEAD)?.ok_or_else(|| StoreError::Corrupt("no head".into()))?;
    Head::decode(head.value())
}
