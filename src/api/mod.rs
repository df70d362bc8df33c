//! The ops: one dispatch over the op table ([`Op`]), which checks who may
//! call the op, then hands it to its handler. Handlers check their
//! arguments and answer directly, hand the request to the owning shard or
//! the journal, or read the store off the async threads.
//!
//! - `status`: `hello`, `ping`, `help`, `health`, `stats`, `audit`;
//! - `users`: signup, login, tokens, passwords, `whoami`, `set_events`;
//! - `otp`: what waits for a mailed code: user transfers and holds,
//!   redeems, password resets; `confirm`, `resend`;
//! - `money`: balances, transfers, mints, accounts, history;
//! - `points`: the points manager's ops (`add`, `bulk_add`, `reap`, ...);
//! - `holds`: two-phase transfers and redeem requests;
//! - `keys`: service keys.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::{Binding, LoginGuard, Principal, Tokens, Users};
use crate::config::Config;
use crate::contract::{Command, JournalHandle};
use crate::error::{ApiError, ErrorCode};
use crate::journal::Health;
use crate::ledger::{self, Limits};
use crate::limits::{PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX, TAG_BYTES_MAX};
use crate::otp::OtpMsg;
use crate::reply::ReplyTo;
use crate::shard::{Outbox, ShardRouter};
use crate::stats::Stats;
use crate::store::Store;
use crate::wire::{Access, Op, Reply};

/// Decodes args or answers `bad_request` and returns from the caller.
macro_rules! args {
    ($ty:ty, $raw:expr, $reply:expr) => {
        match $crate::wire::frame::decode_args::<$ty>($raw) {
            Ok(a) => a,
            Err(e) => return $reply.err(e),
        }
    };
}

/// Unwraps a `Result<_, ApiError>` or answers with the error.
macro_rules! check {
    ($e:expr, $reply:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.err(e.into()),
        }
    };
}

mod batch;
mod holds;
pub(crate) mod keys;
mod members;
mod money;
mod otp;
mod points;
mod stale;
mod status;
mod users;

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
    /// Held while a key is made, so that the key count checked is exact.
    pub key_creation: tokio::sync::Mutex<()>,
    /// Its one permit is held while `audit` scans the journal: one scan at
    /// a time, however many callers ask.
    pub auditing: Arc<Semaphore>,
    /// `list_accounts` pages being read (`LIST_PAGES_AT_ONCE` at most).
    pub listing: Arc<Semaphore>,
    /// Test builds only (`fault-injection`): the permits of `auditing` and
    /// `listing` that `debug_hold` holds, and the wait that replaces theirs.
    #[cfg(feature = "fault-injection")]
    pub held: std::sync::Mutex<status::Held>,
    /// Cancelled when the server shuts down: readers stop taking requests.
    pub shutdown: CancellationToken,
    /// The OTP supervisor: pending one-time-password sessions.
    pub otp: ractor::ActorRef<OtpMsg>,
    /// The OTP mailer's queue (its permits are mails not yet handled).
    pub mail_queue: Arc<tokio::sync::Semaphore>,
    /// In a cluster: whether this run serves the ledger, and who leads.
    pub cluster: Option<Arc<crate::cluster::node::Serving>>,
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
    /// In a cluster, the read index's ticket when the requests being
    /// handled were read (none: take one when a read needs it). The
    /// pipelined reads of one socket read share a round.
    pub read_ticket: Option<u64>,
}

impl Session {
    #[must_use]
    pub fn new(peer: IpAddr) -> Session {
        Session { binding: None, peer, read_ms: 0, outbox: Outbox::default(), read_ticket: None }
    }
}

