//! The dispatcher: checks each op's arguments and caller, then answers it
//! directly, hands it to the owning shard, or reads the store off the
//! async threads.

use std::net::IpAddr;
use std::sync::Arc;

use crate::auth::{Principal, Role};
use crate::constants::{PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX, TAGS_PER_ACCOUNT_MAX, TAG_BYTES_MAX, USER_ID_BYTES_MAX};
use crate::error::{ApiError, ErrorCode};
use crate::journal::{CreateCmd, Shape, UserChange};
use crate::ledger::{self, is_system, Kind, MINT};
use crate::protocol::{
    AccountArg, AuditReply, AuthArgs, ChangePasswordArgs, ConfirmArgs, CreateAccountArgs, GetTransferArgs, HealthReply,
    HelloReply, HistoryArgs, LoginArgs, MintArgs, NoArgs, Reply, ResendArgs, ResetPasswordArgs, SetEventsArgs,
    SignupArgs, StatsReply, TransferArgs, OPS, PROTOCOL_VERSION,
};
use crate::reply::ReplyTo;
use crate::server::{Ctx, Session};
use crate::shard::{DebitReq, HistoryReq, Outbox, ReadKind, ReadReq, ShardMsg};
use crate::stats::Stats;
use crate::store::{self, AccountMeta};

