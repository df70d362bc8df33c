//! Which shard owns an account, and the way debits reach it.

use std::hash::BuildHasher;
use std::sync::Arc;

use ractor::ActorRef;

use super::{DebitReq, ShardMsg};

/// Debits a connection has decoded but not yet sent, per owning shard: the
/// reader sends each shard one message per socket read instead of one per
/// request (ractor's per-message cost was ~13% of the runtime's CPU).
/// Whoever fills it must [`Outbox::flush`] before anything that could
/// reorder or wait: another op (it may go to the same shard), waiting for
/// more bytes or for an in-flight permit (the debits held here hold
/// permits), and the end of the connection.
#[derive(Default)]
pub struct Outbox {
    per_shard: Vec<Vec<DebitReq>>,
    /// Shards with debits waiting, in first-use order.
    used: Vec<usize>,
    /// Room made for a shard's debits at its first one.
    room: usize,
}

impl Outbox {
    /// For `n` debits at once (a batch's items), spread over `router`'s
    /// shards: each shard's list is made for about its share (a quarter
    /// more, for the spread of accounts), not grown item by item.
    #[must_use]
    pub fn for_items(router: &ShardRouter, n: usize) -> Outbox {
        let share = n.div_ceil(router.len().max(1));
        Outbox { room: (share + share / 4).min(n), ..Outbox::default() }
    }

    /// Holds `req` for its owning shard.
    pub fn push(&mut self, router: &ShardRouter, req: DebitReq) {
        if self.per_shard.len() != router.len() {
            self.per_shard.resize_with(router.len(), Vec::new);
        }
        let shard = router.shard_of(&req.from);
        if self.per_shard[shard].is_empty() {
            self.used.push(shard);
            self.per_shard[shard].reserve(self.room);
        }
        self.per_shard[shard].push(req);
    }

    /// Sends every shard its waiting debits.
    pub fn flush(&mut self, router: &ShardRouter) {
        for shard in self.used.drain(..) {
            let reqs = std::mem::take(&mut self.per_shard[shard]);
            router.cast(shard, ShardMsg::Debits(reqs));
        }
    }
}

/// Maps accounts to their owning shard.
#[derive(Clone)]
pub struct ShardRouter {
    shards: Arc<Vec<ActorRef<ShardMsg>>>,
}

/// Index of the shard owning `account` among `n`.
#[must_use]
pub fn shard_index(account: &str, n: usize) -> usize {
    let h = foldhash::fast::FixedState::with_seed(0x7a11_5eed).hash_one(account);
    usize::try_from(h % n as u64).unwrap_or(0)
}

impl ShardRouter {
    #[must_use]
    pub fn new(shards: Vec<ActorRef<ShardMsg>>) -> Self {
        ShardRouter { shards: Arc::new(shards) }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    #[must_use]
    pub fn shard_of(&self, account: &str) -> usize {
        shard_index(account, self.shards.len())
    }

    /// Sends to shard `i`. A stopped shard means the server is shutting down;
    /// the message (and any reply in it) is dropped, closing those requests.
    pub fn cast(&self, i: usize, msg: ShardMsg) {
        if self.shards[i].cast(msg).is_err() {
            tracing::warn!(shard = i, "message to a stopped shard dropped");
        }
    }

    /// Hands one debit to the shard owning its source: the one way a debit
    /// goes to its owner outside a connection's [`Outbox`] (which sends the
    /// same message, with the debits of one read).
    pub fn debit(&self, req: DebitReq) {
        let shard = self.shard_of(&req.from);
        self.cast(shard, ShardMsg::Debits(vec![req]));
    }

    /// Sends to the owner of `account`.
    pub fn send(&self, account: &str, msg: ShardMsg) {
        self.cast(self.shard_of(account), msg);
    }
}
