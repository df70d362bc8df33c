//! Start-up: opens the data folder, makes sure there is an admin, loads
//! the ledger, starts the journal thread, the shard actors, the fan-out,
//! the OTP supervisor and the listener; and the orderly shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;
use redb::Database;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::Ctx;
use crate::auth::{self, LoginGuard, Tokens, Users};
use crate::clock::Clock;
use crate::config::Config;
use crate::contract::{self, Command};
use crate::journal::{Health, Journal, JournalArgs};
use crate::ledger::{AccountMap, Book};
use crate::limits::{KEYS_CACHED_PER_SHARD_MAX, PASSWORD_HASHES_CONCURRENT_MAX};
use crate::otp::mail::Transport;
use crate::otp::{OtpActor, OtpArgs, Rules};
use crate::shard::{fanout, shard_index, KeyReader, ShardActor, ShardArgs, ShardRouter, Slot};
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

/// A started server.
pub struct Running {
    /// The plaintext listener's address (`None`: `listen = ""`).
    pub addr: Option<SocketAddr>,
    /// The TLS listener's address, if `[tls]` is on.
    pub tls_addr: Option<SocketAddr>,
    /// The HTTP listener's address, if `[http]` is on.
    pub http_addr: Option<SocketAddr>,
    pub ctx: Arc<Ctx>,
    accept: Vec<tokio::task::JoinHandle<()>>,
    /// Whether a journal thread runs (a follower's ledger has none: its
    /// state machine writes the file).
    journal: bool,
}

impl Running {
    /// Stops accepting connections and reading requests, waits for the
    /// requests in flight to be answered and the mails they queued to be
    /// handled (both within `grace`; a mail still queued then is dropped),
    /// then has the journal write a final checkpoint and stop (within a
    /// `grace` of its own, so that a slow mail relay cannot leave it no
    /// time). Acknowledged transfers were on disk before they were
    /// acknowledged; this only makes the next start quicker and the exit
    /// clean. `true`: the journal said it stopped, or there was none.
    pub async fn shutdown(self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        self.ctx.shutdown.cancel();
        for a in self.accept {
            let _ = a.await;
        }
        let all = u32::try_from(self.ctx.config.limits.inflight_max).unwrap_or(u32::MAX);
        match tokio::time::timeout_at(deadline, self.ctx.inflight.acquire_many(all)).await {
            Ok(_) => tracing::info!("all requests answered"),
            Err(_) => tracing::warn!("shutdown grace ran out with requests in flight"),
        }
        // A reset's answer goes out before its mail: let the mailer finish.
        let mails = crate::limits::MAIL_QUEUE_MAX;
        let queued = mails - self.ctx.mail_queue.available_permits();
        if queued > 0 {
            tracing::info!(mails = queued, "waiting for the mails queued to be handled");
        }
        let all_mails = u32::try_from(mails).unwrap_or(u32::MAX);
        if tokio::time::timeout_at(deadline, self.ctx.mail_queue.acquire_many(all_mails)).await.is_err() {
            tracing::warn!("shutdown grace ran out with mails not yet delivered");
        }
        self.ctx.otp.stop(None);
        if !self.journal {
            return true;
        }
        let (done, stopped) = tokio::sync::oneshot::channel();
        if self.ctx.journal.send(Command::Shutdown(done)).is_err() {
            return false;
        }
        // The journal may still be committing when the wait ends (a stalled
        // disk): then it keeps the database, and the caller must not close it.
        let stopped = matches!(tokio::time::timeout(grace, stopped).await, Ok(Ok(())));
        if !stopped {
            tracing::warn!("shutdown grace ran out before the journal stopped");
        }
        stopped
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
        revoked_tokens: Vec::new(),
    };
    store::put_user(db, &user)?;
    if existing.is_some() {
        tracing::info!(target: "security", "admin user updated from auth.admin_password");
    } else {
        tracing::info!(target: "security", "admin user created from auth.admin_password");
    }
    Ok(())
}

