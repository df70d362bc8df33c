//! One-time passwords: the OTP supervisor actor.
//!
//! The supervisor owns every pending session (its user, the operation
//! waiting for confirmation, the code kept as a keyed hash, expiry, wrong
//! tries and resends), the guessing budgets of every user, drops expired
//! sessions on its own timer, and supervises the mailer actor (`mail.rs`)
//! that delivers codes: if the mailer fails it is started again and the
//! sessions, which live here, carry on.
//!
//! The rules are in [`Sessions`], plain data and functions tested without
//! actors; [`OtpActor`] adds the timer, the mail queue and the supervision.
//! Nothing here awaits another actor: a request that opens a session gets
//! back a oneshot on which it (not the supervisor) waits for the mail.
//!
//! # Why guessing stays hopeless
//!
//! A session allows `otp.tries_max` wrong codes, but sessions are cheap to
//! open, so the real bound is per *user*: each user has a budget of wrong
//! codes per purpose ([`Purpose`]) that new sessions never refill
//! ([`crate::constants::OTP_GUESSES`]: 5, then waits doubling from a
//! minute). While a budget waits, `confirm` answers `rate_limited` without
//! looking at the code, so guesses sent then are not even checked. Resets
//! (anonymous) and confirmations (logged in) have separate budgets: an
//! attacker's wrong reset codes never stop the user's own transfers.
//! Resets are also bounded per user, per source address and (mails) per
//! mail address. A reset for a user that does not exist, or for an admin
//! (admins reset on the host), opens a decoy session: same answers, same
//! limits, no code anywhere, so neither existence nor role leaks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort, SupervisionEvent};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::constants::{
    CODE_MAILS_PER_USER_PER_HOUR, GUARD_ENTRIES_MAX, HOUR_MS, MAIL_QUEUE_MAX, OTP_GUESSES, OTP_SESSIONS_MAX,
    OTP_SESSIONS_PER_USER_MAX, OTP_SWEEP_INTERVAL_MS, RESETS_PER_SOURCE_PER_HOUR, RESETS_PER_USER_PER_HOUR,
    RESET_MAILS_PER_ADDRESS_PER_HOUR,
};
use crate::error::{ApiError, ErrorCode};
use crate::guard::{self, Backoff, Recent, Table};
use crate::mail::{Mail, MailerActor, MailerArgs, Transport};

/// Digits in a code.
pub const CODE_DIGITS: usize = 6;

/// How often the guard tables drop entries that no longer matter.
const GUARD_SWEEP_INTERVAL_MS: u64 = 60_000;

/// The operation a session waits to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A user transfer at or above `otp.transfer_min`.
    Transfer { from: String, to: String, amount: i64, memo: Option<String>, key: Option<String> },
    /// A user's hold (a two-phase transfer) at or above `otp.transfer_min`.
    Hold { from: String, to: String, amount: i64, memo: Option<String>, key: Option<String>, timeout_s: Option<u64> },
    /// A password reset asked for anonymously; the mail went to the user's address.
    ResetPassword,
    /// A redeem request: the amount is held when it is confirmed.
    Redeem { account: String, item: String, amount: i64, memo: Option<String> },
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
    limits: Limits,
}

