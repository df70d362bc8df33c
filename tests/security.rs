//! Proves, over real TCP against the real binary, that the attacks of the
//! security review no longer work: guessing reset codes from one or many
//! addresses gets at most the user's budget of checked guesses and never
//! succeeds, while the victim keeps confirming her own transfers; a spray
//! of wrong admin passwords from one address does not lock the admin out
//! elsewhere; `reset_password` answers alike for known and unknown users
//! (and never resets an admin over the wire); refusals carry no figures of
//! other users; anonymous `hello` hides the build.

mod common;

use std::net::IpAddr;

use common::{balance, code, join_all, log_line, MailServer, Server, ADMIN_PASSWORD};
use serde_json::{json, Value};
use tally::client::Client;

const PW: &str = "correct horse battery";

fn from(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

fn site(extra: &[(&str, &str)]) -> MailServer {
    MailServer::start(extra)
}

async fn signup(s: &Server, user: &str) {
    let args = json!({"user": user, "name": user, "email": format!("{user}@example.org"), "password": PW});
    s.client().await.call("signup", args).await.expect("signup");
}

/// Outcomes of an attacker's confirm calls.
#[derive(Default, Debug)]
struct Tally {
    /// The code was compared (and was wrong).
    checked: usize,
    /// Refused without looking at the code.
    refused: usize,
    succeeded: usize,
}

impl Tally {
    fn add(&mut self, r: Result<Value, tally::client::ClientError>) {
        match r {
            Ok(_) => self.succeeded += 1,
            Err(e) => match e.code() {
                Some("otp_invalid" | "otp_exhausted") => self.checked += 1,
                Some("rate_limited" | "not_found") => self.refused += 1,
                other => panic!("unexpected answer {other:?}: {e}"),
            },
        }
    }
}

/// Six digits that are not `code`.
fn guesses_avoiding(code: Option<&str>, n: usize) -> Vec<String> {
    (0..1_000_000u32).map(|g| format!("{g:06}")).filter(|g| Some(g.as_str()) != code).take(n).collect()
}

/// Asks for a reset of `user`; `None` when refused (`rate_limited`).
async fn ask_reset(c: &Client, user: &str) -> Option<String> {
    match c.call("reset_password", json!({ "user": user })).await {
        Ok(r) => Some(r["pending"].as_str().unwrap().to_owned()),
        Err(e) => {
            assert_eq!(e.code(), Some("rate_limited"), "{e}");
            None
        }
    }
}

/// The attack from the review: `guesses` wrong codes pipelined against a
/// reset session.
async fn guess(c: &Client, pending: &str, guesses: &[String], tally: &mut Tally) {
    let calls: Vec<_> = guesses
        .iter()
        .map(|g| {
            Box::pin(
                c.call("confirm", json!({"pending": pending, "otp": g, "new_password": "the attacker's password"})),
            )
        })
        .collect();
    for r in join_all(calls).await {
        tally.add(r);
    }
}

#[tokio::test]
async fn guessing_reset_codes_from_one_address_gets_the_budget_and_never_succeeds() {
    let mut t = site(&[]);
    signup(&t.s, "vic").await;
    let victim = t.s.client().await;
    victim.login("vic", PW).await.unwrap();
    t.s.admin().await.call("mint", json!({"to": "vic", "amount": 1000})).await.unwrap();
    signup(&t.s, "shop").await;

    let attacker = Client::connect_from(from(2), t.s.addr).await.unwrap();
    let mut tally = Tally::default();
    let mut codes = Vec::new();
    for round in 0..6 {
        if let Some(pending) = ask_reset(&attacker, "vic").await {
            // The real code is read from the victim's mail only so that no
            // guess is right by luck; the attacker never sends it.
            let real = t.mail.next().1;
            guess(&attacker, &pending, &guesses_avoiding(Some(&real), 5), &mut tally).await;
            codes.push(real);
        }
        // Meanwhile the victim confirms her own transfer: the attacker's
        // failures are not hers.
        if round == 2 {
            let r = victim.call("transfer", json!({"to": "shop", "amount": 100})).await.unwrap();
            let (_, otp, _) = t.mail.next();
            let done = victim.call("confirm", json!({"pending": r["pending"], "otp": otp})).await.unwrap();
            assert_eq!(done["from_balance"], 900);
        }
    }
    assert_eq!(tally.succeeded, 0, "{tally:?}");
    assert_eq!(tally.checked, 5, "only the budget is checked: {tally:?}");
    assert_eq!(tally.refused, 3 * 5 - 5, "{tally:?}");
    assert_eq!(codes.len(), 3, "three resets an hour per user");
    // The victim's password still works, and only her transfer moved.
    assert_eq!(balance(&victim, "vic").await, 900);
    Client::connect_from(from(3), t.s.addr).await.unwrap().login("vic", PW).await.unwrap();
}

#[tokio::test]
async fn guessing_from_many_addresses_shares_one_budget_per_user() {
    let mut t = site(&[]);
    signup(&t.s, "vic").await;
    let mut tally = Tally::default();
    let mut sessions = Vec::new();
    for n in 2..10 {
        let c = Client::connect_from(from(n), t.s.addr).await.unwrap();
        if let Some(pending) = ask_reset(&c, "vic").await {
            let real = t.mail.next().1;
            guess(&c, &pending, &guesses_avoiding(Some(&real), 5), &mut tally).await;
            sessions.push(pending);
        }
        // Resetting someone else from the same address still works: the
        // limits are the victim's, not the address's.
        let other = format!("other{n}");
        signup(&t.s, &other).await;
        c.call("reset_password", json!({ "user": other })).await.unwrap();
        t.mail.next();
    }
    assert_eq!(sessions.len(), 3, "three resets an hour per user, whatever the addresses");
    assert_eq!((tally.succeeded, tally.checked), (0, 5), "{tally:?}");
    Client::connect_from(from(20), t.s.addr).await.unwrap().login("vic", PW).await.unwrap();
}

#[tokio::test]
async fn a_spray_of_wrong_admin_passwords_does_not_lock_the_admin_out() {
    let s = Server::start();
    let sprayer = Client::connect_from(from(2), s.addr).await.unwrap();
    let admin = Client::connect_from(from(1), s.addr).await.unwrap();
    let mut answers = std::collections::BTreeMap::new();
    for i in 0..40 {
        let e = sprayer.login("admin", &format!("guess number {i}")).await.unwrap_err();
        *answers.entry(e.code().unwrap().to_owned()).or_insert(0) += 1;
        if i == 20 {
            // The admin, from another address, in the middle of the spray.
            let r = admin.login("admin", ADMIN_PASSWORD).await.unwrap();
            assert_eq!(r["role"], "admin");
        }
    }
    assert_eq!(answers.get("unauthenticated"), Some(&5), "{answers:?}");
    assert_eq!(answers.get("rate_limited"), Some(&35), "{answers:?}");
    assert_eq!(admin.call("whoami", json!({})).await.unwrap()["user"], "admin");
    assert_eq!(code(sprayer.login("admin", ADMIN_PASSWORD).await), "rate_limited");
}

#[tokio::test]
async fn reset_password_answers_alike_for_known_unknown_and_admin_users() {
    let mut t = site(&[]);
    signup(&t.s, "alice").await;
    let mut shapes = Vec::new();
    let mut askers = Vec::new();
    for (n, user) in [(2, "alice"), (3, "nobody"), (4, "admin")] {
        let anon = Client::connect_from(from(n), t.s.addr).await.unwrap();
        let r = anon.call("reset_password", json!({ "user": user })).await.unwrap();
        let keys: Vec<String> = r.as_object().unwrap().keys().cloned().collect();
        let pending = r["pending"].as_str().unwrap();
        shapes.push((keys, pending.len(), r["expires_at"].as_u64().is_some()));
        // Only alice gets a mail: nobody has no address, and an admin's
        // password is never reset over the wire.
        let guess = if user == "alice" {
            let (subject, real, text) = t.mail.next();
            assert_eq!(subject, "Tally: reset your password");
            assert!(text.contains("To: alice@example.org"), "{text}");
            guesses_avoiding(Some(&real), 1).remove(0)
        } else {
            "000000".to_owned()
        };
        // Wrong codes are answered the same way too.
        let e = anon
            .call("confirm", json!({"pending": pending, "otp": guess, "new_password": "whatever it is"}))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "otp_invalid: wrong code; 4 tries left", "{user}");
        askers.push((anon, user));
    }
    assert!(shapes.windows(2).all(|w| w[0] == w[1]), "{shapes:?}");
    // The limits do not tell them apart either: three an hour each.
    for (anon, user) in &askers {
        for _ in 0..2 {
            anon.call("reset_password", json!({ "user": user })).await.unwrap();
        }
        let e = anon.call("reset_password", json!({ "user": user })).await.unwrap_err();
        assert_eq!(e.code(), Some("rate_limited"), "{user}");
    }
    // A reset answers before its mail goes out: wait for alice's two more.
    t.mail.next();
    t.mail.next();
    assert_eq!(t.mail.count(), 3, "alice's three mails only");
}

