//! Proves the points-manager ops over real TCP: inclusive bounds on create
//! and add, `exists`/`deleted` conflicts, 10,000 concurrent creates listed
//! back exactly, tombstones, tags, `bulk_add` (all or nothing, or forced)
//! followed by `reap`, balance filters, owner search, and a backup taken
//! under write load that restores to a consistent ledger.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{audit_ok, balance, code, create, Server};
use serde_json::{json, Value};
use tally::client::Client;

async fn list_all(c: &Client, filter: Value) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = filter.clone();
        args["limit"] = json!(1000);
        if let Some(a) = &after {
            args["after"] = json!(a);
        }
        let page = c.call("list_accounts", args).await.unwrap();
        out.extend(page["accounts"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return out,
        }
    }
}

fn ids(accounts: &[Value]) -> Vec<String> {
    accounts.iter().map(|a| a["account"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn bounds_are_inclusive_on_create_and_add() {
    let s = Server::start_with(&[("TALLY_LIMITS_MAX_BALANCE", "100")]);
    let c = s.admin().await;
    create(&c, "low", 0).await;
    create(&c, "high", 100).await;
    assert_eq!(code(c.call("create_account", json!({"account": "x", "initial": 101})).await), "above_max");
    assert_eq!(code(c.call("create_account", json!({"account": "x", "initial": -1})).await), "below_min");
    assert_eq!(code(c.call("create_account", json!({"account": "x", "initial": "5"})).await), "bad_request");
    assert_eq!(code(c.call("create_account", json!({"account": "x", "initial": 5.5})).await), "bad_request");
    let r = c.call("add", json!({"account": "low", "delta": 100, "memo": "welcome"})).await.unwrap();
    assert_eq!(
        (r["account"].as_str(), r["balance"].as_i64(), r["change"].as_i64()),
        (Some("low"), Some(100), Some(100))
    );
    assert_eq!(code(c.call("add", json!({"account": "low", "delta": 1})).await), "above_max");
    let r = c.call("add", json!({"account": "high", "delta": -100})).await.unwrap();
    assert_eq!((r["balance"].as_i64(), r["change"].as_i64()), (Some(0), Some(-100)));
    assert_eq!(code(c.call("add", json!({"account": "high", "delta": -1})).await), "below_min");
    assert_eq!(code(c.call("add", json!({"account": "high", "delta": 0})).await), "bad_request");
    assert_eq!(code(c.call("add", json!({"account": "nobody", "delta": 5})).await), "not_found");
    assert_eq!((balance(&c, "low").await, balance(&c, "high").await), (100, 0));
    // add with a key is idempotent like a transfer.
    let first = c.call("add", json!({"account": "high", "delta": 7, "key": "promo-1"})).await.unwrap();
    let again = c.call("add", json!({"account": "high", "delta": 7, "key": "promo-1"})).await.unwrap();
    assert_eq!(first["transfer"], again["transfer"]);
    assert_eq!(balance(&c, "high").await, 7);
    audit_ok(&c).await;
}

#[tokio::test]
async fn deleted_accounts_leave_tombstones() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "gone", 40).await;
    assert_eq!(code(c.call("create_account", json!({"account": "gone"})).await), "exists");
    let mint_before = balance(&c, "@mint").await;
    let d = c.call("delete_account", json!({"account": "gone", "reason": "left the club"})).await.unwrap();
    assert_eq!(d["deleted"], true);
    let d = c.call("delete_account", json!({"account": "gone", "reason": "second reason"})).await.unwrap();
    assert_eq!(d["deleted"], false);
    let r = c.call("delete_reason", json!({"account": "gone"})).await.unwrap();
    assert_eq!(r["reason"], "left the club");
    assert!(r["time"].as_u64().unwrap() > 0);
    // The balance went back to @mint in a close transfer.
    assert_eq!(balance(&c, "@mint").await, mint_before + 40);
    assert_eq!(code(c.call("balance", json!({"account": "gone"})).await), "deleted");
    assert_eq!(code(c.call("create_account", json!({"account": "gone"})).await), "deleted");
    create(&c, "other", 5).await;
    assert_eq!(code(c.call("transfer", json!({"from": "other", "to": "gone", "amount": 1})).await), "deleted");
    assert_eq!(balance(&c, "other").await, 5);
    assert_eq!(code(c.call("delete_reason", json!({"account": "other"})).await), "not_found");
    assert_eq!(code(c.call("delete_account", json!({"account": "@mint", "reason": "x"})).await), "forbidden");
    audit_ok(&c).await;
}

#[tokio::test]
async fn ten_thousand_concurrent_creates_are_listed_back_exactly() {
    let s = Server::start();
    let mut tasks = Vec::new();
    for conn in 0..8 {
        let c = Arc::new(s.admin().await);
        for i in (conn..10_000).step_by(8) {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.call("create_account", json!({"account": format!("m{i:05}"), "initial": i % 100})).await.unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = s.admin().await;
    let all: Vec<String> = ids(&list_all(&c, json!({})).await).into_iter().filter(|a| !a.starts_with('@')).collect();
    let expected: Vec<String> = (0..10_000).map(|i| format!("m{i:05}")).collect();
    assert_eq!(all, expected);
    // Balance filters return exactly the matching accounts.
    let rich = list_all(&c, json!({"balance_min": 95})).await;
    let want: BTreeSet<String> = (0..10_000).filter(|i| i % 100 >= 95).map(|i| format!("m{i:05}")).collect();
    assert_eq!(ids(&rich).into_iter().collect::<BTreeSet<_>>(), want);
    let band = list_all(&c, json!({"balance_min": 10, "balance_max": 12})).await;
    assert_eq!(band.len(), 300);
    assert!(band.iter().all(|a| (10..=12).contains(&a["balance"].as_i64().unwrap())));
    assert_eq!(code(c.call("list_accounts", json!({"limit": 5000})).await), "bad_request");
    // Pages asked for together are read a few at a time
    // (`LIST_PAGES_AT_ONCE`); every caller still gets all of them.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(s.admin().await);
    }
    let listers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(async move { ids(&list_all(&c, json!({"balance_min": 95})).await) }))
        .collect();
    for l in listers {
        assert_eq!(l.await.unwrap().into_iter().collect::<BTreeSet<_>>(), want);
    }
}

#[tokio::test]
async fn tags_owners_bulk_add_and_reap() {
    let s = Server::start();
    let c = s.admin().await;
    for i in 0..10 {
        let owner = if i < 3 { json!("carol") } else { Value::Null };
        c.call(
            "create_account",
            json!({"account": format!("p{i}"), "initial": i * 10, "tags": ["promo"], "owner": owner}),
        )
        .await
        .unwrap();
    }
    create(&c, "untagged", 1).await;
    let t = c.call("tag", json!({"account": "untagged", "add": ["vip", "promo"]})).await.unwrap();
    assert_eq!(t["tags"], json!(["promo", "vip"]));
    let t = c.call("tag", json!({"account": "untagged", "remove": ["promo"]})).await.unwrap();
    assert_eq!(t["tags"], json!(["vip"]));
    assert_eq!(ids(&list_all(&c, json!({"tag": "vip"})).await), vec!["untagged"]);
    assert_eq!(ids(&list_all(&c, json!({"tag": "promo"})).await).len(), 10);
    assert_eq!(ids(&list_all(&c, json!({"owner": "carol"})).await), vec!["p0", "p1", "p2"]);
    assert_eq!(
        ids(&list_all(&c, json!({"owner": "carol", "tag": "promo", "balance_min": 10})).await),
        vec!["p1", "p2"]
    );

    // Without force a crossed bound refuses the whole change.
    let before = audit_ok(&c).await;
    assert_eq!(code(c.call("bulk_add", json!({"tag": "promo", "delta": -25})).await), "below_min");
    assert_eq!(audit_ok(&c).await["head"], before["head"]);
    let r = c.call("bulk_add", json!({"tag": "promo", "delta": 5, "memo": "bonus"})).await.unwrap();
    assert_eq!(r["count"], 10);
    assert_eq!(balance(&c, "p0").await, 5);
    // With force the bounds are ignored: p0, p1, p2 go negative.
    let r = c.call("bulk_add", json!({"tag": "promo", "delta": -30, "force": true})).await.unwrap();
    assert_eq!(r["count"], 10);
    assert_eq!(balance(&c, "p0").await, -25);
    assert_eq!(balance(&c, "p3").await, 5);
    let r = c.call("reap", json!({"reason": "negative after promo"})).await.unwrap();
    assert_eq!(r["count"], 3);
    for i in 0..10 {
        let acct = format!("p{i}");
        if i < 3 {
            assert_eq!(
                c.call("delete_reason", json!({"account": acct})).await.unwrap()["reason"],
                "negative after promo"
            );
        } else {
            assert!(balance(&c, &acct).await >= 0);
        }
    }
    assert_eq!(ids(&list_all(&c, json!({"tag": "promo"})).await).len(), 7);
    // reap with an explicit threshold.
    let r = c.call("reap", json!({"reason": "small", "below": 16})).await.unwrap();
    assert_eq!(r["count"], 3); // p3 (5), p4 (15) and "untagged" (1)
    audit_ok(&c).await;
}

#[tokio::test]
async fn backup_under_write_load_restores_consistently() {
    let mut s = Server::start();
    let c = Arc::new(s.admin().await);
    for i in 0..20 {
        create(&c, &format!("b{i}"), 1000).await;
    }
    // An open hold, which the copy must carry too.
    create(&c, "holder", 100).await;
    let hold = c.call("hold", json!({"from": "holder", "to": "b0", "amount": 40})).await.unwrap()["hold"].clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..4usize {
        let (c, stop, done) = (c.clone(), stop.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (from, to) = ((n + w) % 20, (n * 7 + w + 1) % 20);
                if from != to {
                    let _ = c
                        .call("transfer", json!({"from": format!("b{from}"), "to": format!("b{to}"), "amount": 1}))
                        .await;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                n += 1;
            }
        }));
    }
    // The copy is taken while transfers go on, before and after it.
    let count = || done.load(std::sync::atomic::Ordering::Relaxed);
    common::eventually(std::time::Duration::from_secs(30), "100 transfers", || async { count() >= 100 }).await;
    let b = c.call("backup", json!({"out": "snap-1.redb"})).await.unwrap();
    let after = count();
    common::eventually(std::time::Duration::from_secs(30), "100 more transfers", || async { count() >= after + 100 })
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(code(c.call("backup", json!({"out": "snap-1.redb"})).await), "exists");
    assert_eq!(code(c.call("backup", json!({"out": "../escape"})).await), "bad_request");
    let live_head = audit_ok(&c).await["head"].clone();
    assert_ne!(live_head, b["head"], "writes kept going after the backup");

    // Restore: the copy becomes the data file of a fresh server.
    let path = std::path::PathBuf::from(b["path"].as_str().unwrap());
    std::fs::copy(&path, s.data.join("tally.redb")).unwrap();
    s.restart();
    let c = s.admin().await;
    let restored = audit_ok(&c).await;
    assert_eq!(restored["head"], b["head"]);
    assert_eq!(restored["transfers"], b["transfers"]);
    let mut total = 0;
    for i in 0..20 {
        total += balance(&c, &format!("b{i}")).await;
    }
    assert_eq!(total, 20_000);
    let h = c.call("balance", json!({"account": "holder"})).await.unwrap();
    assert_eq!((h["balance"].as_i64(), h["held"].as_i64(), h["available"].as_i64()), (Some(100), Some(40), Some(60)));
    c.call("post", json!({"hold": hold})).await.unwrap();
    assert_eq!(balance(&c, "holder").await, 60);
}
