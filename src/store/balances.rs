//! The balance rows: the accounts' balances as of their last written
//! transfer, [`BLOCK_ACCOUNTS`] accounts to a redb row.
//!
//! A block is keyed by `num / BLOCK_ACCOUNTS` and holds, for the accounts
//! numbered from the block's first, `balance i64 LE | last u64 LE` each
//! (16 bytes), up to the last account that existed when it was written. An
//! account past a block's end, or in a block never written, reads as
//! `(0, 0)`: no transfer yet.
//!
//! Why blocks: the journal's sweep writes the rows of a slice of account
//! numbers with every commit (`journal::commit`). One redb insert per
//! account took 16% of the journal thread under batched load at 100k
//! accounts, and 35% at 10M, where a commit sweeps ~20,000 numbers; a
//! block is one insert for 64 of them, and its 16 bytes a row are fewer
//! than a row of its own took in a leaf (docs/performance.md).
//!
//! Why writing a whole block is safe: a row is an account's balance as of
//! its `last` transfer, and replay applies a record to an account only if
//! it is newer than that (`recovery::replay_noting`). So writing any
//! account's current state is always correct, dirty or not, in the sweep's
//! slice or beside it: a block is written whole once any of its accounts
//! changed, and all of them are then clean.
//!
//! Before blocks, a table `balances` kept one row per account. [`migrate`]
//! moves those rows into blocks once, in the transaction that opens the
//! database, and leaves a table of that name with another type, so that
//! a version that reads `balances` refuses the folder (a type mismatch)
//! rather than loading every balance as 0. Readers of a database that was
//! not opened by this version (a snapshot sent by a cluster member not yet
//! upgraded) read either form ([`Rows`]).

use redb::{ReadableTable, TableDefinition, TableHandle};

use super::StoreError;
use crate::ledger::Book;

/// Accounts to a block.
pub const BLOCK_ACCOUNTS: u32 = 64;
/// Bytes of one account in a block.
const ENTRY_BYTES: usize = 16;

/// The balance rows, in blocks.
pub const BALANCE_BLOCKS: TableDefinition<u32, &[u8]> = TableDefinition::new("balance_blocks");
/// One row per account: the layout before blocks, migrated by [`migrate`].
pub(super) const LEGACY_BALANCES: TableDefinition<u32, (i64, u64)> = TableDefinition::new("balances");
/// What [`migrate`] leaves in place of `balances`: a table of another type.
pub(super) const MOVED: TableDefinition<&str, &str> = TableDefinition::new("balances");

/// An account's `(balance, last)` in `block` (the block's bytes), or
/// `None` past the block's end.
fn entry(block: &[u8], slot: u32) -> Option<(i64, u64)> {
    let at = slot as usize * ENTRY_BYTES;
    let e = block.get(at..at + ENTRY_BYTES)?;
    let (balance, last) = e.split_at(8);
    Some((
        i64::from_le_bytes(balance.try_into().expect("8 bytes")),
        u64::from_le_bytes(last.try_into().expect("8 bytes")),
    ))
}

/// Checks a block's length: whole entries, at least one (a write covers
/// an account), at most [`BLOCK_ACCOUNTS`].
fn check(block: u32, bytes: &[u8]) -> Result<(), StoreError> {
    let entries = bytes.len() / ENTRY_BYTES;
    if !bytes.len().is_multiple_of(ENTRY_BYTES) || entries == 0 || entries > BLOCK_ACCOUNTS as usize {
        return Err(StoreError::Corrupt(format!("balance block {block} holds {} bytes", bytes.len())));
    }
    Ok(())
}

/// Writes the block of every account numbered in `nums` that changed since
/// its block was last written: the block whole, from the book as it is, and
/// all its accounts marked clean.
pub fn write(txn: &redb::WriteTransaction, book: &mut Book, nums: std::ops::Range<u32>) -> Result<(), StoreError> {
    let len = u32::try_from(book.len()).unwrap_or(u32::MAX);
    let end = nums.end.min(len);
    if nums.start >= end {
        return Ok(());
    }
    let mut rows = txn.open_table(BALANCE_BLOCKS)?;
    let mut buf = Vec::with_capacity(BLOCK_ACCOUNTS as usize * ENTRY_BYTES);
    let mut first = nums.start - nums.start % BLOCK_ACCOUNTS;
    while first < end {
        let past = first.saturating_add(BLOCK_ACCOUNTS).min(len);
        if (first..past).any(|n| book.by_num(n).is_some_and(|a| a.dirty)) {
            buf.clear();
            for n in first..past {
                let a = book.by_num(n).expect("numbered below the book's length");
                buf.extend_from_slice(&a.balance.to_le_bytes());
                buf.extend_from_slice(&a.last.to_le_bytes());
                book.mark_clean(n);
            }
            rows.insert(first / BLOCK_ACCOUNTS, &buf[..])?;
        }
        first = past;
    }
    Ok(())
}

