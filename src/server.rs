//! Start-up, the accept loop, and one task pair (reader, writer) per connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ractor::Actor;
use redb::Database;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::auth::{self, Binding, LoginGuard, Tokens, UserState, Users};
use crate::config::Config;
use crate::constants::{
    ANONYMOUS_FRAME_BYTES_MAX, KEYS_CACHED_PER_SHARD_MAX, LINE_BYTES_MAX, PAGE_ITEM_BYTES_MAX, PAGE_LIMIT_DEFAULT,
    PAGE_LIMIT_MAX, PASSWORD_HASHES_CONCURRENT_MAX, REPLY_SLOT_BYTES,
};
use crate::error::{ApiError, ErrorCode};
use crate::frame::{self, HEADER_BYTES};
use crate::journal::{self, Health, Journal, JournalArgs, JournalHandle};
use crate::ledger::{AccountMap, Limits};
use crate::mail::Transport;
use crate::ops;
use crate::otp::{OtpActor, OtpArgs, OtpMsg, Rules};
use crate::reply::{Outgoing, Permits, ReplyTo};
use crate::shard::{shard_index, Outbox, ShardActor, ShardArgs, ShardRouter, Slot};
use crate::stats::Stats;
use crate::store::{self, Store, UserRecord};

/// Failures that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data folder {path}: {source}")]
    Data { path: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot start an actor: {0}")]
    Actor(String),
    #[error("{0}")]
    Other(String),
}

/// Shared by every connection.
pub struct Ctx {
    pub config: Config,
    pub limits: Limits,
    pub router: ShardRouter,
    pub store: Arc<Store>,
    /// Whether the journal can commit (`health`).
    pub health: Arc<Health>,
    pub stats: Arc<Stats>,
    pub tokens: Tokens,
    pub journal: JournalHandle,
    /// Reply slots in use in the whole server (`limits.inflight_max`): a
    /// request holds one, a page request several, until its reply is written.
    pub inflight: Arc<Semaphore>,
    /// Every user's role and token epoch.
    pub users: Arc<Users>,
    /// Failed logins per user, address and both.
    pub logins: LoginGuard,
    /// Bounds how many password hashes run at once.
    pub hashing: Arc<Semaphore>,
    /// Cancelled when the server shuts down: readers stop taking requests.
    pub shutdown: CancellationToken,
    /// The OTP supervisor: pending one-time-password sessions.
    pub otp: ractor::ActorRef<OtpMsg>,
}

/// A started server.
pub struct Running {
    pub addr: SocketAddr,
    pub ctx: Arc<Ctx>,
    accept: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting connections and reading requests, waits (bounded)
    /// for the requests in flight to be answered, then has the journal
    /// write a final checkpoint and stop. Acknowledged transfers were on
    /// disk before they were acknowledged; this only makes the next start
    /// quicker and the exit clean.
    pub async fn shutdown(self, grace: Duration) {
        self.ctx.shutdown.cancel();
        let _ = self.accept.await;
        let all = u32::try_from(self.ctx.config.limits.inflight_max).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(grace, self.ctx.inflight.acquire_many(all)).await;
        match drained {
            Ok(_) => tracing::info!("all requests answered"),
            Err(_) => tracing::warn!("shutdown grace ran out with requests in flight"),
        }
        self.ctx.otp.stop(None);
        let (done, stopped) = tokio::sync::oneshot::channel();
        if self.ctx.journal.send(journal::Command::Shutdown(done)).is_ok() {
            let _ = tokio::time::timeout(grace, stopped).await;
        }
    }
}

