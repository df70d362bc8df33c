//! Operations confirmed by a one-time password: opening a session (a large
//! user transfer, a redeem, a password reset), `confirm` and `resend`.
//!
//! These run in their own task: they wait for the OTP supervisor, for the
//! mail and (on confirm) for the confirmed operation, never blocking the
//! connection's reader or any actor.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::RpcReplyPort;

use super::users::{change, current, on_hash_pool};
use super::{Ctx, Session};
use crate::auth::{self, Principal, Role, UserState};
use crate::contract::{HoldSpec, RedeemSpec, UserChange};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{is_system, net_fee, Kind, LedgerError, Party, Receiver, REDEEMED};
use crate::limits::{
    MAIL_ATTEMPTS_MAX, MAIL_ERROR_BYTES_MAX, MAIL_RETRY_DELAY_MS, MAIL_SEND_TIMEOUT_MS, USER_ID_BYTES_MAX,
};
use crate::otp::{Action, Opened, OtpMsg};
use crate::reply::{self, ReplyTo};
use crate::shard::{DebitReq, ReadKind, ReadReq, ShardMsg};
use crate::store;
use crate::wire::{ConfirmArgs, PasswordReset, PendingReply, Reply, ResendArgs, ResetPasswordArgs, Shape};

/// Asks the OTP supervisor and waits for its answer.
async fn ask<T: Send + 'static>(
    ctx: &Ctx,
    msg: impl FnOnce(RpcReplyPort<Result<T, ApiError>>) -> OtpMsg,
) -> Result<T, ApiError> {
    match ctx.otp.call(msg, None).await {
        Ok(CallResult::Success(r)) => r,
        _ => Err(ApiError::internal("the OTP supervisor is not running")),
    }
}

/// Longest a request waits for its mail: every attempt timing out, plus the pauses.
fn mail_wait() -> Duration {
    let attempts = u64::from(MAIL_ATTEMPTS_MAX);
    Duration::from_millis(attempts * MAIL_SEND_TIMEOUT_MS + attempts * attempts * MAIL_RETRY_DELAY_MS + 1000)
}

/// Waits for the mail of a session just opened or resent.
async fn pending_reply(opened: Opened) -> Reply {
    let outcome = match opened.delivery {
        None => Err("no mail was sent; use resend".to_owned()),
        Some(delivery) => match tokio::time::timeout(mail_wait(), delivery).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the mailer stopped before sending; use resend".to_owned()),
            Err(_) => Err("the mail is taking too long; use resend if it does not arrive".to_owned()),
        },
    };
    Reply::Pending(PendingReply {
        pending: opened.pending,
        expires_at: opened.expires_at,
        delivered: Some(outcome.is_ok()),
        mail_error: outcome.err().map(|e| truncate(e, MAIL_ERROR_BYTES_MAX)),
    })
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A user's mail address and role, read off the async threads.
async fn user_contact(ctx: &Ctx, user: &str) -> Result<Option<(String, Role)>, ApiError> {
    let (store, user) = (ctx.store.clone(), user.to_owned());
    let found = tokio::task::spawn_blocking(move || store::get_user(&*store.db()?, &user))
        .await
        .map_err(|_| ApiError::internal("the user lookup failed"))??;
    Ok(found.map(|u| (u.email, Role::parse(&u.role))))
}

/// Opens a session for the logged-in `user` waiting to run `action`,
/// mails the code and answers with the session once the mail went out.
pub(super) async fn open(ctx: &Ctx, p: &Principal, action: Action, source: Option<IpAddr>) -> Result<Reply, ApiError> {
    let Some((email, _)) = user_contact(ctx, &p.user).await? else {
        return Err(ApiError::internal("the caller's user record is missing"));
    };
    let user = p.user.clone();
    let opened = ask(ctx, |reply| OtpMsg::Open { user, email: Some(email), action, source, reply }).await?;
    Ok(pending_reply(opened).await)
}

/// Whether this transfer needs a code: user transfers of at least `otp.transfer_min`.
pub(super) fn needs_code(ctx: &Ctx, p: &Principal, amount: i64) -> bool {
    p.role == Role::User && ctx.config.otp.transfer_min.is_some_and(|min| amount >= min)
}

/// Reads an account through its shard as `p` would.
async fn read(ctx: &Ctx, account: &str, kind: ReadKind, p: Principal) -> Result<Reply, ApiError> {
    let (reply, mut rx) = ReplyTo::channel();
    ctx.router.send(account, ShardMsg::Read(Box::new(ReadReq { account: account.into(), kind, principal: p, reply })));
    reply::answer(&mut rx).await
}

/// Whether `from` has `amount` available now, so that no code is mailed for
/// a transfer that cannot happen. Checked again when it is confirmed.
pub(super) async fn funds(ctx: &Ctx, p: &Principal, from: &str, amount: i64) -> Result<(), ApiError> {
    let Reply::Balance(b) = read(ctx, from, ReadKind::Balance, p.clone()).await? else {
        return Err(ApiError::internal("unexpected reply to a balance read"));
    };
    let min = ctx.limits.bounds(from).min.unwrap_or(i64::MIN);
    if b.available.checked_sub(amount).is_none_or(|left| left < min) {
        return Err(LedgerError::InsufficientFunds { account: from.into(), available: b.available, amount }.into());
    }
    Ok(())
}