fn otp_error(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

impl Sessions {
    pub fn new(rules: Rules) -> Result<Sessions, ApiError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|_| ApiError::internal("no randomness"))?;
        Ok(Sessions { rules, key, open: HashMap::new(), per_user: HashMap::new(), limits: Limits::default() })
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
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|_| ApiError::internal("no randomness"))?;
        // The prefix keeps the dev text mode from reading an all-digit id as a number.
        let pending: String = std::iter::once("otp-".to_owned()).chain(id.iter().map(|b| format!("{b:02x}"))).collect();
        let code = Code::random()?;
        let expires_ms = now_ms.saturating_add(self.rules.ttl_ms);
        let subject = action.subject();
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

    fn remove(&mut self, pending: &str) -> Option<Session> {
        let s = self.open.remove(pending)?;
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

/// The mail body: the code and when it expires.
#[must_use]
pub fn mail_body(code: &Code, expires_at_ms: u64, ttl_s: u64) -> String {
    format!(
        // Lines stay short so the body goes out as plain 7-bit text.
        "Your Tally code is {}\r\n\r\nIt expires at {} UTC (in {ttl_s} seconds)\r\n\
         and works once. If you did not ask for it, ignore this mail:\r\n\
         nothing happens without the code.\r\n",
        code.expose(),
        utc(expires_at_ms)
    )
}

/// `YYYY-MM-DD hh:mm:ss` for milliseconds since the Unix epoch (UTC).
#[must_use]
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A session just opened or resent, as the requester sees it.
pub struct Opened {
    pub pending: String,
    pub expires_at: u64,
    /// Whether the mail with the code went out (or why not); `None` when
    /// no mail was queued (a decoy, or a reset over its mail limit).
    pub delivery: Option<oneshot::Receiver<Result<(), String>>>,
}

pub enum OtpMsg {
    Open {
        user: Arc<str>,
        /// Where the code goes; `None` opens a decoy.
        email: Option<String>,
        action: Action,
        /// The requester's address.
        source: Option<IpAddr>,
        reply: RpcReplyPort<Result<Opened, ApiError>>,
    },
    Confirm {
        pending: String,
        caller: Option<Arc<str>>,
        code: String,
        has_new_password: bool,
        source: Option<IpAddr>,
        reply: RpcReplyPort<Result<(Arc<str>, Action), ApiError>>,
    },
    Resend {
        pending: String,
        caller: Option<Arc<str>>,
        reply: RpcReplyPort<Result<Opened, ApiError>>,
    },
    /// From the timer: drop expired sessions.
    Sweep,
    /// How many sessions are pending.
    Count(RpcReplyPort<usize>),
}

pub struct OtpArgs {
    pub rules: Rules,
    pub transport: Transport,
    pub from: Mailbox,
}

pub struct OtpState {
    sessions: Sessions,
    ttl_s: u64,
    mailer: ActorRef<Mail>,
    transport: Transport,
    from: Mailbox,
    /// Permits for mails handed to the mailer and not yet handled.
    mail_queue: Arc<Semaphore>,
    sweeper: Option<JoinHandle<()>>,
}

/// The OTP supervisor.
pub struct OtpActor;

impl OtpState {
    async fn start_mailer(&mut self, myself: &ActorRef<OtpMsg>) -> Result<(), ActorProcessingErr> {
        let args = MailerArgs { transport: self.transport.clone(), from: self.from.clone() };
        let (mailer, _) = Actor::spawn_linked(None, MailerActor, args, myself.get_cell()).await?;
        self.mailer = mailer;
        Ok(())
    }

    /// Queues the mail of `issued`, if it has one; the receiver learns how it went.
    async fn mail(&mut self, myself: &ActorRef<OtpMsg>, issued: Issued) -> Result<Opened, ApiError> {
        let Issued { pending, expires_at, mail } = issued;
        let Some(out) = mail else {
            return Ok(Opened { pending, expires_at, delivery: None });
        };
        let permit = self
            .mail_queue
            .clone()
            .try_acquire_owned()
            .map_err(|_| otp_error(ErrorCode::Overloaded, "too many mails queued; try again shortly"))?;
        let (done, delivery) = oneshot::channel();
        let mail =
            Mail { to: out.to, subject: out.subject, body: mail_body(&out.code, expires_at, self.ttl_s), done, permit };
        if let Err(MessagingErr::SendErr(mail)) = self.mailer.cast(mail) {
            // The mailer died and its exit has not reached us yet: start it now.
            self.start_mailer(myself).await.map_err(|_| ApiError::internal("the mailer cannot start"))?;
            self.mailer.cast(mail).map_err(|_| ApiError::internal("the mailer is not running"))?;
        }
        Ok(Opened { pending, expires_at, delivery: Some(delivery) })
    }

    /// Like [`OtpState::mail`], for a reset: a mail that cannot be queued
    /// is dropped (and logged) instead of failing the request, whose answer
    /// must not depend on whether the user exists.
    async fn mail_quietly(&mut self, myself: &ActorRef<OtpMsg>, issued: Issued, user: &str) -> Opened {
        let (pending, expires_at) = (issued.pending.clone(), issued.expires_at);
        match self.mail(myself, issued).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(target: "security", user, error = %e.message, "reset mail not sent");
                Opened { pending, expires_at, delivery: None }
            }
        }
    }
}

fn source_text(source: Option<IpAddr>) -> String {
    source.map_or_else(|| "-".to_owned(), |s| s.to_string())
}

