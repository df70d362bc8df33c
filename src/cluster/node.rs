//! A member's Raft side as the server runs it: the log, the ledger state
//! machine, the member port, forming the cluster, and a [`View`] of who
//! leads for `hello` and `not_leader`.
//!
//! Forming: with empty data folders, the member with the lowest id
//! initializes the cluster with every `[[cluster.node]]`, once (openraft
//! refuses a second initialization, and a restarted member finds its
//! membership in its log); the others wait to be contacted. An election
//! needs a majority, so the cluster serves once a majority is up.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::storage::RaftLogStorage;
use openraft::{Raft, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ledger::LedgerMachine;
use super::log::LogStore;
use super::net::{self, Network, Secret};
use super::read_index::{ReadIndex, Refused};
use super::{Member, TypeConfig};
use crate::config::ClusterConfig;
use crate::error::{ApiError, ErrorCode};
use crate::ledger::Limits;
use crate::limits::{
    CLUSTER_ELECTION_MAX_MS, CLUSTER_ELECTION_MIN_MS, CLUSTER_ENTRIES_PER_MESSAGE, CLUSTER_HEARTBEAT_MS,
    CLUSTER_READ_LEASE_MS, CLUSTER_SNAPSHOT_CHUNK_TIMEOUT_MS, CLUSTER_STOP_DRAIN_MS,
};
use crate::store::Store;

/// Who this member is and who leads, as it last saw it.
pub struct View {
    pub node: u64,
    state: Mutex<Seen>,
    /// Raft's last metrics report: when it came, and how long before it a
    /// majority had last acknowledged this member as leader.
    quorum: Mutex<(std::time::Instant, Option<u64>)>,
}

/// One sighting of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// `leader`, `follower`, `candidate` or `learner`.
    pub role: &'static str,
    /// The leader's id and client address, when known.
    pub leader: Option<(u64, String)>,
    pub term: u64,
}

impl View {
    #[must_use]
    pub fn seen(&self) -> Seen {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// `not_leader` with the leader's client address, unless it is this
    /// member (still catching up, or stepping down): then none.
    #[must_use]
    pub fn not_leader(&self) -> ApiError {
        let leader = self.seen().leader.filter(|(id, _)| *id != self.node).map(|(_, client)| client);
        crate::journal::not_leader(leader)
    }
}

/// What one run of the server's ledger knows about the cluster.
pub struct Serving {
    pub view: Arc<View>,
    /// The member's Raft, for membership changes.
    pub raft: Raft<TypeConfig>,
    /// The term this run leads in, if it was started as the leader's
    /// (with the cluster's applied state loaded).
    pub leading: Option<u64>,
    /// Cancelled when the leader's journal stops proposing.
    pub deposed: CancellationToken,
    /// The applied ledger: what a stale read is answered from.
    pub machine: LedgerMachine,
    /// Stale reads running now, on this member.
    pub stale_reads: Arc<tokio::sync::Semaphore>,
    /// What a read on the leader waits for.
    pub reads: Arc<ReadIndex>,
}

impl Serving {
    /// Whether this run takes requests that read or change the ledger.
    #[must_use]
    pub fn serves(&self) -> bool {
        self.leading.is_some() && !self.deposed.is_cancelled()
    }

    /// Why a leader must not answer now, if it must not: no majority has
    /// acknowledged it within [`CLUSTER_READ_LEASE_MS`], shorter than the
    /// shortest election timeout (openraft's members refuse to vote for
    /// anyone else that long after hearing from their leader), so while a
    /// leader holds the lease no other member can have been elected and
    /// what it holds is current. The age of the acknowledgement counts
    /// from Raft's last report plus the time since: a Raft stalled on its
    /// disk reports nothing, and its last figure must not stay fresh.
    #[must_use]
    pub fn lease_lost(&self) -> Option<ApiError> {
        let (reported, ms) = self.view.quorum.lock().map(|q| *q).unwrap_or((std::time::Instant::now(), None));
        let age = ms.map(|ms| ms.saturating_add(u64::try_from(reported.elapsed().as_millis()).unwrap_or(u64::MAX)));
        let held = age.is_some_and(|ms| ms <= CLUSTER_READ_LEASE_MS);
        // Read in place: a clone of the metrics would allocate per request.
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let alone = held || m.membership_config.membership().voter_ids().all(|id| id == self.view.node);
        (!alone && !held).then(|| {
            ApiError::new(
                ErrorCode::Unavailable,
                "no majority of the cluster has answered this leader lately; nothing was read or changed",
            )
        })
    }