/// Handles one request. Ops that bind or unbind the connection (`login`,
/// `auth`, `logout`, `change_password`) and `signup` (which hashes a
/// password) are awaited here, so the connection's next request sees their
/// outcome; every other op is handed on and answered through `reply`
/// whenever it finishes.
pub async fn dispatch(ctx: &Arc<Ctx>, session: &mut Session, name: &str, args: &[u8], reply: ReplyTo) {
    let Some(op) = Op::parse(name) else {
        session.outbox.flush(&ctx.router);
        #[cfg(feature = "fault-injection")]
        match name {
            "debug_panic" => return status::debug_panic(ctx, session, args, reply),
            "debug_hold" => return status::debug_hold(ctx, session, args, reply),
            "debug_release" => return status::debug_release(ctx, session, args, reply),
            _ => {}
        }
        return reply.err(ApiError::new(ErrorCode::UnknownOp, format!("unknown op {name:?}: try help")));
    };
    // A member that does not serve the ledger answers only what needs
    // none of it: who it is, checks of a token or of its own copy, and
    // reads that ask for what it has applied (`consistency = "stale"`).
    let mut stale = None;
    if let Some(c) = &ctx.cluster {
        if !matches!(op, Op::Hello | Op::Ping | Op::Help | Op::Auth | Op::Whoami | Op::Audit) {
            // A leader cut off from its majority may have been replaced
            // without knowing it: it serves nothing as current, not even a
            // read of what it holds, once no majority has answered it for
            // a while.
            let refused = if c.serves() { c.lease_lost() } else { Some(c.view.not_leader()) };
            if let Some(e) = refused {
                session.outbox.flush(&ctx.router);
                if !stale::wanted(op, args) {
                    return reply.err(e);
                }
                stale = Some(check!(stale::admit(c), reply));
            }
        }
    }
    // Debits read before this op go first: it may touch the same accounts.
    if !op.is_batched_debit() {
        session.outbox.flush(&ctx.router);
    }
    let access = op.access();
    let caller = if access == Access::Anyone {
        None
    } else {
        let p = check!(users::current(ctx, session), reply);
        if !access.allows(Some(p.role)) {
            let role = p.role.as_str();
            return reply.err(ApiError::forbidden(format!("the role {role} may not call {}", op.name())));
        }
        if p.accounts.is_some() && matches!(op, Op::BulkAdd | Op::Reap | Op::DeleteAccount) {
            // These move money out of many accounts at once (or out of
            // the one deleted): not for a key limited to some.
            return reply.err(ApiError::forbidden(format!("a key limited to accounts may not call {}", op.name())));
        }
        if p.role.is_staff() && LOGGED_ACTIONS.contains(&op) {
            tracing::info!(target: "security", by = %p.user, role = p.role.as_str(), op = op.name(), args = %args_for_log(args), "staff action");
        }
        Some(p)
    };
    let p = || caller.clone().expect("checked above: the op needs a caller");
    if let Some(admitted) = stale {
        return stale::read(admitted, op, p(), args, reply);
    }
    if let Some(c) = ctx.cluster.as_ref().filter(|_| op.reads_ledger()) {
        // Awaited here, so the connection's later requests (a debit of
        // the same account, say) still reach the owners after this read.
        let ticket = session.read_ticket.unwrap_or_else(|| c.reads.ticket());
        check!(c.confirm_read(ticket).await, reply);
    }
    match op {
        Op::Hello => status::hello(ctx, session, args, reply),
        Op::Ping => status::ping(args, reply),
        Op::Help => status::help(args, reply),
        Op::Health => status::health(ctx, args, reply),
        Op::Stats => status::stats(ctx, args, reply),
        Op::Audit => status::audit(ctx, args, reply),
        Op::Signup => users::signup(ctx, session, args, reply).await,
        Op::Login => users::login(ctx, session, args, reply).await,
        Op::Auth => users::auth(ctx, session, args, reply),
        Op::Whoami => users::whoami(ctx, p(), args, reply),
        Op::Logout => users::logout(ctx, session, p(), args, reply).await,
        Op::ChangePassword => users::change_password(ctx, session, p(), args, reply).await,
        Op::SetEvents => users::set_events(ctx, args, reply),
        Op::ResetPassword => otp::reset_password(ctx, session, args, reply),
        Op::Confirm => otp::confirm(ctx, session, args, reply),
        Op::Resend => otp::resend(ctx, session, args, reply),
        Op::Balance => money::read(ctx, p(), args, crate::shard::ReadKind::Balance, reply),
        Op::Account => money::read(ctx, p(), args, crate::shard::ReadKind::Account, reply),
        Op::Transfer => money::transfer(ctx, p(), args, session, reply),
        Op::TransferBatch => batch::transfer_batch(ctx, p(), args, session, reply),
        Op::Mint => money::mint(ctx, p(), args, session, reply),
        Op::CreateAccount => money::create_account(ctx, p(), args, reply),
        Op::History => money::history(ctx, p(), args, reply),
        Op::GetTransfer => money::get_transfer(ctx, p(), args, reply),
        Op::Add => points::add(ctx, p(), args, reply),
        Op::DeleteAccount => points::delete_account(ctx, p(), args, reply),
        Op::DeleteReason => points::delete_reason(ctx, args, reply),
        Op::ListAccounts => points::list_accounts(ctx, args, reply),
        Op::Tag => points::tag(ctx, args, reply),
        Op::BulkAdd => points::bulk_add(ctx, p(), args, reply),
        Op::Reap => points::reap(ctx, p(), args, reply),
        Op::Backup => points::backup(ctx, args, reply),
        Op::Hold => holds::hold(ctx, p(), args, session.peer, reply),
        Op::Post => holds::post(ctx, p(), args, reply),
        Op::Void => holds::void(ctx, p(), args, reply),
        Op::Redeem => holds::redeem(ctx, p(), args, session.peer, reply),
        Op::MyRedeems => holds::my_redeems(ctx, p(), args, reply),
        Op::Redeems => holds::redeems(ctx, args, reply),
        Op::DecideRedeem => holds::decide_redeem(ctx, p(), args, reply),
        Op::CreateKey => keys::create_key(ctx, p(), args, reply),
        Op::ListKeys => keys::list_keys(ctx, args, reply),
        Op::RevokeKey => keys::revoke_key(ctx, p(), args, reply),
        Op::CreateUser => users::create_user(ctx, p(), args, reply).await,
        Op::AddNode => members::add_node(ctx, args, reply),
        Op::RemoveNode => members::remove_node(ctx, args, reply),
    }
}

