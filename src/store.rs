//! What Tally keeps in redb, and the read-side queries over it.
//!
//! # Tables
//!
//! | table | key | value | written by |
//! |---|---|---|---|
//! | `chunks` | id `u64` of its first record | up to [`CHUNK_RECORDS_MAX`] consecutive stored records (below) | journal, append-only |
//! | `balances` | account number `u32` | (balance `i64`, last transfer id `u64`) | journal, swept in key order |
//! | `accounts` | account | MessagePack [`AccountMeta`] | journal |
//! | `keys` | (from account, key) | transfer id | journal: idempotency keys |
//! | `tags` | (tag, account) | `()` | journal: index for `list_accounts {tag}` and `bulk_add` |
//! | `owners` | (owner, account) | `()` | journal: index for `list_accounts {owner}` |
//! | `users` | user | MessagePack [`UserRecord`] | start-up, later the journal |
//! | `meta` | name | bytes | `head` = last id (8 bytes BE) + its hash (32 bytes); `checkpoint` = id (8 bytes BE) |
//!
//! The hot path only appends: a batch writes its records in chunks of
//! consecutive ids (sequential keys, so always at the end of the tree) and
//! the new head. One B-tree insert per record was ~45% of the journal
//! thread's time (perf); one per chunk of 64 is a small fraction of that.
//! Balances live in memory. Each batch also writes the changed balance rows of the next slice
//! of account numbers (a sweep in key order, so a batch touches few pages);
//! when a sweep completes, every row includes all transfers up to the head
//! at the sweep's start, and that id is stored as the `checkpoint`. Start-up
//! (and `audit`) read the rows and replay only the records after the
//! checkpoint, applying a record to a row only if the row's last transfer
//! is older: a few batches of work, never the whole history.
//!
//! Each record links to the previous record of each of its parties, and
//! each account knows its last record, so an account's history is a linked
//! list read newest first, with no index to update per transfer.
//!
//! # Chunks
//!
//! A chunk's value is its records one after another, each as
//! `len u32 | record`, with ids `first, first + 1, ...`; a chunk never spans
//! two commits. Record `id` is in the last chunk whose key is `<= id`.
//! (Data folders written before chunks kept one record per row in a table
//! `transfers`; [`open`] moves those rows into chunks once.)
//!
//! # Stored record format (version 1)
//!
//! `1u8 | id u64 | kind u8 | amount i64 | fee i64 | time_ms u64 | prev [32] |
//! prev_from u64 | prev_to u64 | prev_fee u64 |
//! from_len u8 | from | to_len u8 | to | memo_len u16 | memo | key_len u8 | key`,
//! integers big-endian. A record's hash is BLAKE3 of exactly these bytes, and
//! `prev` is the hash of the record before it (zeros for the first), so the
//! journal is a hash chain that `audit` re-verifies from the start.
//! `prev_from`/`prev_to`/`prev_fee` are the previous record of `from`, `to`
//! and (for a fee) `@treasury`, 0 for none.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use crate::constants::{CHUNK_RECORDS_MAX, REDB_CACHE_BYTES};
use crate::ledger::{Book, BookAccount, Kind, Limits, Links, Status, SYSTEM_ACCOUNTS, TREASURY};
use crate::protocol::{AuditReply, Hash32, TransferView};

/// The journal's records in chunks (module docs).
pub const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("chunks");
/// One record per row: the layout before chunks, migrated by [`open`].
const LEGACY_TRANSFERS: TableDefinition<u64, &[u8]> = TableDefinition::new("transfers");
pub const BALANCES: TableDefinition<u32, (i64, u64)> = TableDefinition::new("balances");
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
/// Index of redeem requests by user: (user, request).
pub const USER_REDEEMS: TableDefinition<(&str, u64), ()> = TableDefinition::new("user_redeems");

const RECORD_VERSION: u8 = 1;
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
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = open(path)?;
        Ok(Store { path: path.to_owned(), current: std::sync::RwLock::new(Some(Arc::new(db))) })
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

    /// Puts a (re)opened database in.
    pub fn put(&self, db: Arc<Database>) {
        if let Ok(mut d) = self.current.write() {
            *d = Some(db);
        }
    }
}

/// One transfer as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRecord {
    pub id: u64,
    pub kind: Kind,
    pub from: Box<str>,
    pub to: Box<str>,
    pub amount: i64,
    pub fee: i64,
    pub memo: Option<Box<str>>,
    pub time: u64,
    pub key: Option<Box<str>>,
    pub prev: [u8; 32],
    pub links: Links,
}

/// A record to be stored, borrowing its fields.
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    pub id: u64,
    pub kind: Kind,
    pub from: &'a str,
    pub to: &'a str,
    pub amount: i64,
    pub fee: i64,
    pub memo: Option<&'a str>,
    pub time: u64,
    pub key: Option<&'a str>,
    pub prev: &'a [u8; 32],
    pub links: Links,
}

