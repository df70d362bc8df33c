//! The campus rules for a user's transfer: who may receive, eligibility,
//! and the fee.

use super::LedgerError;

/// The campus rules for user-to-user transfers (`[policy]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub min_events: u64,
    pub fee_same_group_bps: u32,
    pub fee_cross_group_bps: u32,
    pub fee_rounding: FeeRounding,
}

/// How a fee that is not a whole number of units rounds (`policy.fee_rounding`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeeRounding {
    /// Toward zero: small transfers may pay no fee at all.
    #[default]
    Down,
    /// Away from zero: every transfer with a non-zero rate pays at least 1.
    Up,
}

/// A user taking part in a transfer.
#[derive(Clone, Copy, Debug)]
pub struct Party<'a> {
    pub user: &'a str,
    pub admin: bool,
    pub group: Option<&'a str>,
    pub events: u64,
}

/// Who receives a user's transfer.
#[derive(Clone, Copy, Debug)]
pub enum Receiver<'a> {
    /// An account owned by a user.
    User(Party<'a>),
    /// An account without an owner (e.g. a shop's till an admin created).
    Unowned,
    /// `@mint`, `@treasury`, `@redeemed`.
    System,
}

impl Policy {
    /// The fee a user (`sender`) pays to move `amount` to `receiver`, or
    /// why the transfer is refused: users cannot pay system or admin
    /// accounts; both users need `min_events`. Only user-to-user transfers
    /// pay a fee: the same-group rate when both users have the same group
    /// (or both none), the cross-group rate otherwise; it rounds as
    /// `fee_rounding` says, and a fee that would leave the receiver nothing
    /// is refused.
    pub fn user_transfer(&self, sender: &Party<'_>, receiver: &Receiver<'_>, amount: i64) -> Result<i64, LedgerError> {
        self.user_transfer_bps(sender, receiver).and_then(|bps| net_fee(amount, bps, self.fee_rounding))
    }

    /// The fee rate of [`Policy::user_transfer`], or why it is refused.
    pub fn user_transfer_bps(&self, sender: &Party<'_>, receiver: &Receiver<'_>) -> Result<u32, LedgerError> {
        let sender_eligible = |p: &Party<'_>| {
            if p.events >= self.min_events {
                Ok(())
            } else {
                Err(LedgerError::SenderIneligible { events: p.events, min: self.min_events })
            }
        };
        let receiver_eligible = |p: &Party<'_>| {
            if p.events >= self.min_events {
                Ok(())
            } else {
                Err(LedgerError::ReceiverIneligible { user: p.user.to_owned() })
            }
        };
        match receiver {
            Receiver::System => Err(LedgerError::NotAllowed("users cannot transfer to system accounts".into())),
            // Between one's own wallets: not user-to-user, so no fee and no rule.
            Receiver::User(r) if r.user == sender.user => Ok(0),
            Receiver::User(r) if r.admin => {
                Err(LedgerError::NotAllowed("users cannot transfer to an admin's account".into()))
            }
            Receiver::Unowned => {
                sender_eligible(sender)?;
                Ok(0)
            }
            Receiver::User(r) => {
                sender_eligible(sender)?;
                receiver_eligible(r)?;
                Ok(if sender.group == r.group { self.fee_same_group_bps } else { self.fee_cross_group_bps })
            }
        }
    }
}

/// The fee on `amount` (positive) at `bps` basis points, rounded as `rounding` says.
#[must_use]
pub fn fee(amount: i64, bps: u32, rounding: FeeRounding) -> i64 {
    // i128 so that amount * bps cannot overflow; the result is <= amount.
    let scaled = i128::from(amount) * i128::from(bps);
    let fee = match rounding {
        FeeRounding::Down => scaled / 10_000,
        FeeRounding::Up => (scaled + 9_999) / 10_000,
    };
    i64::try_from(fee).unwrap_or(amount).min(amount)
}

/// The fee on `amount` at `bps`, refused when it would leave the receiver
/// nothing (a rate below 100% never should: only rounding up can do that).
pub fn net_fee(amount: i64, bps: u32, rounding: FeeRounding) -> Result<i64, LedgerError> {
    let f = fee(amount, bps, rounding);
    if f > 0 && f >= amount {
        return Err(LedgerError::NothingLeft { amount, fee: f });
    }
    Ok(f)
}
