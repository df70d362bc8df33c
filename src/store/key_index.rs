//! The idempotency keys of recent records, held in memory and merged into
//! the `keys` table in sorted runs.
//!
//! # Why
//!
//! The `keys` table is ordered by `(from, key)`, which has nothing to do
//! with the order records are written in: a batch's 2,000 new keys land on
//! about 2,000 different leaves of a tree that only grows, and redb copies
//! and writes every leaf a transaction touches. Writing each batch's keys
//! straight into the table made a keyed transfer ~4x dearer than an
//! unkeyed one, nearly all of it in those page writes (docs/performance.md).
//!
//! Here a batch's keys go to memory ([`KeyIndex`]'s `fresh` map); the
//! records themselves, which carry their keys, are the durable copy. Once
//! `fresh` holds [`KEYS_FREEZE_AT`] keys (or covers
//! [`KEYS_FREEZE_RECORDS`] records), it is frozen into a sorted run, and
//! the following commits insert that run into the table a slice at a time,
//! in key order, so that each leaf is written once per run rather than
//! once per key.
//!
//! # Why it is safe
//!
//! The invariant, at every commit: every key of a record with id below
//! `meta.keys_from` is in the `keys` table; every key of a record from
//! there on is in memory (`fresh` or the run being merged).
//! - `keys_from` is written only in the transaction that inserts a run's
//!   last slice, and moves to where the run ends (`fresh_from`).
//! - Memory changes only after the transaction that wrote the records (or
//!   the slice) has committed ([`KeyIndex::committed`]), so a failed
//!   commit leaves nothing behind in memory.
//! - On open (and whenever the database is replaced), memory is rebuilt
//!   from the records from `keys_from` on ([`KeyIndex::rebuild`]). A run
//!   that was being merged is merged again; inserting a key that is
//!   already there with the same id changes nothing.
//! - A folder written before this index has no `keys_from`: every key is
//!   in the table, and opening it writes `keys_from` at the record after
//!   its head ([`mark_start`]), as for a new folder.
//!
//! A lookup ([`lookup`]) checks memory first and only then begins its read
//! transaction. A key leaves memory only after the commit that put it in
//! the table, so a key absent from memory at the check is in any
//! transaction begun after it. The other order could miss a key merged in
//! between, and a missed key would apply a retried transfer twice.
//!
//! A new key enters memory just after its record's commit
//! ([`KeyIndex::committed`]), so for that moment it is in neither memory
//! nor the table. That is safe because nobody asks: the owning shard holds
//! a key in flight as pending until its transfer's outcome comes back, and
//! the outcome is sent only after `committed` (in a cluster, after the
//! member's apply, which a new leader also waits for before it serves).
//!
//! The filter ([`KeyIndex::is_new`]) holds every key of the table that is
//! not in memory: it is registered before it reads the table, every run
//! frozen from then on goes into it before the run can be merged, and the
//! run being merged at registration goes in before the filter is used. It
//! takes ~3 bytes per key of the table, rounded up to a power of two (at
//! most [`KEYS_FILTER_MAX`] keys' worth; past that its false positives
//! grow and more new keys are looked up), and is built again from the
//! table on every start, on a thread of its own; lookups read the table
//! meanwhile.
//!
//! A folder written by this index must not be opened by an older version:
//! that one reads only the table, and would miss the keys held in memory
//! here (it would apply their repeats again).

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, Weak};

use hashbrown::HashTable;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::history::{History, Records};
use super::{StoreError, KEYS, META};
use crate::limits::{
    KEYS_FILTER_MAX, KEYS_FILTER_MIN, KEYS_FREEZE_AT, KEYS_FREEZE_RECORDS, KEYS_MERGE_MIN, KEYS_SORT_INLINE_MAX,
};

mod filter;
use filter::Filter;

/// `meta` row: the first record whose key may not be in the `keys` table.
const KEYS_FROM: &str = "keys_from";

type Key = (Box<str>, Box<str>);

/// Keys in the order their records were written, found by hash.
#[derive(Default)]
struct Set {
    /// (from, key), record id, hash.
    entries: Vec<(Key, u64, u64)>,
    index: HashTable<u32>,
}

impl Set {
    fn get(&self, hash: u64, from: &str, key: &str) -> Option<u64> {
        let i = self.index.find(hash, |&i| {
            let ((f, k), _, _) = &self.entries[i as usize];
            **f == *from && **k == *key
        })?;
        Some(self.entries[*i as usize].1)
    }