/// The balance rows of a database, in blocks or (not yet migrated) one per
/// account.
pub enum Rows {
    Blocks(redb::ReadOnlyTable<u32, &'static [u8]>),
    Legacy(redb::ReadOnlyTable<u32, (i64, u64)>),
}

impl Rows {
    /// The rows as `txn` sees them.
    pub fn open(txn: &redb::ReadTransaction) -> Result<Self, StoreError> {
        if has_table(txn.list_tables()?, BALANCE_BLOCKS.name()) {
            return Ok(Rows::Blocks(txn.open_table(BALANCE_BLOCKS)?));
        }
        if has_table(txn.list_tables()?, LEGACY_BALANCES.name()) {
            return Ok(Rows::Legacy(txn.open_table(LEGACY_BALANCES)?));
        }
        Err(StoreError::Corrupt("no balance rows".into()))
    }

    /// Account `num`'s row: `(0, 0)` if it has none.
    pub fn get(&self, num: u32) -> Result<(i64, u64), StoreError> {
        match self {
            Rows::Blocks(t) => {
                let block = num / BLOCK_ACCOUNTS;
                let Some(v) = t.get(block)? else { return Ok((0, 0)) };
                check(block, v.value())?;
                Ok(entry(v.value(), num % BLOCK_ACCOUNTS).unwrap_or((0, 0)))
            }
            Rows::Legacy(t) => Ok(t.get(num)?.map_or((0, 0), |v| v.value())),
        }
    }

    /// Calls `f` with every row, in number order (accounts without one are
    /// left out).
    pub fn for_each(&self, mut f: impl FnMut(u32, (i64, u64)) -> Result<(), StoreError>) -> Result<(), StoreError> {
        match self {
            Rows::Blocks(t) => {
                for row in t.iter()? {
                    let (k, v) = row?;
                    let (block, bytes) = (k.value(), v.value());
                    check(block, bytes)?;
                    let first = block
                        .checked_mul(BLOCK_ACCOUNTS)
                        .ok_or_else(|| StoreError::Corrupt(format!("balance block {block} is out of range")))?;
                    for slot in 0..(bytes.len() / ENTRY_BYTES) as u32 {
                        f(first + slot, entry(bytes, slot).expect("within the block"))?;
                    }
                }
            }
            Rows::Legacy(t) => {
                for row in t.iter()? {
                    let (k, v) = row?;
                    f(k.value(), v.value())?;
                }
            }
        }
        Ok(())
    }
}

fn has_table(mut tables: impl Iterator<Item = redb::UntypedTableHandle>, name: &str) -> bool {
    tables.any(|t| t.name() == name)
}

/// Makes sure the rows are in blocks: moves the rows of a database written
/// before blocks into them, once, and leaves `balances` as a table of
/// another type (module docs). A no-op once done.
pub fn migrate(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    if has_table(txn.list_tables()?, BALANCE_BLOCKS.name()) {
        return Ok(());
    }
    if has_table(txn.list_tables()?, LEGACY_BALANCES.name()) {
        let legacy = txn.open_table(LEGACY_BALANCES)?;
        let mut blocks = txn.open_table(BALANCE_BLOCKS)?;
        let (mut block, mut buf, mut moved) = (None::<u32>, Vec::new(), 0u64);
        for row in legacy.iter()? {
            let (k, v) = row?;
            let (num, (balance, last)) = (k.value(), v.value());
            if block != Some(num / BLOCK_ACCOUNTS) {
                if let Some(b) = block {
                    blocks.insert(b, &buf[..])?;
                }
                block = Some(num / BLOCK_ACCOUNTS);
                buf.clear();
            }
            // Accounts without a row in between read as (0, 0), as before.
            buf.resize((num % BLOCK_ACCOUNTS) as usize * ENTRY_BYTES, 0);
            buf.extend_from_slice(&balance.to_le_bytes());
            buf.extend_from_slice(&last.to_le_bytes());
            moved += 1;
        }
        if let Some(b) = block {
            blocks.insert(b, &buf[..])?;
        }
        drop(legacy);
        txn.delete_table(LEGACY_BALANCES).map_err(redb::Error::from)?;
        tracing::info!(rows = moved, "moved the balance rows into blocks");
    } else {
        txn.open_table(BALANCE_BLOCKS)?;
    }
    txn.open_table(MOVED)?.insert("moved to", BALANCE_BLOCKS.name())?;
    Ok(())
}

/// Puts account `num`'s row into its block as it is (tests that build a
/// database by hand).
#[cfg(test)]
pub fn put(txn: &redb::WriteTransaction, num: u32, row: (i64, u64)) -> Result<(), StoreError> {
    let mut t = txn.open_table(BALANCE_BLOCKS)?;
    let block = num / BLOCK_ACCOUNTS;
    let mut bytes = t.get(block)?.map(|v| v.value().to_vec()).unwrap_or_default();
    let at = (num % BLOCK_ACCOUNTS) as usize * ENTRY_BYTES;
    if bytes.len() < at + ENTRY_BYTES {
        bytes.resize(at + ENTRY_BYTES, 0);
    }
    bytes[at..at + 8].copy_from_slice(&row.0.to_le_bytes());
    bytes[at + 8..at + ENTRY_BYTES].copy_from_slice(&row.1.to_le_bytes());
    t.insert(block, &bytes[..])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use redb::{Database, ReadableDatabase};

    use super::*;
    use crate::ledger::Limits;

    #[derive(Clone, Debug)]
    enum Step {
        /// An account changes: its number (modulo the book's length), balance and last transfer.
        Change(u32, i64, u64),
        /// A commit writes the rows of `start..start + len` (modulo the length).
        Write(u32, u32),
        /// An account is created.
        Create,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (any::<u32>(), any::<i64>(), any::<u64>()).prop_map(|(n, b, l)| Step::Change(n, b, l)),
            2 => (any::<u32>(), 0u32..300).prop_map(|(s, l)| Step::Write(s, l)),
            1 => Just(Step::Create),
        ]
    }

