//! The OTP session rules without actors or mail: tries, expiry, resends,
//! single use, who may confirm, the per-user guessing budgets, the reset
//! limits, decoys, and the bounds.

use super::*;
use crate::limits::{
    CODE_MAILS_PER_USER_PER_HOUR, HOUR_MS, OTP_SESSIONS_PER_USER_MAX, RESET_MAILS_PER_ADDRESS_PER_HOUR,
};

const T0: u64 = 1_000_000;

fn rules() -> Rules {
    Rules { ttl_ms: 120_000, tries_max: 5, resends_max: 3 }
}

fn transfer() -> Action {
    Action::Transfer { from: "alice".into(), to: "bob".into(), amount: 5, memo: None, key: None }
}

fn open(s: &mut Sessions, user: &str, action: Action) -> Issued {
    s.open(user.into(), Some(format!("{user}@example.org")), action, None, T0).unwrap()
}

/// The code a session's mail carries.
fn code(i: &Issued) -> &Code {
    &i.mail.as_ref().expect("a mail").code
}

fn wrong(code: &Code) -> String {
    let c = code.expose();
    let last = (c.as_bytes()[5] - b'0' + 1) % 10;
    format!("{}{}", &c[..5], last)
}

fn code_of(e: &ApiError) -> ErrorCode {
    e.code
}

#[test]
fn codes_are_six_digits_and_hidden_from_debug() {
    for _ in 0..1000 {
        let c = Code::random().unwrap();
        assert_eq!(c.expose().len(), 6);
        assert!(c.expose().bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(format!("{c:?}"), "Code(******)");
    }
}

#[test]
fn the_right_code_works_once() {
    let mut s = Sessions::new(rules()).unwrap();
    let i = open(&mut s, "alice", transfer());
    let (user, action) = s.confirm(&i.pending, Some("alice"), code(&i).expose(), false, T0 + 1).unwrap();
    assert_eq!((&*user, action), ("alice", transfer()));
    let again = s.confirm(&i.pending, Some("alice"), code(&i).expose(), false, T0 + 2).unwrap_err();
    assert_eq!(code_of(&again), ErrorCode::NotFound);
    assert!(s.is_empty());
}

#[test]
fn five_wrong_tries_burn_the_session() {
    let mut s = Sessions::new(rules()).unwrap();
    let i = open(&mut s, "alice", transfer());
    for left in (1..5).rev() {
        let e = s.confirm(&i.pending, Some("alice"), &wrong(code(&i)), false, T0).unwrap_err();
        assert_eq!(code_of(&e), ErrorCode::OtpInvalid);
        let tries = if left == 1 { "try" } else { "tries" };
        assert!(e.message.contains(&format!("{left} {tries} left")), "{}", e.message);
    }
    let e = s.confirm(&i.pending, Some("alice"), &wrong(code(&i)), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::OtpExhausted);
    let e = s.confirm(&i.pending, Some("alice"), code(&i).expose(), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::NotFound);
}

#[test]
fn expiry_is_exact_and_the_sweep_drops_expired_sessions() {
    let mut s = Sessions::new(rules()).unwrap();
    let a = open(&mut s, "alice", transfer());
    let b = open(&mut s, "bob", transfer());
    assert_eq!(a.expires_at, T0 + 120_000);
    let e = s.confirm(&a.pending, Some("alice"), code(&a).expose(), false, T0 + 120_000).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::OtpExpired);
    assert_eq!(s.sweep(T0 + 119_999), 0);
    assert_eq!(s.sweep(T0 + 120_000), 1);
    let e = s.confirm(&b.pending, Some("bob"), code(&b).expose(), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::NotFound);
    assert!(s.is_empty() && s.per_user.is_empty());
}

#[test]
fn resend_kills_the_old_code_and_is_bounded() {
    let mut s = Sessions::new(rules()).unwrap();
    let i = open(&mut s, "alice", transfer());
    let mut old = i.mail.unwrap().code;
    for n in 1..=3 {
        let r = s.resend(&i.pending, Some("alice"), T0 + n * 1000).unwrap();
        assert_eq!(r.expires_at, T0 + n * 1000 + 120_000);
        let new = r.mail.unwrap().code;
        if new.expose() != old.expose() {
            let e = s.confirm(&i.pending, Some("alice"), old.expose(), false, T0 + n * 1000).unwrap_err();
            assert_eq!(code_of(&e), ErrorCode::OtpInvalid);
        }
        old = new;
    }
    let e = s.resend(&i.pending, Some("alice"), T0 + 5000).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    s.confirm(&i.pending, Some("alice"), old.expose(), false, T0 + 5000).unwrap();
}

