//! Start-up, the accept loop, and one task pair (reader, writer) per connection.

use std::net::SocketAddr;
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

use crate::auth::{self, Binding, Throttle, Tokens, UserState, Users};
use crate::config::Config;
use crate::constants::{KEYS_CACHED_PER_SHARD_MAX, LINE_BYTES_MAX, PASSWORD_HASHES_CONCURRENT_MAX};
use crate::error::{ApiError, ErrorCode};
use crate::frame::{self, HEADER_BYTES};
use crate::journal::{self, Journal, JournalHandle};
use crate::ledger::{AccountMap, Limits};
use crate::mail::Transport;
use crate::ops;
use crate::otp::{OtpActor, OtpArgs, OtpMsg, Rules};
use crate::reply::{Outgoing, Permits, ReplyTo};
use crate::shard::{shard_index, Outbox, ShardActor, ShardArgs, ShardRouter, Slot};
use crate::stats::Stats;
use crate::store::{self, UserRecord};

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
    pub db: Arc<Database>,
    pub stats: Arc<Stats>,
    pub tokens: Tokens,
    pub journal: JournalHandle,
    /// Requests in flight in the whole server.
    pub inflight: Arc<Semaphore>,
    /// Every user's role and token epoch.
    pub users: Arc<Users>,
    /// Failed logins per user.
    pub throttle: Throttle,
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
    tracing::info!("admin user updated from auth.admin_password");
    Ok(())
}

/// Opens the data folder, loads every account, starts the journal, the
/// shards and the listener.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let data = config.data.clone();
    std::fs::create_dir_all(&data).map_err(|source| StartError::Data { path: data.display().to_string(), source })?;
    let db = Arc::new(store::open(&data.join("tally.redb"))?);
    if let Some(pw) = &config.auth.admin_password {
        let (db, pw) = (db.clone(), pw.clone());
        tokio::task::spawn_blocking(move || bootstrap_admin(&db, &pw))
            .await
            .map_err(|e| StartError::Other(e.to_string()))??;
    }
    let secret = auth::load_secret(config.auth.jwt_secret.as_deref(), &data)
        .map_err(|source| StartError::Data { path: data.display().to_string(), source })?;
    let tokens = Tokens::new(&secret, config.auth.token_ttl_s);
    let limits = config.ledger_limits();

    let loaded = store::load(&db, limits)?;
    let n = config.shards;
    let mut per_shard: Vec<AccountMap<Slot>> = (0..n).map(|_| AccountMap::default()).collect();
    for a in loaded.accounts {
        let mut slot = Slot::new(&a.meta, a.balance, a.last);
        slot.acct.held = a.held;
        per_shard[shard_index(&a.id, n)].insert(a.id.as_str().into(), slot);
    }
    let (book, head, expiring) = (loaded.book, loaded.head, loaded.expiring);
    let sum = book.sum();
    if sum != 0 {
        return Err(StartError::Other(format!("refusing to start: balances sum to {sum}, not 0")));
    }
    tracing::info!(accounts = book.len(), head = head.id, "ledger loaded");

    let users = Arc::new(Users::default());
    for u in store::load_users(&db)? {
        users.set(&u.user, UserState::of(&u));
    }

    let stats = Arc::new(Stats::default());
    let (journal_handle, journal_rx) = journal::channel();
    let (fanout_tx, fanout_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut refs = Vec::with_capacity(n);
    for accounts in per_shard {
        let args = ShardArgs {
            accounts,
            journal: journal_handle.clone(),
            limits,
            db: db.clone(),
            keys_cached_max: KEYS_CACHED_PER_SHARD_MAX,
        };
        let (r, _) = Actor::spawn(None, ShardActor, args).await.map_err(|e| StartError::Actor(e.to_string()))?;
        refs.push(r);
    }
    let router = ShardRouter::new(refs);
    let journal = Journal {
        db: db.clone(),
        book,
        head,
        batch_max: config.limits.commit_batch_max,
        stats: stats.clone(),
        sweep_cursor: 0,
        sweep_from: head.id,
        checkpoint: 0,
        expiring: expiring.into_iter().collect(),
    };
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
        db,
        stats,
        tokens,
        journal: journal_handle,
        users,
        throttle: Throttle::default(),
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
            connection(&ctx, stream).await;
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
#[derive(Default)]
pub struct Session {
    /// The user it is bound to, if any.
    pub binding: Option<Binding>,
    /// Failed logins on this connection.
    pub login_failures: u32,
    /// Logins are refused until then.
    pub locked_until: Option<std::time::Instant>,
    /// When the bytes of the requests being handled were read, in ms since
    /// the Unix epoch (0: not known, read the clock). A token is checked
    /// against this: one clock reading serves every frame of a read instead
    /// of one per request (~2% of the runtime's CPU under load), and a
    /// request that arrived before its token expired is served.
    pub read_ms: u64,
    /// Debits decoded from this connection and not yet sent to their shards.
    pub outbox: Outbox,
}

enum Mode {
    Binary,
    Text,
}

/// Reads more bytes; `Ok(false)` on a clean end of stream or when the
/// server shuts down. A peer that has started a frame must finish it within
/// `limits.frame_timeout_ms`; an idle peer may wait as long as it likes.
async fn fill(ctx: &Ctx, rd: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<bool> {
    let timeout =
        if buf.is_empty() { Duration::MAX } else { Duration::from_millis(ctx.config.limits.frame_timeout_ms) };
    tokio::select! {
        biased;
        () = ctx.shutdown.cancelled() => Ok(false),
        r = tokio::time::timeout(timeout, rd.read_buf(buf)) => match r {
            Ok(r) => Ok(r? > 0),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "incomplete frame")),
        },
    }
}

