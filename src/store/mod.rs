//! What Tally keeps in redb, and the read-side queries over it.
//!
//! - here: the tables, the [`Store`] handle, opening and the journal's row writes;
//! - [`record`]: the stored record, the head, records in chunks;
//! - [`rows`]: account metadata, users, holds, redeem requests;
//! - [`recovery`]: loading the ledger, with the one replay rule;
//! - [`queries`]: the read side; [`mod@audit`]: `backup` and `audit`;
//! - [`warm`]: reading the file into the page cache while it opens and loads.
//!
//! # Tables
//!
//! | table | key | value | written by |
//! |---|---|---|---|
//! | `chunks` | id `u64` of its first record | up to [`CHUNK_RECORDS_MAX`](crate::limits::CHUNK_RECORDS_MAX) consecutive stored records (below) | journal, append-only; a single server moves the oldest out into sealed segments ([`history`]) |
//! | `balance_blocks` | account number `u32` / 64 | (balance `i64` LE, last transfer id `u64` LE) of up to 64 accounts ([`balances`]) | journal, swept in key order |
//! | `balances` | `&str` | `&str` | [`open`]: a marker of another type where rows were once kept one per account, so that older versions refuse the folder ([`balances`]) |
//! | `accounts` | account | MessagePack [`AccountMeta`] | journal |
//! | `keys` | (from account, key) | transfer id | journal: idempotency keys of the records before `meta.keys_from`, merged in sorted runs ([`key_index`]) |
//! | `tags` | (tag, account) | `()` | journal: index for `list_accounts {tag}` and `bulk_add` |
//! | `owners` | (owner, account) | `()` | journal: index for `list_accounts {owner}` |
//! | `users` | user | MessagePack [`UserRecord`] | start-up, later the journal |
//! | `meta` | name | bytes | `head` = last id (8 bytes BE) + its hash (32 bytes); `checkpoint` = id (8 bytes BE); `keys_from` = id (8 bytes BE); `sealed`, `archived` = ids (8 bytes BE, [`history`]) |
//!
//! The hot path only appends: a batch writes its records in chunks of
//! consecutive ids (sequential keys, so always at the end of the tree) and
//! the new head. One B-tree insert per record was ~45% of the journal
//! thread's time (perf); one per chunk of 64 is a small fraction of that.
//! Balances live in memory. Each batch also writes the balance blocks of the next slice
//! of account numbers that changed (a sweep in key order, so a batch touches few pages);
//! when a sweep completes, every row includes all transfers up to the head
//! at the sweep's start, and that id is stored as the `checkpoint`. Start-up
//! (and `audit`) read the rows and replay only the records after the
//! checkpoint, applying a record to a row only if the row's last transfer
//! is older: at most about two sweeps' records (`journal::commit::sweep_records`),
//! never the whole history.
//!
//! Each record links to the previous record of each of its parties, and
//! each account knows its last record, so an account's history is a linked
//! list read newest first, with no index to update per transfer.
//!
//! # Chunks
//!
//! A chunk holds records with ids `first, first + 1, ...` (its key is
//! `first`); a chunk never spans two commits. Record `id` is in the last
//! chunk whose key is `<= id`. The journal writes version 3 chunks:
//!
//! `3u8 | prev [32] | (len u16 | record)*`
//!
//! where `prev` is the hash of the record before the chunk's first (zeros
//! for record 1). Chunks written before version 3 are `(len u32 | record)*`
//! of version 1 or 2 records, and start with a 0 byte (a length's high
//! byte); [`chunk_records`] reads both, so a folder may hold both. (Data
//! folders written before chunks kept one record per row in a table
//! `transfers`; [`open`] moves those rows into chunks once.)
//!
//! # Stored record format (version 3)
//!
//! `3u8 | kind u8 | amount zvar | fee zvar | time_ms var |
//! prev_from var | prev_to var | prev_fee var |
//! from_len u8 | from | to_len u8 | to | memo_len var | memo | key_len u8 | key |
//! by_len u8 | by`
//!
//! where `var` is a LEB128 varint (7 bits a byte, low first, at most 10
//! bytes) and `zvar` a zigzag varint of an `i64`. `by` is who made the
//! record (a user id or `key:<key_id>`; empty: the server's own timer).
//! `prev_from`/`prev_to`/`prev_fee` are the previous record of `from`, `to`
//! and (for a fee) `@treasury`, 0 for none.
//!
//! The id is the chunk's key plus the record's place, and `prev` (the hash
//! of the record before) follows from the chunk's `prev` and the records
//! before it in the chunk. A record's hash is BLAKE3 of `prev` followed by
//! its stored bytes, so the journal is a hash chain that `audit`
//! re-verifies from the start: a changed byte changes every hash after it
//! up to the next chunk's `prev` or the head. Reading one record hashes
//! it and the records before it in its chunk (at most 64, each ~50-60
//! bytes for short ids and no memo); a history page keeps the last chunk
//! it read, so a walk within one chunk hashes it once.
//!
//! Why: the chunks are most of the file. The load harness's transfers
//! took 125 bytes each in version 2, 32 of them `prev` and 8 the id, and
//! take 53 in version 3 (docs/performance.md). Less to write per commit,
//! and less disk; after a crash redb reads every page of the file before
//! it opens (see there for what that costs).
//!
//! # Version 2 (read only)
//!
//! `2u8 | id u64 | kind u8 | amount i64 | fee i64 | time_ms u64 | prev [32] |
//! prev_from u64 | prev_to u64 | prev_fee u64 |
//! from_len u8 | from | to_len u8 | to | memo_len u16 | memo | key_len u8 | key |
//! by_len u8 | by`,
//! integers big-endian; its hash is BLAKE3 of exactly these bytes. Version
//! 1 records (first byte 1) end at the key.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};