/// Ensures the admin user named "admin" exists with `password`.
fn bootstrap_admin(db: &Database, password: &str) -> Result<(), StartError> {
    let existing = store::get_user(db, "admin")?;
    if let Some(u) = &existing {
        if u.role == "admin" && auth::verify_password(password, &u.password_hash) {
            return Ok(());
        }
    }
    let hash = auth::hash_password(password).map_err(|e| StartError::Other(e.message))?;
    let user = UserRecord {
        user: "admin".into(),
        name: "Administrator".into(),
        email: "admin@localhost".into(),
        password_hash: hash,
        role: "admin".into(),
        group: None,
        events: existing.as_ref().map_or(0, |u| u.events),
        token_epoch: existing.as_ref().map_or(0, |u| u.token_epoch + 1),
    };
    store::put_user(db, &user)?;
    if existing.is_some() {
        tracing::info!(target: "security", "admin user updated from auth.admin_password");
    } else {
        tracing::info!(target: "security", "admin user created from auth.admin_password");
    }
    Ok(())
}

/// Where a generated admin password is left for the operator.
pub const ADMIN_PASSWORD_FILE: &str = "admin.password";

/// A data folder without any admin and no `auth.admin_password`: rather
/// than a server nobody can administer, create "admin" with a random
/// password and leave it in `DATA/admin.password` (mode 0600) for the
/// operator, never in the log.
fn generate_admin(db: &Database, data: &std::path::Path) -> Result<(), StartError> {
    if store::load_users(db)?.iter().any(|u| u.role == "admin") {
        return Ok(());
    }
    let mut raw = [0u8; 18];
    getrandom::fill(&mut raw).map_err(|e| StartError::Other(format!("no randomness: {e}")))?;
    // 24 characters from a 64-letter alphabet: 144 bits.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let password: String = raw
        .chunks(3)
        .flat_map(|c| {
            let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
            (0..4).rev().map(move |i| ALPHABET[((n >> (6 * i)) & 63) as usize] as char)
        })
        .collect();
    let path = data.join(ADMIN_PASSWORD_FILE);
    write_private(&path, format!("{password}\n").as_bytes())
        .map_err(|source| StartError::Data { path: path.display().to_string(), source })?;
    bootstrap_admin(db, &password)?;
    tracing::warn!(target: "security", file = %path.display(),
        "no admin and no auth.admin_password: created user admin with a generated password in this file; \
         log in, change it (change_password) and delete the file");
    eprintln!("tally: created user admin; its password is in {} (mode 0600)", path.display());
    Ok(())
}

/// Writes a new file readable by its owner only.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()
}

