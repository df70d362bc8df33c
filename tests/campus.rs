//! Proves the campus-coin rules over real TCP with `--preset campus`: fees
//! by group to `@treasury`, eligibility of sender and receiver (events
//! counted from mints, or set by an admin), the balance cap for transfers
//! and mints, no payments to admins, every user transfer confirmed by a
//! mailed code, and `audit` at 0 throughout.

mod common;

use common::{balance, code, Inbox, Server};
use serde_json::{json, Value};
use tally::client::Client;

const PW: &str = "correct horse battery";

struct Campus {
    s: Server,
    mail: Inbox,
    admin: Client,
    _dir: tempfile::TempDir,
}

impl Campus {
    async fn start() -> Campus {
        let dir = tempfile::tempdir().unwrap();
        let mail = dir.path().join("mail");
        let transport = format!("file://{}", mail.display());
        let s = Server::start_with(&[("TALLY_PRESET", "campus"), ("TALLY_MAIL_TRANSPORT", &transport)]);
        let admin = s.admin().await;
        Campus { s, mail: Inbox::new(mail), admin, _dir: dir }
    }

    async fn user(&self, user: &str, group: &str, events: u64) -> Client {
        let c = self.s.client().await;
        let args = json!({"user": user, "name": user, "email": format!("{user}@campus.example"), "password": PW, "group": group});
        c.call("signup", args).await.unwrap();
        if events > 0 {
            let u = self.admin.call("set_events", json!({"user": user, "events": events})).await.unwrap();
            assert_eq!(u["events"], events);
        }
        c.login(user, PW).await.unwrap();
        c
    }

    fn mails(&self) -> usize {
        self.mail.count()
    }

    fn next_code(&mut self) -> String {
        self.mail.next().1
    }

    /// A user transfer: every one needs a code under the campus preset.
    async fn transfer(&mut self, c: &Client, to: &str, amount: i64) -> Result<Value, tally::client::ClientError> {
        let r = c.call("transfer", json!({"to": to, "amount": amount})).await?;
        assert_eq!(r["delivered"], true, "every campus transfer waits for a code: {r}");
        let otp = self.next_code();
        c.call("confirm", json!({"pending": r["pending"], "otp": otp})).await
    }
}

#[tokio::test]
async fn fees_go_to_the_treasury_by_group() {
    let mut t = Campus::start().await;
    let a1 = t.user("a1", "Y19", 0).await;
    let _a2 = t.user("a2", "Y19", 6).await;
    let _b1 = t.user("b1", "Y20", 6).await;
    // Six rewards make a1 eligible: events count mints.
    for _ in 0..6 {
        t.admin.call("mint", json!({"to": "a1", "amount": 100})).await.unwrap();
    }
    assert_eq!(a1.call("whoami", json!({})).await.unwrap()["events"], 6);

    let same = t.transfer(&a1, "a2", 100).await.unwrap();
    assert_eq!((same["amount"].as_i64(), same["fee"].as_i64()), (Some(100), Some(2)));
    let cross = t.transfer(&a1, "b1", 100).await.unwrap();
    assert_eq!((cross["amount"].as_i64(), cross["fee"].as_i64()), (Some(100), Some(33)));
    assert_eq!(balance(&t.admin, "a1").await, 400);
    assert_eq!(balance(&t.admin, "a2").await, 98);
    assert_eq!(balance(&t.admin, "b1").await, 67);
    assert_eq!(balance(&t.admin, "@treasury").await, 35);
    // The fee is in the history too.
    let h = a1.call("history", json!({})).await.unwrap();
    let fees: Vec<i64> = h["transfers"].as_array().unwrap().iter().map(|t| t["fee"].as_i64().unwrap()).collect();
    assert_eq!(fees[..2], [33, 2]);
    // Admin transfers pay no fee and need no code.
    let r = t.admin.call("transfer", json!({"from": "a2", "to": "b1", "amount": 10})).await.unwrap();
    assert_eq!((r["fee"].as_i64(), balance(&t.admin, "b1").await), (Some(0), 77));
    common::audit_ok(&t.admin).await;
}

