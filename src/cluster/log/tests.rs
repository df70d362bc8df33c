//! openraft's own storage suite against [`LogStore`] (paired with a small
//! in-memory state machine, since the suite tests the two together), and
//! what must hold across a reopen of the file.

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StoredMembership, Vote,
};

use super::LogStore;
use crate::cluster::{Batch, Member, TypeConfig};

type Error = StorageError<u64>;

/// What the suite's state machine holds: the batches applied, in order.
#[derive(Default)]
struct State {
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, Member>,
    batches: Vec<Batch>,
    snapshot: Option<(SnapshotMeta<u64, Member>, Vec<u8>)>,
    built: u64,
}

#[derive(Clone, Default)]
struct Machine(Arc<Mutex<State>>);

impl RaftSnapshotBuilder<TypeConfig> for Machine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let mut s = self.0.lock().unwrap();
        s.built += 1;
        let meta = SnapshotMeta {
            last_log_id: s.applied,
            last_membership: s.membership.clone(),
            snapshot_id: format!("{}-{}", s.applied.map_or(0, |l| l.index), s.built),
        };
        let data = rmp_serde::to_vec(&s.batches).unwrap();
        s.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for Machine {
    type SnapshotBuilder = Machine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, Member>), Error> {
        let s = self.0.lock().unwrap();
        Ok((s.applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut s = self.0.lock().unwrap();
        let mut out = Vec::new();
        for e in entries {
            s.applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(b) => s.batches.push(b),
                EntryPayload::Membership(m) => s.membership = StoredMembership::new(Some(e.log_id), m),
            }
            out.push(());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Machine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let data = snapshot.into_inner();
        let mut s = self.0.lock().unwrap();
        s.batches = rmp_serde::from_slice(&data).unwrap();
        s.applied = meta.last_log_id;
        s.membership = meta.last_membership.clone();
        s.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let s = self.0.lock().unwrap();
        Ok(s.snapshot.clone().map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

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
