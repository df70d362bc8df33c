//! The store without the server: chunks, the legacy migration, audit, and
//! the replay rule shared by start-up and `list_accounts`.

use redb::ReadableDatabase;

use super::queries::list_accounts_in_blocks;
use super::record::{for_each_record, for_each_record_group, for_each_record_unhashed, ChunkWriter, CHUNK_V3_HEADER};
use super::recovery::{hint_fits, read_head};
use super::*;
use crate::ledger::{Kind, Limits, Links};

#[test]
fn records_round_trip() {
    let r = TransferRecord {
        id: 42,
        kind: Kind::Mint,
        from: "@mint".into(),
        to: "alice".into(),
        amount: 100,
        fee: 3,
        memo: Some("héllo".into()),
        time: 1_700_000_000_000,
        key: Some("k1".into()),
        prev: [7; 32],
        links: Links { from: 3, to: 0, fee: 9 },
        by: Some("key:0123456789ab".into()),
    };
    let mut out = Vec::new();
    r.encode(&mut out);
    assert_eq!(out[0], 3);
    assert_eq!(RecordRef::decode(42, [7; 32], &out).unwrap().owned(), r);
    assert!(RecordRef::decode(42, [7; 32], &out[..out.len() - 1]).is_err());
    let mut longer = out.clone();
    longer.push(0);
    assert!(RecordRef::decode(42, [7; 32], &longer).is_err());
    // The same record as version 2: id and prev inside.
    let mut v2 = Vec::new();
    r.encode_v2(&mut v2);
    assert_eq!(TransferRecord::decode_v2(&v2).unwrap(), r);
    assert_eq!(RecordRef::decode(0, [0; 32], &v2).unwrap().owned(), r, "a version 2 record gives its own");
    assert!(TransferRecord::decode_v2(&v2[..v2.len() - 1]).is_err());
    assert_eq!(v2.len() - out.len(), 77, "version 3 leaves out id and prev and shortens the integers");
}

/// Any record decodes to what was encoded, in versions 2 and 3; a version
/// 3 record cut anywhere is refused; no bytes make a chunk or a record
/// panic.
mod record_props {
    use super::super::record::{chunk_records_unhashed, CHUNK_V3};
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    fn text(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::char::any(), 1..max)
            .prop_map(|c| c.into_iter().collect::<String>())
            .prop_filter("bounded bytes", move |s| s.len() <= max)
    }

    fn record() -> impl Strategy<Value = TransferRecord> {
        (
            (any::<u64>(), 0u8..=8, any::<i64>(), any::<i64>(), any::<u64>()),
            (text(64), text(64), proptest::option::of(text(256)), proptest::option::of(text(64))),
            (any::<[u8; 32]>(), any::<(u64, u64, u64)>(), proptest::option::of(text(64))),
        )
            .prop_filter_map(
                "a kind",
                |((id, kind, amount, fee, time), (from, to, memo, key), (prev, links, by))| {
                    Some(TransferRecord {
                        id,
                        kind: Kind::from_u8(kind)?,
                        from: from.into(),
                        to: to.into(),
                        amount,
                        fee,
                        memo: memo.map(Into::into),
                        time,
                        key: key.map(Into::into),
                        prev,
                        links: Links { from: links.0, to: links.1, fee: links.2 },
                        by: by.map(Into::into),
                    })
                },
            )
    }

    proptest! {
        #[test]
        fn records_read_back_as_written(r in record(), cut in any::<proptest::sample::Index>()) {
            let mut out = Vec::new();
            r.encode(&mut out);
            prop_assert_eq!(RecordRef::decode(r.id, r.prev, &out).unwrap().owned(), r.clone());
            let at = cut.index(out.len());
            prop_assert!(RecordRef::decode(r.id, r.prev, &out[..at]).is_err());
            let mut v2 = Vec::new();
            r.encode_v2(&mut v2);
            prop_assert_eq!(TransferRecord::decode_v2(&v2).unwrap(), r);
        }

        /// A chunk as the journal writes it, with one byte changed or cut
        /// anywhere: reading it gives records or `Corrupt`, never a panic.
        #[test]
        fn a_changed_chunk_reads_or_is_corrupt(
            records in proptest::collection::vec(record(), 1..70),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let mut chunk = Vec::new();
            for (i, r) in records.iter().take(crate::limits::CHUNK_RECORDS_MAX).enumerate() {
                append_chunked(&mut chunk, i == 0, &r.as_ref());
            }
            let at = at.index(chunk.len());
            if cut {
                chunk.truncate(at);
            } else {
                chunk[at] = byte;
            }
            for s in chunk_records(u64::MAX - 100, &chunk).flatten() {
                let _ = s.record();
            }
            unhashed_reads_the_same(u64::MAX - 100, &chunk)?;
            unhashed_reads_the_same(7, &chunk)?;
        }

        #[test]
        fn any_bytes_are_a_record_or_corrupt(bytes in proptest::collection::vec(any::<u8>(), 0..300), first in any::<u64>()) {
            let _ = RecordRef::decode(1, [0; 32], &bytes);
            for s in chunk_records(first, &bytes).flatten() {
                let _ = s.record();
            }
            unhashed_reads_the_same(first, &bytes)?;
        }
    }

    /// What [`chunk_records_unhashed`] must give: the records
    /// [`chunk_records`] gives, decoded, up to the first that cannot be
    /// read (then a fault, and no more), a version 3 record's `prev` read
    /// as zeros.
    fn unhashed_reads_the_same(first: u64, chunk: &[u8]) -> Result<(), TestCaseError> {
        let v3 = chunk.first() == Some(&CHUNK_V3);
        let mut want = Vec::new();
        for s in chunk_records(first, chunk) {
            match s.and_then(|s| Ok((s.id, s.record()?.owned()))) {
                Ok((id, mut r)) => {
                    if v3 {
                        r.prev = [0; 32];
                    }
                    want.push(Some((id, r)));
                }
                Err(_) => {
                    want.push(None);
                    break;
                }
            }
        }
        let got: Vec<_> = chunk_records_unhashed(first, chunk).map(|r| r.ok().map(|(id, r)| (id, r.owned()))).collect();
        prop_assert_eq!(got, want);
        Ok(())
    }
}

/// Records written before `by` existed (version 1) still read, as made
/// by nobody; a version 1 record with bytes after its key is corrupt.
#[test]
fn version_1_records_read_without_by() {
    let r = TransferRecord {
        id: 7,
        kind: Kind::Transfer,
        from: "alice".into(),
        to: "bob".into(),
        amount: 5,
        fee: 0,
        memo: None,
        time: 1_700_000_000_000,
        key: None,
        prev: [1; 32],
        links: Links { from: 2, to: 3, fee: 0 },
        by: None,
    };
    let mut v2 = Vec::new();
    r.encode_v2(&mut v2);
    assert_eq!(v2[0], 2);
    assert_eq!(*v2.last().unwrap(), 0, "an empty by is one length byte");
    let mut v1 = v2[..v2.len() - 1].to_vec();
    v1[0] = 1;
    assert_eq!(TransferRecord::decode_v2(&v1).unwrap(), r);
    assert_eq!(RecordRef::decode(7, [1; 32], &v1).unwrap().owned(), r);
    let mut longer = v2.clone();
    longer[0] = 1;
    assert!(TransferRecord::decode_v2(&longer).is_err());
    let mut unknown = v2;
    unknown[0] = 4;
    assert!(RecordRef::decode(7, [1; 32], &unknown).is_err());
}

