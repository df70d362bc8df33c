//! `transfer_batch` over real TCP against the real binary: a batch applies
//! exactly its passing items, an atomic one all or nothing, keys replay
//! inside batches, the limits hold, a user's batch waits for one code, and
//! `kill -9` under batched load loses no acknowledged batch and never
//! leaves part of an atomic one.

mod common;

use std::sync::Arc;

use common::{audit_ok, balance, code, create, MailServer, Server};
use serde_json::{json, Value};
use tally::client::Client;

fn t(from: &str, to: &str, amount: i64) -> Value {
    json!({"from": from, "to": to, "amount": amount})
}

fn keyed(from: &str, to: &str, amount: i64, key: &str) -> Value {
    json!({"from": from, "to": to, "amount": amount, "key": key})
}

async fn balances(c: &Client, accounts: &[&str]) -> Vec<i64> {
    let mut out = Vec::new();
    for a in accounts {
        out.push(balance(c, a).await);
    }
    out
}

#[tokio::test]
async fn a_batch_applies_exactly_its_passing_items() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "alice", 100).await;
    create(&c, "bob", 0).await;
    create(&c, "carol", 0).await;
    create(&c, "dave", 5).await;
    let r = c
        .transfer_batch(
            &[
                t("alice", "bob", 30),
                t("alice", "carol", 80), // 70 left after the first
                t("alice", "carol", 70),
                json!({"from": "alice", "to": "bob", "amount": 0}),
                t("bob", "bob", 1),
                t("dave", "nobody", 1), // found missing at commit
            ],
            false,
        )
        .await
        .unwrap();
    assert_eq!((r["applied"].as_u64(), r["failed"].as_u64()), (Some(2), Some(4)), "{r}");
    let items = r["results"].as_array().unwrap();
    assert_eq!(items.len(), 6);
    assert_eq!((items[0]["from_balance"].as_i64(), items[0]["to_balance"].as_i64()), (Some(70), Some(30)));
    assert_eq!(items[1]["code"], "insufficient_funds");
    assert_eq!((items[2]["from_balance"].as_i64(), items[2]["to_balance"].as_i64()), (Some(0), Some(70)));
    assert_eq!(items[3]["code"], "bad_request");
    assert_eq!(items[4]["code"], "bad_request");
    assert_eq!(items[5]["code"], "not_found");
    // Ids are the records', in commit order.
    let (first, second) = (items[0]["id"].as_u64().unwrap(), items[2]["id"].as_u64().unwrap());
    assert!(first < second, "{r}");
    let got = c.call("get_transfer", json!({"id": second})).await.unwrap();
    assert_eq!(
        (got["from"].as_str(), got["to"].as_str(), got["amount"].as_i64()),
        (Some("alice"), Some("carol"), Some(70))
    );
    assert_eq!(balances(&c, &["alice", "bob", "carol", "dave"]).await, [0, 30, 70, 5]);
    let a = audit_ok(&c).await;
    assert_eq!(a["transfers"], 2 + 2, "two fundings and the two items");
}

