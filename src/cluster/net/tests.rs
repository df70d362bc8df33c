//! Three members in one process, each with its own log file, talking over
//! real TCP on loopback: they elect a leader, replicate batches in the same
//! order, elect another when the leader stops, bring a wiped member back
//! through a snapshot, and refuse a stranger.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::{Config, Raft, SnapshotPolicy, Vote};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{serve, Channel, Network, Rpc, Secret};
use crate::cluster::log::LogStore;
use crate::cluster::testing::Machine;
use crate::cluster::{Batch, Member, TypeConfig};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));
const SECRET: &str = "the cluster's secret, 32 bytes or more";

struct Node {
    raft: Raft<TypeConfig>,
    machine: Machine,
    stop: CancellationToken,
    served: tokio::task::JoinHandle<()>,
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
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
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
    let secret = Secret::new(secret).unwrap();
    let raft = Raft::new(id, config(), Network::new(id, secret.clone()), log, machine.clone()).await.unwrap();
    let stop = CancellationToken::new();
    let served = tokio::spawn(serve(listener, raft.clone(), id, secret, stop.clone()));
    Node { raft, machine, stop, served }
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

    /// Writes one batch per number, on `leader`; the last one's log index.
    async fn write(&self, leader: u64, range: std::ops::Range<u8>) -> u64 {
        let mut last = 0;
        for i in range {
            last = self.nodes[&leader].raft.client_write(Batch(vec![i])).await.unwrap().log_id.index;
        }
        last
    }

    /// Stops a member: its Raft, and its server (which lets go of its port).
    async fn stop(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        node.stop.cancel();
        node.raft.shutdown().await.unwrap();
        (&mut node.served).await.unwrap();
    }