#[test]
fn only_the_sessions_user_may_confirm() {
    let mut s = Sessions::new(rules()).unwrap();
    let i = open(&mut s, "alice", transfer());
    let e = s.confirm(&i.pending, Some("mallory"), code(&i).expose(), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::Forbidden);
    let e = s.confirm(&i.pending, None, code(&i).expose(), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::Unauthenticated);
    // Neither attempt used a try.
    for _ in 0..4 {
        s.confirm(&i.pending, Some("alice"), &wrong(code(&i)), false, T0).unwrap_err();
    }
    s.confirm(&i.pending, Some("alice"), code(&i).expose(), false, T0).unwrap();
    // A password reset is confirmed by whoever holds the code.
    let r = open(&mut s, "alice", Action::ResetPassword);
    assert_eq!(r.mail.as_ref().unwrap().subject, "Tally: reset your password");
    s.confirm(&r.pending, None, code(&r).expose(), true, T0).unwrap();
}

#[test]
fn sessions_are_bounded_per_user() {
    let mut s = Sessions::new(rules()).unwrap();
    for _ in 0..OTP_SESSIONS_PER_USER_MAX {
        open(&mut s, "alice", transfer());
    }
    let e = s.open("alice".into(), Some("a@example.org".into()), transfer(), None, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    open(&mut s, "bob", transfer());
    assert_eq!(s.sweep(T0 + 120_000), OTP_SESSIONS_PER_USER_MAX + 1);
    open(&mut s, "alice", transfer());
}

#[test]
fn wrong_codes_are_counted_per_user_and_new_sessions_do_not_refill_them() {
    let mut s = Sessions::new(rules()).unwrap();
    // Five wrong codes over five sessions (one each).
    for _ in 0..5 {
        let i = open(&mut s, "alice", transfer());
        let e = s.confirm(&i.pending, Some("alice"), &wrong(code(&i)), false, T0).unwrap_err();
        assert_eq!(code_of(&e), ErrorCode::OtpInvalid);
    }
    // A sixth session: not even the right code is looked at for a minute.
    let i = open(&mut s, "alice", transfer());
    assert_eq!(s.guess_wait_ms("alice", Purpose::Confirm, T0), 60_000);
    let e = s.confirm(&i.pending, Some("alice"), code(&i).expose(), false, T0 + 59_000).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    assert!(e.message.ends_with("checked in 1 s"), "{}", e.message);
    // Another user is not affected.
    let b = open(&mut s, "bob", transfer());
    s.confirm(&b.pending, Some("bob"), code(&b).expose(), false, T0).unwrap();
    // The refusal used no try: after the wait, the right code works, and
    // the budget starts again.
    s.confirm(&i.pending, Some("alice"), code(&i).expose(), false, T0 + 60_000).unwrap();
    assert_eq!(s.guess_wait_ms("alice", Purpose::Confirm, T0 + 60_000), 0);
}

#[test]
fn waits_double_and_a_day_forgives() {
    let mut s = Sessions::new(Rules { ttl_ms: 10 * 86_400_000, tries_max: 100, resends_max: 3 }).unwrap();
    let i = open(&mut s, "alice", transfer());
    let bad = wrong(code(&i));
    let mut t = T0;
    for _ in 0..5 {
        s.confirm(&i.pending, Some("alice"), &bad, false, t).unwrap_err();
    }
    for wait in [60_000, 120_000, 240_000] {
        assert_eq!(s.guess_wait_ms("alice", Purpose::Confirm, t), wait);
        let e = s.confirm(&i.pending, Some("alice"), &bad, false, t + wait - 1).unwrap_err();
        assert_eq!(code_of(&e), ErrorCode::RateLimited);
        t += wait;
        let e = s.confirm(&i.pending, Some("alice"), &bad, false, t).unwrap_err();
        assert_eq!(code_of(&e), ErrorCode::OtpInvalid);
    }
    assert_eq!(s.guess_wait_ms("alice", Purpose::Confirm, t), 480_000);
    assert_eq!(s.guess_wait_ms("alice", Purpose::Confirm, t + 86_400_000), 0);
}

#[test]
fn a_reset_attack_never_touches_the_users_own_confirmations() {
    let mut s = Sessions::new(rules()).unwrap();
    for _ in 0..3 {
        let r = open(&mut s, "alice", Action::ResetPassword);
        for _ in 0..2 {
            let _ = s.confirm(&r.pending, None, &wrong(code(&r)), true, T0);
        }
    }
    assert!(s.guess_wait_ms("alice", Purpose::Reset, T0) > 0);
    assert_eq!(s.guess_wait_ms("alice", Purpose::Confirm, T0), 0);
    let t = open(&mut s, "alice", transfer());
    s.confirm(&t.pending, Some("alice"), code(&t).expose(), false, T0).unwrap();
}

#[test]
fn resets_are_bounded_per_user_per_address_and_mails_per_mail_address() {
    let mut s = Sessions::new(rules()).unwrap();
    let from = |n: u8| Some(std::net::IpAddr::from([10, 0, 0, n]));
    let reset = |s: &mut Sessions, user: &str, email: Option<&str>, src, t| {
        s.open(user.into(), email.map(str::to_owned), Action::ResetPassword, src, t)
    };
    // Per user: 3 an hour, whoever asks and whether or not the user exists.
    for user in ["alice", "nobody"] {
        let email = (user == "alice").then_some("alice@example.org");
        for n in 0..3 {
            reset(&mut s, user, email, from(n), T0).unwrap();
        }
        let e = reset(&mut s, user, email, from(9), T0).unwrap_err();
        assert_eq!(code_of(&e), ErrorCode::RateLimited);
        reset(&mut s, user, email, from(9), T0 + HOUR_MS).unwrap();
    }
    // Per source address: 10 an hour over any users.
    let mut s = Sessions::new(rules()).unwrap();
    for n in 0..10 {
        reset(&mut s, &format!("u{n}"), None, from(1), T0).unwrap();
    }
    let e = reset(&mut s, "u10", None, from(1), T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    reset(&mut s, "u10", None, from(2), T0).unwrap();
    // Mails to one address: 5 an hour; past that the session still opens
    // (same answer) but no mail goes out.
    let mut s = Sessions::new(rules()).unwrap();
    let mut mailed = 0;
    for n in 0..8 {
        let i = reset(&mut s, &format!("twin{n}"), Some("shared@example.org"), from(n), T0).unwrap();
        mailed += usize::from(i.mail.is_some());
    }
    assert_eq!(mailed, RESET_MAILS_PER_ADDRESS_PER_HOUR);
}

#[test]
fn a_decoy_answers_like_a_real_session_and_never_confirms() {
    let mut s = Sessions::new(rules()).unwrap();
    let real = open(&mut s, "alice", Action::ResetPassword);
    let decoy = s.open("ghost".into(), None, Action::ResetPassword, None, T0).unwrap();
    assert!(decoy.mail.is_none());
    assert_eq!(decoy.pending.len(), real.pending.len());
    assert_eq!(decoy.expires_at, real.expires_at);
    // Every code is wrong, with the same messages as a real session's.
    for (n, guess) in ["000000", "123456", "999999", "000001"].iter().enumerate() {
        let d = s.confirm(&decoy.pending, None, guess, true, T0).unwrap_err();
        let r = s.confirm(&real.pending, None, &wrong(code(&real)), true, T0).unwrap_err();
        assert_eq!((d.code, &d.message), (r.code, &r.message), "guess {n}");
    }
    let d = s.resend(&decoy.pending, None, T0).unwrap();
    assert!(d.mail.is_none());
}

#[test]
fn codes_mailed_for_a_users_own_operations_are_bounded_per_hour() {
    let mut s = Sessions::new(rules()).unwrap();
    let mut t = T0;
    for _ in 0..CODE_MAILS_PER_USER_PER_HOUR {
        let i = open(&mut s, "alice", transfer());
        s.confirm(&i.pending, Some("alice"), code(&i).expose(), false, t).unwrap();
        t += 1;
    }
    let e = s.open("alice".into(), Some("a@example.org".into()), transfer(), None, t).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    s.open("alice".into(), Some("a@example.org".into()), transfer(), None, T0 + HOUR_MS).unwrap();
}

#[test]
fn batches_waiting_for_codes_hold_at_most_otp_batch_items_max_transfers() {
    use crate::limits::{OTP_BATCH_ITEMS_MAX, USER_BATCH_MAX};
    let mut s = Sessions::new(rules()).unwrap();
    let item = BatchTransfer { from: "u".into(), to: "shop".into(), amount: 1, memo: None, key: None };
    let batch = || Action::Batch { transfers: vec![item.clone(); USER_BATCH_MAX], atomic: false };
    let sessions = OTP_BATCH_ITEMS_MAX / USER_BATCH_MAX;
    let mut opened = Vec::new();
    for i in 0..sessions {
        opened.push(open(&mut s, &format!("user{}", i / OTP_SESSIONS_PER_USER_MAX), batch()));
    }
    let full = s.open("late".into(), Some("late@example.org".into()), batch(), None, T0).unwrap_err();
    assert_eq!(code_of(&full), ErrorCode::Overloaded);
    // A single transfer does not hold batch items: it still opens.
    open(&mut s, "late", transfer());
    // A batch session that ends frees its share.
    s.cancel(&opened[0].pending);
    open(&mut s, "late", batch());
}