/// Accounts brought up to date in the shards' maps as one group after the
/// replay at start-up ([`catch_up`]): as the replay's groups, large enough
/// for many cache misses at once, small enough to stay cached.
const CATCH_UP_GROUP: usize = 32;

/// Brings the shards' slots up to date for the accounts the replayed tail
/// or an open hold changed since their rows were read: the book's entries
/// that are `dirty` or hold something. A group at a time, each group's
/// slots fetched first: after a crash a few million accounts may have
/// changed, at random places in the maps, and their cache misses overlap
/// instead of stalling one by one.
fn catch_up(per_shard: &mut [AccountMap<Slot>], book: &Book) -> Result<(), StartError> {
    let n = per_shard.len();
    let mut changed = book.iter().filter(|(_, b)| b.dirty || b.held != 0).peekable();
    let mut group = Vec::with_capacity(CATCH_UP_GROUP);
    while changed.peek().is_some() {
        group.clear();
        group.extend(changed.by_ref().take(CATCH_UP_GROUP).map(|(id, b)| (shard_index(id, n), id, b)));
        for &(shard, id, _) in &group {
            per_shard[shard].prefetch(id);
        }
        for &(shard, id, b) in &group {
            let slot = per_shard[shard]
                .get_mut(id)
                .ok_or_else(|| StartError::Other(format!("account {id} is in the book but in no shard")))?;
            slot.acct.balance = b.balance;
            slot.acct.held = b.held;
            slot.last = b.last;
        }
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
    // 24 characters from a 64-letter alphabet: 144 bits.
    let password = crate::random::base64url::<18>().map_err(|e| StartError::Other(e.message))?;
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
    let ahead = Ahead::start(&config);
    let (store, warming) = open_data(&config).await?;
    let bound = Bound::bind(&config).await?;
    let running = start_on(config, store, &bound, None, ahead).await;
    // Loaded: what is read from now on is read as it is needed.
    drop(warming);
    running
}

/// Memory for loading, made on a thread of its own while the database
/// opens (after a crash, redb's repair reads the whole file on one core),
/// sized by the count of accounts the last start loaded: first the book
/// and the balance table, which loading starts with, then the shards'
/// maps, which it needs only once the first accounts are read.
struct Ahead {
    /// The count of accounts it is made for.
    n: usize,
    room: std::sync::mpsc::Receiver<store::Room>,
    maps: std::sync::mpsc::Receiver<Vec<AccountMap<Slot>>>,
}

impl Ahead {
    /// Starts making it, if the data folder has a count noted.
    fn start(config: &Config) -> Option<Ahead> {
        let n = store::size_hint(&config.data, &config.data.join("tally.redb"))?;
        let (limits, shards) = (config.ledger_limits(), config.shards);
        let (room_tx, room) = std::sync::mpsc::sync_channel(1);
        let (maps_tx, maps) = std::sync::mpsc::sync_channel(1);
        let made = std::thread::Builder::new().name("tally-ahead".into()).spawn(move || {
            // A start that failed meanwhile takes neither: they are dropped.
            let _ = room_tx.send(store::Room::new(limits, n));
            let share = shard_share(n, shards);
            let _ = maps_tx.send((0..shards).map(|_| AccountMap::with_capacity_touched(share, Slot::blank)).collect());
        });
        // Without it, loading makes its own.
        made.ok().map(|_| Ahead { n, room, maps })
    }
}

/// Room in each of `shards` maps for its share of `n` accounts (and
/// some): loading then does not rehash millions of entries as they grow.
fn shard_share(n: usize, shards: usize) -> usize {
    n / shards + n / (4 * shards) + 16
}

/// The client listeners, bound once: a cluster member restarts its ledger
/// when leadership changes, and clients keep finding it at the same
/// addresses (connections waiting to be accepted meanwhile stay queued).
pub struct Bound {
    plain: Option<std::net::TcpListener>,
    tls: Option<std::net::TcpListener>,
    http: Option<std::net::TcpListener>,
}

impl Bound {
    pub async fn bind(config: &Config) -> Result<Bound, StartError> {
        let std = |l: Option<(TcpListener, SocketAddr)>| {
            l.map(|(l, _)| l.into_std().map_err(|e| StartError::Other(e.to_string()))).transpose()
        };
        let plain = match config.listen.as_str() {
            "" => None,
            listen => Some(bind(listen).await?),
        };
        let tls = match config.tls.listen() {
            Some(listen) => Some(bind(listen).await?),
            None => None,
        };
        let http = match config.http.listen() {
            Some(listen) => Some(bind(listen).await?),
            None => None,
        };
        Ok(Bound { plain: std(plain)?, tls: std(tls)?, http: std(http)? })
    }

    /// A tokio listener on the same socket, and its address.
    fn take(l: Option<&std::net::TcpListener>) -> Result<Option<(TcpListener, SocketAddr)>, StartError> {
        let Some(l) = l else { return Ok(None) };
        let other = |e: std::io::Error| StartError::Other(e.to_string());
        let l = TcpListener::from_std(l.try_clone().map_err(other)?).map_err(other)?;
        let local = l.local_addr().map_err(other)?;
        Ok(Some((l, local)))
    }
}

/// Opens (or makes) the data folder and the database, and makes sure
/// there is an admin. The file is read ahead meanwhile, until the
/// returned [`store::Warming`] is dropped.
async fn open_data(config: &Config) -> Result<(Arc<Store>, store::Warming), StartError> {
    let data = config.data.clone();
    std::fs::create_dir_all(&data).map_err(|source| StartError::Data { path: data.display().to_string(), source })?;
    // The folder holds password hashes, the JWT secret and live codes.
    restrict(&data, 0o700)?;
    let db_path = data.join("tally.redb");
    let opening = std::time::Instant::now();
    let warming = store::Warming::start(&db_path);
    let store = Arc::new(Store::open(&db_path)?);
    tracing::info!(ms = opening.elapsed().as_millis() as u64, "database opened");
    restrict(&db_path, 0o600)?;
    let db = store.db()?;
    {
        let (db, pw, data) = (db.clone(), config.auth.admin_password.clone(), data.clone());
        let member = config.cluster.is_some();
        tokio::task::spawn_blocking(move || match pw {
            // A member writes this row outside Raft: only where there is no
            // admin yet (a new or wiped member, whose log or snapshot then
            // brings the cluster's). Updating it from the configuration
            // would bring back a password changed since, on this member only.
            Some(_) if member && store::get_user(&db, "admin")?.is_some() => Ok(()),
            Some(pw) => bootstrap_admin(&db, &pw),
            None => generate_admin(&db, &data),
        })
        .await
        .map_err(|e| StartError::Other(e.to_string()))??;
    }
    Ok((store, warming))
}

/// The server's ledger and listeners over an opened store. In a cluster,
/// one run of it: as the leader's (`replicate`), or as a follower's, which
/// starts no journal and refuses what only the leader serves.
async fn start_on(
    config: Config,
    store: Arc<Store>,
    bound: &Bound,
    cluster: Option<(Arc<crate::cluster::node::Serving>, Option<crate::journal::Replicate>)>,
    ahead: Option<Ahead>,
) -> Result<Running, StartError> {
    let data = config.data.clone();
    let db = store.db()?;
    let secret = auth::load_secret(config.jwt_secret().as_deref(), &data)
        .map_err(|source| StartError::Data { path: data.display().to_string(), source })?;
    let tokens = Tokens::new(&secret, config.auth.token_ttl_s);
    let limits = config.ledger_limits();

    let loading = std::time::Instant::now();
    let n = config.shards;
    let (room, maps) = match ahead {
        Some(Ahead { n: made_for, room, maps }) => (room.recv().ok(), Some((made_for, maps))),
        None => (None, None),
    };
    // Each shard's map is built from the accounts' rows as they are read
    // (`load_with`), then brought up to date for the accounts the replayed
    // tail or an open hold changed.
    let (loaded, mut per_shard) = store::load_with(&db, limits, room, |accounts| {
        let share = shard_share(accounts.len, n);
        let made = maps
            .filter(|(made_for, _)| store::Room::fits(*made_for, accounts.len))
            .and_then(|(_, maps)| maps.recv().ok())
            .filter(|maps| maps.len() == n);
        let mut per_shard = made.unwrap_or_else(|| (0..n).map(|_| AccountMap::with_capacity(share)).collect());
        for map in &mut per_shard {
            map.reserve(share);
        }
        while let Some(a) = accounts.next() {
            // Each insert lands at a place in no order: a few ahead, the
            // place is loaded into the cache before it is needed.
            if let Some(b) = accounts.ahead() {
                per_shard[shard_index(b.id.as_str(), n)].prefetch(b.id.as_str());
            }
            let shard = shard_index(a.id.as_str(), n);
            per_shard[shard].insert(a.id.clone(), Slot::loaded(a));
        }
        per_shard
    })?;
    catch_up(&mut per_shard, &loaded.book)?;
    let sum = loaded.book.sum();
    if sum != 0 {
        return Err(StartError::Other(format!("refusing to start: balances sum to {sum}, not 0")));
    }
    tracing::info!(
        accounts = loaded.book.len(),
        head = loaded.head.id,
        ms = loading.elapsed().as_millis() as u64,
        "ledger loaded"
    );
    // A member's starts follow its leadership, with the database open.
    if cluster.is_none() {
        if let Err(e) = store::write_size_hint(&data, loaded.book.len()) {
            tracing::warn!(error = %e, "could not note the count of accounts for the next start");
        }
    }

    let users = Arc::new(Users::default());
    users.load(&db)?;
    // Only the store holds the database from here on (it is reopened after
    // a storage failure, and that needs every holder to let go).
    drop(db);

    let stats = Arc::new(Stats::default());
    let (journal_handle, journal_rx) = contract::channel();
    let (fanout_tx, fanout_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut refs = Vec::with_capacity(n);
    let key_reader = KeyReader::start(store.clone()).map_err(|e| StartError::Actor(e.to_string()))?;
    for accounts in per_shard {
        let args = ShardArgs {
            accounts,
            key_reader: key_reader.clone(),
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
    let (serving, replicate) = match cluster {
        Some((serving, replicate)) => (Some(serving), replicate),
        None => (None, None),
    };
    // A follower's ledger is written by its state machine, not a journal.
    let journal = serving.is_none() || replicate.is_some();
    if journal {
        let journal = Journal::new(JournalArgs {
            store: store.clone(),
            loaded,
            batch_max: config.limits.commit_batch_max,
            stats: stats.clone(),
            health: health.clone(),
            fee_rounding: config.policy.fee_rounding,
            clock: Clock::system(),
            replicate,
            segment_records: config.limits.history_segment_records,
        });
        std::thread::Builder::new()
            .name("tally-journal".into())
            .spawn(move || journal.run(&journal_rx, &fanout_tx))
            .map_err(|e| StartError::Other(e.to_string()))?;
    }
    let fanout_router = router.clone();
    let fanout_users = users.clone();
    tokio::spawn(fanout::run(fanout_rx, fanout_router, fanout_users));

    let transport = Transport::parse(&config.mail_transport()).map_err(StartError::Other)?;
    let from = config.mail.from.parse().map_err(|_| StartError::Other("mail.from is not a mail address".into()))?;
    let rules =
        Rules { ttl_ms: config.otp.ttl_s * 1000, tries_max: config.otp.tries_max, resends_max: config.otp.resends_max };
    let mail_queue = Arc::new(tokio::sync::Semaphore::new(crate::limits::MAIL_QUEUE_MAX));
    let otp_args = OtpArgs { rules, transport, from, clock: Clock::system(), mail_queue: mail_queue.clone() };
    let (otp, _) = Actor::spawn(None, OtpActor, otp_args).await.map_err(|e| StartError::Actor(e.to_string()))?;

    let listener = Bound::take(bound.plain.as_ref())?;
    let tls_acceptor = match (&config.tls.cert, &config.tls.key) {
        (None, None) => None,
        _ => {
            let tls = crate::tls::server_config(&config.tls).map_err(|e| StartError::Other(e.to_string()))?;
            Some(tokio_rustls::TlsAcceptor::from(tls))
        }
    };
    let tls = match (Bound::take(bound.tls.as_ref())?, &tls_acceptor) {
        (Some(l), Some(acceptor)) => Some((l, acceptor.clone())),
        (Some(_), None) => return Err(StartError::Other("tls.listen needs tls.cert and tls.key".into())),
        (None, _) => None,
    };
    let http = Bound::take(bound.http.as_ref())?;
    if let (Some((_, l)), None) = (&http, &tls_acceptor) {
        if !l.ip().is_loopback() {
            tracing::warn!(target: "security", addr = %l,
                "plain HTTP on a non-loopback address: passwords, tokens and keys cross the network in clear; \
                 give [tls] a certificate (HTTP then serves HTTPS) or listen on a loopback address");
        }
    }
    if let Some((_, l)) = &listener {
        if !l.ip().is_loopback() {
            tracing::warn!(target: "security", addr = %l,
                "plaintext listener on a non-loopback address: passwords, tokens and keys cross the network in \
                 clear; use [tls] (and listen = \"\" or a loopback address)");
        }
    }
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
        key_creation: tokio::sync::Mutex::new(()),
        auditing: Arc::new(Semaphore::new(1)),
        listing: Arc::new(Semaphore::new(crate::limits::LIST_PAGES_AT_ONCE)),
        #[cfg(feature = "fault-injection")]
        held: std::sync::Mutex::default(),
        shutdown: CancellationToken::new(),
        otp,
        mail_queue,
        cluster: serving,
    });
    let connections = Arc::new(Semaphore::new(ctx.config.limits.connections_max));
    let mut accept = Vec::new();
    let (mut addr, mut tls_addr) = (None, None);
    if let Some((listener, local)) = listener {
        addr = Some(local);
        accept.push(tokio::spawn(crate::net::accept_loop(listener, ctx.clone(), None, None, connections.clone())));
    }
    if let Some(((listener, local), acceptor)) = tls {
        tls_addr = Some(local);
        accept.push(tokio::spawn(crate::net::accept_loop(
            listener,
            ctx.clone(),
            Some(acceptor),
            None,
            connections.clone(),
        )));
    }
    let mut http_addr = None;
    if let Some((listener, local)) = http {
        http_addr = Some(local);
        // HTTPS with the [tls] certificate when there is one.
        let acceptor = tls_acceptor.clone();
        let app = crate::http::router(ctx.clone());
        accept.push(tokio::spawn(crate::net::accept_loop(listener, ctx.clone(), acceptor, Some(app), connections)));
    }
    Ok(Running { addr, tls_addr, http_addr, ctx, accept, journal })
}

/// A listener on `addr`, and the address it got (port 0 picks one).
async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener =
        TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr: addr.to_owned(), source })?;
    let local = listener.local_addr().map_err(|e| StartError::Other(e.to_string()))?;
    Ok((listener, local))
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