/// Staff ops written to the security log with their arguments and the
/// acting user or key (the journal's records name the actor too; this
/// covers the ops that write none).
const LOGGED_ACTIONS: &[Op] = &[
    Op::AddNode,
    Op::RemoveNode,
    Op::Mint,
    Op::Add,
    Op::SetEvents,
    Op::DecideRedeem,
    Op::DeleteAccount,
    Op::BulkAdd,
    Op::Reap,
    Op::Backup,
    Op::Tag,
    Op::CreateKey,
    Op::RevokeKey,
    Op::CreateUser,
];

/// An op's arguments as compact JSON for a log line: secrets redacted,
/// cut at 512 bytes.
fn args_for_log(args: &[u8]) -> String {
    let Ok(mut v) = rmp_serde::from_slice::<serde_json::Value>(args) else {
        return "<not a map>".to_owned();
    };
    if let Some(m) = v.as_object_mut() {
        for (k, val) in m.iter_mut() {
            if k.contains("password") || k.contains("secret") || k.contains("token") {
                *val = serde_json::Value::String("<redacted>".into());
            }
        }
    }
    let mut s = v.to_string();
    if s.len() > 512 {
        let mut end = 509;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// Runs `f` on the blocking pool and answers with its result.
fn blocking<F>(reply: ReplyTo, f: F)
where
    F: FnOnce() -> Result<Reply, ApiError> + Send + 'static,
{
    tokio::spawn(async move { reply.send(on_blocking_pool(f).await) });
}

/// `f`'s result, run on the blocking pool (`internal` if it panicked).
async fn on_blocking_pool<F>(f: F) -> Result<Reply, ApiError>
where
    F: FnOnce() -> Result<Reply, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|_| Err(ApiError::internal("the query failed")))
}