    fn insert(&mut self, hash: u64, key: Key, id: u64) {
        let i = u32::try_from(self.entries.len()).expect("a set holds at most a few hundred thousand keys");
        self.entries.push((key, id, hash));
        let entries = &self.entries;
        self.index.insert_unique(hash, i, |&j| entries[j as usize].2);
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entries' positions in `(from, key)` order.
    fn order(&self) -> Vec<u32> {
        let mut order: Vec<u32> = (0..u32::try_from(self.entries.len()).unwrap_or(u32::MAX)).collect();
        order.sort_unstable_by(|&a, &b| self.entries[a as usize].0.cmp(&self.entries[b as usize].0));
        order
    }
}

/// The keys of recent records, not (yet) in the `keys` table.
pub struct KeyIndex {
    state: Arc<Mutex<Recent>>,
    hasher: foldhash::fast::RandomState,
    limits: Limits,
    /// The threads started to sort runs and build filters, for tests to
    /// wait on.
    #[cfg(test)]
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// When `fresh` is frozen, and the least a commit merges of a run.
#[derive(Clone, Copy, Debug)]
struct Limits {
    freeze_at: usize,
    freeze_records: u64,
    merge_min: usize,
    filter_min: usize,
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex::with_limits(KEYS_FREEZE_AT, KEYS_FREEZE_RECORDS as u64, KEYS_MERGE_MIN, KEYS_FILTER_MIN)
    }
}

#[derive(Default)]
struct Recent {
    /// Keys of the records from `fresh_from` on.
    fresh: Set,
    fresh_from: u64,
    /// The run being inserted into the table (the keys of the records
    /// from `keys_from` up to `fresh_from`); `Some` even when empty, until
    /// the commit that moves `keys_from`.
    merging: Option<Merging>,
    /// A filter of every key in the table that is not in memory, once
    /// built: a key in neither is certainly new ([`KeyIndex::is_new`]).
    filter: Option<Arc<Filter>>,
    /// A filter being built from the table (to replace `filter` when that
    /// one is full), with the generation it is for.
    building: Option<(u64, Arc<Filter>)>,
    /// Bumped whenever memory is rebuilt (the database may be another), so
    /// that a filter built from the old one is not taken.
    generation: u64,
    /// The database memory was rebuilt from, for building filters (weak:
    /// the store must be able to close it).
    db: Weak<Database>,
}

struct Merging {
    run: Arc<Set>,
    /// The run's positions in key order, once sorted (a large run is
    /// sorted on a thread of its own, so that neither the journal nor a
    /// lookup waits for it; merging starts when it is done).
    order: Option<Arc<Vec<u32>>>,
    /// How many of `order` are in the table.
    merged: usize,
}

impl Recent {
    fn get(&self, hash: u64, from: &str, key: &str) -> Option<u64> {
        self.fresh.get(hash, from, key).or_else(|| self.merging.as_ref()?.run.get(hash, from, key))
    }

    fn len(&self) -> usize {
        self.fresh.len() + self.merging.as_ref().map_or(0, |m| m.run.len() - m.merged)
    }

    /// The filters a run frozen now must go into.
    fn filters(&self) -> Vec<Arc<Filter>> {
        self.filter.iter().cloned().chain(self.building.iter().map(|(_, f)| f.clone())).collect()
    }
}

/// What one write transaction does to the index: filled by
/// [`KeyPlan::put`] for each batch the transaction writes, then handed to
/// [`KeyIndex::committed`] once it has committed (or dropped if it did not).
pub struct KeyPlan {
    merge: Option<(Arc<Set>, Arc<Vec<u32>>)>,
    merged: usize,
    /// The transaction moves `keys_from` (the run is all in).
    finished: bool,
    fresh_from: u64,
    merge_min: usize,
}

impl KeyPlan {
    /// Puts into `txn` the next slice of the run being merged, for a batch
    /// with `new_keys` keys: twice as many, at least [`KEYS_MERGE_MIN`], so
    /// that a run is in before the next one is frozen.
    pub fn put(&mut self, txn: &redb::WriteTransaction, new_keys: usize) -> Result<(), StoreError> {
        if let Some((run, order)) = self.merge.as_ref().filter(|_| !self.finished) {
            let end = order.len().min(self.merged + (2 * new_keys).max(self.merge_min));
            if end > self.merged {
                let mut table = txn.open_table(KEYS)?;
                for &i in &order[self.merged..end] {
                    let ((from, key), id, _) = &run.entries[i as usize];
                    table.insert((&**from, &**key), *id)?;
                }
            }
            self.merged = end;
            if end == order.len() {
                txn.open_table(META)?.insert(KEYS_FROM, &self.fresh_from.to_be_bytes()[..])?;
                self.finished = true;
            }
        }
        Ok(())
    }
}

impl KeyIndex {
    fn with_limits(freeze_at: usize, freeze_records: u64, merge_min: usize, filter_min: usize) -> KeyIndex {
        KeyIndex {
            state: Arc::default(),
            hasher: foldhash::fast::RandomState::default(),
            limits: Limits { freeze_at, freeze_records, merge_min, filter_min },
            #[cfg(test)]
            threads: Mutex::default(),
        }
    }