impl RecordRef<'_> {
    /// Appends the stored form to `out`. Field lengths were bounded when the
    /// request was validated; the casts below rely on that.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.push(self.kind.to_u8());
        out.extend_from_slice(&self.amount.to_be_bytes());
        out.extend_from_slice(&self.fee.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        out.extend_from_slice(self.prev);
        out.extend_from_slice(&self.links.from.to_be_bytes());
        out.extend_from_slice(&self.links.to.to_be_bytes());
        out.extend_from_slice(&self.links.fee.to_be_bytes());
        let short = |out: &mut Vec<u8>, s: &str| {
            let n = u8::try_from(s.len()).expect("ids and keys are at most 64 bytes");
            out.push(n);
            out.extend_from_slice(s.as_bytes());
        };
        short(out, self.from);
        short(out, self.to);
        let memo = self.memo.unwrap_or("");
        let n = u16::try_from(memo.len()).expect("memos are at most 256 bytes");
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(memo.as_bytes());
        short(out, self.key.unwrap_or(""));
    }
}

impl TransferRecord {
    /// Appends the stored form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        RecordRef {
            id: self.id,
            kind: self.kind,
            from: &self.from,
            to: &self.to,
            amount: self.amount,
            fee: self.fee,
            memo: self.memo.as_deref(),
            time: self.time,
            key: self.key.as_deref(),
            prev: &self.prev,
            links: self.links,
        }
        .encode(out);
    }
}

impl TransferRecord {
    /// Parses the stored form.
    pub fn decode(bytes: &[u8]) -> Result<TransferRecord, StoreError> {
        let corrupt = || StoreError::Corrupt("transfer record".into());
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8], StoreError> {
            let s = bytes.get(pos..pos + n).ok_or_else(corrupt)?;
            pos += n;
            Ok(s)
        };
        if take(1)?[0] != RECORD_VERSION {
            return Err(corrupt());
        }
        let u64_at = |s: &[u8]| u64::from_be_bytes(s.try_into().unwrap_or([0; 8]));
        let id = u64_at(take(8)?);
        let kind = Kind::from_u8(take(1)?[0]).ok_or_else(corrupt)?;
        let amount = u64_at(take(8)?) as i64;
        let fee = u64_at(take(8)?) as i64;
        let time = u64_at(take(8)?);
        let prev: [u8; 32] = take(32)?.try_into().map_err(|_| corrupt())?;
        let links = Links { from: u64_at(take(8)?), to: u64_at(take(8)?), fee: u64_at(take(8)?) };
        let text =
            |s: &[u8]| -> Result<Box<str>, StoreError> { Ok(std::str::from_utf8(s).map_err(|_| corrupt())?.into()) };
        let n = usize::from(take(1)?[0]);
        let from = text(take(n)?)?;
        let n = usize::from(take(1)?[0]);
        let to = text(take(n)?)?;
        let len = take(2)?;
        let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let memo = Some(text(take(n)?)?).filter(|m| !m.is_empty());
        let n = usize::from(take(1)?[0]);
        let key = Some(text(take(n)?)?).filter(|k| !k.is_empty());
        Ok(TransferRecord { id, kind, from, to, amount, fee, memo, time, key, prev, links })
    }

    /// The previous record of `account` in its history list, if `account`
    /// is a party of this record.
    #[must_use]
    pub fn link_of(&self, account: &str) -> Option<u64> {
        if &*self.from == account {
            Some(self.links.from)
        } else if &*self.to == account {
            Some(self.links.to)
        } else if self.fee > 0 && account == TREASURY {
            Some(self.links.fee)
        } else {
            None
        }
    }

    /// The record as the wire shows it, given its own hash.
    #[must_use]
    pub fn view(&self, hash: &[u8; 32]) -> TransferView {
        TransferView {
            id: self.id,
            kind: self.kind,
            from: self.from.to_string(),
            to: self.to.to_string(),
            amount: self.amount,
            fee: self.fee,
            memo: self.memo.as_deref().map(str::to_owned),
            time: self.time,
            key: self.key.as_deref().map(str::to_owned),
            prev: Hash32(self.prev),
            hash: Hash32(*hash),
            from_balance: None,
            to_balance: None,
        }
    }
}

/// Hash of a stored record.
#[must_use]
pub fn record_hash(stored: &[u8]) -> [u8; 32] {
    *blake3::hash(stored).as_bytes()
}

/// Lower-case hex of a hash.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

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
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord").field("user", &self.user).field("role", &self.role).finish_non_exhaustive()
    }
}

named_record!(UserRecord, "user");

/// A two-phase transfer as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// Where a redeem request stands; it is decided once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedeemStatus {
    Pending,
    Accepted,
    Rejected,
}

impl RedeemStatus {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RedeemStatus::Pending => "pending",
            RedeemStatus::Accepted => "accepted",
            RedeemStatus::Rejected => "rejected",
        }
    }
}

