//! The read side: users, transfers, histories, account lists and redeem
//! requests, each through one read transaction.

use super::balances::Rows;
use super::history::{History, Records};
use super::record::{for_each_record_unhashed, ChunkCache};
use super::recovery::{legs, read_checkpoint};
use super::*;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::limits::LIST_SCAN_MAX;
use crate::wire::{ListedAccount, TransferView};

/// Redeem requests, newest first: all of them (optionally of one status),
/// or one user's. At most `limit`, looking at no more than `LIST_SCAN_MAX`.
pub fn redeems(
    db: &Database,
    user: Option<&str>,
    status: Option<RedeemStatus>,
    limit: usize,
) -> Result<Vec<RedeemRecord>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(REDEEMS)?;
    let mut out = Vec::new();
    let mut keep = |r: RedeemRecord| {
        if status.is_none_or(|s| r.status == s) {
            out.push(r);
        }
        out.len() < limit
    };
    match user {
        Some(u) => {
            let index = txn.open_table(USER_REDEEMS)?;
            for row in index.range((u, 0)..=(u, u64::MAX))?.rev().take(LIST_SCAN_MAX) {
                let id = row?.0.value().1;
                if let Some(v) = table.get(id)? {
                    if !keep(RedeemRecord::decode(v.value())?) {
                        break;
                    }
                }
            }
        }
        None => {
            for row in table.iter()?.rev().take(LIST_SCAN_MAX) {
                if !keep(RedeemRecord::decode(row?.1.value())?) {
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// Reads one user.
pub fn get_user(db: &Database, user: &str) -> Result<Option<UserRecord>, StoreError> {
    let txn = db.begin_read()?;
    let users = txn.open_table(USERS)?;
    users.get(user)?.map(|v| UserRecord::decode(v.value())).transpose()
}

/// Reads every user (start-up: the registry of token epochs).
pub fn load_users(db: &Database) -> Result<Vec<UserRecord>, StoreError> {
    load_all(db, USERS, UserRecord::decode)
}

/// Reads every service key (start-up: the registry).
pub fn load_keys(db: &Database) -> Result<Vec<KeyRecord>, StoreError> {
    load_all(db, SERVICE_KEYS, KeyRecord::decode)
}

/// Every row of a table of encoded records, decoded.
fn load_all<T>(
    db: &Database,
    table: redb::TableDefinition<&str, &[u8]>,
    decode: fn(&[u8]) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let txn = db.begin_read()?;
    let rows = txn.open_table(table)?;
    let mut out = Vec::new();
    for row in rows.iter()? {
        out.push(decode(row?.1.value())?);
    }
    Ok(out)
}

/// A page of service keys in key id order, after `after`, and whether
/// there are more.
pub fn list_keys(db: &Database, after: Option<&str>, limit: usize) -> Result<(Vec<KeyRecord>, bool), StoreError> {
    let txn = db.begin_read()?;
    let keys = txn.open_table(SERVICE_KEYS)?;
    let rows = match after {
        Some(after) => keys.range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))?,
        None => keys.range::<&str>(..)?,
    };
    let mut out = Vec::new();
    for row in rows.take(limit + 1) {
        out.push(KeyRecord::decode(row?.1.value())?);
    }
    let more = out.len() > limit;
    out.truncate(limit);
    Ok((out, more))
}

/// Reads one service key.
pub fn get_key(db: &Database, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
    let txn = db.begin_read()?;
    let keys = txn.open_table(SERVICE_KEYS)?;
    keys.get(key_id)?.map(|v| KeyRecord::decode(v.value())).transpose()
}

/// Writes one service key directly (`tally admin create-key`, with the
/// server stopped).
pub fn put_key(db: &Database, key: &KeyRecord) -> Result<(), StoreError> {
    let txn = begin_write(db)?;
    txn.open_table(SERVICE_KEYS)?.insert(key.key_id.as_str(), &key.encode()[..])?;
    txn.commit()?;
    Ok(())
}

/// Writes one user directly (start-up only, before the journal runs).
pub fn put_user(db: &Database, user: &UserRecord) -> Result<(), StoreError> {
    let txn = begin_write(db)?;
    txn.open_table(USERS)?.insert(user.user.as_str(), &user.encode()[..])?;
    txn.commit()?;
    Ok(())
}

pub(super) fn view_of(stored: Stored<'_>) -> Result<TransferView, StoreError> {
    Ok(stored.record()?.owned().view(&stored.hash))
}

/// Reads one transfer.
pub fn get_transfer(db: &Database, history: &History, id: u64) -> Result<Option<TransferView>, StoreError> {
    let txn = db.begin_read()?;
    Records::open(&txn, history)?.with_record(id, view_of)
}

/// Owner of an account, if it exists.
pub fn account_meta(db: &Database, account: &str) -> Result<Option<AccountMeta>, StoreError> {
    let txn = db.begin_read()?;
    let a = txn.open_table(ACCOUNTS)?;
    a.get(account)?.map(|v| AccountMeta::decode(v.value())).transpose()
}

/// A page of `account`'s history, newest first, starting at record
/// `start` (the account's last record, or the one before the cursor), and
/// the cursor of the next page.
pub fn history(
    db: &Database,
    records: &History,
    account: &str,
    start: u64,
    limit: usize,
) -> Result<(Vec<TransferView>, Option<u64>), StoreError> {
    let txn = db.begin_read()?;
    let records = Records::open(&txn, records)?;
    let mut out = Vec::with_capacity(limit.min(1024));
    let mut id = start;
    let mut cache = ChunkCache::default();
    while id != 0 && out.len() < limit {
        let (view, prev) = records
            .with(&mut cache, id, |stored| {
                let r = stored.record()?.owned();
                let prev = r
                    .link_of(account)
                    .ok_or_else(|| StoreError::Corrupt(format!("transfer {id} is not {account}'s")))?;
                Ok((r.view(&stored.hash), prev))
            })?
            .ok_or_else(|| StoreError::Corrupt(format!("history points at missing transfer {id}")))?;
        out.push(view);
        id = prev;
    }
    let next = if id == 0 { None } else { out.last().map(|t| t.id) };
    Ok((out, next))
}

/// Where the page after cursor `after` starts: the record before `after` in
/// `account`'s list. `None` if `after` is not one of the account's records.
pub fn history_after(db: &Database, history: &History, account: &str, after: u64) -> Result<Option<u64>, StoreError> {
    let txn = db.begin_read()?;
    let link =
        Records::open(&txn, history)?.with_record(after, |stored| Ok(stored.record()?.owned().link_of(account)))?;
    Ok(link.flatten())
}

/// Filters of `list_accounts`.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub owner: Option<String>,
    pub tag: Option<String>,
    pub balance_min: Option<i64>,
    pub balance_max: Option<i64>,
}

/// A candidate of a `list_accounts` page: open and of the wanted tag, with
/// its balance row, brought up to date by [`tail_onto`]. Its other parts
/// are read again only if it is listed, so a block stays small.
struct Candidate {
    id: String,
    balance: i64,
    last: u64,
}

/// Adds the records after `checkpoint` to the candidates' balances, for
/// the rows that do not include them yet, one record at a time as
/// start-up's replay does. Only the candidates' balances are kept, so what
/// a page holds is bounded by its candidates, not by how far the
/// balance-row sweep lags behind the head.
fn tail_onto(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    checkpoint: u64,
    block: &mut [Candidate],
) -> Result<(), StoreError> {
    if block.is_empty() {
        return Ok(());
    }
    let at: std::collections::HashMap<&str, usize, foldhash::fast::RandomState> =
        block.iter().enumerate().map(|(i, c)| (c.id.as_str(), i)).collect();
    let mut balances: Vec<i64> = block.iter().map(|c| c.balance).collect();
    // Neither the chain nor the hashes: the records' moves are all a page
    // needs, and the chain is checked at start-up and by `audit`.
    for_each_record_unhashed(chunks, checkpoint + 1, |r| {
        for (account, delta) in legs(&r)? {
            match at.get(account) {
                Some(&i) if delta != 0 && r.id > block[i].last => {
                    balances[i] = balances[i]
                        .checked_add(delta)
                        .ok_or_else(|| StoreError::Corrupt(format!("replaying transfer {}: overflow", r.id)))?;
                }
                _ => {}
            }
        }
        Ok(true)
    })?;
    drop(at);
    for (c, balance) in block.iter_mut().zip(balances) {
        c.balance = balance;
    }
    Ok(())
}

/// Accounts listed under `key` in an index table of (key, account) pairs,
/// in account order, starting at `after`.
fn index_members(
    txn: &redb::ReadTransaction,
    index: TableDefinition<(&str, &str), ()>,
    key: &str,
    after: &str,
) -> Result<Box<dyn Iterator<Item = Result<String, StoreError>>>, StoreError> {
    let table = txn.open_table(index)?;
    let key = key.to_owned();
    let it = table.range((key.as_str(), after)..)?;
    Ok(Box::new(
        it.map(|r| r.map(|(k, _)| (k.value().0.to_owned(), k.value().1.to_owned())).map_err(StoreError::from))
            .take_while(move |r| r.as_ref().map_or(true, |(k, _)| *k == key))
            .map(|r| r.map(|(_, account)| account)),
    ))
}

/// A page of open accounts in id order, filtered, with balances as of one
/// instant (one read transaction), and the cursor of the next page.
///
/// Candidates are taken in at most two blocks, each brought up to date
/// with one read of the records after the checkpoint ([`tail_onto`]), then
/// filtered by balance: first the page's `limit`, so an unfiltered page
/// examines only the open accounts it lists (and the deleted ones among
/// them) and reads the records once; then, if a balance filter left the
/// page short, the rest of `LIST_SCAN_MAX`.
pub fn list_accounts(
    db: &Database,
    f: &ListFilter,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<ListedAccount>, Option<String>), StoreError> {
    list_accounts_in_blocks(db, f, after, limit, limit, LIST_SCAN_MAX)
}

/// [`list_accounts`] with its first block and its scan bound given.
pub(super) fn list_accounts_in_blocks(
    db: &Database,
    f: &ListFilter,
    after: Option<&str>,
    limit: usize,
    first_block: usize,
    scan_max: usize,
) -> Result<(Vec<ListedAccount>, Option<String>), StoreError> {
    let txn = db.begin_read()?;
    let checkpoint = read_checkpoint(&txn)?;
    let chunks = txn.open_table(CHUNKS)?;
    let rows = Rows::open(&txn)?;
    let accounts = txn.open_table(ACCOUNTS)?;
    let meta_of = |id: &str| {
        accounts
            .get(id)?
            .map(|v| AccountMeta::decode(v.value()))
            .transpose()?
            .ok_or_else(|| StoreError::Corrupt(format!("index names a missing account {id}")))
    };
    let after = after.unwrap_or("");
    // Candidates in id order: from an index when there is one to use.
    let mut candidates: Box<dyn Iterator<Item = Result<String, StoreError>>> = match (&f.owner, &f.tag) {
        (Some(owner), _) => index_members(&txn, OWNERS, owner, after)?,
        (None, Some(tag)) => index_members(&txn, TAGS, tag, after)?,
        (None, None) => {
            Box::new(accounts.range(after..)?.map(|r| r.map(|(k, _)| k.value().to_owned()).map_err(StoreError::from)))
        }
    };
    let mut out = Vec::new();
    let mut scanned = 0usize;
    let mut block_len = first_block.max(1);
    loop {
        let mut block = Vec::new();
        let mut last_scanned = None;
        let mut exhausted = false;
        while block.len() < block_len && scanned < scan_max {
            let Some(id) = candidates.next().transpose()? else {
                exhausted = true;
                break;
            };
            if id == after {
                continue;
            }
            scanned += 1;
            let meta = meta_of(&id)?;
            if meta.deleted.is_none() && f.tag.as_ref().is_none_or(|t| meta.tags.contains(t)) {
                let (balance, last) = rows.get(meta.num)?;
                block.push(Candidate { id: id.clone(), balance, last });
            }
            last_scanned = Some(id);
        }
        tail_onto(&chunks, checkpoint, &mut block)?;
        for Candidate { id, balance, .. } in block {
            if f.balance_min.is_none_or(|m| balance >= m) && f.balance_max.is_none_or(|m| balance <= m) {
                let meta = meta_of(&id)?;
                out.push(ListedAccount {
                    account: id.clone(),
                    owner: meta.owner,
                    tags: meta.tags,
                    balance,
                    created: meta.created,
                    memo: meta.memo,
                });
                if out.len() == limit {
                    return Ok((out, Some(id)));
                }
            }
        }
        if exhausted {
            return Ok((out, None));
        }
        if scanned >= scan_max {
            return Ok((out, last_scanned));
        }
        // The second block is the rest of what one page may examine.
        block_len = scan_max - scanned;
    }
}
