//! Proves the OTP rules over real TCP against the real binary, with codes
//! read from the mails lettre delivered (file transport, and once through
//! SMTP to a real SMTP server): nothing moves before the code, wrong codes,
//! burnt sessions, expiry, resend limits, single use, who may confirm,
//! password reset; and that the OTP supervisor survives killing its mailer.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{balance, code, Inbox, MailServer, Server};
use serde_json::{json, Value};
use tally::client::Client;

const PW: &str = "correct horse battery";
const NEW_PW: &str = "a brand new passphrase";

/// A different six-digit code.
fn wrong(code: &str) -> String {
    let n: u32 = code.parse().unwrap();
    format!("{:06}", (n + 1) % 1_000_000)
}

/// A server whose user transfers of 100 or more need a code, with alice
/// (1,000), bob and carol (0) signed up.
async fn campus(extra: &[(&str, &str)]) -> MailServer {
    let t = MailServer::start(extra);
    for user in ["alice", "bob", "carol"] {
        signup(&t.s, user).await;
    }
    let admin = t.s.admin().await;
    admin.call("mint", json!({"to": "alice", "amount": 1000})).await.unwrap();
    t
}

async fn signup(s: &Server, user: &str) {
    let c = s.client().await;
    c.call("signup", json!({"user": user, "name": user, "email": format!("{user}@campus.example"), "password": PW}))
        .await
        .expect("signup");
}

async fn login(s: &Server, user: &str) -> Client {
    let c = s.client().await;
    c.login(user, PW).await.expect("login");
    c
}

/// Asks for a transfer that needs a code; returns the session id.
async fn pending_transfer(c: &Client, to: &str, amount: i64) -> String {
    let r = c.call("transfer", json!({"to": to, "amount": amount, "memo": "books"})).await.unwrap();
    assert_eq!(r["delivered"], true, "{r}");
    r["pending"].as_str().expect("a pending session").to_owned()
}

async fn confirm(c: &Client, pending: &str, otp: &str) -> Result<Value, tally::client::ClientError> {
    c.call("confirm", json!({"pending": pending, "otp": otp})).await
}

#[tokio::test]
async fn a_transfer_waits_for_its_code_and_moves_only_once() {
    let mut t = campus(&[]).await;
    let alice = login(&t.s, "alice").await;
    let r = alice.call("transfer", json!({"to": "bob", "amount": 150, "memo": "books"})).await.unwrap();
    let pending = r["pending"].as_str().unwrap().to_owned();
    let before = r["expires_at"].as_u64().unwrap();
    assert!(before > 0 && r["delivered"] == true, "{r}");
    let (subject, otp, text) = t.mail.next();
    assert_eq!(subject, "Tally: confirm your transfer of 150 to bob");
    assert!(text.contains("To: alice@campus.example"), "{text}");
    assert!(text.contains("expires at"), "{text}");
    // Nothing moved, nothing reserved.
    assert_eq!(balance(&alice, "alice").await, 1000);
    assert_eq!(alice.call("balance", json!({})).await.unwrap()["available"], 1000);
    assert_eq!(balance(&t.s.admin().await, "bob").await, 0);

    let done = confirm(&alice, &pending, &otp).await.unwrap();
    assert_eq!(
        (done["from"].as_str(), done["to"].as_str(), done["amount"].as_i64()),
        (Some("alice"), Some("bob"), Some(150))
    );
    assert_eq!(done["memo"], "books");
    assert_eq!(balance(&alice, "alice").await, 850);
    // A code works once.
    assert_eq!(code(confirm(&alice, &pending, &otp).await), "not_found");
    assert_eq!(balance(&alice, "alice").await, 850);
    // Below otp.transfer_min no code is needed.
    let small = alice.call("transfer", json!({"to": "bob", "amount": 99})).await.unwrap();
    assert_eq!(small["amount"], 99);
    assert_eq!(t.mail.count(), 1);
    // Admins are not asked for codes.
    let admin = t.s.admin().await;
    let r = admin.call("transfer", json!({"from": "alice", "to": "bob", "amount": 100})).await.unwrap();
    assert_eq!(r["amount"], 100);
    assert_eq!(balance(&admin, "bob").await, 349);
    common::audit_ok(&admin).await;
}