/// How a test writes records: as the journal does (version 3 chunks), as
/// it did before (version 2 chunks), or one version 2 record per row (the
/// layout before chunks).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    V3,
    V2,
    Rows,
}

/// Inserts `n` records made by `make(id)` after `head` into `chunks` as
/// the journal writes one commit (version 3 chunks of
/// [`CHUNK_RECORDS_MAX`](crate::limits::CHUNK_RECORDS_MAX), each record's
/// `prev` the hash before it), and returns the new head.
pub(super) fn put_chunked(
    chunks: &mut redb::Table<'_, u64, &'static [u8]>,
    head: Head,
    n: u64,
    mut make: impl FnMut(u64) -> TransferRecord,
) -> Head {
    let mut buf = Vec::new();
    let (mut first, mut prev) = (head.id + 1, head.hash);
    for (i, id) in (head.id + 1..=head.id + n).enumerate() {
        let starts = i.is_multiple_of(crate::limits::CHUNK_RECORDS_MAX);
        if starts && !buf.is_empty() {
            chunks.insert(first, &buf[..]).unwrap();
            buf.clear();
            first = id;
        }
        let mut r = make(id);
        r.prev = prev;
        prev = append_chunked(&mut buf, starts, &r.as_ref());
    }
    if !buf.is_empty() {
        chunks.insert(first, &buf[..]).unwrap();
    }
    Head { id: head.id + n, hash: prev }
}

/// Record `id` of a chain [`append_chain`] writes: 1 unit from @mint to
/// @redeemed (its `prev` is set as it is written).
fn mint_record(id: u64) -> TransferRecord {
    TransferRecord {
        id,
        kind: Kind::Mint,
        from: "@mint".into(),
        to: "@redeemed".into(),
        amount: 1,
        fee: 0,
        memo: None,
        time: 1_700_000_000_000,
        key: None,
        prev: GENESIS,
        links: Links { from: id - 1, to: id - 1, fee: 0 },
        by: None,
    }
}

/// Appends `n` chained records (@mint -> @redeemed, 1 unit each) after
/// the head in one transaction, in `layout`, and moves the head.
fn append_chain(db: &Database, n: u64, layout: Layout) {
    let head = read_head(&db.begin_read().unwrap()).unwrap();
    let make = mint_record;
    let txn = db.begin_write().unwrap();
    {
        let mut chunks = txn.open_table(CHUNKS).unwrap();
        let mut rows = txn.open_table(LEGACY_TRANSFERS).unwrap();
        let head = if layout == Layout::V3 {
            put_chunked(&mut chunks, head, n, make)
        } else {
            let mut pending = ChunkWriter::default();
            let mut prev = head.hash;
            for id in head.id + 1..=head.id + n {
                let r = TransferRecord { prev, ..make(id) };
                let mut out = Vec::new();
                r.encode_v2(&mut out);
                prev = record_hash(&out);
                if layout == Layout::Rows {
                    rows.insert(id, &out[..]).unwrap();
                } else {
                    pending.push(&mut chunks, id, &out).unwrap();
                }
            }
            pending.flush(&mut chunks).unwrap();
            Head { id: head.id + n, hash: prev }
        };
        txn.open_table(META).unwrap().insert(HEAD, &head.encode()[..]).unwrap();
    }
    txn.commit().unwrap();
}

fn chunk_keys(db: &Database) -> Vec<u64> {
    let txn = db.begin_read().unwrap();
    let chunks = txn.open_table(CHUNKS).unwrap();
    chunks.iter().unwrap().map(|r| r.unwrap().0.value()).collect()
}

/// Appends records `(kind, from, to, amount, fee)` after the head in one
/// transaction, without moving the checkpoint (as if the journal's
/// balance-row sweep had not caught up yet).
fn append_records(db: &Database, records: &[(Kind, &str, &str, i64, i64)]) {
    let head = read_head(&db.begin_read().unwrap()).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut chunks = txn.open_table(CHUNKS).unwrap();
        let first = head.id + 1;
        let head = put_chunked(&mut chunks, head, records.len() as u64, |id| {
            let (kind, from, to, amount, fee) = records[(id - first) as usize];
            TransferRecord {
                id,
                kind,
                from: from.into(),
                to: to.into(),
                amount,
                fee,
                memo: None,
                time: 1_700_000_000_000,
                key: None,
                prev: GENESIS,
                links: Links { from: 0, to: 0, fee: 0 },
                by: None,
            }
        });
        txn.open_table(META).unwrap().insert(HEAD, &head.encode()[..]).unwrap();
    }
    txn.commit().unwrap();
}

/// `list_accounts` adds the records after the checkpoint to the stored
/// rows by the same rule as the replay at start-up: a hold and a void
/// move nothing. (It used to count them as moves, so balances listed
/// while the sweep lagged were wrong by every open or voided hold.)
#[test]
fn listed_balances_replay_the_tail_as_start_up_does() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb")).unwrap();
    append_records(
        &db,
        &[
            (Kind::Mint, "@mint", "@treasury", 100, 0),
            (Kind::Hold, "@treasury", "@redeemed", 30, 0),
            (Kind::Void, "@treasury", "@redeemed", 30, 0),
            (Kind::Hold, "@treasury", "@redeemed", 20, 0),
            (Kind::Post, "@treasury", "@redeemed", 20, 0),
        ],
    );
    let (listed, next) = list_accounts(&db, &ListFilter::default(), None, 10).unwrap();
    assert_eq!(next, None);
    let listed: Vec<(String, i64)> = listed.iter().map(|a| (a.account.clone(), a.balance)).collect();
    let loaded = load(&db, Limits { min_balance: 0, max_balance: None }).unwrap();
    let replayed: Vec<(String, i64)> = ["@mint", "@redeemed", "@treasury"]
        .iter()
        .map(|id| ((*id).to_owned(), loaded.book.get(id).unwrap().balance))
        .collect();
    assert_eq!(replayed, [("@mint".into(), -100), ("@redeemed".into(), 20), ("@treasury".into(), 80)]);
    assert_eq!(listed, replayed);
}

