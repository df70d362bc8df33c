//! Two-phase transfers: a hold is settled (posted or voided) exactly once.

use super::LedgerError;

/// Where a two-phase transfer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Open,
    Posted,
    Voided,
}

/// A two-phase transfer: `amount` held on `from` for `to`, then posted
/// (whole or in part; the rest is released) or voided, exactly once.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub status: HoldStatus,
    /// What went to `to` (0 unless posted).
    pub posted: i64,
    /// What went back to being available on `from`.
    pub released: i64,
}

impl Hold {
    #[must_use]
    pub fn new(from: &str, to: &str, amount: i64) -> Hold {
        Hold { from: from.to_owned(), to: to.to_owned(), amount, status: HoldStatus::Open, posted: 0, released: 0 }
    }

    fn open(&self) -> Result<(), LedgerError> {
        match self.status {
            HoldStatus::Open => Ok(()),
            s => Err(LedgerError::NotAllowed(format!("the hold is already {}", s.as_str()))),
        }
    }

    /// How much a post of `amount` (default: all) moves; the rest is released.
    pub fn post_amount(&self, amount: Option<i64>) -> Result<i64, LedgerError> {
        self.open()?;
        let x = amount.unwrap_or(self.amount);
        if !(1..=self.amount).contains(&x) {
            return Err(LedgerError::BadAmount(format!("a post moves 1..={} of this hold", self.amount)));
        }
        Ok(x)
    }

    /// Records a post of `x` (checked by `post_amount`).
    pub fn posted(&mut self, x: i64) {
        assert!(self.status == HoldStatus::Open && (1..=self.amount).contains(&x));
        self.status = HoldStatus::Posted;
        self.posted = x;
        self.released = self.amount - x;
    }

    /// Voids the hold: everything is released.
    pub fn void(&mut self) -> Result<i64, LedgerError> {
        self.open()?;
        self.status = HoldStatus::Voided;
        self.released = self.amount;
        Ok(self.amount)
    }
}

impl HoldStatus {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Open => "open",
            HoldStatus::Posted => "posted",
            HoldStatus::Voided => "voided",
        }
    }
}
