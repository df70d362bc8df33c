//! Balances, transfers, mints, accounts and history.

use std::sync::Arc;

use super::{account_id, blocking, own, page_limit, validate_tags, validate_transfer, Ctx, Session};
use crate::auth::{Principal, Role};
use crate::contract::CreateCmd;
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{self, is_system, Kind, MINT};
use crate::limits::{TAGS_PER_ACCOUNT_MAX, USER_ID_BYTES_MAX};
use crate::reply::ReplyTo;
use crate::shard::{DebitReq, HistoryReq, ReadKind, ReadReq, ShardMsg};
use crate::store::{self, AccountMeta};
use crate::wire::{AccountArg, CreateAccountArgs, GetTransferArgs, HistoryArgs, MintArgs, Reply, Shape, TransferArgs};

/// `balance` and `account`: answered by the owning shard from memory.
pub(super) fn read(ctx: &Arc<Ctx>, p: Principal, args: &[u8], kind: ReadKind, reply: ReplyTo) {
    let a = args!(AccountArg, args, reply);
    let account = own(&p, a.account);
    check!(account_id(&account), reply);
    ctx.router.send(
        &account,
        ShardMsg::Read(Box::new(ReadReq { account: account.as_str().into(), kind, principal: p, reply })),
    );
}

/// `transfer`: an admin's goes to the owning shard with the debits of the
/// same socket read; a user's first meets the policy and maybe a code.
pub(super) fn transfer(ctx: &Arc<Ctx>, p: Principal, args: &[u8], session: &mut Session, reply: ReplyTo) {
    let a = args!(TransferArgs, args, reply);
    let from = own(&p, a.from);
    check!(validate_transfer(&from, &a.to, a.amount, a.memo.as_deref(), a.key.as_deref()), reply);
    if from == MINT {
        return reply.err(ApiError::bad_request("use mint to issue from @mint"));
    }
    if p.role == Role::User {
        let action = crate::otp::Action::Transfer { from, to: a.to, amount: a.amount, memo: a.memo, key: a.key };
        return super::otp::user_transfer(ctx, p, action, Some(session.peer), reply);
    }
    let req = DebitReq::new(Kind::Transfer, Shape::Transfer, from, a.to, a.amount, a.memo, a.key, p, reply);
    session.outbox.push(&ctx.router, req);
}

/// `mint`: a debit of `@mint`, batched like an admin's transfer.
pub(super) fn mint(ctx: &Arc<Ctx>, p: Principal, args: &[u8], session: &mut Session, reply: ReplyTo) {
    let a = args!(MintArgs, args, reply);
    check!(validate_transfer(MINT, &a.to, a.amount, a.memo.as_deref(), a.key.as_deref()), reply);
    let req = DebitReq::new(Kind::Mint, Shape::Transfer, MINT, a.to, a.amount, a.memo, a.key, p, reply);
    session.outbox.push(&ctx.router, req);
}

pub(super) fn create_account(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(CreateAccountArgs, args, reply);
    let (account, meta, initial) = check!(validate_create(ctx, a), reply);
    if initial > 0 && !p.may_debit(MINT, || None) {
        return reply.err(ApiError::forbidden("this key may not move money out of @mint (initial)"));
    }
    let cmd = CreateCmd { account: account.as_str().into(), meta, initial, user: None, by: p.user, reply };
    ctx.router.send(&account, ShardMsg::Create(Box::new(cmd)));
}

/// `history`: the owning shard checks the caller and knows where the
/// account's history starts; the page is read off the async threads.
pub(super) fn history(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(HistoryArgs, args, reply);
    let account = own(&p, a.account);
    check!(account_id(&account), reply);
    let limit = check!(page_limit(a.limit), reply);
    let req = HistoryReq { account: account.as_str().into(), after: a.after, limit, principal: p, reply };
    ctx.router.send(&account, ShardMsg::History(Box::new(req)));
}

pub(super) fn get_transfer(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(GetTransferArgs, args, reply);
    let store = ctx.store.clone();
    blocking(reply, move || transfer_shown(&*store.db()?, store.history(), a.id, &p));
}

/// Transfer `id` as `p` sees it, if `p` is staff or owns one of its
/// parties (the leader's `get_transfer`, and a follower's stale one).
pub(super) fn transfer_shown(
    db: &redb::Database,
    history: &store::History,
    id: u64,
    p: &Principal,
) -> Result<Reply, ApiError> {
    let mut t = store::get_transfer(db, history, id)?.ok_or_else(|| ApiError::not_found(format!("transfer {id}")))?;
    t.shown_to(&p.user, p.sees_any());
    if !p.sees_any() {
        let party = [&t.from, &t.to].into_iter().any(|acct| {
            store::account_meta(db, acct).ok().flatten().is_some_and(|m| m.owner.as_deref() == Some(&*p.user))
        });
        if !party {
            return Err(ApiError::forbidden(format!("transfer {id} is not yours")));
        }
    }
    Ok(Reply::Transfer(Arc::new(t)))
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
        created: crate::clock::now_ms(),
        memo: a.memo,
        deleted: None,
    };
    Ok((a.account, meta, initial))
}
