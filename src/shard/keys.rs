//! Idempotency keys as the owning shard knows them: a key in the journal
//! (its duplicates wait for its outcome), a key looked up (duplicates get
//! the original record), and, for keys settled, the store.
//!
//! Most new keys need no lookup at all: the store's key index
//! ([`KeyIndex::is_new`](crate::store::KeyIndex::is_new): its recent keys
//! and a filter of the table's) says they were certainly never used.
//! Otherwise the disk is read off the shard's path: a key the shard does not know is
//! looked up by the [`KeyReader`] thread while its request (and any other
//! request with the same key) waits here; the answer comes back as a
//! message. No request with that key can reach the journal meanwhile (they
//! all wait), so a miss stays a miss until the first of them is reserved.
//!
//! One reader thread for all shards, reading whatever has queued up in one
//! read transaction: a task on the blocking pool per lookup measured ~2x
//! the server's CPU per keyed transfer (thread wake-ups, and many threads
//! contending for redb's page cache on 2 cores).

use std::collections::VecDeque;
use std::sync::Arc;

use super::{DebitReq, Then};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::Kind;
use crate::reply::ReplyTo;
use crate::wire::{Shape, TransferView};

/// What an idempotency key stands for, as far as the owner knows.
enum KeyState {
    /// Being looked up on disk; these requests wait for the answer.
    Looking(Vec<DebitReq>),
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

/// `(from, key)` borrowed, to look the map up without building its key
/// (hashed as the owned pair is).
#[derive(Hash)]
struct KeyRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(Box<str>, Box<str>)> for KeyRef<'_> {
    fn equivalent(&self, k: &(Box<str>, Box<str>)) -> bool {
        *k.0 == *self.0 && *k.1 == *self.1
    }
}

/// What [`Keys::check`] found.
pub enum Check {
    /// A new key: go ahead.
    New(DebitReq),
    /// The request was answered, or parked until the first use settles.
    Taken,
    /// Not known here: look on disk ([`Keys::looking`]).
    Unknown(DebitReq),
}

/// One shard's keys: those in flight, and the last `cached_max` found by a
/// lookup. A key settled here is forgotten: when it comes back, the
/// store's key index (memory, or the table) has it.
pub struct Keys {
    map: hashbrown::HashMap<(Box<str>, Box<str>), KeyState, foldhash::fast::RandomState>,
    /// Keys found by lookups, in the order they were found, to bound `map`.
    done: VecDeque<(Box<str>, Box<str>)>,
    cached_max: usize,
}

impl Keys {
    #[must_use]
    pub fn new(cached_max: usize) -> Keys {
        Keys { map: hashbrown::HashMap::default(), done: VecDeque::new(), cached_max }
    }

    /// Looks the key of `req` up in memory. `known_new(from, key)`, asked
    /// only of a key not held here: whether it is known never to have been
    /// used (the disk was asked since and had nothing, or the store's key
    /// index says so), so that it is new rather than to be looked up.
    ///
    /// An item of an atomic batch does not wait behind an item of another
    /// atomic batch: each batch would wait for the other before reaching
    /// the journal. It is refused instead.
    pub fn check(
        &mut self,
        req: DebitReq,
        fingerprint: &Fingerprint,
        known_new: impl FnOnce(&str, &str) -> bool,
    ) -> Check {
        let key = req.key.as_deref().unwrap_or_default();
        let conflict =
            || ApiError::new(ErrorCode::KeyConflict, format!("key {key:?} was used with different arguments"));
        let in_batch = matches!(req.then, Then::Collect(..));
        match self.map.get_mut(&KeyRef(&req.from, key)) {
            Some(KeyState::Pending { fingerprint: f, waiters, in_batch: other_in_batch }) => {
                if f != fingerprint {
                    req.reply.err(conflict());
                } else if in_batch && *other_in_batch {
                    req.reply.err(ApiError::new(
                        ErrorCode::KeyConflict,
                        format!("key {key:?} is in use by another atomic batch in flight; retry once it is answered"),
                    ));
                } else {
                    waiters.push((req.reply, req.shape));
                }
                Check::Taken
            }
            Some(KeyState::Done { fingerprint: f, view }) => {
                if f == fingerprint {
                    req.reply.ok(req.shape.reply(view.clone()));
                } else {
                    req.reply.err(conflict());
                }
                Check::Taken
            }
            // The caller queues the request behind the lookup.
            Some(KeyState::Looking(_)) => Check::Unknown(req),
            // Settled keys leave memory; the store has them all.
            None if known_new(&req.from, key) => Check::New(req),
            None => Check::Unknown(req),
        }
    }

