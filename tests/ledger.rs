//! Proves the core ledger over real TCP against the real binary: value moves
//! exactly, every refusal changes nothing, concurrent debits never overdraw,
//! pipelining works, and acknowledged transfers survive `kill -9`.

mod common;

use std::sync::Arc;

use common::{audit_ok, balance, code, create, Server};
use serde_json::json;

#[tokio::test]
async fn transfers_move_value_exactly() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "alice", 100).await;
    create(&c, "bob", 0).await;
    let t = c.call("transfer", json!({"from": "alice", "to": "bob", "amount": 30, "memo": "lunch"})).await.unwrap();
    assert_eq!(t["kind"], "transfer");
    assert_eq!(t["amount"], 30);
    assert_eq!(t["fee"], 0);
    assert_eq!(t["memo"], "lunch");
    assert_eq!(t["from_balance"], 70);
    assert_eq!(t["to_balance"], 30);
    assert_eq!(balance(&c, "alice").await, 70);
    assert_eq!(balance(&c, "bob").await, 30);
    assert_eq!(balance(&c, "@mint").await, -100);

    let m = c.call("mint", json!({"to": "bob", "amount": 5})).await.unwrap();
    assert_eq!(m["kind"], "mint");
    assert_eq!(m["from"], "@mint");
    assert_eq!(m["to_balance"], 35);

    let got = c.call("get_transfer", json!({"id": t["id"]})).await.unwrap();
    assert_eq!(got["from"], "alice");
    assert_eq!(got["amount"], 30);
    assert_eq!(got["hash"], t["hash"]);

    let acct = c.call("account", json!({"account": "alice"})).await.unwrap();
    assert_eq!(acct["balance"], 70);
    assert_eq!(acct["status"], "open");

    let a = audit_ok(&c).await;
    // @mint, @treasury, @redeemed, alice, bob; create+mint, transfer, mint.
    assert_eq!(a["accounts"], 5);
    assert_eq!(a["transfers"], 3);
    assert_eq!(a["head"], m["hash"]);
}

/// Eight admins on their own connections ask for an audit at once: those
/// queued behind the one scan wait their turn (not refused) and each gets
/// the whole answer.
#[tokio::test]
async fn audits_asked_together_each_get_the_whole_answer() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "alice", 100).await;
    create(&c, "bob", 0).await;
    // alice's initial 100 (a record from @mint), then the transfer.
    let t = c.call("transfer", json!({"from": "alice", "to": "bob", "amount": 30})).await.unwrap();
    let mut admins = Vec::new();
    for _ in 0..8 {
        admins.push(s.admin().await);
    }
    let answers = common::join_all(admins.iter().map(|a| Box::pin(a.call("audit", json!({})))).collect()).await;
    for a in answers {
        let a = a.expect("every audit is answered");
        assert_eq!(a["sum"], 0);
        assert_eq!(a["chain_ok"], true);
        assert_eq!(a["accounts"], 5);
        assert_eq!(a["transfers"], 2);
        assert_eq!(a["head"], t["hash"]);
    }
}