use crate::ledger::SYSTEM_ACCOUNTS;
use crate::limits::REDB_CACHE_BYTES;

pub mod audit;
pub mod balances;
pub mod history;
pub mod key_index;
pub mod queries;
pub mod record;
pub mod recovery;
pub mod rows;
pub mod warm;

pub use audit::{audit, backup, backup_txn};
pub use history::History;
pub use key_index::KeyIndex;
pub use queries::{
    account_meta, get_key, get_transfer, get_user, history, history_after, list_accounts, list_keys, load_keys,
    load_users, put_key, put_user, redeems, ListFilter,
};
pub use record::{
    append_chunked, chained_hash, chunk_records, record_hash, ChunkWriter, Head, RecordRef, Stored, TransferRecord,
    CHUNK_V3,
};
pub use recovery::{
    load, load_with, replay, replay_noting, size_hint, write_size_hint, Loaded, LoadedAccount, LoadedAccounts, Room,
};
pub use rows::{AccountExtra, AccountMeta, HoldRecord, KeyRecord, RedeemRecord, RedeemStatus, Tombstone, UserRecord};
pub use warm::Warming;

/// The journal's records in chunks (module docs).
pub const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("chunks");
/// One record per row: the layout before chunks, migrated by [`open`].
const LEGACY_TRANSFERS: TableDefinition<u64, &[u8]> = TableDefinition::new("transfers");
pub const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
pub const KEYS: TableDefinition<(&str, &str), u64> = TableDefinition::new("keys");
/// Index of accounts by tag: (tag, account).
pub const TAGS: TableDefinition<(&str, &str), ()> = TableDefinition::new("tags");
/// Index of accounts by owner: (owner, account).
pub const OWNERS: TableDefinition<(&str, &str), ()> = TableDefinition::new("owners");
pub const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Two-phase transfers by id (the id of their `hold` record).
pub const HOLDS: TableDefinition<u64, &[u8]> = TableDefinition::new("holds");
/// The holds still open: start-up reads only these, not every hold ever made.
pub const OPEN_HOLDS: TableDefinition<u64, ()> = TableDefinition::new("open_holds");
/// Redeem requests by id (the id of the hold behind them).
pub const REDEEMS: TableDefinition<u64, &[u8]> = TableDefinition::new("redeems");
/// Service keys by id: MessagePack [`KeyRecord`].
pub const SERVICE_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("service_keys");
/// Index of redeem requests by user: (user, request).
pub const USER_REDEEMS: TableDefinition<(&str, u64), ()> = TableDefinition::new("user_redeems");