impl Actor for OtpActor {
    type Msg = OtpMsg;
    type State = OtpState;
    type Arguments = OtpArgs;

    async fn pre_start(&self, myself: ActorRef<OtpMsg>, args: OtpArgs) -> Result<OtpState, ActorProcessingErr> {
        let sessions = Sessions::new(args.rules)?;
        let mailer_args = MailerArgs { transport: args.transport.clone(), from: args.from.clone() };
        let (mailer, _) = Actor::spawn_linked(None, MailerActor, mailer_args, myself.get_cell()).await?;
        Ok(OtpState {
            sessions,
            ttl_s: args.rules.ttl_ms / 1000,
            mailer,
            transport: args.transport,
            from: args.from,
            mail_queue: Arc::new(Semaphore::new(MAIL_QUEUE_MAX)),
            sweeper: None,
        })
    }

    async fn post_start(&self, myself: ActorRef<OtpMsg>, state: &mut OtpState) -> Result<(), ActorProcessingErr> {
        state.sweeper = Some(myself.send_interval(Duration::from_millis(OTP_SWEEP_INTERVAL_MS), || OtpMsg::Sweep));
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<OtpMsg>, state: &mut OtpState) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.sweeper.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<OtpMsg>,
        msg: OtpMsg,
        state: &mut OtpState,
    ) -> Result<(), ActorProcessingErr> {
        let now = crate::store::now_ms();
        match msg {
            OtpMsg::Open { user, email, action, source, reply } => {
                let purpose = action.purpose();
                let decoy = email.is_none();
                let r = match state.sessions.open(user.clone(), email, action, source, now) {
                    Ok(issued) if purpose == Purpose::Reset => {
                        tracing::info!(target: "security", user = %user, source = %source_text(source), decoy,
                            "password reset asked for");
                        Ok(state.mail_quietly(&myself, issued, &user).await)
                    }
                    Ok(issued) => {
                        let pending = issued.pending.clone();
                        let r = state.mail(&myself, issued).await;
                        if r.is_err() {
                            // No mail, no session: the caller is told to try again.
                            state.sessions.remove(&pending);
                        }
                        r
                    }
                    Err(e) => {
                        if e.code == ErrorCode::RateLimited {
                            tracing::warn!(target: "security", user = %user, source = %source_text(source),
                                purpose = purpose.as_str(), reason = %e.message, "code refused: rate limited");
                        }
                        Err(e)
                    }
                };
                let _ = reply.send(r);
            }
            OtpMsg::Confirm { pending, caller, code, has_new_password, source, reply } => {
                let r = state.sessions.confirm(&pending, caller.as_deref(), &code, has_new_password, now);
                match &r {
                    Ok((user, action)) => tracing::info!(target: "security", user = %user,
                        purpose = action.purpose().as_str(), source = %source_text(source), "code confirmed"),
                    Err(e)
                        if matches!(
                            e.code,
                            ErrorCode::OtpInvalid | ErrorCode::OtpExhausted | ErrorCode::RateLimited
                        ) =>
                    {
                        tracing::warn!(target: "security", caller = caller.as_deref().unwrap_or("-"),
                            source = %source_text(source), code = e.code.as_str(), reason = %e.message,
                            "code refused");
                    }
                    Err(_) => {}
                }
                let _ = reply.send(r);
            }
            OtpMsg::Resend { pending, caller, reply } => {
                let r = match state.sessions.resend(&pending, caller.as_deref(), now) {
                    Ok(issued) if caller.is_none() => Ok(state.mail_quietly(&myself, issued, "-").await),
                    Ok(issued) => state.mail(&myself, issued).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            OtpMsg::Sweep => {
                let n = state.sessions.sweep(now);
                if n > 0 {
                    tracing::debug!(expired = n, pending = state.sessions.len(), "otp sessions expired");
                }
            }
            OtpMsg::Count(reply) => {
                let _ = reply.send(state.sessions.len());
            }
        }
        Ok(())
    }

    /// ractor's default stops the supervisor when a child exits; here a
    /// failed or stopped mailer is started again and the sessions stay.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<OtpMsg>,
        event: SupervisionEvent,
        state: &mut OtpState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, _) | SupervisionEvent::ActorTerminated(cell, _, _)
                if cell.get_id() == state.mailer.get_id() =>
            {
                tracing::warn!("the mailer stopped; starting a new one");
                state.start_mailer(&myself).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
