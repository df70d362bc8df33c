//! The key index against a real database: every key is found at every
//! commit and after a restart at any commit, the table holds exactly the
//! keys below `keys_from`, memory stays bounded, and nothing of a commit
//! that failed is kept.

use std::collections::BTreeMap;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::*;
use crate::ledger::{Kind, Links};
use crate::store::{open, TransferRecord, CHUNKS};
use std::sync::Arc;

/// Small limits, so that a few dozen commits freeze and merge many runs.
fn small() -> KeyIndex {
    KeyIndex::with_limits(7, 40, 2, 4)
}

/// A new database in a temporary folder, and `index` started on it.
fn started(index: KeyIndex) -> (tempfile::TempDir, Arc<Database>, KeyIndex) {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(open(&dir.path().join("t.redb")).unwrap());
    index.rebuild(&db, &crate::store::History::none()).unwrap();
    (dir, db, index)
}

/// Appends a batch of records after the head, one per entry of `keys`
/// (`Some((from, key))` for a keyed one), and the index's slice, in one
/// transaction; memory takes it in only if `commit`. Returns the batch's
/// keys with their ids.
fn batch(db: &Database, index: &KeyIndex, keys: &[Option<(&str, String)>], commit: bool) -> Vec<(Key, u64)> {
    let head = super::super::recovery::read_head(&db.begin_read().unwrap()).unwrap();
    let txn = db.begin_write().unwrap();
    let mut plan = index.plan().unwrap();
    let mut new: Vec<(Box<str>, Box<str>, u64)> = Vec::new();
    let id;
    {
        let mut chunks = txn.open_table(CHUNKS).unwrap();
        let first = head.id + 1;
        let head = crate::store::tests::put_chunked(&mut chunks, head, keys.len() as u64, |id| {
            let k = &keys[(id - first) as usize];
            if let Some((f, key)) = k {
                new.push((Box::from(*f), Box::from(key.as_str()), id));
            }
            TransferRecord {
                id,
                kind: Kind::Mint,
                from: k.as_ref().map_or("@mint", |(f, _)| f).into(),
                to: "@redeemed".into(),
                amount: 1,
                fee: 0,
                memo: None,
                time: 1_700_000_000_000,
                key: k.as_ref().map(|(_, key)| key.as_str().into()),
                prev: crate::store::GENESIS,
                links: Links::default(),
                by: None,
            }
        });
        id = head.id;
        crate::store::write_head(&txn, head).unwrap();
    }
    plan.put(&txn, new.len()).unwrap();
    let used = new.iter().map(|(f, k, id)| ((f.clone(), k.clone()), *id)).collect();
    if commit {
        txn.commit().unwrap();
        index.committed(plan, new, id).unwrap();
    } else {
        txn.abort().unwrap();
    }
    used
}

fn find(db: &Database, index: &KeyIndex, from: &str, key: &str) -> Option<u64> {
    let found = lookup(db, &crate::store::History::none(), index, &[(from.into(), key.into())])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    found.map(|v| v.id)
}

fn table(db: &Database) -> BTreeMap<Key, u64> {
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(KEYS).unwrap();
    t.iter()
        .unwrap()
        .map(|row| {
            let (k, v) = row.unwrap();
            let (f, key) = k.value();
            ((f.into(), key.into()), v.value())
        })
        .collect()
}

fn keys_from(db: &Database) -> Option<u64> {
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    let v = meta.get(KEYS_FROM).unwrap();
    v.map(|v| super::super::recovery::read_u64(v.value()).unwrap())
}

/// Batches of mixed sizes, keyed and not: after every commit each key
/// used so far is found with its record, by the live index and by one
/// rebuilt from the disk (a restart at that commit); the table holds
/// every key of the records below `keys_from`, and only used keys with
/// their records; memory stays within
/// two runs and a batch.
#[test]
fn every_key_is_found_at_every_commit_and_after_a_restart_at_any_commit() {
    let (_dir, db, index) = started(small());
    let mut used: Vec<(Key, u64)> = Vec::new();
    let mut moved = 0;
    for round in 0..60usize {
        let keys: Vec<Option<(&str, String)>> = (0..round % 5)
            .map(|i| (i + round) % 3 != 0)
            .enumerate()
            .map(|(i, keyed)| keyed.then(|| (["carol", "alice", "bob"][(round + i) % 3], format!("k{round}-{i}"))))
            .collect();
        used.extend(batch(&db, &index, &keys, true));
        let restarted = small();
        restarted.rebuild(&db, &crate::store::History::none()).unwrap();
        // Filters built, replaced as they fill (they are sized for a few
        // keys here), or not yet: either way no used key is "new".
        if round % 2 == 0 {
            index.settled();
            restarted.settled();
        }
        for ((from, key), id) in &used {
            assert_eq!(find(&db, &index, from, key), Some(*id), "round {round}: {from}/{key}");
            assert_eq!(find(&db, &restarted, from, key), Some(*id), "round {round}, restarted: {from}/{key}");
            assert!(!index.is_new(from, key), "round {round}: {from}/{key} is not new");
            assert!(!restarted.is_new(from, key), "round {round}, restarted: {from}/{key} is not new");
        }
        assert_eq!(find(&db, &index, "alice", "never"), None);
        let below = keys_from(&db).unwrap();
        let all: BTreeMap<Key, u64> = used.iter().cloned().collect();
        let in_table = table(&db);
        for (k, id) in &all {
            if *id < below {
                assert_eq!(in_table.get(k), Some(id), "round {round}: {k:?} is below {below}");
            }
        }
        for (k, id) in &in_table {
            assert_eq!(all.get(k), Some(id), "round {round}: {k:?} in the table");
        }
        assert!(index.len() <= 2 * 7 + 4, "round {round}: {} keys in memory", index.len());
        moved = moved.max(used.iter().filter(|(_, id)| *id < below).count());
    }
    assert!(moved > 30, "runs were merged into the table: {moved}");
    // A key never used: certainly new once the filter is built (its false
    // positives, at ~60 keys in a filter of 16 blocks, are rare; the
    // question is asked of a hundred keys).
    index.settled();
    let new = (0..100).filter(|i| index.is_new("alice", &format!("never-{i}"))).count();
    assert!(new > 50, "{new} of 100 unused keys are certainly new");
}

