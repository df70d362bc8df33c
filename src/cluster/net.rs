//! Member-to-member traffic: openraft's three RPCs over TCP, between
//! members that prove they hold the cluster's secret.
//!
//! Whoever can send a member `append_entries` or `vote` can rewrite the
//! ledger, so nothing is read from a peer that has not proved it holds the
//! secret, and nothing a peer sends can be altered on the way:
//!
//! - the listener sends 32 random bytes; the dialer sends 32 of its own, its
//!   member id, the id it means to reach, and a proof: the connection's key
//!   is the keyed BLAKE3 of all that under a key derived from the secret,
//!   and the proof is a tag under that key. The listener refuses a
//!   connection meant for another member, checks the proof, and only then
//!   proves itself the same way; so a stranger who connects learns nothing
//!   it could test guesses of the secret against;
//! - every frame is `len u32 | body | tag`, where the tag is the keyed
//!   BLAKE3 of (direction, frame number, body) under the connection's key.
//!   A frame with a wrong tag (a tampered, replayed or reflected frame)
//!   ends the connection before its body is decoded;
//! - a request and its answer use one connection, taken out of the peer's
//!   hands for the exchange: a call openraft gives up on closes its
//!   connection, so a late answer is never read as the next call's.
//!
//! The traffic is not encrypted: members should talk over a private
//! network. Every read has a byte bound ([`FRAME_BYTES_MAX`], read as the
//! bytes arrive) and a time bound; connections still in their handshake
//! have a budget of their own, overall and per address, so strangers
//! cannot crowd out members.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::Raft;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Member, TypeConfig};
use crate::limits::CLUSTER_READ_LEASE_MS;

/// The largest frame a member accepts: openraft sends at most
/// `max_payload_entries` entries per `append_entries` and snapshots in
/// chunks of `snapshot_max_chunk_size`, both configured well below it.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// The shortest secret accepted. A stranger who poses as a member's
/// address receives a dialer's proof and could test guesses against it
/// offline, so the secret must be beyond guessing: 32 random bytes,
/// e.g. `openssl rand -base64 32`.
pub const SECRET_BYTES_MIN: usize = 32;
/// The whole handshake's deadline.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections in their handshake, in all and from one address.
const HANDSHAKES_MAX: usize = 32;
const HANDSHAKES_PER_ADDRESS_MAX: usize = 8;
/// Proven connections a member serves at once.
const CONNECTIONS_MAX: usize = 64;
/// A served connection with no request for this long is closed; a peer
/// reconnects rather than reuse a connection idle for [`PEER_IDLE_MAX`].
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const PEER_IDLE_MAX: Duration = Duration::from_secs(30);
/// How long writing an answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster's shared secret, as a BLAKE3 key.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn new(secret: &str) -> Result<Secret, String> {
        if secret.len() < SECRET_BYTES_MIN {
            return Err(format!("the cluster's secret must be at least {SECRET_BYTES_MIN} bytes"));
        }
        Ok(Secret(blake3::derive_key("tally cluster member traffic v1", secret.as_bytes())))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Serialize, Deserialize)]
enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// One authenticated connection, either end.
struct Channel {
    stream: TcpStream,
    key: [u8; 32],
    /// Direction bytes: what this end writes and what it reads.
    mine: u8,
    theirs: u8,
    sent: u64,
    received: u64,
}

const DIALER: u8 = b'd';
const LISTENER: u8 = b'l';

fn refused(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why.to_owned())
}

fn connection_key(secret: &Secret, dialers: &[u8; 32], listeners: &[u8; 32], from: u64, to: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&secret.0);
    h.update(dialers);
    h.update(listeners);
    h.update(&from.to_be_bytes());
    h.update(&to.to_be_bytes());
    *h.finalize().as_bytes()
}

fn proof(key: &[u8; 32], direction: u8) -> blake3::Hash {
    blake3::keyed_hash(key, &[direction])
}

fn nonce() -> io::Result<[u8; 32]> {
    crate::random::bytes().map_err(|_| io::Error::other("no randomness"))
}