/// Decodes args or answers `bad_request` and returns from the caller.
macro_rules! args {
    ($ty:ty, $raw:expr, $reply:expr) => {
        match $crate::frame::decode_args::<$ty>($raw) {
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

mod holds;
mod otp;
mod points;
mod users;

fn admin_only(p: &Principal) -> Result<(), ApiError> {
    if p.is_admin() {
        Ok(())
    } else {
        Err(ApiError::forbidden("this op is for admins"))
    }
}

/// Runs `f` on the blocking pool and answers with its result.
fn blocking<F>(reply: ReplyTo, f: F)
where
    F: FnOnce() -> Result<Reply, ApiError> + Send + 'static,
{
    tokio::spawn(async move {
        let r = tokio::task::spawn_blocking(f).await.unwrap_or_else(|_| Err(ApiError::internal("the query failed")));
        reply.send(r);
    });
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

/// Handles one request. Ops that bind or unbind the connection (`login`,
/// `auth`, `logout`, `change_password`) and `signup` (which hashes a
/// password) are awaited here, so the connection's next request sees their
/// outcome; every other op is handed on and answered through `reply`
/// whenever it finishes.
pub async fn dispatch(ctx: &Arc<Ctx>, session: &mut Session, op: &str, args: &[u8], reply: ReplyTo) {
    // Debits read before this op go first: it may touch the same accounts.
    if op != "transfer" && op != "mint" {
        session.outbox.flush(&ctx.router);
    }
    match op {
        "hello" => {
            args!(NoArgs, args, reply);
            // The build is for logged-in callers only: to anyone else it
            // would say which known bugs the server has.
            let version = session.binding.is_some().then_some(env!("CARGO_PKG_VERSION"));
            reply.ok(Reply::Hello(HelloReply { server: "tally", version, protocol: PROTOCOL_VERSION }));
        }
        "ping" => {
            args!(NoArgs, args, reply);
            reply.ok(Reply::Text("pong"));
        }
        "health" => {
            args!(NoArgs, args, reply);
            health(ctx, reply);
        }
        "help" => {
            args!(NoArgs, args, reply);
            reply.ok(Reply::List(OPS));
        }
        "signup" => {
            let a = args!(SignupArgs, args, reply);
            let (meta, user) = check!(users::signup(ctx, a).await, reply);
            tracing::info!(target: "security", user = %user.user, source = %session.peer, "signup");
            let account = user.user.clone();
            ctx.router.send(
                &account,
                ShardMsg::Create(Box::new(CreateCmd {
                    account: account.as_str().into(),
                    meta,
                    initial: 0,
                    user: Some(user),
                    reply,
                })),
            );
        }
        "login" => {
            let a = args!(LoginArgs, args, reply);
            reply.send(users::login(ctx, session, a).await);
        }
        "auth" => {
            let a = args!(AuthArgs, args, reply);
            reply.send(users::bind_token(ctx, session, &a.token));
        }
        // Anyone may reset a password; confirm and resend check the caller
        // against the session (a reset is confirmed by whoever has the code).
        "reset_password" => {
            let a = args!(ResetPasswordArgs, args, reply);
            otp::reset_password(ctx, a.user, Some(session.peer), reply);
        }
        "confirm" => {
            let a = args!(ConfirmArgs, args, reply);
            let caller = users::current(ctx, session).ok();
            otp::confirm(ctx, caller, a, Some(session.peer), reply);
        }
        "resend" => {
            let a = args!(ResendArgs, args, reply);
            let caller = users::current(ctx, session).ok();
            otp::resend(ctx, caller, a, reply);
        }
        _ => {
            if !OPS.contains(&op) && !cfg!(feature = "fault-injection") {
                return reply.err(ApiError::new(ErrorCode::UnknownOp, format!("unknown op {op:?}: try help")));
            }
            let p = check!(users::current(ctx, session), reply);
            match op {
                "logout" => {
                    args!(NoArgs, args, reply);
                    reply.send(users::logout(ctx, session, &p).await);
                }
                "change_password" => {
                    let a = args!(ChangePasswordArgs, args, reply);
                    reply.send(users::change_password(ctx, session, &p, a).await);
                }
                _ => authed(ctx, p, op, args, reply, Some(session.peer), &mut session.outbox),
            }
        }
    }
}

/// Runs an op of a logged-in caller. Debits of `transfer` and `mint` wait in
/// `outbox` for the reader to send them (see [`Outbox`]).
fn authed(
    ctx: &Arc<Ctx>,
    p: Principal,
    op: &str,
    args: &[u8],
    reply: ReplyTo,
    source: Option<IpAddr>,
    outbox: &mut Outbox,
) {
    if p.is_admin() && ADMIN_ACTIONS.contains(&op) {
        tracing::info!(target: "security", user = %p.user, op, args = %args_for_log(args), "admin action");
    }
    match op {
        "whoami" => {
            args!(NoArgs, args, reply);
            let store = ctx.store.clone();
            blocking(reply, move || {
                let db = store.db()?;
                let u = store::get_user(&db, &p.user)?.ok_or_else(|| ApiError::not_found("user"))?;
                Ok(Reply::Json(crate::protocol::user_view(&u)))
            });
        }
        "balance" | "account" => {
            let a = args!(AccountArg, args, reply);
            let account = a.account.unwrap_or_else(|| p.user.to_string());
            check!(account_id(&account), reply);
            let kind = if op == "balance" { ReadKind::Balance } else { ReadKind::Account };
            ctx.router.send(
                &account,
                ShardMsg::Read(Box::new(ReadReq { account: account.as_str().into(), kind, principal: p, reply })),
            );
        }
        "transfer" => {
            let a = args!(TransferArgs, args, reply);
            let from = a.from.unwrap_or_else(|| p.user.to_string());
            check!(validate_transfer(&from, &a.to, a.amount, a.memo.as_deref(), a.key.as_deref()), reply);
            if from == MINT {
                return reply.err(ApiError::bad_request("use mint to issue from @mint"));
            }
            if p.role == Role::User {
                let action =
                    crate::otp::Action::Transfer { from, to: a.to, amount: a.amount, memo: a.memo, key: a.key };
                return otp::user_transfer(ctx, p, action, source, reply);
            }
            let req = DebitReq::new(Kind::Transfer, Shape::Transfer, from, a.to, a.amount, a.memo, a.key, p, reply);
            outbox.push(&ctx.router, req);
        }
        "mint" => {
            check!(admin_only(&p), reply);
            let a = args!(MintArgs, args, reply);
            check!(validate_transfer(MINT, &a.to, a.amount, a.memo.as_deref(), a.key.as_deref()), reply);
            let req = DebitReq::new(Kind::Mint, Shape::Transfer, MINT, a.to, a.amount, a.memo, a.key, p, reply);
            outbox.push(&ctx.router, req);
        }
        "create_account" => {
            check!(admin_only(&p), reply);
            let a = args!(CreateAccountArgs, args, reply);
            let (account, meta, initial) = check!(validate_create(ctx, a), reply);
            ctx.router.send(
                &account,
                ShardMsg::Create(Box::new(CreateCmd {
                    account: account.as_str().into(),
                    meta,
                    initial,
                    user: None,
                    reply,
                })),
            );
        }
        "history" => {
            let a = args!(HistoryArgs, args, reply);
            let account = a.account.unwrap_or_else(|| p.user.to_string());
            check!(account_id(&account), reply);
            let limit = check!(page_limit(a.limit), reply);
            let req = HistoryReq { account: account.as_str().into(), after: a.after, limit, principal: p, reply };
            ctx.router.send(&account, ShardMsg::History(Box::new(req)));
        }
        "get_transfer" => {
            let a = args!(GetTransferArgs, args, reply);
            let store = ctx.store.clone();
            blocking(reply, move || {
                let db = store.db()?;
                let t =
                    store::get_transfer(&db, a.id)?.ok_or_else(|| ApiError::not_found(format!("transfer {}", a.id)))?;
                if !p.is_admin() {
                    let party = [&t.from, &t.to].into_iter().any(|acct| {
                        store::account_meta(&db, acct)
                            .ok()
                            .flatten()
                            .is_some_and(|m| m.owner.as_deref() == Some(&*p.user))
                    });
                    if !party {
                        return Err(ApiError::forbidden(format!("transfer {} is not yours", a.id)));
                    }
                }
                Ok(Reply::Transfer(Arc::new(t)))
            });
        }
        "set_events" => {
            check!(admin_only(&p), reply);
            let a = args!(SetEventsArgs, args, reply);
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let r = users::change(&ctx, &a.user, UserChange::Events(a.events)).await;
                reply.send(r.map(|u| Reply::Json(crate::protocol::user_view(&u))));
            });
        }
        "audit" => {
            check!(admin_only(&p), reply);
            args!(NoArgs, args, reply);
            let store = ctx.store.clone();
            blocking(reply, move || {
                let db = store.db()?;
                let a: AuditReply = store::audit(&db)?;
                Ok(Reply::Audit(a))
            });
        }
        "stats" => {
            check!(admin_only(&p), reply);
            args!(NoArgs, args, reply);
            let s = &ctx.stats;
            let commits = Stats::get(&s.commits);
            let items = Stats::get(&s.batch_items);
            let inflight = ctx.config.limits.inflight_max.saturating_sub(ctx.inflight.available_permits());
            reply.ok(Reply::Stats(StatsReply {
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
            }));
        }
        #[cfg(feature = "fault-injection")]
        "debug_panic" => {
            check!(admin_only(&p), reply);
            let a = args!(crate::protocol::AccountOnly, args, reply);
            tracing::warn!(account = %a.account, "fault injection: panicking the shard that owns this account");
            ctx.router.send(&a.account, ShardMsg::Panic);
            reply.ok(Reply::Text("sent"));
        }
        _ => holds::handle(ctx, p, op, args, source, reply),
    }
}

/// Admin ops written to the security log with their arguments (the
/// journal keeps the records; this says who asked, and for the ops that
/// write none, what).
const ADMIN_ACTIONS: &[&str] =
    &["mint", "add", "set_events", "decide_redeem", "delete_account", "bulk_add", "reap", "backup", "tag"];

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

/// A commit this recent proves the journal can commit without asking it.
const HEALTH_FRESH_MS: u64 = 1000;
/// Longest `health` waits for a probe to be committed.
const HEALTH_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `health`: `ok` only when the journal can commit. A commit in the last
/// second proves it; otherwise a probe rides in the next batch (so a flood
/// of `health` costs one commit, whatever its size), and no answer within
/// 5 s is `unavailable` too.
fn health(ctx: &Arc<Ctx>, reply: ReplyTo) {
    let unavailable = |why: String| ApiError::new(ErrorCode::Unavailable, format!("the journal cannot commit: {why}"));
    if let Err(why) = ctx.health.status() {
        return reply.err(unavailable(why));
    }
    if store::now_ms().saturating_sub(ctx.health.last_commit_ms()) < HEALTH_FRESH_MS {
        return reply.ok(Reply::Health(HealthReply { status: "ok" }));
    }
    let (done, answer) = tokio::sync::oneshot::channel();
    if ctx.journal.send(crate::journal::Command::Probe(done)).is_err() {
        return reply.err(unavailable("it has stopped".into()));
    }
    tokio::spawn(async move {
        let r = match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, answer).await {
            Ok(Ok(Ok(()))) => Ok(Reply::Health(HealthReply { status: "ok" })),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(unavailable("it has stopped".into())),
            Err(_) => Err(unavailable("no commit within 5 s".into())),
        };
        reply.send(r);
    });
}

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

/// Hands a debit to the shard owning its source account.
fn debit(ctx: &Ctx, req: DebitReq) {
    let shard = ctx.router.shard_of(&req.from);
    ctx.router.cast(shard, ShardMsg::Debit(Box::new(req)));
}

fn validate_create(ctx: &Ctx, a: CreateAccountArgs) -> Result<(String, AccountMeta, i64), ApiError> {
    account_id(&a.account)?;
    if is_system(&a.account) {
        return Err(ApiError::forbidden("ids starting with @ are system accounts"));
    }
    ledger::validate_memo_key(a.memo.as_deref(), None)?;
    if let Some(owner) = &a.owner {
        if owner.is_empty() || owner.len() > USER_ID_BYTES_MAX {
            return Err(ApiError::bad_request("owner must be a user id"));
        }
    }
    let mut tags = a.tags.unwrap_or_default();
    tags.sort();
    tags.dedup();
    if tags.len() > TAGS_PER_ACCOUNT_MAX {
        return Err(ApiError::bad_request(format!("at most {TAGS_PER_ACCOUNT_MAX} tags")));
    }
    validate_tags(&tags)?;
    let initial = a.initial.unwrap_or(0);
    let bounds = ctx.limits.bounds(&a.account);
    if let Some(min) = bounds.min {
        if initial < min {
            return Err(ApiError::new(ErrorCode::BelowMin, format!("initial {initial} is below the minimum {min}")));
        }
    }
    if let Some(max) = bounds.max {
        if initial > max {
            return Err(ApiError::new(ErrorCode::AboveMax, format!("initial {initial} is above the maximum {max}")));
        }
    }
    if initial < 0 {
        return Err(ApiError::bad_request("initial must not be negative"));
    }
    let meta = AccountMeta {
        num: 0, // assigned by the journal at commit
        owner: a.owner,
        tags,
        created: store::now_ms(),
        memo: a.memo,
        deleted: None,
    };
    Ok((a.account, meta, initial))
}