#[tokio::test]
async fn anonymous_hello_says_the_protocol_not_the_build() {
    let s = Server::start();
    let anon = s.client().await.call("hello", json!({})).await.unwrap();
    assert_eq!(anon, json!({"server": "tally", "protocol": 1}));
    let admin = s.admin().await.call("hello", json!({})).await.unwrap();
    assert_eq!(admin["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn a_users_transfer_refused_for_the_receivers_cap_states_no_balance() {
    let mut t = site(&[("TALLY_LIMITS_MAX_BALANCE", "1000")]);
    for u in ["payer", "rich"] {
        signup(&t.s, u).await;
    }
    let admin = t.s.admin().await;
    admin.call("mint", json!({"to": "payer", "amount": 500})).await.unwrap();
    admin.call("mint", json!({"to": "rich", "amount": 987})).await.unwrap();
    let payer = t.s.client().await;
    payer.login("payer", PW).await.unwrap();
    // Below the code threshold: refused at commit, no figures of rich's.
    let e = payer.call("transfer", json!({"to": "rich", "amount": 14})).await.unwrap_err();
    assert_eq!(e.code(), Some("above_max"));
    assert!(!e.to_string().contains("987") && !e.to_string().contains("13"), "{e}");
    // At the threshold: the code comes first, for every amount alike, so
    // no probe is free.
    let r = payer.call("transfer", json!({"to": "rich", "amount": 100})).await.unwrap();
    assert_eq!(r["delivered"], true);
    let (_, otp, _) = t.mail.next();
    let e = payer.call("confirm", json!({"pending": r["pending"], "otp": otp})).await.unwrap_err();
    assert_eq!(e.code(), Some("above_max"));
    assert_eq!(balance(&admin, "payer").await, 500);
}

/// Waits until the server's log has a line containing every one of `parts`.
#[tokio::test]
async fn security_events_are_logged_with_who_and_where_and_never_a_secret() {
    let mut t = site(&[("TALLY_LOG", "info")]);
    signup(&t.s, "eve").await;
    let stranger = Client::connect_from(from(7), t.s.addr).await.unwrap();
    assert_eq!(code(stranger.login("eve", "not her password").await), "unauthenticated");
    let r = stranger.call("reset_password", json!({"user": "eve"})).await.unwrap();
    let (_, real, _) = t.mail.next();
    let wrong = guesses_avoiding(Some(&real), 1).remove(0);
    let args = json!({"pending": r["pending"], "otp": wrong, "new_password": "stolen password"});
    assert_eq!(code(stranger.call("confirm", args).await), "otp_invalid");
    let admin = t.s.admin().await;
    admin.call("mint", json!({"to": "eve", "amount": 5, "memo": "prize"})).await.unwrap();
    admin.call("set_events", json!({"user": "eve", "events": 3})).await.unwrap();

    log_line(&t.s, &["security", "signup", "user=eve", "source=127.0.0.1"]);
    log_line(&t.s, &["WARN", "security", "login failed", "user=eve", "source=127.0.0.7"]);
    log_line(&t.s, &["INFO", "security", "password reset asked for", "user=eve", "source=127.0.0.7", "decoy=false"]);
    log_line(&t.s, &["WARN", "security", "code refused", "source=127.0.0.7", "code=\"otp_invalid\""]);
    log_line(&t.s, &["INFO", "security", "logged in", "user=admin"]);
    let mint = log_line(&t.s, &["INFO", "security", "staff action", "by=admin", "role=\"admin\"", "op=\"mint\""]);
    assert!(mint.contains(r#"args={"amount":5,"memo":"prize","to":"eve"}"#), "{mint}");
    log_line(&t.s, &["staff action", "op=\"set_events\"", r#""events":3"#]);
    let log = std::fs::read_to_string(common::log_path(&t.s)).unwrap();
    for secret in [PW, "not her password", "stolen password", real.as_str(), ADMIN_PASSWORD] {
        assert!(!log.contains(secret), "{secret:?} is in the log");
    }
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
}

#[tokio::test]
async fn mail_files_are_private_and_named_by_time() {
    let mut t = site(&[]);
    signup(&t.s, "ann").await;
    t.s.client().await.call("reset_password", json!({"user": "ann"})).await.unwrap();
    t.mail.next();
    let files: Vec<_> = std::fs::read_dir(&t.mail_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap().to_owned();
    // 20261201T131642.123Z-1a2b3c4d.eml
    assert_eq!((name.len(), &name[8..9], &name[15..16], &name[19..21], &name[29..]), (33, "T", ".", "Z-", ".eml"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777, 0o600);
}