impl Channel {
    /// The dialer's handshake: member `from` reaching member `to`.
    async fn dial(mut stream: TcpStream, secret: &Secret, from: u64, to: u64) -> io::Result<Channel> {
        stream.set_nodelay(true)?;
        let mine = nonce()?;
        let handshake = async {
            let mut theirs = [0u8; 32];
            stream.read_exact(&mut theirs).await?;
            let key = connection_key(secret, &mine, &theirs, from, to);
            let mut hello = Vec::with_capacity(32 + 16 + 32);
            hello.extend_from_slice(&mine);
            hello.extend_from_slice(&from.to_be_bytes());
            hello.extend_from_slice(&to.to_be_bytes());
            hello.extend_from_slice(proof(&key, DIALER).as_bytes());
            stream.write_all(&hello).await?;
            let mut claimed = [0u8; 32];
            stream.read_exact(&mut claimed).await?;
            // blake3::Hash compares in constant time.
            if proof(&key, LISTENER) != blake3::Hash::from_bytes(claimed) {
                return Err(refused("the member does not hold the cluster's secret"));
            }
            Ok(key)
        };
        let key = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
        Ok(Channel { stream, key, mine: DIALER, theirs: LISTENER, sent: 0, received: 0 })
    }

    /// The listener's handshake, as member `me`.
    async fn accept(mut stream: TcpStream, secret: &Secret, me: u64) -> io::Result<Channel> {
        stream.set_nodelay(true)?;
        let mine = nonce()?;
        let handshake = async {
            stream.write_all(&mine).await?;
            let mut hello = [0u8; 32 + 16 + 32];
            stream.read_exact(&mut hello).await?;
            let theirs: [u8; 32] = hello[..32].try_into().expect("32 bytes");
            let from = u64::from_be_bytes(hello[32..40].try_into().expect("8 bytes"));
            let to = u64::from_be_bytes(hello[40..48].try_into().expect("8 bytes"));
            if to != me {
                return Err(refused("the connection is meant for another member"));
            }
            let key = connection_key(secret, &theirs, &mine, from, to);
            let claimed: [u8; 32] = hello[48..].try_into().expect("32 bytes");
            if proof(&key, DIALER) != blake3::Hash::from_bytes(claimed) {
                return Err(refused("the peer does not hold the cluster's secret"));
            }
            stream.write_all(proof(&key, LISTENER).as_bytes()).await?;
            Ok(key)
        };
        let key = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
        Ok(Channel { stream, key, mine: LISTENER, theirs: DIALER, sent: 0, received: 0 })
    }

    fn tag(&self, direction: u8, number: u64, body: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&[direction]);
        h.update(&number.to_be_bytes());
        h.update(body);
        h.finalize()
    }

    async fn send<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        let body = rmp_serde::to_vec(value).map_err(io::Error::other)?;
        if body.len() > FRAME_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "frame too large"));
        }
        let tag = self.tag(self.mine, self.sent, &body);
        self.sent += 1;
        let mut frame = Vec::with_capacity(4 + body.len() + 32);
        frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(&body);
        frame.extend_from_slice(tag.as_bytes());
        self.stream.write_all(&frame).await
    }

    /// An answer, which the peer must take within [`WRITE_TIMEOUT`].
    async fn reply<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        tokio::time::timeout(WRITE_TIMEOUT, self.send(value))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading"))?
    }

    async fn receive<T: DeserializeOwned>(&mut self) -> io::Result<T> {
        let len = self.stream.read_u32().await? as usize;
        if len > FRAME_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too large"));
        }
        // Grown as the bytes arrive, not set aside on the length's word.
        let mut body = Vec::new();
        (&mut self.stream).take(len as u64 + 32).read_to_end(&mut body).await?;
        if body.len() != len + 32 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the frame was cut short"));
        }
        let tag: [u8; 32] = body.split_off(len).try_into().map_err(|_| io::Error::other("short tag"))?;
        if self.tag(self.theirs, self.received, &body) != blake3::Hash::from_bytes(tag) {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "a frame failed authentication"));
        }
        self.received += 1;
        rmp_serde::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Connections still in their handshake, per source address.
#[derive(Default)]
struct Handshaking(Mutex<HashMap<IpAddr, usize>>);

impl Handshaking {
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<HandshakeSlot> {
        let mut m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(ip).or_default();
        if *n >= HANDSHAKES_PER_ADDRESS_MAX {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot { of: self.clone(), ip })
    }
}

