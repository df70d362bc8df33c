//! Proves the OTP supervisor survives the death of its child, the mailer:
//! the server runs in this process (so the test can reach the actor and
//! kill the child), clients talk to it over real TCP, and sessions opened
//! before the kill are confirmed after it, with mail from the new mailer.

mod common;

use std::time::{Duration, Instant};

use ractor::ActorStatus;
use serde_json::json;
use tally::client::Client;
use tally::config::{Config, Overrides};

const PW: &str = "correct horse battery";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_killing_the_mailer() {
    let dir = tempfile::tempdir().unwrap();
    let mail = dir.path().join("mail");
    let env = [
        ("TALLY_AUTH_ADMIN_PASSWORD".to_owned(), "admin-password".to_owned()),
        ("TALLY_MAIL_TRANSPORT".to_owned(), format!("file://{}", mail.display())),
        ("TALLY_OTP_TRANSFER_MIN".to_owned(), "1".to_owned()),
    ];
    let overrides = Overrides { listen: Some("127.0.0.1:0".into()), data: Some(dir.path().join("data")), preset: None };
    let config = Config::load(None, env, &overrides).unwrap();
    let running = tally::server::start(config).await.unwrap();
    let supervisor = running.ctx.otp.clone();

    let anon = Client::connect(running.addr.unwrap()).await.unwrap();
    for user in ["alice", "bob"] {
        let args = json!({"user": user, "name": user, "email": format!("{user}@campus.example"), "password": PW});
        anon.call("signup", args).await.unwrap();
    }
    let admin = Client::connect(running.addr.unwrap()).await.unwrap();
    admin.login("admin", "admin-password").await.unwrap();
    admin.call("mint", json!({"to": "alice", "amount": 100})).await.unwrap();
    let alice = Client::connect(running.addr.unwrap()).await.unwrap();
    alice.login("alice", PW).await.unwrap();
    let mut inbox = common::Inbox::new(mail.clone());

    // A session opened before the kill.
    let before = alice.call("transfer", json!({"to": "bob", "amount": 10})).await.unwrap();
    let before_code = inbox.next().1;

    for round in 0..3 {
        let children = supervisor.get_children();
        assert_eq!(children.len(), 1, "the mailer is the supervisor's only child");
        let killed = children[0].get_id();
        children[0].kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = supervisor.get_children();
            if now.len() == 1 && now[0].get_id() != killed {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: no new mailer");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(supervisor.get_status(), ActorStatus::Running);
        // A new session gets its mail from the new mailer and confirms.
        let r = alice.call("transfer", json!({"to": "bob", "amount": 1})).await.unwrap();
        assert_eq!(r["delivered"], true, "{r}");
        let otp = inbox.next().1;
        let t = alice.call("confirm", json!({"pending": r["pending"], "otp": otp})).await.unwrap();
        assert_eq!(t["amount"], 1);
    }

    // The session from before the kills is still there and works.
    let t = alice.call("confirm", json!({"pending": before["pending"], "otp": before_code})).await.unwrap();
    assert_eq!(t["amount"], 10);
    assert_eq!(alice.call("balance", json!({})).await.unwrap()["balance"], 87);
    assert_eq!(admin.call("balance", json!({"account": "bob"})).await.unwrap()["balance"], 13);
    let audit = admin.call("audit", json!({})).await.unwrap();
    assert_eq!((audit["sum"].as_i64(), audit["chain_ok"].as_bool()), (Some(0), Some(true)));
    running.shutdown(Duration::from_secs(5)).await;
}
