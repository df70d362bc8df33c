//! One-time passwords: the OTP supervisor actor.
//!
//! The supervisor owns every pending session (its user, the operation
//! waiting for confirmation, the code kept as a keyed hash, expiry, wrong
//! tries and resends), drops expired ones on its own timer, and supervises
//! the mailer actor (`mail.rs`) that delivers codes: if the mailer fails it
//! is started again and the sessions, which live here, carry on.
//!
//! The rules are in [`Sessions`], plain data and functions tested without
//! actors; [`OtpActor`] adds the timer, the mail queue and the supervision.
//! Nothing here awaits another actor: a request that opens a session gets
//! back a oneshot on which it (not the supervisor) waits for the mail.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort, SupervisionEvent};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::constants::{MAIL_QUEUE_MAX, OTP_SESSIONS_MAX, OTP_SESSIONS_PER_USER_MAX, OTP_SWEEP_INTERVAL_MS};
use crate::error::{ApiError, ErrorCode};
use crate::mail::{Mail, MailerActor, MailerArgs, Transport};

/// Digits in a code.
pub const CODE_DIGITS: usize = 6;

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

    /// Whether anyone holding the code may confirm (a user who forgot the
    /// password cannot log in); every other action needs its user logged in.
    fn anonymous(&self) -> bool {
        matches!(self, Action::ResetPassword)
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
    email: String,
    action: Action,
    /// Keyed BLAKE3 of the session id and the code; compared in constant time.
    code: blake3::Hash,
    expires_ms: u64,
    tries: u32,
    resends: u32,
}

/// A code just issued: what the requester is told, and what the mail says.
#[derive(Debug)]
pub struct Issued {
    pub pending: String,
    pub expires_at: u64,
    pub code: Code,
    pub email: String,
    pub subject: String,
}

/// The pending sessions and their rules; no IO, no clock of its own.
pub struct Sessions {
    rules: Rules,
    key: [u8; 32],
    open: HashMap<String, Session>,
    per_user: HashMap<Arc<str>, usize>,
}