#[tokio::test]
async fn wrong_codes_count_and_the_fifth_burns_the_session() {
    let mut t = campus(&[]).await;
    let alice = login(&t.s, "alice").await;
    let pending = pending_transfer(&alice, "bob", 200).await;
    let (_, otp, _) = t.mail.next();
    for _ in 0..4 {
        assert_eq!(code(confirm(&alice, &pending, &wrong(&otp)).await), "otp_invalid");
    }
    assert_eq!(code(confirm(&alice, &pending, &wrong(&otp)).await), "otp_exhausted");
    // Gone: even the right code does nothing now.
    assert_eq!(code(confirm(&alice, &pending, &otp).await), "not_found");
    // The five wrong codes were also alice's budget: a new session does not
    // refill it, and for a minute no code of hers is even looked at.
    let p2 = pending_transfer(&alice, "bob", 200).await;
    let (_, otp2, _) = t.mail.next();
    let e = confirm(&alice, &p2, &otp2).await.unwrap_err();
    assert_eq!(e.code(), Some("rate_limited"));
    assert!(e.to_string().contains("too many wrong codes for this user"), "{e}");
    assert_eq!(balance(&alice, "alice").await, 1000);
    // Malformed codes are refused before they count as a try; four wrong
    // ones and the right one still works (bob's budget is his own).
    let admin = t.s.admin().await;
    admin.call("mint", json!({"to": "bob", "amount": 500})).await.unwrap();
    let bob = login(&t.s, "bob").await;
    let p3 = pending_transfer(&bob, "carol", 200).await;
    let (_, otp3, _) = t.mail.next();
    for bad in [json!("12345"), json!("1234567"), json!("12a456"), json!(1_000_000), json!(-1)] {
        let r = bob.call("confirm", json!({"pending": p3, "otp": bad})).await;
        assert_eq!(code(r), "bad_request", "{bad}");
    }
    for _ in 0..4 {
        assert_eq!(code(confirm(&bob, &p3, &wrong(&otp3)).await), "otp_invalid");
    }
    confirm(&bob, &p3, &otp3).await.unwrap();
    assert_eq!(balance(&bob, "bob").await, 300);
}

#[tokio::test]
async fn an_expired_code_does_nothing() {
    let mut t = campus(&[("TALLY_OTP_TTL_S", "1")]).await;
    let alice = login(&t.s, "alice").await;
    let r = alice.call("transfer", json!({"to": "bob", "amount": 300})).await.unwrap();
    let (pending, expires_at) = (r["pending"].as_str().unwrap().to_owned(), r["expires_at"].as_u64().unwrap());
    let (_, otp, text) = t.mail.next();
    assert!(text.contains("(in 1 seconds)"), "{text}");
    common::wait_past(expires_at).await;
    let e = confirm(&alice, &pending, &otp).await;
    // Either the request saw it expire, or the supervisor's timer already dropped it.
    let c = code(e);
    assert!(c == "otp_expired" || c == "not_found", "{c}");
    // The timer drops sessions nobody asks about (stats counts them).
    let p2 = pending_transfer(&alice, "bob", 300).await;
    let (_, otp2, _) = t.mail.next();
    let admin = t.s.admin().await;
    assert_eq!(admin.call("stats", json!({})).await.unwrap()["otp_sessions"], 1);
    common::eventually(Duration::from_secs(10), "the expired session dropped", || async {
        admin.call("stats", json!({})).await.unwrap()["otp_sessions"] == 0
    })
    .await;
    assert_eq!(code(confirm(&alice, &p2, &otp2).await), "not_found");
    assert_eq!(balance(&alice, "alice").await, 1000);
}

#[tokio::test]
async fn resend_kills_the_old_code_and_the_fourth_is_refused() {
    let mut t = campus(&[]).await;
    let alice = login(&t.s, "alice").await;
    let pending = pending_transfer(&alice, "bob", 100).await;
    let (_, mut otp, _) = t.mail.next();
    for _ in 0..3 {
        let r = alice.call("resend", json!({"pending": pending})).await.unwrap();
        assert_eq!((r["pending"].as_str(), r["delivered"].as_bool()), (Some(pending.as_str()), Some(true)));
        let (subject, new, _) = t.mail.next();
        assert_eq!(subject, "Tally: confirm your transfer of 100 to bob");
        if new != otp {
            assert_eq!(code(confirm(&alice, &pending, &otp).await), "otp_invalid");
        }
        otp = new;
    }
    assert_eq!(code(alice.call("resend", json!({"pending": pending})).await), "rate_limited");
    assert_eq!(t.mail.count(), 4);
    confirm(&alice, &pending, &otp).await.unwrap();
    assert_eq!(balance(&alice, "alice").await, 900);
}