    /// Waits until the read index confirms, after a read that arrived when
    /// `ticket` was taken, that this member still leads in this run's term.
    pub async fn confirm_read(&self, ticket: u64) -> Result<(), ApiError> {
        let Some(term) = self.leading else { return Err(self.view.not_leader()) };
        match self.reads.confirm(ticket, term).await {
            // Deposed while it waited: Raft may still lead this term, but
            // this run's ledger no longer answers for the cluster.
            Ok(()) if self.deposed.is_cancelled() => Err(self.view.not_leader()),
            Ok(()) => Ok(()),
            Err(Refused::NotLeader) => Err(self.view.not_leader()),
            Err(Refused::NoQuorum) => Err(ApiError::new(
                ErrorCode::Unavailable,
                "no majority of the cluster confirmed this leader for the read; nothing was read",
            )),
        }
    }
}

/// A started member.
pub struct Node {
    pub raft: Raft<TypeConfig>,
    pub view: Arc<View>,
    pub me: u64,
    /// The applied ledger, which stale reads are answered from.
    pub machine: LedgerMachine,
    /// Stale reads running now ([`crate::limits::CLUSTER_STALE_READS_MAX`]).
    pub stale_reads: Arc<tokio::sync::Semaphore>,
    /// The read index reads on the leader wait for.
    pub reads: Arc<ReadIndex>,
    /// The log's database (`raft.redb`), closed after Raft stops.
    log: Arc<redb::Database>,
    /// Dropped once Raft's state-machine worker has quit.
    worker: std::sync::Weak<()>,
    stop: CancellationToken,
}

impl Node {
    /// Opens the log (`DATA/raft.redb`) and the state machine over `store`,
    /// starts Raft and the member port, and forms the cluster if this is
    /// the member that does.
    pub async fn start(c: &ClusterConfig, data: &Path, store: Arc<Store>, limits: Limits) -> Result<Node, String> {
        let secret = Secret::new(&c.secret)?;
        let mut log = LogStore::open(&data.join("raft.redb")).map_err(|e| format!("raft log: {e}"))?;
        let log_db = log.database();
        let machine = LedgerMachine::open(store, limits).map_err(|e| format!("ledger: {e}"))?;
        ledger_reaches_log(&mut log, &machine).await?;
        let config = openraft::Config {
            cluster_name: "tally".into(),
            heartbeat_interval: CLUSTER_HEARTBEAT_MS,
            election_timeout_min: CLUSTER_ELECTION_MIN_MS,
            election_timeout_max: CLUSTER_ELECTION_MAX_MS,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(c.snapshot_every),
            max_in_snapshot_log_to_keep: c.snapshot_every / 10,
            // Installing a snapshot writes, syncs and checks a database
            // file: far longer than openraft's default 200 ms per chunk.
            install_snapshot_timeout: CLUSTER_SNAPSHOT_CHUNK_TIMEOUT_MS,
            // A full entry is a batch of up to `commit_batch_max` records
            // (a few MB at most): a few per message keep each frame far
            // below the member port's 64 MiB.
            max_payload_entries: CLUSTER_ENTRIES_PER_MESSAGE,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| e.to_string())?);
        let mut network = Network::new(c.id, secret.clone());
        if let Ok(at) = c.raft_listen.parse::<std::net::SocketAddr>() {
            network = network.from_address(at.ip());
        }
        let (for_raft, worker) = machine.for_raft();
        let raft = Raft::new(c.id, config, network, log, for_raft).await.map_err(|e| format!("raft: {e}"))?;
        let listener = TcpListener::bind(&c.raft_listen)
            .await
            .map_err(|e| format!("cannot listen on cluster.raft_listen {}: {e}", c.raft_listen))?;
        let stop = CancellationToken::new();
        tokio::spawn(net::serve(listener, raft.clone(), c.id, secret, stop.clone()));
        let members: BTreeMap<u64, Member> =
            c.node.iter().map(|n| (n.id, Member { client: n.client.clone(), raft: n.raft.clone() })).collect();
        let first = members.keys().next().copied();
        if first == Some(c.id)
            && !raft.is_initialized().await.map_err(|e| e.to_string())?
            && !formed_elsewhere(&members, c.id).await
        {
            match raft.initialize(members.clone()).await {
                Ok(()) => tracing::info!(members = members.len(), "formed the cluster"),
                // Another start of this member did it already.
                Err(e) => tracing::info!(error = %e, "the cluster was formed before"),
            }
        }
        let view = Arc::new(View {
            node: c.id,
            state: Mutex::new(Seen::default()),
            quorum: Mutex::new((std::time::Instant::now(), None)),
        });
        tokio::spawn(watch(raft.clone(), view.clone(), stop.clone()));
        let stale_reads = Arc::new(tokio::sync::Semaphore::new(crate::limits::CLUSTER_STALE_READS_MAX));
        let reads = ReadIndex::of(raft.clone());
        Ok(Node { raft, view, me: c.id, machine, stale_reads, reads, log: log_db, worker, stop })
    }