#[tokio::test]
async fn refusals_change_nothing() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "alice", 10).await;
    create(&c, "bob", 0).await;
    let before = audit_ok(&c).await;

    let t = |args: serde_json::Value| c.call("transfer", args);
    assert_eq!(code(t(json!({"from": "alice", "to": "bob", "amount": 11})).await), "insufficient_funds");
    assert_eq!(code(t(json!({"from": "alice", "to": "nobody", "amount": 1})).await), "not_found");
    assert_eq!(code(t(json!({"from": "nobody", "to": "bob", "amount": 1})).await), "not_found");
    for bad in [
        json!({"from": "alice", "to": "bob", "amount": 0}),
        json!({"from": "alice", "to": "bob", "amount": -5}),
        json!({"from": "alice", "to": "bob", "amount": u64::MAX}),
        json!({"from": "alice", "to": "bob", "amount": "5"}),
        json!({"from": "alice", "to": "bob", "amount": 1.5}),
        json!({"from": "alice", "to": "bob"}),
        json!({"from": "alice", "amount": 1}),
        json!({"from": "alice", "to": "alice", "amount": 1}),
        json!({"from": "alice", "to": "b o b", "amount": 1}),
        json!({"from": "alice", "to": "bob", "amount": 1, "form": "x"}),
        json!({"from": "alice", "to": "bob", "amount": 1, "memo": "m".repeat(300)}),
    ] {
        assert_eq!(code(t(bad.clone()).await), "bad_request", "{bad}");
    }
    // @mint is unbounded but still a 64-bit integer: issuing i64::MAX more would wrap it.
    assert_eq!(code(c.call("mint", json!({"to": "bob", "amount": i64::MAX})).await), "below_min");
    assert_eq!(code(c.call("frobnicate", json!({})).await), "unknown_op");
    assert_eq!(code(c.call("balance", json!({"account": "alice", "extra": 1})).await), "bad_request");
    assert_eq!(code(c.call("create_account", json!({"account": "alice"})).await), "exists");
    assert_eq!(code(c.call("create_account", json!({"account": "@bank"})).await), "forbidden");
    assert_eq!(code(c.call("create_account", json!({"account": "x", "initial": -1})).await), "below_min");
    assert_eq!(code(c.call("create_account", json!({"account": "y", "initial": 2.5})).await), "bad_request");

    let anon = s.client().await;
    assert_eq!(
        code(anon.call("transfer", json!({"from": "alice", "to": "bob", "amount": 1})).await),
        "unauthenticated"
    );
    assert_eq!(code(anon.call("mint", json!({"to": "bob", "amount": 1})).await), "unauthenticated");
    assert_eq!(code(anon.call("balance", json!({"account": "alice"})).await), "unauthenticated");
    assert_eq!(code(anon.login("admin", "wrong").await), "unauthenticated");
    assert_eq!(code(anon.call("audit", json!({})).await), "unauthenticated");
    assert_eq!(anon.call("ping", json!({})).await.unwrap(), "pong");

    assert_eq!(balance(&c, "alice").await, 10);
    assert_eq!(balance(&c, "bob").await, 0);
    let after = audit_ok(&c).await;
    assert_eq!(after["transfers"], before["transfers"]);
    assert_eq!(after["head"], before["head"]);
}

#[tokio::test]
async fn concurrent_debits_never_overdraw() {
    let s = Server::start();
    let admin = s.admin().await;
    create(&admin, "payer", 10).await;
    create(&admin, "shop", 0).await;
    // 60 debits of 1 against a balance of 10, from 6 connections at once.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(Arc::new(s.admin().await));
    }
    let mut tasks = Vec::new();
    for i in 0..60 {
        let c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            c.call("transfer", json!({"from": "payer", "to": "shop", "amount": 1})).await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Some("insufficient_funds"));
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (10, 50));
    assert_eq!(balance(&admin, "payer").await, 0);
    assert_eq!(balance(&admin, "shop").await, 10);
    audit_ok(&admin).await;
}

#[tokio::test]
async fn many_pipelined_requests_on_one_connection_are_all_answered() {
    let s = Server::start();
    let c = Arc::new(s.admin().await);
    create(&c, "a", 1000).await;
    create(&c, "b", 0).await;
    let mut tasks = Vec::new();
    for i in 0..600 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                c.call("transfer", json!({"from": "a", "to": "b", "amount": 1})).await
            } else {
                c.call("balance", json!({"account": "a"})).await
            }
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(balance(&c, "a").await, 700);
    assert_eq!(balance(&c, "b").await, 300);
    let stats = c.call("stats", json!({})).await.unwrap();
    assert!(stats["commits"].as_u64().unwrap() >= 1);
    assert!(stats["transfers"].as_u64().unwrap() >= 301);
    audit_ok(&c).await;
}

