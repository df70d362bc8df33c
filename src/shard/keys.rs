//! Idempotency keys as the owning shard knows them: a key in the journal
//! (its duplicates wait for its outcome), a key settled (duplicates get the
//! original record), and, for keys settled long ago, the disk.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::error::{ApiError, ErrorCode};
use crate::ledger::Kind;
use crate::reply::ReplyTo;
use crate::store::{self, Store};
use crate::wire::{Shape, TransferView};

/// What an idempotency key stands for, as far as the owner knows.
enum KeyState {
    /// In the journal; duplicates wait here for its outcome.
    Pending {
        fingerprint: Fingerprint,
        waiters: Vec<(ReplyTo, Shape)>,
        /// Its transfer is an item of an atomic batch, which waits for
        /// every item before it goes to the journal.
        in_batch: bool,
    },
    Done {
        fingerprint: Fingerprint,
        view: Arc<TransferView>,
    },
}

/// The arguments a repeated key must match.
#[derive(Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub kind: Kind,
    pub to: Box<str>,
    pub amount: i64,
    pub memo: Option<Box<str>>,
}

impl Fingerprint {
    fn of_view(v: &TransferView) -> Fingerprint {
        Fingerprint {
            kind: v.kind,
            to: v.to.as_str().into(),
            amount: v.amount,
            memo: v.memo.as_deref().map(Into::into),
        }
    }
}

/// One shard's keys: those in flight, and the last `cached_max` settled
/// (older ones are read from disk when they come back).
pub struct Keys {
    map: HashMap<(Box<str>, Box<str>), KeyState, foldhash::fast::RandomState>,
    /// Settled keys in the order they settled, to bound `map`.
    done: VecDeque<(Box<str>, Box<str>)>,
    cached_max: usize,
}

impl Keys {
    #[must_use]
    pub fn new(cached_max: usize) -> Keys {
        Keys { map: HashMap::default(), done: VecDeque::new(), cached_max }
    }

    /// Looks the key up. `Ok(true)`: new key, go ahead. `Ok(false)`: the
    /// reply was taken (answered, or parked until the first use settles).
    ///
    /// An item of an atomic batch (`in_batch`) does not wait behind an
    /// item of another atomic batch: each batch would wait for the other
    /// before reaching the journal. It is refused instead.
    #[allow(clippy::too_many_arguments)] // the request's parts, as the shard holds them
    pub fn check(
        &mut self,
        store: &Store,
        from: &str,
        key: &str,
        fingerprint: &Fingerprint,
        shape: &Shape,
        in_batch: bool,
        reply: &mut Option<ReplyTo>,
    ) -> Result<bool, ApiError> {
        let conflict =
            || ApiError::new(ErrorCode::KeyConflict, format!("key {key:?} was used with different arguments"));
        match self.map.get_mut(&(Box::<str>::from(from), Box::<str>::from(key))) {
            Some(KeyState::Pending { fingerprint: f, waiters, in_batch: other_in_batch }) => {
                if f != fingerprint {
                    return Err(conflict());
                }
                if in_batch && *other_in_batch {
                    return Err(ApiError::new(
                        ErrorCode::KeyConflict,
                        format!("key {key:?} is in use by another atomic batch in flight; retry once it is answered"),
                    ));
                }
                waiters.extend(reply.take().map(|r| (r, shape.clone())));
                Ok(false)
            }
            Some(KeyState::Done { fingerprint: f, view }) => {
                if f != fingerprint {
                    return Err(conflict());
                }
                if let Some(r) = reply.take() {
                    r.ok(shape.reply(view.clone()));
                }
                Ok(false)
            }
            None => {
                // Settled keys leave memory after a while; the disk has them all.
                let Some(view) = store::lookup_key(&*store.db()?, from, key)? else {
                    return Ok(true);
                };
                if Fingerprint::of_view(&view) != *fingerprint {
                    return Err(conflict());
                }
                let view = Arc::new(view);
                self.remember(from.into(), key.into(), fingerprint.clone(), view.clone());
                if let Some(r) = reply.take() {
                    r.ok(shape.reply(view));
                }
                Ok(false)
            }
        }
    }

    /// The key's transfer went to the journal.
    pub fn pending(&mut self, from: Box<str>, key: Box<str>, fingerprint: Fingerprint, in_batch: bool) {
        self.map.insert((from, key), KeyState::Pending { fingerprint, waiters: Vec::new(), in_batch });
    }

    /// The key's transfer never reached the journal: the key is free again.
    pub fn forget(&mut self, from: &str, key: &str) {
        self.map.remove(&(Box::<str>::from(from), Box::<str>::from(key)));
    }

    /// The key's transfer was committed (or refused): its duplicates get
    /// the same answer.
    pub fn settled(&mut self, from: Box<str>, key: Box<str>, result: Result<Arc<TransferView>, ApiError>) {
        let Some(KeyState::Pending { fingerprint, waiters, .. }) = self.map.remove(&(from.clone(), key.clone())) else {
            return;
        };
        match result {
            Ok(view) => {
                for (w, shape) in waiters {
                    w.ok(shape.reply(view.clone()));
                }
                self.remember(from, key, fingerprint, view);
            }
            // A refused transfer used nothing up: the key is free again.
            Err(e) => {
                for (w, _) in waiters {
                    w.err(e.clone());
                }
            }
        }
    }

    fn remember(&mut self, from: Box<str>, key: Box<str>, fingerprint: Fingerprint, view: Arc<TransferView>) {
        self.done.push_back((from.clone(), key.clone()));
        self.map.insert((from, key), KeyState::Done { fingerprint, view });
        while self.done.len() > self.cached_max {
            if let Some(old) = self.done.pop_front() {
                if matches!(self.map.get(&old), Some(KeyState::Done { .. })) {
                    self.map.remove(&old);
                }
            }
        }
    }
}
