//! Proves `tally call` against the real server: JSON on stdout, the error
//! code on stderr with exit status 1, usage errors with status 2.

mod common;

use std::process::{Command, Output};

use common::{Server, ADMIN_PASSWORD};
use serde_json::Value;

fn call(s: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("call")
        .args(["--connect", &s.addr.to_string(), "--user", "admin"])
        .args(args)
        .env("TALLY_PASSWORD", ADMIN_PASSWORD)
        .output()
        .expect("run tally call")
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

#[test]
fn call_prints_results_and_fails_with_the_error_code() {
    let s = Server::start();
    assert_eq!(json(&call(&s, &["ping"])), "pong");
    let a = json(&call(&s, &["create_account", "account=alice", "initial=100", "tags=[vip,staff]"]));
    assert_eq!(a["balance"], 100);
    assert_eq!(a["tags"], serde_json::json!(["staff", "vip"]));
    json(&call(&s, &["create_account", "account=bob"]));
    let t = json(&call(&s, &["transfer", "from=alice", "to=bob", "amount=30", "memo=for lunch"]));
    assert_eq!(t["memo"], "for lunch");
    assert_eq!(t["to_balance"], 30);

    let refused = call(&s, &["transfer", "from=alice", "to=bob", "amount=1000"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("insufficient_funds"));
    assert!(refused.stdout.is_empty());

    let usage = call(&s, &["transfer", "amount"]);
    assert_eq!(usage.status.code(), Some(2));

    let wrong = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["call", "--connect", &s.addr.to_string(), "--user", "admin", "--password", "nope", "ping"])
        .env_remove("TALLY_PASSWORD")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("unauthenticated"));

    let b = json(&call(&s, &["balance", "account=bob"]));
    assert_eq!(b["balance"], 30);
}

#[test]
fn backup_command_writes_a_copy_under_the_data_folder() {
    let s = Server::start();
    json(&call(&s, &["create_account", "account=kept", "initial=9"]));
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["backup", "--connect", &s.addr.to_string(), "--out", "copy.redb"])
        .env("TALLY_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    let v = json(&out);
    let path = std::path::PathBuf::from(v["path"].as_str().unwrap());
    assert_eq!(path, s.data.join("backups").join("copy.redb"));
    assert!(path.metadata().unwrap().len() > 0);
    assert_eq!(v["transfers"], 1);
}
