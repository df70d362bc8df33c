//! An async Rust client for the wire protocol, with pipelining.
//!
//! Many calls may be in flight on one connection at once: each gets its own
//! request id and its answer is matched by that id, in whatever order the
//! server sends them.
//!
//! Connecting takes at most [`CONNECT_TIMEOUT`], and each call waits for
//! its answer at most [`timeout_for`] its op unless
//! [`Client::with_timeout`] or [`Client::call_within`] say otherwise. A
//! call that timed out has an unknown outcome ([`ClientError::Timeout`]);
//! its answer, if it comes later, is skipped.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tally::client::ClientError> {
//! use serde_json::json;
//! let c = tally::client::Client::connect("127.0.0.1:7707").await?;
//! c.login("admin", "secret").await?;
//! c.call("create_account", json!({"account": "alice", "initial": 100})).await?;
//! let t = c.call("transfer", json!({"from": "alice", "to": "@treasury", "amount": 5})).await?;
//! assert_eq!(t["from_balance"], 95);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, ToSocketAddrs};
use tokio::sync::oneshot;

use crate::limits::CLUSTER_MEMBERSHIP_TIMEOUT_MS;
use crate::wire::frame;

/// How long connecting (and a TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a call waits for its answer by default: beyond every wait the
/// server itself may impose before it answers (a list page's turn, 10 s; a
/// confirmation code's mail, ~33 s), so that the server's answer, even a
/// refusal, comes first; and a stopped or unreachable server is noticed.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// How long the ops that read or change the whole ledger wait by default
/// (`audit`, `backup`, `bulk_add`, `reap`): their time grows with the
/// ledger (an audit reads every record: 35-40 s at 44M records), and an
/// audit may first wait up to 120 s for its turn behind another.
pub const LONG_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long a call of `op` waits for its answer unless told otherwise.
#[must_use]
pub fn timeout_for(op: &str) -> Duration {
    match op {
        "audit" | "backup" | "bulk_add" | "reap" => LONG_TIMEOUT,
        // The server answers `unknown_outcome` once its own deadline passes.
        "add_node" | "remove_node" => Duration::from_millis(CLUSTER_MEMBERSHIP_TIMEOUT_MS) + TIMEOUT,
        _ => TIMEOUT,
    }
}

/// A client's timeout for its calls.
#[derive(Clone, Copy, Debug)]
enum Limit {
    /// [`timeout_for`] each call's op.
    ByOp,
    /// The same for every call (`None`: no limit).
    Fixed(Option<Duration>),
}

impl Limit {
    fn of(self, op: &str) -> Option<Duration> {
        match self {
            Limit::ByOp => Some(timeout_for(op)),
            Limit::Fixed(t) => t,
        }
    }
}

/// What can go wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error code.
    #[error("{code}: {message}")]
    Server {
        code: String,
        message: String,
        /// The failing item of an atomic `transfer_batch`.
        item: Option<usize>,
        /// With `not_leader`: the leader's client address, when known.
        leader: Option<String>,
    },
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the connection closed before the answer came")]
    Closed,
    /// The request never left whole, so nothing was applied: the
    /// connection had ended, or writing it failed or ran out of time before
    /// all of its frame was written (the server never runs a frame it has
    /// not read whole).
    #[error("the request was not sent; nothing was applied")]
    NotSent,
    /// No answer came in time. The request may or may not have been
    /// applied: send it again only with its idempotency key.
    #[error("no answer within the timeout; the outcome is unknown")]
    Timeout,
}

impl ClientError {
    /// The server's error code, if the server answered with one.
    #[must_use]
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// With `not_leader`: where the leader is, if the member knew.
    #[must_use]
    pub fn leader(&self) -> Option<&str> {
        match self {
            ClientError::Server { leader, .. } => leader.as_deref(),
            _ => None,
        }
    }

