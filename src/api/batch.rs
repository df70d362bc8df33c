//! `transfer_batch`: up to `limits.batch_max` transfers in one request.
//!
//! Each item is a `transfer` in every respect: the same argument checks,
//! the same owner reserving its debit in mailbox order, the same key rules,
//! and for a user the same policy and fee. What a batch adds is one decode,
//! one message per owning shard, one reply, and, with `atomic`, all or none:
//!
//! - Without `atomic`, every item goes on to the journal as its own
//!   transfer and commits or fails on its own; the reply gathers the items'
//!   answers in order.
//! - With `atomic`, owners reserve their items and hand them back instead
//!   of on to the journal ([`Then::Collect`]). Once every item is reserved
//!   (or answered by its key) the journal gets them as one command, which
//!   applies them in order and, at the first refusal, rolls the batch back
//!   (`journal::machine`). If an owner refused an item, the reserved ones
//!   still go to the journal, as a batch refused in advance: that releases
//!   their reservations and keys the way any refused transfer does.
//!
//! Why this cannot lose or invent a unit: the book checks every item again
//! at commit, and a rolled-back batch restores the book, the head and the
//! writes as they were. Why it always answers: every item answers exactly
//! once (its reply, or its command handed back and later answered by the
//! fan-out), so the gathering task ends once it has heard from all of them;
//! an item lost in a stopped actor drops its reply, which answers `internal`.
//!
//! A user's batch whose amounts add up to at least `otp.transfer_min`
//! waits for one code, like a single transfer.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::otp::{funds, needs_code, open, user_fee};
use super::{own, validate_transfer, Ctx, Session};
use crate::auth::{Principal, Role};
use crate::contract::{BatchCmd, Command, TransferCmd};
use crate::error::{cut, ApiError};
use crate::ledger::{Kind, MINT};
use crate::limits::{BATCH_ERROR_BYTES_MAX, USER_BATCH_MAX};
use crate::otp::{Action, BatchTransfer};
use crate::reply::{ReplyTo, Slots};
use crate::shard::{DebitReq, Effect, Outbox, ShardMsg};
use crate::wire::{BatchItem, BatchReply, Reply, Shape};

/// An item ready for its owner: checked, with its fee.
type Item = Result<(BatchTransfer, i64), ApiError>;

pub(super) fn transfer_batch(ctx: &Arc<Ctx>, p: Principal, args: &[u8], session: &Session, reply: ReplyTo) {
    let a = check!(crate::wire::frame::decode_transfer_batch(args), reply);
    let atomic = a.atomic.unwrap_or(false);
    let max = if p.role == Role::User {
        USER_BATCH_MAX.min(ctx.config.limits.batch_max)
    } else {
        ctx.config.limits.batch_max
    };
    if a.transfers.is_empty() || a.transfers.len() > max {
        return reply.err(ApiError::bad_request(format!("transfers must hold 1..={max} items")));
    }
    let items: Vec<Result<BatchTransfer, ApiError>> = a
        .transfers
        .into_iter()
        .map(|t| {
            let item = BatchTransfer { from: own(&p, t.from), to: t.to, amount: t.amount, memo: t.memo, key: t.key };
            check_item(&item).map(|()| item)
        })
        .collect();
    let items = check!(check_batch(items, atomic), reply);
    if p.role != Role::User {
        return run(ctx, p, items.into_iter().map(|i| i.map(|t| (t, 0))).collect(), atomic, reply);
    }
    let (ctx, source) = (ctx.clone(), session.peer);
    tokio::spawn(async move {
        let checked = match with_fees(&ctx, &p, items, atomic).await {
            Ok(c) => c,
            Err(e) => return reply.err(e),
        };
        let total = checked.iter().flatten().try_fold(0i64, |sum, (t, _)| sum.checked_add(t.amount));
        let Some(total) = total else {
            return reply.err(ApiError::bad_request("the batch's amounts add up to more than an i64"));
        };
        // An atomic batch rolled back costs nothing, and its refusal names
        // the failing item: without a code, a user could learn whether
        // another user's balance is within some amount of its cap for free
        // (one item to the victim, one meant to fail). So a user's atomic
        // batch always waits for a code, as a probe by a single transfer
        // does above `otp.transfer_min`.
        if atomic && ctx.config.otp.transfer_min.is_none() {
            return reply.err(ApiError::forbidden(
                "atomic batches of users need confirmation codes (otp.transfer_min), which this server does not use",
            ));
        }
        if !atomic && !needs_code(&ctx, &p, total) {
            return run(&ctx, p, checked, atomic, reply);
        }
        // The code is for exactly what the user sent: a refused item is
        // refused now, with its place, so that the results after the code
        // line up with the request.
        let mut transfers = Vec::with_capacity(checked.len());
        for (i, item) in checked.into_iter().enumerate() {
            match item {
                Ok((t, _)) => transfers.push(t),
                Err(e) => return reply.err(e.at_item(i)),
            }
        }
        // Each source must hold what its items take now (checked again at commit).
        let r = async move {
            let mut per_source: Vec<(&str, i64)> = Vec::new();
            for t in &transfers {
                match per_source.iter_mut().find(|(f, _)| *f == t.from) {
                    Some((_, sum)) => *sum += t.amount,
                    None => per_source.push((&t.from, t.amount)),
                }
            }
            for (from, sum) in per_source {
                funds(&ctx, &p, from, sum).await?;
            }
            open(&ctx, &p, Action::Batch { transfers, atomic }, Some(source)).await
        };
        reply.send(r.await);
    });
}

