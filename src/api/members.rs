//! `add_node` and `remove_node`: a cluster's membership, changed through
//! openraft's joint consensus by the leader (others answer `not_leader`
//! before reaching here). A new member first joins as a learner and is
//! made a voter only once it has caught up, so a slow newcomer never
//! counts toward a majority it cannot yet help make.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::Ctx;
use crate::cluster::Member;
use crate::error::{ApiError, ErrorCode};
use crate::limits::{CLUSTER_MEMBERSHIP_TIMEOUT_MS, CLUSTER_MEMBERS_MAX};
use crate::reply::ReplyTo;
use crate::wire::args::{AddNodeArgs, RemoveNodeArgs};
use crate::wire::{MembersReply, Reply};

/// The cluster's Raft, or `bad_request` on a single server.
fn raft(ctx: &Ctx) -> Result<openraft::Raft<crate::cluster::TypeConfig>, ApiError> {
    ctx.cluster
        .as_ref()
        .map(|c| c.raft.clone())
        .ok_or_else(|| ApiError::bad_request("this server is not a cluster member ([cluster] is not set)"))
}

fn voters(raft: &openraft::Raft<crate::cluster::TypeConfig>) -> BTreeSet<u64> {
    raft.metrics().borrow().membership_config.membership().voter_ids().collect()
}

/// Runs a membership change with a deadline and answers with the voters.
fn change<F>(reply: ReplyTo, raft: openraft::Raft<crate::cluster::TypeConfig>, work: F)
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    tokio::spawn(async move {
        let wait = Duration::from_millis(CLUSTER_MEMBERSHIP_TIMEOUT_MS);
        match tokio::time::timeout(wait, work).await {
            Ok(Ok(())) => reply.ok(Reply::Members(MembersReply { voters: voters(&raft).into_iter().collect() })),
            Ok(Err(e)) => {
                reply.err(ApiError::new(ErrorCode::Unavailable, format!("the membership change failed: {e}")))
            }
            Err(_) => reply.err(ApiError::new(
                ErrorCode::UnknownOutcome,
                "the membership change did not finish in time; ask hello or retry (it is idempotent)",
            )),
        }
    });
}

fn address_ok(a: &str) -> bool {
    !a.is_empty() && a.len() <= 256 && a.parse::<std::net::SocketAddr>().is_ok()
}

pub(super) fn add_node(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    let a = args!(AddNodeArgs, args, reply);
    let raft = check!(raft(ctx), reply);
    if a.id == 0 || !address_ok(&a.client) || !address_ok(&a.raft) {
        return reply.err(ApiError::bad_request("add_node needs an id above 0 and client and raft as IP:port"));
    }
    let voters = voters(&raft);
    if !voters.contains(&a.id) && voters.len() >= CLUSTER_MEMBERS_MAX {
        return reply.err(ApiError::bad_request(format!("a cluster has at most {CLUSTER_MEMBERS_MAX} members")));
    }
    let member = Member { client: a.client, raft: a.raft };
    let r = raft.clone();
    change(reply, raft, async move {
        // Blocks until the learner has caught up with the leader's log.
        r.add_learner(a.id, member, true).await.map_err(|e| e.to_string())?;
        // Only this id is added: two changes at once cannot undo each other.
        let add = openraft::ChangeMembers::AddVoterIds([a.id].into());
        r.change_membership(add, false).await.map_err(|e| e.to_string())?;
        Ok(())
    });
}

pub(super) fn remove_node(ctx: &Arc<Ctx>, args: &[u8], reply: ReplyTo) {
    let a = args!(RemoveNodeArgs, args, reply);
    let raft = check!(raft(ctx), reply);
    let mut voters = voters(&raft);
    if !voters.remove(&a.id) {
        return reply.err(ApiError::not_found(format!("member {}", a.id)));
    }
    if voters.is_empty() {
        return reply.err(ApiError::bad_request("the last member cannot be removed"));
    }
    let r = raft.clone();
    change(reply, raft, async move {
        // Only this id is removed; retain = false: it stops receiving the log.
        let remove = openraft::ChangeMembers::RemoveVoters([a.id].into());
        r.change_membership(remove, false).await.map_err(|e| e.to_string())?;
        Ok(())
    });
}