fn otp_error(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

impl Sessions {
    pub fn new(rules: Rules) -> Result<Sessions, ApiError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|_| ApiError::internal("no randomness"))?;
        Ok(Sessions { rules, key, open: HashMap::new(), per_user: HashMap::new() })
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

    /// Opens a session for `user` waiting to run `action`.
    pub fn open(&mut self, user: Arc<str>, email: String, action: Action, now_ms: u64) -> Result<Issued, ApiError> {
        if self.open.len() >= OTP_SESSIONS_MAX {
            return Err(otp_error(ErrorCode::Overloaded, "too many pending codes; try again shortly"));
        }
        if self.per_user.get(&user).copied().unwrap_or(0) >= OTP_SESSIONS_PER_USER_MAX {
            return Err(otp_error(
                ErrorCode::RateLimited,
                format!("at most {OTP_SESSIONS_PER_USER_MAX} pending codes per user; confirm or let some expire"),
            ));
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|_| ApiError::internal("no randomness"))?;
        // The prefix keeps the dev text mode from reading an all-digit id as a number.
        let pending: String = std::iter::once("otp-".to_owned()).chain(id.iter().map(|b| format!("{b:02x}"))).collect();
        let code = Code::random()?;
        let expires_ms = now_ms.saturating_add(self.rules.ttl_ms);
        let session = Session {
            user: user.clone(),
            email: email.clone(),
            code: self.hash(&pending, &code.0),
            action,
            expires_ms,
            tries: 0,
            resends: 0,
        };
        let subject = session.action.subject();
        self.open.insert(pending.clone(), session);
        *self.per_user.entry(user).or_insert(0) += 1;
        Ok(Issued { pending, expires_at: expires_ms, code, email, subject })
    }

    fn remove(&mut self, pending: &str) -> Option<Session> {
        let s = self.open.remove(pending)?;
        if let Some(n) = self.per_user.get_mut(&s.user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&s.user);
            }
        }
        Some(s)
    }

    /// The live session `pending`, if `caller` may act on it; an expired
    /// one is dropped and reported as such.
    fn live(&mut self, pending: &str, caller: Option<&str>, now_ms: u64) -> Result<&mut Session, ApiError> {
        let Some(s) = self.open.get(pending) else {
            return Err(ApiError::not_found(format!(
                "no pending code {pending:?} (confirmed, burnt, expired or never opened)"
            )));
        };
        match caller {
            Some(c) if c != &*s.user => return Err(ApiError::forbidden("this code belongs to another user")),
            None if !s.action.anonymous() => {
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

    /// Checks `code`. Right: the session is gone (a code works once) and its
    /// user and action come back. Wrong: one try is used; the last one
    /// burns the session.
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
        // blake3::Hash compares in constant time.
        if s.code == given {
            let s = self.remove(pending).expect("live above");
            return Ok((s.user, s.action));
        }
        s.tries += 1;
        if s.tries >= tries_max {
            self.remove(pending);
            return Err(otp_error(ErrorCode::OtpExhausted, format!("{tries_max} wrong codes: this session is burnt")));
        }
        let left = tries_max - s.tries;
        Err(otp_error(ErrorCode::OtpInvalid, format!("wrong code; {left} tries left")))
    }

    /// Issues a new code for the session (the old one stops working) with a
    /// fresh expiry. Wrong tries carry over.
    pub fn resend(&mut self, pending: &str, caller: Option<&str>, now_ms: u64) -> Result<Issued, ApiError> {
        let (ttl_ms, resends_max) = (self.rules.ttl_ms, self.rules.resends_max);
        let code = Code::random()?;
        let hash = self.hash(pending, &code.0);
        let s = self.live(pending, caller, now_ms)?;
        if s.resends >= resends_max {
            return Err(otp_error(ErrorCode::RateLimited, format!("a code can be resent at most {resends_max} times")));
        }
        s.resends += 1;
        s.code = hash;
        s.expires_ms = now_ms.saturating_add(ttl_ms);
        Ok(Issued {
            pending: pending.to_owned(),
            expires_at: s.expires_ms,
            code,
            email: s.email.clone(),
            subject: s.action.subject(),
        })
    }

    /// Drops every expired session; returns how many.
    pub fn sweep(&mut self, now_ms: u64) -> usize {
        let expired: Vec<String> =
            self.open.iter().filter(|(_, s)| now_ms >= s.expires_ms).map(|(k, _)| k.clone()).collect();
        for k in &expired {
            self.remove(k);
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
    /// Whether the mail with the code went out (or why not).
    pub delivery: oneshot::Receiver<Result<(), String>>,
}

pub enum OtpMsg {
    Open {
        user: Arc<str>,
        email: String,
        action: Action,
        reply: RpcReplyPort<Result<Opened, ApiError>>,
    },
    Confirm {
        pending: String,
        caller: Option<Arc<str>>,
        code: String,
        has_new_password: bool,
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

    /// Queues the mail for `issued`; the receiver learns how it went.
    async fn mail(&mut self, myself: &ActorRef<OtpMsg>, issued: &Issued) -> Result<Opened, ApiError> {
        let permit = self
            .mail_queue
            .clone()
            .try_acquire_owned()
            .map_err(|_| otp_error(ErrorCode::Overloaded, "too many mails queued; try again shortly"))?;
        let (done, delivery) = oneshot::channel();
        let mail = Mail {
            to: issued.email.clone(),
            subject: issued.subject.clone(),
            body: mail_body(&issued.code, issued.expires_at, self.ttl_s),
            done,
            permit,
        };
        if let Err(MessagingErr::SendErr(mail)) = self.mailer.cast(mail) {
            // The mailer died and its exit has not reached us yet: start it now.
            self.start_mailer(myself).await.map_err(|_| ApiError::internal("the mailer cannot start"))?;
            self.mailer.cast(mail).map_err(|_| ApiError::internal("the mailer is not running"))?;
        }
        Ok(Opened { pending: issued.pending.clone(), expires_at: issued.expires_at, delivery })
    }
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
            OtpMsg::Open { user, email, action, reply } => {
                let r = match state.sessions.open(user, email, action, now) {
                    Ok(issued) => {
                        let r = state.mail(&myself, &issued).await;
                        if r.is_err() {
                            // No mail, no session: the caller is told to try again.
                            state.sessions.remove(&issued.pending);
                        }
                        r
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            OtpMsg::Confirm { pending, caller, code, has_new_password, reply } => {
                let r = state.sessions.confirm(&pending, caller.as_deref(), &code, has_new_password, now);
                let _ = reply.send(r);
            }
            OtpMsg::Resend { pending, caller, reply } => {
                let r = match state.sessions.resend(&pending, caller.as_deref(), now) {
                    Ok(issued) => state.mail(&myself, &issued).await,
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