const RECORD_VERSION: u8 = 3;
const HEAD: &str = "head";
const CHECKPOINT: &str = "checkpoint";

/// Hash of "no previous record".
pub const GENESIS: [u8; 32] = [0; 32];

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The database is being reopened after a storage failure.
    #[error("the database is being reopened after a storage failure")]
    Unavailable,
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Redb(redb::Error::Io(e))
    }
}

impl StoreError {
    /// Whether the disk failed (as opposed to data that makes no sense):
    /// a full disk, an IO error, or redb refusing everything after one.
    #[must_use]
    pub fn is_io(&self) -> bool {
        matches!(self, StoreError::Redb(redb::Error::Io(_) | redb::Error::PreviousIo) | StoreError::Unavailable)
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<StoreError> for crate::error::ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_io() {
            tracing::warn!(error = %e, "storage unavailable");
            return crate::error::ApiError::new(
                crate::error::ErrorCode::Unavailable,
                "the storage is failing or being reopened; nothing was changed; try again shortly",
            );
        }
        tracing::error!(error = %e, "storage error");
        crate::error::ApiError::internal("storage error")
    }
}

/// The database as every reader finds it. After a storage failure redb
/// refuses everything until the file is opened again, so the journal takes
/// the database out of here ([`Store::take`]), waits for the last reader to
/// let go, reopens it and puts the new one back; in between, readers get
/// [`StoreError::Unavailable`].
pub struct Store {
    path: std::path::PathBuf,
    current: std::sync::RwLock<Option<Arc<Database>>>,
    /// The idempotency keys of the database's recent records.
    keys: KeyIndex,
    /// The old records, in segments of their own.
    history: History,
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Arc::new(open(path)?);
        let history = History::open(path, &db)?;
        let keys = KeyIndex::default();
        keys.rebuild(&db, &history)?;
        Ok(Store { path: path.to_owned(), current: std::sync::RwLock::new(Some(db)), keys, history })
    }

    /// The old records' segments.
    #[must_use]
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The keys of recent records, which are not all in the `keys` table
    /// (see [`key_index`]).
    #[must_use]
    pub fn keys(&self) -> &KeyIndex {
        &self.keys
    }

    /// The database, unless it is being reopened.
    pub fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.current.read().ok().and_then(|d| d.clone()).ok_or(StoreError::Unavailable)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the database out: readers get `Unavailable` until [`Store::put`].
    pub fn take(&self) -> Option<Arc<Database>> {
        self.current.write().ok().and_then(|mut d| d.take())
    }

    /// Puts a (re)opened database in, with its recent keys read; if they
    /// cannot be read, the database stays out.
    pub fn put(&self, db: Arc<Database>) -> Result<(), StoreError> {
        self.keys.rebuild(&db, &self.history)?;
        if let Ok(mut d) = self.current.write() {
            *d = Some(db);
        }
        Ok(())
    }
}