/// How `tally serve` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The ledger's database file is closed (and a member's log) and
    /// nothing else needs cleaning up: the process may exit without
    /// freeing its memory.
    Closed,
    /// Something may still hold a file open (a reader the file waits for,
    /// a journal that did not stop in time, a member's state machine that
    /// could not be closed): the process exits the usual way, dropping
    /// everything.
    Open,
}

/// Runs `tally serve` until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> Result<Stopped, StartError> {
    raise_fd_limit();
    if config.cluster.is_some() {
        return serve_member(config).await;
    }
    let running = start(config).await?;
    announce(&running);
    wait_for_signal().await;
    tracing::info!("shutting down");
    let store = running.ctx.store.clone();
    let journal_stopped = running.shutdown(Duration::from_secs(10)).await;
    // Readers that outlived their requests get a little more time.
    let closed = journal_stopped && close_database(&store, Duration::from_secs(2)).await;
    Ok(if closed { Stopped::Closed } else { Stopped::Open })
}

/// Takes the database out of `store` and closes it, which marks the file
/// clean, once every reader still holding an `Arc` of it has let go,
/// waiting for them at most `wait`.
///
/// Called once the journal has stopped (nothing writes any more): what
/// follows (freeing the ledger's memory took 8-13 s with 10M accounts)
/// must not leave a file that a kill in that time (a container's stop
/// timeout) would make redb repair at the next start.
///
/// `false`: a reader held on (a scan that outlived its request), and the
/// file closes when it ends; or the close failed (a full or failing disk).
/// A kill then costs a repair, never a committed transfer. The key index's
/// filter thread holds only a `Weak` and reads through a transaction it
/// began: if it is still building the filter, that read fails and says
/// so, and the next start builds the filter again.
async fn close_database(store: &Store, wait: Duration) -> bool {
    match store.take() {
        Some(db) => close_file(db, wait, "database").await,
        None => false,
    }
}

