//! Proves the command line against the real server: `tally call` prints
//! JSON on stdout, the error code on stderr with exit status 1, usage
//! errors with status 2, no answer in time with status 3; `tally serve`
//! refuses a misspelt variable, makes an admin with a generated password
//! on a fresh data folder, keeps its files private; `tally admin
//! reset-password` works on a stopped server only.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::{Server, ADMIN_PASSWORD, UNSET};
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

/// A server that does not answer within `--timeout` (here: stopped) ends
/// the call with exit status 3, the outcome unknown, not a wait forever.
#[test]
fn call_gives_up_after_its_timeout_with_the_outcome_unknown() {
    let s = Server::start();
    common::signal(s.pid(), "-STOP");
    let silent = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["call", "--connect", &s.addr.to_string(), "--timeout", "0.5", "ping"])
        .env_remove("TALLY_PASSWORD")
        .output()
        .unwrap();
    common::signal(s.pid(), "-CONT");
    assert_eq!(silent.status.code(), Some(3), "stderr: {}", String::from_utf8_lossy(&silent.stderr));
    assert!(String::from_utf8_lossy(&silent.stderr).contains("no answer within the timeout"));
    assert!(silent.stdout.is_empty());
    let zero = call(&s, &["--timeout", "0", "ping"]);
    assert_eq!(zero.status.code(), Some(2), "a timeout of 0 s is a usage error");
    assert_eq!(json(&call(&s, &["--timeout", "5", "ping"])), "pong");
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

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_misspelt_variable_stops_the_server_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .env("TALLY_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("TALLY_LIMITS_MAX_BALANC", "5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TALLY_LIMITS_MAX_BALANC names no setting (did you mean TALLY_LIMITS_MAX_BALANCE?)"), "{err}");
    assert!(out.stdout.is_empty(), "it must not have started");
}

#[tokio::test]
async fn a_fresh_data_folder_gets_an_admin_with_a_generated_password_and_private_files() {
    let s = Server::start_with(&[("TALLY_AUTH_ADMIN_PASSWORD", UNSET)]);
    let file = s.data.join("admin.password");
    assert_eq!(mode(&file), 0o600);
    let password = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert_eq!(password.len(), 24);
    let c = s.client().await;
    assert_eq!(c.login("admin", &password).await.unwrap()["role"], "admin");
    for (path, expected) in [
        (s.data.clone(), 0o700),
        (s.data.join("tally.redb"), 0o600),
        (s.data.join("jwt.secret"), 0o600),
        (s.data.join("mail"), 0o700),
    ] {
        assert_eq!(mode(&path), expected, "{}", path.display());
    }
    // A backup is private too.
    let b = c.call("backup", serde_json::json!({"out": "copy.redb"})).await.unwrap();
    assert_eq!(mode(std::path::Path::new(b["path"].as_str().unwrap())), 0o600);
}

#[tokio::test]
async fn an_admin_password_is_reset_on_the_host_while_the_server_is_stopped() {
    let mut s = Server::start();
    let old_session = s.admin().await;
    let data = s.data.clone();
    let reset = |stdin: &str| {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["admin", "reset-password", "--data"])
            .arg(&data)
            .arg("admin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let busy = reset("a brand new admin passphrase\n");
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("is in use: stop the server first"));
    assert_eq!(s.sigterm().code(), Some(0));
    let short = reset("short\n");
    assert_eq!(short.status.code(), Some(1), "{}", String::from_utf8_lossy(&short.stderr));
    let done = reset("a brand new admin passphrase\n");
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    // The environment's password would set it back at start: leave it out.
    s.start_again_with(&[("TALLY_AUTH_ADMIN_PASSWORD", UNSET)]);
    let c = s.client().await;
    assert_eq!(common::code(c.login("admin", ADMIN_PASSWORD).await), "unauthenticated");
    c.login("admin", "a brand new admin passphrase").await.unwrap();
    drop(old_session);
}