/// A transaction that does not commit leaves nothing in memory: its key
/// is not found, and the next batch may use it.
#[test]
fn a_key_whose_commit_failed_is_not_kept() {
    let (_dir, db, index) = started(small());
    batch(&db, &index, &[Some(("alice", "first".into()))], true);
    batch(&db, &index, &[Some(("alice", "lost".into()))], false);
    assert_eq!(find(&db, &index, "alice", "lost"), None);
    assert_eq!(find(&db, &index, "alice", "first"), Some(1));
    let again = batch(&db, &index, &[Some(("alice", "lost".into()))], true);
    assert_eq!(find(&db, &index, "alice", "lost"), Some(again[0].1));
    assert_eq!(again[0].1, 2);
}

/// A folder written before the index (every key in the table, no
/// `keys_from`) starts with nothing in memory and finds its keys in the
/// table.
#[test]
fn a_folder_without_keys_from_has_every_key_in_the_table() {
    let (_dir, db, index) = started(small());
    batch(&db, &index, &[Some(("alice", "old".into())), None], true);
    // As the old journal wrote it: the key in the table, no `keys_from`.
    let txn = db.begin_write().unwrap();
    txn.open_table(KEYS).unwrap().insert(("alice", "old"), 1).unwrap();
    txn.open_table(META).unwrap().remove(KEYS_FROM).unwrap();
    txn.commit().unwrap();
    let restarted = small();
    restarted.rebuild(&db, &crate::store::History::none()).unwrap();
    assert!(restarted.is_empty());
    assert_eq!(find(&db, &restarted, "alice", "old"), Some(1));
}

/// A run too large to sort inline is sorted on a thread of its own:
/// until then nothing is merged and every key is found in memory; then
/// the commits merge it, `keys_from` moves past it and memory empties.
#[test]
fn a_large_run_is_sorted_off_the_journal_then_merged() {
    let n = KEYS_SORT_INLINE_MAX + 1;
    let (_dir, db, index) = started(KeyIndex::with_limits(n, u64::MAX, 1000, 1 << 20));
    let keys: Vec<Option<(&str, String)>> =
        (0..n).map(|i| Some((["bob", "alice"][i % 2], format!("k{}", n - i)))).collect();
    let used = batch(&db, &index, &keys, true);
    index.settled();
    assert_eq!(keys_from(&db), Some(1));
    assert_eq!(index.len(), n);
    let mut commits = 0;
    while keys_from(&db) == Some(1) {
        batch(&db, &index, &[], true);
        commits += 1;
        assert!(commits <= n.div_ceil(1000), "{commits} commits and the run is not in");
    }
    assert_eq!(keys_from(&db), Some(n as u64 + 1));
    assert!(index.is_empty());
    let in_table = table(&db);
    assert_eq!(in_table.len(), n);
    for ((from, key), id) in &used {
        assert_eq!(in_table.get(&(from.clone(), key.clone())), Some(id));
        assert_eq!(find(&db, &index, from, key), Some(*id));
    }
}

/// A memory rebuilt between a transaction's plan and its commit (which
/// today's callers never let happen) keeps every key: the plan's merge
/// progress is for a run memory no longer has, and is not applied to the
/// run it has now.
#[test]
fn a_plan_made_before_a_rebuild_loses_no_key() {
    let (_dir, db, index) = started(small());
    let keys = |who: &'static str, n: usize| (0..n).map(|i| Some((who, format!("{who}{i}")))).collect::<Vec<_>>();
    let mut used = batch(&db, &index, &keys("alice", 7), true);
    used.extend(batch(&db, &index, &keys("bob", 7), true));
    used.extend(batch(&db, &index, &keys("carol", 3), true));
    // This plan merges the last of a run; memory is then rebuilt (a run
    // of bob's and carol's keys) before the plan's transaction commits.
    let mut plan = index.plan().unwrap();
    index.rebuild(&db, &crate::store::History::none()).unwrap();
    let txn = db.begin_write().unwrap();
    plan.put(&txn, 0).unwrap();
    assert!(plan.finished, "the plan merged the last of its run");
    txn.commit().unwrap();
    index.committed(plan, [], 17).unwrap();
    index.settled();
    for ((from, key), id) in &used {
        assert_eq!(find(&db, &index, from, key), Some(*id), "{from}/{key}");
        assert!(!index.is_new(from, key), "{from}/{key}");
    }
}