/// Closes `db` once it is the last `Arc` of it, waiting for the others at
/// most `wait`; `what` names it in the log (`{what} closed`).
async fn close_file(mut db: Arc<Database>, wait: Duration, what: &'static str) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match Arc::try_unwrap(db) {
            Ok(only) => {
                // redb's close writes and syncs the header: off the runtime.
                return match tokio::task::spawn_blocking(move || only.close()).await {
                    Ok(Ok(())) => {
                        tracing::info!("{what} closed");
                        true
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, file = what, "the file did not close cleanly; the next start repairs it");
                        false
                    }
                    Err(_) => false,
                };
            }
            Err(shared) if tokio::time::Instant::now() < deadline => {
                db = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                tracing::warn!(file = what, "a reader still holds the file: it closes when that reader ends");
                return false;
            }
        }
    }
}

/// Runs a cluster member until SIGINT or SIGTERM: Raft all along, and the
/// ledger restarted whenever this member starts or stops leading. A new
/// leader first applies everything the cluster committed, then loads its
/// ledger from that; a follower serves `hello` and what needs no ledger,
/// and answers the rest `not_leader`.
async fn serve_member(config: Config) -> Result<Stopped, StartError> {
    let Some(c) = config.cluster.clone() else { return Err(StartError::Other("no [cluster]".into())) };
    // Read ahead until the first run below has loaded the ledger (every
    // run loads it, a follower's too).
    let (store, warming) = open_data(&config).await?;
    let mut warming = Some(warming);
    let node = crate::cluster::node::Node::start(&c, &config.data, store.clone(), config.ledger_limits())
        .await
        .map_err(StartError::Other)?;
    let bound = Bound::bind(&config).await?;
    let signal = wait_for_signal();
    tokio::pin!(signal);
    let mut metrics = node.raft.metrics();
    let mut announced = false;
    let journal_stopped = loop {
        if let Err(e) = &node.raft.metrics().borrow().running_state {
            return Err(StartError::Other(format!("raft stopped: {e}")));
        }
        let raft_leads = node.leading();
        // A leader serves once a majority confirms it and it has applied
        // everything committed; until then (a member restarted alone with
        // its old vote, say) it runs as a follower would, answering hello
        // and not_leader rather than leaving clients unanswered.
        let first_try = Duration::from_millis(crate::limits::CLUSTER_HEARTBEAT_MS * 5);
        let ready = raft_leads.is_some() && node.caught_up(first_try).await;
        let leading = raft_leads.filter(|_| ready);
        let deposed = CancellationToken::new();
        let serving = Arc::new(crate::cluster::node::Serving {
            view: node.view.clone(),
            raft: node.raft.clone(),
            leading,
            deposed: deposed.clone(),
            machine: node.machine.clone(),
            stale_reads: node.stale_reads.clone(),
            reads: node.reads.clone(),
        });
        let batches = match leading {
            Some(_) => crate::cluster::ledger::batches_applied(&*store.db()?)?,
            None => 0,
        };
        let replicate = leading.map(|_| crate::journal::Replicate {
            raft: node.raft.clone(),
            rt: tokio::runtime::Handle::current(),
            me: node.me,
            batches,
            deposed: deposed.clone(),
        });
        let running = start_on(config.clone(), store.clone(), &bound, Some((serving, replicate)), None).await?;
        drop(warming.take());
        node.machine.hand_over(running.ctx.users.clone())?;
        if !announced {
            announce(&running);
            announced = true;
        }
        match leading {
            Some(term) => tracing::info!(term, "leading: serving the ledger"),
            None => tracing::info!("following: refusing what only the leader serves"),
        }
        let stop = tokio::select! {
            () = leadership_changes(&mut metrics, &node, raft_leads) => false,
            () = deposed.cancelled() => false,
            () = catches_up(&node), if raft_leads.is_some() && !ready => false,
            () = &mut signal => true,
        };
        // This journal proposes nothing more, whatever it has queued: the
        // next one starts from what the cluster applied.
        deposed.cancel();
        let journal_stopped = running.shutdown(Duration::from_secs(if stop { 10 } else { 2 })).await;
        if stop {
            break journal_stopped;
        }
    };
    tracing::info!("shutting down");
    // Once Raft has stopped and the state machine refuses anything more,
    // both files close as a single server's does (see `close_database`).
    let Some((log, machine)) = node.stop().await else { return Ok(Stopped::Open) };
    let ledger = journal_stopped && close_database(&store, Duration::from_secs(2)).await;
    // Only Raft's core wrote the log, and it has stopped.
    let log = close_file(log, Duration::from_secs(2), "raft log").await;
    if ledger && log {
        // The process exits next and its memory goes with it: freeing the
        // book entry by entry would take seconds at 10M accounts.
        std::mem::forget(machine);
        return Ok(Stopped::Closed);
    }
    Ok(Stopped::Open)
}