struct HandshakeSlot {
    of: Arc<Handshaking>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut m = self.of.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Serves the other members' RPCs to `raft` (member `me`) until `stop` is
/// cancelled.
///
/// No vote is cast until [`CLUSTER_READ_LEASE_MS`] after it starts. A
/// leader serves reads for that long after a majority acknowledged it
/// (`node::Serving::lease_lost`), counting on its members not to elect
/// another meanwhile; openraft's members keep that promise by refusing
/// votes soon after hearing from a leader, but a member restarted at once
/// has forgotten it heard, and its vote could elect a second leader while
/// the first still serves. Its last acknowledgement came before this
/// process started, so waiting out a lease from here keeps the promise.
pub async fn serve(listener: TcpListener, raft: Raft<TypeConfig>, me: u64, secret: Secret, stop: CancellationToken) {
    let votes_from = tokio::time::Instant::now() + Duration::from_millis(CLUSTER_READ_LEASE_MS);
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
    let per_address = Arc::new(Handshaking::default());
    let proven = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "member listener could not accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Beyond the budgets the connection is closed at once.
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else { continue };
        let Some(slot) = per_address.enter(peer.ip()) else { continue };
        let (raft, secret, stop, proven) = (raft.clone(), secret.clone(), stop.clone(), proven.clone());
        tokio::spawn(async move {
            let served = async {
                let ch = Channel::accept(stream, &secret, me).await;
                drop((handshake, slot));
                let ch = ch?;
                let Ok(_permit) = proven.try_acquire_owned() else { return Ok(()) };
                answer(ch, &raft, votes_from).await
            };
            tokio::select! {
                () = stop.cancelled() => {}
                r = served => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "member connection ended");
                    }
                }
            }
        });
    }
}

async fn answer(mut ch: Channel, raft: &Raft<TypeConfig>, votes_from: tokio::time::Instant) -> io::Result<()> {
    loop {
        let rpc: Rpc = match tokio::time::timeout(IDLE_TIMEOUT, ch.receive()).await {
            Err(_) => return Ok(()),
            Ok(r) => r?,
        };
        match rpc {
            Rpc::Append(r) => ch.reply(&raft.append_entries(r).await).await?,
            Rpc::Vote(r) => {
                tokio::time::sleep_until(votes_from).await;
                ch.reply(&raft.vote(r).await).await?;
            }
            Rpc::Snapshot(r) => ch.reply(&raft.install_snapshot(r).await).await?,
        }
    }
}

/// Makes a [`Peer`] per member openraft talks to, for member `me`.
#[derive(Clone)]
pub struct Network {
    me: u64,
    secret: Secret,
    /// The address member connections leave from, if this member listens
    /// on one address (not 0.0.0.0): a firewall then tells members apart
    /// by address, whichever way a connection goes.
    bind: Option<IpAddr>,
    /// This member's connections to the others: the idle ones, and how
    /// many are open.
    pool: Pool,
}

/// A member as connections to it are counted: its id and address (a
/// connection proves itself to one id at one address).
type Target = (u64, String);

/// Connections to each member: openraft makes a client for each round of
/// the read index, and each would otherwise dial and prove itself anew;
/// and since it lets a round's heartbeats run on after the round is
/// decided, a member slow to answer would otherwise be sent a new
/// connection per round, past its own limit on connections (which would
/// then refuse the leader's replication and other members' votes too).
#[derive(Clone, Default)]
struct Pool(Arc<Mutex<HashMap<Target, Conns>>>);

#[derive(Default)]
struct Conns {
    /// Connections no [`Peer`] uses now, at most [`IDLE_KEPT`].
    idle: Vec<(Channel, Instant, Open)>,
    /// Connections open, idle or in use.
    open: usize,
}

/// Idle connections kept to one member.
const IDLE_KEPT: usize = 2;
/// Connections open to one member at once: one for replication, the rest
/// for read-index heartbeats and votes. A member serves
/// [`CONNECTIONS_MAX`] in all.
const PEER_CONNECTIONS_MAX: usize = 8;

/// One open connection's place in its member's count, given back on drop.
struct Open {
    pool: Pool,
    target: Target,
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Ok(mut pool) = self.pool.0.lock() {
            if let Some(c) = pool.get_mut(&self.target) {
                c.open -= 1;
                if c.open == 0 {
                    pool.remove(&self.target);
                }
            }
        }
    }
}

impl Pool {
    /// An idle connection to `target`, if one is fresh enough.
    fn take(&self, target: &Target) -> Option<(Channel, Instant, Open)> {
        let mut pool = self.0.lock().ok()?;
        let conns = pool.get_mut(target)?;
        // Stale ones are dropped after the lock is let go (their `Open`
        // takes it again).
        let mut stale = Vec::new();
        let found = loop {
            match conns.idle.pop() {
                Some(c) if c.1.elapsed() < PEER_IDLE_MAX => break Some(c),
                Some(c) => stale.push(c),
                None => break None,
            }
        };
        drop(pool);
        drop(stale);
        found
    }