    fn hash(&self, from: &str, key: &str) -> u64 {
        self.hasher.hash_one((from, key))
    }

    /// Memory as the database holds it: the keys of the records from
    /// `keys_from` on (some may be in the history's segments already).
    pub fn rebuild(&self, db: &Arc<Database>, history: &History) -> Result<(), StoreError> {
        let txn = db.begin_read()?;
        let head = super::recovery::read_head(&txn)?;
        let from = keys_from_or(&txn, head.id + 1)?;
        let mut fresh = Set::default();
        Records::open(&txn, history)?.for_each(from, |stored| {
            let r = stored.record()?;
            if let Some(key) = r.key {
                let hash = self.hash(r.from, key);
                fresh.insert(hash, (r.from.into(), key.into()), stored.id);
            }
            Ok(true)
        })?;
        let frozen = {
            let mut state = self.state.lock().map_err(|_| poisoned())?;
            let generation = state.generation + 1;
            *state = Recent {
                fresh,
                fresh_from: from,
                merging: None,
                filter: None,
                building: None,
                generation,
                db: Arc::downgrade(db),
            };
            state.freeze_if_due(head.id, self.limits)
        };
        self.sort(frozen);
        self.start_filter();
        Ok(())
    }

    /// Starts building a filter of the table's keys, sized for twice what
    /// it holds, unless one is being built. It is registered before the
    /// table is read, so that every run frozen from then on goes into it
    /// too (and the run being merged now is put in here): once the read
    /// ends, it holds every key of the table not in memory.
    fn start_filter(&self) {
        let Some(db) = self.state.lock().ok().and_then(|s| s.db.upgrade()) else { return };
        let len = (|| -> Result<u64, StoreError> { Ok(db.begin_read()?.open_table(KEYS)?.len()?) })().unwrap_or(0);
        let capacity =
            usize::try_from(len).unwrap_or(usize::MAX).saturating_add(self.limits.freeze_at).saturating_mul(2);
        let filter = Arc::new(Filter::new(capacity.clamp(self.limits.filter_min, KEYS_FILTER_MAX)));
        let (generation, merging) = {
            let Ok(mut state) = self.state.lock() else { return };
            if state.building.is_some() {
                return;
            }
            state.building = Some((state.generation, filter.clone()));
            (state.generation, state.merging.as_ref().map(|m| m.run.clone()))
        };
        let (shared, hasher) = (self.state.clone(), self.hasher.clone());
        let build = move || {
            let filled = (|| -> Result<(), StoreError> {
                // The run being merged at registration may finish before
                // the read below begins or after; either way it is in.
                for (_, _, hash) in merging.iter().flat_map(|run| &run.entries) {
                    filter.insert(*hash);
                }
                let txn = db.begin_read()?;
                drop(db);
                for row in txn.open_table(KEYS)?.iter()? {
                    let (k, _) = row?;
                    let (from, key) = k.value();
                    filter.insert(hasher.hash_one((from, key)));
                }
                Ok(())
            })();
            let Ok(mut state) = shared.lock() else { return };
            if !matches!(&state.building, Some((g, f)) if *g == generation && Arc::ptr_eq(f, &filter)) {
                return;
            }
            state.building = None;
            match filled {
                Ok(()) => state.filter = Some(filter),
                // Lookups go to the table meanwhile; the next freeze tries
                // again.
                Err(e) => tracing::warn!(error = %e, "cannot build the filter of idempotency keys"),
            }
        };
        if !self.spawn("tally-keys-filter", build) {
            // Tried again at the next freeze.
            if let Ok(mut state) = self.state.lock() {
                state.building = None;
            }
        }
    }