#[tokio::test]
async fn only_the_sessions_user_can_confirm_or_resend() {
    let mut t = campus(&[]).await;
    let alice = login(&t.s, "alice").await;
    let carol = login(&t.s, "carol").await;
    let anon = t.s.client().await;
    let pending = pending_transfer(&alice, "bob", 500).await;
    let (_, otp, _) = t.mail.next();
    assert_eq!(code(confirm(&carol, &pending, &otp).await), "forbidden");
    assert_eq!(code(carol.call("resend", json!({"pending": pending})).await), "forbidden");
    assert_eq!(code(confirm(&anon, &pending, &otp).await), "unauthenticated");
    assert_eq!(code(confirm(&alice, "otp-0000", &otp).await), "not_found");
    assert_eq!(balance(&alice, "alice").await, 1000);
    // Those attempts used none of alice's tries.
    for _ in 0..4 {
        assert_eq!(code(confirm(&alice, &pending, &wrong(&otp)).await), "otp_invalid");
    }
    confirm(&alice, &pending, &otp).await.unwrap();
    assert_eq!(balance(&alice, "alice").await, 500);
}

#[tokio::test]
async fn the_transfer_is_checked_when_asked_and_again_when_confirmed() {
    let mut t = campus(&[]).await;
    let alice = login(&t.s, "alice").await;
    let carol = login(&t.s, "carol").await;
    // Refused at once, and no mail goes out.
    assert_eq!(code(alice.call("transfer", json!({"to": "bob", "amount": 1001})).await), "insufficient_funds");
    assert_eq!(code(alice.call("transfer", json!({"to": "nobody", "amount": 100})).await), "not_found");
    assert_eq!(code(carol.call("transfer", json!({"from": "alice", "to": "carol", "amount": 100})).await), "forbidden");
    assert_eq!(t.mail.count(), 0);
    // Valid when asked, not any more when confirmed.
    let pending = pending_transfer(&alice, "bob", 700).await;
    let (_, otp, _) = t.mail.next();
    alice.call("transfer", json!({"to": "carol", "amount": 99})).await.unwrap();
    t.s.admin().await.call("transfer", json!({"from": "alice", "to": "carol", "amount": 300})).await.unwrap();
    assert_eq!(code(confirm(&alice, &pending, &otp).await), "insufficient_funds");
    assert_eq!(balance(&alice, "alice").await, 601);
    assert_eq!(balance(&carol, "carol").await, 399);
    common::audit_ok(&t.s.admin().await).await;
}

#[tokio::test]
async fn a_password_is_reset_by_code() {
    let mut t = campus(&[("TALLY_LOG", "debug")]).await;
    let old_session = login(&t.s, "alice").await;
    let anon = t.s.client().await;
    // An unknown user gets the same answer as a known one (no mail goes out).
    let nobody = anon.call("reset_password", json!({"user": "nobody"})).await.unwrap();
    let r = anon.call("reset_password", json!({"user": "alice"})).await.unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&nobody), keys(&r));
    assert_eq!(keys(&r), ["expires_at", "pending"]);
    let pending = r["pending"].as_str().unwrap().to_owned();
    let (subject, otp, text) = t.mail.next();
    assert_eq!(subject, "Tally: reset your password");
    assert!(text.contains("To: alice@campus.example"), "{text}");
    // The new password is checked before the code, and costs no try.
    let weak = anon.call("confirm", json!({"pending": pending, "otp": otp, "new_password": "short"})).await;
    assert_eq!(code(weak), "bad_request");
    assert_eq!(code(anon.call("confirm", json!({"pending": pending, "otp": otp})).await), "bad_request");
    let wrong_code = anon.call("confirm", json!({"pending": pending, "otp": wrong(&otp), "new_password": NEW_PW}));
    assert_eq!(code(wrong_code.await), "otp_invalid");
    let done = anon.call("confirm", json!({"pending": pending, "otp": otp, "new_password": NEW_PW})).await.unwrap();
    assert_eq!(done, json!({"user": "alice", "password_reset": true}));

    let c = t.s.client().await;
    assert_eq!(code(c.login("alice", PW).await), "unauthenticated");
    c.login("alice", NEW_PW).await.unwrap();
    // The session opened with the old password was revoked.
    assert_eq!(code(old_session.call("whoami", json!({})).await), "unauthenticated");
    assert_not_logged(&t.s, &otp);
    assert_not_logged(&t.s, NEW_PW);
}