#[tokio::test]
async fn idempotency_keys_apply_once_and_survive_restart() {
    let mut s = Server::start();
    let c = s.admin().await;
    create(&c, "a", 100).await;
    create(&c, "b", 0).await;
    let args = json!({"from": "a", "to": "b", "amount": 7, "key": "order-1"});
    let first = c.call("transfer", args.clone()).await.unwrap();
    let again = c.call("transfer", args.clone()).await.unwrap();
    assert_eq!(first["id"], again["id"]);
    assert_eq!(balance(&c, "b").await, 7);
    let other = json!({"from": "a", "to": "b", "amount": 8, "key": "order-1"});
    assert_eq!(code(c.call("transfer", other.clone()).await), "key_conflict");
    // A refused transfer does not use its key up.
    let refused = json!({"from": "a", "to": "b", "amount": 1000, "key": "order-2"});
    assert_eq!(code(c.call("transfer", refused).await), "insufficient_funds");
    let ok2 = c.call("transfer", json!({"from": "a", "to": "b", "amount": 3, "key": "order-2"})).await.unwrap();
    assert_eq!(ok2["amount"], 3);

    s.restart();
    let c = s.admin().await;
    let after = c.call("transfer", args).await.unwrap();
    assert_eq!(after["id"], first["id"]);
    assert_eq!(code(c.call("transfer", other).await), "key_conflict");
    assert_eq!(balance(&c, "b").await, 10);
    audit_ok(&c).await;
}

#[tokio::test]
async fn history_pages_newest_first_with_a_cursor() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "a", 100).await;
    create(&c, "b", 0).await;
    create(&c, "z", 0).await;
    for i in 1..=5 {
        c.call("transfer", json!({"from": "a", "to": "b", "amount": i})).await.unwrap();
        c.call("transfer", json!({"from": "a", "to": "z", "amount": 1})).await.unwrap();
    }
    let p1 = c.call("history", json!({"account": "b", "limit": 2})).await.unwrap();
    let amounts = |p: &serde_json::Value| -> Vec<i64> {
        p["transfers"].as_array().unwrap().iter().map(|t| t["amount"].as_i64().unwrap()).collect()
    };
    assert_eq!(amounts(&p1), vec![5, 4]);
    let p2 = c.call("history", json!({"account": "b", "limit": 2, "after": p1["next"]})).await.unwrap();
    assert_eq!(amounts(&p2), vec![3, 2]);
    let p3 = c.call("history", json!({"account": "b", "limit": 2, "after": p2["next"]})).await.unwrap();
    assert_eq!(amounts(&p3), vec![1]);
    assert!(p3["next"].is_null());
    assert_eq!(code(c.call("history", json!({"account": "b", "limit": 100_000})).await), "bad_request");
}

#[tokio::test]
async fn acknowledged_transfers_survive_kill_9() {
    let mut s = Server::start();
    let admin = s.admin().await;
    let accounts = ["a0", "a1", "a2", "a3", "a4"];
    for a in accounts {
        create(&admin, a, 1000).await;
    }
    // Eight connections, each with 16 transfers in flight, until the server dies.
    let acked_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8usize {
        let c = Arc::new(s.admin().await);
        let acked_so_far = acked_so_far.clone();
        workers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = w;
            loop {
                let mut batch = Vec::new();
                for _ in 0..16 {
                    i += 8;
                    let (from, to) = (accounts[i % 5], accounts[(i / 5 + 1 + i) % 5]);
                    if from == to {
                        continue;
                    }
                    let amount = (i % 13 + 1) as i64;
                    let c = c.clone();
                    batch.push(tokio::spawn(async move {
                        c.call("transfer", json!({"from": from, "to": to, "amount": amount})).await
                    }));
                }
                let mut dead = false;
                for t in batch {
                    match t.await.unwrap() {
                        Ok(v) => {
                            acked.push(v);
                            acked_so_far.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) if e.code() == Some("insufficient_funds") => {}
                        Err(_) => dead = true,
                    }
                }
                if dead {
                    return acked;
                }
            }
        }));
    }
    // Killed once a good number are acknowledged, with more in flight.
    common::eventually(std::time::Duration::from_secs(30), "200 transfers acknowledged", || async {
        acked_so_far.load(std::sync::atomic::Ordering::Relaxed) >= 200
    })
    .await;
    s.kill9();
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 50, "only {} transfers acknowledged before the kill", acked.len());
    s.restart();
    let c = s.admin().await;
    for t in &acked {
        let got = c.call("get_transfer", json!({"id": t["id"]})).await.unwrap();
        for field in ["from", "to", "amount", "fee", "kind", "hash", "prev", "time"] {
            assert_eq!(got[field], t[field], "field {field} of transfer {}", t["id"]);
        }
    }
    let mut total = 0;
    for a in accounts {
        let b = balance(&c, a).await;
        assert!(b >= 0, "{a} below zero: {b}");
        total += b;
    }
    assert_eq!(total, 5000);
    let audit = audit_ok(&c).await;
    assert!(audit["transfers"].as_u64().unwrap() >= 5 + acked.len() as u64);
}