#[tokio::test]
async fn sender_and_receiver_need_six_events() {
    let mut t = Campus::start().await;
    let ok = t.user("ok", "Y19", 6).await;
    let low = t.user("low", "Y19", 5).await;
    t.admin.call("mint", json!({"to": "low", "amount": 50})).await.unwrap();
    t.admin.call("mint", json!({"to": "ok", "amount": 50})).await.unwrap();
    // The mint counted: low now has 6. Set it back to 5.
    t.admin.call("set_events", json!({"user": "low", "events": 5})).await.unwrap();
    let own = low.call("transfer", json!({"to": "ok", "amount": 10})).await.unwrap_err();
    assert_eq!(
        (own.code(), own.to_string().as_str()),
        (Some("ineligible"), "ineligible: you have attended 5 events; transfers need at least 6")
    );
    // The receiver's count is not the sender's business: no figures.
    let other = ok.call("transfer", json!({"to": "low", "amount": 10})).await.unwrap_err();
    assert_eq!(
        (other.code(), other.to_string().as_str()),
        (Some("ineligible"), "ineligible: low cannot receive transfers yet (too few events attended)")
    );
    assert_eq!(t.mails(), 0, "no code is mailed for a refused transfer");
    assert_eq!((balance(&t.admin, "ok").await, balance(&t.admin, "low").await), (50, 50));
    // Set by an admin, the count takes effect at once. (The campus fee
    // rounds up: 2% of 10 is 1.)
    t.admin.call("set_events", json!({"user": "low", "events": 6})).await.unwrap();
    t.transfer(&ok, "low", 10).await.unwrap();
    assert_eq!(balance(&t.admin, "low").await, 59);
    assert_eq!(code(t.admin.call("set_events", json!({"user": "ghost", "events": 6})).await), "not_found");
    assert_eq!(code(ok.call("set_events", json!({"user": "ok", "events": 99})).await), "forbidden");
    common::audit_ok(&t.admin).await;
}

#[tokio::test]
async fn the_cap_refuses_whole_credits_and_users_cannot_pay_admins() {
    let mut t = Campus::start().await;
    let rich = t.user("rich", "Y19", 6).await;
    let _full = t.user("full", "Y19", 6).await;
    t.admin.call("mint", json!({"to": "rich", "amount": 10001})).await.unwrap();
    t.admin.call("mint", json!({"to": "full", "amount": 10000})).await.unwrap();
    // Mint: one unit over the cap is refused, nothing moves.
    assert_eq!(code(t.admin.call("mint", json!({"to": "full", "amount": 2})).await), "above_max");
    assert_eq!(code(t.admin.call("mint", json!({"to": "rich", "amount": 1})).await), "above_max");
    // Transfer: 100 less a fee of 2 would take full to 10098. The cap is
    // checked at commit, after the code: refusing before any code would
    // let rich bisect full's balance for free.
    let err = t.transfer(&rich, "full", 100).await.unwrap_err();
    assert_eq!((err.code(), err.to_string().contains("10000")), (Some("above_max"), false), "{err}");
    assert_eq!(t.mails(), 1);
    // Up to the cap exactly is fine (2 units, fee 1: full gets 1).
    t.transfer(&rich, "full", 2).await.unwrap();
    assert_eq!((balance(&t.admin, "rich").await, balance(&t.admin, "full").await), (9999, 10001));
    assert_eq!(code(t.admin.call("transfer", json!({"from": "rich", "to": "full", "amount": 1})).await), "above_max");
    // Users cannot pay an admin's account or a system account.
    t.admin.call("create_account", json!({"account": "staff", "owner": "admin"})).await.unwrap();
    assert_eq!(code(rich.call("transfer", json!({"to": "staff", "amount": 1})).await), "forbidden");
    assert_eq!(code(rich.call("transfer", json!({"to": "@treasury", "amount": 1})).await), "forbidden");
    let totals = (balance(&t.admin, "rich").await, balance(&t.admin, "full").await, balance(&t.admin, "@mint").await);
    assert_eq!(totals, (9999, 10001, -20001));
    common::audit_ok(&t.admin).await;
}

/// `fee_rounding = "up"` (the campus preset): every user-to-user transfer
/// pays at least 1, and one whose fee would take it all is refused before
/// any code.
#[tokio::test]
async fn campus_fees_round_up_and_a_transfer_must_leave_the_receiver_something() {
    let mut t = Campus::start().await;
    let a = t.user("ann", "Y19", 6).await;
    let _b = t.user("ben", "Y19", 6).await;
    let _c = t.user("cat", "Y20", 6).await;
    t.admin.call("mint", json!({"to": "ann", "amount": 1000})).await.unwrap();
    let r = t.transfer(&a, "ben", 49).await.unwrap();
    assert_eq!((r["fee"].as_i64(), r["to_balance"].as_i64()), (Some(1), Some(48)));
    let r = t.transfer(&a, "cat", 2).await.unwrap();
    assert_eq!((r["fee"].as_i64(), r["to_balance"].as_i64()), (Some(1), Some(1)));
    for to in ["ben", "cat"] {
        let e = a.call("transfer", json!({"to": to, "amount": 1})).await.unwrap_err();
        assert_eq!(e.code(), Some("bad_request"), "{e}");
        assert!(e.to_string().contains("would take the whole amount"), "{e}");
    }
    assert_eq!(t.mails(), 2, "no code for the refused ones");
    assert_eq!(balance(&t.admin, "@treasury").await, 2);
    assert_eq!(balance(&t.admin, "ann").await, 1000 - 49 - 2);
    common::audit_ok(&t.admin).await;
}

