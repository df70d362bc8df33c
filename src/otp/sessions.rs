//! The OTP rules as plain data: sessions, codes, and the budgets and
//! limits of guessing, resets and mails. No IO, no clock of its own (every
//! call takes the time), tested without actors in `sessions/tests.rs`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::error::{ApiError, ErrorCode};
use crate::guard::{self, Backoff, Recent, Table};
use crate::limits::{
    CODE_MAILS_PER_USER_PER_HOUR, GUARD_ENTRIES_MAX, GUARD_SWEEP_INTERVAL_MS, HOUR_MS, OTP_BATCH_ITEMS_MAX,
    OTP_GUESSES, OTP_SESSIONS_MAX, OTP_SESSIONS_PER_USER_MAX, RESETS_PER_SOURCE_PER_HOUR, RESETS_PER_USER_PER_HOUR,
    RESET_MAILS_PER_ADDRESS_PER_HOUR,
};

/// Digits in a code.
pub const CODE_DIGITS: usize = crate::limits::OTP_CODE_DIGITS;

/// The operation a session waits to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A user transfer at or above `otp.transfer_min`.
    Transfer { from: String, to: String, amount: i64, memo: Option<String>, key: Option<String> },
    /// A user's hold (a two-phase transfer) at or above `otp.transfer_min`.
    Hold { from: String, to: String, amount: i64, memo: Option<String>, key: Option<String>, timeout_s: Option<u64> },
    /// A user's `transfer_batch` whose amounts add up to at least
    /// `otp.transfer_min`: one code for the whole batch.
    Batch { transfers: Vec<BatchTransfer>, atomic: bool },
    /// A password reset asked for anonymously; the mail went to the user's address.
    ResetPassword,
    /// A redeem request: the amount is held when it is confirmed.
    Redeem { account: String, item: String, amount: i64, memo: Option<String> },
}

/// One transfer of a batch, as it waits for its code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchTransfer {
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub memo: Option<String>,
    pub key: Option<String>,
}

/// What a code is for; each has its own guessing budget per user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// A password reset: asked for and confirmed anonymously.
    Reset,
    /// A transfer, hold or redeem of a logged-in user.
    Confirm,
}

impl Purpose {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Reset => "reset",
            Purpose::Confirm => "confirm",
        }
    }
}

impl Action {
    /// The mail's subject: it names the action.
    #[must_use]
    pub fn subject(&self) -> String {
        match self {
            Action::Transfer { to, amount, .. } => format!("Tally: confirm your transfer of {amount} to {to}"),
            Action::Hold { to, amount, .. } => format!("Tally: confirm your hold of {amount} for {to}"),
            Action::Batch { transfers, .. } => {
                let total: i128 = transfers.iter().map(|t| i128::from(t.amount)).sum();
                format!("Tally: confirm your {} transfers, {total} in all", transfers.len())
            }
            Action::ResetPassword => "Tally: reset your password".to_owned(),
            Action::Redeem { item, amount, .. } => format!("Tally: confirm your redeem of {amount} for {item}"),
        }
    }

    /// A reset is confirmed by whoever holds the code (a user who forgot
    /// the password cannot log in); every other action needs its user
    /// logged in.
    #[must_use]
    pub fn purpose(&self) -> Purpose {
        match self {
            Action::ResetPassword => Purpose::Reset,
            _ => Purpose::Confirm,
        }
    }
}

/// The session rules (`[otp]`).
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub ttl_ms: u64,
    pub tries_max: u32,
    pub resends_max: u32,
}

/// A code in clear, on its way into one mail. Its `Debug` hides it.
pub struct Code([u8; CODE_DIGITS]);

impl Code {
    fn random() -> Result<Code, ApiError> {
        // Rejection sampling: 4,294,000,000 is a multiple of 10^6, so every code is equally likely.
        let n = loop {
            let mut b = [0u8; 4];
            getrandom::fill(&mut b).map_err(|_| ApiError::internal("no randomness"))?;
            let n = u32::from_le_bytes(b);
            if n < 4_294_000_000 {
                break n % 1_000_000;
            }
        };
        let mut digits = [0u8; CODE_DIGITS];
        let mut rest = n;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        Ok(Code(digits))
    }

    /// The six digits, for the mail body only.
    #[must_use]
    pub fn expose(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Code(******)")
    }
}

struct Session {
    user: Arc<str>,
    /// Where codes go; `None` for a decoy (an unknown user, or an admin
    /// asking for a reset over the wire), which no code can confirm.
    email: Option<String>,
    action: Action,
    /// Keyed BLAKE3 of the session id and the code; compared in constant
    /// time. `None` for a decoy.
    code: Option<blake3::Hash>,
    expires_ms: u64,
    tries: u32,
    resends: u32,
}

