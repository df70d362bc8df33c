//! The points manager's ops (admin): `add`, `delete_account`,
//! `delete_reason`, `list_accounts`, `tag`, `bulk_add`, `reap` and `backup`.

use std::sync::Arc;

use super::{account_id, blocking, blocking_within, page_limit, scan_wait, to_journal, validate_tags, Ctx};
use crate::auth::Principal;
use crate::contract::{BulkCmd, CloseCmd, Command, ReapCmd, TagCmd};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{self, Kind, MINT};
use crate::limits::REASON_BYTES_MAX;
use crate::reply::ReplyTo;
use crate::shard::DebitReq;
use crate::store;
use crate::wire::{
    AccountOnly, AccountsPage, AddArgs, BackupArgs, BackupReply, BulkAddArgs, DeleteAccountArgs, DeleteReasonReply,
    Hash32, ListAccountsArgs, ReapArgs, Reply, Shape, TagArgs,
};

fn reason(r: &str) -> Result<(), ApiError> {
    if r.trim().is_empty() || r.len() > REASON_BYTES_MAX {
        return Err(ApiError::bad_request(format!("reason must be 1-{REASON_BYTES_MAX} bytes")));
    }
    Ok(())
}

/// `add {account, delta}`: a signed change, as a transfer from or to `@mint`.
pub(super) fn add(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(AddArgs, args, reply);
    check!(account_id(&a.account), reply);
    check!(ledger::validate_memo_key(a.memo.as_deref(), a.key.as_deref()), reply);
    if a.delta == 0 {
        return reply.err(ApiError::bad_request("delta must not be 0"));
    }
    let Some(magnitude) = a.delta.checked_abs() else {
        return reply.err(ApiError::bad_request("delta out of range"));
    };
    let (from, to) = if a.delta > 0 { (MINT, a.account.as_str()) } else { (a.account.as_str(), MINT) };
    if ledger::is_system(&a.account) {
        return reply.err(ApiError::forbidden("system accounts change only through transfers"));
    }
    let shape = Shape::Add { account: a.account.as_str().into(), delta: a.delta };
    ctx.router.debit(DebitReq::new(Kind::Adjust, shape, from, to, magnitude, a.memo, a.key, p, reply));
}

pub(super) fn delete_account(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(DeleteAccountArgs, args, reply);
    check!(account_id(&a.account), reply);
    check!(reason(&a.reason), reply);
    to_journal(
        ctx,
        Command::Close(Box::new(CloseCmd { account: a.account.into(), reason: a.reason, by: p.user, reply })),
    );
}

pub(super) fn delete_reason(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    let a = args!(AccountOnly, args, reply);
    check!(account_id(&a.account), reply);
    let store = ctx.store.clone();
    blocking(reply, move || {
        let meta = store::account_meta(&*store.db()?, &a.account)?
            .ok_or_else(|| ApiError::not_found(format!("account {}", a.account)))?;
        let t = meta.deleted.ok_or_else(|| ApiError::not_found(format!("account {} is not deleted", a.account)))?;
        Ok(Reply::DeleteReason(DeleteReasonReply { account: a.account, reason: t.reason, time: t.time }))
    });
}

pub(super) fn list_accounts(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    let a = args!(ListAccountsArgs, args, reply);
    let limit = check!(page_limit(a.limit), reply);
    if let (Some(lo), Some(hi)) = (a.balance_min, a.balance_max) {
        if lo > hi {
            return reply.err(ApiError::bad_request("balance_min is above balance_max"));
        }
    }
    let filter =
        store::ListFilter { owner: a.owner, tag: a.tag, balance_min: a.balance_min, balance_max: a.balance_max };
    let store = ctx.store.clone();
    let wait = scan_wait(ctx, crate::limits::LIST_WAIT_MAX_MS);
    blocking_within(ctx.listing.clone(), wait, ctx.shutdown.clone(), reply, move || {
        let (accounts, next) = store::list_accounts(&*store.db()?, &filter, a.after.as_deref(), limit)?;
        Ok(Reply::Accounts(AccountsPage { accounts, next }))
    });
}

pub(super) fn tag(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    let a = args!(TagArgs, args, reply);
    check!(account_id(&a.account), reply);
    let (add, remove) = (a.add.unwrap_or_default(), a.remove.unwrap_or_default());
    check!(validate_tags(&add), reply);
    check!(validate_tags(&remove), reply);
    to_journal(ctx, Command::Tag(Box::new(TagCmd { account: a.account.into(), add, remove, reply })));
}

pub(super) fn bulk_add(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(BulkAddArgs, args, reply);
    check!(validate_tags(std::slice::from_ref(&a.tag)), reply);
    check!(ledger::validate_memo_key(a.memo.as_deref(), None), reply);
    if a.delta == 0 || a.delta == i64::MIN {
        return reply.err(ApiError::bad_request("delta must be a non-zero 64-bit integer"));
    }
    let cmd = BulkCmd { tag: a.tag, delta: a.delta, memo: a.memo, force: a.force.unwrap_or(false), by: p.user, reply };
    to_journal(ctx, Command::Bulk(Box::new(cmd)));
}

pub(super) fn reap(ctx: &Arc<Ctx>, p: Principal, args: &[u8], reply: ReplyTo) {
    let a = args!(ReapArgs, args, reply);
    check!(reason(&a.reason), reply);
    let below = a.below.unwrap_or(ctx.limits.min_balance);
    to_journal(ctx, Command::Reap(Box::new(ReapCmd { below, reason: a.reason, by: p.user, reply })));
}

/// `backup {out}`: a consistent copy under `DATA/backups/`, through one read
/// transaction while the server keeps serving.
pub(super) fn backup(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    let a = args!(BackupArgs, args, reply);
    let name_ok = !a.out.is_empty()
        && a.out.len() <= 128
        && a.out.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !a.out.starts_with('.');
    if !name_ok {
        return reply.err(ApiError::bad_request("out must be a plain file name (A-Za-z0-9._-)"));
    }
    let dir = ctx.config.data.join("backups");
    let store = ctx.store.clone();
    blocking(reply, move || {
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(format!("backups folder: {e}")))?;
        let path = dir.join(&a.out);
        if path.exists() {
            return Err(ApiError::new(ErrorCode::Exists, format!("{} exists", path.display())));
        }
        let head = store::backup(&*store.db()?, store.history(), &path)?;
        Ok(Reply::Backup(BackupReply { path: path.display().to_string(), transfers: head.id, head: Hash32(head.hash) }))
    });
}