/// A user's batch confirmed by its code: the policy again (events, groups
/// or receivers may have changed), then the batch.
pub(super) async fn confirmed(
    ctx: &Arc<Ctx>,
    p: Principal,
    transfers: Vec<BatchTransfer>,
    atomic: bool,
    reply: ReplyTo,
) {
    match with_fees(ctx, &p, transfers.into_iter().map(Ok).collect(), atomic).await {
        Ok(items) => run(ctx, p, items, atomic, reply),
        Err(e) => reply.err(e),
    }
}

/// The checks `transfer` makes of its arguments.
fn check_item(t: &BatchTransfer) -> Result<(), ApiError> {
    validate_transfer(&t.from, &t.to, t.amount, t.memo.as_deref(), t.key.as_deref())?;
    if t.from == MINT {
        return Err(ApiError::bad_request("use mint to issue from @mint"));
    }
    Ok(())
}

/// An atomic batch fails whole at its first bad item, and may not name one
/// key of one source twice: the second item would wait for the first,
/// which waits for the whole batch.
fn check_batch(
    items: Vec<Result<BatchTransfer, ApiError>>,
    atomic: bool,
) -> Result<Vec<Result<BatchTransfer, ApiError>>, ApiError> {
    if !atomic {
        return Ok(items);
    }
    let mut keys = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let t = item.as_ref().map_err(|e| e.clone().at_item(i))?;
        if let Some(key) = &t.key {
            if !keys.insert((t.from.as_str(), key.as_str())) {
                return Err(ApiError::bad_request(format!("key {key:?} of {} is used twice", t.from)).at_item(i));
            }
        }
    }
    Ok(items)
}

/// Each of a user's items with the fee the policy gives it; an item the
/// policy refuses fails alone, or fails an atomic batch.
async fn with_fees(
    ctx: &Ctx,
    p: &Principal,
    items: Vec<Result<BatchTransfer, ApiError>>,
    atomic: bool,
) -> Result<Vec<Item>, ApiError> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let item = match item {
            Ok(t) => user_fee(ctx, p, &t.to, t.amount).await.map(|(_, fee)| (t, fee)),
            Err(e) => Err(e),
        };
        if atomic {
            if let Err(e) = &item {
                return Err(e.clone().at_item(i));
            }
        }
        out.push(item);
    }
    Ok(out)
}

