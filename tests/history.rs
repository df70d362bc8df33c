//! The history's segments (`store::history`) against the real binary over
//! TCP: old records move out of `tally.redb` into sealed files, every read
//! still finds them (a transfer, a history page, a key's replay, `audit`,
//! `backup`), a `kill -9` loses nothing, and the start cleans up after an
//! interrupted seal or refuses a missing segment by name.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{audit_ok, balance, create, eventually, Server};
use redb::{ReadableDatabase, ReadableTable};
use serde_json::{json, Value};
use tally::client::Client;

/// Records in one segment: a few per test, each several commits long.
const SEGMENT: u64 = 256;
/// Transfers the tests make, in batches of `BATCH`.
const TRANSFERS: u64 = 2_000;
const BATCH: u64 = 50;

/// A server with small segments, and `alice` (funded) and `bob`.
async fn bank() -> (Server, Client) {
    let s = Server::start_with(&[("TALLY_LIMITS_HISTORY_SEGMENT_RECORDS", "256"), ("TALLY_LOG", "info")]);
    let c = s.admin().await;
    create(&c, "alice", 10_000_000).await;
    create(&c, "bob", 0).await;
    (s, c)
}

/// `(first, last)` of each segment file in `data/history`, in order.
fn segments(data: &Path) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = std::fs::read_dir(data.join("history"))
        .map(|dir| {
            dir.filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let (first, last) = name.strip_prefix("records-")?.strip_suffix(".redb")?.split_once('-')?;
                Some((first.parse().ok()?, last.parse().ok()?))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

fn segment_path(data: &Path, (first, last): (u64, u64)) -> PathBuf {
    data.join("history").join(format!("records-{first:020}-{last:020}.redb"))
}

/// `alice` pays `bob` 1, 2, ... `TRANSFERS` in keyed batches; the
/// transfers' ids in order.
async fn pay(c: &Client) -> Vec<u64> {
    let mut ids = Vec::new();
    for b in 0..TRANSFERS / BATCH {
        let items: Vec<Value> = (1..=BATCH)
            .map(|i| {
                let n = b * BATCH + i;
                json!({"from": "alice", "to": "bob", "amount": n, "key": format!("pay-{n}")})
            })
            .collect();
        let r = c.transfer_batch(&items, false).await.unwrap();
        assert_eq!(r["applied"].as_u64(), Some(BATCH), "{r}");
        ids.extend(r["results"].as_array().unwrap().iter().map(|i| i["id"].as_u64().unwrap()));
    }
    ids
}

/// Waits until the segments hold every record but the newest, and the
/// journal has removed them from the ledger; returns the last sealed
/// record. Once idle, the journal moves the checkpoint to the head, and
/// a segment is sealed while more than a segment's records lie up to the
/// checkpoint: with at most that many after the last segment, no other
/// can follow.
async fn settled(s: &Server, head: u64) -> u64 {
    let archived = |last: u64| {
        let log = std::fs::read_to_string(common::log_path(s)).unwrap_or_default();
        log.lines().any(|l| {
            l.contains("the ledger's own records now start after the history's segments")
                && l.trim_end().ends_with(&format!("archived={last}"))
        })
    };
    eventually(Duration::from_secs(20), "the history's segments reach the head", || async {
        segments(&s.data).last().is_some_and(|&(_, last)| head - last <= SEGMENT && archived(last))
    })
    .await;
    segments(&s.data).last().unwrap().1
}

/// Every read of the old records, against what `pay` did.
async fn every_read_finds_them(c: &Client, ids: &[u64]) {
    for (n, &id) in (1..).zip(ids) {
        let t = c.call("get_transfer", json!({"id": id})).await.unwrap();
        assert_eq!((t["amount"].as_u64(), t["from"].as_str()), (Some(n), Some("alice")), "{t}");
    }
    // bob's whole history, newest first, across every segment.
    let mut amounts = Vec::new();
    let mut after = Value::Null;
    loop {
        let mut args = json!({"account": "bob", "limit": 500});
        if !after.is_null() {
            args["after"] = after.clone();
        }
        let page = c.call("history", args).await.unwrap();
        amounts.extend(page["transfers"].as_array().unwrap().iter().map(|t| t["amount"].as_u64().unwrap()));
        after = page["next"].clone();
        if after.is_null() {
            break;
        }
    }
    assert_eq!(amounts, (1..=TRANSFERS).rev().collect::<Vec<_>>());
    // A key of the first batch replays its transfer, not a new one.
    let again =
        c.transfer_batch(&[json!({"from": "alice", "to": "bob", "amount": 1, "key": "pay-1"})], false).await.unwrap();
    assert_eq!(again["results"][0]["id"].as_u64(), Some(ids[0]), "{again}");
    let a = audit_ok(c).await;
    assert_eq!(a["transfers"].as_u64(), Some(1 + TRANSFERS), "alice's funding and the payments: {a}");
    assert_eq!(balance(c, "bob").await, (TRANSFERS * (TRANSFERS + 1) / 2) as i64);
}

#[tokio::test]
async fn old_records_move_into_sealed_segments_and_every_read_still_finds_them() {
    let (mut s, c) = bank().await;
    let ids = pay(&c).await;
    let head = 1 + TRANSFERS;
    let sealed = settled(&s, head).await;

    let segs = segments(&s.data);
    assert_eq!(segs[0].0, 1, "{segs:?}");
    for pair in segs.windows(2) {
        assert_eq!(pair[1].0, pair[0].1 + 1, "segments follow each other: {segs:?}");
    }
    for &(first, last) in &segs {
        assert!(last - first < SEGMENT, "at most a segment's records: {segs:?}");
    }
    every_read_finds_them(&c, &ids).await;

    // A backup is one file holding every record, relying on no segment.
    let b = c.call("backup", json!({"out": "copy.redb"})).await.unwrap();
    let copy = redb::Database::open(b["path"].as_str().unwrap()).unwrap();
    let copied = tally::store::audit(&copy, &tally::store::History::none()).unwrap();
    assert!(copied.chain_ok && copied.transfers == head, "{copied:?}");
    let txn = copy.begin_read().unwrap();
    assert!(txn.open_table(tally::store::META).unwrap().get("sealed").unwrap().is_none());
    assert_eq!(txn.open_table(tally::store::CHUNKS).unwrap().first().unwrap().unwrap().0.value(), 1);
    drop((txn, copy));

    // After a stop, the ledger file holds only the records after the segments.
    drop(c);
    assert!(s.sigterm().success());
    let ledger = redb::Database::open(s.data.join("tally.redb")).unwrap();
    let txn = ledger.begin_read().unwrap();
    let meta = txn.open_table(tally::store::META).unwrap();
    let mark = |name: &str| u64::from_be_bytes(meta.get(name).unwrap().unwrap().value().try_into().unwrap());
    assert_eq!((mark("sealed"), mark("archived")), (sealed, sealed));
    let first = txn.open_table(tally::store::CHUNKS).unwrap().first().unwrap().unwrap().0.value();
    assert_eq!(first, sealed + 1, "the ledger's first chunk follows the segments");
    drop((meta, txn, ledger));

    s.start_again();
    every_read_finds_them(&s.admin().await, &ids).await;
}

#[tokio::test]
async fn after_a_kill_9_the_start_cleans_up_an_interrupted_seal_or_names_what_is_missing() {
    let (mut s, c) = bank().await;
    let ids = pay(&c).await;
    settled(&s, 1 + TRANSFERS).await;
    drop(c);
    s.kill9();

    // What a seal interrupted by a crash leaves: a file still being
    // written, and a segment past what the ledger relies on.
    let segs = segments(&s.data);
    let &(_, sealed) = segs.last().unwrap();
    let tmp = s.data.join("history").join(format!("records-{:020}-{:020}.redb.tmp", sealed + 1, sealed + 100));
    std::fs::write(&tmp, b"half a segment").unwrap();
    let unrelied = segment_path(&s.data, (sealed + 1, sealed + 64));
    std::fs::copy(segment_path(&s.data, segs[0]), &unrelied).unwrap();
    s.start_again();
    assert!(!tmp.exists() && !unrelied.exists(), "the leftovers are removed");
    assert_eq!(segments(&s.data), segs);
    every_read_finds_them(&s.admin().await, &ids).await;

    // Segments that are not the next one, or a ledger file that is not
    // theirs (moved aside: a new, empty one would be made): the start
    // refuses and removes nothing, as they may be the only copy.
    s.kill9();
    let refused = |data: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("TALLY_AUTH_ADMIN_PASSWORD", common::ADMIN_PASSWORD)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stray = segment_path(&s.data, (sealed + 1000, sealed + 1100));
    std::fs::copy(segment_path(&s.data, segs[0]), &stray).unwrap();
    assert!(refused(&s.data).contains("holds records past what the ledger file relies on"));
    assert!(stray.exists());
    std::fs::remove_file(&stray).unwrap();
    let ledger = s.data.join("tally.redb");
    let aside = s.data.join("aside.redb");
    std::fs::rename(&ledger, &aside).unwrap();
    assert!(refused(&s.data).contains("holds records past what the ledger file relies on"));
    assert_eq!(segments(&s.data), segs, "no segment was removed");
    std::fs::rename(&aside, &ledger).unwrap();

    // A segment the ledger relies on is missing: the start refuses, and
    // says which records.
    let gone = segs[1];
    let kept = s.data.join("kept.redb");
    std::fs::rename(segment_path(&s.data, gone), &kept).unwrap();
    let said = refused(&s.data);
    assert!(
        said.contains(&format!("records {}..{} are missing", gone.0, segs[2].0)),
        "the refusal names the records: {said}"
    );
    // Put back, everything is there again.
    std::fs::rename(&kept, segment_path(&s.data, gone)).unwrap();
    s.start_again();
    every_read_finds_them(&s.admin().await, &ids).await;
}

#[tokio::test]
async fn a_kill_9_under_load_while_segments_are_sealed_loses_no_acknowledged_transfer() {
    let (mut s, c) = bank().await;
    // Batches go on until the kill; each acknowledged one is noted.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let paying = {
        let (c, acked) = (c, acked.clone());
        tokio::spawn(async move {
            for b in 0u64.. {
                let items: Vec<Value> =
                    (1..=BATCH).map(|i| json!({"from": "alice", "to": "bob", "amount": b * BATCH + i})).collect();
                let Ok(r) = c.transfer_batch(&items, false).await else { return };
                let ids = r["results"].as_array().unwrap().iter().map(|i| i["id"].as_u64().unwrap());
                acked.lock().unwrap().extend((1..=BATCH).map(|i| b * BATCH + i).zip(ids));
            }
        })
    };
    // Killed under load once three segments are sealed: a seal or a trim
    // may be under way or not, as a crash finds them.
    eventually(Duration::from_secs(20), "three segments", || async { segments(&s.data).len() >= 3 }).await;
    s.kill9();
    paying.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() as u64 >= 3 * SEGMENT, "{} acknowledged", acked.len());

    s.start_again();
    let c = s.admin().await;
    for &(amount, id) in &acked {
        let t = c.call("get_transfer", json!({"id": id})).await.unwrap();
        assert_eq!(t["amount"].as_u64(), Some(amount), "{t}");
    }
    let a = audit_ok(&c).await;
    let transfers = a["transfers"].as_u64().unwrap();
    // Every acknowledged batch, and at most the one in flight besides.
    assert!((1 + acked.len() as u64..=1 + acked.len() as u64 + BATCH).contains(&transfers), "{a}");
    let paid: u64 = (1..transfers).sum();
    assert_eq!(balance(&c, "bob").await, paid as i64, "bob holds exactly the applied payments");
}