/// Runs `f` on the blocking pool once `limit` gives it a permit, and
/// answers with its result: at most as many run at once as `limit` has
/// permits, and the others wait their turn (the callers' reply slots bound
/// how many can wait), each at most `wait`, then refused `overloaded`.
/// Once `stop` is cancelled (the server is shutting down) a query still
/// waiting is refused `unavailable` instead of starting a long read that
/// the shutdown would then wait for.
fn blocking_within<F>(limit: Arc<Semaphore>, wait: std::time::Duration, stop: CancellationToken, reply: ReplyTo, f: F)
where
    F: FnOnce() -> Result<Reply, ApiError> + Send + 'static,
{
    tokio::spawn(async move {
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => {
                return reply.err(ApiError::new(ErrorCode::Unavailable, "the server is shutting down; retry"))
            }
            permit = tokio::time::timeout(wait, limit.acquire_owned()) => permit,
        };
        let permit = match permit {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return reply.err(ApiError::internal("the query could not start")),
            Err(_) => {
                return reply.err(ApiError::new(
                    ErrorCode::Overloaded,
                    format!("too many such queries at once: none started within {} ms; retry", wait.as_millis()),
                ))
            }
        };
        let r = on_blocking_pool(move || {
            let _permit = permit;
            f()
        })
        .await;
        reply.send(r);
    });
}

/// How long a `list_accounts` page or an `audit` waits for its turn:
/// `max_ms`, or in test builds the wait `debug_hold` set while it holds
/// their permits.
fn scan_wait(ctx: &Ctx, max_ms: u64) -> std::time::Duration {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = ctx.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).wait_ms {
        return std::time::Duration::from_millis(ms);
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = ctx;
    std::time::Duration::from_millis(max_ms)
}

/// Sends the journal a command that answers through `done` once
/// committed, and waits for that answer.
async fn commit<T>(
    ctx: &Ctx,
    command: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, ApiError>>) -> Command,
) -> Result<T, ApiError> {
    let stopped = || ApiError::internal("the journal has stopped");
    let (done, answer) = tokio::sync::oneshot::channel();
    ctx.journal.send(command(done)).map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())?
}

/// Queues a command for the journal; answers `internal` if it has stopped.
fn to_journal(ctx: &Ctx, cmd: Command) {
    if let Err(cmd) = ctx.journal.send(cmd) {
        if let Some(reply) = cmd.admin_reply() {
            reply.err(ApiError::internal("the journal has stopped"));
        }
    }
}

/// The page size asked for: default 100, at most `PAGE_LIMIT_MAX`.
fn page_limit(limit: Option<u64>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(PAGE_LIMIT_DEFAULT),
        Some(l) if (1..=PAGE_LIMIT_MAX as u64).contains(&l) => Ok(l as usize),
        Some(_) => Err(ApiError::bad_request(format!("limit must be 1..={PAGE_LIMIT_MAX}"))),
    }
}