/// A page's candidates are brought up to date a block at a time, each
/// block keeping only its own accounts' changes from the records after the
/// checkpoint: whatever the first block, the scan bound and the page size,
/// paging through every filter lists exactly the accounts and balances
/// start-up's replay gives, including rows that already hold some of
/// those records (up to one of their own, which must not count twice).
#[test]
fn listed_pages_in_blocks_give_the_balances_start_up_replays() {
    const N: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb")).unwrap();
    let names: Vec<String> = (0..N).map(|i| format!("a{i:03}")).collect();
    let tagged = |i: usize| i.is_multiple_of(3);
    let deleted = |i: usize| i % 17 == 5;
    // The records after the checkpoint (ids 1, 2, ...): transfers, and
    // holds and voids, which move nothing.
    let mut tail = Vec::new();
    for k in 0..400usize {
        let (from, to) = ((k * 7) % N, (k * 13 + 1) % N);
        let kind = match k % 10 {
            3 => Kind::Hold,
            4 => Kind::Void,
            _ => Kind::Transfer,
        };
        if from != to {
            tail.push((kind, names[from].as_str(), names[to].as_str(), i64::try_from(k % 40 + 1).unwrap(), 0));
        }
    }
    let moves = |i: usize, (kind, from, to, amount, _): &(Kind, &str, &str, i64, i64)| {
        let amount = if matches!(kind, Kind::Hold | Kind::Void) { 0 } else { *amount };
        if *from == names[i] {
            -amount
        } else if *to == names[i] {
            amount
        } else {
            0
        }
    };
    // Every tenth row already holds the records up to the first one past
    // id 150 that moves its account.
    let last = |i: usize| -> u64 {
        if !i.is_multiple_of(10) {
            return 0;
        }
        let at = tail.iter().enumerate().skip(150).find(|(_, r)| moves(i, r) != 0);
        at.map_or(0, |(k, _)| u64::try_from(k + 1).unwrap())
    };
    let txn = db.begin_write().unwrap();
    {
        let mut accounts = txn.open_table(ACCOUNTS).unwrap();
        let mut tags = txn.open_table(TAGS).unwrap();
        for (i, name) in names.iter().enumerate() {
            let num = 3 + u32::try_from(i).unwrap();
            let meta = AccountMeta {
                num,
                tags: if tagged(i) { vec!["t".into()] } else { Vec::new() },
                deleted: deleted(i).then(|| Tombstone { reason: "r".into(), time: 1 }),
                ..AccountMeta::default()
            };
            accounts.insert(name.as_str(), &meta.encode()[..]).unwrap();
            if tagged(i) {
                tags.insert(("t", name.as_str()), ()).unwrap();
            }
            balances::put(&txn, num, (1000 + i64::try_from(i).unwrap(), last(i))).unwrap();
        }
    }
    txn.commit().unwrap();
    append_records(&db, &tail);
    let book = load(&db, Limits { min_balance: 0, max_balance: None }).unwrap().book;
    // Those rows make a difference: counting their last record again, or
    // every record, would not give start-up's balance.
    let from_row = |i: usize, skip: usize| {
        1000 + i64::try_from(i).unwrap() + tail.iter().skip(skip).map(|r| moves(i, r)).sum::<i64>()
    };
    let held = (0..N).filter(|&i| last(i) > 0);
    assert!(held.clone().count() >= 20);
    for i in held {
        let skip = usize::try_from(last(i)).unwrap();
        assert_eq!(book.get(&names[i]).unwrap().balance, from_row(i, skip), "{}", names[i]);
        assert_ne!(from_row(i, skip - 1), from_row(i, skip), "{}: its last record moves it", names[i]);
    }

    let filters = [
        ListFilter::default(),
        ListFilter { balance_min: Some(1200), ..ListFilter::default() },
        ListFilter { balance_max: Some(1010), ..ListFilter::default() },
        ListFilter { balance_min: Some(1100), balance_max: Some(1150), ..ListFilter::default() },
        ListFilter { tag: Some("t".into()), ..ListFilter::default() },
        ListFilter { tag: Some("t".into()), balance_min: Some(1250), ..ListFilter::default() },
    ];
    let mut ids = vec!["@mint".to_owned(), "@redeemed".to_owned(), "@treasury".to_owned()];
    ids.extend(names.iter().cloned());
    // (first block, scan bound): one block or two, a bound that ends pages
    // early or never does.
    let shapes = [(1, 10_000), (2, 10_000), (5, 10_000), (64, 10_000), (10_000, 10_000), (5, 1), (5, 7), (64, 50)];
    for f in &filters {
        let expected: Vec<(String, i64)> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| *i < 3 || !deleted(i - 3))
            .filter(|(i, _)| f.tag.is_none() || (*i >= 3 && tagged(i - 3)))
            .map(|(_, id)| (id.clone(), book.get(id).unwrap().balance))
            .filter(|(_, b)| f.balance_min.is_none_or(|m| *b >= m) && f.balance_max.is_none_or(|m| *b <= m))
            .collect();
        assert!(expected.len() >= 3, "{f:?} lists a few");
        for (first_block, scan_max) in shapes {
            for limit in [1, 4, 50] {
                let (mut listed, mut after, mut pages) = (Vec::new(), None::<String>, 0);
                loop {
                    let (page, next) =
                        list_accounts_in_blocks(&db, f, after.as_deref(), limit, first_block, scan_max).unwrap();
                    assert!(page.len() <= limit);
                    listed.extend(page.into_iter().map(|a| (a.account, a.balance)));
                    pages += 1;
                    match next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                    assert!(pages <= ids.len() + 1, "{f:?}: the pages end");
                }
                assert_eq!(listed, expected, "{f:?}, first block {first_block}, scan bound {scan_max}, limit {limit}");
                if scan_max == 1 {
                    // One candidate examined a page: a page for each, and
                    // the last, which finds none.
                    let candidates = if f.tag.is_some() { (0..N).filter(|&i| tagged(i)).count() } else { ids.len() };
                    assert_eq!(pages, candidates + 1, "{f:?}, limit {limit}");
                }
            }
        }
    }
}

#[test]
fn records_are_found_in_their_chunks() {
    for layout in [Layout::V3, Layout::V2] {
        records_are_found_in_chunks_of(layout);
    }
}

fn records_are_found_in_chunks_of(layout: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb")).unwrap();
    // Two commits: 100 records (chunks of 64 + 36), then 50 (a new chunk).
    append_chain(&db, 100, layout);
    append_chain(&db, 50, layout);
    assert_eq!(chunk_keys(&db), vec![1, 65, 101]);
    for id in [1, 2, 64, 65, 66, 100, 101, 150] {
        assert_eq!(get_transfer(&db, &History::none(), id).unwrap().map(|t| t.id), Some(id), "record {id}");
    }
    for id in [0, 151, 1000] {
        assert!(get_transfer(&db, &History::none(), id).unwrap().is_none(), "record {id}");
    }
    let txn = db.begin_read().unwrap();
    let chunks = txn.open_table(CHUNKS).unwrap();
    let mut seen = Vec::new();
    let mut prev = None;
    for_each_record(&chunks, 60, |stored| {
        let r = stored.record().unwrap();
        assert_eq!(r.id, stored.id);
        if let Some(p) = prev {
            assert_eq!(r.prev, p, "record {} chains", r.id);
        }
        prev = Some(stored.hash);
        seen.push(stored.id);
        Ok(stored.id < 120)
    })
    .unwrap();
    assert_eq!(seen, (60..=120).collect::<Vec<_>>());
    // A history page walks the links back across chunk boundaries.
    let (page, next) = history(&db, &History::none(), "@redeemed", 150, 90).unwrap();
    assert_eq!(page.iter().map(|t| t.id).collect::<Vec<_>>(), (61..=150).rev().collect::<Vec<_>>());
    assert_eq!(next, Some(61));
    // The page's records, read through its chunk cache, are what reading
    // each alone gives, hashes included.
    let alone: Vec<String> =
        (61..=150).rev().map(|id| format!("{:?}", get_transfer(&db, &History::none(), id).unwrap().unwrap())).collect();
    assert_eq!(page.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>(), alone);
    let mut prev = page.last().unwrap().prev;
    for t in page.iter().rev() {
        assert_eq!(t.prev, prev, "record {} chains", t.id);
        prev = t.hash;
    }
    let a = audit(&db, &History::none()).unwrap();
    assert_eq!((a.transfers, a.sum, a.chain_ok), (150, 0, true));
}