/// Segment files the server at `pid` holds open.
fn open_segment_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("/history/records-"))
        .count()
}

#[tokio::test]
async fn segments_open_only_when_read_and_at_most_a_bounded_number_at_once() {
    let (mut s, c) = bank().await;
    create(&c, "carol", 1_000_000_000).await;
    // More segments than stay open: 18 of 256 records at least.
    let segment_count = tally::store::history::OPEN_SEGMENTS_MAX as u64 + 2;
    let payments = (segment_count + 1) * SEGMENT;
    let mut ids = Vec::new();
    for b in 0..payments / 500 + 1 {
        let items: Vec<Value> =
            (1..=500).map(|i| json!({"from": "carol", "to": "bob", "amount": b * 500 + i})).collect();
        let r = c.transfer_batch(&items, false).await.unwrap();
        assert_eq!(r["applied"].as_u64(), Some(500), "{r}");
        ids.extend(r["results"].as_array().unwrap().iter().map(|i| i["id"].as_u64().unwrap()));
    }
    // alice's and carol's funding, then the payments.
    let head = 2 + ids.len() as u64;
    let sealed = settled(&s, head).await;
    let segs = segments(&s.data);
    assert!(segs.len() as u64 >= segment_count, "{segs:?}");
    drop(c);
    assert!(s.sigterm().success());

    // The start checks each segment, and its key index's rebuild reads
    // the records from `keys_from` on: all of them here, with fewer than
    // `KEYS_FREEZE_RECORDS` written. Only the last ones read stay open.
    let most = tally::store::history::OPEN_SEGMENTS_MAX;
    s.start_again();
    let c = s.admin().await;
    assert_eq!(open_segment_files(s.pid()), most, "after the start read every segment");
    // The first segments were read first, so they are closed again. One
    // that cannot be opened now is a storage failure, not a broken chain.
    let first = segment_path(&s.data, segs[0]);
    let aside = s.data.join("aside.redb");
    std::fs::rename(&first, &aside).unwrap();
    assert_eq!(common::code(c.call("get_transfer", json!({"id": 3})).await), "unavailable");
    assert_eq!(common::code(c.call("audit", json!({})).await), "unavailable");
    std::fs::rename(&aside, &first).unwrap();
    // Every transfer of every segment, twice over in turn, so that each
    // read of a segment follows reads of all the others.
    for _ in 0..2 {
        for &(first, last) in &segs {
            for id in [first.max(3), last] {
                let t = c.call("get_transfer", json!({"id": id})).await.unwrap();
                assert_eq!(t["amount"].as_u64(), Some(id - 2), "{t}");
            }
        }
    }
    assert_eq!(open_segment_files(s.pid()), most, "the most recently read segments stay open");
    let a = audit_ok(&c).await;
    assert_eq!(a["transfers"].as_u64(), Some(head), "{a}");
    assert_eq!(open_segment_files(s.pid()), most, "after `audit` read every segment");
    assert!(sealed >= segment_count * (SEGMENT - 64), "{sealed}");
}
