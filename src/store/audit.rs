//! `backup` (a consistent copy through one read transaction) and `audit`
//! (the whole chain re-verified, and the balances summed).

use super::balances::{Rows, BALANCE_BLOCKS, LEGACY_BALANCES, MOVED};
use super::history::{History, Records, ARCHIVED, SEALED};
use super::record::{for_each_record, Head};
use super::recovery::{for_each_open_hold, legs, read_checkpoint, read_head, StoredMeta};
use super::*;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

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
    let accounts = txn.open_table(ACCOUNTS)?.len()?;
    let (mut chain_ok, sum) = match balances_sum(&txn, LEG_GROUP) {
        Ok(sum) => (true, sum),
        Err(StoreError::Corrupt(e)) => {
            tracing::error!(error = %e, "audit found a broken journal");
            (false, 0)
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

/// The sum of every balance as loading would find it, and refused as
/// corrupt wherever loading would refuse it (`recovery::load_with`), but
/// without building loading's book of every account: that book is ~90
/// bytes an account (~0.9 GiB at 10M accounts), held beside the server's
/// own for as long as the audit runs.
///
/// Why the sum is the book's: the book starts from the balance rows and
/// adds a record's leg to an account only if the record is newer than the
/// account's `last`, which the leg then moves to the record. Records are
/// replayed in id order, so a leg counts unless the row already holds its
/// record (or an earlier leg of the same record named the same account),
/// and the book's sum is the rows' sum plus the legs that count. What
/// this holds is one bit an account (every number used once); a group of
/// the tail's legs on their way ([`LEG_GROUP`]); and, for loading's
/// overflow check, the balance of each account the records after the
/// checkpoint touch (at most about two sweeps' records, see
/// `journal::commit::sweep_records`): ~25 bytes each, a few hundred MB
/// when a long tail touched millions of accounts, against ~90 bytes for
/// every account in a book.
///
/// `group`: legs looked up at a time ([`LEG_GROUP`] but in tests).
pub(super) fn balances_sum(txn: &redb::ReadTransaction, group: usize) -> Result<i128, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt(what);
    let accounts = txn.open_table(ACCOUNTS)?;
    let n = accounts.len()?;
    // Loading places each account at its number in a book of n: a number
    // out of range or used twice is refused, and n accounts each at a
    // number of its own below n leave none unfilled.
    let mut used = vec![0u64; usize::try_from(n.div_ceil(64)).map_err(|_| corrupt("too many accounts".into()))?];
    for row in accounts.iter()? {
        let num = StoredMeta::decode(row?.1.value())?.num;
        if u64::from(num) >= n {
            return Err(corrupt(format!("account number {num} out of range")));
        }
        let (word, bit) = ((num / 64) as usize, 1u64 << (num % 64));
        if used[word] & bit != 0 {
            return Err(corrupt(format!("account number {num} is used twice")));
        }
        used[word] |= bit;
    }
    drop(used);
    let rows = Rows::open(txn)?;
    let mut sum = 0i128;
    rows.for_each(|num, (balance, _)| {
        if u64::from(num) >= n {
            return Err(corrupt("balance rows without accounts".into()));
        }
        sum += i128::from(balance);
        Ok(())
    })?;

    let head = read_head(txn)?;
    let checkpoint = read_checkpoint(txn)?;
    let chunks = txn.open_table(CHUNKS)?;
    let mut prev = match checkpoint {
        0 => GENESIS,
        id => super::record::with_record(&chunks, id, |stored| Ok(stored.hash))?
            .ok_or_else(|| corrupt(format!("checkpoint record {id} is missing")))?,
    };
    let mut expected = checkpoint + 1;
    let waiting = Vec::with_capacity(group.clamp(3, 1 << 12));
    let mut tail = Tail { accounts: &accounts, rows: &rows, touched: Default::default(), legs: waiting, sum };
    for_each_record(&chunks, checkpoint + 1, |stored| {
        let r = stored.record()?;
        if r.id != stored.id || r.id != expected || r.prev != prev {
            return Err(corrupt(format!("the journal breaks at transfer {}", stored.id)));
        }
        // A record's legs (at most 3) join a group only whole, and the
        // group never grows past `group`.
        if tail.legs.len() + 3 > group.max(3) {
            tail.settle()?;
        }
        for (i, (account, delta)) in legs(&r)?.into_iter().enumerate() {
            // As in `recovery::replay_noting`: both parties must exist,
            // the fee's account only when the fee moves something.
            if i == 2 && delta == 0 {
                continue;
            }
            let at = u32::try_from(tail.legs.len()).expect("a group is far below 2^32 legs");
            tail.legs.push(Leg { account: account.into(), id: r.id, delta, num: 0, at });
        }
        prev = stored.hash;
        expected += 1;
        Ok(true)
    })?;
    tail.settle()?;
    let sum = tail.sum;
    if expected - 1 != head.id || prev != head.hash {
        return Err(corrupt(format!("the journal ends at transfer {} but its head says {}", expected - 1, head.id)));
    }
    drop(tail);
    // Loading's checks of the open holds: each stored, open, and what an
    // account holds within range (loading's book keeps no held amount for
    // an account it does not have).
    let mut held: std::collections::HashMap<String, i64, foldhash::fast::RandomState> = Default::default();
    for_each_open_hold(txn, |h| {
        if accounts.get(h.hold.from.as_str())?.is_none() {
            return Ok(());
        }
        let on = held.entry(h.hold.from.clone()).or_default();
        *on = on.checked_add(h.hold.amount).ok_or_else(|| corrupt("held".into()))?;
        Ok(())
    })?;
    Ok(sum)
}

/// Legs of the records after the checkpoint looked up at a time, in name
/// order and then in number order, so that neighbouring lookups share
/// redb's pages. One at a time in record order, at 10M accounts nearly
/// every lookup read a page in: an audit after 20 s of load took ~50 s
/// longer than loading's book. A group holds ~56 MiB at most.
const LEG_GROUP: usize = 1 << 20;

/// A leg to add to `num`'s balance if its row does not hold record `id`.
struct Leg {
    /// Inline when short, so that sorting by it compares bytes in place.
    account: crate::ledger::AccountKey,
    id: u64,
    delta: i64,
    /// Its account's number, once looked up.
    num: u32,
    /// Its place among the group's legs, in record order.
    at: u32,
}

/// The walk of the records after the checkpoint in [`balances_sum`].
struct Tail<'a> {
    accounts: &'a redb::ReadOnlyTable<&'static str, &'static [u8]>,
    rows: &'a Rows,
    /// Each touched account's balance and the last record it holds, by
    /// number: loading's book, for these accounts only.
    touched: std::collections::HashMap<u32, (i64, u64), foldhash::fast::RandomState>,
    /// Legs not yet added, in record order.
    legs: Vec<Leg>,
    sum: i128,
}

