//! An account as its owner (the shard actor that is its single writer)
//! sees it: debits reserved early, credits applied late.

use super::{validate_amount, Bounds, LedgerError};

/// Whether an account accepts changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Open,
    Deleted,
}

/// An account as its owning shard sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerAccount {
    /// Committed balance, as far as committed batches have been delivered.
    pub balance: i64,
    /// Debits reserved but not yet committed.
    pub reserved: i64,
    /// Held by open two-phase transfers (`hold`): still in the balance, not available.
    pub held: i64,
    pub status: Status,
}

impl OwnerAccount {
    #[must_use]
    pub fn new(balance: i64) -> Self {
        OwnerAccount { balance, reserved: 0, held: 0, status: Status::Open }
    }

    /// What can be spent now: the balance less every reservation and hold.
    #[must_use]
    pub fn available(&self) -> i64 {
        self.balance.saturating_sub(self.reserved).saturating_sub(self.held)
    }

    /// Reserves `amount` for a debit, or refuses it whole.
    pub fn reserve(&mut self, account: &str, amount: i64, bounds: Bounds) -> Result<(), LedgerError> {
        if self.status == Status::Deleted {
            return Err(LedgerError::Deleted(account.to_owned()));
        }
        validate_amount(amount)?;
        let reserved = self.reserved.checked_add(amount).ok_or(LedgerError::Underflow)?;
        let after =
            self.balance.checked_sub(reserved).and_then(|b| b.checked_sub(self.held)).ok_or(LedgerError::Underflow)?;
        if let Some(min) = bounds.min {
            if after < min {
                return Err(LedgerError::InsufficientFunds {
                    account: account.to_owned(),
                    available: self.available(),
                    amount,
                });
            }
        }
        self.reserved = reserved;
        Ok(())
    }

    /// Applies a committed change: `delta` to the balance, and `release`
    /// taken off the reservations it was made under.
    pub fn settle(&mut self, delta: i64, release: i64) {
        self.balance = self
            .balance
            .checked_add(delta)
            .expect("the book refused any change that overflows, so its owner view cannot");
        self.reserved -= release;
        assert!(self.reserved >= 0, "released more than was reserved");
    }

    /// Applies a committed change to the held amount.
    pub fn settle_held(&mut self, delta: i64) {
        self.held += delta;
        assert!(self.held >= 0, "released more than was held");
    }
}