fn party<'a>(user: &'a str, state: &'a UserState) -> Party<'a> {
    Party { user, admin: state.role.is_staff(), group: state.group.as_deref(), events: state.events }
}

/// The `[policy]` rules for a user's transfer or hold of `amount` to `to`:
/// who may receive, eligibility, and the fee (see `ledger::Policy`). Reads
/// who owns `to` from its shard.
///
/// The receiver's cap is deliberately not checked here: a refusal before
/// any code is mailed would let a user learn another user's balance for
/// free, by bisecting amounts. The journal enforces the cap at commit, after
/// the code (each probe then costs a confirmed code, and an accepted one
/// pays the receiver).
pub(super) async fn user_fee(ctx: &Ctx, p: &Principal, to: &str, amount: i64) -> Result<(u32, i64), ApiError> {
    let policy = ctx.config.ledger_policy();
    let sender_state = ctx
        .users
        .get(&p.user)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "the caller's user record is missing"))?;
    let sender = party(&p.user, &sender_state);
    if is_system(to) {
        policy.user_transfer_bps(&sender, &Receiver::System)?;
        return Ok((0, 0));
    }
    // Read as the server itself: the receiver is not the caller's account.
    let system = Principal::user("@system", Role::Admin);
    let Reply::Account(view) = read(ctx, to, ReadKind::Account, system).await? else {
        return Err(ApiError::internal("unexpected reply to an account read"));
    };
    let owner_state = view.owner.as_deref().and_then(|o| ctx.users.get(o).map(|s| (o, s)));
    let receiver = match &owner_state {
        Some((o, s)) => Receiver::User(party(o, s)),
        None => Receiver::Unowned,
    };
    let bps = policy.user_transfer_bps(&sender, &receiver)?;
    let fee = net_fee(amount, bps, policy.fee_rounding)?;
    Ok((bps, fee))
}

/// When a hold with this timeout expires (0: never).
fn hold_expiry(timeout_s: Option<u64>) -> u64 {
    timeout_s.map_or(0, |t| crate::clock::now_ms().saturating_add(t.saturating_mul(1000)))
}

/// Hands a transfer, hold or redeem to the shard owning its source, with
/// the fee rate and fee the policy gave.
pub(super) fn send_debit(ctx: &Ctx, p: Principal, action: Action, (bps, fee): (u32, i64), reply: ReplyTo) {
    let req = match action {
        Action::Transfer { from, to, amount, memo, key } => {
            DebitReq::new(Kind::Transfer, Shape::Transfer, from, to, amount, memo, key, p, reply).with_fee(fee)
        }
        Action::Hold { from, to, amount, memo, key, timeout_s } => {
            let expires_at = hold_expiry(timeout_s);
            DebitReq::new(Kind::Hold, Shape::Hold { expires_at }, from, to, amount, memo, key, p, reply)
                .with_hold(HoldSpec { expires_at, fee_bps: bps, redeem: None })
        }
        Action::Redeem { account, item, amount, memo } => {
            let user = p.user.to_string();
            let shape = Shape::Redeem {
                user: user.as_str().into(),
                item: item.as_str().into(),
                memo: memo.as_deref().map(Into::into),
            };
            DebitReq::new(Kind::Hold, shape, account, REDEEMED, amount, memo, None, p, reply).with_hold(HoldSpec {
                expires_at: 0,
                fee_bps: 0,
                redeem: Some(RedeemSpec { user, item }),
            })
        }
        Action::ResetPassword | Action::Batch { .. } => {
            return reply.err(ApiError::internal("not a single debit"));
        }
    };
    ctx.router.debit(req);
}

/// Source, destination and amount of a user's transfer or hold.
fn route(action: &Action) -> Option<(&str, &str, i64)> {
    match action {
        Action::Transfer { from, to, amount, .. } | Action::Hold { from, to, amount, .. } => Some((from, to, *amount)),
        _ => None,
    }
}

/// A user's transfer or hold: the policy decides the fee (or refuses it);
/// at or above `otp.transfer_min` it waits in a session for its code, else
/// it goes to the owning shard at once.
pub(super) fn user_transfer(ctx: &Arc<Ctx>, p: Principal, action: Action, source: Option<IpAddr>, reply: ReplyTo) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let Some((from, to, amount)) = route(&action).map(|(f, t, a)| (f.to_owned(), t.to_owned(), a)) else {
            return reply.err(ApiError::internal("not a transfer"));
        };
        let fee = match user_fee(&ctx, &p, &to, amount).await {
            Ok(f) => f,
            Err(e) => return reply.err(e),
        };
        if !needs_code(&ctx, &p, amount) {
            return send_debit(&ctx, p, action, fee, reply);
        }
        let r = async {
            funds(&ctx, &p, &from, amount).await?;
            open(&ctx, &p, action, source).await
        };
        reply.send(r.await);
    });
}