/// Starts a write transaction with two-phase commit. With redb's default
/// (one phase: data, commit slot and checksums under one fsync), opening a
/// file whose newest commit fails its checksums falls back to the commit
/// before it, which is right for a commit torn by a crash but silently drops
/// an acknowledged batch when its pages were damaged after the fsync
/// (`tests/reliability.rs` zeroes the file's last 8 KiB: with records in
/// chunks, that served the batch before the last). Two phases (data, fsync,
/// then the commit slot, fsync) mean the newest slot is only ever one that
/// was completely on disk, so redb refuses to open a damaged one instead of
/// rolling it back. It costs a second fsync
/// per commit (docs/performance.md).
///
/// Each commit also saves redb's allocator state (its "quick repair"), so
/// opening after a crash loads that state instead of walking every page of
/// the file twice on one thread (3.7-3.9 s for the 2.7 GB ledger of 10M
/// accounts, 12 s before the history moved to segments). Its cost grows
/// with the file; with the old records in segments ([`history`]) the
/// ledger file stays small, and no cost showed beyond the noise
/// (docs/performance.md). A file damaged after its fsync is then not
/// checked at open; loading still refuses records that do not chain and
/// balances that do not sum to 0 (`tests/reliability.rs`).
pub fn begin_write(db: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_two_phase_commit(true);
    txn.set_quick_repair(true);
    Ok(txn)
}

/// Opens (or creates) the database and makes sure every table and system
/// account exists.
pub fn open(path: &Path) -> Result<Database, StoreError> {
    let db = Database::builder().set_cache_size(REDB_CACHE_BYTES).create(path)?;
    let txn = begin_write(&db)?;
    migrate_legacy_records(&txn)?;
    balances::migrate(&txn)?;
    {
        txn.open_table(CHUNKS)?;
        txn.open_table(KEYS)?;
        txn.open_table(TAGS)?;
        txn.open_table(OWNERS)?;
        txn.open_table(USERS)?;
        txn.open_table(HOLDS)?;
        txn.open_table(OPEN_HOLDS)?;
        txn.open_table(REDEEMS)?;
        txn.open_table(USER_REDEEMS)?;
        txn.open_table(SERVICE_KEYS)?;
        let mut meta = txn.open_table(META)?;
        if meta.get(HEAD)?.is_none() {
            meta.insert(HEAD, &Head { id: 0, hash: GENESIS }.encode()[..])?;
        }
        key_index::mark_start(&mut meta)?;
        // The system accounts' balance rows are (0, 0): none is written.
        let mut accounts = txn.open_table(ACCOUNTS)?;
        for (num, id) in (0u32..).zip(SYSTEM_ACCOUNTS) {
            if accounts.get(id)?.is_none() {
                let meta = AccountMeta {
                    num,
                    created: crate::clock::now_ms(),
                    memo: Some("system account".into()),
                    ..AccountMeta::default()
                };
                accounts.insert(id, &meta.encode()[..])?;
            }
        }
    }
    txn.commit()?;
    Ok(db)
}

/// Moves records kept one per row (before chunks) into chunks, in the
/// transaction that opens the database; a no-op once done.
fn migrate_legacy_records(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    // Only look when the old table is there (opening it would create it).
    if !txn.list_tables()?.any(|t| t.name() == LEGACY_TRANSFERS.name()) {
        return Ok(());
    }
    {
        let legacy = txn.open_table(LEGACY_TRANSFERS)?;
        if !legacy.is_empty()? {
            let mut chunks = txn.open_table(CHUNKS)?;
            let mut pending = ChunkWriter::default();
            let mut moved = 0u64;
            for row in legacy.iter()? {
                let (k, v) = row?;
                pending.push(&mut chunks, k.value(), v.value())?;
                moved += 1;
            }
            pending.flush(&mut chunks)?;
            tracing::info!(records = moved, "moved the journal's records into chunks");
        }
    }
    txn.delete_table(LEGACY_TRANSFERS).map_err(redb::Error::from)?;
    Ok(())
}

/// Records that every balance row includes all transfers up to `id`.
pub fn write_checkpoint(txn: &redb::WriteTransaction, id: u64) -> Result<(), StoreError> {
    txn.open_table(META)?.insert(CHECKPOINT, &id.to_be_bytes()[..])?;
    Ok(())
}

/// Records the new head: the last record's id and hash.
pub fn write_head(txn: &redb::WriteTransaction, head: Head) -> Result<(), StoreError> {
    txn.open_table(META)?.insert(HEAD, &head.encode()[..])?;
    Ok(())
}

#[cfg(test)]
mod tests;