    /// The failing item of an atomic batch, if the server named one.
    #[must_use]
    pub fn item(&self) -> Option<usize> {
        match self {
            ClientError::Server { item, .. } => *item,
            _ => None,
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, ClientError>>>>>;

/// The connection's sending half.
struct Writer {
    io: Box<dyn AsyncWrite + Send + Unpin>,
    /// Set while part of a request's frame is written and the rest is not.
    /// Found set by the next call to take the lock, it means a call gave up
    /// halfway (its timeout, an error, or its future dropped): the server
    /// would read the next request's bytes as the rest of that frame, so
    /// nothing more is sent on this connection.
    torn: bool,
}

/// A call's place in `pending`, given up when the call ends however it
/// ends (answered, failed, timed out, or its future dropped): an answer
/// that comes later finds no one, and the map holds only calls waiting.
struct Waiting<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.pending.lock() {
            m.remove(&self.id);
        }
    }
}

/// One connection to a Tally server. Cheap to share: `call` takes `&self`.
pub struct Client {
    writer: tokio::sync::Mutex<Writer>,
    pending: Pending,
    /// Set by the reader when the connection ends; calls fail from then on.
    closed: Arc<std::sync::atomic::AtomicBool>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    timeout: Limit,
}

#[derive(Deserialize)]
struct RawResponse {
    id: Option<u64>,
    ok: Option<Value>,
    err: Option<RawError>,
}

#[derive(Deserialize)]
struct RawError {
    code: String,
    message: String,
    item: Option<usize>,
    leader: Option<String>,
}

impl Client {
    /// Connects in binary mode, within [`CONNECT_TIMEOUT`].
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        Client::from_stream(within_timeout(TcpStream::connect(addr)).await?)
    }

    /// Connects from a given local address (e.g. 127.0.0.2, to act as
    /// another host on loopback).
    pub async fn connect_from(local: IpAddr, addr: SocketAddr) -> Result<Client, ClientError> {
        let socket = if local.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.bind(SocketAddr::new(local, 0))?;
        Client::from_stream(within_timeout(socket.connect(addr)).await?)
    }

    /// Connects over TLS to `addr` (`host:port`), checking that the
    /// server's certificate chains to `tls.ca` (or the system's roots) and
    /// names `host`. Connecting and the handshake together take at most
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect_tls(addr: &str, tls: &crate::tls::ClientTls) -> Result<Client, ClientError> {
        let config = tls.config().map_err(|e| ClientError::Protocol(e.to_string()))?;
        let name = crate::tls::server_name(addr).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let stream = within_timeout(async {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            tokio_rustls::TlsConnector::from(config).connect(name, stream).await
        })
        .await?;
        Ok(Client::from_io(stream))
    }

    /// Speaks the binary protocol over a connected stream.
    pub fn from_stream(stream: TcpStream) -> Result<Client, ClientError> {
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        Ok(Client::from_halves(rd, Box::new(wr)))
    }

    /// Speaks the binary protocol over any byte stream (a TLS stream, say).
    pub fn from_io<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> Client {
        let (rd, wr) = tokio::io::split(stream);
        Client::from_halves(rd, Box::new(wr))
    }

