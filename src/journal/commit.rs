//! The journal's storage side: the rows the state machine reads from redb
//! ([`RedbCold`]), and one write transaction per batch that puts its
//! [`Writes`], a slice of balance rows (the sweep) and the new head, and
//! commits with fsync.

use std::cell::OnceCell;

use redb::{Database, Durability, ReadTransaction, ReadableDatabase};

use super::machine::{Cold, Writes};
use crate::ledger::Book;
use crate::limits::{
    SWEEP_ACCOUNTS_PER_RECORD, SWEEP_CHUNK_IDLE, SWEEP_CHUNK_MIN, SWEEP_IDLE_COMMITS, SWEEP_RECORDS, SWEEP_RECORDS_MAX,
};
use crate::store::balances::BLOCK_ACCOUNTS;
use crate::store::key_index::KeyPlan;
use crate::store::{self, AccountMeta, Head, HoldRecord, KeyIndex, KeyRecord, RedeemRecord, StoreError, UserRecord};

/// [`Cold`] over the database as last committed: a read transaction,
/// opened on the first read (most batches of transfers read nothing).
pub struct RedbCold<'a> {
    db: &'a Database,
    txn: OnceCell<ReadTransaction>,
}

impl<'a> RedbCold<'a> {
    #[must_use]
    pub fn new(db: &'a Database) -> Self {
        RedbCold { db, txn: OnceCell::new() }
    }

    fn txn(&self) -> Result<&ReadTransaction, StoreError> {
        if let Some(t) = self.txn.get() {
            return Ok(t);
        }
        let t = self.db.begin_read()?;
        Ok(self.txn.get_or_init(|| t))
    }
}

impl Cold for RedbCold<'_> {
    fn meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError> {
        let t = self.txn()?.open_table(store::ACCOUNTS)?;
        t.get(account)?.map(|v| AccountMeta::decode(v.value())).transpose()
    }

    fn user(&self, user: &str) -> Result<Option<UserRecord>, StoreError> {
        let t = self.txn()?.open_table(store::USERS)?;
        t.get(user)?.map(|v| UserRecord::decode(v.value())).transpose()
    }

    fn hold(&self, id: u64) -> Result<Option<HoldRecord>, StoreError> {
        let t = self.txn()?.open_table(store::HOLDS)?;
        t.get(id)?.map(|v| HoldRecord::decode(v.value())).transpose()
    }

    fn redeem(&self, id: u64) -> Result<Option<RedeemRecord>, StoreError> {
        let t = self.txn()?.open_table(store::REDEEMS)?;
        t.get(id)?.map(|v| RedeemRecord::decode(v.value())).transpose()
    }

    fn service_key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let t = self.txn()?.open_table(store::SERVICE_KEYS)?;
        t.get(key_id)?.map(|v| KeyRecord::decode(v.value())).transpose()
    }

    fn tagged(&self, tag: &str) -> Result<Vec<String>, StoreError> {
        let t = self.txn()?.open_table(store::TAGS)?;
        let mut out = Vec::new();
        for row in t.range((tag, "")..)? {
            let (k, ()) = row.map(|(k, v)| (k, v.value()))?;
            let (t, account) = k.value();
            if t != tag {
                break;
            }
            out.push(account.to_owned());
        }
        Ok(out)
    }
}

/// Where the balance-row sweep stands (see `store`: the checkpoint).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sweep {
    /// Next account number the sweep writes.
    pub cursor: u32,
    /// The head when the current sweep began: once it completes, every
    /// balance row includes all transfers up to here.
    pub from: u64,
    /// Every balance row includes all transfers up to here (as last written).
    pub checkpoint: u64,
}

/// Commits one batch: its writes, the next slice of balance rows, the new
/// head; fsynced (two-phase, see `store::begin_write`) before it returns.
/// `sealed`: the history's segments are complete up to here
/// (`store::history`); the commit records it and removes some of the
/// chunks they hold. Returns where the ledger's own chunks now start
/// (`archived`), if `sealed` was given.
pub fn write(
    db: &Database,
    keys: &KeyIndex,
    w: &mut Writes,
    book: &mut Book,
    head: Head,
    sweep: &mut Sweep,
    sealed: Option<u64>,
) -> Result<Option<u64>, StoreError> {
    let mut txn = store::begin_write(db)?;
    txn.set_durability(Durability::Immediate).map_err(|e| StoreError::Corrupt(format!("durability: {e}")))?;
    let mut plan = keys.plan()?;
    put(&txn, w, book, head, sweep, &mut plan)?;
    let archived = sealed.map(|s| store::history::note_sealed(&txn, s)).transpose()?;
    let durable = std::time::Instant::now();
    txn.commit()?;
    crate::metrics::FSYNC_MICROS.observe(u64::try_from(durable.elapsed().as_micros()).unwrap_or(u64::MAX));
    // The keys move to memory (the next batch clears the writes anyway).
    keys.committed(plan, std::mem::take(&mut w.keys), head.id)?;
    Ok(archived)
}

