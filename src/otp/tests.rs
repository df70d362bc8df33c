//! The OTP session rules without actors or mail: tries, expiry, resends,
//! single use, who may confirm, and the bounds.

use super::*;

const T0: u64 = 1_000_000;

fn rules() -> Rules {
    Rules { ttl_ms: 120_000, tries_max: 5, resends_max: 3 }
}

fn transfer() -> Action {
    Action::Transfer { from: "alice".into(), to: "bob".into(), amount: 5, memo: None, key: None }
}

fn open(s: &mut Sessions, user: &str, action: Action) -> Issued {
    s.open(user.into(), format!("{user}@example.org"), action, T0).unwrap()
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
    let (user, action) = s.confirm(&i.pending, Some("alice"), i.code.expose(), false, T0 + 1).unwrap();
    assert_eq!((&*user, action), ("alice", transfer()));
    let again = s.confirm(&i.pending, Some("alice"), i.code.expose(), false, T0 + 2).unwrap_err();
    assert_eq!(code_of(&again), ErrorCode::NotFound);
    assert!(s.is_empty());
}

#[test]
fn five_wrong_tries_burn_the_session() {
    let mut s = Sessions::new(rules()).unwrap();
    let i = open(&mut s, "alice", transfer());
    for left in (1..5).rev() {
        let e = s.confirm(&i.pending, Some("alice"), &wrong(&i.code), false, T0).unwrap_err();
        assert_eq!(code_of(&e), ErrorCode::OtpInvalid);
        assert!(e.message.contains(&format!("{left} tries left")), "{}", e.message);
    }
    let e = s.confirm(&i.pending, Some("alice"), &wrong(&i.code), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::OtpExhausted);
    let e = s.confirm(&i.pending, Some("alice"), i.code.expose(), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::NotFound);
}

#[test]
fn expiry_is_exact_and_the_sweep_drops_expired_sessions() {
    let mut s = Sessions::new(rules()).unwrap();
    let a = open(&mut s, "alice", transfer());
    let b = open(&mut s, "bob", transfer());
    assert_eq!(a.expires_at, T0 + 120_000);
    let e = s.confirm(&a.pending, Some("alice"), a.code.expose(), false, T0 + 120_000).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::OtpExpired);
    assert_eq!(s.sweep(T0 + 119_999), 0);
    assert_eq!(s.sweep(T0 + 120_000), 1);
    let e = s.confirm(&b.pending, Some("bob"), b.code.expose(), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::NotFound);
    assert!(s.is_empty() && s.per_user.is_empty());
}

#[test]
fn resend_kills_the_old_code_and_is_bounded() {
    let mut s = Sessions::new(rules()).unwrap();
    let i = open(&mut s, "alice", transfer());
    let mut old = i.code;
    for n in 1..=3 {
        let r = s.resend(&i.pending, Some("alice"), T0 + n * 1000).unwrap();
        assert_eq!(r.expires_at, T0 + n * 1000 + 120_000);
        if r.code.expose() != old.expose() {
            let e = s.confirm(&i.pending, Some("alice"), old.expose(), false, T0 + n * 1000).unwrap_err();
            assert_eq!(code_of(&e), ErrorCode::OtpInvalid);
        }
        old = r.code;
    }
    let e = s.resend(&i.pending, Some("alice"), T0 + 5000).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    s.confirm(&i.pending, Some("alice"), old.expose(), false, T0 + 5000).unwrap();
}

#[test]
fn only_the_sessions_user_may_confirm() {
    let mut s = Sessions::new(rules()).unwrap();
    let i = open(&mut s, "alice", transfer());
    let e = s.confirm(&i.pending, Some("mallory"), i.code.expose(), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::Forbidden);
    let e = s.confirm(&i.pending, None, i.code.expose(), false, T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::Unauthenticated);
    // Neither attempt used a try.
    for _ in 0..4 {
        s.confirm(&i.pending, Some("alice"), &wrong(&i.code), false, T0).unwrap_err();
    }
    s.confirm(&i.pending, Some("alice"), i.code.expose(), false, T0).unwrap();
    // A password reset is confirmed by whoever holds the code.
    let r = open(&mut s, "alice", Action::ResetPassword);
    assert_eq!(r.subject, "Tally: reset your password");
    s.confirm(&r.pending, None, r.code.expose(), true, T0).unwrap();
}

#[test]
fn sessions_are_bounded_per_user() {
    let mut s = Sessions::new(rules()).unwrap();
    for _ in 0..OTP_SESSIONS_PER_USER_MAX {
        open(&mut s, "alice", transfer());
    }
    let e = s.open("alice".into(), "a@example.org".into(), transfer(), T0).unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    open(&mut s, "bob", transfer());
    assert_eq!(s.sweep(T0 + 120_000), OTP_SESSIONS_PER_USER_MAX + 1);
    open(&mut s, "alice", transfer());
}

#[test]
fn utc_formats_known_instants() {
    assert_eq!(utc(0), "1970-01-01 00:00:00");
    assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
    assert_eq!(utc(1_795_312_800_500), "2026-11-22 02:00:00");
}