#[test]
fn records_in_groups_are_the_records_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb")).unwrap();
    // Chunks of 64 + 36 records, then 50.
    append_chain(&db, 100, Layout::V3);
    append_chain(&db, 50, Layout::V3);
    let txn = db.begin_read().unwrap();
    let chunks = txn.open_table(CHUNKS).unwrap();
    let one_by_one = |from: u64| {
        let mut seen = Vec::new();
        for_each_record(&chunks, from, |s| {
            seen.push((s.id, s.hash));
            Ok(true)
        })
        .unwrap();
        seen
    };
    for size in [1, 2, 7, 32, 64, 200] {
        for from in [1, 2, 60, 64, 65, 101, 150, 151] {
            let mut seen = Vec::new();
            let mut sizes = Vec::new();
            for_each_record_group(&chunks, from, size, |group| {
                sizes.push(group.len());
                seen.extend(group.iter().map(|s| (s.id, s.hash)));
                Ok(true)
            })
            .unwrap();
            assert_eq!(seen, one_by_one(from), "size {size} from {from}");
            let mut unhashed = Vec::new();
            for_each_record_unhashed(&chunks, from, |r| {
                unhashed.push(r.id);
                Ok(true)
            })
            .unwrap();
            assert_eq!(unhashed, seen.iter().map(|&(id, _)| id).collect::<Vec<_>>(), "unhashed from {from}");
            assert!(sizes.iter().all(|&n| (1..=size).contains(&n)), "size {size} from {from}: {sizes:?}");
            // Only a chunk's last group is short: here the chunks hold
            // ids 1-64, 65-100 and 101-150.
            let firsts: Vec<u64> = std::iter::once(from)
                .chain(sizes.iter().scan(from, |at, &n| {
                    *at += n as u64;
                    Some(*at)
                }))
                .collect();
            for (i, &n) in sizes.iter().enumerate() {
                let last = firsts[i] + n as u64 - 1;
                let chunk_end = [64, 100, 150].into_iter().find(|&end| end >= firsts[i]).unwrap();
                assert!(n == size || last == chunk_end, "size {size} from {from}: group {i} of {n} ends at {last}");
            }
        }
    }
    // A size of 0 counts as 1.
    let mut sizes = Vec::new();
    for_each_record_group(&chunks, 140, 0, |group| {
        sizes.push(group.len());
        Ok(true)
    })
    .unwrap();
    assert_eq!(sizes, [1; 11]);
    // Stopping after a group reads no more: a full group, and a chunk's
    // short last one.
    for (from, stop_after, seen_ids) in [(1, 2, 1..=20), (61, 1, 61..=64), (47, 2, 47..=64)] {
        let (mut groups, mut seen) = (0, Vec::new());
        for_each_record_group(&chunks, from, 10, |group| {
            groups += 1;
            seen.extend(group.iter().map(|s| s.id));
            Ok(groups < stop_after)
        })
        .unwrap();
        assert_eq!((groups, seen), (stop_after, seen_ids.collect::<Vec<_>>()), "from {from}");
    }
}

/// A record that cannot be read ends the walk with an error, after the
/// records before it were handed over, as one at a time.
#[test]
fn records_in_groups_before_a_fault_are_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb")).unwrap();
    append_chain(&db, 100, Layout::V3);
    // Chunk 65 (records 65-100) cut inside its records.
    let txn = db.begin_write().unwrap();
    {
        let mut chunks = txn.open_table(CHUNKS).unwrap();
        let whole = chunks.get(65).unwrap().unwrap().value().to_vec();
        chunks.insert(65, &whole[..whole.len() - 10]).unwrap();
    }
    txn.commit().unwrap();
    let txn = db.begin_read().unwrap();
    let chunks = txn.open_table(CHUNKS).unwrap();
    let mut one_by_one = Vec::new();
    let err = for_each_record(&chunks, 1, |s| {
        one_by_one.push(s.id);
        Ok(true)
    });
    assert!(matches!(err, Err(StoreError::Corrupt(_))));
    assert_eq!(one_by_one, (1..=99).collect::<Vec<_>>());
    let mut seen = Vec::new();
    let err = for_each_record_group(&chunks, 1, 32, |group| {
        seen.extend(group.iter().map(|s| s.id));
        Ok(true)
    });
    assert!(matches!(err, Err(StoreError::Corrupt(_))));
    assert_eq!(seen, one_by_one);
}

#[test]
fn audit_sees_a_changed_or_cut_chunk() {
    for layout in [Layout::V3, Layout::V2] {
        audit_sees_a_changed_or_cut_chunk_of(layout);
    }
}

fn audit_sees_a_changed_or_cut_chunk_of(layout: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb")).unwrap();
    append_chain(&db, 100, layout);
    let original: Vec<u8> =
        db.begin_read().unwrap().open_table(CHUNKS).unwrap().get(65).unwrap().unwrap().value().to_vec();
    let put = |value: &[u8]| {
        let txn = db.begin_write().unwrap();
        txn.open_table(CHUNKS).unwrap().insert(65, value).unwrap();
        txn.commit().unwrap();
    };
    // Flips one bit of the amount (1) of the chunk's `nth` record.
    let flip_amount = |chunk: &mut Vec<u8>, nth: usize| {
        if layout == Layout::V3 {
            let mut at = CHUNK_V3_HEADER;
            for _ in 0..nth {
                at += 2 + u16::from_be_bytes(chunk[at..at + 2].try_into().unwrap()) as usize;
            }
            // len u16, version, kind, then the amount's one varint byte.
            assert_eq!(chunk[at + 2 + 2], 2, "1 as a zigzag varint");
            chunk[at + 2 + 2] ^= 1;
        } else {
            let mut at = 0;
            for _ in 0..nth {
                at += 4 + u32::from_be_bytes(chunk[at..at + 4].try_into().unwrap()) as usize;
            }
            // len u32, version, id, kind, then the amount's 8 bytes (BE).
            chunk[at + 4 + 1 + 8 + 1] ^= 1;
        }
    };
    // One bit of the amount of record 70 (the chunk's sixth record).
    let mut changed = original.clone();
    flip_amount(&mut changed, 5);
    put(&changed);
    assert!(!audit(&db, &History::none()).unwrap().chain_ok);
    if layout == Layout::V3 {
        // The hash before the chunk, in its header.
        let mut changed = original.clone();
        changed[1] ^= 1;
        put(&changed);
        assert!(!audit(&db, &History::none()).unwrap().chain_ok);
    }
    // The chunk cut inside its last record.
    put(&original[..original.len() - 3]);
    assert!(!audit(&db, &History::none()).unwrap().chain_ok);
    put(&original);
    let a = audit(&db, &History::none()).unwrap();
    assert_eq!((a.transfers, a.chain_ok), (100, true));
    // A bit of the amount of record 64, the first chunk's last: the next
    // chunk's `prev` (v3) or its first record's (v2) no longer matches.
    let first: Vec<u8> = db.begin_read().unwrap().open_table(CHUNKS).unwrap().get(1).unwrap().unwrap().value().to_vec();
    let mut changed = first.clone();
    flip_amount(&mut changed, 63);
    let txn = db.begin_write().unwrap();
    txn.open_table(CHUNKS).unwrap().insert(1, &changed[..]).unwrap();
    txn.commit().unwrap();
    assert_eq!(
        get_transfer(&db, &History::none(), 64).unwrap().map(|t| t.amount),
        Some(if layout == Layout::V3 { -2 } else { 1 + (1 << 56) })
    );
    assert!(!audit(&db, &History::none()).unwrap().chain_ok);
}