/// Puts one batch's writes, the next slice of balance rows and the new
/// head into `txn` (which the caller commits: a cluster member commits
/// several entries and its Raft position together). The batch's keys go
/// to `keys`, for memory once `txn` has committed ([`KeyIndex`]).
pub fn put(
    txn: &redb::WriteTransaction,
    w: &Writes,
    book: &mut Book,
    head: Head,
    sweep: &mut Sweep,
    keys: &mut KeyPlan,
) -> Result<(), StoreError> {
    {
        let mut chunks = txn.open_table(store::CHUNKS)?;
        for (first, bytes) in w.chunks() {
            chunks.insert(first, bytes)?;
        }
        keys.put(txn, w.keys.len())?;
        if !w.accounts.is_empty() {
            let mut t = txn.open_table(store::ACCOUNTS)?;
            for (id, meta) in &w.accounts {
                t.insert(id.as_str(), &meta.encode()[..])?;
            }
        }
        if !w.owners.is_empty() {
            let mut t = txn.open_table(store::OWNERS)?;
            for (owner, id) in &w.owners {
                t.insert((owner.as_str(), id.as_str()), ())?;
            }
        }
        if !w.tags.is_empty() {
            let mut t = txn.open_table(store::TAGS)?;
            for ((tag, id), present) in &w.tags {
                if *present {
                    t.insert((tag.as_str(), id.as_str()), ())?;
                } else {
                    t.remove((tag.as_str(), id.as_str()))?;
                }
            }
        }
        if !w.users.is_empty() {
            let mut t = txn.open_table(store::USERS)?;
            for (id, user) in &w.users {
                t.insert(id.as_str(), &user.encode()[..])?;
            }
        }
        if !w.holds.is_empty() {
            let mut t = txn.open_table(store::HOLDS)?;
            for (id, hold) in &w.holds {
                t.insert(*id, &hold.encode()[..])?;
            }
        }
        if !w.open_holds.is_empty() {
            let mut t = txn.open_table(store::OPEN_HOLDS)?;
            for (id, open) in &w.open_holds {
                if *open {
                    t.insert(*id, ())?;
                } else {
                    t.remove(*id)?;
                }
            }
        }
        if !w.redeems.is_empty() {
            let mut t = txn.open_table(store::REDEEMS)?;
            for (id, r) in &w.redeems {
                t.insert(*id, &r.encode()[..])?;
            }
        }
        if !w.service_keys.is_empty() {
            let mut t = txn.open_table(store::SERVICE_KEYS)?;
            for (id, k) in &w.service_keys {
                t.insert(id.as_str(), &k.encode()[..])?;
            }
        }
        if !w.user_redeems.is_empty() {
            let mut t = txn.open_table(store::USER_REDEEMS)?;
            for (user, id) in &w.user_redeems {
                t.insert((user.as_str(), *id), ())?;
            }
        }
        sweep_slice(txn, book, head.id, w.ends.len(), sweep)?;
        store::write_head(txn, head)?;
    }
    Ok(())
}

/// Writes every dirty balance row and a checkpoint at the head, so the
/// next start replays nothing.
pub fn final_checkpoint(db: &Database, book: &mut Book, head: Head, sweep: &mut Sweep) -> Result<(), StoreError> {
    let txn = store::begin_write(db)?;
    let all = u32::try_from(book.len()).unwrap_or(u32::MAX);
    store::balances::write(&txn, book, 0..all)?;
    store::write_checkpoint(&txn, head.id)?;
    txn.commit()?;
    sweep.checkpoint = head.id;
    Ok(())
}