    fn from_halves<R: AsyncRead + Unpin + Send + 'static>(mut rd: R, wr: Box<dyn AsyncWrite + Send + Unpin>) -> Client {
        let pending: Pending = Arc::default();
        let p = pending.clone();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = closed.clone();
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                while buf.len() >= 4 {
                    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if buf.len() < 4 + n {
                        buf.reserve(4 + n - buf.len());
                        break;
                    }
                    let body = buf.split_to(4 + n);
                    deliver(&p, &body[4..]);
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            // Fail every call still waiting, and (through `closed`) every later one.
            c.store(true, Ordering::SeqCst);
            p.lock().map(|mut m| m.clear()).ok();
        });
        Client {
            writer: tokio::sync::Mutex::new(Writer { io: wr, torn: false }),
            pending,
            closed,
            next_id: AtomicU64::new(1),
            reader,
            timeout: Limit::ByOp,
        }
    }

    /// This client with every call waiting at most `timeout` for its
    /// answer (`None`: as long as it takes) instead of [`timeout_for`] its op.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Client {
        self.timeout = Limit::Fixed(timeout);
        self
    }

    /// Sends `op` with `args` (any serializable map, e.g. `json!({...})`) and
    /// waits for its answer's `ok` value, at most the client's timeout.
    pub async fn call<A: Serialize>(&self, op: &str, args: A) -> Result<Value, ClientError> {
        self.call_within(self.timeout.of(op), op, args).await
    }

    /// [`Client::call`], waiting at most `timeout` (`None`: no limit)
    /// instead of the client's own. The time counts from the call, so it
    /// includes waiting for other calls' requests to be written.
    pub async fn call_within<A: Serialize>(
        &self,
        timeout: Option<Duration>,
        op: &str,
        args: A,
    ) -> Result<Value, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut out = BytesMut::with_capacity(128);
        frame::encode_request(&mut out, id, op, &args).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().map_err(|_| ClientError::NotSent)?.insert(id, tx);
        let _waiting = Waiting { pending: &self.pending, id };
        // Checked after inserting: the reader sets the flag before it clears
        // the map, so a call can never wait on a connection that has ended.
        if self.closed.load(Ordering::SeqCst) {
            return Err(ClientError::NotSent);
        }
        // Whether all of the frame was handed to the connection: from then
        // on the server may run it.
        let mut whole = false;
        let exchange = async {
            {
                let mut w = self.writer.lock().await;
                if w.torn {
                    return Err(ClientError::NotSent);
                }
                let mut done = 0;
                while done < out.len() {
                    let n = w.io.write(&out[done..]).await?;
                    if n == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                    }
                    done += n;
                    w.torn = done < out.len();
                }
                whole = true;
                // A no-op on TCP. TLS may hold the bytes back until then, and
                // keeps what it has not sent for the next write or flush.
                w.io.flush().await?;
            }
            rx.await.map_err(|_| ClientError::Closed)?
        };
        let result = match timeout {
            None => exchange.await,
            Some(limit) => tokio::time::timeout(limit, exchange).await.unwrap_or(Err(ClientError::Timeout)),
        };
        match result {
            Err(ClientError::Timeout | ClientError::Io(_)) if !whole => Err(ClientError::NotSent),
            other => other,
        }
    }

    /// Logs in and binds this connection to the user.
    pub async fn login(&self, user: &str, password: &str) -> Result<Value, ClientError> {
        self.call("login", serde_json::json!({"user": user, "password": password})).await
    }

    /// Balance of `account` (the caller's own account when `None`).
    pub async fn balance(&self, account: Option<&str>) -> Result<i64, ClientError> {
        let v = self.call("balance", serde_json::json!({ "account": account })).await?;
        v["balance"].as_i64().ok_or_else(|| ClientError::Protocol("balance without a balance".into()))
    }

    /// Moves `amount` from `from` (the caller's own account when `None`) to `to`.
    pub async fn transfer(
        &self,
        from: Option<&str>,
        to: &str,
        amount: i64,
        key: Option<&str>,
    ) -> Result<Value, ClientError> {
        self.call("transfer", serde_json::json!({"from": from, "to": to, "amount": amount, "key": key})).await
    }

    /// Sends `transfers` (each `{from?, to, amount, memo?, key?}`) as one
    /// `transfer_batch`; with `atomic`, all of them commit or none does.
    pub async fn transfer_batch(&self, transfers: &[Value], atomic: bool) -> Result<Value, ClientError> {
        self.call("transfer_batch", serde_json::json!({"transfers": transfers, "atomic": atomic})).await
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// `f` within [`CONNECT_TIMEOUT`], its running out an I/O error (`TimedOut`).
async fn within_timeout<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(CONNECT_TIMEOUT, f).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

fn deliver(pending: &Pending, body: &[u8]) {
    let Ok(r) = rmp_serde::from_slice::<RawResponse>(body) else {
        return;
    };
    let Some(id) = r.id else {
        tracing::warn!("answer without an id (a frame the server could not read)");
        return;
    };
    let result = match (r.ok, r.err) {
        (_, Some(e)) => Err(ClientError::Server { code: e.code, message: e.message, item: e.item, leader: e.leader }),
        (Some(v), None) => Ok(v),
        (None, None) => Err(ClientError::Protocol("an answer with neither ok nor err".into())),
    };
    let waiter = pending.lock().ok().and_then(|mut m| m.remove(&id));
    if let Some(w) = waiter {
        let _ = w.send(result);
    }
}

/// `unknown_outcome` for a write whose answer was lost, and whose resends
/// got no definite answer either (`why`): it may or may not have been
/// applied. Never `unavailable`, which says that nothing changed.
fn lost_answer(op: &str, why: &str) -> ClientError {
    ClientError::Server {
        code: "unknown_outcome".into(),
        message: format!(
            "the answer to {op} was lost and resending it found {why}; it may or may not have been applied"
        ),
        item: None,
        leader: None,
    }
}

/// Refusals that come before a request's idempotency key is looked at: to
/// a resend, they say nothing of what the first send did.
const UNSETTLED: &[&str] = &["unavailable", "overloaded", "rate_limited", "internal", "unauthenticated"];

/// Ops that change nothing: sent again after a lost answer.
const READS: &[&str] = &[
    "hello",
    "ping",
    "help",
    "health",
    "whoami",
    "balance",
    "account",
    "history",
    "get_transfer",
    "list_accounts",
    "delete_reason",
    "redeems",
    "my_redeems",
    "audit",
    "stats",
    "list_keys",
];

/// A client of a cluster: it talks to whichever member leads, and follows
/// the leader when it changes.
///
/// - A `not_leader` answer changed nothing: the call goes again to the
///   leader it names (or, if it names none, to whichever member says it
///   leads), up to a deadline.
/// - A call whose answer was lost (the connection closed, no answer in
///   time, or `unknown_outcome`) may or may not have been applied. It is
///   sent again only if its arguments carry an idempotency `key`, which
///   makes the second send answer with the first one's record; without a
///   key the caller gets `unknown_outcome` and decides (it is never
///   retried silently). A keyed write whose resends got no definite answer
///   within `patience` is `unknown_outcome` too, never `unavailable`.
/// - A call that was never sent ([`ClientError::NotSent`], e.g. on a
///   connection the member closed when it stopped leading) goes again on a
///   new connection.
/// - The credentials given to [`ClusterClient::auth`] are presented again
///   on every new connection (a token works on every member).
/// - It connects only to the addresses it was given: a `not_leader` that
///   names another address is followed by asking its own members.
pub struct ClusterClient {
    members: Vec<String>,
    /// The arguments of the `auth` each new connection sends first.
    credential: Option<Value>,
    tls: Option<crate::tls::ClientTls>,
    current: tokio::sync::Mutex<Option<(String, Arc<Client>)>>,
    /// How long a call may spend finding a leader.
    pub patience: std::time::Duration,
    /// How long each send waits for the member's answer: [`timeout_for`]
    /// its op unless [`ClusterClient::with_timeout`] says otherwise.
    timeout: Limit,
}

impl ClusterClient {
    /// A client of the cluster whose members' client addresses are `members`.
    #[must_use]
    pub fn new(members: Vec<String>) -> ClusterClient {
        ClusterClient {
            members,
            credential: None,
            tls: None,
            current: tokio::sync::Mutex::new(None),
            patience: std::time::Duration::from_secs(10),
            timeout: Limit::ByOp,
        }
    }

    /// Presents `token` (from a `login` at any member) on every connection.
    pub fn auth(&mut self, token: impl Into<String>) {
        self.credential = Some(serde_json::json!({ "token": token.into() }));
    }

    /// Presents the service key `secret` on every connection.
    pub fn auth_key(&mut self, secret: impl Into<String>) {
        self.credential = Some(serde_json::json!({ "key": secret.into() }));
    }

    /// Every send waiting at most `timeout` for the member's answer
    /// (`None`: as long as it takes) instead of [`timeout_for`] its op. A
    /// send that timed out counts as a lost answer.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> ClusterClient {
        self.timeout = Limit::Fixed(timeout);
        self
    }

    /// Speaks TLS to every member (each address must be a name or address
    /// its certificate carries).
    #[must_use]
    pub fn with_tls(mut self, tls: crate::tls::ClientTls) -> ClusterClient {
        self.tls = Some(tls);
        self
    }

    /// Logs in at the leader and presents the token on every connection
    /// from then on. Returns `login`'s answer.
    pub async fn login(&mut self, user: &str, password: &str) -> Result<Value, ClientError> {
        let r = self.call("login", serde_json::json!({ "user": user, "password": password })).await?;
        let token = r["token"].as_str().ok_or_else(|| ClientError::Protocol("login gave no token".into()))?;
        self.auth(token.to_owned());
        Ok(r)
    }

    async fn connect(&self, addr: &str) -> Result<Client, ClientError> {
        match &self.tls {
            Some(tls) => Client::connect_tls(addr, tls).await,
            None => Client::connect(addr).await,
        }
    }

    /// The member a call goes to now: `hint` if given, else the one that
    /// says it leads.
    async fn leader(&self, hint: Option<String>) -> Result<Arc<Client>, ClientError> {
        let mut current = self.current.lock().await;
        if hint.is_none() {
            if let Some((_, c)) = current.as_ref() {
                return Ok(c.clone());
            }
        }
        let deadline = tokio::time::Instant::now() + self.patience;
        loop {
            let mut tries: Vec<String> = hint.iter().cloned().collect();
            tries.extend(self.members.iter().cloned());
            for addr in tries {
                let Ok(Ok(c)) = tokio::time::timeout(std::time::Duration::from_secs(1), self.connect(&addr)).await
                else {
                    continue;
                };
                let asked =
                    tokio::time::timeout(std::time::Duration::from_secs(1), c.call("hello", serde_json::json!({})));
                let leads = matches!(asked.await, Ok(Ok(h)) if h["role"] == "leader");
                if !leads {
                    continue;
                }
                if let Some(credential) = &self.credential {
                    match c.call_within(self.timeout.of("auth"), "auth", credential).await {
                        Ok(_) => {}
                        Err(e @ ClientError::Server { .. }) => return Err(e),
                        // No answer from this member: ask the next.
                        Err(_) => continue,
                    }
                }
                let c = Arc::new(c);
                *current = Some((addr, c.clone()));
                return Ok(c);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Server {
                    code: "unavailable".into(),
                    message: "no member of the cluster says it leads".into(),
                    item: None,
                    leader: None,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Forgets the connection `c`, if it is still the current one.
    async fn drop_connection(&self, c: &Arc<Client>) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|(_, now)| Arc::ptr_eq(now, c)) {
            *current = None;
        }
    }

    /// Sends `op` to the leader, following it as described above.
    pub async fn call(&self, op: &str, args: Value) -> Result<Value, ClientError> {
        // A read changes nothing, so it is as safe to send again as a keyed write.
        let read = READS.contains(&op);
        let keyed = args.get("key").is_some_and(|k| !k.is_null()) || read;
        let mut deadline = tokio::time::Instant::now() + self.patience;
        let mut hint = None;
        // Once an answer was lost, an `unavailable` for the resend says only
        // that the resend changed nothing (the first send may have been
        // applied): only the key's own answer is definite.
        let mut lost_before = false;
        loop {
            let c = match self.leader(hint.take()).await {
                Ok(c) => c,
                Err(e) if lost_before && !read => return Err(lost_answer(op, &e.to_string())),
                Err(e) => return Err(e),
            };
            let lost = match c.call_within(self.timeout.of(op), op, &args).await {
                Err(ClientError::Server { code, leader, .. }) if code == "not_leader" => {
                    self.drop_connection(&c).await;
                    // Only a member it was given: a hint is an address the
                    // cluster configured, which may not be reachable from
                    // here, or safe to send credentials to.
                    hint = leader.filter(|l| self.members.contains(l));
                    if hint.is_none() {
                        // A leader elected but not serving yet, or one
                        // this client was not given: poll, not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    false
                }
                Err(ClientError::Server { code, .. }) if code == "unknown_outcome" => true,
                // Refused before its key was looked at: says nothing of the first send.
                Err(ClientError::Server { code, .. }) if lost_before && keyed && UNSETTLED.contains(&code.as_str()) => {
                    true
                }
                Err(ClientError::NotSent) => {
                    // Never sent: as if not yet tried, on a new connection.
                    self.drop_connection(&c).await;
                    false
                }
                Err(ClientError::Closed | ClientError::Io(_) | ClientError::Timeout) => {
                    self.drop_connection(&c).await;
                    true
                }
                other => return other,
            };
            if lost && !lost_before {
                // The first loss may come after the patience (a timeout is
                // longer): the resend still gets a full turn.
                deadline = deadline.max(tokio::time::Instant::now() + self.patience);
            }
            lost_before |= lost;
            if lost && !keyed {
                return Err(ClientError::Server {
                    code: "unknown_outcome".into(),
                    message: format!("the answer to {op} was lost; it may or may not have been applied"),
                    item: None,
                    leader: None,
                });
            }
            if lost {
                // The cluster is changing leaders: give it a moment.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            if tokio::time::Instant::now() >= deadline {
                if lost_before && !read {
                    return Err(lost_answer(op, "no leader in time"));
                }
                return Err(ClientError::Server {
                    code: "unavailable".into(),
                    message: format!("{op} found no leader in time"),
                    item: None,
                    leader: None,
                });
            }
        }
    }
}