/// Gives `path` these permission bits (unix), so that a data folder made
/// by an older version, or under a loose umask, is tightened too.
fn restrict(path: &std::path::Path, mode: u32) -> Result<(), StartError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|source| StartError::Data { path: path.display().to_string(), source })?;
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Opens the data folder, loads every account, starts the journal, the
/// shards and the listener.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let data = config.data.clone();
    std::fs::create_dir_all(&data).map_err(|source| StartError::Data { path: data.display().to_string(), source })?;
    // The folder holds password hashes, the JWT secret and live codes.
    restrict(&data, 0o700)?;
    let db_path = data.join("tally.redb");
    let store = Arc::new(Store::open(&db_path)?);
    restrict(&db_path, 0o600)?;
    let db = store.db()?;
    {
        let (db, pw, data) = (db.clone(), config.auth.admin_password.clone(), data.clone());
        tokio::task::spawn_blocking(move || match pw {
            Some(pw) => bootstrap_admin(&db, &pw),
            None => generate_admin(&db, &data),
        })
        .await
        .map_err(|e| StartError::Other(e.to_string()))??;
    }
    let secret = auth::load_secret(config.auth.jwt_secret.as_deref(), &data)
        .map_err(|source| StartError::Data { path: data.display().to_string(), source })?;
    let tokens = Tokens::new(&secret, config.auth.token_ttl_s);
    let limits = config.ledger_limits();

    let mut loaded = store::load(&db, limits)?;
    let n = config.shards;
    let mut per_shard: Vec<AccountMap<Slot>> = (0..n).map(|_| AccountMap::default()).collect();
    for a in std::mem::take(&mut loaded.accounts) {
        let mut slot = Slot::new(&a.meta, a.balance, a.last);
        slot.acct.held = a.held;
        per_shard[shard_index(&a.id, n)].insert(a.id.as_str().into(), slot);
    }
    let sum = loaded.book.sum();
    if sum != 0 {
        return Err(StartError::Other(format!("refusing to start: balances sum to {sum}, not 0")));
    }
    tracing::info!(accounts = loaded.book.len(), head = loaded.head.id, "ledger loaded");

    let users = Arc::new(Users::default());
    for u in store::load_users(&db)? {
        users.set(&u.user, UserState::of(&u));
    }
    // Only the store holds the database from here on (it is reopened after
    // a storage failure, and that needs every holder to let go).
    drop(db);

    let stats = Arc::new(Stats::default());
    let (journal_handle, journal_rx) = journal::channel();
    let (fanout_tx, fanout_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut refs = Vec::with_capacity(n);
    for accounts in per_shard {
        let args = ShardArgs {
            accounts,
            journal: journal_handle.clone(),
            limits,
            store: store.clone(),
            keys_cached_max: KEYS_CACHED_PER_SHARD_MAX,
        };
        let (r, _) = Actor::spawn(None, ShardActor, args).await.map_err(|e| StartError::Actor(e.to_string()))?;
        refs.push(r);
    }
    let router = ShardRouter::new(refs);
    let health = Arc::new(Health::default());
    let journal = Journal::new(JournalArgs {
        store: store.clone(),
        loaded,
        batch_max: config.limits.commit_batch_max,
        stats: stats.clone(),
        health: health.clone(),
        fee_rounding: config.policy.fee_rounding,
    });
    std::thread::Builder::new()
        .name("tally-journal".into())
        .spawn(move || journal.run(&journal_rx, &fanout_tx))
        .map_err(|e| StartError::Other(e.to_string()))?;
    let fanout_router = router.clone();
    let fanout_users = users.clone();
    tokio::spawn(journal::run_fanout(fanout_rx, fanout_router, fanout_users));

    let transport = Transport::parse(&config.mail_transport()).map_err(StartError::Other)?;
    let from = config.mail.from.parse().map_err(|_| StartError::Other("mail.from is not a mail address".into()))?;
    let rules =
        Rules { ttl_ms: config.otp.ttl_s * 1000, tries_max: config.otp.tries_max, resends_max: config.otp.resends_max };
    let (otp, _) = Actor::spawn(None, OtpActor, OtpArgs { rules, transport, from })
        .await
        .map_err(|e| StartError::Actor(e.to_string()))?;

    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|source| StartError::Listen { addr: config.listen.clone(), source })?;
    let addr = listener.local_addr().map_err(|e| StartError::Other(e.to_string()))?;
    let ctx = Arc::new(Ctx {
        inflight: Arc::new(Semaphore::new(config.limits.inflight_max)),
        config,
        limits,
        router,
        store,
        health,
        stats,
        tokens,
        journal: journal_handle,
        users,
        logins: LoginGuard::default(),
        hashing: Arc::new(Semaphore::new(PASSWORD_HASHES_CONCURRENT_MAX)),
        shutdown: CancellationToken::new(),
        otp,
    });
    let accept = tokio::spawn(accept_loop(listener, ctx.clone()));
    Ok(Running { addr, ctx, accept })
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    let shutdown = ctx.shutdown.clone();
    let connections = Arc::new(Semaphore::new(ctx.config.limits.connections_max));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            Stats::add(&ctx.stats.connections, 1);
            Stats::add(&ctx.stats.connections_total, 1);
            tracing::debug!(%peer, "connection opened");
            connection(&ctx, stream, peer.ip()).await;
            ctx.stats.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// Tells a client over the connection limit why it is being dropped.
async fn refuse(mut stream: TcpStream) {
    let mut out = BytesMut::new();
    let err: Result<(), ApiError> = Err(ApiError::new(ErrorCode::Overloaded, "too many connections"));
    frame::encode_response(&mut out, None, &err);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}