/// Writes the next slice of balance rows, in proportion to the `records`
/// the batch wrote; completes the sweep (and moves the checkpoint) when the
/// slice reaches the last account.
fn sweep_slice(
    txn: &redb::WriteTransaction,
    book: &mut Book,
    head: u64,
    records: usize,
    sweep: &mut Sweep,
) -> Result<(), StoreError> {
    let len = book.len();
    let chunk = sweep_chunk(len, records);
    let start = sweep.cursor as usize;
    // Blocks are written whole: a slice ends at a block's end.
    let end = (start + chunk).next_multiple_of(BLOCK_ACCOUNTS as usize).min(len);
    let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    store::balances::write(txn, book, to_u32(start)..to_u32(end))?;
    if end >= len {
        store::write_checkpoint(txn, sweep.from)?;
        sweep.checkpoint = sweep.from;
        sweep.cursor = 0;
        // The next sweep covers everything this commit adds.
        sweep.from = head;
    } else {
        sweep.cursor = to_u32(end);
    }
    Ok(())
}

/// How many account numbers a commit that wrote `records` records sweeps,
/// of `len`: a full sweep takes about [`sweep_records`] records. Each
/// commit sweeps in proportion to what it wrote, so the sweep costs the
/// same per transfer whatever the batch size, and an account changed many
/// times in one sweep has its row written once.
#[must_use]
pub fn sweep_chunk(len: usize, records: usize) -> usize {
    if records == 0 {
        return (len / SWEEP_IDLE_COMMITS).max(SWEEP_CHUNK_IDLE);
    }
    len.saturating_mul(records).div_ceil(sweep_records(len)).max(SWEEP_CHUNK_MIN)
}

/// How many records a full sweep of `len` accounts takes: the fewest up to
/// about a million accounts, then one for every four accounts, up to the
/// most. A sweep rewrites every leaf of balance rows it finds changed, so
/// a longer one writes each leaf after more transfers (fewer bytes per
/// transfer), at the price of a longer replay after a crash.
#[must_use]
pub fn sweep_records(len: usize) -> usize {
    (len / SWEEP_ACCOUNTS_PER_RECORD).clamp(SWEEP_RECORDS, SWEEP_RECORDS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commits of `batch` records each until a sweep of `len` accounts
    /// completes: how many records that took.
    fn records_per_sweep(len: usize, batch: usize) -> usize {
        let (mut cursor, mut records) = (0, 0);
        while cursor < len {
            cursor += sweep_chunk(len, batch);
            records += batch;
        }
        records
    }

    #[test]
    fn a_sweep_takes_about_its_records_whatever_the_batches() {
        for len in [3, 1_000, 100_000, 1_000_000, 10_000_000, 100_000_000] {
            for batch in [1, 7, 100, 1024, 8192] {
                let records = records_per_sweep(len, batch);
                // The replay bound: a full sweep within its records (plus
                // the batch that completes it).
                assert!(records <= sweep_records(len) + batch, "len {len} batch {batch}: {records}");
                // And no commit sweeps less than the minimum.
                assert!(sweep_chunk(len, batch) >= SWEEP_CHUNK_MIN);
            }
        }
        // Up to a million accounts a sweep takes 262,144 records; beyond,
        // one for four accounts, up to 2,097,152 (at 8,388,608 accounts).
        assert_eq!(sweep_records(3), SWEEP_RECORDS);
        assert_eq!(sweep_records(1_048_576), SWEEP_RECORDS);
        assert_eq!(sweep_records(1_048_580), SWEEP_RECORDS + 1);
        assert_eq!(sweep_records(4_000_000), 1_000_000);
        assert_eq!(sweep_records(4_194_300), 1_048_575);
        assert_eq!(sweep_records(4_194_304), 1_048_576);
        assert_eq!(sweep_records(8_388_600), 2_097_150);
        assert_eq!(sweep_records(8_388_608), SWEEP_RECORDS_MAX);
        assert_eq!(sweep_records(10_000_000), SWEEP_RECORDS_MAX);
        assert_eq!(sweep_records(usize::MAX), SWEEP_RECORDS_MAX);
        // Proportional: a batch of 1,024 over 1M accounts sweeps 3,907 of
        // them; over 10M, 4,883 (39,063 with the shortest sweep).
        assert_eq!(sweep_chunk(1_000_000, 1024), 3907);
        assert_eq!(sweep_chunk(10_000_000, 1024), 4883);
        // Idle commits: at least 1/64 of the accounts, at least 4,096.
        assert_eq!(sweep_chunk(1_000_000, 0), 15_625);
        assert_eq!(sweep_chunk(1_000, 0), SWEEP_CHUNK_IDLE);
    }
}