#[test]
fn records_kept_one_per_row_move_into_chunks_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    let db = open(&path).unwrap();
    append_chain(&db, 130, Layout::Rows);
    assert!(chunk_keys(&db).is_empty());
    drop(db);
    let db = open(&path).unwrap();
    assert_eq!(chunk_keys(&db), vec![1, 65, 129]);
    assert!(matches!(
        db.begin_read().unwrap().open_table(LEGACY_TRANSFERS),
        Err(redb::TableError::TableDoesNotExist(_))
    ));
    assert_eq!(get_transfer(&db, &History::none(), 77).unwrap().map(|t| t.amount), Some(1));
    let a = audit(&db, &History::none()).unwrap();
    assert_eq!((a.transfers, a.sum, a.chain_ok), (130, 0, true));
    // New records carry on the migrated chain, in either chunk format.
    append_chain(&db, 5, Layout::V2);
    append_chain(&db, 70, Layout::V3);
    let a = audit(&db, &History::none()).unwrap();
    assert_eq!((a.transfers, a.chain_ok), (205, true));
    assert_eq!(get_transfer(&db, &History::none(), 135).unwrap().map(|t| t.id), Some(135));
    let after = get_transfer(&db, &History::none(), 136).unwrap().unwrap();
    assert_eq!(
        after.prev,
        get_transfer(&db, &History::none(), 135).unwrap().unwrap().hash,
        "version 3 chains onto version 2"
    );
}

/// A checkpoint inside a chunk: loading replays exactly the records after
/// it, in groups that start there.
#[test]
fn loading_replays_the_records_after_a_checkpoint_inside_a_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb")).unwrap();
    let limits = Limits { min_balance: 0, max_balance: None };
    // Chunks 1-64 and 65-150; the rows as of record 40 (@mint is number
    // 0, @redeemed 2).
    append_chain(&db, 150, Layout::V3);
    let txn = db.begin_write().unwrap();
    balances::put(&txn, 0, (-40, 40)).unwrap();
    balances::put(&txn, 2, (40, 40)).unwrap();
    write_checkpoint(&txn, 40).unwrap();
    txn.commit().unwrap();
    let loaded = load(&db, limits).unwrap();
    assert_eq!((loaded.replayed, loaded.head.id), (110, 150));
    let balances: Vec<(&str, i64, u64)> = loaded.book.iter().map(|(id, a)| (id, a.balance, a.last)).collect();
    assert_eq!(balances, [("@mint", -150, 150), ("@treasury", 0, 0), ("@redeemed", 150, 150)]);
}

/// Loading checks that the records after the checkpoint chain onto each
/// other, wherever a gap falls among the groups it replays them in.
#[test]
fn loading_refuses_a_tail_with_a_chunk_missing() {
    for (missing, next) in [(65, 129), (129, 193), (257, 300)] {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.redb")).unwrap();
        // Chunks of 64 records: 1, 65, 129, 193, 257 (up to 300).
        append_chain(&db, 300, Layout::V3);
        let limits = Limits { min_balance: 0, max_balance: None };
        assert_eq!(load(&db, limits).unwrap().book.get("@redeemed").unwrap().balance, 300);
        let txn = db.begin_write().unwrap();
        txn.open_table(CHUNKS).unwrap().remove(missing).unwrap();
        txn.commit().unwrap();
        match load(&db, limits) {
            Err(StoreError::Corrupt(e)) if missing == 257 => {
                assert_eq!(e, format!("the journal ends at transfer 256 but its head says {next}"));
            }
            Err(StoreError::Corrupt(e)) => assert_eq!(e, format!("the journal breaks at transfer {next}")),
            other => panic!("chunk {missing} missing: {:?}", other.map(|l| l.replayed).map_err(|e| e.to_string())),
        }
    }
    // Version 2 records each hold their `prev`: one that is wrong breaks
    // the chain inside a chunk and inside a group.
    for wrong in [1, 2, 40, 64, 65, 100] {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut chunks = txn.open_table(CHUNKS).unwrap();
            let mut pending = ChunkWriter::default();
            let mut prev = GENESIS;
            for id in 1..=100 {
                let r = TransferRecord { prev: if id == wrong { [9; 32] } else { prev }, ..mint_record(id) };
                let mut out = Vec::new();
                r.encode_v2(&mut out);
                prev = record_hash(&out);
                pending.push(&mut chunks, id, &out).unwrap();
            }
            pending.flush(&mut chunks).unwrap();
            txn.open_table(META).unwrap().insert(HEAD, &Head { id: 100, hash: prev }.encode()[..]).unwrap();
        }
        txn.commit().unwrap();
        match load(&db, Limits { min_balance: 0, max_balance: None }) {
            Err(StoreError::Corrupt(e)) => assert_eq!(e, format!("the journal breaks at transfer {wrong}")),
            other => panic!("record {wrong} wrong: {:?}", other.map(|l| l.replayed).map_err(|e| e.to_string())),
        }
    }
}

/// `load_with` hands the owners each account as its rows stand, and the book marks `dirty` exactly the accounts the replayed
/// tail changed since: start-up brings the owners' slots up to date from
/// those entries and no others.
#[test]
fn the_owners_see_the_rows_and_the_book_marks_what_the_tail_changed() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb")).unwrap();
    let limits = Limits { min_balance: 0, max_balance: None };
    append_records(&db, &[(Kind::Mint, "@mint", "@treasury", 100, 0)]);
    // The rows take in record 1: the checkpoint is there.
    let mut book = load(&db, limits).unwrap().book;
    let txn = db.begin_write().unwrap();
    balances::write(&txn, &mut book, 0..3).unwrap();
    write_checkpoint(&txn, 1).unwrap();
    txn.commit().unwrap();
    // A tail after the checkpoint that moves only @treasury and @redeemed.
    append_records(&db, &[(Kind::Transfer, "@treasury", "@redeemed", 30, 0)]);

    let (loaded, mut seen) = load_with(&db, limits, None, |accounts| {
        assert_eq!(accounts.len, 3);
        accounts.by_ref().map(|a| (a.id.as_str().to_owned(), a.num, a.balance, a.last)).collect::<Vec<_>>()
    })
    .unwrap();
    seen.sort_by_key(|&(_, num, _, _)| num);
    let rows = [("@mint", 0, -100, 1), ("@treasury", 1, 100, 1), ("@redeemed", 2, 0, 0)];
    assert_eq!(seen, rows.map(|(id, num, balance, last)| (id.to_owned(), num, balance, last)));
    let book: Vec<(&str, i64, u64, bool)> =
        loaded.book.iter().map(|(id, a)| (id, a.balance, a.last, a.dirty)).collect();
    assert_eq!(book, [("@mint", -100, 1, false), ("@treasury", 70, 2, true), ("@redeemed", 30, 2, true)]);
}

