//! Ops about the server itself: `hello`, `ping`, `help`, `health`, and the
//! admin's `stats` and `audit`.

use std::sync::Arc;

use super::{blocking_within, scan_wait, Ctx, Session};
use crate::contract::Command;
use crate::error::{ApiError, ErrorCode};
use crate::limits::{HEALTH_FRESH_MS, HEALTH_PROBE_TIMEOUT_MS};
use crate::reply::ReplyTo;
use crate::stats::Stats;
use crate::store;
use crate::wire::{HealthReply, HelloReply, NoArgs, Op, Reply, StatsReply, PROTOCOL_VERSION};

pub(super) fn hello(ctx: &Ctx, session: &Session, args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    // The build is for logged-in callers only: to anyone else it would say
    // which known bugs the server has.
    let version = session.binding.is_some().then_some(env!("CARGO_PKG_VERSION"));
    let mut hello = HelloReply { server: "tally", version, protocol: PROTOCOL_VERSION, ..HelloReply::default() };
    // In a cluster, who leads: what a client needs to find the leader.
    if let Some(c) = &ctx.cluster {
        let seen = c.view.seen();
        // A leader still catching up, stepping down or without its lease
        // does not serve: clients should look elsewhere.
        let serves = c.serves() && c.lease_lost().is_none();
        let role = if seen.role == "leader" && !serves { "candidate" } else { seen.role };
        hello.leader = Some(seen.leader.filter(|(id, _)| *id != c.view.node || serves).map(|(_, client)| client));
        (hello.role, hello.term, hello.node) = (Some(role), Some(seen.term), Some(c.view.node));
    }
    reply.ok(Reply::Hello(hello));
}

pub(super) fn ping(args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    reply.ok(Reply::Text("pong"));
}

pub(super) fn help(args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    reply.ok(Reply::List(Op::NAMES));
}

/// `health`: `ok` only when the journal can commit. A commit in the last
/// second proves it; otherwise a probe rides in the next batch (so a flood
/// of `health` costs one commit, whatever its size), and no answer within
/// 5 s is `unavailable` too.
pub(super) fn health(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    let unavailable = |why: String| ApiError::new(ErrorCode::Unavailable, format!("the journal cannot commit: {why}"));
    if let Err(why) = ctx.health.status() {
        return reply.err(unavailable(why));
    }
    if crate::clock::now_ms().saturating_sub(ctx.health.last_commit_ms()) < HEALTH_FRESH_MS {
        return reply.ok(Reply::Health(HealthReply { status: "ok" }));
    }
    let (done, answer) = tokio::sync::oneshot::channel();
    if ctx.journal.send(Command::Probe(done)).is_err() {
        return reply.err(unavailable("it has stopped".into()));
    }
    tokio::spawn(async move {
        let wait = std::time::Duration::from_millis(HEALTH_PROBE_TIMEOUT_MS);
        let r = match tokio::time::timeout(wait, answer).await {
            Ok(Ok(Ok(()))) => Ok(Reply::Health(HealthReply { status: "ok" })),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(unavailable("it has stopped".into())),
            Err(_) => Err(unavailable(format!("no commit within {} s", wait.as_secs()))),
        };
        reply.send(r);
    });
}

pub(super) fn stats(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let otp_sessions = match ctx.otp.call(crate::otp::OtpMsg::Count, None).await {
            Ok(ractor::rpc::CallResult::Success(n)) => n as u64,
            _ => return reply.err(ApiError::internal("the OTP supervisor is not running")),
        };
        reply.ok(Reply::Stats(counters(&ctx, otp_sessions)));
    });
}

fn counters(ctx: &Ctx, otp_sessions: u64) -> StatsReply {
    let s = &ctx.stats;
    let commits = Stats::get(&s.commits);
    let items = Stats::get(&s.batch_items);
    let inflight = ctx.config.limits.inflight_max.saturating_sub(ctx.inflight.available_permits());
    StatsReply {
        connections: Stats::get(&s.connections),
        connections_total: Stats::get(&s.connections_total),
        ops: Stats::get(&s.ops),
        transfers: Stats::get(&s.transfers),
        commits,
        batch_items: items,
        batch_max: Stats::get(&s.batch_max),
        batch_mean: if commits == 0 { 0.0 } else { items as f64 / commits as f64 },
        journal_queue: ctx.journal.depth() as u64,
        inflight: inflight as u64,
        otp_sessions,
    }
}