/// Tags are 1-`TAG_BYTES_MAX` bytes.
fn validate_tags(tags: &[String]) -> Result<(), ApiError> {
    if tags.iter().any(|t| t.is_empty() || t.len() > TAG_BYTES_MAX) {
        return Err(ApiError::bad_request(format!("tags are 1-{TAG_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn account_id(id: &str) -> Result<(), ApiError> {
    ledger::validate_account_id(id).map_err(ApiError::from)
}

/// The checks every debit's arguments pass, wherever it comes from.
fn validate_transfer(from: &str, to: &str, amount: i64, memo: Option<&str>, key: Option<&str>) -> Result<(), ApiError> {
    account_id(from)?;
    account_id(to)?;
    ledger::validate_amount(amount)?;
    ledger::validate_memo_key(memo, key)?;
    if from == to {
        return Err(ledger::LedgerError::SameAccount.into());
    }
    Ok(())
}

/// The caller's own account when the request names none.
fn own(p: &Principal, account: Option<String>) -> String {
    account.unwrap_or_else(|| p.user.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::{Duration, Instant};

    use super::*;

    /// Six queries behind a limit of two: never more than two run, two do
    /// run together, and every caller is answered once released.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_within_a_limit_run_at_most_its_permits_at_once() {
        let limit = Arc::new(Semaphore::new(2));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (go, released) = crossbeam_channel::unbounded::<()>();
        let mut answers = Vec::new();
        for i in 0..6 {
            let (reply, answer) = ReplyTo::channel();
            let (running, most, released) = (running.clone(), most.clone(), released.clone());
            blocking_within(limit.clone(), Duration::from_secs(30), CancellationToken::new(), reply, move || {
                most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                let waited = released.recv_timeout(Duration::from_secs(30));
                running.fetch_sub(1, SeqCst);
                waited.map_err(|_| ApiError::internal("never released"))?;
                Ok(Reply::Text(["q0", "q1", "q2", "q3", "q4", "q5"][i]))
            });
            answers.push(answer);
        }
        // Every query has been handed over; wait (bounded) until the limit
        // is full, which needs two of them running.
        let deadline = Instant::now() + Duration::from_secs(30);
        while running.load(SeqCst) < 2 {
            assert!(Instant::now() < deadline, "two queries never ran together");
            tokio::task::yield_now().await;
        }
        assert_eq!(limit.available_permits(), 0);
        for _ in 0..6 {
            go.send(()).unwrap();
        }
        for (i, mut answer) in answers.into_iter().enumerate() {
            let o = tokio::time::timeout(Duration::from_secs(30), answer.recv()).await.unwrap().unwrap();
            assert!(matches!(o.result, Ok(Reply::Text(t)) if t == format!("q{i}")), "query {i}");
        }
        assert_eq!(most.load(SeqCst), 2);
        assert_eq!(limit.available_permits(), 2);
    }

    /// A query that cannot get a permit within its wait is refused
    /// `overloaded` and never runs; the one holding the permit finishes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_that_waits_too_long_is_refused_overloaded() {
        let limit = Arc::new(Semaphore::new(1));
        let (go, released) = crossbeam_channel::unbounded::<()>();
        let (first, mut first_answer) = ReplyTo::channel();
        blocking_within(limit.clone(), Duration::from_secs(30), CancellationToken::new(), first, move || {
            released.recv_timeout(Duration::from_secs(30)).map_err(|_| ApiError::internal("never released"))?;
            Ok(Reply::Text("first"))
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while limit.available_permits() > 0 {
            assert!(Instant::now() < deadline, "the first query never started");
            tokio::task::yield_now().await;
        }
        let ran = Arc::new(AtomicUsize::new(0));
        let (second, mut second_answer) = ReplyTo::channel();
        let r = ran.clone();
        blocking_within(limit.clone(), Duration::from_millis(50), CancellationToken::new(), second, move || {
            r.fetch_add(1, SeqCst);
            Ok(Reply::Text("second"))
        });
        // The first holds the only permit until released, which happens
        // only after the second has been answered.
        let o = tokio::time::timeout(Duration::from_secs(30), second_answer.recv()).await.unwrap().unwrap();
        assert_eq!(o.result.unwrap_err().code, ErrorCode::Overloaded);
        go.send(()).unwrap();
        let o = tokio::time::timeout(Duration::from_secs(30), first_answer.recv()).await.unwrap().unwrap();
        assert!(matches!(o.result, Ok(Reply::Text("first"))));
        assert_eq!(ran.load(SeqCst), 0);
        assert_eq!(limit.available_permits(), 1);
    }

    /// Once the server stops, a query still waiting for its turn is
    /// refused `unavailable` at once (not after its wait) and never runs,
    /// and one asked after that does not run even with a permit free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_queries_are_refused_unavailable_when_the_server_stops() {
        let limit = Arc::new(Semaphore::new(1));
        let stop = CancellationToken::new();
        let held = limit.clone().acquire_owned().await.unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let ask = |reply| {
            let r = ran.clone();
            blocking_within(limit.clone(), Duration::from_secs(3600), stop.clone(), reply, move || {
                r.fetch_add(1, SeqCst);
                Ok(Reply::Text("ran"))
            });
        };
        let (waiting, mut waiting_answer) = ReplyTo::channel();
        ask(waiting);
        stop.cancel();
        let o = tokio::time::timeout(Duration::from_secs(30), waiting_answer.recv()).await.unwrap().unwrap();
        assert_eq!(o.result.unwrap_err().code, ErrorCode::Unavailable);
        drop(held);
        let (late, mut late_answer) = ReplyTo::channel();
        ask(late);
        let o = tokio::time::timeout(Duration::from_secs(30), late_answer.recv()).await.unwrap().unwrap();
        assert_eq!(o.result.unwrap_err().code, ErrorCode::Unavailable);
        assert_eq!(ran.load(SeqCst), 0);
        assert_eq!(limit.available_permits(), 1);
    }
}