    fn batches(&self, id: u64) -> Vec<Batch> {
        self.nodes[&id].machine.0.lock().unwrap().batches.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_in_one_order_and_survive_the_leaders_loss() {
    let mut c = cluster(SECRET).await;
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
async fn a_peer_without_the_secret_or_with_the_wrong_member_is_refused() {
    let c = cluster(SECRET).await;
    let option = RPCOption::new(Duration::from_secs(5));
    let ask = VoteRequest { vote: Vote::new(100, 9), last_log_id: None };
    let guess = Secret::new("a guess that is long enough to be taken").unwrap();
    let mut stranger = Network::new(9, guess).new_client(2, &c.members[&2]).await;
    // The member hangs up without proving itself: the stranger gets nothing
    // keyed to test guesses of the secret against.
    let refusal = stranger.vote(ask.clone(), option.clone()).await.unwrap_err();
    assert!(matches!(&refusal, RPCError::Unreachable(e) if e.to_string().contains("early eof")), "{refusal}");
    // A member holding the secret but reaching member 3 at member 2's
    // address (a stale or rerouted address) is refused too.
    let secret = Secret::new(SECRET).unwrap();
    let mut misrouted = Network::new(1, secret.clone()).new_client(3, &c.members[&2]).await;
    let refusal = misrouted.vote(ask.clone(), option.clone()).await.unwrap_err();
    assert!(matches!(refusal, RPCError::Unreachable(_)), "{refusal}");
    // The same request, rightly addressed, is heard (and answered).
    let mut member = Network::new(1, secret).new_client(2, &c.members[&2]).await;
    member.vote(ask, option).await.unwrap();
}

#[test]
fn a_short_secret_is_refused() {
    assert!(Secret::new("hunter2").is_err());
    assert!(Secret::new(&"x".repeat(31)).is_err());
    assert!(Secret::new(&"x".repeat(32)).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_catches_up_through_a_snapshot() {
    let mut c = cluster(SECRET).await;
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
    c.nodes.insert(wiped, start(wiped, &fresh, listener, SECRET).await);
    let m = c.nodes[&wiped].raft.wait(WAIT).applied_index_at_least(Some(last), "caught up").await.unwrap();
    assert!(m.snapshot.is_some_and(|s| s.index >= purged), "installed no snapshot: {m:?}");
    let want: Vec<Batch> = (0..45u8).map(|i| Batch(vec![i])).collect();
    assert_eq!(c.batches(wiped), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_is_cut_off_before_it_can_announce_a_frame_and_learns_nothing_keyed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = cluster(SECRET).await;
    let mut s = tokio::net::TcpStream::connect(&c.members[&1].raft).await.unwrap();
    let mut nonce = [0u8; 32];
    s.read_exact(&mut nonce).await.unwrap();
    // A hello (its nonce, ids 9 and 1, a made-up proof), then bytes that,
    // read as a frame, announce 60 MiB: a member that took them for a frame
    // would wait for them.
    let mut hello = vec![7u8; 32];
    hello.extend_from_slice(&9u64.to_be_bytes());
    hello.extend_from_slice(&1u64.to_be_bytes());
    hello.extend_from_slice(&[7u8; 32]);
    hello.extend_from_slice(&(60u32 << 20).to_be_bytes());
    s.write_all(&hello).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    // Nothing more (no proof of the member's to test guesses against), and
    // the connection closed.
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "after a wrong proof: {closed:?} {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_stalling_handshakes_do_not_crowd_out_members() {
    let c = cluster(SECRET).await;
    // Idle connections from one address, far more than its budget: they
    // never finish a handshake.
    let mut idle = Vec::new();
    for _ in 0..80 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.7:0".parse().unwrap()).unwrap();
        idle.push(socket.connect(c.members[&2].raft.parse().unwrap()).await.unwrap());
    }
    // A member (from 127.0.0.1) is still heard at once.
    let mut member = Network::new(1, Secret::new(SECRET).unwrap()).new_client(2, &c.members[&2]).await;
    let ask = VoteRequest { vote: Vote::new(100, 1), last_log_id: None };
    member.vote(ask, RPCOption::new(Duration::from_secs(1))).await.unwrap();
    drop(idle);
}

#[allow(clippy::result_large_err)] // openraft's answer type, as a member sends it
fn vote_answer(r: &VoteRequest<u64>) -> Result<VoteResponse<u64>, RaftError<u64>> {
    Ok(VoteResponse { vote: r.vote, vote_granted: false, last_log_id: None })
}

/// Answers every vote request on `ch` at once, with the vote asked about.
async fn answer_votes(mut ch: Channel) {
    while let Ok(Rpc::Vote(r)) = ch.receive::<Rpc>().await {
        if ch.send(&vote_answer(&r)).await.is_err() {
            return;
        }
    }
}

/// Member 2, slow once: the first request it gets is answered only when
/// `release` fires; everything after at once.
async fn slow_member(
    listener: TcpListener,
    secret: Secret,
    arrived: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
) {
    let (stream, _) = listener.accept().await.unwrap();
    let mut first = Channel::accept(stream, &secret, 2).await.unwrap();
    let Ok(Rpc::Vote(r)) = first.receive::<Rpc>().await else { panic!("a vote request") };
    arrived.send(()).unwrap();
    release.await.unwrap();
    // The asker may have closed this connection by now.
    if first.send(&vote_answer(&r)).await.is_ok() {
        tokio::spawn(answer_votes(first));
    }
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let ch = Channel::accept(stream, &secret, 2).await.unwrap();
        tokio::spawn(answer_votes(ch));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_to_a_call_given_up_on_is_never_taken_for_the_next_ones() {
    let secret = Secret::new(SECRET).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let member = Member { client: String::new(), raft: listener.local_addr().unwrap().to_string() };
    let (arrived_tx, arrived) = oneshot::channel();
    let (release, release_rx) = oneshot::channel();
    tokio::spawn(slow_member(listener, secret.clone(), arrived_tx, release_rx));
    let mut peer = Network::new(1, secret).new_client(2, &member).await;
    let option = RPCOption::new(Duration::from_secs(5));
    let ask = |term| VoteRequest { vote: Vote::new(term, 1), last_log_id: None };
    // openraft gives up on the first call once its request is out, as its
    // own timeout around a call does.
    tokio::select! {
        r = peer.vote(ask(1), option.clone()) => panic!("answered before the member was let go: {r:?}"),
        r = arrived => r.unwrap(),
    }
    release.send(()).unwrap();
    let answer = peer.vote(ask(2), option).await.unwrap();
    assert_eq!(answer.vote.leader_id().term, 2, "the answer to the call given up on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_and_leave_under_load_and_keep_one_order() {
    let mut c = cluster(SECRET).await;
    let first: BTreeSet<u64> = c.nodes.keys().copied().collect();
    let leader = c.leader(&first).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fourth = Member { client: String::new(), raft: listener.local_addr().unwrap().to_string() };
    let node = start(4, &c._dir.path().join("raft-4.redb"), listener, SECRET).await;
    c.nodes.insert(4, node);
    // One writer on the leader the whole time; `written` counts its
    // acknowledged batches.
    let raft = c.nodes[&leader].raft.clone();
    let stop = CancellationToken::new();
    let (count, mut written) = tokio::sync::watch::channel(0u32);
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut n = 0u32;
            while !stop.is_cancelled() {
                raft.client_write(Batch(n.to_be_bytes().to_vec())).await.unwrap();
                n += 1;
                count.send_replace(n);
            }
            n
        }
    });
    written.wait_for(|&n| n >= 10).await.unwrap();
    let l = &c.nodes[&leader].raft;
    l.add_learner(4, fourth, true).await.unwrap();
    l.change_membership(BTreeSet::from([1, 2, 3, 4]), false).await.unwrap();
    let removed = *first.iter().find(|&&id| id != leader).unwrap();
    let voters: BTreeSet<u64> = (1..=4).filter(|&id| id != removed).collect();
    l.change_membership(voters.clone(), false).await.unwrap();
    let at_change = *written.borrow();
    written.wait_for(|&n| n >= at_change + 10).await.unwrap();
    stop.cancel();
    let n = writer.await.unwrap();
    let last = c.nodes[&leader].raft.client_write(Batch(b"last".to_vec())).await.unwrap().log_id.index;
    let mut want: Vec<Batch> = (0..n).map(|i| Batch(i.to_be_bytes().to_vec())).collect();
    want.push(Batch(b"last".to_vec()));
    for id in &voters {
        c.nodes[id].raft.wait(WAIT).applied_index_at_least(Some(last), "caught up").await.unwrap();
        assert_eq!(c.batches(*id), want, "member {id}");
    }
    for id in &voters {
        c.nodes[id].raft.wait(WAIT).voter_ids(voters.clone(), "the new voters").await.unwrap();
    }
}

/// A member just started casts no vote before a read lease has passed
/// (see `serve`): a leader may still count on its acknowledgement from
/// before a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_just_started_votes_only_after_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let before_start = std::time::Instant::now();
    let mut node = start(2, &dir.path().join("raft.redb"), listener, SECRET).await;
    let secret = Secret::new(SECRET).unwrap();
    let to = Member { client: "127.0.0.1:1".into(), raft: addr };
    let mut member = Network::new(1, secret).new_client(2, &to).await;
    let ask = VoteRequest { vote: Vote::new(100, 1), last_log_id: None };
    let answer = member.vote(ask, RPCOption::new(Duration::from_secs(5))).await.unwrap();
    assert!(answer.vote_granted, "{answer:?}");
    let lease = Duration::from_millis(crate::limits::CLUSTER_READ_LEASE_MS);
    assert!(before_start.elapsed() >= lease, "voted {:?} after starting", before_start.elapsed());
    node.stop.cancel();
    node.raft.shutdown().await.unwrap();
    let _ = (&mut node.served).await;
}

/// Member 2, counting the connections it accepts; it answers votes, or
/// (`answers` false) proves itself and then never answers.
async fn counted_member(answers: bool) -> (Secret, Member, Arc<std::sync::atomic::AtomicUsize>) {
    let secret = Secret::new(SECRET).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let member = Member { client: String::new(), raft: listener.local_addr().unwrap().to_string() };
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn({
        let (secret, accepted) = (secret.clone(), accepted.clone());
        async move {
            let mut held = Vec::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let ch = Channel::accept(stream, &secret, 2).await.unwrap();
                if answers {
                    tokio::spawn(answer_votes(ch));
                } else {
                    held.push(ch);
                }
            }
        }
    });
    (secret, member, accepted)
}

/// openraft makes a client for every round of the read index: a new
/// client to a member takes up a connection an earlier one left, rather
/// than dial and prove itself again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_made_one_after_another_share_one_connection() {
    let (secret, member, accepted) = counted_member(true).await;
    let mut network = Network::new(1, secret);
    let option = RPCOption::new(Duration::from_secs(5));
    for term in 1..=5 {
        let mut peer = network.new_client(2, &member).await;
        let answer = peer.vote(VoteRequest { vote: Vote::new(term, 1), last_log_id: None }, option.clone()).await;
        assert_eq!(answer.unwrap().vote.leader_id().term, term);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Two clients at once need two connections; both are kept after.
    let (mut a, mut b) = (network.new_client(2, &member).await, network.new_client(2, &member).await);
    let ask = |term| VoteRequest { vote: Vote::new(term, 1), last_log_id: None };
    let (x, y) = tokio::join!(a.vote(ask(6), option.clone()), b.vote(ask(7), option.clone()));
    assert_eq!((x.unwrap().vote.leader_id().term, y.unwrap().vote.leader_id().term), (6, 7));
    drop((a, b));
    let (mut a, mut b) = (network.new_client(2, &member).await, network.new_client(2, &member).await);
    let (x, y) = tokio::join!(a.vote(ask(8), option.clone()), b.vote(ask(9), option.clone()));
    assert_eq!((x.unwrap().vote.leader_id().term, y.unwrap().vote.leader_id().term), (8, 9));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// A member that proves itself and then never answers: openraft lets a
/// read round's heartbeats run on, so clients to it pile up; past
/// `PEER_CONNECTIONS_MAX` a client gives up at once instead of dialing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_does_not_answer_is_sent_a_bounded_number_of_connections() {
    let (secret, member, accepted) = counted_member(false).await;
    let mut network = Network::new(1, secret);
    let option = RPCOption::new(Duration::from_secs(3));
    let mut calls = Vec::new();
    for term in 0..12 {
        let mut peer = network.new_client(2, &member).await;
        let option = option.clone();
        calls.push(tokio::spawn(async move {
            peer.vote(VoteRequest { vote: Vote::new(term, 1), last_log_id: None }, option).await
        }));
    }
    let (mut refused, mut timed_out) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Err(RPCError::Unreachable(_)) => refused += 1,
            Err(RPCError::Network(_)) => timed_out += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((timed_out, refused), (super::PEER_CONNECTIONS_MAX, 12 - super::PEER_CONNECTIONS_MAX));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), super::PEER_CONNECTIONS_MAX);
    // Connections given up on are closed and counted out: the next client dials.
    let mut peer = network.new_client(2, &member).await;
    let option = RPCOption::new(Duration::from_millis(200));
    let e = peer.vote(VoteRequest { vote: Vote::new(20, 1), last_log_id: None }, option).await.unwrap_err();
    assert!(matches!(e, RPCError::Network(_)), "{e:?}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), super::PEER_CONNECTIONS_MAX + 1);
}