    /// A place for a new connection to `target`, unless it has
    /// [`PEER_CONNECTIONS_MAX`] open.
    fn open(&self, target: &Target) -> Option<Open> {
        let mut pool = self.0.lock().ok()?;
        let conns = pool.entry(target.clone()).or_default();
        if conns.open >= PEER_CONNECTIONS_MAX {
            return None;
        }
        conns.open += 1;
        Some(Open { pool: self.clone(), target: target.clone() })
    }

    /// Keeps `c` for the next client, if there is room; else closes it.
    fn give_back(&self, target: &Target, c: (Channel, Instant, Open)) {
        let Ok(mut pool) = self.0.lock() else { return };
        let Some(conns) = pool.get_mut(target) else { return };
        if conns.idle.len() < IDLE_KEPT {
            conns.idle.push(c);
            return;
        }
        drop(pool);
        drop(c);
    }
}

impl Network {
    pub fn new(me: u64, secret: Secret) -> Network {
        Network { me, secret, bind: None, pool: Pool::default() }
    }

    /// The same, its connections leaving from `ip` (unless unspecified).
    #[must_use]
    pub fn from_address(mut self, ip: IpAddr) -> Network {
        self.bind = (!ip.is_unspecified()).then_some(ip);
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Member) -> Peer {
        Peer {
            me: self.me,
            target,
            addr: node.raft.clone(),
            secret: self.secret.clone(),
            bind: self.bind,
            channel: None,
            pool: self.pool.clone(),
        }
    }
}

/// openraft's connection to one member; it reconnects after any failure.
pub struct Peer {
    me: u64,
    target: u64,
    addr: String,
    secret: Secret,
    bind: Option<IpAddr>,
    /// The connection between calls, and when it was last used.
    channel: Option<(Channel, Instant, Open)>,
    pool: Pool,
}

impl Drop for Peer {
    /// Leaves a working connection for the next client to this member.
    fn drop(&mut self) {
        if let Some(c) = self.channel.take() {
            self.pool.give_back(&(self.target, self.addr.clone()), c);
        }
    }
}

type Failure<E> = RPCError<u64, Member, RaftError<u64, E>>;

impl Peer {
    async fn call<R, E>(&mut self, rpc: Rpc, option: &RPCOption) -> Result<R, Failure<E>>
    where
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        // Within openraft's own deadline for the call, so that it is this
        // end that gives up (and drops the connection) first.
        let ttl = option.soft_ttl();
        let exchange = async {
            // The member's key is built only when the pool is asked: a
            // replication stream keeps its own connection call after call.
            let target = || (self.target, self.addr.clone());
            let reused = match self.channel.take() {
                Some(c) if c.1.elapsed() < PEER_IDLE_MAX => Some(c),
                _ => self.pool.take(&target()),
            };
            let (mut ch, _, open) = match reused {
                Some(c) => c,
                // Not reached: openraft backs off before trying again.
                None => {
                    let Some(open) = self.pool.open(&target()) else {
                        let e = io::Error::other(format!("{PEER_CONNECTIONS_MAX} connections to this member are open"));
                        return Err(Failure::<E>::Unreachable(Unreachable::new(&e)));
                    };
                    let ch = self.connect().await.map_err(|e| Failure::<E>::Unreachable(Unreachable::new(&e)))?;
                    (ch, Instant::now(), open)
                }
            };
            let answer = async {
                ch.send(&rpc).await?;
                ch.receive::<Result<R, RaftError<u64, E>>>().await
            };
            let answer = answer.await.map_err(|e| Failure::<E>::Network(NetworkError::new(&e)))?;
            // Only a connection whose every request was answered is kept.
            self.channel = Some((ch, Instant::now(), open));
            Ok::<_, Failure<E>>(answer)
        };
        let answer = match tokio::time::timeout(ttl, exchange).await {
            Ok(a) => a?,
            Err(_) => {
                let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {ttl:?}"));
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn connect(&self) -> io::Result<Channel> {
        let addr: SocketAddr = tokio::net::lookup_host(&self.addr)
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        let stream = match self.bind {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await?
            }
        };
        Channel::dial(stream, &self.secret, self.me, self.target).await
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, Failure<openraft::error::Infallible>> {
        self.call(Rpc::Append(rpc), &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, Failure<InstallSnapshotError>> {
        self.call(Rpc::Snapshot(rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, Failure<openraft::error::Infallible>> {
        self.call(Rpc::Vote(rpc), &option).await
    }
}

#[cfg(test)]
mod tests;