/// Start-up decodes the accounts' rows as `StoredMeta`, straight into the
/// slots' form: it must read every `AccountMeta` as `AccountMeta` does.
#[test]
fn stored_metadata_reads_as_account_meta_does() {
    use super::recovery::StoredMeta;
    let full = AccountMeta {
        num: 7,
        owner: Some("ana".into()),
        tags: vec!["club".into(), "staff".into()],
        created: 1_700_000_000_000,
        memo: Some("opened at the desk".into()),
        deleted: Some(Tombstone { reason: "left".into(), time: 5 }),
    };
    let bare = AccountMeta { num: 3, created: 9, ..AccountMeta::default() };
    for meta in [full, bare] {
        let s = StoredMeta::decode(&meta.encode()).unwrap();
        assert_eq!(s.num, meta.num);
        assert_eq!(s.created, meta.created);
        assert_eq!(s.deleted.is_some(), meta.deleted.is_some());
        let extra = AccountExtra { owner: s.owner, tags: s.tags, memo: s.memo };
        assert_eq!(AccountExtra::of(&meta).map(|e| *e).unwrap_or_default(), extra);
    }
    assert!(StoredMeta::decode(b"\x91\x07").is_err());
    // A tombstone that is not one is refused by both.
    #[derive(serde::Serialize)]
    struct BadTombstone {
        num: u32,
        owner: Option<String>,
        tags: Vec<String>,
        created: u64,
        memo: Option<String>,
        deleted: u64,
    }
    let bad = rmp_serde::to_vec_named(&BadTombstone {
        num: 1,
        owner: None,
        tags: vec![],
        created: 2,
        memo: None,
        deleted: 5,
    })
    .unwrap();
    assert!(AccountMeta::decode(&bad).is_err());
    assert!(StoredMeta::decode(&bad).is_err());
}

/// Accounts whose numbers repeat or run past the table are refused as
/// corrupt (a skipped number implies one of the two), also when the fault
/// comes early among more accounts than the reader may hand over ahead:
/// it must not wait for room forever.
#[test]
fn account_numbers_that_repeat_or_overflow_are_refused() {
    const N: u32 = 100_000;
    type NumOf = fn(u32) -> u32;
    let repeat: NumOf = |i| if i == 50 { 3 } else { 3 + i };
    let overflow: NumOf = |i| if i == 50 { 10 * N } else { 3 + i };
    let in_order: NumOf = |i| 3 + i;
    // A balance row past the accounts' numbers (but within a room made
    // for more accounts than there are).
    let stray = Some(3 + N + 500);
    let cases = [("used twice", repeat, None), ("out of range", overflow, None), ("without accounts", in_order, stray)];
    // Loading with memory made ahead for more accounts refuses the same.
    let rooms = [None, Some(N as usize + 1_000)];
    for ((want, num_of, stray), room) in cases.into_iter().flat_map(|c| rooms.map(|r| (c, r))) {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut accounts = txn.open_table(ACCOUNTS).unwrap();
            for i in 0..N {
                let meta = AccountMeta { num: num_of(i), tags: vec!["t".into()], ..AccountMeta::default() };
                accounts.insert(format!("a{i:07}").as_str(), &meta.encode()[..]).unwrap();
                balances::put(&txn, 3 + i, (0, 0)).unwrap();
            }
            if let Some(num) = stray {
                balances::put(&txn, num, (0, 0)).unwrap();
            }
        }
        txn.commit().unwrap();
        if room.is_none() {
            // `audit`, which sums without loading's book, refuses them too.
            assert!(!audit(&db, &History::none()).unwrap().chain_ok, "{want}");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let room = room.map(|n| Room::new(Limits::default(), n));
            let got = load_with(&db, Limits::default(), room, |accounts| accounts.by_ref().count());
            let _ = tx.send(got.map(|(_, seen)| seen));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(120)).expect("loading finished");
        match got {
            Err(StoreError::Corrupt(e)) => assert!(e.contains(want), "{want}, room {room:?}: {e}"),
            other => panic!("{want}, room {room:?}: {:?}", other.map_err(|e| e.to_string())),
        }
    }
}

/// A `Room` made ahead for any count of accounts (none, fewer, as many,
/// more) loads exactly what loading without one does: the same book and
/// head, the same accounts handed to the owners.
#[test]
fn a_room_of_any_size_loads_what_loading_alone_does() {
    const N: u32 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb")).unwrap();
    let limits = Limits { min_balance: 0, max_balance: None };
    let txn = db.begin_write().unwrap();
    {
        let mut accounts = txn.open_table(ACCOUNTS).unwrap();
        for i in 0..N {
            let meta = AccountMeta { num: 3 + i, created: u64::from(i), ..AccountMeta::default() };
            accounts.insert(format!("a{i:05}").as_str(), &meta.encode()[..]).unwrap();
            // Some accounts have no balance row yet: (0, 0).
            if i % 5 != 0 {
                balances::put(&txn, 3 + i, (i64::from(i % 7), 0)).unwrap();
            }
        }
    }
    txn.commit().unwrap();
    append_records(&db, &[(Kind::Mint, "@mint", "@treasury", 100, 0)]);

    let load = |room: Option<Room>| {
        let (loaded, mut seen) = load_with(&db, limits, room, |accounts| {
            accounts.by_ref().map(|a| (a.id.as_str().to_owned(), a.num, a.balance, a.created)).collect::<Vec<_>>()
        })
        .unwrap();
        seen.sort_by_key(|&(_, num, _, _)| num);
        let book: Vec<_> =
            loaded.book.iter().map(|(id, a)| (id.to_owned(), a.balance, a.last, a.dirty, a.held)).collect();
        (book, loaded.head.id, seen, loaded.book.limits)
    };
    let alone = load(None);
    assert_eq!((alone.0.len(), alone.1, alone.2.len()), (N as usize + 3, 1, N as usize + 3));
    assert_eq!(alone.2[3 + 5], ("a00005".to_owned(), 3 + 5, 0, 5), "no balance row: 0");
    assert_eq!(alone.2[3 + 6], ("a00006".to_owned(), 3 + 6, 6, 6));
    let n = N as usize + 3;
    // Made for up to a quarter more (and 4,096 more) it is used; beyond,
    // dropped. Either way it loads the same, under the load's limits.
    assert!(Room::fits(n + n / 4 + 4096, n) && !Room::fits(n + n / 4 + 4097, n));
    let other_limits = Limits { min_balance: -5, max_balance: Some(9) };
    for made_for in [0, 1, n / 2, n - 1, n, n + 1, n + n / 4 + 4000, 5 * n] {
        assert!(load(Some(Room::new(other_limits, made_for))) == alone, "a room for {made_for} accounts");
    }
}

/// The count noted for the next start reads back as written, and only a
/// count the database file could hold reads at all.
#[test]
fn the_size_hint_reads_back_only_a_count_the_file_could_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (data, db_path) = (dir.path(), dir.path().join("tally.redb"));
    drop(open(&db_path).unwrap());
    assert_eq!(size_hint(data, &db_path), None, "none noted");
    write_size_hint(data, 5).unwrap();
    assert_eq!(size_hint(data, &db_path), Some(5));
    for text in ["", "x", "-1", "5 5", "99999999999999999999999"] {
        std::fs::write(data.join("accounts.hint"), text).unwrap();
        assert_eq!(size_hint(data, &db_path), None, "{text:?}");
    }
    let most = usize::try_from(std::fs::metadata(&db_path).unwrap().len() / 32).unwrap();
    write_size_hint(data, most).unwrap();
    assert_eq!(size_hint(data, &db_path), Some(most));
    write_size_hint(data, most + 1).unwrap();
    assert_eq!(size_hint(data, &db_path), None, "more accounts than the file can hold");
    assert_eq!(size_hint(data, &dir.path().join("missing.redb")), None, "no database file");
    // Half the machine's memory bounds it too: 320 bytes an account.
    let gib = 1 << 30;
    assert!(hint_fits(1_000_000, gib, Some(gib)) && hint_fits(1_677_721, gib, Some(gib)));
    assert!(!hint_fits(1_677_722, gib, Some(gib)), "more than half of 1 GiB");
    assert!(hint_fits(33_554_432, gib, None) && !hint_fits(33_554_433, gib, None), "32 bytes of file an account");
    assert!(!hint_fits(u64::MAX, u64::MAX, Some(u64::MAX)), "no overflow");
}

