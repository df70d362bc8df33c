//! Member-to-member traffic: openraft's three RPCs over TCP, between
//! members that prove they hold the cluster's secret.
//!
//! Whoever can send a member `append_entries` or `vote` can rewrite the
//! ledger, so nothing is read from a peer that has not proved it holds the
//! secret, and nothing a peer sends can be altered on the way:
//!
//! - each end sends 32 random bytes; the connection's key is the keyed
//!   BLAKE3 of both under a key derived from the secret, and each end
//!   proves it has that key before any frame is read;
//! - every frame is `len u32 | body | tag`, where the tag is the keyed
//!   BLAKE3 of (direction, frame number, body) under the connection's key.
//!   A frame with a wrong tag (a stranger, a tampered or replayed frame)
//!   ends the connection before its body is decoded.
//!
//! The traffic is not encrypted: members should talk over a private network.
//! Every read has a byte bound ([`FRAME_BYTES_MAX`]) and a time bound, and
//! a member serves at most [`CONNECTIONS_MAX`] connections at once.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Member, TypeConfig};

/// The largest frame a member accepts: openraft sends at most
/// `max_payload_entries` entries per `append_entries` and snapshots in
/// chunks of `snapshot_max_chunk_size`, both configured well below it.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// How long the handshake and an idle wait for the next request may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections a member serves at once (each handshake takes at most
/// [`HANDSHAKE_TIMEOUT`]).
const CONNECTIONS_MAX: usize = 64;

/// The cluster's shared secret, as a BLAKE3 key.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn new(secret: &str) -> Secret {
        Secret(blake3::derive_key("tally cluster member traffic v1", secret.as_bytes()))
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

impl Channel {
    /// The handshake; `dialer` is the end that connected.
    async fn open(mut stream: TcpStream, secret: &Secret, dialer: bool) -> io::Result<Channel> {
        stream.set_nodelay(true)?;
        let nonce: [u8; 32] = crate::random::bytes().map_err(|_| io::Error::other("no randomness"))?;
        let theirs = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            stream.write_all(&nonce).await?;
            let mut theirs = [0u8; 32];
            stream.read_exact(&mut theirs).await?;
            Ok::<_, io::Error>(theirs)
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
        let (dialers, listeners) = if dialer { (nonce, theirs) } else { (theirs, nonce) };
        let mut both = [0u8; 64];
        both[..32].copy_from_slice(&dialers);
        both[32..].copy_from_slice(&listeners);
        let key = *blake3::keyed_hash(&secret.0, &both).as_bytes();
        let (mine, theirs) = if dialer { (b'd', b'l') } else { (b'l', b'd') };
        // Each end proves it holds the secret before either reads a frame,
        // so a stranger never gets as far as a length it could make us
        // allocate.
        let proof = |direction: u8| blake3::keyed_hash(&key, &[direction]);
        let claimed = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            stream.write_all(proof(mine).as_bytes()).await?;
            let mut claimed = [0u8; 32];
            stream.read_exact(&mut claimed).await?;
            Ok::<_, io::Error>(claimed)
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
        // blake3::Hash compares in constant time.
        if proof(theirs) != blake3::Hash::from_bytes(claimed) {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the peer does not hold the cluster's secret"));
        }
        Ok(Channel { stream, key, mine, theirs, sent: 0, received: 0 })
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

    async fn receive<T: DeserializeOwned>(&mut self) -> io::Result<T> {
        let len = self.stream.read_u32().await? as usize;
        if len > FRAME_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too large"));
        }
        let mut body = vec![0u8; len + 32];
        self.stream.read_exact(&mut body).await?;
        let tag: [u8; 32] = body.split_off(len).try_into().map_err(|_| io::Error::other("short tag"))?;
        // blake3::Hash compares in constant time.
        if self.tag(self.theirs, self.received, &body) != blake3::Hash::from_bytes(tag) {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "a frame failed authentication"));
        }
        self.received += 1;
        rmp_serde::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Serves the other members' RPCs to `raft` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, raft: Raft<TypeConfig>, secret: Secret, stop: CancellationToken) {
    let open = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else { continue };
        // Beyond the bound the connection is closed at once: members keep
        // one connection to each other, so only strangers are turned away.
        let Ok(permit) = open.clone().try_acquire_owned() else { continue };
        let (raft, secret, stop) = (raft.clone(), secret.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = stop.cancelled() => {}
                r = answer(stream, &raft, &secret) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "member connection ended");
                    }
                }
            }
        });
    }
}

async fn answer(stream: TcpStream, raft: &Raft<TypeConfig>, secret: &Secret) -> io::Result<()> {
    let mut ch = Channel::open(stream, secret, false).await?;
    loop {
        let rpc: Rpc = match tokio::time::timeout(IDLE_TIMEOUT, ch.receive()).await {
            Err(_) => return Ok(()),
            Ok(r) => r?,
        };
        match rpc {
            Rpc::Append(r) => ch.send(&raft.append_entries(r).await).await?,
            Rpc::Vote(r) => ch.send(&raft.vote(r).await).await?,
            Rpc::Snapshot(r) => ch.send(&raft.install_snapshot(r).await).await?,
        }
    }
}

/// Makes a [`Peer`] per member openraft talks to.
#[derive(Clone)]
pub struct Network {
    secret: Secret,
}

impl Network {
    pub fn new(secret: Secret) -> Network {
        Network { secret }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Member) -> Peer {
        Peer { target, addr: node.raft.clone(), secret: self.secret.clone(), channel: None }
    }
}

/// openraft's connection to one member; it reconnects after any failure.
pub struct Peer {
    target: u64,
    addr: String,
    secret: Secret,
    channel: Option<Channel>,
}

type Failure<E> = RPCError<u64, Member, RaftError<u64, E>>;

impl Peer {
    async fn call<R, E>(&mut self, rpc: Rpc, option: &RPCOption) -> Result<R, Failure<E>>
    where
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let ttl = option.hard_ttl();
        let answer = match tokio::time::timeout(ttl, self.exchange::<Result<R, RaftError<u64, E>>>(&rpc)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                self.channel = None;
                return Err(match e.kind() {
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => {
                        RPCError::Unreachable(Unreachable::new(&e))
                    }
                    _ => RPCError::Network(NetworkError::new(&e)),
                });
            }
            Err(_) => {
                self.channel = None;
                let e = io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {ttl:?}"));
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn exchange<T: DeserializeOwned>(&mut self, rpc: &Rpc) -> io::Result<T> {
        if self.channel.is_none() {
            let addr: SocketAddr = tokio::net::lookup_host(&self.addr)
                .await?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
            let stream = TcpStream::connect(addr).await?;
            self.channel = Some(Channel::open(stream, &self.secret, true).await?);
        }
        let ch = self.channel.as_mut().expect("connected above");
        ch.send(rpc).await?;
        ch.receive().await
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