/// The SMTP server from the `aiosmtpd` package, writing a Maildir.
struct SmtpServer {
    child: Child,
    port: u16,
    maildir: PathBuf,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python that has `aiosmtpd` (tests/run-all.sh installs it in its venv).
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TALLY_TEST_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py-venv/bin/python");
    if venv.exists() {
        return venv;
    }
    "python3".into()
}

fn smtp_server(dir: &Path) -> SmtpServer {
    let python = python();
    let probe = Command::new(&python).args(["-c", "import aiosmtpd"]).status().expect("run python");
    assert!(
        probe.success(),
        "{} has no aiosmtpd: run tests/run-all.sh, or pip install aiosmtpd and set TALLY_TEST_PYTHON",
        python.display()
    );
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // aiosmtpd's Mailbox creates the Maildir; it must not exist yet.
    let maildir = dir.join("maildir");
    let child = Command::new(&python)
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
        .arg(&maildir)
        .stdout(Stdio::null())
        .spawn()
        .expect("start aiosmtpd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "aiosmtpd did not start on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    SmtpServer { child, port, maildir }
}

#[tokio::test]
async fn the_code_travels_through_a_real_smtp_server() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = smtp_server(dir.path());
    let transport = format!("smtp://127.0.0.1:{}", smtp.port);
    let s = Server::start_with(&[
        ("TALLY_MAIL_TRANSPORT", &transport),
        ("TALLY_OTP_TRANSFER_MIN", "1"),
        ("TALLY_LOG", "debug"),
    ]);
    signup(&s, "alice").await;
    signup(&s, "bob").await;
    s.admin().await.call("mint", json!({"to": "alice", "amount": 50})).await.unwrap();
    let alice = login(&s, "alice").await;
    let pending = pending_transfer(&alice, "bob", 20).await;
    let mut inbox = Inbox::new(smtp.maildir.join("new"));
    let (subject, otp, text) = inbox.next();
    assert_eq!(subject, "Tally: confirm your transfer of 20 to bob");
    assert!(text.contains("To: alice@campus.example"), "{text}");
    assert!(text.contains("From: Tally <noreply@localhost>"), "{text}");
    confirm(&alice, &pending, &otp).await.unwrap();
    assert_eq!(balance(&alice, "alice").await, 30);
    assert_eq!(balance(&s.admin().await, "bob").await, 20);

    // With the relay gone, the reply says the code was not delivered.
    drop(smtp);
    let r = alice.call("transfer", json!({"to": "bob", "amount": 5})).await.unwrap();
    assert_eq!(r["delivered"], false, "{r}");
    assert!(r["mail_error"].as_str().unwrap().contains("attempt"), "{r}");
    assert_eq!(balance(&alice, "alice").await, 30);
    assert_not_logged(&s, &otp);
}

/// A reset's answer goes out before its mail, so a SIGTERM can come while
/// the mail is on its way: the stop waits (within its grace) for the
/// mailer to hand it to the relay. Before, the stop went on, the process's
/// end cancelled the mailer, and the code never left. The relay here is a
/// real aiosmtpd behind a gate that lets the server's connection through
/// only once the stop has begun and said it waits.
#[tokio::test]
async fn a_stop_right_after_a_reset_still_delivers_its_mail() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = smtp_server(dir.path());
    let (transport, open) = gate(smtp.port).await;
    let s = stopped_while_mailing(&transport).await;
    open.send(true).unwrap();
    let (_s, status, _) = exit_of(s).await;
    assert_eq!(status.map(|s| s.code()), Some(Some(0)));
    let (subject, _, text) = Inbox::new(smtp.maildir.join("new")).next();
    assert_eq!(subject, "Tally: reset your password");
    assert!(text.contains("To: alice@campus.example"), "{text}");
}

