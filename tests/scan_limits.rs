//! Proves the bounds on the two scans, `audit` and `list_accounts`, over
//! TCP: one audit at a time and two list pages at a time, and a scan that
//! finds none free is refused `overloaded` once its wait has passed, not
//! before. The test-only `debug_hold` op of the `fault-injection` feature
//! holds the scans' permits, as long scans would, and replaces both scans'
//! waits with a short one, so the refusal comes in a fraction of a second;
//! the lengths of the real waits (`AUDIT_WAIT_MAX_MS`, `LIST_WAIT_MAX_MS`)
//! are not tested here. That a waiting scan runs once a permit is free is
//! shown by the unit tests of `blocking_within` (`src/api/mod.rs`).
#![cfg(feature = "fault-injection")]

mod common;

use std::time::{Duration, Instant};

use common::{audit_ok, code, create, Server};
use serde_json::{json, Value};
use tally::client::Client;

/// Gives up on a call the server never answers, rather than hanging.
async fn within(c: &Client, op: &str, args: Value) -> Result<Value, tally::client::ClientError> {
    tokio::time::timeout(Duration::from_secs(30), c.call(op, args)).await.expect("no answer within 30 s")
}

fn accounts(page: &Value) -> Vec<&str> {
    page["accounts"].as_array().unwrap().iter().map(|a| a["account"].as_str().unwrap()).collect()
}

/// Asks `op` while its permits are held with a wait of 300 ms: it must be
/// refused `overloaded`, and not before the wait has passed. A lower bound
/// only, which cannot flake: the server's timer starts after the request
/// has left, and a timer never fires early.
async fn refused_after_its_wait(c: &Client, op: &str) {
    let asked = Instant::now();
    let refused = within(c, op, json!({})).await.unwrap_err();
    assert!(asked.elapsed() >= Duration::from_millis(300), "{op} refused before its wait ended: {:?}", asked.elapsed());
    assert_eq!(refused.code(), Some("overloaded"), "{op}: {refused}");
    assert!(refused.to_string().contains("none started within 300 ms"), "{op}: {refused}");
}

#[tokio::test]
async fn a_scan_finding_no_permit_free_is_refused_when_its_wait_ends() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "a", 10).await;
    create(&c, "b", 0).await;

    // One audit at a time: while its one permit is taken, the next waits
    // its whole wait and is refused, and nobody can take a second permit.
    within(&c, "debug_hold", json!({"what": "audit", "permits": 1, "wait_ms": 300})).await.unwrap();
    refused_after_its_wait(&c, "audit").await;
    let again = within(&c, "debug_hold", json!({"what": "audit", "permits": 1, "wait_ms": 300})).await;
    assert_eq!(code(again), "overloaded");
    within(&c, "debug_release", json!({})).await.unwrap();
    let a = audit_ok(&c).await;
    assert_eq!(a["transfers"], 1, "the mint of a's 10: {a}");

    // Two list pages at a time: with one of the two permits taken a page
    // still runs; with both taken it waits, then is refused.
    within(&c, "debug_hold", json!({"what": "list_accounts", "permits": 1, "wait_ms": 300})).await.unwrap();
    let page = within(&c, "list_accounts", json!({})).await.unwrap();
    assert_eq!(accounts(&page), ["@mint", "@redeemed", "@treasury", "a", "b"]);
    within(&c, "debug_hold", json!({"what": "list_accounts", "permits": 1, "wait_ms": 300})).await.unwrap();
    refused_after_its_wait(&c, "list_accounts").await;
    within(&c, "debug_release", json!({})).await.unwrap();
    let page = within(&c, "list_accounts", json!({})).await.unwrap();
    assert_eq!(accounts(&page), ["@mint", "@redeemed", "@treasury", "a", "b"]);
}

/// The debug ops are for admins: a user is refused `forbidden`, and the
/// refusal holds nothing (an audit runs straight after).
#[tokio::test]
async fn the_debug_ops_refuse_a_user() {
    let s = Server::start();
    let admin = s.admin().await;
    let user =
        json!({"user": "ann", "role": "user", "name": "Ann", "email": "ann@example.com", "password": "ann-password-1"});
    within(&admin, "create_user", user).await.unwrap();
    let ann = s.client().await;
    ann.login("ann", "ann-password-1").await.unwrap();
    let hold = json!({"what": "audit", "permits": 1, "wait_ms": 300});
    assert_eq!(code(within(&ann, "debug_hold", hold).await), "forbidden");
    assert_eq!(code(within(&ann, "debug_release", json!({})).await), "forbidden");
    assert_eq!(code(within(&ann, "debug_panic", json!({"account": "ann"})).await), "forbidden");
    let a = audit_ok(&admin).await;
    assert_eq!(a["chain_ok"], true, "{a}");
}