    /// Whether this member leads now, and in which term.
    #[must_use]
    pub fn leading(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        (m.state == ServerState::Leader && m.current_leader == Some(self.me)).then_some(m.current_term)
    }

    /// Waits until this member, leading, has applied everything the
    /// cluster committed (openraft's read index: a majority confirms the
    /// leader) and everything in its own log, bounded by `within`.
    ///
    /// The second wait is for entries a ledger run before this one
    /// proposed and gave up on (`unknown_outcome`): they stay in the
    /// leader's log and may commit at any later moment. A run that loaded
    /// its ledger before such an entry applied would never see it, and its
    /// reads, confirmed by the read index, would miss a committed write
    /// (one a retry with the same key reports as done). A leader never
    /// drops entries of its own term, and until it serves nothing else is
    /// appended but openraft's own, so once the last one is applied the
    /// ledger loaded next holds every entry that can commit in this term.
    pub async fn caught_up(&self, within: Duration) -> bool {
        let waits = async {
            self.raft.ensure_linearizable().await.ok()?;
            let last = self.raft.metrics().borrow().last_log_index;
            self.raft.wait(None).applied_index_at_least(last, "the leader's own log").await.ok()
        };
        matches!(tokio::time::timeout(within, waits).await, Ok(Some(_)))
    }

    /// Stops the member port and Raft, lets the state-machine worker run
    /// what it has queued (at most [`CLUSTER_STOP_DRAIN_MS`]), then closes
    /// the state machine ([`LedgerMachine::close`]): nothing applies after
    /// this returns. Gives back the log's database, for the caller to close
    /// once the tasks Raft leaves behind have let go of it, and the
    /// machine, whose book the caller may choose not to free; `None` if the
    /// machine could not be closed (then the process exits the usual way,
    /// dropping everything).
    pub async fn stop(self) -> Option<(Arc<redb::Database>, LedgerMachine)> {
        self.stop.cancel();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not stop cleanly");
        }
        // The core is gone, so the worker's queue ends: it quits after
        // running what is in it.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(CLUSTER_STOP_DRAIN_MS);
        while self.worker.strong_count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                // openraft then logs the refusal of what is left as an error.
                tracing::warn!("the state machine had not run what Raft queued in time: the log keeps the rest");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let machine = self.machine.clone();
        match tokio::task::spawn_blocking(move || machine.close()).await {
            Ok(Ok(())) => Some((self.log, self.machine)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the state machine did not close");
                None
            }
            Err(_) => None,
        }
    }
}

