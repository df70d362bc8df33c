//! Error codes of the wire protocol and the one error type every handler returns.

use serde::Serialize;

/// A stable, snake_case error code (protocol.md, "Error codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame could not be decoded as a request.
    BadFrame,
    /// The frame's declared length exceeds `limits.frame_bytes_max`.
    FrameTooLarge,
    /// The request's arguments are missing, of the wrong type or out of range.
    BadRequest,
    /// The op is not one Tally knows.
    UnknownOp,
    /// The connection is not bound to a user, or its token no longer works.
    Unauthenticated,
    /// The user may not do this.
    Forbidden,
    /// The account, transfer or user does not exist.
    NotFound,
    /// The id is taken.
    Exists,
    /// The account was deleted.
    Deleted,
    /// The debit would take the account below its minimum.
    InsufficientFunds,
    /// The credit would take the account above its maximum.
    AboveMax,
    /// The change would take the account below its minimum.
    BelowMin,
    /// Sender or receiver lacks the events required.
    Ineligible,
    OtpInvalid,
    OtpExpired,
    OtpExhausted,
    /// Too many attempts; try later.
    RateLimited,
    /// The idempotency key was used with different arguments.
    KeyConflict,
    /// The server is at a limit; try later.
    Overloaded,
    /// The server cannot commit right now (its storage failed and is being
    /// reopened); nothing was changed; try again shortly.
    Unavailable,
    /// Something failed inside the server (disk, bug); nothing was changed.
    Internal,
    /// This member of a cluster is not its leader: nothing was changed;
    /// the error map's `leader` names the leader's client address when known.
    NotLeader,
    /// A write was proposed to the cluster but its fate is unknown (the
    /// leader lost its majority or its place while waiting): it may or may
    /// not have been applied. Retry only with the same idempotency key.
    UnknownOutcome,
}

impl ErrorCode {
    /// Every code, in declaration order (`code as usize` is its place).
    pub const ALL: [ErrorCode; 23] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Exists,
        ErrorCode::Deleted,
        ErrorCode::InsufficientFunds,
        ErrorCode::AboveMax,
        ErrorCode::BelowMin,
        ErrorCode::Ineligible,
        ErrorCode::OtpInvalid,
        ErrorCode::OtpExpired,
        ErrorCode::OtpExhausted,
        ErrorCode::RateLimited,
        ErrorCode::KeyConflict,
        ErrorCode::Overloaded,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::NotLeader,
        ErrorCode::UnknownOutcome,
    ];

    /// The code as it appears on the wire.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Exists => "exists",
            ErrorCode::Deleted => "deleted",
            ErrorCode::InsufficientFunds => "insufficient_funds",
            ErrorCode::AboveMax => "above_max",
            ErrorCode::BelowMin => "below_min",
            ErrorCode::Ineligible => "ineligible",
            ErrorCode::OtpInvalid => "otp_invalid",
            ErrorCode::OtpExpired => "otp_expired",
            ErrorCode::OtpExhausted => "otp_exhausted",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::KeyConflict => "key_conflict",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::UnknownOutcome => "unknown_outcome",
        }
    }
}

/// An error reply: a code for programs and a message for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The failing item of an atomic `transfer_batch` (0-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
    /// With `not_leader`: the leader's client address, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

impl ApiError {
    /// An error with this code and message; a message longer than
    /// `ERROR_MESSAGE_BYTES_MAX` (it may quote the request) is cut, so that
    /// every error reply is small.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: cut(message.into(), crate::limits::ERROR_MESSAGE_BYTES_MAX),
            item: None,
            leader: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    /// The same error, naming the batch item it is about.
    #[must_use]
    pub fn at_item(mut self, item: usize) -> Self {
        self.item = Some(item);
        self
    }
}

/// `message` cut to at most `max` bytes (at least 4), ending in `...` when cut.
#[must_use]
pub fn cut(mut message: String, max: usize) -> String {
    if message.len() > max {
        let mut end = max - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

impl From<crate::ledger::LedgerError> for ApiError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        use crate::ledger::LedgerError as L;
        let code = match e {
            L::InsufficientFunds { .. } => ErrorCode::InsufficientFunds,
            L::AboveMax { .. } | L::Overflow => ErrorCode::AboveMax,
            L::BelowMin { .. } | L::Underflow => ErrorCode::BelowMin,
            L::NotFound(_) => ErrorCode::NotFound,
            L::Deleted(_) => ErrorCode::Deleted,
            L::Exists(_) => ErrorCode::Exists,
            L::BadAmount(_) | L::BadId(_) | L::BadField(_) | L::SameAccount | L::NothingLeft { .. } => {
                ErrorCode::BadRequest
            }
            L::SenderIneligible { .. } | L::ReceiverIneligible { .. } => ErrorCode::Ineligible,
            L::NotAllowed(_) => ErrorCode::Forbidden,
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<redb::Error> for ApiError {
    fn from(e: redb::Error) -> Self {
        tracing::error!(error = %e, "storage error");
        ApiError::internal("storage error")
    }
}