    fn rows_of(db: &Database) -> Rows {
        Rows::open(&db.begin_read().unwrap()).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever accounts change and whatever slices are written: once
        /// written, an account is clean, and every clean account's row is
        /// its balance and last transfer in the book; reading every row
        /// gives what reading each one does.
        #[test]
        fn every_clean_account_reads_as_the_book_holds_it(len in 1u32..400, steps in proptest::collection::vec(step(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let db = Database::create(dir.path().join("t.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            migrate(&txn).unwrap();
            txn.commit().unwrap();
            let mut book = Book::new(Limits { min_balance: i64::MIN, max_balance: None });
            for i in 0..len {
                book.create(&format!("a{i}")).unwrap();
            }
            for s in steps {
                let len = u32::try_from(book.len()).unwrap();
                match s {
                    Step::Change(n, balance, last) => book.replay_num(n % len, balance, last),
                    Step::Create => {
                        book.create(&format!("a{len}")).unwrap();
                    }
                    Step::Write(start, n) => {
                        let start = start % len;
                        let txn = db.begin_write().unwrap();
                        write(&txn, &mut book, start..start + n).unwrap();
                        txn.commit().unwrap();
                        for num in start..(start + n).min(len) {
                            prop_assert!(!book.by_num(num).unwrap().dirty, "{num} written but dirty");
                        }
                    }
                }
                let rows = rows_of(&db);
                for (num, (_, a)) in (0u32..).zip(book.iter()) {
                    if !a.dirty {
                        prop_assert_eq!(rows.get(num).unwrap(), (a.balance, a.last), "account {}", num);
                    }
                }
                let mut seen = Vec::new();
                rows.for_each(|num, row| {
                    seen.push((num, row));
                    Ok(())
                })
                .unwrap();
                prop_assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
                for (num, row) in seen {
                    prop_assert!((num as usize) < book.len());
                    prop_assert_eq!(rows.get(num).unwrap(), row);
                }
            }
        }
    }

    /// A block of a length no write makes is corrupt, not misread.
    #[test]
    fn a_block_of_a_wrong_length_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        for bad in [vec![0u8; 15], Vec::new(), vec![0u8; 65 * ENTRY_BYTES]] {
            let txn = db.begin_write().unwrap();
            migrate(&txn).unwrap();
            txn.open_table(BALANCE_BLOCKS).unwrap().insert(2, &bad[..]).unwrap();
            txn.commit().unwrap();
            let rows = rows_of(&db);
            assert!(matches!(rows.get(130), Err(StoreError::Corrupt(_))));
            assert!(matches!(rows.for_each(|_, _| Ok(())), Err(StoreError::Corrupt(_))));
        }
    }
}