    /// Whether `(from, key)` was certainly never used: it is not in
    /// memory, and the filter of the table says it is not there.
    /// `false` means "look it up" (a filter's false positive, or no filter
    /// yet).
    pub fn is_new(&self, from: &str, key: &str) -> bool {
        let hash = self.hash(from, key);
        let Ok(state) = self.state.lock() else { return false };
        state.get(hash, from, key).is_none() && state.filter.as_ref().is_some_and(|f| !f.may_contain(hash))
    }

    /// What the next write transaction starts from.
    pub fn plan(&self) -> Result<KeyPlan, StoreError> {
        let state = self.state.lock().map_err(|_| poisoned())?;
        let (merge, merged) = match &state.merging {
            Some(Merging { run, order: Some(order), merged }) => (Some((run.clone(), order.clone())), *merged),
            _ => (None, 0),
        };
        Ok(KeyPlan { merge, merged, finished: false, fresh_from: state.fresh_from, merge_min: self.limits.merge_min })
    }

    /// Takes in what a committed transaction did: its merge, and `keys`,
    /// the new keys of its batches (from, key, record id); `head` is the
    /// last record it wrote (or the head it left unchanged).
    pub fn committed(
        &self,
        plan: KeyPlan,
        keys: impl IntoIterator<Item = (Box<str>, Box<str>, u64)>,
        head: u64,
    ) -> Result<(), StoreError> {
        let (frozen, due) = {
            let mut state = self.state.lock().map_err(|_| poisoned())?;
            // The run the plan merged, if memory still has it (a rebuild
            // in between starts over from the disk: the progress is moot,
            // but the transaction's new keys still go in below).
            let same = |m: &Merging| plan.merge.as_ref().is_some_and(|(run, _)| Arc::ptr_eq(run, &m.run));
            if state.merging.as_ref().is_some_and(same) {
                if plan.finished {
                    state.merging = None;
                } else if let Some(m) = &mut state.merging {
                    m.merged = plan.merged;
                }
            }
            for (from, key, id) in keys {
                let hash = self.hash(&from, &key);
                state.fresh.insert(hash, (from, key), id);
            }
            let frozen = state.freeze_if_due(head, self.limits);
            // A full filter is replaced, a missing one (its build failed)
            // tried again, once per run.
            let due = frozen.is_some() && state.building.is_none() && state.filter.as_ref().is_none_or(|f| f.is_full());
            (frozen, due)
        };
        self.sort(frozen);
        if due {
            self.start_filter();
        }
        Ok(())
    }

    /// Sorts a run just frozen: a small one here, a large one on a thread
    /// of its own, which hands the order over when it is done.
    fn sort(&self, frozen: Option<Arc<Set>>) {
        let Some(run) = frozen else { return };
        // The run's keys go into the filters before its merge can start
        // (the order is what lets it start), so a key is in the filters
        // before it can leave memory. A filter registered later takes the
        // run in itself (`start_filter`).
        let job = |state: Arc<Mutex<Recent>>, run: Arc<Set>| {
            move || {
                let order = Arc::new(run.order());
                let filters = state.lock().map(|s| s.filters()).unwrap_or_default();
                for f in &filters {
                    for (_, _, hash) in &run.entries {
                        f.insert(*hash);
                    }
                }
                if let Ok(mut s) = state.lock() {
                    if let Some(m) = s.merging.as_mut().filter(|m| Arc::ptr_eq(&m.run, &run)) {
                        m.order = Some(order);
                    }
                }
            }
        };
        // Without a thread of its own, a run is sorted here, late rather
        // than never (an unsorted run is never merged, and no other is
        // frozen meanwhile).
        if run.len() > KEYS_SORT_INLINE_MAX && self.spawn("tally-keys-sort", job(self.state.clone(), run.clone())) {
            return;
        }
        job(self.state.clone(), run)();
    }

    /// Waits for the threads started so far (sorting runs, building
    /// filters).
    #[cfg(test)]
    fn settled(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        for t in threads {
            t.join().unwrap();
        }
    }