/// A code to mail.
#[derive(Debug)]
pub struct OutMail {
    pub to: String,
    pub subject: String,
    pub code: Code,
}

/// A code just issued: what the requester is told, and the mail to send
/// (`None`: a decoy, or the recipient's hourly mail limit is reached).
#[derive(Debug)]
pub struct Issued {
    pub pending: String,
    pub expires_at: u64,
    pub mail: Option<OutMail>,
}

/// The per-user, per-address and per-mail-address counters.
#[derive(Default)]
struct Limits {
    /// Wrong codes, per user and purpose.
    guesses: Option<Table<(Arc<str>, Purpose), Backoff>>,
    /// Resets asked for, per user.
    resets_per_user: Option<Table<Arc<str>, Recent>>,
    /// Resets asked for, per source address.
    resets_per_source: Option<Table<IpAddr, Recent>>,
    /// Reset mails, per mail address.
    reset_mails: Option<Table<String, Recent>>,
    /// Codes mailed for a user's own operations, per user.
    code_mails: Option<Table<Arc<str>, Recent>>,
    swept_ms: u64,
}

fn table<K: std::hash::Hash + Eq + Clone, V: Default>(t: &mut Option<Table<K, V>>) -> &mut Table<K, V> {
    t.get_or_insert_with(|| Table::new(GUARD_ENTRIES_MAX))
}

fn limited(message: String) -> ApiError {
    ApiError::new(ErrorCode::RateLimited, message)
}

fn full() -> ApiError {
    limited("too many codes are being asked for; try again later".to_owned())
}

/// Takes one event from an hourly window, or says how long to wait.
fn hourly<K: std::hash::Hash + Eq + Clone>(
    t: &mut Option<Table<K, Recent>>,
    key: &K,
    max: usize,
    now_ms: u64,
) -> Result<Result<(), u64>, ApiError> {
    let entry = table(t).entry(key, |r| r.is_idle(HOUR_MS, now_ms)).ok_or_else(full)?;
    Ok(entry.take(max, HOUR_MS, now_ms))
}

/// The pending sessions, the budgets and the rules; no IO, no clock of its own.
pub struct Sessions {
    rules: Rules,
    key: [u8; 32],
    open: HashMap<String, Session>,
    per_user: HashMap<Arc<str>, usize>,
    /// Transfers held by open batch sessions (at most `OTP_BATCH_ITEMS_MAX`).
    batch_items: usize,
    limits: Limits,
}

/// The transfers a session holds (a batch's), for the bound on their bytes.
fn batch_items(action: &Action) -> usize {
    match action {
        Action::Batch { transfers, .. } => transfers.len(),
        _ => 0,
    }
}