#[tokio::test]
async fn an_atomic_batch_with_a_failing_item_applies_nothing() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "alice", 100).await;
    create(&c, "bob", 10).await;
    create(&c, "carol", 0).await;
    let before = audit_ok(&c).await;
    // Refused by bob's owner (he has 10), while alice's items were reserved.
    let e = c
        .transfer_batch(&[t("alice", "bob", 30), t("alice", "carol", 20), t("bob", "carol", 11)], true)
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.item()), (Some("insufficient_funds"), Some(2)), "{e}");
    assert!(e.to_string().contains("bob"), "the failing item's own reason: {e}");
    // Refused before any owner: a bad item.
    let e = c.transfer_batch(&[t("alice", "bob", 1), t("alice", "ghost!", 1)], true).await.unwrap_err();
    assert_eq!((e.code(), e.item()), (Some("bad_request"), Some(1)), "{e}");
    // Refused at commit: an account that does not exist is the journal's to find.
    let e = c.transfer_batch(&[t("alice", "bob", 1), t("alice", "ghost", 1)], true).await.unwrap_err();
    assert_eq!((e.code(), e.item()), (Some("not_found"), Some(1)), "{e}");
    let after = audit_ok(&c).await;
    assert_eq!(
        (after["head"].clone(), after["transfers"].clone()),
        (before["head"].clone(), before["transfers"].clone())
    );
    assert_eq!(balances(&c, &["alice", "bob", "carol"]).await, [100, 10, 0]);
    // Every reservation was released: alice can still send all she has.
    assert_eq!(c.call("balance", json!({"account": "alice"})).await.unwrap()["available"], 100);

    let r =
        c.transfer_batch(&[t("alice", "bob", 30), t("alice", "carol", 70), t("bob", "carol", 10)], true).await.unwrap();
    assert_eq!((r["applied"].as_u64(), r["failed"].as_u64()), (Some(3), Some(0)), "{r}");
    let ids: Vec<u64> = r["results"].as_array().unwrap().iter().map(|i| i["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "one batch, consecutive records: {ids:?}");
    assert_eq!(balances(&c, &["alice", "bob", "carol"]).await, [0, 30, 80]);
    audit_ok(&c).await;
}

#[tokio::test]
async fn keys_inside_batches_replay_the_original_results() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "alice", 100).await;
    create(&c, "bob", 0).await;
    let single = c.transfer(Some("alice"), "bob", 5, Some("k0")).await.unwrap();
    for atomic in [false, true] {
        let suffix = if atomic { "a" } else { "n" };
        let items = [
            keyed("alice", "bob", 5, "k0"),
            keyed("alice", "bob", 7, &format!("k1{suffix}")),
            keyed("alice", "bob", 9, &format!("k2{suffix}")),
        ];
        let first = c.transfer_batch(&items, atomic).await.unwrap();
        let again = c.transfer_batch(&items, atomic).await.unwrap();
        let ids = |r: &Value| -> Vec<u64> {
            r["results"].as_array().unwrap().iter().map(|i| i["id"].as_u64().unwrap()).collect()
        };
        assert_eq!(ids(&first), ids(&again), "atomic={atomic}");
        assert_eq!(ids(&first)[0], single["id"].as_u64().unwrap(), "the key of a single transfer replays in a batch");
        // The same key with other arguments.
        let clash = [keyed("alice", "bob", 8, &format!("k1{suffix}"))];
        if atomic {
            assert_eq!(code(c.transfer_batch(&clash, true).await), "key_conflict");
        } else {
            let r = c.transfer_batch(&clash, false).await.unwrap();
            assert_eq!(r["results"][0]["code"], "key_conflict");
        }
    }
    // k0 once, then 7 + 9 twice (once per mode).
    assert_eq!(balances(&c, &["alice", "bob"]).await, [100 - 5 - 32, 37]);
    // One key twice in one atomic batch would wait for itself.
    let twice = [keyed("alice", "bob", 1, "k9"), keyed("alice", "bob", 1, "k9")];
    let e = c.transfer_batch(&twice, true).await.unwrap_err();
    assert_eq!((e.code(), e.item()), (Some("bad_request"), Some(1)));
    audit_ok(&c).await;
}

#[tokio::test]
async fn batch_limits_hold() {
    let s = Server::start_with(&[("TALLY_LIMITS_BATCH_MAX", "3")]);
    let c = s.admin().await;
    create(&c, "alice", 100).await;
    create(&c, "bob", 0).await;
    let four = vec![t("alice", "bob", 1); 4];
    assert_eq!(code(c.transfer_batch(&four, false).await), "bad_request");
    assert_eq!(code(c.transfer_batch(&four, true).await), "bad_request");
    assert_eq!(code(c.transfer_batch(&[], false).await), "bad_request");
    assert_eq!(code(c.call("transfer_batch", json!({"transfers": "no"})).await), "bad_request");
    assert_eq!(code(c.call("transfer_batch", json!({"transfers": [{"to": "bob"}]})).await), "bad_request");
    assert_eq!(
        code(c.call("transfer_batch", json!({"transfers": [t("alice", "bob", 1)], "x": 1})).await),
        "bad_request"
    );
    // Issuing is `mint`'s.
    let r = c.transfer_batch(&[t("@mint", "bob", 1)], false).await.unwrap();
    assert_eq!(r["results"][0]["code"], "bad_request");
    let three = vec![t("alice", "bob", 1); 3];
    assert_eq!(c.transfer_batch(&three, false).await.unwrap()["applied"], 3);
    assert_eq!(balances(&c, &["alice", "bob"]).await, [97, 3]);
    audit_ok(&c).await;
}