    /// Runs `f` on a thread of its own; `false` if none could be started.
    fn spawn(&self, name: &str, f: impl FnOnce() + Send + 'static) -> bool {
        match std::thread::Builder::new().name(name.into()).spawn(f) {
            Ok(_thread) => {
                #[cfg(test)]
                self.threads.lock().unwrap().push(_thread);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, thread = name, "cannot start a thread of the key index");
                false
            }
        }
    }

    /// How many keys memory holds (fresh and not yet merged).
    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |s| s.len())
    }

    /// Whether memory holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Recent {
    /// Freezes `fresh` into a run once it is big enough, or covers enough
    /// records that a restart would have too many to read, and no run is
    /// being merged; the run, to be sorted.
    fn freeze_if_due(&mut self, head: u64, limits: Limits) -> Option<Arc<Set>> {
        let records = (head + 1).saturating_sub(self.fresh_from);
        let due = self.fresh.len() >= limits.freeze_at || records >= limits.freeze_records;
        if self.merging.is_some() || !due {
            return None;
        }
        let run = Arc::new(std::mem::take(&mut self.fresh));
        self.merging = Some(Merging { run: run.clone(), order: None, merged: 0 });
        self.fresh_from = head + 1;
        Some(run)
    }
}

/// `keys_from`; `otherwise` in a folder not yet opened by this version,
/// whose keys are all in the table.
fn keys_from_or(txn: &redb::ReadTransaction, otherwise: u64) -> Result<u64, StoreError> {
    match txn.open_table(META)?.get(KEYS_FROM)? {
        Some(v) => super::recovery::read_u64(v.value()),
        None => Ok(otherwise),
    }
}

/// Writes `keys_from` if the folder has none: a new folder, or one
/// written before this index, whose keys are all in the table; either way
/// every key from the next record on is in memory.
pub(super) fn mark_start(meta: &mut redb::Table<&str, &[u8]>) -> Result<(), StoreError> {
    if meta.get(KEYS_FROM)?.is_none() {
        let head = match meta.get(super::HEAD)? {
            Some(v) => super::Head::decode(v.value())?,
            None => return Err(StoreError::Corrupt("no head".into())),
        };
        meta.insert(KEYS_FROM, &(head.id + 1).to_be_bytes()[..])?;
    }
    Ok(())
}

/// Finds the transfers idempotency keys were first used for, each
/// `(from, key)`: memory first, then one read transaction (see the module
/// header for why in this order); a key whose record cannot be read fails
/// alone.
pub fn lookup(
    db: &Database,
    history: &History,
    index: &KeyIndex,
    wanted: &[(Box<str>, Box<str>)],
) -> Result<Vec<Result<Option<crate::wire::TransferView>, StoreError>>, StoreError> {
    let hashes: Vec<u64> = wanted.iter().map(|(from, key)| index.hash(from, key)).collect();
    // In memory: its id; certainly not in the table: `Some(None)`.
    let recent: Vec<Option<Option<u64>>> = {
        let state = index.state.lock().map_err(|_| poisoned())?;
        let absent = |hash| state.filter.as_ref().is_some_and(|f| !f.may_contain(hash));
        wanted
            .iter()
            .zip(hashes)
            .map(|((from, key), hash)| match state.get(hash, from, key) {
                Some(id) => Some(Some(id)),
                None if absent(hash) => Some(None),
                None => None,
            })
            .collect()
    };
    let txn = db.begin_read()?;
    let keys = txn.open_table(KEYS)?;
    let records = Records::open(&txn, history)?;
    let one = |(from, key): &(Box<str>, Box<str>), recent: Option<Option<u64>>| {
        let id = match recent {
            Some(Some(id)) => id,
            Some(None) => return Ok(None),
            None => match keys.get((&**from, &**key))? {
                Some(v) => v.value(),
                None => return Ok(None),
            },
        };
        let view = records.with_record(id, super::queries::view_of)?;
        Ok(Some(view.ok_or_else(|| StoreError::Corrupt(format!("key points at missing transfer {id}")))?))
    };
    Ok(wanted.iter().zip(recent).map(|(w, r)| one(w, r)).collect())
}

fn poisoned() -> StoreError {
    StoreError::Corrupt("the key index's lock was poisoned by a panic".into())
}

#[cfg(test)]
mod tests;