/// What a connection knows about its caller.
pub struct Session {
    /// The user it is bound to, if any.
    pub binding: Option<Binding>,
    /// Where the connection comes from (login and reset limits count per address).
    pub peer: IpAddr,
    /// When the bytes of the requests being handled were read, in ms since
    /// the Unix epoch (0: not known, read the clock). A token is checked
    /// against this: one clock reading serves every frame of a read instead
    /// of one per request (~2% of the runtime's CPU under load), and a
    /// request that arrived before its token expired is served.
    pub read_ms: u64,
    /// Debits decoded from this connection and not yet sent to their shards.
    pub outbox: Outbox,
}

impl Session {
    #[must_use]
    pub fn new(peer: IpAddr) -> Session {
        Session { binding: None, peer, read_ms: 0, outbox: Outbox::default() }
    }
}

enum Mode {
    Binary,
    Text,
}

/// Reads more bytes; `Ok(false)` on a clean end of stream, when the
/// server shuts down or when the writer gave up on the peer (`closed`). A
/// peer that has started a frame must finish it within
/// `limits.frame_timeout_ms`; an anonymous peer may stay idle for
/// `limits.idle_anonymous_ms`, a logged-in one as long as it likes.
async fn fill(
    ctx: &Ctx,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    closed: &CancellationToken,
    anonymous: bool,
) -> std::io::Result<bool> {
    let limits = &ctx.config.limits;
    let (timeout, what) = if !buf.is_empty() {
        (Duration::from_millis(limits.frame_timeout_ms), "incomplete frame")
    } else if anonymous {
        (Duration::from_millis(limits.idle_anonymous_ms), "idle and not logged in")
    } else {
        (Duration::MAX, "")
    };
    tokio::select! {
        biased;
        () = closed.cancelled() => Ok(false),
        r = tokio::time::timeout(timeout, rd.read_buf(buf)) => match r {
            Ok(r) => Ok(r? > 0),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, what)),
        },
    }
}

async fn connection(ctx: &Arc<Ctx>, stream: TcpStream, peer: IpAddr) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // Cancelled when the server shuts down, or by the writer when the peer
    // stops taking replies: the reader then stops too.
    let closed = ctx.shutdown.child_token();
    match fill(ctx, &mut rd, &mut buf, &closed, true).await {
        Ok(true) => {}
        _ => return,
    }
    let mode = if ctx.config.text_mode && buf[0].is_ascii_alphabetic() { Mode::Text } else { Mode::Binary };
    let (tx, rx) = mpsc::unbounded_channel();
    let write_timeout = Duration::from_millis(ctx.config.limits.write_timeout_ms);
    let writer = tokio::spawn(write_loop(wr, rx, matches!(mode, Mode::Text), write_timeout, closed.clone(), peer));
    let per_connection = match mode {
        // Text mode answers one line at a time, in order.
        Mode::Text => 1,
        Mode::Binary => ctx.config.limits.inflight_per_connection_max,
    };
    let slots = Arc::new(Semaphore::new(per_connection));
    let mut session = Session::new(peer);
    let mut reader = Reader { ctx, tx: &tx, slots: &slots, per_connection, closed: &closed, session: &mut session };
    let result = match mode {
        Mode::Binary => reader.binary(&mut rd, &mut buf).await,
        Mode::Text => reader.text(&mut rd, &mut buf).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "connection closed");
    }
    // Debits already read are answered like any other request.
    session.outbox.flush(&ctx.router);
    drop(tx);
    // The writer ends once every in-flight request has been answered.
    let _ = writer.await;
}

struct Reader<'a> {
    ctx: &'a Arc<Ctx>,
    tx: &'a mpsc::UnboundedSender<Outgoing>,
    slots: &'a Arc<Semaphore>,
    /// The capacity of `slots`.
    per_connection: usize,
    closed: &'a CancellationToken,
    session: &'a mut Session,
}

