//! Proves two-phase transfers over real TCP: a hold keeps the balance but
//! takes the amount out of what is available, `post` moves it (whole or in
//! part, the rest released) and `void` releases it, each exactly once; a
//! timeout voids it by itself, also after a restart; owners and admins only.

mod common;

use std::time::Duration;

use common::{balance, code, create, eventually, Server};
use serde_json::{json, Value};
use tally::client::Client;

async fn bal(c: &Client, account: &str) -> (i64, i64, i64) {
    let b = c.call("balance", json!({ "account": account })).await.unwrap();
    (b["balance"].as_i64().unwrap(), b["held"].as_i64().unwrap(), b["available"].as_i64().unwrap())
}

async fn hold(c: &Client, args: Value) -> u64 {
    let h = c.call("hold", args).await.unwrap();
    assert_eq!(h["status"], "open", "{h}");
    h["hold"].as_u64().unwrap()
}

#[tokio::test]
async fn a_hold_blocks_spending_then_posts_in_part_once() {
    let s = Server::start();
    let admin = s.admin().await;
    create(&admin, "payer", 150).await;
    create(&admin, "shop", 0).await;
    let id = hold(&admin, json!({"from": "payer", "to": "shop", "amount": 100, "memo": "order 7"})).await;
    assert_eq!(bal(&admin, "payer").await, (150, 100, 50));
    let spend = admin.call("transfer", json!({"from": "payer", "to": "shop", "amount": 51})).await;
    assert_eq!(code(spend), "insufficient_funds");
    admin.call("transfer", json!({"from": "payer", "to": "shop", "amount": 50})).await.unwrap();
    assert_eq!(bal(&admin, "payer").await, (100, 100, 0));
    // Post 70 of the 100: 70 moves, 30 is released.
    let p = admin.call("post", json!({"hold": id, "amount": 70})).await.unwrap();
    assert_eq!(
        (p["status"].as_str(), p["posted"].as_i64(), p["released"].as_i64()),
        (Some("posted"), Some(70), Some(30))
    );
    assert_eq!(p["transfer"]["kind"], "post");
    assert_eq!(bal(&admin, "payer").await, (30, 0, 30));
    assert_eq!(balance(&admin, "shop").await, 120);
    // Settled once: neither a second post nor a void does anything.
    assert_eq!(code(admin.call("post", json!({"hold": id})).await), "forbidden");
    assert_eq!(code(admin.call("void", json!({"hold": id})).await), "forbidden");
    assert_eq!(code(admin.call("post", json!({"hold": 999_999})).await), "not_found");
    assert_eq!(bal(&admin, "payer").await, (30, 0, 30));
    // History shows the hold and the post.
    let h = admin.call("history", json!({"account": "payer"})).await.unwrap();
    let kinds: Vec<&str> = h["transfers"].as_array().unwrap().iter().map(|t| t["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds[..3], ["post", "transfer", "hold"]);
    common::audit_ok(&admin).await;
}

#[tokio::test]
async fn void_releases_and_bad_posts_change_nothing() {
    let s = Server::start();
    let admin = s.admin().await;
    create(&admin, "a", 100).await;
    create(&admin, "b", 0).await;
    let id = hold(&admin, json!({"from": "a", "to": "b", "amount": 60})).await;
    assert_eq!(code(admin.call("hold", json!({"from": "a", "to": "b", "amount": 41})).await), "insufficient_funds");
    for bad in [json!({"hold": id, "amount": 61}), json!({"hold": id, "amount": 0}), json!({"hold": id, "amount": -5})]
    {
        assert_eq!(code(admin.call("post", bad.clone()).await), "bad_request", "{bad}");
    }
    // An account with money on hold cannot be deleted.
    assert_eq!(code(admin.call("delete_account", json!({"account": "a", "reason": "x"})).await), "forbidden");
    let v = admin.call("void", json!({"hold": id})).await.unwrap();
    assert_eq!((v["status"].as_str(), v["released"].as_i64()), (Some("voided"), Some(60)));
    assert_eq!(bal(&admin, "a").await, (100, 0, 100));
    assert_eq!(balance(&admin, "b").await, 0);
    assert_eq!(code(admin.call("post", json!({"hold": id})).await), "forbidden");
    for bad in
        [json!({"from": "a", "to": "b", "amount": 1, "timeout_s": 0}), json!({"from": "a", "to": "a", "amount": 1})]
    {
        assert_eq!(code(admin.call("hold", bad.clone()).await), "bad_request", "{bad}");
    }
    assert_eq!(code(admin.call("hold", json!({"from": "a", "to": "nobody", "amount": 1})).await), "not_found");
    common::audit_ok(&admin).await;
}

#[tokio::test]
async fn a_timeout_voids_the_hold_also_across_a_restart() {
    let mut s = Server::start();
    let admin = s.admin().await;
    create(&admin, "a", 100).await;
    create(&admin, "b", 0).await;
    hold(&admin, json!({"from": "a", "to": "b", "amount": 10, "timeout_s": 1})).await;
    let long = hold(&admin, json!({"from": "a", "to": "b", "amount": 20, "timeout_s": 3})).await;
    let forever = hold(&admin, json!({"from": "a", "to": "b", "amount": 30})).await;
    assert_eq!(bal(&admin, "a").await, (100, 60, 40));
    // The 1 s hold is voided by the journal's timer.
    eventually(Duration::from_secs(10), "the 1 s hold voided", || async { bal(&admin, "a").await == (100, 50, 50) })
        .await;
    // Killed with two holds open: both come back, and the 3 s one still
    // expires after the restart.
    s.restart();
    let admin = s.admin().await;
    let after = bal(&admin, "a").await;
    assert!(after == (100, 50, 50) || after == (100, 30, 70), "{after:?}");
    eventually(Duration::from_secs(10), "the 3 s hold voided after a restart", || async {
        bal(&admin, "a").await == (100, 30, 70)
    })
    .await;
    assert_eq!(code(admin.call("post", json!({"hold": long})).await), "forbidden");
    admin.call("post", json!({"hold": forever})).await.unwrap();
    assert_eq!(bal(&admin, "a").await, (70, 0, 70));
    assert_eq!(balance(&admin, "b").await, 30);
    let h = admin.call("history", json!({"account": "a"})).await.unwrap();
    let kinds: Vec<&str> = h["transfers"].as_array().unwrap().iter().map(|t| t["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "void").count(), 2, "{kinds:?}");
    common::audit_ok(&admin).await;
}

#[tokio::test]
async fn users_settle_only_their_own_holds() {
    let s = Server::start();
    let admin = s.admin().await;
    let pw = "correct horse battery";
    let mut users = Vec::new();
    for u in ["ann", "ben"] {
        let c = s.client().await;
        let args = json!({"user": u, "name": u, "email": format!("{u}@example.org"), "password": pw});
        c.call("signup", args).await.unwrap();
        c.login(u, pw).await.unwrap();
        users.push(c);
    }
    admin.call("mint", json!({"to": "ann", "amount": 100})).await.unwrap();
    let id = hold(&users[0], json!({"to": "ben", "amount": 40, "key": "k1"})).await;
    // The same key returns the same hold.
    let again = users[0].call("hold", json!({"to": "ben", "amount": 40, "key": "k1"})).await.unwrap();
    assert_eq!(again["hold"].as_u64(), Some(id));
    assert_eq!(code(users[1].call("post", json!({"hold": id})).await), "forbidden");
    assert_eq!(code(users[1].call("void", json!({"hold": id})).await), "forbidden");
    assert_eq!(code(users[1].call("hold", json!({"from": "ann", "to": "ben", "amount": 1})).await), "forbidden");
    users[0].call("post", json!({"hold": id})).await.unwrap();
    assert_eq!((balance(&admin, "ann").await, balance(&admin, "ben").await), (60, 40));
    common::audit_ok(&admin).await;
}