async fn connection(ctx: &Arc<Ctx>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    match fill(ctx, &mut rd, &mut buf).await {
        Ok(true) => {}
        _ => return,
    }
    let mode = if ctx.config.text_mode && buf[0].is_ascii_alphabetic() { Mode::Text } else { Mode::Binary };
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(wr, rx, matches!(mode, Mode::Text)));
    let per_connection = match mode {
        // Text mode answers one line at a time, in order.
        Mode::Text => 1,
        Mode::Binary => ctx.config.limits.inflight_per_connection_max,
    };
    let slots = Arc::new(Semaphore::new(per_connection));
    let mut session = Session::default();
    let mut reader = Reader { ctx, tx: &tx, slots: &slots, session: &mut session };
    let result = match mode {
        Mode::Binary => reader.binary(&mut rd, &mut buf).await,
        Mode::Text => reader.text(&mut rd, &mut buf).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection closed");
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
    session: &'a mut Session,
}

impl Reader<'_> {
    async fn reply_to(&mut self, id: Option<u64>) -> ReplyTo {
        // Waiting here is the back-pressure: a client past its in-flight
        // limit is simply not read from until answers free a slot.
        let connection = self.permit(self.slots.clone()).await;
        let server = self.permit(self.ctx.inflight.clone()).await;
        ReplyTo::new(self.tx.clone(), id, Permits { connection, server })
    }

    /// A permit of `semaphore`; before waiting for one, the debits in the
    /// outbox go out (they hold permits, and only their answers free more).
    async fn permit(&mut self, semaphore: Arc<Semaphore>) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match semaphore.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(tokio::sync::TryAcquireError::Closed) => None,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.session.outbox.flush(&self.ctx.router);
                semaphore.acquire_owned().await.ok()
            }
        }
    }

    /// Reads more bytes, sending the outbox first (nothing waits in it
    /// while the reader waits for the client).
    async fn fill(&mut self, rd: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<bool> {
        self.session.outbox.flush(&self.ctx.router);
        let more = fill(self.ctx, rd, buf).await?;
        self.session.read_ms = store::now_ms();
        Ok(more)
    }

    fn error_now(&self, id: Option<u64>, error: ApiError) {
        ReplyTo::new(self.tx.clone(), id, Permits::default()).err(error);
    }

    async fn binary(&mut self, rd: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<()> {
        let frame_max = self.ctx.config.limits.frame_bytes_max;
        loop {
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
                    let reply = self.reply_to(Some(env.id)).await;
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
                    let reply = self.reply_to(None).await;
                    ops::dispatch(self.ctx, self.session, &parsed.op, &args, reply).await;
                }
            }
        }
    }
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Outgoing>, text: bool) {
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
        // Every answer of this write is taken: its requests' permits go back
        // in one release per semaphore.
        drop(taken);
        if wr.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
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
