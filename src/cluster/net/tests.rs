//! Three members in one process, each with its own log file, talking over
//! real TCP on loopback: they elect a leader, replicate batches in the same
//! order, elect another when the leader stops, bring a wiped member back
//! through a snapshot, and refuse a stranger.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{Config, Raft, SnapshotPolicy, Vote};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{serve, Network, Secret};
use crate::cluster::log::LogStore;
use crate::cluster::testing::Machine;
use crate::cluster::{Batch, Member, TypeConfig};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

struct Node {
    raft: Raft<TypeConfig>,
    machine: Machine,
    stop: CancellationToken,
}

struct Cluster {
    _dir: tempfile::TempDir,
    nodes: BTreeMap<u64, Node>,
    members: BTreeMap<u64, Member>,
}

/// Quick elections, and a snapshot every 10 entries after which the log
/// is purged, so that a member far enough behind must install one.
fn config() -> Arc<Config> {
    let c = Config {
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(10),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..Default::default()
    };
    Arc::new(c.validate().unwrap())
}

async fn start(id: u64, log: &Path, listener: TcpListener, secret: &str) -> Node {
    let log = LogStore::open(log).unwrap();
    let machine = Machine::default();
    let raft = Raft::new(id, config(), Network::new(Secret::new(secret)), log, machine.clone()).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, raft.clone(), Secret::new(secret), stop.clone()));
    Node { raft, machine, stop }
}

async fn cluster(secret: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = BTreeMap::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        members.insert(id, Member { client: String::new(), raft: l.local_addr().unwrap().to_string() });
        listeners.insert(id, l);
    }
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        nodes.insert(id, start(id, &dir.path().join(format!("raft-{id}.redb")), listener, secret).await);
    }
    nodes[&1].raft.initialize(members.clone()).await.unwrap();
    Cluster { _dir: dir, nodes, members }
}

impl Cluster {
    async fn leader(&self, among: &BTreeSet<u64>) -> u64 {
        let first = *among.first().unwrap();
        let m = self.nodes[&first]
            .raft
            .wait(WAIT)
            .metrics(|m| m.current_leader.is_some_and(|l| among.contains(&l)), "a leader")
            .await
            .unwrap();
        m.current_leader.unwrap()
    }

    async fn write(&self, leader: u64, range: std::ops::Range<u8>) -> u64 {
        let mut last = 0;
        for i in range {
            last = self.nodes[&leader].raft.client_write(Batch(vec![i])).await.unwrap().log_id.index;
        }
        last
    }

    async fn stop(&self, id: u64) {
        self.nodes[&id].stop.cancel();
        self.nodes[&id].raft.shutdown().await.unwrap();
    }