impl Tail<'_> {
    /// Looks up the waiting legs' accounts and rows, then adds them in
    /// record order, as loading's replay does (its overflow check is per
    /// account, in that order).
    fn settle(&mut self) -> Result<(), StoreError> {
        let legs = &mut self.legs;
        legs.sort_unstable_by(|a, b| a.account.as_str().cmp(b.account.as_str()));
        for i in 0..legs.len() {
            legs[i].num = match i.checked_sub(1).map(|b| &legs[b]) {
                Some(b) if b.account.as_str() == legs[i].account.as_str() => b.num,
                _ => {
                    let meta = self.accounts.get(legs[i].account.as_str())?.ok_or_else(|| {
                        StoreError::Corrupt(format!("replaying transfer {}: unknown account", legs[i].id))
                    })?;
                    StoredMeta::decode(meta.value())?.num
                }
            };
        }
        let mut nums: Vec<u32> = legs.iter().map(|l| l.num).collect();
        nums.sort_unstable();
        nums.dedup();
        for num in nums {
            if let std::collections::hash_map::Entry::Vacant(e) = self.touched.entry(num) {
                e.insert(self.rows.get(num)?);
            }
        }
        legs.sort_unstable_by_key(|l| l.at);
        for leg in legs.drain(..) {
            let row = self.touched.get_mut(&leg.num).expect("looked up above");
            if leg.id > row.1 {
                row.0 = row
                    .0
                    .checked_add(leg.delta)
                    .ok_or_else(|| StoreError::Corrupt(format!("replaying transfer {}: overflow", leg.id)))?;
                row.1 = leg.id;
                self.sum += i128::from(leg.delta);
            }
        }
        Ok(())
    }
}