/// Returns once this member, leading in Raft's eyes, is confirmed by a
/// majority and has applied everything committed.
async fn catches_up(node: &crate::cluster::node::Node) {
    let each = Duration::from_millis(crate::limits::CLUSTER_CATCH_UP_TIMEOUT_MS);
    while !node.caught_up(each).await {
        // A refusal comes back at once (no longer leader): not a busy loop.
        tokio::time::sleep(Duration::from_millis(crate::limits::CLUSTER_HEARTBEAT_MS)).await;
    }
}

/// Returns once this member starts or stops leading (or leads another
/// term), or Raft stops.
async fn leadership_changes(
    metrics: &mut tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, crate::cluster::Member>>,
    node: &crate::cluster::node::Node,
    leading: Option<u64>,
) {
    loop {
        if metrics.changed().await.is_err() || node.leading() != leading {
            return;
        }
    }
}

/// Prints the listening addresses.
fn announce(running: &Running) {
    // Tests and scripts read these lines to learn the ports: plaintext
    // first, as it has always been the first line.
    if let Some(addr) = running.addr {
        println!("tally listening on {addr}");
        tracing::info!(%addr, "listening");
    }
    if let Some(addr) = running.tls_addr {
        println!("tally listening with tls on {addr}");
        tracing::info!(%addr, "listening with TLS");
    }
    if let Some(addr) = running.http_addr {
        let tls = if running.ctx.config.tls.cert.is_some() { "https" } else { "http" };
        println!("tally listening with {tls} on {addr}");
        tracing::info!(%addr, "listening with {tls}");
    }
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