pub(super) fn otp_error(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

impl Sessions {
    pub fn new(rules: Rules) -> Result<Sessions, ApiError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|_| ApiError::internal("no randomness"))?;
        Ok(Sessions {
            rules,
            key,
            open: HashMap::new(),
            per_user: HashMap::new(),
            batch_items: 0,
            limits: Limits::default(),
        })
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.open.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    fn hash(&self, pending: &str, code: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(pending.as_bytes());
        h.update(&[0]);
        h.update(code);
        h.finalize()
    }

    /// Opens a session for `user` waiting to run `action`. `email` is
    /// where the code goes; `None` opens a decoy (see the module header).
    /// `source` is the requester's address, for the reset limits.
    pub fn open(
        &mut self,
        user: Arc<str>,
        email: Option<String>,
        action: Action,
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Result<Issued, ApiError> {
        if self.open.len() >= OTP_SESSIONS_MAX {
            return Err(otp_error(ErrorCode::Overloaded, "too many pending codes; try again shortly"));
        }
        if self.batch_items + batch_items(&action) > OTP_BATCH_ITEMS_MAX {
            return Err(otp_error(ErrorCode::Overloaded, "too many batches wait for codes; try again shortly"));
        }
        let purpose = action.purpose();
        let mut mail_allowed = email.is_some();
        match purpose {
            Purpose::Reset => {
                // Decoys and real resets pass the same checks in the same
                // order, so the answers cannot tell them apart.
                if let Some(src) = source.map(guard::source_key) {
                    hourly(&mut self.limits.resets_per_source, &src, RESETS_PER_SOURCE_PER_HOUR, now_ms)?.map_err(
                        |wait| {
                            limited(format!(
                                "at most {RESETS_PER_SOURCE_PER_HOUR} password resets an hour from one address; try again in {}",
                                guard::wait_text(wait)
                            ))
                        },
                    )?;
                }
                hourly(&mut self.limits.resets_per_user, &user, RESETS_PER_USER_PER_HOUR, now_ms)?.map_err(|wait| {
                    limited(format!(
                        "at most {RESETS_PER_USER_PER_HOUR} password resets an hour for one user; try again in {}",
                        guard::wait_text(wait)
                    ))
                })?;
                if let Some(to) = &email {
                    // Over the mail limit the session still opens (the same
                    // answer as always); only the mail is not sent.
                    mail_allowed =
                        hourly(&mut self.limits.reset_mails, to, RESET_MAILS_PER_ADDRESS_PER_HOUR, now_ms)?.is_ok();
                }
            }
            Purpose::Confirm => {
                if self.per_user.get(&user).copied().unwrap_or(0) >= OTP_SESSIONS_PER_USER_MAX {
                    return Err(limited(format!(
                        "at most {OTP_SESSIONS_PER_USER_MAX} pending codes per user; confirm or let some expire"
                    )));
                }
                hourly(&mut self.limits.code_mails, &user, CODE_MAILS_PER_USER_PER_HOUR, now_ms)?.map_err(|wait| {
                    limited(format!(
                        "at most {CODE_MAILS_PER_USER_PER_HOUR} codes an hour per user; try again in {}",
                        guard::wait_text(wait)
                    ))
                })?;
            }
        }
        // The prefix keeps the dev text mode from reading an all-digit id as a number.
        let pending = format!("otp-{}", crate::random::hex::<16>()?);
        let code = Code::random()?;
        let expires_ms = now_ms.saturating_add(self.rules.ttl_ms);
        let subject = action.subject();
        self.batch_items += batch_items(&action);
        let session = Session {
            user: user.clone(),
            code: email.is_some().then(|| self.hash(&pending, &code.0)),
            email: email.clone(),
            action,
            expires_ms,
            tries: 0,
            resends: 0,
        };
        self.open.insert(pending.clone(), session);
        if purpose == Purpose::Confirm {
            *self.per_user.entry(user).or_insert(0) += 1;
        }
        let mail = match email {
            Some(to) if mail_allowed => Some(OutMail { to, subject, code }),
            _ => None,
        };
        Ok(Issued { pending, expires_at: expires_ms, mail })
    }

    /// Drops a session whose mail could not be queued: the caller is told
    /// to try again.
    pub fn cancel(&mut self, pending: &str) {
        self.remove(pending);
    }

    fn remove(&mut self, pending: &str) -> Option<Session> {
        let s = self.open.remove(pending)?;
        self.batch_items -= batch_items(&s.action);
        if s.action.purpose() == Purpose::Confirm {
            if let Some(n) = self.per_user.get_mut(&s.user) {
                *n -= 1;
                if *n == 0 {
                    self.per_user.remove(&s.user);
                }
            }
        }
        Some(s)
    }

    /// The live session `pending`, if `caller` may act on it; an expired
    /// one is dropped and reported as such.
    fn live(&mut self, pending: &str, caller: Option<&str>, now_ms: u64) -> Result<&mut Session, ApiError> {
        let Some(s) = self.open.get(pending) else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no pending code {pending:?} (confirmed, burnt, expired or never opened)"),
            ));
        };
        match caller {
            Some(c) if c != &*s.user && s.action.purpose() == Purpose::Confirm => {
                return Err(ApiError::forbidden("this code belongs to another user"));
            }
            None if s.action.purpose() == Purpose::Confirm => {
                return Err(otp_error(ErrorCode::Unauthenticated, "log in as the user who asked for this code"));
            }
            _ => {}
        }
        if now_ms >= s.expires_ms {
            self.remove(pending);
            return Err(otp_error(ErrorCode::OtpExpired, "the code expired; start again"));
        }
        Ok(self.open.get_mut(pending).expect("looked up above"))
    }

    /// How long `user` must wait before a code for `purpose` is checked (0: now).
    #[must_use]
    pub fn guess_wait_ms(&self, user: &str, purpose: Purpose, now_ms: u64) -> u64 {
        let key = (Arc::<str>::from(user), purpose);
        self.limits.guesses.as_ref().and_then(|t| t.get(&key)).map_or(0, |b| b.wait_ms(&OTP_GUESSES, now_ms))
    }

    /// Checks `code`. Right: the session is gone (a code works once) and its
    /// user and action come back. Wrong: one try of the session and one
    /// guess of the user's budget are used; the last try burns the session.
    /// While the user's budget waits, the code is not looked at.
    pub fn confirm(
        &mut self,
        pending: &str,
        caller: Option<&str>,
        code: &str,
        has_new_password: bool,
        now_ms: u64,
    ) -> Result<(Arc<str>, Action), ApiError> {
        let given = self.hash(pending, code.as_bytes());
        let tries_max = self.rules.tries_max;
        let s = self.live(pending, caller, now_ms)?;
        if matches!(s.action, Action::ResetPassword) && !has_new_password {
            // Checked before the code, so the mistake costs no try.
            return Err(ApiError::bad_request("confirming a password reset needs new_password"));
        }
        let key = (s.user.clone(), s.action.purpose());
        let stored = s.code;
        let budget =
            table(&mut self.limits.guesses).entry(&key, |b| b.forgotten(&OTP_GUESSES, now_ms)).ok_or_else(full)?;
        let wait = budget.wait_ms(&OTP_GUESSES, now_ms);
        if wait > 0 {
            return Err(limited(format!(
                "too many wrong codes for this user; the next one is checked in {}",
                guard::wait_text(wait)
            )));
        }
        // blake3::Hash compares in constant time.
        if stored == Some(given) {
            let s = self.remove(pending).expect("live above");
            if let Some(t) = self.limits.guesses.as_mut() {
                t.remove(&key);
            }
            return Ok((s.user, s.action));
        }
        budget.fail(&OTP_GUESSES, now_ms);
        let s = self.open.get_mut(pending).expect("live above");
        s.tries += 1;
        if s.tries >= tries_max {
            self.remove(pending);
            return Err(otp_error(ErrorCode::OtpExhausted, format!("{tries_max} wrong codes: this session is burnt")));
        }
        let left = tries_max - s.tries;
        Err(otp_error(
            ErrorCode::OtpInvalid,
            format!("wrong code; {left} {} left", if left == 1 { "try" } else { "tries" }),
        ))
    }

    /// Issues a new code for the session (the old one stops working) with a
    /// fresh expiry. Wrong tries carry over.
    pub fn resend(&mut self, pending: &str, caller: Option<&str>, now_ms: u64) -> Result<Issued, ApiError> {
        let (ttl_ms, resends_max) = (self.rules.ttl_ms, self.rules.resends_max);
        let code = Code::random()?;
        let hash = self.hash(pending, &code.0);
        let s = self.live(pending, caller, now_ms)?;
        if s.resends >= resends_max {
            return Err(limited(format!("a code can be resent at most {resends_max} times")));
        }
        let (user, email, purpose) = (s.user.clone(), s.email.clone(), s.action.purpose());
        let mail_allowed = match (purpose, &email) {
            (_, None) => false,
            (Purpose::Reset, Some(to)) => {
                hourly(&mut self.limits.reset_mails, to, RESET_MAILS_PER_ADDRESS_PER_HOUR, now_ms)?.is_ok()
            }
            (Purpose::Confirm, Some(_)) => {
                hourly(&mut self.limits.code_mails, &user, CODE_MAILS_PER_USER_PER_HOUR, now_ms)?.map_err(|wait| {
                    limited(format!(
                        "at most {CODE_MAILS_PER_USER_PER_HOUR} codes an hour per user; try again in {}",
                        guard::wait_text(wait)
                    ))
                })?;
                true
            }
        };
        let s = self.open.get_mut(pending).expect("live above");
        s.resends += 1;
        if s.code.is_some() {
            s.code = Some(hash);
        }
        s.expires_ms = now_ms.saturating_add(ttl_ms);
        let mail = match email {
            Some(to) if mail_allowed => Some(OutMail { to, subject: s.action.subject(), code }),
            _ => None,
        };
        Ok(Issued { pending: pending.to_owned(), expires_at: s.expires_ms, mail })
    }

    /// Drops every expired session, and now and then the budgets and
    /// windows that no longer matter; returns how many sessions expired.
    pub fn sweep(&mut self, now_ms: u64) -> usize {
        let expired: Vec<String> =
            self.open.iter().filter(|(_, s)| now_ms >= s.expires_ms).map(|(k, _)| k.clone()).collect();
        for k in &expired {
            self.remove(k);
        }
        if now_ms.saturating_sub(self.limits.swept_ms) >= GUARD_SWEEP_INTERVAL_MS {
            let l = &mut self.limits;
            l.swept_ms = now_ms;
            if let Some(t) = l.guesses.as_mut() {
                t.sweep(|b| b.forgotten(&OTP_GUESSES, now_ms));
            }
            for t in [l.resets_per_user.as_mut(), l.code_mails.as_mut()].into_iter().flatten() {
                t.sweep(|r| r.is_idle(HOUR_MS, now_ms));
            }
            if let Some(t) = l.resets_per_source.as_mut() {
                t.sweep(|r| r.is_idle(HOUR_MS, now_ms));
            }
            if let Some(t) = l.reset_mails.as_mut() {
                t.sweep(|r| r.is_idle(HOUR_MS, now_ms));
            }
        }
        expired.len()
    }
}

#[cfg(test)]
mod tests;
