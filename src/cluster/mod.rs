//! Replication with openraft (ARCHITECTURE.md, "Replication"): the
//! leader's journal decides each batch as a single server does and proposes
//! it as one Raft entry; every member, the leader included, applies the
//! entry once a majority has it on disk.
//!
//! - [`TypeConfig`]: the types openraft is instantiated with;
//! - [`Member`]: a member's two addresses, as `[[cluster.node]]` gives them;
//! - [`log`]: the Raft log, the vote and the committed index in a redb file
//!   of their own, durable before openraft is told so;
//! - [`ledger`]: the state machine, the journal's deterministic apply;
//! - [`net`]: openraft's RPCs between members that prove they hold the
//!   cluster's secret, every frame authenticated;
//! - [`node`]: a member as the server runs it, and who leads;
//! - [`read_index`]: what a read on the leader waits for;
//! - [`quiet`]: openraft's warnings and errors, at most one per source
//!   line every 10 s.

use serde::{Deserialize, Serialize};

pub mod ledger;
pub mod log;
pub mod net;
pub mod node;
pub mod quiet;
pub mod read_index;
#[cfg(test)]
mod testing;

/// One Raft entry's payload: a batch the leader's journal decided,
/// encoded by the journal. Opaque to the log, which only stores it (as
/// MessagePack bin, not an array of integers).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// What applying an entry did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Written (or nothing to write: a blank or membership entry).
    #[default]
    Applied,
    /// A batch decided on another state than the member's head, or one
    /// that does not fit the ledger, skipped by every member alike
    /// (`ledger`): nothing of it was applied anywhere.
    Stale,
}

/// A member of the cluster: where clients reach it and where the other
/// members send it Raft traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub client: String,
    pub raft: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client {} raft {}", self.client, self.raft)
    }
}

openraft::declare_raft_types!(
    /// openraft's types for Tally: node ids are the `[cluster] id`s.
    pub TypeConfig:
        D = Batch,
        R = Verdict,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
