//! `backup` (a consistent copy through one read transaction) and `audit`
//! (the whole chain re-verified, and the balances summed).

use super::balances::{Rows, BALANCE_BLOCKS, LEGACY_BALANCES, MOVED};
use super::history::{History, Records, ARCHIVED, SEALED};
use super::record::Head;
use super::recovery::{load_txn, read_head};
use super::*;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::ledger::Limits;
use crate::wire::{AuditReply, Hash32};

/// Copies every table through one read transaction into a new database at
/// `out`: a consistent snapshot taken while the server keeps writing (the
/// live file is never copied). Returns the head the copy ends at. The
/// copy is one file: the history's segments are copied into its own
/// `chunks`, and it relies on no segment.
pub fn backup(db: &Database, history: &History, out: &Path) -> Result<Head, StoreError> {
    backup_txn(&db.begin_read()?, history, out)
}

/// [`backup`] of what the read transaction `src` sees.
pub fn backup_txn(src: &redb::ReadTransaction, history: &History, out: &Path) -> Result<Head, StoreError> {
    let dst = Database::create(out)?;
    let w = begin_write(&dst)?;
    {
        let mut to = w.open_table(CHUNKS)?;
        Records::open(src, history)?.for_each_chunk(|k, v| {
            to.insert(k, v)?;
            Ok(())
        })?;
    }
    macro_rules! copy {
        ($($def:expr),*) => {$({
            let from = src.open_table($def)?;
            let mut to = w.open_table($def)?;
            for row in from.iter()? {
                let (k, v) = row?;
                to.insert(k.value(), v.value())?;
            }
        })*};
    }
    // The balance rows as they are: a backup not yet in blocks moves them
    // when it is opened.
    match Rows::open(src)? {
        Rows::Blocks(_) => {
            copy!(BALANCE_BLOCKS, MOVED);
        }
        Rows::Legacy(_) => {
            copy!(LEGACY_BALANCES);
        }
    }
    copy!(ACCOUNTS, KEYS, TAGS, OWNERS, USERS, META);
    copy!(HOLDS, OPEN_HOLDS, REDEEMS, USER_REDEEMS, SERVICE_KEYS);
    {
        let mut meta = w.open_table(META)?;
        meta.remove(SEALED)?;
        meta.remove(ARCHIVED)?;
    }
    w.commit()?;
    read_head(src)
}

/// In one read transaction (one consistent instant): counts the accounts,
/// sums every balance (rows plus the records after the checkpoint), and
/// re-verifies the hash chain from the first record.
pub fn audit(db: &Database, history: &History) -> Result<AuditReply, StoreError> {
    let txn = db.begin_read()?;
    let head = read_head(&txn)?;
    let (mut chain_ok, sum, accounts) = match load_txn(&txn, Limits::default(), None, |_| ()) {
        Ok((l, ())) => (true, l.book.sum(), l.book.len() as u64),
        Err(StoreError::Corrupt(e)) => {
            tracing::error!(error = %e, "audit found a broken journal");
            (false, 0, txn.open_table(ACCOUNTS)?.len()?)
        }
        Err(e) => return Err(e),
    };
    let records = Records::open(&txn, history)?;
    let mut prev = GENESIS;
    let mut count = 0u64;
    let walked = records.for_each(1, |stored| {
        let ok = stored.record().is_ok_and(|r| r.prev == prev && r.id == stored.id && r.id == count + 1);
        if ok {
            prev = stored.hash;
            count += 1;
        }
        Ok(ok)
    });
    match walked {
        Ok(()) => {}
        Err(StoreError::Corrupt(e)) => {
            tracing::error!(error = %e, "audit found a broken chunk");
            chain_ok = false;
        }
        Err(e) => return Err(e),
    }
    chain_ok = chain_ok && prev == head.hash && count == head.id;
    Ok(AuditReply {
        accounts,
        sum: i64::try_from(sum).unwrap_or(i64::MAX),
        transfers: count,
        chain_ok,
        head: Hash32(head.hash),
    })
}