/// Every record reads the same, from every start, before its move to a
/// segment, while the ledger's chunks are trimmed (`archived` inside the
/// segment, records in both places) and after.
#[test]
fn records_read_the_same_while_they_move_to_a_segment() {
    use super::history::{note_sealed, Records};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tally.redb");
    let db = Arc::new(open(&path).unwrap());
    // 2,000 records in chunks of 10: a segment of 1,000 is 100 rows,
    // more than one commit trims.
    for _ in 0..200 {
        append_chain(&db, 10, Layout::V3);
    }
    let txn = begin_write(&db).unwrap();
    write_checkpoint(&txn, 2_000).unwrap();
    txn.commit().unwrap();
    let from = |history: &History, start: u64| {
        let txn = db.begin_read().unwrap();
        let mut out = Vec::new();
        Records::open(&txn, history)
            .unwrap()
            .for_each(start, |s| {
                out.push((s.id, s.hash));
                Ok(true)
            })
            .unwrap();
        out
    };
    let before = from(&History::none(), 1);
    assert_eq!(before.len(), 2_000);

    let history = History::open(&path, &db).unwrap();
    let sealed = history.seal_next(&|| Ok(db.clone()), 1_000).unwrap().unwrap();
    assert_eq!(sealed, 1_000, "whole chunks of 10 fill the segment exactly");
    let mut seen = Vec::new();
    loop {
        let txn = begin_write(&db).unwrap();
        let archived = note_sealed(&txn, sealed).unwrap();
        txn.commit().unwrap();
        seen.push(archived);
        for start in [1, 2, archived, archived + 1, sealed, sealed + 1, 1_995] {
            let start = start.max(1);
            assert_eq!(from(&history, start), before[start as usize - 1..], "from {start}, archived {archived}");
        }
        let txn = db.begin_read().unwrap();
        let records = Records::open(&txn, &history).unwrap();
        for id in [1, archived, archived + 1, sealed, sealed + 1, 2_000] {
            let id = id.max(1);
            assert_eq!(records.with_record(id, |s| Ok(s.hash)).unwrap(), Some(before[id as usize - 1].1), "{id}");
        }
        if archived == sealed {
            break;
        }
    }
    assert_eq!(seen, [640, 1_000], "trimmed 64 rows, then the rest");
    assert_eq!(chunk_keys(&db)[0], 1_001);
}

/// A segment is copied only from chunks that hold every record of it in
/// order: a chunk missing inside the segment, its last one missing, a
/// chunk overlapping the one before (at the end of a piece copied in one
/// commit, where the next piece reads on) or a chunk cut short leave no
/// segment and nothing sealed.
#[test]
fn a_segment_is_not_sealed_from_chunks_that_skip_or_overlap_records() {
    use crate::store::record::{CHUNK_V3, CHUNK_V3_HEADER};
    // A chunk of `n` one-byte records: sealing reads only the framing.
    let chunk = |n: usize| {
        let mut v = vec![CHUNK_V3];
        v.resize(CHUNK_V3_HEADER, 0);
        (0..n).for_each(|_| v.extend_from_slice(&[0, 1, 0]));
        v
    };
    type Change = fn(&mut redb::Table<'_, u64, &'static [u8]>, &dyn Fn(usize) -> Vec<u8>);
    // Unchanged, the same chunks seal.
    let sealed = |change: Change| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.redb");
        let db = Arc::new(open(&path).unwrap());
        let txn = begin_write(&db).unwrap();
        {
            let mut t = txn.open_table(CHUNKS).unwrap();
            let mut id = 1;
            while id <= 5_000 {
                let n = if id == 4_096 { 10 } else { 1 };
                t.insert(id, &chunk(n)[..]).unwrap();
                id += n as u64;
            }
            change(&mut t, &chunk);
        }
        write_checkpoint(&txn, 5_000).unwrap();
        txn.commit().unwrap();
        let history = History::open(&path, &db).unwrap();
        let result = history.seal_next(&|| Ok(db.clone()), 4_300);
        let left: Vec<_> =
            std::fs::read_dir(dir.path().join("history")).unwrap().map(|e| e.unwrap().file_name()).collect();
        (result, history.sealed(), left)
    };
    let (result, _, left) = sealed(|_, _| {});
    assert_eq!(result.unwrap(), Some(4_300));
    assert_eq!(left, ["records-00000000000000000001-00000000000000004300.redb"]);
    let cases: [(Change, &str); 4] = [
        (
            |t, _| drop(t.remove(2_501).unwrap().unwrap()),
            "the ledger's chunks break at record 2501: the next one starts at 2502",
        ),
        (|t, _| drop(t.remove(4_300).unwrap().unwrap()), "the ledger's chunks end at record 4300, not 4301"),
        // 4,096 rows are copied in a commit: the 4,096th chunk holds
        // records 4096..=4105, and a row at 4100 overlaps it.
        (
            |t, chunk| drop(t.insert(4_100, &chunk(1)[..]).unwrap()),
            "the ledger's chunks break at record 4106: the next one starts at 4100",
        ),
        (|t, chunk| drop(t.insert(3_000, &chunk(1)[..chunk(1).len() - 1]).unwrap()), "chunk 3000 ends inside a record"),
    ];
    for (change, error) in cases {
        let (result, sealed_to, left) = sealed(change);
        match result {
            Err(StoreError::Corrupt(e)) => assert_eq!(e, error),
            other => panic!("{error}: {:?}", other.map_err(|e| e.to_string())),
        }
        assert_eq!(sealed_to, 0);
        assert!(left.is_empty(), "{error}: {left:?}");
    }
}

/// A folder written when each account had a balance row of its own: the
/// first open moves the rows into blocks, loading gives the same book
/// before and after, a later open changes nothing, and a version that
/// reads the old table is refused rather than reading no balances.
#[test]
fn rows_of_one_account_each_move_into_blocks_once_and_old_readers_are_refused() {
    const N: u32 = 300;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    let db = open(&path).unwrap();
    // The folder as a version before blocks left it.
    let txn = db.begin_write().unwrap();
    {
        assert!(txn.delete_table(balances::BALANCE_BLOCKS).unwrap());
        assert!(txn.delete_table(TableDefinition::<&str, &str>::new("balances")).unwrap());
        let mut accounts = txn.open_table(ACCOUNTS).unwrap();
        let mut legacy = txn.open_table(balances::LEGACY_BALANCES).unwrap();
        for i in 0..N {
            let meta = AccountMeta { num: 3 + i, ..AccountMeta::default() };
            accounts.insert(format!("a{i:05}").as_str(), &meta.encode()[..]).unwrap();
            // Some accounts have no row yet: (0, 0).
            if i % 7 != 3 {
                legacy.insert(3 + i, (i64::from(i) * 11, u64::from(i % 5))).unwrap();
            }
        }
    }
    txn.commit().unwrap();
    let limits = Limits { min_balance: 0, max_balance: None };
    let book_of = |db: &Database| -> Vec<(String, i64, u64)> {
        load(db, limits).unwrap().book.iter().map(|(id, a)| (id.to_owned(), a.balance, a.last)).collect()
    };
    let before = book_of(&db);
    assert_eq!(before.iter().find(|(id, ..)| id == "a00299"), Some(&("a00299".to_owned(), 3289, 4)));
    assert_eq!(before.iter().find(|(id, ..)| id == "a00003"), Some(&("a00003".to_owned(), 0, 0)));
    // A backup of it keeps its rows as they are; opened, it moves them too.
    let copy = dir.path().join("copy.redb");
    backup_txn(&db.begin_read().unwrap(), &History::none(), &copy).unwrap();
    assert_eq!(book_of(&open(&copy).unwrap()), before);
    drop(db);

    let blocks = |db: &Database| -> Vec<(u32, Vec<u8>)> {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(balances::BALANCE_BLOCKS).unwrap();
        t.iter().unwrap().map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())).unwrap()).collect()
    };
    let db = open(&path).unwrap();
    assert_eq!(book_of(&db), before);
    let moved = blocks(&db);
    // Rows for accounts 3..303: blocks 0 to 4, the last ending at 302.
    assert_eq!(
        moved.iter().map(|(b, v)| (*b, v.len())).collect::<Vec<_>>(),
        [(0, 1024), (1, 1024), (2, 1024), (3, 1024), (4, 752)]
    );
    {
        let txn = db.begin_read().unwrap();
        match txn.open_table(balances::LEGACY_BALANCES) {
            Err(redb::TableError::TableTypeMismatch { .. }) => {}
            other => panic!("an old reader would open the rows: {:?}", other.map(|_| ())),
        }
    }
    drop(db);
    let db = open(&path).unwrap();
    assert_eq!(blocks(&db), moved);
    assert_eq!(book_of(&db), before);
}