    fn batches(&self, id: u64) -> Vec<Batch> {
        self.nodes[&id].machine.0.lock().unwrap().batches.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_in_one_order_and_survive_the_leaders_loss() {
    let c = cluster("the cluster's secret").await;
    let all: BTreeSet<u64> = c.nodes.keys().copied().collect();
    let leader = c.leader(&all).await;
    let last = c.write(leader, 0..20).await;
    for id in &all {
        c.nodes[id].raft.wait(WAIT).applied_index_at_least(Some(last), "caught up").await.unwrap();
    }
    let want: Vec<Batch> = (0..20u8).map(|i| Batch(vec![i])).collect();
    for id in &all {
        assert_eq!(c.batches(*id), want, "member {id}");
    }

    // The leader stops (its server and its Raft): the other two elect one
    // of themselves and go on.
    c.stop(leader).await;
    let rest: BTreeSet<u64> = all.iter().copied().filter(|&id| id != leader).collect();
    let next = c.leader(&rest).await;
    assert_ne!(next, leader);
    let last = c.write(next, 20..30).await;
    let want: Vec<Batch> = (0..30u8).map(|i| Batch(vec![i])).collect();
    for id in &rest {
        c.nodes[id].raft.wait(WAIT).applied_index_at_least(Some(last), "caught up").await.unwrap();
        assert_eq!(c.batches(*id), want, "member {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_secret_is_not_heard() {
    let c = cluster("the cluster's secret").await;
    let all: BTreeSet<u64> = c.nodes.keys().copied().collect();
    let leader = c.leader(&all).await;
    let term = c.nodes[&leader].raft.metrics().borrow().current_term;
    let target = *all.iter().find(|&&id| id != leader).unwrap();
    // A stranger asks a follower for its vote in a far later term, which a
    // member would grant (and so depose the leader).
    let mut stranger = Network::new(Secret::new("a guess")).new_client(target, &c.members[&target]).await;
    let option = RPCOption::new(Duration::from_secs(5));
    let ask = VoteRequest { vote: Vote::new(term + 100, 9), last_log_id: None };
    match stranger.vote(ask, option.clone()).await {
        Err(RPCError::Network(_)) => {}
        other => panic!("a stranger's vote request was answered: {other:?}"),
    }
    // The follower's vote is still the leader's, in the same term: asked by
    // a member (with the secret) to vote for another in that term, it
    // refuses and says whom it voted for. Had the stranger been heard, the
    // term would be 100 later.
    let mut member = Network::new(Secret::new("the cluster's secret")).new_client(target, &c.members[&target]).await;
    let answer = member.vote(VoteRequest { vote: Vote::new(term, 9), last_log_id: None }, option).await.unwrap();
    assert!(!answer.vote_granted);
    assert_eq!((answer.vote.leader_id().term, answer.vote.leader_id().voted_for()), (term, Some(leader)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_catches_up_through_a_snapshot() {
    let mut c = cluster("the cluster's secret").await;
    let all: BTreeSet<u64> = c.nodes.keys().copied().collect();
    let leader = c.leader(&all).await;
    let wiped = *all.iter().find(|&&id| id != leader).unwrap();
    let last = c.write(leader, 0..5).await;
    c.nodes[&wiped].raft.wait(WAIT).applied_index_at_least(Some(last), "caught up").await.unwrap();
    c.stop(wiped).await;
    // While it is away the others go on, snapshot, and purge their logs
    // past everything it has.
    let last = c.write(leader, 5..45).await;
    let m = c.nodes[&leader].raft.wait(WAIT).metrics(|m| m.purged.is_some_and(|p| p.index > 10), "purged").await;
    let purged = m.unwrap().purged.unwrap().index;
    // It comes back with an empty log and an empty state.
    let listener = TcpListener::bind(&c.members[&wiped].raft).await.unwrap();
    let fresh = c._dir.path().join(format!("raft-{wiped}-wiped.redb"));
    c.nodes.insert(wiped, start(wiped, &fresh, listener, "the cluster's secret").await);
    let m = c.nodes[&wiped].raft.wait(WAIT).applied_index_at_least(Some(last), "caught up").await.unwrap();
    assert!(m.snapshot.is_some_and(|s| s.index >= purged), "installed no snapshot: {m:?}");
    let want: Vec<Batch> = (0..45u8).map(|i| Batch(vec![i])).collect();
    assert_eq!(c.batches(wiped), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_is_cut_off_before_it_can_announce_a_frame() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = cluster("the cluster's secret").await;
    let mut s = tokio::net::TcpStream::connect(&c.members[&1].raft).await.unwrap();
    let mut nonce = [0u8; 32];
    s.read_exact(&mut nonce).await.unwrap();
    // Its nonce, then 32 bytes that, read as a frame, announce 60 MiB: a
    // member that took them for a frame would set that much aside and wait.
    let mut announce = [0u8; 32];
    announce[..4].copy_from_slice(&(60u32 << 20).to_be_bytes());
    s.write_all(&[7u8; 32]).await.unwrap();
    s.write_all(&announce).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    // The member's own proof (32 bytes), then the end of the connection.
    assert!(matches!(closed, Ok(Ok(32)) | Ok(Err(_))), "still open after a wrong proof: {closed:?}");
}