/// `audit` reads the whole journal: one scan at a time on the blocking
/// pool, so callers asking over and over (any staff role may) queue behind
/// each other instead of taking every blocking thread, each at most
/// `AUDIT_WAIT_MAX_MS`.
pub(super) fn audit(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    let store = ctx.store.clone();
    let wait = scan_wait(ctx, crate::limits::AUDIT_WAIT_MAX_MS);
    blocking_within(ctx.auditing.clone(), wait, ctx.shutdown.clone(), reply, move || {
        store::audit(&*store.db()?, store.history()).map(Reply::Audit).map_err(ApiError::from)
    });
}

/// Test builds only (`fault-injection`): the debug ops are for admins.
#[cfg(feature = "fault-injection")]
fn admin_only(ctx: &Ctx, session: &mut Session) -> Result<(), ApiError> {
    if super::users::current(ctx, session)?.is_admin() {
        Ok(())
    } else {
        Err(ApiError::forbidden("this op is for admins"))
    }
}

/// Test builds only (`fault-injection`): the admin op `debug_panic
/// {account}` panics the shard owning the account, as a bug would.
#[cfg(feature = "fault-injection")]
pub(super) fn debug_panic(ctx: &Arc<Ctx>, session: &mut Session, args: &[u8], reply: ReplyTo) {
    check!(admin_only(ctx, session), reply);
    let a = args!(crate::wire::AccountOnly, args, reply);
    tracing::warn!(account = %a.account, "fault injection: panicking the shard that owns this account");
    ctx.router.send(&a.account, crate::shard::ShardMsg::Panic);
    reply.ok(Reply::Text("sent"));
}

/// What `debug_hold` holds: permits taken from `auditing` or `listing`, as
/// long scans would hold them, and the wait that replaces both scans' own
/// meanwhile, so that a test sees a scan refused at the end of its wait
/// without waiting minutes.
#[cfg(feature = "fault-injection")]
#[derive(Default)]
pub struct Held {
    permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    pub(super) wait_ms: Option<u64>,
}

#[cfg(feature = "fault-injection")]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldArgs {
    /// `audit` or `list_accounts`.
    what: String,
    /// How many of that scan's permits to take (it has 1 or 2).
    permits: u32,
    /// How long either scan then waits for its turn before `overloaded`.
    wait_ms: u64,
}

/// Test builds only (`fault-injection`): the admin op `debug_hold {what,
/// permits, wait_ms}` takes `permits` of the scans' permits for `what`
/// (`audit` or `list_accounts`) and holds them until `debug_release`;
/// meanwhile both scans wait `wait_ms` for their turn.
#[cfg(feature = "fault-injection")]
pub(super) fn debug_hold(ctx: &Arc<Ctx>, session: &mut Session, args: &[u8], reply: ReplyTo) {
    check!(admin_only(ctx, session), reply);
    let a = args!(HoldArgs, args, reply);
    let semaphore = match a.what.as_str() {
        "audit" => &ctx.auditing,
        "list_accounts" => &ctx.listing,
        _ => return reply.err(ApiError::bad_request("what must be audit or list_accounts")),
    };
    let Ok(permits) = semaphore.clone().try_acquire_many_owned(a.permits) else {
        return reply.err(ApiError::new(ErrorCode::Overloaded, "not that many permits are free"));
    };
    let mut held = ctx.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    held.permits.push(permits);
    held.wait_ms = Some(a.wait_ms);
    reply.ok(Reply::Text("held"));
}

/// Test builds only (`fault-injection`): `debug_release {}` gives back
/// every permit `debug_hold` holds, and the scans their own waits.
#[cfg(feature = "fault-injection")]
pub(super) fn debug_release(ctx: &Arc<Ctx>, session: &mut Session, args: &[u8], reply: ReplyTo) {
    check!(admin_only(ctx, session), reply);
    args!(NoArgs, args, reply);
    *ctx.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Held::default();
    reply.ok(Reply::Text("released"));
}
