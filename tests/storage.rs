//! Proves what a full disk does: the running server's file-size limit is
//! lowered (RLIMIT_FSIZE: to redb, a write that fails, as on a full file
//! system) until its journal cannot commit, then to nothing at all. Writes are then refused with
//! `unavailable` and `health` says so while `ping` still answers; once the
//! limit is lifted the journal reopens the database by itself and commits
//! again; every transfer acknowledged before, during and after is there,
//! also after a `kill -9` and restart, and nothing else is.

mod common;

use std::time::{Duration, Instant};

use common::{audit_ok, balance, create, join_all, set_file_size_limit, Server};
use serde_json::json;
use tally::client::Client;

async fn health(c: &Client) -> Result<(), String> {
    c.call("health", json!({})).await.map(drop).map_err(|e| e.to_string())
}

/// Sends `n` transfers of 1 from a to b at once; returns the ids of the
/// acknowledged ones and the error codes of the others.
async fn burst(c: &Client, n: usize, memo: &str) -> (Vec<u64>, Vec<String>) {
    let calls: Vec<_> = (0..n)
        .map(|_| Box::pin(c.call("transfer", json!({"from": "a", "to": "b", "amount": 1, "memo": memo}))))
        .collect();
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for r in join_all(calls).await {
        match r {
            Ok(t) => ok.push(t["id"].as_u64().unwrap()),
            Err(e) => refused.push(e.code().unwrap_or("none").to_owned()),
        }
    }
    (ok, refused)
}

#[tokio::test]
async fn a_full_disk_turns_health_off_and_the_journal_recovers_once_there_is_room() {
    // The log goes to a file on the same "full disk": the server must keep
    // serving without its log.
    let mut s = Server::start_with(&[("TALLY_LOG", "info")]);
    let c = s.admin().await;
    create(&c, "a", 1_000_000_000).await;
    create(&c, "b", 0).await;
    health(&c).await.unwrap();
    let db = s.data.join("tally.redb");
    let size = std::fs::metadata(&db).unwrap().len();
    set_file_size_limit(s.pid(), Some(size + 256 * 1024));

    // Fill it: 256-byte memos until a commit fails.
    let memo = "m".repeat(256);
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..400 {
        let (ok, no) = burst(&c, 100, &memo).await;
        acknowledged.extend(ok);
        refused.extend(no);
        if !refused.is_empty() {
            break;
        }
    }
    assert!(!refused.is_empty(), "the file never filled up");
    assert!(refused.iter().all(|c| c == "unavailable"), "{refused:?}");
    // A failed commit can free what it had taken, so the journal may well
    // commit again at once. Now no write fits at all: the journal cannot
    // commit, health says so, every write is refused, the server itself
    // still answers.
    set_file_size_limit(s.pid(), Some(0));
    let (ok, no) = burst(&c, 10, "while full").await;
    assert_eq!((ok.len(), no), (0, vec!["unavailable".to_owned(); 10]));
    let e = health(&c).await.unwrap_err();
    assert!(e.starts_with("unavailable: the journal cannot commit"), "{e}");
    assert_eq!(c.call("ping", json!({})).await.unwrap(), "pong");
    let anon = s.client().await;
    assert_eq!(anon.call("health", json!({})).await.unwrap_err().code(), Some("unavailable"));

    // Room again: the journal reopens the database by itself.
    set_file_size_limit(s.pid(), None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(&c).await.is_err() {
        assert!(Instant::now() < deadline, "the journal did not recover: {:?}", health(&c).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (after, no) = burst(&c, 50, "after").await;
    assert_eq!((after.len(), no.len()), (50, 0));
    acknowledged.extend(after);

    // Exactly the acknowledged transfers are there, now and after a kill -9.
    for round in 0..2 {
        let c = s.admin().await;
        assert_eq!(balance(&c, "b").await, acknowledged.len() as i64, "round {round}");
        for id in &acknowledged {
            let t = c.call("get_transfer", json!({ "id": id })).await.unwrap();
            assert_eq!((t["from"].as_str(), t["to"].as_str(), t["amount"].as_i64()), (Some("a"), Some("b"), Some(1)));
        }
        let a = audit_ok(&c).await;
        assert_eq!(a["transfers"], acknowledged.len() as u64 + 1, "round {round}: the initial mint and these");
        s.restart();
    }
}