/// `redeem`: always confirmed by a code; the amount is held when it is.
pub(super) fn redeem(ctx: &Arc<Ctx>, p: Principal, action: Action, source: Option<IpAddr>, reply: ReplyTo) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let r = async {
            if let Action::Redeem { account, amount, .. } = &action {
                funds(&ctx, &p, account, *amount).await?;
            }
            open(&ctx, &p, action, source).await
        };
        reply.send(r.await);
    });
}

/// `reset_password {user}`: anyone may ask. The answer is the same whether
/// or not the user exists, and comes before any mail goes out (so its
/// timing does not tell either): the code goes to the user's address if
/// there is a user, and nowhere for an unknown user or staff (admins,
/// operators and auditors reset on the host: `tally admin reset-password`).
pub(super) fn reset_password(ctx: &Arc<Ctx>, session: &Session, args: &[u8], reply: ReplyTo) {
    let ResetPasswordArgs { user } = args!(ResetPasswordArgs, args, reply);
    let source = Some(session.peer);
    if user.is_empty() || user.len() > USER_ID_BYTES_MAX {
        return reply.err(ApiError::bad_request("user must be a user id"));
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let r = async {
            let email = match user_contact(&ctx, &user).await? {
                Some((email, Role::User)) => Some(email),
                Some((_, role)) => {
                    tracing::warn!(target: "security", user = %user, role = role.as_str(), source = %source.map_or_else(String::new, |s| s.to_string()),
                        "password reset over the wire refused for staff (a decoy session answers)");
                    None
                }
                None => None,
            };
            let user: Arc<str> = user.as_str().into();
            let opened =
                ask(&ctx, |reply| OtpMsg::Open { user, email, action: Action::ResetPassword, source, reply }).await?;
            Ok(Reply::Pending(PendingReply {
                pending: opened.pending,
                expires_at: opened.expires_at,
                delivered: None,
                mail_error: None,
            }))
        };
        reply.send(r.await);
    });
}

/// `resend {pending}`: a new code for the session; the old one dies.
pub(super) fn resend(ctx: &Arc<Ctx>, session: &mut Session, args: &[u8], reply: ReplyTo) {
    let a = args!(ResendArgs, args, reply);
    let caller = current(ctx, session).ok();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let anonymous = caller.is_none();
        let caller = caller.map(|p| p.user);
        let r = ask(&ctx, |reply| OtpMsg::Resend { pending: a.pending, caller, reply }).await;
        reply.send(match r {
            // A reset's resend answers at once, like the reset itself.
            Ok(opened) if anonymous => Ok(Reply::Pending(PendingReply {
                pending: opened.pending,
                expires_at: opened.expires_at,
                delivered: None,
                mail_error: None,
            })),
            Ok(opened) => Ok(pending_reply(opened).await),
            Err(e) => Err(e),
        });
    });
}

/// `confirm {pending, otp, new_password?}`: checks the code with the
/// supervisor, then runs the waiting operation, validated afresh.
pub(super) fn confirm(ctx: &Arc<Ctx>, session: &mut Session, args: &[u8], reply: ReplyTo) {
    let a = args!(ConfirmArgs, args, reply);
    let caller = current(ctx, session).ok();
    let source = Some(session.peer);
    if let Some(pw) = &a.new_password {
        if let Err(e) = auth::validate_password(pw) {
            return reply.err(e);
        }
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let ConfirmArgs { pending, otp, new_password } = a;
        let has_new_password = new_password.is_some();
        let who = caller.as_ref().map(|p| p.user.clone());
        let confirmed =
            ask(&ctx, |reply| OtpMsg::Confirm { pending, caller: who, code: otp, has_new_password, source, reply })
                .await;
        let (user, action) = match confirmed {
            Ok(c) => c,
            Err(e) => return reply.err(e),
        };
        match action {
            Action::Transfer { .. } | Action::Hold { .. } | Action::Redeem { .. } => {
                let Some(p) = caller else {
                    return reply.err(ApiError::internal("a confirmed debit without its user"));
                };
                // The rules again: events, groups or the receiver may have changed.
                let fee = match route(&action) {
                    Some((_, to, amount)) => match user_fee(&ctx, &p, to, amount).await {
                        Ok(f) => f,
                        Err(e) => return reply.err(e),
                    },
                    None => (0, 0),
                };
                send_debit(&ctx, p, action, fee, reply);
            }
            Action::Batch { transfers, atomic } => match caller {
                Some(p) => super::batch::confirmed(&ctx, p, transfers, atomic, reply).await,
                None => reply.err(ApiError::internal("a confirmed batch without its user")),
            },
            Action::ResetPassword => {
                let password = new_password.unwrap_or_default();
                let r = async {
                    let hash = on_hash_pool(&ctx, move || auth::hash_password(&password)).await??;
                    change(&ctx, &user, UserChange::Password(hash)).await?;
                    tracing::info!(target: "security", user = %user, "password reset by code");
                    Ok(Reply::PasswordReset(PasswordReset { user: user.to_string(), password_reset: true }))
                };
                reply.send(r.await);
            }
        }
    });
}