#[tokio::test]
async fn a_user_batch_is_the_users_own_and_waits_for_one_code() {
    let mut m = MailServer::start(&[]);
    let admin = m.s.admin().await;
    for u in ["alice", "bob"] {
        let c = m.s.client().await;
        c.call(
            "signup",
            json!({"user": u, "name": u, "email": format!("{u}@campus.example"), "password": "correct horse battery"}),
        )
        .await
        .unwrap();
    }
    admin.call("mint", json!({"to": "alice", "amount": 1000})).await.unwrap();
    let alice = m.s.client().await;
    alice.login("alice", "correct horse battery").await.unwrap();
    // Below the threshold in all: no code. Not her account: refused alone.
    let r = alice
        .transfer_batch(
            &[json!({"to": "bob", "amount": 40}), json!({"to": "bob", "amount": 50}), t("bob", "alice", 1)],
            false,
        )
        .await
        .unwrap();
    assert_eq!(r["applied"], 2, "{r}");
    assert_eq!(r["results"][2]["code"], "forbidden");
    assert_eq!(m.mail.count(), 0);
    // 60 + 60 = 120 >= 100: one code for the batch.
    let r = alice
        .transfer_batch(&[json!({"to": "bob", "amount": 60}), json!({"to": "bob", "amount": 60})], true)
        .await
        .unwrap();
    let pending = r["pending"].as_str().expect("a pending session").to_owned();
    let (subject, otp, _) = m.mail.next();
    assert_eq!(subject, "Tally: confirm your 2 transfers, 120 in all");
    assert_eq!(balance(&admin, "alice").await, 910, "nothing moves before the code");
    let done = alice.call("confirm", json!({"pending": pending, "otp": otp})).await.unwrap();
    assert_eq!(done["applied"], 2, "{done}");
    assert_eq!(balances(&admin, &["alice", "bob"]).await, [790, 210]);
    assert_eq!(code(alice.call("confirm", json!({"pending": pending, "otp": otp})).await), "not_found");
    // Atomic: a code even below the threshold (a rolled-back batch must not
    // be a free probe of bob's balance against a cap).
    let r = alice.transfer_batch(&[json!({"to": "bob", "amount": 1})], true).await.unwrap();
    assert!(r["pending"].is_string(), "{r}");
    let (subject, _, _) = m.mail.next();
    assert_eq!(subject, "Tally: confirm your 1 transfers, 1 in all");
    // Above the threshold, an item refused before the code fails the
    // request, with its place (the results after a code match the request).
    let e = alice
        .transfer_batch(&[json!({"to": "bob", "amount": 100}), json!({"to": "nobody", "amount": 1})], false)
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.item()), (Some("not_found"), Some(1)), "{e}");
    assert_eq!(balances(&admin, &["alice", "bob"]).await, [790, 210]);
    audit_ok(&admin).await;
}

#[tokio::test]
async fn without_codes_a_user_may_not_send_atomic_batches() {
    let s = Server::start();
    let admin = s.admin().await;
    let c = s.client().await;
    c.call(
        "signup",
        json!({"user": "ann", "name": "Ann", "email": "ann@example.org", "password": "correct horse battery"}),
    )
    .await
    .unwrap();
    create(&admin, "shop", 0).await;
    admin.call("mint", json!({"to": "ann", "amount": 10})).await.unwrap();
    c.login("ann", "correct horse battery").await.unwrap();
    assert_eq!(code(c.transfer_batch(&[json!({"to": "shop", "amount": 1})], true).await), "forbidden");
    let r = c.transfer_batch(&[json!({"to": "shop", "amount": 1})], false).await.unwrap();
    assert_eq!(r["applied"], 1);
    assert_eq!(balances(&admin, &["ann", "shop"]).await, [9, 1]);
}

