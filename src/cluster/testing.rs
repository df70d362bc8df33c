//! For the cluster's unit tests: a state machine in memory that keeps the
//! batches it applied, in order (openraft's storage suite tests a log
//! store together with a state machine).

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership,
};

use super::{Batch, Member, TypeConfig, Verdict};

type Error = StorageError<u64>;

/// What the suite's state machine holds: the batches applied, in order.
#[derive(Default)]
pub struct State {
    pub applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, Member>,
    pub batches: Vec<Batch>,
    snapshot: Option<(SnapshotMeta<u64, Member>, Vec<u8>)>,
    built: u64,
}

#[derive(Clone, Default)]
pub struct Machine(pub Arc<Mutex<State>>);

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

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Verdict>, Error>
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
            out.push(Verdict::Applied);
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