/// A relay that never answers: the stop gives the mail the rest of its
/// grace, then drops it, and the journal still has its own time to stop,
/// so the database file is closed. (Sharing one deadline left the journal
/// none, and the process took the slow exit with the file open.)
#[tokio::test]
async fn a_stop_whose_mail_cannot_leave_still_closes_the_database() {
    let (transport, _never) = gate(0).await;
    let s = stopped_while_mailing(&transport).await;
    let (_s, status, log) = exit_of(s).await;
    assert_eq!(status.map(|s| s.code()), Some(Some(0)));
    let gave_up = log.find("shutdown grace ran out with mails not yet delivered").expect(&log);
    let closed = log.find("database closed").expect(&log);
    assert!(gave_up < closed, "{log}");
}

/// A TCP gate in front of the relay on `relay`: it takes connections and
/// lets them through only once `true` is sent. The transport to set.
async fn gate(relay: u16) -> (String, tokio::sync::watch::Sender<bool>) {
    let gate = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let transport = format!("smtp://{}", gate.local_addr().unwrap());
    let (open, opened) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = gate.accept().await {
            let mut opened = opened.clone();
            tokio::spawn(async move {
                if opened.wait_for(|open| *open).await.is_ok() {
                    let mut upstream = tokio::net::TcpStream::connect(("127.0.0.1", relay)).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                }
            });
        }
    });
    (transport, open)
}

/// A server mailing through `transport` that got a reset for alice, then
/// SIGTERM, and has said that its stop waits for that one mail.
async fn stopped_while_mailing(transport: &str) -> Server {
    let s = Server::start_with(&[("TALLY_MAIL_TRANSPORT", transport), ("TALLY_LOG", "info")]);
    signup(&s, "alice").await;
    let r = s.client().await.call("reset_password", json!({"user": "alice"})).await.unwrap();
    assert!(r["pending"].is_string(), "{r}");
    s.send_sigterm();
    // Nothing of this runtime needs to run meanwhile: the gate holds the
    // mailer's connection until it is told.
    let waiting = common::log_line(&s, &["waiting for the mails queued"]);
    assert!(waiting.contains("mails=1"), "{waiting}");
    s
}

/// Waits (off the runtime, which the gate runs on) for the server to
/// exit; its status and its log.
async fn exit_of(mut s: Server) -> (Server, Option<std::process::ExitStatus>, String) {
    tokio::task::spawn_blocking(move || {
        let status = s.wait_exit(Duration::from_secs(40));
        let log = std::fs::read_to_string(common::log_path(&s)).unwrap_or_default();
        (s, status, log)
    })
    .await
    .unwrap()
}

/// Fails if `secret` is in the server's log (timestamps aside: they are digits too).
fn assert_not_logged(s: &Server, secret: &str) {
    let log = std::fs::read_to_string(common::log_path(s)).expect("the server log");
    assert!(log.lines().count() > 3, "the log is too short to mean anything: {log}");
    for line in log.lines() {
        let rest = line.split_once(' ').map_or(line, |(_, rest)| rest);
        assert!(!rest.contains(secret), "secret in the log: {line}");
    }
}

#[tokio::test]
async fn the_log_transport_notes_the_mail_but_never_the_code() {
    let s =
        Server::start_with(&[("TALLY_MAIL_TRANSPORT", "log"), ("TALLY_OTP_TRANSFER_MIN", "1"), ("TALLY_LOG", "info")]);
    signup(&s, "alice").await;
    signup(&s, "bob").await;
    s.admin().await.call("mint", json!({"to": "alice", "amount": 5})).await.unwrap();
    let alice = login(&s, "alice").await;
    pending_transfer(&alice, "bob", 5).await;
    let log = std::fs::read_to_string(common::log_path(&s)).unwrap();
    assert!(log.contains("mail sent to the log transport"), "{log}");
    assert!(!log.contains("code is"), "{log}");
    assert_eq!(balance(&alice, "alice").await, 5);
}
