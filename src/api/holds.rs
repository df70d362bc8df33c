//! Two-phase transfers (`hold`, `post`, `void`) and redeem requests
//! (`redeem`, `redeems`, `my_redeems`, `decide_redeem`).
//!
//! A hold is a debit reserved by the source's owner like any other, which the
//! journal turns into a held amount (still in the balance, no longer
//! available); `post` and `void` go straight to the journal, the one place
//! that can settle a hold exactly once.

use std::net::IpAddr;
use std::sync::Arc;

use super::{account_id, blocking, own, page_limit, to_journal, validate_transfer, Ctx};
use crate::auth::{Principal, Role};
use crate::contract::{Command, SettleCmd, SettleOp};
use crate::error::ApiError;
use crate::ledger::{self, MINT};
use crate::limits::{HOLD_TIMEOUT_S_MAX, ITEM_BYTES_MAX, MEMO_BYTES_MAX, PAGE_LIMIT_MAX};
use crate::otp::Action;
use crate::reply::ReplyTo;
use crate::store;
use crate::wire::{
    DecideRedeemArgs, HoldArgs, NoArgs, PostArgs, RedeemArgs, RedeemsArgs, RedeemsPage, Reply, VoidArgs,
};

pub(super) fn hold(ctx: &Arc<Ctx>, p: Principal, args: &[u8], source: IpAddr, reply: ReplyTo) {
    let a = args!(HoldArgs, args, reply);
    let from = own(&p, a.from);
    check!(validate_transfer(&from, &a.to, a.amount, a.memo.as_deref(), a.key.as_deref()), reply);
    if from == MINT {
        return reply.err(ApiError::bad_request("holds cannot come from @mint"));
    }
    if a.timeout_s.is_some_and(|t| !(1..=HOLD_TIMEOUT_S_MAX).contains(&t)) {
        return reply.err(ApiError::bad_request(format!("timeout_s must be 1..={HOLD_TIMEOUT_S_MAX}")));
    }
    let action = Action::Hold { from, to: a.to, amount: a.amount, memo: a.memo, key: a.key, timeout_s: a.timeout_s };
    if p.role == Role::User {
        super::otp::user_transfer(ctx, p, action, Some(source), reply);
    } else {
        super::otp::send_debit(ctx, p, action, (0, 0), reply);
    }
}

pub(super) fn post(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(PostArgs, args, reply);
    if let Some(x) = a.amount {
        check!(ledger::validate_amount(x), reply);
    }
    settle(ctx, p, a.hold, SettleOp::Post(a.amount), reply);
}

pub(super) fn void(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(VoidArgs, args, reply);
    settle(ctx, p, a.hold, SettleOp::Void, reply);
}

fn settle(ctx: &Arc<Ctx>, p: Principal, hold: u64, op: SettleOp, reply: ReplyTo) {
    to_journal(ctx, Command::Settle(Box::new(SettleCmd { hold, op, by: Some(p), note: None, reply })));
}

pub(super) fn redeem(ctx: &Arc<Ctx>, p: Principal, args: &[u8], source: IpAddr, reply: ReplyTo) {
    let a = args!(RedeemArgs, args, reply);
    let item = a.item.trim();
    if item.is_empty() || item.len() > ITEM_BYTES_MAX || item.chars().any(char::is_control) {
        return reply.err(ApiError::bad_request(format!("item must be 1-{ITEM_BYTES_MAX} printable bytes")));
    }
    check!(ledger::validate_amount(a.amount), reply);
    check!(ledger::validate_memo_key(a.memo.as_deref(), None), reply);
    let account = p.user.to_string();
    check!(account_id(&account), reply);
    let action = Action::Redeem { account, item: item.to_owned(), amount: a.amount, memo: a.memo };
    super::otp::redeem(ctx, p, action, Some(source), reply);
}

pub(super) fn my_redeems(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    args!(NoArgs, args, reply);
    let store = ctx.store.clone();
    blocking(reply, move || {
        let requests = store::redeems(&*store.db()?, Some(&p.user), None, PAGE_LIMIT_MAX)?;
        Ok(Reply::Redeems(RedeemsPage { requests }))
    });
}

pub(super) fn redeems(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    let a = args!(RedeemsArgs, args, reply);
    let limit = check!(page_limit(a.limit), reply);
    let store = ctx.store.clone();
    blocking(reply, move || {
        let requests = store::redeems(&*store.db()?, None, a.status, limit)?;
        Ok(Reply::Redeems(RedeemsPage { requests }))
    });
}

pub(super) fn decide_redeem(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(DecideRedeemArgs, args, reply);
    if a.note.as_deref().is_some_and(|n| n.len() > MEMO_BYTES_MAX) {
        return reply.err(ApiError::bad_request(format!("note is at most {MEMO_BYTES_MAX} bytes")));
    }
    let op = SettleOp::Decide { accept: a.accept };
    to_journal(ctx, Command::Settle(Box::new(SettleCmd { hold: a.request, op, by: Some(p), note: a.note, reply })));
}
