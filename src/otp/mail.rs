//! The mailer actor: delivers OTP codes through lettre.
//!
//! It is a child of the OTP supervisor (`otp/mod.rs`), which restarts it if it
//! fails. Each mail carries a permit from the supervisor's mail queue
//! (`MAIL_QUEUE_MAX`), so the mailbox is bounded, and a oneshot on which the
//! request that asked for the mail learns whether it was delivered.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::limits::{MAIL_ATTEMPTS_MAX, MAIL_RETRY_DELAY_MS, MAIL_SEND_TIMEOUT_MS};

/// Where mail goes (`mail.transport`).
#[derive(Clone)]
pub enum Transport {
    /// `smtp://host:port` (plain, for a local relay) or
    /// `smtps://user:pass@host:port` (TLS from the first byte, rustls).
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// `file:///dir`: one `.eml` file per message (the dev default), named
    /// by time (`20261201T131642.123Z-1a2b3c4d.eml`, so the newest sorts
    /// last) and readable by the server's user only: it holds a live code.
    File(PathBuf),
    /// `log`: dev only; the log notes that a mail was sent, never its body.
    Log,
}

impl Transport {
    /// Parses `mail.transport`; a `file://` folder is created if missing.
    pub fn parse(spec: &str) -> Result<Transport, String> {
        if spec == "log" {
            return Ok(Transport::Log);
        }
        if let Some(dir) = spec.strip_prefix("file://") {
            let dir = Path::new(dir);
            if !dir.is_absolute() {
                return Err("mail.transport file:// needs an absolute folder, e.g. file:///var/mail/tally".into());
            }
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create mail folder {}: {e}", dir.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| format!("cannot restrict mail folder {}: {e}", dir.display()))?;
            }
            return Ok(Transport::File(dir.to_owned()));
        }
        if spec.starts_with("smtp://") || spec.starts_with("smtps://") {
            let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(spec)
                // The URL may hold a password: say what is wrong, not what it was.
                .map_err(|_| "mail.transport is not a valid smtp:// or smtps:// URL".to_owned())?;
            let timeout = Duration::from_millis(MAIL_SEND_TIMEOUT_MS);
            return Ok(Transport::Smtp(builder.timeout(Some(timeout)).build()));
        }
        Err("mail.transport must be smtp://host:port, smtps://user:pass@host:port, file:///dir or log".into())
    }
}

/// One mail to deliver.
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub body: String,
    /// Told whether the mail was delivered (or why not).
    pub done: oneshot::Sender<Result<(), String>>,
    /// Held until the mail is handled: bounds the mailer's queue.
    pub permit: OwnedSemaphorePermit,
}

pub struct MailerArgs {
    pub transport: Transport,
    pub from: Mailbox,
}

/// Sends mails one at a time, retrying transient failures a bounded number
/// of times.
pub struct MailerActor;

impl Actor for MailerActor {
    type Msg = Mail;
    type State = MailerArgs;
    type Arguments = MailerArgs;

    async fn pre_start(&self, _myself: ActorRef<Mail>, args: MailerArgs) -> Result<MailerArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Mail>,
        mail: Mail,
        state: &mut MailerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let Mail { to, subject, body, done, permit } = mail;
        let outcome = deliver(state, &to, subject, body).await;
        match &outcome {
            Ok(()) => crate::stats::Stats::add(&crate::metrics::MAILS_SENT, 1),
            Err(e) => {
                crate::stats::Stats::add(&crate::metrics::MAILS_FAILED, 1);
                tracing::warn!(to = %to, error = %e, "mail not delivered");
            }
        }
        let _ = done.send(outcome);
        drop(permit);
        Ok(())
    }
}

async fn deliver(state: &MailerArgs, to: &str, subject: String, body: String) -> Result<(), String> {
    let to: Mailbox = to.parse().map_err(|_| "the user's email address is not usable".to_owned())?;
    let message = Message::builder()
        .from(state.from.clone())
        .to(to.clone())
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| format!("cannot build the mail: {e}"))?;
    match &state.transport {
        Transport::Log => {
            tracing::info!(to = %to, "mail sent to the log transport (its body, and any code, is not logged)");
            Ok(())
        }
        Transport::File(dir) => {
            let (dir, bytes) = (dir.clone(), message.formatted());
            tokio::task::spawn_blocking(move || write_mail_file(&dir, &bytes))
                .await
                .map_err(|e| format!("cannot write the mail: {e}"))?
                .map_err(|e| format!("cannot write the mail: {e}"))
        }
        Transport::Smtp(t) => {
            let mut attempt = 1;
            loop {
                match t.send(message.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.is_permanent() || attempt >= MAIL_ATTEMPTS_MAX => {
                        return Err(format!("could not deliver the mail after {attempt} attempt(s): {e}"));
                    }
                    Err(e) => {
                        tracing::debug!(attempt, error = %e, "mail attempt failed; retrying");
                        tokio::time::sleep(Duration::from_millis(MAIL_RETRY_DELAY_MS * u64::from(attempt))).await;
                        attempt += 1;
                    }
                }
            }
        }
    }
}

/// A mail file's name: the time first (UTC, to the millisecond), then a
/// random part so that two mails in one millisecond do not collide.
fn mail_file_name(now_ms: u64, random: u32) -> String {
    let day_time: String = crate::clock::utc(now_ms)
        .chars()
        .filter_map(|c| match c {
            '-' | ':' => None,
            ' ' => Some('T'),
            c => Some(c),
        })
        .collect();
    format!("{day_time}.{:03}Z-{random:08x}.eml", now_ms % 1000)
}

/// Writes one mail into `dir`, mode 0600, never over another file. It is
/// written under a hidden name first and renamed, so whoever watches the
/// folder never reads half a mail.
fn write_mail_file(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut random = [0u8; 4];
    getrandom::fill(&mut random).map_err(|e| std::io::Error::other(e.to_string()))?;
    let name = mail_file_name(crate::clock::now_ms(), u32::from_le_bytes(random));
    let partial = dir.join(format!(".{name}.partial"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&partial)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&partial, dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::Transport;

    #[test]
    fn mail_files_are_named_by_time_first() {
        assert_eq!(super::mail_file_name(1_795_312_800_500, 0x1a2b), "20261122T020000.500Z-00001a2b.eml");
        assert!(super::mail_file_name(1_795_312_800_500, u32::MAX) < super::mail_file_name(1_795_312_800_501, 0));
    }

    #[test]
    fn transports_parse_and_bad_ones_say_why_without_echoing_secrets() {
        assert!(matches!(Transport::parse("log"), Ok(Transport::Log)));
        assert!(matches!(Transport::parse("smtp://127.0.0.1:2525"), Ok(Transport::Smtp(_))));
        assert!(matches!(Transport::parse("smtps://tally:s3cret@mail.example.org:465"), Ok(Transport::Smtp(_))));
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("file://{}", dir.path().join("out").display());
        assert!(matches!(Transport::parse(&spec), Ok(Transport::File(_))));
        assert!(dir.path().join("out").is_dir());
        for bad in ["file://relative/dir", "pop3://host", "smtp://", "mailto:x@y"] {
            assert!(Transport::parse(bad).is_err(), "{bad}");
        }
        let e = Transport::parse("smtp://user:s3cret@[bad").err().unwrap();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
