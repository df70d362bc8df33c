//! What an owning shard keeps about one account.

use crate::ledger::{OwnerAccount, Status};
use crate::store::{AccountExtra, AccountMeta, LoadedAccount};
use crate::wire::AccountView;

/// Everything the owner keeps about one account. Kept small: a million of
/// these live in memory, most with no owner, tags or memo.
pub struct Slot {
    pub acct: OwnerAccount,
    /// The last committed transfer touching the account (head of its history).
    pub last: u64,
    /// Milliseconds since the Unix epoch.
    pub created: u64,
    /// Owner, tags and memo, when any is set.
    pub extra: Option<Box<AccountExtra>>,
    /// The account's number in the journal's book (passed along with its
    /// debits, to save the journal a lookup).
    pub num: u32,
    /// Created by a command the journal has not committed yet.
    pub creating: bool,
}

impl Slot {
    /// A slot of no account, to lay out a map's memory with
    /// ([`AccountMap::with_capacity_touched`](crate::ledger::AccountMap::with_capacity_touched)).
    #[must_use]
    pub fn blank() -> Slot {
        Slot { acct: OwnerAccount::new(0), last: 0, created: 0, extra: None, num: 0, creating: false }
    }

    /// A slot for an account with this stored metadata.
    #[must_use]
    pub fn new(meta: &AccountMeta, balance: i64, last: u64) -> Slot {
        let mut acct = OwnerAccount::new(balance);
        if meta.deleted.is_some() {
            acct.status = Status::Deleted;
        }
        Slot { acct, last, created: meta.created, extra: AccountExtra::of(meta), num: meta.num, creating: false }
    }

    /// A slot for an account as loaded at start-up (its extra parts moved in).
    #[must_use]
    pub fn loaded(a: LoadedAccount) -> Slot {
        let mut acct = OwnerAccount::new(a.balance);
        if a.deleted {
            acct.status = Status::Deleted;
        }
        Slot { acct, last: a.last, created: a.created, extra: a.extra, num: a.num, creating: false }
    }

    #[must_use]
    pub fn owner(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|e| e.owner.as_deref())
    }

    pub(crate) fn view(&self, account: &str) -> AccountView {
        let e = self.extra.as_deref();
        AccountView {
            account: account.to_owned(),
            owner: self.owner().map(str::to_owned),
            tags: e.map(|e| e.tags.iter().map(|t| t.to_string()).collect()).unwrap_or_default(),
            balance: self.acct.balance,
            available: self.acct.available(),
            status: "open",
            created: self.created,
            memo: e.and_then(|e| e.memo.as_deref()).map(str::to_owned),
            as_of: None,
        }
    }
}