#[tokio::test]
async fn restart_rebuilds_every_balance_from_rows_and_the_replayed_tail() {
    // More accounts than one commit sweeps, so balance rows are written over
    // several commits and the restart must combine rows with the replay.
    const N: usize = 9000;
    let mut s = Server::start();
    let c = Arc::new(s.admin().await);
    let mut tasks = Vec::new();
    for i in 0..N {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.call("create_account", json!({"account": format!("w{i}"), "initial": 100})).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut expected = vec![100i64; N];
    let mut tasks = Vec::new();
    for k in 0..3000usize {
        let (from, to) = ((k * 7919) % N, (k * 104_729 + 1) % N);
        if from == to {
            continue;
        }
        let amount = (k % 5 + 1) as i64;
        expected[from] -= amount;
        expected[to] += amount;
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.call("transfer", json!({"from": format!("w{from}"), "to": format!("w{to}"), "amount": amount}))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    s.restart();
    let c = Arc::new(s.admin().await);
    let mut tasks = Vec::new();
    for i in 0..N {
        let c = c.clone();
        tasks.push(tokio::spawn(async move { (i, c.balance(Some(&format!("w{i}"))).await.unwrap()) }));
    }
    for t in tasks {
        let (i, b) = t.await.unwrap();
        assert_eq!(b, expected[i], "balance of w{i}");
    }
    let audit = audit_ok(&c).await;
    assert_eq!(audit["accounts"], N + 3);
}

#[tokio::test]
async fn max_balance_refuses_credits_whole() {
    let s = Server::start_with(&[("TALLY_LIMITS_MAX_BALANCE", "100"), ("TALLY_LIMITS_MIN_BALANCE", "-20")]);
    let c = s.admin().await;
    create(&c, "rich", 100).await;
    create(&c, "poor", 0).await;
    assert_eq!(code(c.call("create_account", json!({"account": "x", "initial": 101})).await), "above_max");
    assert_eq!(code(c.call("create_account", json!({"account": "y", "initial": -21})).await), "below_min");
    assert_eq!(code(c.call("mint", json!({"to": "rich", "amount": 1})).await), "above_max");
    // poor may go down to -20 (inclusive) and no further.
    let t = c.call("transfer", json!({"from": "poor", "to": "@treasury", "amount": 20})).await.unwrap();
    assert_eq!(t["from_balance"], -20);
    assert_eq!(
        code(c.call("transfer", json!({"from": "poor", "to": "@treasury", "amount": 1})).await),
        "insufficient_funds"
    );
    // A refused credit releases the sender's reservation: nothing is held back.
    assert_eq!(code(c.call("transfer", json!({"from": "@treasury", "to": "rich", "amount": 5})).await), "above_max");
    let treasury = c.call("balance", json!({"account": "@treasury"})).await.unwrap();
    assert_eq!((treasury["balance"].as_i64(), treasury["available"].as_i64()), (Some(20), Some(20)));
    assert_eq!(balance(&c, "rich").await, 100);
    audit_ok(&c).await;
}
