//! openraft's own storage suite against [`LogStore`] (paired with a small
//! in-memory state machine, since the suite tests the two together), and
//! what must hold across a reopen of the file.

use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, StorageError, Vote};

use super::LogStore;
use crate::cluster::testing::Machine;
use crate::cluster::{Batch, TypeConfig};

type Error = StorageError<u64>;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, Machine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, Machine), Error> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(&dir.path().join("raft.redb")).unwrap();
        Ok((dir, log, Machine::default()))
    }
}

#[test]
fn passes_openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn entry(term: u64, index: u64, payload: &[u8]) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Batch(payload.to_vec())),
    }
}

/// Appends entries through openraft's flush callback, as the engine does.
async fn append(log: &mut LogStore, entries: Vec<Entry<TypeConfig>>) {
    use openraft::storage::RaftLogStorageExt;
    log.blocking_append(entries).await.unwrap();
}

#[tokio::test]
async fn what_was_written_is_there_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let vote = Vote::new_committed(3, 2);
    {
        let mut log = LogStore::open(&path).unwrap();
        append(&mut log, (1..=5).map(|i| entry(3, i, &[i as u8; 3])).collect()).await;
        log.save_vote(&vote).await.unwrap();
        log.save_committed(Some(LogId::new(CommittedLeaderId::new(3, 1), 4))).await.unwrap();
        log.purge(LogId::new(CommittedLeaderId::new(3, 1), 2)).await.unwrap();
        log.truncate(LogId::new(CommittedLeaderId::new(3, 1), 5)).await.unwrap();
    }
    let mut log = LogStore::open(&path).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(LogId::new(CommittedLeaderId::new(3, 1), 4)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(LogId::new(CommittedLeaderId::new(3, 1), 2)));
    assert_eq!(state.last_log_id, Some(LogId::new(CommittedLeaderId::new(3, 1), 4)));
    let entries = log.try_get_log_entries(0..10).await.unwrap();
    assert_eq!(entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(entries[0].payload, EntryPayload::Normal(Batch(vec![3; 3])));
}

#[tokio::test]
async fn a_log_purged_to_its_end_still_knows_where_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(&dir.path().join("raft.redb")).unwrap();
    append(&mut log, (1..=3).map(|i| entry(2, i, b"x")).collect()).await;
    log.purge(LogId::new(CommittedLeaderId::new(2, 1), 3)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(LogId::new(CommittedLeaderId::new(2, 1), 3)));
    assert!(log.try_get_log_entries(0..).await.unwrap().is_empty());
}

#[test]
fn a_batch_is_stored_as_msgpack_bin() {
    let bytes = rmp_serde::to_vec(&Batch(vec![7; 40])).unwrap();
    // bin 8 (0xc4), length 40, the bytes: not an array of 40 integers.
    assert_eq!(&bytes[..2], &[0xc4, 40]);
    assert_eq!(bytes.len(), 42);
}
