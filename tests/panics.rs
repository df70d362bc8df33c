//! Proves the panic policy: a panic anywhere (here, in the shard actor
//! owning an account, through the test-only `debug_panic` op of the
//! `fault-injection` feature) aborts the whole process instead of leaving
//! the account without an owner, and a restart recovers every acknowledged
//! transfer from the journal.
#![cfg(feature = "fault-injection")]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::{audit_ok, balance, create, Server};
use serde_json::json;

#[tokio::test]
async fn a_panicking_shard_aborts_the_process_and_a_restart_recovers_everything() {
    let mut s = Server::start_with(&[("TALLY_LOG", "warn")]);
    let c = s.admin().await;
    create(&c, "a", 1000).await;
    create(&c, "b", 0).await;
    for _ in 0..10 {
        c.call("transfer", json!({"from": "a", "to": "b", "amount": 7})).await.unwrap();
    }
    let _ = c.call("debug_panic", json!({"account": "b"})).await;
    let status = s.wait_exit(Duration::from_secs(10)).expect("the server did not stop after a panic");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}");
    let log = std::fs::read_to_string(common::log_path(&s)).unwrap();
    assert!(log.contains("fault injection: a shard panics"), "{log}");
    assert!(log.contains("aborting so that a restart recovers the ledger"), "{log}");

    s.start_again();
    let c = s.admin().await;
    assert_eq!((balance(&c, "a").await, balance(&c, "b").await), (930, 70));
    let a = audit_ok(&c).await;
    assert_eq!(a["transfers"], 11, "the mint of a's 1000 and the ten transfers");
    // Every account has its owner again.
    c.call("transfer", json!({"from": "b", "to": "a", "amount": 1})).await.unwrap();
}