    /// Queues `req` behind the disk lookup of its key; `true` if it is the
    /// first (the caller starts the lookup).
    pub fn looking(&mut self, req: DebitReq) -> bool {
        let entry = (req.from.clone(), req.key.clone().unwrap_or_default());
        match self.map.entry(entry).or_insert_with(|| KeyState::Looking(Vec::new())) {
            KeyState::Looking(waiting) => {
                waiting.push(req);
                waiting.len() == 1
            }
            // `check` said unknown; nothing else ran since.
            _ => unreachable!("a key being looked up is known"),
        }
    }

    /// The disk's answer for a key looked up: what it holds (remembered
    /// as settled), and the requests that waited, to go through again.
    pub fn found(&mut self, from: Box<str>, key: Box<str>, found: Option<TransferView>) -> Vec<DebitReq> {
        let Some(KeyState::Looking(waiting)) = self.map.remove(&KeyRef(&from, &key)) else {
            return Vec::new();
        };
        if let Some(view) = found {
            self.remember(from, key, Fingerprint::of_view(&view), Arc::new(view));
        }
        waiting
    }

    /// The key's transfer went to the journal.
    pub fn pending(&mut self, from: Box<str>, key: Box<str>, fingerprint: Fingerprint, in_batch: bool) {
        self.map.insert((from, key), KeyState::Pending { fingerprint, waiters: Vec::new(), in_batch });
    }

    /// The key's transfer never reached the journal: the key is free again.
    pub fn forget(&mut self, from: &str, key: &str) {
        self.map.remove(&KeyRef(from, key));
    }

    /// The key's transfer was committed (or refused): its duplicates get
    /// the same answer.
    pub fn settled(&mut self, from: &str, key: &str, result: Result<Arc<TransferView>, ApiError>) {
        let Some(KeyState::Pending { waiters, .. }) = self.map.remove(&KeyRef(from, key)) else {
            return;
        };
        match result {
            // Not remembered here: a later repeat finds the key in the
            // store's key index, which has it from the commit on (a
            // remembered copy cost every keyed transfer two string copies
            // and an eviction, for the rare repeat).
            Ok(view) => {
                for (w, shape) in waiters {
                    w.ok(shape.reply(view.clone()));
                }
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

/// A shard's keys to look up, and where the answers go.
pub struct Lookup {
    pub wanted: Vec<(Box<str>, Box<str>)>,
    pub shard: ractor::ActorRef<super::ShardMsg>,
}

/// The thread that looks keys up on disk for every shard.
#[derive(Clone)]
pub struct KeyReader {
    tx: crossbeam_channel::Sender<Lookup>,
    store: std::sync::Arc<crate::store::Store>,
}

impl KeyReader {
    /// Starts the reader thread; it stops when every handle is dropped.
    ///
    /// # Errors
    ///
    /// If the thread cannot be started.
    pub fn start(store: std::sync::Arc<crate::store::Store>) -> std::io::Result<KeyReader> {
        let (tx, rx) = crossbeam_channel::unbounded::<Lookup>();
        let reader = KeyReader { tx, store: store.clone() };
        std::thread::Builder::new().name("tally-keys".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                // Everything queued meanwhile is read in the same transaction.
                let lookups: Vec<Lookup> = std::iter::once(first).chain(rx.try_iter()).collect();
                let wanted: Vec<(Box<str>, Box<str>)> = lookups.iter().flat_map(|l| l.wanted.iter().cloned()).collect();
                let found = store
                    .db()
                    .and_then(|db| crate::store::key_index::lookup(&db, store.history(), store.keys(), &wanted))
                    .map_err(ApiError::from);
                let mut answers = found.map(Vec::into_iter);
                for l in lookups {
                    let found = match &mut answers {
                        Ok(it) => Ok(it.by_ref().take(l.wanted.len()).map(|r| r.map_err(ApiError::from)).collect()),
                        Err(e) => Err(e.clone()),
                    };
                    let _ = l
                        .shard
                        .cast(super::ShardMsg::KeysFound(Box::new(super::KeysFound { wanted: l.wanted, found })));
                }
            }
        })?;
        Ok(reader)
    }

    /// Whether the key was certainly never used, known without the disk
    /// (the store's [`KeyIndex`](crate::store::KeyIndex)): most new keys
    /// need no lookup.
    #[must_use]
    pub fn is_new(&self, from: &str, key: &str) -> bool {
        self.store.keys().is_new(from, key)
    }

    /// Queues a lookup; gives it back if the reader has stopped.
    pub fn send(&self, lookup: Lookup) -> Result<(), Lookup> {
        self.tx.send(lookup).map_err(|e| e.into_inner())
    }
}
