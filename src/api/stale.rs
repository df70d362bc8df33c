//! Stale reads: `balance`, `account`, `history` and `get_transfer` with
//! `consistency = "stale"`, answered by a cluster member that does not
//! lead (or leads without its lease) from the ledger it has applied.
//!
//! Why such an answer is sound, if not current:
//!
//! - **Only committed state.** A member applies an entry only once a
//!   majority holds it, so what it answers was, at some moment, the
//!   ledger; it may lag the leader by whatever it has not applied yet.
//! - **One moment per answer.** The balance, what is held and the last
//!   record come from the state machine's book, and the account's row from
//!   its database, both read under the machine's lock: no apply runs in
//!   between. A history page starts at that last record; records never
//!   change once written, so the page is read after the lock is released
//!   (as is a `get_transfer`), and an apply never waits for it.
//! - **The same rules as the leader's.** The caller was checked like any
//!   other (a token, a key, the op's roles); an account is shown only to
//!   staff or its owner, a deleted one is `deleted`, a missing one
//!   `not_found`, and another user's name on a record is hidden alike.
//!
//! - **Where it stands.** `balance`, `account` and `history` carry
//!   `as_of`, the id of the last record the member had applied at that
//!   moment: a client that made a transfer can tell whether the answer
//!   reflects it (record ids rise with commit order).
//!
//! What bounds them:
//!
//! - **Only while following a leader.** A member answers them only while
//!   it follows a leader it knows. One cut off from the others stands for
//!   election within an election timeout and then refuses (`unavailable`),
//!   as does a leader without its lease: a copy that may be behind for
//!   long, and a registry that may have missed a revoked key or token, is
//!   not served.
//! - **A few at a time.** They run on the blocking pool, which also carries
//!   the member's Raft log and state machine, and the balance reads wait
//!   for the machine's lock: at most
//!   [`CLUSTER_STALE_READS_MAX`](crate::limits::CLUSTER_STALE_READS_MAX)
//!   run at once on a member, and more are refused with `rate_limited`,
//!   so a flood of them cannot stall its replication.

use tokio::sync::OwnedSemaphorePermit;

use super::{account_id, blocking, own, page_limit};
use crate::auth::Principal;
use crate::cluster::ledger::LedgerMachine;
use crate::cluster::node::Serving;
use crate::error::{ApiError, ErrorCode};
use crate::ledger::BookAccount;
use crate::reply::ReplyTo;
use crate::store::{self, AccountMeta};
use crate::wire::{
    AccountArg, AccountView, BalanceReply, Consistency, ConsistencyArg, GetTransferArgs, HistoryArgs, Op, Reply,
};

/// Whether `op` with `args` asks for, and may have, a stale answer.
pub(super) fn wanted(op: Op, args: &[u8]) -> bool {
    matches!(op, Op::Balance | Op::Account | Op::History | Op::GetTransfer)
        && rmp_serde::from_slice::<ConsistencyArg>(args).is_ok_and(|a| a.consistency == Some(Consistency::Stale))
}

/// A stale read let in: the machine to read and its place among those
/// running.
pub(super) struct Admitted {
    machine: LedgerMachine,
    _permit: OwnedSemaphorePermit,
}

/// Lets a stale read in on this member, or says why not.
pub(super) fn admit(c: &Serving) -> Result<Admitted, ApiError> {
    let seen = c.view.seen();
    let follows = matches!(seen.role, "follower" | "learner") && seen.leader.is_some_and(|(id, _)| id != c.view.node);
    if !follows {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "this member follows no leader now, so its copy may be far behind: ask another member",
        ));
    }
    let permit = c.stale_reads.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(ErrorCode::RateLimited, "too many stale reads at once on this member: retry, or ask the leader")
    })?;
    Ok(Admitted { machine: c.machine.clone(), _permit: permit })
}

/// Answers a stale read of `op` (one [`wanted`] allows); the permit is
/// held until the answer is ready.
pub(super) fn read(admitted: Admitted, op: Op, p: Principal, args: &[u8], reply: ReplyTo) {
    let machine = admitted.machine.clone();
    let permit = admitted;
    match op {
        Op::Balance | Op::Account => {
            let a = args!(AccountArg, args, reply);
            let account = own(&p, a.account);
            check!(account_id(&account), reply);
            blocking(reply, move || {
                let _running = permit;
                let (found, as_of) = machine.read_at(|book, db| Ok(account_of(book, db, &account, &p)))?;
                let (meta, acct) = found?;
                let available = acct.balance.saturating_sub(acct.held);
                let as_of = Some(as_of);
                Ok(if op == Op::Balance {
                    Reply::Balance(BalanceReply { account, balance: acct.balance, held: acct.held, available, as_of })
                } else {
                    Reply::Account(Box::new(AccountView {
                        account,
                        owner: meta.owner,
                        tags: meta.tags,
                        balance: acct.balance,
                        available,
                        status: "open",
                        created: meta.created,
                        memo: meta.memo,
                        as_of,
                    }))
                })
            });
        }
        Op::History => {
            let a = args!(HistoryArgs, args, reply);
            let account = own(&p, a.account);
            check!(account_id(&account), reply);
            let limit = check!(page_limit(a.limit), reply);
            blocking(reply, move || {
                let _running = permit;
                let (found, as_of) = machine.read_at(|book, db| Ok(account_of(book, db, &account, &p)))?;
                let (_, acct) = found?;
                // The page is read without the lock: records never change.
                let mut page = crate::shard::history_page(
                    &*machine.database()?,
                    machine.history(),
                    &account,
                    acct.last,
                    a.after,
                    limit,
                    &p,
                )?;
                if let Reply::History(h) = &mut page {
                    h.as_of = Some(as_of);
                }
                Ok(page)
            });
        }
        Op::GetTransfer => {
            let a = args!(GetTransferArgs, args, reply);
            blocking(reply, move || {
                let _running = permit;
                super::money::transfer_shown(&*machine.database()?, machine.history(), a.id, &p)
            });
        }
        _ => reply.err(ApiError::internal("not a read a member answers stale")),
    }
}

/// The account's row and its entry in the applied book, if `p` may read it.
fn account_of(
    book: &crate::ledger::Book,
    db: &redb::Database,
    account: &str,
    p: &Principal,
) -> Result<(AccountMeta, BookAccount), ApiError> {
    let found = store::account_meta(db, account)?.zip(book.get(account).copied());
    let Some((meta, acct)) = found else {
        return Err(ApiError::not_found(format!("account {account}")));
    };
    if !(p.sees_any() || meta.owner.as_deref() == Some(&*p.user)) {
        return Err(ApiError::forbidden(format!("account {account} is not yours")));
    }
    if meta.deleted.is_some() {
        return Err(ApiError::new(ErrorCode::Deleted, format!("account {account} was deleted")));
    }
    Ok((meta, acct))
}