mod audit_sum {
    use super::*;
    use crate::ledger::TREASURY;
    use proptest::prelude::*;
    use proptest::sample::Index;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// `audit` sums the balances as loading does, without loading's
        /// book: rows that already hold some of the records after the
        /// checkpoint (whose legs must not count twice), fees, holds and
        /// voids (which move nothing), and records that name an account
        /// twice (a party to itself, or `@treasury` paid its own fee),
        /// whose second leg loading skips.
        #[test]
        fn the_audit_sums_what_loading_loads(
            rows in proptest::collection::vec((-1000i64..1000, any::<Index>()), 2..12),
            tail in proptest::collection::vec((0u8..7, any::<Index>(), any::<Index>(), 1i64..100), 0..60),
            group in 1usize..8,
            checkpoint in any::<Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let db = open(&dir.path().join("t.redb")).unwrap();
            let n = rows.len();
            let names: Vec<String> = (0..n).map(|i| format!("a{i:02}")).collect();
            let records: Vec<(Kind, &str, &str, i64, i64)> = tail
                .iter()
                .map(|(kind, from, to, amount)| {
                    let from = from.index(n);
                    let to = (from + 1 + to.index(n - 1)) % n;
                    let (from, to) = (names[from].as_str(), names[to].as_str());
                    match kind {
                        0 => (Kind::Hold, from, to, *amount, 0),
                        1 => (Kind::Void, from, to, *amount, 0),
                        2 => (Kind::Transfer, from, to, *amount, amount / 3),
                        3 => (Kind::Transfer, from, from, *amount, amount / 3),
                        4 => (Kind::Transfer, TREASURY, to, *amount, amount / 3),
                        5 => (Kind::Transfer, from, TREASURY, *amount, amount / 3),
                        _ => (Kind::Transfer, from, to, *amount, 0),
                    }
                })
                .collect();
            let txn = db.begin_write().unwrap();
            {
                let mut accounts = txn.open_table(ACCOUNTS).unwrap();
                for (i, (balance, last)) in rows.iter().enumerate() {
                    let num = 3 + u32::try_from(i).unwrap();
                    // Deleted accounts keep their place and their records.
                    let deleted = (i % 3 == 1).then(|| Tombstone { reason: "r".into(), time: 1 });
                    let meta = AccountMeta { num, deleted, ..AccountMeta::default() };
                    accounts.insert(names[i].as_str(), &meta.encode()[..]).unwrap();
                    // A row as new as any of the records, or none.
                    balances::put(&txn, num, (*balance, last.index(records.len() + 1) as u64)).unwrap();
                }
            }
            txn.commit().unwrap();
            append_records(&db, &records);
            // Anywhere in the records, inside a chunk or at its edge.
            let txn = db.begin_write().unwrap();
            write_checkpoint(&txn, checkpoint.index(records.len() + 1) as u64).unwrap();
            txn.commit().unwrap();
            let loaded = load(&db, Limits::default()).unwrap();
            let a = audit(&db, &History::none()).unwrap();
            prop_assert!(a.chain_ok);
            prop_assert_eq!(a.transfers, records.len() as u64);
            prop_assert_eq!(a.accounts, loaded.book.len() as u64);
            prop_assert_eq!(i128::from(a.sum), loaded.book.sum());
            // Its legs looked up a few at a time, as a long tail is.
            let grouped = super::super::audit::balances_sum(&db.begin_read().unwrap(), group).unwrap();
            prop_assert_eq!(grouped, loaded.book.sum());
        }
    }

    /// Whether a leg counts, and whether a balance overflows, depend on
    /// the order of the records: the audit refuses exactly what loading
    /// refuses, in groups of any size.
    #[test]
    fn the_audit_refuses_what_loading_refuses() {
        // a00 starts 10 below the top: paying 50 then being paid 50 fits,
        // the other way round overflows.
        let fits: &[(Kind, &str, &str, i64, i64)] =
            &[(Kind::Transfer, "a00", "a01", 50, 0), (Kind::Transfer, "a01", "a00", 50, 0)];
        let overflows: &[(Kind, &str, &str, i64, i64)] =
            &[(Kind::Transfer, "a01", "a00", 50, 0), (Kind::Transfer, "a00", "a01", 50, 0)];
        let unknown: &[(Kind, &str, &str, i64, i64)] =
            &[(Kind::Transfer, "a00", "a01", 5, 0), (Kind::Transfer, "a01", "ghost", 5, 0)];
        for (records, refused) in [(fits, None), (overflows, Some("overflow")), (unknown, Some("unknown account"))] {
            let dir = tempfile::tempdir().unwrap();
            let db = open(&dir.path().join("t.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut accounts = txn.open_table(ACCOUNTS).unwrap();
                for (i, balance) in [i64::MAX - 10, 0].into_iter().enumerate() {
                    let num = 3 + u32::try_from(i).unwrap();
                    accounts
                        .insert(
                            format!("a{i:02}").as_str(),
                            &AccountMeta { num, ..AccountMeta::default() }.encode()[..],
                        )
                        .unwrap();
                    balances::put(&txn, num, (balance, 0)).unwrap();
                }
            }
            txn.commit().unwrap();
            append_records(&db, records);
            let loaded = load(&db, Limits::default());
            for group in 1..=7 {
                let summed = super::super::audit::balances_sum(&db.begin_read().unwrap(), group);
                match (refused, &loaded, summed) {
                    (None, Ok(l), Ok(sum)) => assert_eq!(sum, l.book.sum(), "group {group}"),
                    (Some(why), Err(StoreError::Corrupt(l)), Err(StoreError::Corrupt(a))) => {
                        assert!(l.contains(why) && a.contains(why), "group {group}: loading {l}, audit {a}");
                    }
                    (_, l, a) => panic!(
                        "group {group}: wanted {refused:?}, loading {:?}, audit {:?}",
                        l.as_ref().map(|_| ()).map_err(ToString::to_string),
                        a.map_err(|e| e.to_string())
                    ),
                }
            }
            assert_eq!(audit(&db, &History::none()).unwrap().chain_ok, refused.is_none());
        }
    }
}