#[tokio::test]
async fn a_redeem_holds_the_amount_until_an_admin_decides_once() {
    let mut t = Campus::start().await;
    let r = t.user("rita", "Y19", 6).await;
    let _o = t.user("omar", "Y19", 6).await;
    t.admin.call("mint", json!({"to": "rita", "amount": 500})).await.unwrap();
    assert_eq!(code(r.call("redeem", json!({"item": "hoodie", "amount": 501})).await), "insufficient_funds");
    let p = r.call("redeem", json!({"item": "hoodie", "amount": 300, "memo": "size M"})).await.unwrap();
    assert_eq!(p["delivered"], true, "{p}");
    assert_eq!(balance(&t.admin, "rita").await, 500, "nothing is held before the code");
    let otp = t.next_code();
    let req = r.call("confirm", json!({"pending": p["pending"], "otp": otp})).await.unwrap();
    assert_eq!(
        (req["item"].as_str(), req["amount"].as_i64(), req["status"].as_str()),
        (Some("hoodie"), Some(300), Some("pending"))
    );
    let id = req["request"].as_u64().unwrap();
    let b = r.call("balance", json!({})).await.unwrap();
    assert_eq!((b["balance"].as_i64(), b["held"].as_i64(), b["available"].as_i64()), (Some(500), Some(300), Some(200)));
    // The held amount cannot be spent.
    assert_eq!(code(r.call("transfer", json!({"to": "omar", "amount": 201})).await), "insufficient_funds");
    // Only admins decide; the user cannot settle the hold either.
    assert_eq!(code(r.call("decide_redeem", json!({"request": id, "accept": true})).await), "forbidden");
    assert_eq!(code(r.call("redeems", json!({})).await), "forbidden");
    assert_eq!(code(r.call("void", json!({"hold": id})).await), "forbidden");
    assert_eq!(code(t.admin.call("void", json!({"hold": id})).await), "forbidden");
    let pending = t.admin.call("redeems", json!({"status": "pending"})).await.unwrap();
    assert_eq!(pending["requests"].as_array().unwrap().len(), 1);

    let d = t.admin.call("decide_redeem", json!({"request": id, "accept": true, "note": "handed out"})).await.unwrap();
    assert_eq!(
        (d["status"].as_str(), d["decided_by"].as_str(), d["note"].as_str()),
        (Some("accepted"), Some("admin"), Some("handed out"))
    );
    assert!(d["decided_at"].as_u64().unwrap() > 0);
    let again = t.admin.call("decide_redeem", json!({"request": id, "accept": false})).await;
    assert_eq!(code(again), "forbidden");
    assert_eq!((balance(&t.admin, "rita").await, balance(&t.admin, "@redeemed").await), (200, 300));

    // A rejected request gives the amount back.
    let p = r.call("redeem", json!({"item": "mug", "amount": 150})).await.unwrap();
    let otp = t.next_code();
    let req = r.call("confirm", json!({"pending": p["pending"], "otp": otp})).await.unwrap();
    let id2 = req["request"].as_u64().unwrap();
    assert_eq!(r.call("balance", json!({})).await.unwrap()["available"], 50);
    let d =
        t.admin.call("decide_redeem", json!({"request": id2, "accept": false, "note": "out of stock"})).await.unwrap();
    assert_eq!(d["status"], "rejected");
    let b = r.call("balance", json!({})).await.unwrap();
    assert_eq!((b["balance"].as_i64(), b["held"].as_i64(), b["available"].as_i64()), (Some(200), Some(0), Some(200)));
    assert_eq!(balance(&t.admin, "@redeemed").await, 300);
    let mine = r.call("my_redeems", json!({})).await.unwrap();
    let statuses: Vec<(&str, &str)> = mine["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| (q["item"].as_str().unwrap(), q["status"].as_str().unwrap()))
        .collect();
    assert_eq!(statuses, [("mug", "rejected"), ("hoodie", "accepted")]);
    assert_eq!(code(t.admin.call("decide_redeem", json!({"request": 424_242, "accept": true})).await), "not_found");
    common::audit_ok(&t.admin).await;
}

#[tokio::test]
async fn a_users_hold_pays_the_fee_when_posted() {
    let mut t = Campus::start().await;
    let a = t.user("ana", "Y19", 6).await;
    let _b = t.user("bo", "Y20", 6).await;
    t.admin.call("mint", json!({"to": "ana", "amount": 100})).await.unwrap();
    let p = a.call("hold", json!({"to": "bo", "amount": 100})).await.unwrap();
    let otp = t.next_code();
    let h = a.call("confirm", json!({"pending": p["pending"], "otp": otp})).await.unwrap();
    let posted = a.call("post", json!({"hold": h["hold"]})).await.unwrap();
    assert_eq!(posted["transfer"]["fee"], 33);
    assert_eq!(balance(&t.admin, "bo").await, 67);
    assert_eq!(balance(&t.admin, "@treasury").await, 33);
    assert_eq!(balance(&t.admin, "ana").await, 0);
    common::audit_ok(&t.admin).await;
}