/// A redeem request as stored and shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RedeemRecord {
    pub request: u64,
    pub user: String,
    pub account: String,
    pub item: String,
    pub amount: i64,
    pub memo: Option<String>,
    pub status: RedeemStatus,
    pub created: u64,
    pub decided_by: Option<String>,
    pub decided_at: Option<u64>,
    pub note: Option<String>,
    /// The transfer that moved it to `@redeemed` (accepted) or released it (rejected).
    pub settled_by: Option<u64>,
}

named_record!(RedeemRecord, "redeem");

/// Redeem requests, newest first: all of them (optionally of one status),
/// or one user's. At most `limit`, looking at no more than `LIST_SCAN_MAX`.
pub fn redeems(
    db: &Database,
    user: Option<&str>,
    status: Option<RedeemStatus>,
    limit: usize,
) -> Result<Vec<RedeemRecord>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(REDEEMS)?;
    let mut out = Vec::new();
    let mut keep = |r: RedeemRecord| {
        if status.is_none_or(|s| r.status == s) {
            out.push(r);
        }
        out.len() < limit
    };
    match user {
        Some(u) => {
            let index = txn.open_table(USER_REDEEMS)?;
            for row in index.range((u, 0)..=(u, u64::MAX))?.rev().take(LIST_SCAN_MAX) {
                let id = row?.0.value().1;
                if let Some(v) = table.get(id)? {
                    if !keep(RedeemRecord::decode(v.value())?) {
                        break;
                    }
                }
            }
        }
        None => {
            for row in table.iter()?.rev().take(LIST_SCAN_MAX) {
                if !keep(RedeemRecord::decode(row?.1.value())?) {
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// The last record of the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub id: u64,
    pub hash: [u8; 32],
}

impl Head {
    #[must_use]
    pub fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.id.to_be_bytes());
        out[8..].copy_from_slice(&self.hash);
        out
    }
    fn decode(bytes: &[u8]) -> Result<Head, StoreError> {
        if bytes.len() != 40 {
            return Err(StoreError::Corrupt("head".into()));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[..8]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[8..]);
        Ok(Head { id: u64::from_be_bytes(id), hash })
    }
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
/// per commit (README, Performance).
pub fn begin_write(db: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_two_phase_commit(true);
    Ok(txn)
}

/// Opens (or creates) the database and makes sure every table and system
/// account exists.
pub fn open(path: &Path) -> Result<Database, StoreError> {
    let db = Database::builder().set_cache_size(REDB_CACHE_BYTES).create(path)?;
    let txn = begin_write(&db)?;
    migrate_legacy_records(&txn)?;
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
        let mut meta = txn.open_table(META)?;
        if meta.get(HEAD)?.is_none() {
            meta.insert(HEAD, &Head { id: 0, hash: GENESIS }.encode()[..])?;
        }
        let mut accounts = txn.open_table(ACCOUNTS)?;
        let mut balances = txn.open_table(BALANCES)?;
        for (num, id) in (0u32..).zip(SYSTEM_ACCOUNTS) {
            if accounts.get(id)?.is_none() {
                let meta = AccountMeta {
                    num,
                    created: now_ms(),
                    memo: Some("system account".into()),
                    ..AccountMeta::default()
                };
                accounts.insert(id, &meta.encode()[..])?;
                balances.insert(num, (0, 0))?;
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

/// Collects a commit's records into chunks and inserts each full chunk.
#[derive(Default)]
pub struct ChunkWriter {
    first: u64,
    count: usize,
    bytes: Vec<u8>,
}

impl ChunkWriter {
    /// Adds record `id`, which must follow the one added before it.
    pub fn push(
        &mut self,
        chunks: &mut redb::Table<'_, u64, &'static [u8]>,
        id: u64,
        record: &[u8],
    ) -> Result<(), StoreError> {
        if self.count == 0 {
            self.first = id;
        } else if id != self.first + self.count as u64 {
            // Not the next id (cannot happen from the journal): start a new chunk.
            self.flush(chunks)?;
            self.first = id;
        }
        let len = u32::try_from(record.len()).map_err(|_| StoreError::Corrupt(format!("record {id} is too long")))?;
        self.bytes.extend_from_slice(&len.to_be_bytes());
        self.bytes.extend_from_slice(record);
        self.count += 1;
        if self.count == CHUNK_RECORDS_MAX {
            self.flush(chunks)?;
        }
        Ok(())
    }

    /// Inserts the chunk being collected, if any.
    pub fn flush(&mut self, chunks: &mut redb::Table<'_, u64, &'static [u8]>) -> Result<(), StoreError> {
        if self.count > 0 {
            chunks.insert(self.first, &self.bytes[..])?;
            self.bytes.clear();
            self.count = 0;
        }
        Ok(())
    }
}

/// The records of one chunk, in order.
fn chunk_records(value: &[u8]) -> impl Iterator<Item = Result<&[u8], StoreError>> {
    let mut rest = value;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            rest = &[];
            return Some(Err(StoreError::Corrupt("a chunk ends inside a length".into())));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            rest = &[];
            return Some(Err(StoreError::Corrupt("a chunk ends inside a record".into())));
        }
        let (record, tail) = tail.split_at(len);
        rest = tail;
        Some(Ok(record))
    })
}

/// Calls `f` with the stored bytes of record `id`, if there is one.
fn with_record<T>(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
    f: impl FnOnce(&[u8]) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let Some(row) = chunks.range(..=id)?.next_back() else {
        return Ok(None);
    };
    let (first, value) = row?;
    let Ok(index) = usize::try_from(id - first.value()) else {
        return Ok(None);
    };
    if index >= CHUNK_RECORDS_MAX {
        return Ok(None);
    }
    let record = chunk_records(value.value()).nth(index).transpose()?;
    record.map(f).transpose()
}

/// Calls `f(id, record)` for every record from id `from` on, in order, until
/// it returns `false`. The ids are the chunks' (key + position); callers
/// compare them with the ids inside the records.
fn for_each_record(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    from: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let start = match chunks.range(..=from)?.next_back() {
        Some(row) => row?.0.value(),
        None => from,
    };
    for row in chunks.range(start..)? {
        let (first, value) = row?;
        for (id, record) in (first.value()..).zip(chunk_records(value.value())) {
            if id >= from && !f(id, record?)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One account as loaded at start-up.
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

fn read_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let a: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt("meta".into()))?;
    Ok(u64::from_be_bytes(a))
}

fn read_checkpoint(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(META)?;
    let v = meta.get(CHECKPOINT)?;
    v.map_or(Ok(0), |v| read_u64(v.value()))
}

/// What a record does to balances: `(account, change)` for each leg. The
/// one replay rule, used by start-up, `audit` and `list_accounts` alike: a
/// hold and a void move nothing (what is held comes from the holds table,
/// written in the same transactions), every other record moves `amount`
/// out of `from`, `amount - fee` into `to` and `fee` into `@treasury`.
fn legs(r: &TransferRecord) -> Result<[(&str, i64); 3], StoreError> {
    let moved = if matches!(r.kind, Kind::Hold | Kind::Void) { 0 } else { r.amount };
    let out = moved.checked_neg().ok_or_else(|| StoreError::Corrupt(format!("transfer {}: amount", r.id)))?;
    let fee = if moved == 0 { 0 } else { r.fee };
    Ok([(&r.from, out), (&r.to, moved - fee), (TREASURY, fee)])
}

/// Applies one replayed record to the book. Each leg is applied only if the
/// account's balance row does not include it yet (its `last` is older).
fn replay(book: &mut Book, r: &TransferRecord) -> Result<(), StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("replaying transfer {}: {what}", r.id));
    for (i, (account, delta)) in legs(r)?.into_iter().enumerate() {
        // Every record links its two parties; the fee leg only when it moves something.
        if i == 2 && delta == 0 {
            continue;
        }
        let a = *book.get(account).ok_or_else(|| corrupt("unknown account"))?;
        if r.id > a.last {
            let balance = a.balance.checked_add(delta).ok_or_else(|| corrupt("overflow"))?;
            book.set(account, balance);
            book.link_one(account, r.id);
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

fn load_txn(txn: &redb::ReadTransaction, limits: Limits) -> Result<Loaded, StoreError> {
    let head = read_head(txn)?;
    let checkpoint = read_checkpoint(txn)?;
    let rows = txn.open_table(BALANCES)?;
    let accounts_table = txn.open_table(ACCOUNTS)?;
    let mut accounts = Vec::with_capacity(usize::try_from(accounts_table.len()?).unwrap_or(0));
    for row in accounts_table.iter()? {
        let (k, v) = row?;
        let meta = AccountMeta::decode(v.value())?;
        let (balance, last) = rows.get(meta.num)?.map_or((0, 0), |v| v.value());
        accounts.push(LoadedAccount { id: k.value().to_owned(), meta, balance, last, held: 0 });
    }
    if rows.len()? > accounts.len() as u64 {
        return Err(StoreError::Corrupt("balance rows without accounts".into()));
    }
    accounts.sort_by_key(|a| a.meta.num);
    let mut book = Book::empty(limits);
    for (expected, a) in (0u32..).zip(&accounts) {
        if a.meta.num != expected {
            return Err(StoreError::Corrupt(format!("account numbers skip {expected}")));
        }
        let status = if a.meta.deleted.is_some() { Status::Deleted } else { Status::Open };
        book.insert(&a.id, BookAccount::new(a.balance, status, a.last));
    }
    let chunks = txn.open_table(CHUNKS)?;
    let mut prev = match checkpoint {
        0 => GENESIS,
        id => with_record(&chunks, id, |stored| Ok(record_hash(stored)))?
            .ok_or_else(|| StoreError::Corrupt(format!("checkpoint record {id} is missing")))?,
    };
    let mut expected = checkpoint + 1;
    for_each_record(&chunks, checkpoint + 1, |id, stored| {
        let r = TransferRecord::decode(stored)?;
        if r.id != id || r.id != expected || r.prev != prev {
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
    for a in &mut accounts {
        let b = book.get(&a.id).expect("inserted above");
        a.balance = b.balance;
        a.last = b.last;
        a.held = b.held;
    }
    Ok(Loaded { accounts, book, head, expiring })
}

fn read_head(txn: &redb::ReadTransaction) -> Result<Head, StoreError> {
    let meta = txn.open_table(META)?;
    let head = meta.get(HEAD)?.ok_or_else(|| StoreError::Corrupt("no head".into()))?;
    Head::decode(head.value())
}

/// Writes the balance rows of the dirty accounts numbered `nums`, in key order.
pub fn write_rows(txn: &redb::WriteTransaction, book: &mut Book, nums: std::ops::Range<u32>) -> Result<(), StoreError> {
    let mut rows = txn.open_table(BALANCES)?;
    for num in nums {
        if let Some(a) = book.by_num(num).filter(|a| a.dirty) {
            rows.insert(num, (a.balance, a.last))?;
            book.mark_clean(num);
        }
    }
    Ok(())
}

/// Records that every balance row includes all transfers up to `id`.
pub fn write_checkpoint(txn: &redb::WriteTransaction, id: u64) -> Result<(), StoreError> {
    txn.open_table(META)?.insert(CHECKPOINT, &id.to_be_bytes()[..])?;
    Ok(())
}

/// Reads one user.
pub fn get_user(db: &Database, user: &str) -> Result<Option<UserRecord>, StoreError> {
    let txn = db.begin_read()?;
    let users = txn.open_table(USERS)?;
    users.get(user)?.map(|v| UserRecord::decode(v.value())).transpose()
}

/// Reads every user (start-up: the registry of token epochs).
pub fn load_users(db: &Database) -> Result<Vec<UserRecord>, StoreError> {
    let txn = db.begin_read()?;
    let users = txn.open_table(USERS)?;
    let mut out = Vec::new();
    for row in users.iter()? {
        let (_, v) = row?;
        out.push(UserRecord::decode(v.value())?);
    }
    Ok(out)
}

/// Writes one user directly (start-up only, before the journal runs).
pub fn put_user(db: &Database, user: &UserRecord) -> Result<(), StoreError> {
    let txn = begin_write(db)?;
    txn.open_table(USERS)?.insert(user.user.as_str(), &user.encode()[..])?;
    txn.commit()?;
    Ok(())
}

fn view_of(stored: &[u8]) -> Result<TransferView, StoreError> {
    Ok(TransferRecord::decode(stored)?.view(&record_hash(stored)))
}

/// Reads one transfer.
pub fn get_transfer(db: &Database, id: u64) -> Result<Option<TransferView>, StoreError> {
    let txn = db.begin_read()?;
    with_record(&txn.open_table(CHUNKS)?, id, view_of)
}

/// Finds the transfer an idempotency key was first used for.
pub fn lookup_key(db: &Database, from: &str, key: &str) -> Result<Option<TransferView>, StoreError> {
    let txn = db.begin_read()?;
    let keys = txn.open_table(KEYS)?;
    let Some(id) = keys.get((from, key))?.map(|v| v.value()) else {
        return Ok(None);
    };
    let view = with_record(&txn.open_table(CHUNKS)?, id, view_of)?;
    Ok(Some(view.ok_or_else(|| StoreError::Corrupt(format!("key points at missing transfer {id}")))?))
}

/// Owner of an account, if it exists.
pub fn account_meta(db: &Database, account: &str) -> Result<Option<AccountMeta>, StoreError> {
    let txn = db.begin_read()?;
    let a = txn.open_table(ACCOUNTS)?;
    a.get(account)?.map(|v| AccountMeta::decode(v.value())).transpose()
}

/// A page of `account`'s history, newest first, starting at record
/// `start` (the account's last record, or the one before the cursor), and
/// the cursor of the next page.
pub fn history(
    db: &Database,
    account: &str,
    start: u64,
    limit: usize,
) -> Result<(Vec<TransferView>, Option<u64>), StoreError> {
    let txn = db.begin_read()?;
    let chunks = txn.open_table(CHUNKS)?;
    let mut out = Vec::with_capacity(limit.min(1024));
    let mut id = start;
    while id != 0 && out.len() < limit {
        let (view, prev) = with_record(&chunks, id, |stored| {
            let r = TransferRecord::decode(stored)?;
            let prev =
                r.link_of(account).ok_or_else(|| StoreError::Corrupt(format!("transfer {id} is not {account}'s")))?;
            Ok((r.view(&record_hash(stored)), prev))
        })?
        .ok_or_else(|| StoreError::Corrupt(format!("history points at missing transfer {id}")))?;
        out.push(view);
        id = prev;
    }
    let next = if id == 0 { None } else { out.last().map(|t| t.id) };
    Ok((out, next))
}

/// Where the page after cursor `after` starts: the record before `after` in
/// `account`'s list. `None` if `after` is not one of the account's records.
pub fn history_after(db: &Database, account: &str, after: u64) -> Result<Option<u64>, StoreError> {
    let txn = db.begin_read()?;
    let link =
        with_record(&txn.open_table(CHUNKS)?, after, |stored| Ok(TransferRecord::decode(stored)?.link_of(account)))?;
    Ok(link.flatten())
}

/// Filters of `list_accounts`.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub owner: Option<String>,
    pub tag: Option<String>,
    pub balance_min: Option<i64>,
    pub balance_max: Option<i64>,
}

/// Most index entries one `list_accounts` page examines. A selective
/// balance filter can match few accounts; the page then ends early with a
/// `next` cursor, so no single request scans everything.
const LIST_SCAN_MAX: usize = 200_000;

/// Balance changes of the records after the checkpoint, per account, for
/// rows that do not include them yet.
fn tail_deltas(txn: &redb::ReadTransaction) -> Result<std::collections::HashMap<String, Vec<(u64, i64)>>, StoreError> {
    let checkpoint = read_checkpoint(txn)?;
    let chunks = txn.open_table(CHUNKS)?;
    let mut tail: std::collections::HashMap<String, Vec<(u64, i64)>> = std::collections::HashMap::new();
    for_each_record(&chunks, checkpoint + 1, |_, stored| {
        let r = TransferRecord::decode(stored)?;
        for (account, delta) in legs(&r)? {
            if delta != 0 {
                tail.entry(account.to_owned()).or_default().push((r.id, delta));
            }
        }
        Ok(true)
    })?;
    Ok(tail)
}

/// Accounts listed under `key` in an index table of (key, account) pairs,
/// in account order, starting at `after`.
fn index_members(
    txn: &redb::ReadTransaction,
    index: TableDefinition<(&str, &str), ()>,
    key: &str,
    after: &str,
) -> Result<Box<dyn Iterator<Item = Result<String, StoreError>>>, StoreError> {
    let table = txn.open_table(index)?;
    let key = key.to_owned();
    let it = table.range((key.as_str(), after)..)?;
    Ok(Box::new(
        it.map(|r| r.map(|(k, _)| (k.value().0.to_owned(), k.value().1.to_owned())).map_err(StoreError::from))
            .take_while(move |r| r.as_ref().map_or(true, |(k, _)| *k == key))
            .map(|r| r.map(|(_, account)| account)),
    ))
}

/// A page of open accounts in id order, filtered, with balances as of one
/// instant (one read transaction), and the cursor of the next page.
pub fn list_accounts(
    db: &Database,
    f: &ListFilter,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<serde_json::Value>, Option<String>), StoreError> {
    let txn = db.begin_read()?;
    let tail = tail_deltas(&txn)?;
    let rows = txn.open_table(BALANCES)?;
    let accounts = txn.open_table(ACCOUNTS)?;
    let after = after.unwrap_or("");
    // Candidates in id order: from an index when there is one to use.
    let mut candidates: Box<dyn Iterator<Item = Result<String, StoreError>>> = match (&f.owner, &f.tag) {
        (Some(owner), _) => index_members(&txn, OWNERS, owner, after)?,
        (None, Some(tag)) => index_members(&txn, TAGS, tag, after)?,
        (None, None) => {
            Box::new(accounts.range(after..)?.map(|r| r.map(|(k, _)| k.value().to_owned()).map_err(StoreError::from)))
        }
    };
    let mut out = Vec::new();
    let mut scanned = 0usize;
    loop {
        let Some(id) = candidates.next().transpose()? else {
            return Ok((out, None));
        };
        if id == after {
            continue;
        }
        scanned += 1;
        let meta = accounts
            .get(id.as_str())?
            .map(|v| AccountMeta::decode(v.value()))
            .transpose()?
            .ok_or_else(|| StoreError::Corrupt(format!("index names a missing account {id}")))?;
        let wanted_tag = f.tag.as_ref().is_none_or(|t| meta.tags.contains(t));
        if meta.deleted.is_none() && wanted_tag {
            let (mut balance, last) = rows.get(meta.num)?.map_or((0, 0), |v| v.value());
            for (rid, delta) in tail.get(&id).map_or(&[][..], Vec::as_slice) {
                if *rid > last {
                    balance += delta;
                }
            }
            if f.balance_min.is_none_or(|m| balance >= m) && f.balance_max.is_none_or(|m| balance <= m) {
                out.push(serde_json::json!({
                    "account": id.clone(), "owner": meta.owner, "tags": meta.tags, "balance": balance,
                    "created": meta.created, "memo": meta.memo,
                }));
                if out.len() == limit {
                    return Ok((out, Some(id)));
                }
            }
        }
        if scanned >= LIST_SCAN_MAX {
            return Ok((out, Some(id)));
        }
    }
}

/// Copies every table through one read transaction into a new database at
/// `out`: a consistent snapshot taken while the server keeps writing (the
/// live file is never copied). Returns the head the copy ends at.
pub fn backup(db: &Database, out: &Path) -> Result<Head, StoreError> {
    let src = db.begin_read()?;
    let dst = Database::create(out)?;
    let w = begin_write(&dst)?;
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
    copy!(CHUNKS, BALANCES, ACCOUNTS, KEYS, TAGS, OWNERS, USERS, META);
    copy!(HOLDS, OPEN_HOLDS, REDEEMS, USER_REDEEMS);
    w.commit()?;
    read_head(&src)
}

/// In one read transaction (one consistent instant): counts the accounts,
/// sums every balance (rows plus the records after the checkpoint), and
/// re-verifies the hash chain from the first record.
pub fn audit(db: &Database) -> Result<AuditReply, StoreError> {
    let txn = db.begin_read()?;
    let head = read_head(&txn)?;
    let (mut chain_ok, sum, accounts) = match load_txn(&txn, Limits::default()) {
        Ok(l) => (true, l.book.sum(), l.book.len() as u64),
        Err(StoreError::Corrupt(e)) => {
            tracing::error!(error = %e, "audit found a broken journal");
            (false, 0, txn.open_table(ACCOUNTS)?.len()?)
        }
        Err(e) => return Err(e),
    };
    let chunks = txn.open_table(CHUNKS)?;
    let mut prev = GENESIS;
    let mut count = 0u64;
    let walked = for_each_record(&chunks, 1, |id, stored| {
        let ok = TransferRecord::decode(stored).is_ok_and(|r| r.prev == prev && r.id == id && r.id == count + 1);
        if ok {
            prev = record_hash(stored);
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
        head: hex(&head.hash),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = TransferRecord {
            id: 42,
            kind: Kind::Mint,
            from: "@mint".into(),
            to: "alice".into(),
            amount: 100,
            fee: 3,
            memo: Some("héllo".into()),
            time: 1_700_000_000_000,
            key: Some("k1".into()),
            prev: [7; 32],
            links: Links { from: 3, to: 0, fee: 9 },
        };
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(TransferRecord::decode(&out).unwrap(), r);
        assert!(TransferRecord::decode(&out[..out.len() - 1]).is_err());
    }

    /// Appends `n` chained records (@mint -> @redeemed, 1 unit each) after
    /// the head in one transaction, as the journal does (`legacy`: one row
    /// per record, the layout before chunks), and moves the head.
    fn append_chain(db: &Database, n: u64, legacy: bool) {
        let head = read_head(&db.begin_read().unwrap()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut chunks = txn.open_table(CHUNKS).unwrap();
            let mut rows = txn.open_table(LEGACY_TRANSFERS).unwrap();
            let mut pending = ChunkWriter::default();
            let mut prev = head.hash;
            for id in head.id + 1..=head.id + n {
                let r = TransferRecord {
                    id,
                    kind: Kind::Mint,
                    from: "@mint".into(),
                    to: "@redeemed".into(),
                    amount: 1,
                    fee: 0,
                    memo: None,
                    time: 1_700_000_000_000,
                    key: None,
                    prev,
                    links: Links { from: id - 1, to: id - 1, fee: 0 },
                };
                let mut out = Vec::new();
                r.encode(&mut out);
                prev = record_hash(&out);
                if legacy {
                    rows.insert(id, &out[..]).unwrap();
                } else {
                    pending.push(&mut chunks, id, &out).unwrap();
                }
            }
            pending.flush(&mut chunks).unwrap();
            let head = Head { id: head.id + n, hash: prev };
            txn.open_table(META).unwrap().insert(HEAD, &head.encode()[..]).unwrap();
        }
        txn.commit().unwrap();
    }

    fn chunk_keys(db: &Database) -> Vec<u64> {
        let txn = db.begin_read().unwrap();
        let chunks = txn.open_table(CHUNKS).unwrap();
        chunks.iter().unwrap().map(|r| r.unwrap().0.value()).collect()
    }

    /// Appends records `(kind, from, to, amount, fee)` after the head in one
    /// transaction, without moving the checkpoint (as if the journal's
    /// balance-row sweep had not caught up yet).
    fn append_records(db: &Database, records: &[(Kind, &str, &str, i64, i64)]) {
        let head = read_head(&db.begin_read().unwrap()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut chunks = txn.open_table(CHUNKS).unwrap();
            let mut pending = ChunkWriter::default();
            let mut prev = head.hash;
            let mut id = head.id;
            for &(kind, from, to, amount, fee) in records {
                id += 1;
                let r = TransferRecord {
                    id,
                    kind,
                    from: from.into(),
                    to: to.into(),
                    amount,
                    fee,
                    memo: None,
                    time: 1_700_000_000_000,
                    key: None,
                    prev,
                    links: Links { from: 0, to: 0, fee: 0 },
                };
                let mut out = Vec::new();
                r.encode(&mut out);
                prev = record_hash(&out);
                pending.push(&mut chunks, id, &out).unwrap();
            }
            pending.flush(&mut chunks).unwrap();
            let head = Head { id, hash: prev };
            txn.open_table(META).unwrap().insert(HEAD, &head.encode()[..]).unwrap();
        }
        txn.commit().unwrap();
    }

    /// `list_accounts` adds the records after the checkpoint to the stored
    /// rows by the same rule as the replay at start-up: a hold and a void
    /// move nothing. (It used to count them as moves, so balances listed
    /// while the sweep lagged were wrong by every open or voided hold.)
    #[test]
    fn listed_balances_replay_the_tail_as_start_up_does() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.redb")).unwrap();
        append_records(
            &db,
            &[
                (Kind::Mint, "@mint", "@treasury", 100, 0),
                (Kind::Hold, "@treasury", "@redeemed", 30, 0),
                (Kind::Void, "@treasury", "@redeemed", 30, 0),
                (Kind::Hold, "@treasury", "@redeemed", 20, 0),
                (Kind::Post, "@treasury", "@redeemed", 20, 0),
            ],
        );
        let (listed, next) = list_accounts(&db, &ListFilter::default(), None, 10).unwrap();
        assert_eq!(next, None);
        let listed: Vec<(String, i64)> = listed
            .iter()
            .map(|a| (a["account"].as_str().unwrap().to_owned(), a["balance"].as_i64().unwrap()))
            .collect();
        let loaded = load(&db, Limits { min_balance: 0, max_balance: None }).unwrap();
        let replayed: Vec<(String, i64)> = ["@mint", "@redeemed", "@treasury"]
            .iter()
            .map(|id| ((*id).to_owned(), loaded.book.get(id).unwrap().balance))
            .collect();
        assert_eq!(replayed, [("@mint".into(), -100), ("@redeemed".into(), 20), ("@treasury".into(), 80)]);
        assert_eq!(listed, replayed);
    }

    #[test]
    fn records_are_found_in_their_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.redb")).unwrap();
        // Two commits: 100 records (chunks of 64 + 36), then 50 (a new chunk).
        append_chain(&db, 100, false);
        append_chain(&db, 50, false);
        assert_eq!(chunk_keys(&db), vec![1, 65, 101]);
        for id in [1, 2, 64, 65, 66, 100, 101, 150] {
            assert_eq!(get_transfer(&db, id).unwrap().map(|t| t.id), Some(id), "record {id}");
        }
        for id in [0, 151, 1000] {
            assert!(get_transfer(&db, id).unwrap().is_none(), "record {id}");
        }
        let txn = db.begin_read().unwrap();
        let chunks = txn.open_table(CHUNKS).unwrap();
        let mut seen = Vec::new();
        for_each_record(&chunks, 60, |id, stored| {
            assert_eq!(TransferRecord::decode(stored).unwrap().id, id);
            seen.push(id);
            Ok(id < 120)
        })
        .unwrap();
        assert_eq!(seen, (60..=120).collect::<Vec<_>>());
        // A history page walks the links back across chunk boundaries.
        let (page, next) = history(&db, "@redeemed", 150, 90).unwrap();
        assert_eq!(page.iter().map(|t| t.id).collect::<Vec<_>>(), (61..=150).rev().collect::<Vec<_>>());
        assert_eq!(next, Some(61));
        let a = audit(&db).unwrap();
        assert_eq!((a.transfers, a.sum, a.chain_ok), (150, 0, true));
    }

    #[test]
    fn audit_sees_a_changed_or_cut_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.redb")).unwrap();
        append_chain(&db, 100, false);
        let original: Vec<u8> =
            db.begin_read().unwrap().open_table(CHUNKS).unwrap().get(65).unwrap().unwrap().value().to_vec();
        let put = |value: &[u8]| {
            let txn = db.begin_write().unwrap();
            txn.open_table(CHUNKS).unwrap().insert(65, value).unwrap();
            txn.commit().unwrap();
        };
        // One byte of an amount in record 70 (the chunk's sixth record).
        let mut changed = original.clone();
        let mut at = 0;
        for _ in 0..5 {
            at += 4 + u32::from_be_bytes(changed[at..at + 4].try_into().unwrap()) as usize;
        }
        changed[at + 4 + 1 + 8 + 1 + 7] ^= 1;
        put(&changed);
        assert!(!audit(&db).unwrap().chain_ok);
        // The chunk cut inside its last record.
        put(&original[..original.len() - 3]);
        assert!(!audit(&db).unwrap().chain_ok);
        put(&original);
        let a = audit(&db).unwrap();
        assert_eq!((a.transfers, a.chain_ok), (100, true));
    }

    #[test]
    fn records_kept_one_per_row_move_into_chunks_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let db = open(&path).unwrap();
        append_chain(&db, 130, true);
        assert!(chunk_keys(&db).is_empty());
        drop(db);
        let db = open(&path).unwrap();
        assert_eq!(chunk_keys(&db), vec![1, 65, 129]);
        assert!(matches!(
            db.begin_read().unwrap().open_table(LEGACY_TRANSFERS),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
        assert_eq!(get_transfer(&db, 77).unwrap().map(|t| t.amount), Some(1));
        let a = audit(&db).unwrap();
        assert_eq!((a.transfers, a.sum, a.chain_ok), (130, 0, true));
        // New records carry on the migrated chain.
        append_chain(&db, 5, false);
        let a = audit(&db).unwrap();
        assert_eq!((a.transfers, a.chain_ok), (135, true));
    }
}