#[tokio::test]
async fn kill_9_under_batched_load_loses_no_acknowledged_batch_and_no_atomic_half() {
    let mut s = Server::start();
    let admin = s.admin().await;
    let accounts = ["a0", "a1", "a2", "a3", "a4", "a5"];
    for a in accounts {
        create(&admin, a, 10_000).await;
    }
    // Four connections, each with batches in flight (half of them atomic),
    // until the server dies. Every item carries a key naming its batch.
    let acked_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..4usize {
        let c = Arc::new(s.admin().await);
        let acked_so_far = acked_so_far.clone();
        workers.push(tokio::spawn(async move {
            let mut acked: Vec<(bool, Vec<u64>)> = Vec::new();
            let mut n = 0usize;
            'outer: loop {
                let mut calls = Vec::new();
                for _ in 0..4 {
                    n += 1;
                    let atomic = n.is_multiple_of(2);
                    let items: Vec<Value> = (0..10)
                        .map(|i| {
                            let from = accounts[(w + n + i) % 6];
                            let to = accounts[(w + n + i + 1 + i % 5) % 6];
                            keyed(from, to, 1 + (i as i64 % 3), &format!("w{w}-b{n}-i{i}"))
                        })
                        .collect();
                    let c = c.clone();
                    calls.push(tokio::spawn(async move { (atomic, c.transfer_batch(&items, atomic).await) }));
                }
                for call in calls {
                    match call.await.unwrap() {
                        (atomic, Ok(r)) => {
                            let ids =
                                r["results"].as_array().unwrap().iter().filter_map(|i| i["id"].as_u64()).collect();
                            acked.push((atomic, ids));
                            acked_so_far.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        // A refusal is an answer; no answer means the server died.
                        (_, Err(e)) if e.code().is_some() => {}
                        (_, Err(_)) => break 'outer,
                    }
                }
            }
            acked
        }));
    }
    common::eventually(std::time::Duration::from_secs(30), "batches acknowledged", || {
        let n = acked_so_far.load(std::sync::atomic::Ordering::Relaxed);
        async move { n >= 40 }
    })
    .await;
    s.kill9();
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.await.unwrap());
    }
    s.start_again();
    let c = s.admin().await;
    let a = audit_ok(&c).await;
    let total: i64 = balances(&c, &accounts).await.iter().sum();
    assert_eq!(total, 60_000, "units conserved");
    // Every acknowledged item is there; an atomic batch acknowledged is whole.
    for (atomic, ids) in &acked {
        if *atomic {
            assert_eq!(ids.len(), 10);
        }
        for id in ids {
            c.call("get_transfer", json!({"id": id})).await.expect("an acknowledged record survives");
        }
    }
    // No atomic batch is in part: its items are consecutive records, all
    // keyed "w-b-i" for i in 0..10; count records per batch key.
    let mut per_batch = std::collections::HashMap::<String, usize>::new();
    let head = a["transfers"].as_u64().unwrap();
    for id in 1..=head {
        let r = c.call("get_transfer", json!({"id": id})).await.unwrap();
        if let Some(key) = r["key"].as_str() {
            let batch = key.rsplit_once("-i").unwrap().0.to_owned();
            *per_batch.entry(batch).or_default() += 1;
        }
    }
    for (batch, n) in per_batch {
        let b: usize = batch.rsplit_once("-b").unwrap().1.parse().unwrap();
        if b.is_multiple_of(2) {
            assert_eq!(n, 10, "atomic batch {batch} is whole");
        }
    }
}

#[tokio::test]
async fn concurrent_uses_of_a_key_the_shard_must_look_up_apply_once() {
    let mut s = Server::start();
    let c = s.admin().await;
    create(&c, "alice", 100).await;
    create(&c, "bob", 0).await;
    let old = c.transfer(Some("alice"), "bob", 3, Some("old")).await.unwrap();
    // After a restart no key is in memory: every use below is looked up on disk.
    s.restart();
    let c = Arc::new(s.admin().await);
    let mut calls = Vec::new();
    for i in 0..40 {
        let (c, key, amount) = (c.clone(), if i % 2 == 0 { "old" } else { "new" }, if i % 2 == 0 { 3 } else { 5 });
        calls.push(tokio::spawn(async move { c.transfer(Some("alice"), "bob", amount, Some(key)).await.unwrap() }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(r["id"], old["id"]);
        }
        ids.insert(r["id"].as_u64().unwrap());
    }
    assert_eq!(ids.len(), 2, "one record per key: {ids:?}");
    assert_eq!(balances(&c, &["alice", "bob"]).await, [92, 8]);
    // A key used with other arguments is still a conflict once looked up.
    assert_eq!(code(c.transfer(Some("alice"), "bob", 4, Some("old")).await), "key_conflict");
    audit_ok(&c).await;
}

#[tokio::test]
async fn a_key_limited_to_accounts_and_an_auditor_move_only_what_they_may() {
    let s = Server::start();
    let admin = s.admin().await;
    for (a, n) in [("shop", 100), ("till", 100), ("bob", 0)] {
        create(&admin, a, n).await;
    }
    let k = admin.call("create_key", json!({"name": "pos", "role": "operator", "accounts": ["shop"]})).await.unwrap();
    let pos = s.client().await;
    pos.call("auth", json!({"key": k["secret"]})).await.unwrap();
    let r = pos.transfer_batch(&[t("shop", "bob", 5), t("till", "bob", 5)], false).await.unwrap();
    assert_eq!((r["applied"].as_u64(), r["results"][1]["code"].as_str()), (Some(1), Some("forbidden")), "{r}");
    let e = pos.transfer_batch(&[t("shop", "bob", 5), t("till", "bob", 5)], true).await.unwrap_err();
    assert_eq!((e.code(), e.item()), (Some("forbidden"), Some(1)));
    let k = admin.call("create_key", json!({"name": "books", "role": "auditor"})).await.unwrap();
    let auditor = s.client().await;
    auditor.call("auth", json!({"key": k["secret"]})).await.unwrap();
    assert_eq!(code(auditor.transfer_batch(&[t("shop", "bob", 1)], false).await), "forbidden");
    assert_eq!(balances(&admin, &["shop", "till", "bob"]).await, [95, 100, 5]);
    audit_ok(&admin).await;
}
