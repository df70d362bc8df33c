//! A member's Raft log, its vote and its committed index, in a redb file
//! of their own (`raft.redb` in the data folder), apart from the ledger's.
//!
//! openraft's storage contracts, and how this file keeps each:
//!
//! - **An entry is on disk before openraft hears it is.** `append` writes
//!   the entries in one redb transaction with immediate durability (an
//!   fsync) and calls the flush callback only after that commit returned.
//!   A member answers a leader's `append` only through that callback, so a
//!   majority's answers mean a majority's disks.
//! - **A vote is durable before `save_vote` returns**: otherwise a member
//!   restarted after voting could vote twice in one term.
//! - **No holes.** `truncate` removes a suffix and `purge` a prefix, each in
//!   one transaction; `purge` records the last purged id in the same
//!   transaction, so an empty log still knows where it ends.
//! - **The committed index survives a restart** (`save_committed`): a
//!   restarted member re-applies every entry it knew committed before it
//!   serves, so it never serves a state older than one it acknowledged
//!   (openraft's issue 1246 and the `save_committed` contract). It is
//!   written without fsync and made durable by the next `append`'s. That
//!   is safe because every apply is durable (`ledger.rs`): openraft raises
//!   the committed index to the last applied one at start-up, so a lagging
//!   index loses nothing applied. Were applies ever made without fsync,
//!   this index would have to be durable again.
//!
//! The redb work runs on tokio's blocking pool: an fsync must not stall a
//! runtime worker that also carries client and member traffic.

// openraft's StorageError is what its storage traits return; this file
// passes it along rather than box it at every step.
#![allow(clippy::result_large_err)]

use std::fmt::{Debug, Display};
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::TypeConfig;

/// Entries by index, each MessagePack-encoded.
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// The vote, the committed index and the last purged id.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";

type Error = StorageError<u64>;

/// The log store; clones share one database (openraft reads through a
/// clone while the original appends).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens (or creates) the log file at `path`.
    pub fn open(path: &Path) -> Result<LogStore, redb::Error> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(ENTRIES)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(LogStore { db: Arc::new(db) })
    }

    /// The log's database, for closing it once Raft has stopped.
    #[must_use]
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, Error> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| failed(ErrorSubject::Store, ErrorVerb::Write, e))?
    }

    /// One durable write transaction.
    async fn write<F>(&self, subject: ErrorSubject<u64>, f: F) -> Result<(), Error>
    where
        F: FnOnce(&WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        self.write_with(Durability::Immediate, subject, f).await
    }

    /// One write transaction of the given durability.
    async fn write_with<F>(&self, durability: Durability, subject: ErrorSubject<u64>, f: F) -> Result<(), Error>
    where
        F: FnOnce(&WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        let fail = subject.clone();
        self.blocking(move |db| {
            let run = || -> Result<(), redb::Error> {
                let mut txn = db.begin_write()?;
                txn.set_durability(durability)?;
                f(&txn)?;
                txn.commit()?;
                Ok(())
            };
            run().map_err(|e| failed(fail, ErrorVerb::Write, e))
        })
        .await
    }

    async fn read_meta<T: DeserializeOwned + Send + 'static>(&self, key: &'static str) -> Result<Option<T>, Error> {
        self.blocking(move |db| {
            let read = || -> Result<Option<Vec<u8>>, redb::Error> {
                let txn = db.begin_read()?;
                let table = txn.open_table(META)?;
                Ok(table.get(key)?.map(|v| v.value().to_vec()))
            };
            let bytes = read().map_err(|e| failed(ErrorSubject::Store, ErrorVerb::Read, e))?;
            bytes.map(|b| decode(&b, ErrorSubject::Store)).transpose()
        })
        .await
    }

    async fn write_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        subject: ErrorSubject<u64>,
    ) -> Result<(), Error> {
        let bytes = encode(value, subject.clone())?;
        self.write(subject, move |txn| {
            txn.open_table(META)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
        .await
    }
}

pub(super) fn failed(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl Display) -> Error {
    StorageIOError::new(subject, verb, AnyError::error(e)).into()
}

/// With field names, so that a later openraft that adds or reorders fields
/// still reads the file.
fn encode<T: Serialize>(value: &T, subject: ErrorSubject<u64>) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(value).map_err(|e| failed(subject, ErrorVerb::Write, e))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], subject: ErrorSubject<u64>) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(|e| failed(subject, ErrorVerb::Read, e))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let bounds: (Bound<u64>, Bound<u64>) = (range.start_bound().cloned(), range.end_bound().cloned());
        self.blocking(move |db| {
            let read = || -> Result<Vec<Vec<u8>>, redb::Error> {
                let txn = db.begin_read()?;
                let table = txn.open_table(ENTRIES)?;
                let mut rows = Vec::new();
                for row in table.range::<u64>(bounds)? {
                    rows.push(row?.1.value().to_vec());
                }
                Ok(rows)
            };
            let rows = read().map_err(|e| failed(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            rows.iter().map(|b| decode(b, ErrorSubject::Logs)).collect()
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        // One read transaction: the purged id and the last entry as of the
        // same moment.
        let (purged, last) = self
            .blocking(|db| {
                type Rows = (Option<Vec<u8>>, Option<Vec<u8>>);
                let read = || -> Result<Rows, redb::Error> {
                    let txn = db.begin_read()?;
                    let purged = txn.open_table(META)?.get(PURGED)?.map(|v| v.value().to_vec());
                    let last = txn.open_table(ENTRIES)?.last()?.map(|(_, v)| v.value().to_vec());
                    Ok((purged, last))
                };
                read().map_err(|e| failed(ErrorSubject::Logs, ErrorVerb::Read, e))
            })
            .await?;
        let purged: Option<LogId<u64>> = purged.map(|b| decode(&b, ErrorSubject::Logs)).transpose()?;
        let last = match last {
            Some(bytes) => Some(decode::<Entry<TypeConfig>>(&bytes, ErrorSubject::Logs)?.log_id),
            None => purged,
        };
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), Error> {
        self.write_meta(VOTE, vote, ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, Error> {
        self.read_meta(VOTE).await
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), Error> {
        // Without fsync: see the header.
        let bytes = encode(&committed, ErrorSubject::Store)?;
        self.write_with(Durability::None, ErrorSubject::Store, move |txn| {
            txn.open_table(META)?.insert(COMMITTED, bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, Error> {
        Ok(self.read_meta::<Option<LogId<u64>>>(COMMITTED).await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode(&e, ErrorSubject::Logs)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let written = self
            .write(ErrorSubject::Logs, move |txn| {
                let mut table = txn.open_table(ENTRIES)?;
                for (index, bytes) in &rows {
                    table.insert(index, bytes.as_slice())?;
                }
                Ok(())
            })
            .await;
        // Only now, after the fsync, may the entries count as persisted.
        callback.log_io_completed(written.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        written
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), Error> {
        self.write(ErrorSubject::Logs, move |txn| {
            let mut table = txn.open_table(ENTRIES)?;
            table.retain_in(log_id.index.., |_, _| false)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), Error> {
        let purged = encode(&log_id, ErrorSubject::Logs)?;
        self.write(ErrorSubject::Logs, move |txn| {
            txn.open_table(META)?.insert(PURGED, purged.as_slice())?;
            txn.open_table(ENTRIES)?.retain_in(..=log_id.index, |_, _| false)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests;
