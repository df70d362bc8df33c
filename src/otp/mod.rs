//! One-time passwords: the OTP supervisor actor.
//!
//! The supervisor owns every pending session (its user, the operation
//! waiting for confirmation, the code kept as a keyed hash, expiry, wrong
//! tries and resends), the guessing budgets of every user, drops expired
//! sessions on its own timer, and supervises the mailer actor (`otp/mail.rs`)
//! that delivers codes: if the mailer fails it is started again and the
//! sessions, which live here, carry on.
//!
//! The rules are in [`sessions`], plain data and functions tested without
//! actors; [`OtpActor`] adds the timer, the mail queue and the supervision.
//! Nothing here awaits another actor: a request that opens a session gets
//! back a oneshot on which it (not the supervisor) waits for the mail.
//!
//! # Why guessing stays hopeless
//!
//! A session allows `otp.tries_max` wrong codes, but sessions are cheap to
//! open, so the real bound is per *user*: each user has a budget of wrong
//! codes per purpose ([`Purpose`]) that new sessions never refill
//! ([`crate::limits::OTP_GUESSES`]: 5, then waits doubling from a
//! minute). While a budget waits, `confirm` answers `rate_limited` without
//! looking at the code, so guesses sent then are not even checked. Resets
//! (anonymous) and confirmations (logged in) have separate budgets: an
//! attacker's wrong reset codes never stop the user's own transfers.
//! Resets are also bounded per user, per source address and (mails) per
//! mail address. A reset for a user that does not exist, or for an admin
//! (admins reset on the host), opens a decoy session: same answers, same
//! limits, no code anywhere, so neither existence nor role leaks.

pub mod mail;
pub mod sessions;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort, SupervisionEvent};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use self::mail::{Mail, MailerActor, MailerArgs, Transport};
use self::sessions::otp_error;
pub use self::sessions::{Action, BatchTransfer, Code, Issued, OutMail, Purpose, Rules, Sessions, CODE_DIGITS};
use crate::clock::Clock;
use crate::error::{ApiError, ErrorCode};
use crate::limits::OTP_SWEEP_INTERVAL_MS;

/// The mail body: the code and when it expires.
#[must_use]
pub fn mail_body(code: &Code, expires_at_ms: u64, ttl_s: u64) -> String {
    format!(
        // Lines stay short so the body goes out as plain 7-bit text.
        "Your Tally code is {}\r\n\r\nIt expires at {} UTC (in {ttl_s} seconds)\r\n\
         and works once. If you did not ask for it, ignore this mail:\r\n\
         nothing happens without the code.\r\n",
        code.expose(),
        crate::clock::utc(expires_at_ms)
    )
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
    /// Expiry and budgets run on this clock.
    pub clock: Clock,
    /// Permits for mails queued and not yet handled,
    /// [`MAIL_QUEUE_MAX`](crate::limits::MAIL_QUEUE_MAX) of them: a stop
    /// waits (bounded) until they are all back.
    pub mail_queue: Arc<Semaphore>,
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
    clock: Clock,
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
            mail_queue: args.mail_queue,
            sweeper: None,
            clock: args.clock,
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
        let now = state.clock.now_ms();
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
                            state.sessions.cancel(&pending);
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