/// Refuses a ledger that has not applied entries its own log no longer
/// holds, with what to do about it; openraft would fail to re-apply them
/// with a bare storage error. It happens when a snapshot install did not
/// end (openraft 0.9 purges the log up to a snapshot as it queues the
/// install, so a crash in between leaves the ledger behind) or when an
/// older ledger file was put back into the folder.
async fn ledger_reaches_log(log: &mut LogStore, machine: &LedgerMachine) -> Result<(), String> {
    let purged = log.get_log_state().await.map_err(|e| format!("raft log: {e}"))?.last_purged_log_id;
    let applied = machine.applied().map_err(|e| format!("ledger: {e}"))?;
    reaches(applied.map(|a| a.index), purged.map(|p| p.index))
}

/// [`ledger_reaches_log`]'s rule: the entries after `applied` (none
/// applied yet: from entry 0 on) must still be in the log, which holds
/// only those after `purged`.
fn reaches(applied: Option<u64>, purged: Option<u64>) -> Result<(), String> {
    match purged {
        Some(p) if applied < Some(p) => Err(format!(
            "this member's ledger has applied the Raft log up to entry {}, but its log holds entries only after \
             {p}: it cannot catch up from it (a snapshot install did not end, or an older ledger file was put \
             back). Move this member's data folder aside and start it with an empty one: it comes back through \
             a snapshot from the leader",
            applied.map_or_else(|| "none".to_owned(), |a| a.to_string()),
        )),
        _ => Ok(()),
    }
}

/// Whether another member already belongs to a formed cluster (it has
/// seen a term): then this one, though it has the lowest id, lost its data
/// and must wait to be brought back, not form a second cluster.
async fn formed_elsewhere(members: &BTreeMap<u64, Member>, me: u64) -> bool {
    for m in members.iter().filter(|(id, _)| **id != me).map(|(_, m)| m) {
        let asked = tokio::time::timeout(Duration::from_secs(1), async {
            let c = crate::client::Client::connect(m.client.as_str()).await.ok()?;
            c.call("hello", serde_json::json!({})).await.ok()
        });
        if asked.await.ok().flatten().is_some_and(|h| h["term"].as_u64().is_some_and(|t| t > 0)) {
            tracing::warn!(member = %m, "another member belongs to a formed cluster: waiting to be brought back");
            return true;
        }
    }
    false
}

/// Keeps `view` up to date with Raft's metrics until `stop`.
async fn watch(raft: Raft<TypeConfig>, view: Arc<View>, stop: CancellationToken) {
    let mut rx = raft.metrics();
    loop {
        let seen = {
            let m = rx.borrow_and_update();
            let role = match m.state {
                ServerState::Leader => "leader",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Follower | ServerState::Shutdown => "follower",
            };
            let leader = m.current_leader.map(|id| {
                let client = m.membership_config.membership().get_node(&id).map(|n| n.client.clone());
                (id, client.unwrap_or_default())
            });
            if let Ok(mut q) = view.quorum.lock() {
                *q = (std::time::Instant::now(), m.millis_since_quorum_ack);
            }
            Seen { role, leader, term: m.current_term }
        };
        if let Ok(mut s) = view.state.lock() {
            *s = seen;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reaches;

    #[test]
    fn a_ledger_must_have_applied_what_its_log_no_longer_holds() {
        // Nothing purged: the whole log is there to apply.
        assert!(reaches(None, None).is_ok());
        assert!(reaches(Some(7), None).is_ok());
        // Purged up to what was applied, or less: the rest follows on.
        assert!(reaches(Some(7), Some(7)).is_ok());
        assert!(reaches(Some(7), Some(3)).is_ok());
        // Entry 0 is an entry: a ledger that applied none is behind a log
        // purged up to it.
        assert!(reaches(None, Some(0))
            .unwrap_err()
            .contains("up to entry none, but its log holds entries only after 0"));
        assert!(reaches(Some(7), Some(8))
            .unwrap_err()
            .contains("up to entry 7, but its log holds entries only after 8"));
    }
}