impl Reader<'_> {
    /// The return address of a request whose reply may take `slots` reply
    /// slots ([`reply_slots`]), holding that many per-connection and
    /// server-wide permits until the reply is written. Waiting here is the
    /// back-pressure: a client past its limit is simply not read from until
    /// written answers free slots. `None` if the connection closed while
    /// waiting.
    async fn reply_to(&mut self, id: Option<u64>, slots: usize) -> Option<ReplyTo> {
        let n = slots.clamp(1, self.per_connection.min(self.ctx.config.limits.inflight_max));
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let connection = self.permit(self.slots.clone(), n).await?;
        let server = self.permit(self.ctx.inflight.clone(), n).await?;
        Some(ReplyTo::new(self.tx.clone(), id, Permits { connection, server }))
    }

    /// `n` permits of `semaphore`; before waiting for them, the debits in
    /// the outbox go out (they hold permits, and only their answers free
    /// more). `None` if the connection closed while waiting; `Some(None)`
    /// if the semaphore was closed.
    async fn permit(&mut self, semaphore: Arc<Semaphore>, n: u32) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
        match semaphore.clone().try_acquire_many_owned(n) {
            Ok(p) => Some(Some(p)),
            Err(tokio::sync::TryAcquireError::Closed) => Some(None),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.session.outbox.flush(&self.ctx.router);
                tokio::select! {
                    () = self.closed.cancelled() => None,
                    p = semaphore.acquire_many_owned(n) => Some(p.ok()),
                }
            }
        }
    }

    /// Reads more bytes, sending the outbox first (nothing waits in it
    /// while the reader waits for the client).
    async fn fill(&mut self, rd: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<bool> {
        self.session.outbox.flush(&self.ctx.router);
        let anonymous = self.session.binding.is_none();
        let more = fill(self.ctx, rd, buf, self.closed, anonymous).await?;
        self.session.read_ms = store::now_ms();
        Ok(more)
    }

    /// The largest frame this connection may send now: an anonymous one
    /// only needs room for a login or signup.
    fn frame_max(&self) -> usize {
        let configured = self.ctx.config.limits.frame_bytes_max;
        if self.session.binding.is_none() {
            configured.min(ANONYMOUS_FRAME_BYTES_MAX)
        } else {
            configured
        }
    }

    fn error_now(&self, id: Option<u64>, error: ApiError) {
        ReplyTo::new(self.tx.clone(), id, Permits::default()).err(error);
    }

    async fn binary(&mut self, rd: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<()> {
        loop {
            let frame_max = self.frame_max();
            while buf.len() < HEADER_BYTES {
                if !self.fill(rd, buf).await? {
                    return Ok(());
                }
            }
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len > frame_max {
                self.error_now(
                    None,
                    ApiError::new(
                        ErrorCode::FrameTooLarge,
                        format!("frame of {len} bytes exceeds the limit of {frame_max}"),
                    ),
                );
                return Ok(());
            }
            buf.reserve(HEADER_BYTES + len);
            while buf.len() < HEADER_BYTES + len {
                if !self.fill(rd, buf).await? {
                    return Ok(());
                }
            }
            buf.advance(HEADER_BYTES);
            let body = buf.split_to(len);
            Stats::add(&self.ctx.stats.ops, 1);
            match frame::parse_envelope(&body) {
                Err(e) => self.error_now(e.id, e.error),
                Ok(env) => {
                    let Some(reply) = self.reply_to(Some(env.id), reply_slots(env.op, env.args)).await else {
                        return Ok(());
                    };
                    ops::dispatch(self.ctx, self.session, env.op, env.args, reply).await;
                }
            }
        }
    }

    async fn text(&mut self, rd: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<()> {
        let mut scanned = 0;
        loop {
            let Some(pos) = buf[scanned..].iter().position(|&b| b == b'\n').map(|p| p + scanned) else {
                scanned = buf.len();
                if buf.len() > LINE_BYTES_MAX {
                    self.error_now(
                        None,
                        ApiError::new(ErrorCode::FrameTooLarge, format!("line longer than {LINE_BYTES_MAX} bytes")),
                    );
                    return Ok(());
                }
                if !self.fill(rd, buf).await? {
                    return Ok(());
                }
                continue;
            };
            let raw = buf.split_to(pos + 1);
            scanned = 0;
            let line = &raw[..pos];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            Stats::add(&self.ctx.stats.ops, 1);
            let Ok(line) = std::str::from_utf8(line) else {
                self.error_now(None, ApiError::bad_request("the line is not valid UTF-8"));
                continue;
            };
            match crate::text::parse_line(line) {
                Err(e) => self.error_now(None, e),
                Ok(parsed) => {
                    let args = parsed.args_msgpack();
                    let Some(reply) = self.reply_to(None, 1).await else {
                        return Ok(());
                    };
                    ops::dispatch(self.ctx, self.session, &parsed.op, &args, reply).await;
                }
            }
        }
    }
}

/// How many reply slots ([`REPLY_SLOT_BYTES`] each) a request may need:
/// one, or for a page of records or accounts enough for its `limit`
/// (`my_redeems` always answers a full page).
fn reply_slots(op: &str, args: &[u8]) -> usize {
    #[derive(serde::Deserialize)]
    struct Limit {
        limit: Option<u64>,
    }
    let items = match op {
        "history" | "list_accounts" | "redeems" => frame::decode_args::<Limit>(args)
            .ok()
            .and_then(|l| l.limit)
            .map_or(PAGE_LIMIT_DEFAULT, |l| usize::try_from(l).unwrap_or(PAGE_LIMIT_MAX).min(PAGE_LIMIT_MAX)),
        "my_redeems" => PAGE_LIMIT_MAX,
        _ => return 1,
    };
    1 + (items * PAGE_ITEM_BYTES_MAX).div_ceil(REPLY_SLOT_BYTES)
}

/// Encodes the answers of a connection and writes them. The permits of an
/// answer are released only once its bytes are written, so a peer that
/// stops reading holds its slots and is not read from any more; if the
/// socket takes no bytes for `write_timeout`, the connection is closed and
/// everything it held is released.
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    text: bool,
    write_timeout: Duration,
    closed: CancellationToken,
    peer: IpAddr,
) {
    const WRITE_BATCH_BYTES: usize = 256 * 1024;
    let mut out = BytesMut::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut taken = Permits::default();
        while let Some(Outgoing { id, result, permits }) = next {
            if text {
                frame::encode_line(&mut out, &result);
            } else {
                frame::encode_reply(&mut out, id, &result);
            }
            drop(result);
            taken.absorb(permits);
            next = if out.len() < WRITE_BATCH_BYTES { rx.try_recv().ok() } else { None };
        }
        let mut written = 0;
        while written < out.len() {
            match tokio::time::timeout(write_timeout, wr.write(&out[written..])).await {
                Ok(Ok(n)) if n > 0 => written += n,
                Ok(_) => {
                    closed.cancel();
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, pending_bytes = out.len() - written, timeout_ms = write_timeout.as_millis() as u64,
                        "closing a connection whose peer stopped reading");
                    closed.cancel();
                    return;
                }
            }
        }
        // Every answer of this write is out: its requests' permits go back
        // in one release per semaphore.
        drop(taken);
        out.clear();
        if out.capacity() > 4 * WRITE_BATCH_BYTES {
            // One huge page made the buffer grow: do not keep that memory.
            out = BytesMut::with_capacity(64 * 1024);
        }
    }
    let _ = wr.shutdown().await;
}

/// Raises the open-file limit to its hard maximum, so that
/// `limits.connections_max` connections can be open at once.
fn raise_fd_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                let wanted = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const wanted) == 0 {
                    tracing::info!(from = lim.rlim_cur, to = lim.rlim_max, "raised the open-file limit");
                }
            }
        }
    }
}

/// Runs `tally serve` until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> Result<(), StartError> {
    raise_fd_limit();
    let running = start(config).await?;
    // Tests and scripts read this line to learn the port.
    println!("tally listening on {}", running.addr);
    tracing::info!(addr = %running.addr, "listening");
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