/// Sends the items to their owners (one message per shard) and answers
/// once every item has.
fn run(ctx: &Arc<Ctx>, p: Principal, items: Vec<Item>, atomic: bool, reply: ReplyTo) {
    let n = items.len();
    // Every item holds the caller's name (its record names who moved it),
    // and counts one more reference to it while it travels. A name of
    // the batch's own keeps those counts in a cache line of their own:
    // with the session's, shared by every request of every connection,
    // the journal's reads of the name and the fan-out's releases on
    // another core took turns over one line, item after item.
    let p = Principal { user: Arc::from(&*p.user), ..p };
    // Items refused already have their answer in place.
    let slots = Slots::new(items.iter().map(|i| i.as_ref().err().map(|e| Err(e.clone()))).collect());
    // An atomic batch's owners hand its reserved items back through this.
    let (collect, collected) = atomic.then(mpsc::unbounded_channel::<(usize, Box<TransferCmd>)>).unzip();
    let mut outbox = Outbox::for_items(&ctx.router, n);
    for (i, item) in items.into_iter().enumerate() {
        let Ok((t, fee)) = item else { continue };
        let mut req = DebitReq::new(
            Kind::Transfer,
            Shape::Item,
            t.from,
            t.to,
            t.amount,
            t.memo,
            t.key,
            p.clone(),
            ReplyTo::item(&slots, i),
        )
        .with_fee(fee);
        if let Some(collect) = &collect {
            req = req.collected(i, collect.clone());
        }
        outbox.push(&ctx.router, req);
    }
    outbox.flush(&ctx.router);
    drop(collect);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let results = gather(&ctx, &slots, n, collected).await;
        reply.send(answer(results, atomic));
    });
}

/// Waits for every item: its answer, or (atomic) its reserved command,
/// which then goes to the journal with the others and answers from there.
async fn gather(
    ctx: &Ctx,
    slots: &Slots,
    n: usize,
    collected: Option<mpsc::UnboundedReceiver<(usize, Box<TransferCmd>)>>,
) -> Vec<Result<BatchItem, ApiError>> {
    if let Some(mut collected) = collected {
        // Each item either answers (refused by its owner, or its key's
        // result repeated) or is reserved and handed back, never both.
        let mut items = Vec::new();
        let mut collecting = true;
        loop {
            tokio::select! {
                biased;
                () = slots.answered(n.saturating_sub(items.len())) => break,
                k = collected.recv_many(&mut items, n.max(1)), if collecting => collecting = k > 0,
            }
        }
        if !items.is_empty() {
            items.sort_unstable_by_key(|(i, _)| *i);
            let refused = slots.read(|r| first_error(r.iter().map(Option::as_ref)));
            if let Err(cmd) = ctx.journal.send(Command::Batch(Box::new(BatchCmd { items, refused }))) {
                if let Command::Batch(b) = *cmd {
                    release(ctx, *b);
                }
            }
        }
    }
    slots.answered(n).await;
    slots.take().into_iter().map(|r| r.unwrap_or_else(|| Err(ApiError::internal("a batch item was lost")))).collect()
}

/// The journal has stopped (the server is stopping): the owners release
/// the items' reservations and keys, and the items answer `internal`.
fn release(ctx: &Ctx, b: BatchCmd) {
    let stopped = ApiError::internal("the journal has stopped");
    for (_, t) in b.items {
        let t = *t;
        let mut effects = vec![Effect::Settle { account: (&*t.from).into(), delta: 0, release: t.amount, id: 0 }];
        if let Some(key) = t.key {
            effects.push(Effect::KeyDone { from: t.from.clone(), key, result: Err(stopped.clone()) });
        }
        ctx.router.cast(ctx.router.shard_of(&t.from), ShardMsg::Effects(effects));
        t.reply.err(stopped.clone());
    }
}

/// The first failing item's error, naming the item.
fn first_error<'a>(results: impl Iterator<Item = Option<&'a Result<BatchItem, ApiError>>>) -> Option<ApiError> {
    results.enumerate().find_map(|(i, r)| match r {
        Some(Err(e)) if e.item.is_none() => Some(e.clone().at_item(i)),
        Some(Err(e)) => Some(e.clone()),
        _ => None,
    })
}

/// The batch's reply: every item's result, or (atomic) the first failure.
fn answer(results: Vec<Result<BatchItem, ApiError>>, atomic: bool) -> Result<Reply, ApiError> {
    if atomic {
        if let Some(e) = first_error(results.iter().map(Some)) {
            // The other items say only that item k failed: answer with
            // item k's own error.
            return Err(match e.item.and_then(|k| results.get(k)) {
                Some(Err(own)) => own.clone().at_item(e.item.unwrap_or_default()),
                _ => e,
            });
        }
    }
    let results: Vec<BatchItem> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|e| BatchItem::Failed { code: e.code, message: cut(e.message, BATCH_ERROR_BYTES_MAX) })
        })
        .collect();
    let failed = results.iter().filter(|r| matches!(r, BatchItem::Failed { .. })).count();
    Ok(Reply::Batch(BatchReply { applied: results.len() - failed, failed, results }))
}
