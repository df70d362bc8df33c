//! The journal's state machine: applies a batch of commands to the ledger
//! in memory and says what happened and what to write. No IO, no clock, no
//! channels: the batch's time comes in as an argument, the few rows it needs
//! that are not in memory (account metadata, users, holds, redeem requests,
//! tag members) are read through [`Cold`], and everything it writes comes
//! out as [`Writes`], which `commit.rs` puts into one redb transaction. So
//! the same state, batch and time give byte-identical records and hashes
//! (a unit test applies one batch to two copies), which is what a replica
//! will rely on.
//!
//! Commands are only read: their answers (a `ReplyTo` or a oneshot) ride
//! along untouched, and the fan-out pairs each with its [`Outcome`].
//!
//! Every rule that can refuse a command refuses it before it changes
//! anything (the book's operations check first, then apply), so a refused
//! command leaves no trace in the state or in the writes.

use std::collections::{BTreeMap, BTreeSet};

use crate::contract::{
    AdminEffect, BatchCmd, BulkCmd, Command, CreateCmd, Done, KeyChange, KeyCmd, Outcome, SettleCmd, SettleOp,
    TransferCmd, UserChange, UserCmd,
};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{
    is_system, net_fee, Applied, Book, BookAccount, FeeRounding, Hold, HoldStatus, Kind, LedgerError, Mode, Status,
    MINT, TREASURY,
};
use crate::limits::{CHUNK_RECORDS_MAX, REVOKED_TOKENS_PER_USER_MAX, TAGS_PER_ACCOUNT_MAX};
use crate::store::{
    self, AccountMeta, Head, HoldRecord, KeyRecord, RecordRef, RedeemRecord, RedeemStatus, StoreError, Stored,
    UserRecord,
};
use crate::wire::{BulkReply, CountReply, DeletedReply, Reply, SettleReply, TagsReply, TransferView};

/// The rows a batch may need that are not kept in memory, as they stood
/// before the batch (the batch's own writes are seen through [`Writes`]).
pub trait Cold {
    fn meta(&self, account: &str) -> Result<Option<AccountMeta>, StoreError>;
    fn user(&self, user: &str) -> Result<Option<UserRecord>, StoreError>;
    fn hold(&self, id: u64) -> Result<Option<HoldRecord>, StoreError>;
    fn redeem(&self, id: u64) -> Result<Option<RedeemRecord>, StoreError>;
    fn service_key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// The accounts with `tag`, in id order.
    fn tagged(&self, tag: &str) -> Result<Vec<String>, StoreError>;
}

/// Everything a batch writes besides the balances (in the book) and the
/// head, in a deterministic order. In a cluster it is what a Raft entry
/// carries (MessagePack), so that every member writes exactly these rows.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Writes {
    /// The batch's records as chunks (`store` module docs: a header at
    /// each chunk's start, then `len u16 | record` each), in id order from
    /// `first_id`; `ends[i]` is where record `first_id + i` ends. A chunk
    /// starts at every [`CHUNK_RECORDS_MAX`]th record. (Entries written
    /// before version 3 hold `len u32 | record` chunks without a header;
    /// [`store::chunk_records`] reads both.)
    #[serde(with = "serde_bytes")]
    pub records: Vec<u8>,
    pub ends: Vec<usize>,
    pub first_id: u64,
    /// Each record's parties' account numbers where the deciding book had
    /// them, `from` then `to` (`u32::MAX`: not known): a cluster member
    /// replaying the batch checks the number against the id there and
    /// looks the id up only if they differ (the lookups were ~7% of a
    /// cluster's CPU). Empty in entries written before it existed.
    #[serde(default)]
    pub nums: Vec<u32>,
    /// Idempotency keys: (from, key) -> record id.
    pub keys: Vec<(Box<str>, Box<str>, u64)>,
    pub accounts: BTreeMap<String, AccountMeta>,
    /// Owner index entries to add: (owner, account).
    pub owners: BTreeSet<(String, String)>,
    /// Tag index entries: (tag, account) -> present.
    pub tags: BTreeMap<(String, String), bool>,
    pub users: BTreeMap<String, UserRecord>,
    pub holds: BTreeMap<u64, HoldRecord>,
    /// Open-hold index: id -> open.
    pub open_holds: BTreeMap<u64, bool>,
    pub redeems: BTreeMap<u64, RedeemRecord>,
    /// Redeem-by-user index entries to add: (user, request).
    pub user_redeems: BTreeSet<(String, u64)>,
    pub service_keys: BTreeMap<String, KeyRecord>,
}

impl Writes {
    /// Empties it for the next batch, keeping the record buffer's memory.
    pub fn clear(&mut self) {
        let mut records = std::mem::take(&mut self.records);
        let mut ends = std::mem::take(&mut self.ends);
        let mut keys = std::mem::take(&mut self.keys);
        let mut nums = std::mem::take(&mut self.nums);
        records.clear();
        ends.clear();
        keys.clear();
        nums.clear();
        *self = Writes { records, ends, keys, nums, ..Writes::default() };
    }

    /// Applies these writes' tag changes for `tag` to `members`.
    pub fn retag(&self, tag: &str, members: &mut BTreeSet<String>) {
        for ((t, account), present) in &self.tags {
            if t == tag {
                if *present {
                    members.insert(account.clone());
                } else {
                    members.remove(account);
                }
            }
        }
    }

    /// The batch's records grouped into chunks of at most
    /// `CHUNK_RECORDS_MAX`: (id of the first record, the chunk's bytes).
    pub fn chunks(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let per = CHUNK_RECORDS_MAX;
        (0..self.ends.len()).step_by(per).map(move |i| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            let end = self.ends[(i + per).min(self.ends.len()) - 1];
            (self.first_id + i as u64, &self.records[start..end])
        })
    }

    /// The account numbers the deciding book gave record `i`'s parties
    /// (see `nums`).
    #[must_use]
    pub fn nums_of(&self, i: usize) -> Option<(u32, u32)> {
        let n = self.nums.get(2 * i..2 * i + 2)?;
        Some((n[0], n[1]))
    }

    /// Each record, with its id and hashes, as its chunk will hold it.
    pub fn each_record(&self) -> impl Iterator<Item = Result<Stored<'_>, StoreError>> {
        self.chunks().flat_map(|(first, bytes)| store::chunk_records(first, bytes))
    }
}

/// The ledger as the journal holds it in memory.
#[derive(Clone, Debug)]
pub struct Machine {
    pub book: Book,
    pub head: Head,
    /// Open holds with a timeout: (expires_at, hold id).
    pub expiring: BTreeSet<(u64, u64)>,
    /// How a posted hold's fee rounds (`policy.fee_rounding`).
    pub fee_rounding: FeeRounding,
}

/// A user error, or a storage error that fails the whole batch.
type Step<T> = Result<Result<T, ApiError>, StoreError>;

/// One batch being applied: reads go to its own writes first, then to cold storage.
struct Batch<'a> {
    cold: &'a dyn Cold,
    w: &'a mut Writes,
    time: u64,
}

impl Batch<'_> {
    fn meta(&self, id: &str) -> Result<Option<AccountMeta>, StoreError> {
        match self.w.accounts.get(id) {
            Some(m) => Ok(Some(m.clone())),
            None => self.cold.meta(id),
        }
    }

    fn user(&self, id: &str) -> Result<Option<UserRecord>, StoreError> {
        match self.w.users.get(id) {
            Some(u) => Ok(Some(u.clone())),
            None => self.cold.user(id),
        }
    }

    fn hold(&self, id: u64) -> Result<Option<HoldRecord>, StoreError> {
        match self.w.holds.get(&id) {
            Some(h) => Ok(Some(h.clone())),
            None => self.cold.hold(id),
        }
    }

    fn redeem(&self, id: u64) -> Result<Option<RedeemRecord>, StoreError> {
        match self.w.redeems.get(&id) {
            Some(r) => Ok(Some(r.clone())),
            None => self.cold.redeem(id),
        }
    }

    fn service_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        match self.w.service_keys.get(id) {
            Some(k) => Ok(Some(k.clone())),
            None => self.cold.service_key(id),
        }
    }

    fn tagged(&self, tag: &str) -> Result<Vec<String>, StoreError> {
        let mut members: BTreeSet<String> = self.cold.tagged(tag)?.into_iter().collect();
        self.w.retag(tag, &mut members);
        Ok(members.into_iter().collect())
    }

    /// Writes an account's metadata and its owner and tag index entries.
    fn put_account(&mut self, id: &str, meta: &AccountMeta) {
        if let Some(owner) = &meta.owner {
            self.w.owners.insert((owner.clone(), id.to_owned()));
        }
        for tag in &meta.tags {
            self.w.tags.insert((tag.clone(), id.to_owned()), true);
        }
        self.w.accounts.insert(id.to_owned(), meta.clone());
    }
}

/// The fields of a record about to be appended.
struct Fields<'a> {
    kind: Kind,
    from: &'a str,
    to: &'a str,
    amount: i64,
    fee: i64,
    memo: Option<&'a str>,
    key: Option<&'a str>,
    /// Who made it (`None`: the server's own timer).
    by: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// The fields of a transfer command's record.
    fn of(c: &'a TransferCmd) -> Fields<'a> {
        Fields {
            kind: c.kind,
            from: &c.from,
            to: &c.to,
            amount: c.amount,
            fee: c.fee,
            memo: c.memo.as_deref(),
            key: c.key.as_deref(),
            by: c.by.as_deref(),
        }
    }
}

impl Machine {
    /// Applies `batch` at `time`. Every command gets an outcome, in order
    /// (a shutdown's is a probe's, never read). `Err` means cold storage
    /// could not be read: the batch must not be committed, and the state
    /// must be reloaded.
    pub fn apply(
        &mut self,
        cold: &dyn Cold,
        batch: &[Command],
        time: u64,
        w: &mut Writes,
    ) -> Result<Vec<Outcome>, StoreError> {
        // Start loading every book entry the batch's transfers touch, so
        // their cache misses overlap instead of stalling one by one.
        for c in batch {
            match c {
                Command::Transfer(t) => {
                    self.book.prefetch(&t.from, t.from_num);
                    self.book.prefetch(&t.to, None);
                }
                Command::Batch(items) => {
                    for (_, t) in &items.items {
                        self.book.prefetch(&t.from, t.from_num);
                        self.book.prefetch(&t.to, None);
                    }
                }
                _ => {}
            }
        }
        w.first_id = self.head.id + 1;
        let mut b = Batch { cold, w, time };
        let mut outcomes = Vec::with_capacity(batch.len());
        for cmd in batch {
            outcomes.push(self.apply_one(&mut b, cmd)?);
        }
        Ok(outcomes)
    }

    fn apply_one(&mut self, b: &mut Batch<'_>, cmd: &Command) -> Result<Outcome, StoreError> {
        Ok(match cmd {
            Command::Transfer(c) => match self.apply_transfer(b, c)? {
                Ok((done, rewarded)) => Outcome::Transfer(Ok(done), rewarded),
                Err(e) => Outcome::Transfer(Err(e), None),
            },
            Command::Batch(c) => Outcome::Batch(self.apply_batch(b, c)?),
            Command::Create(c) => Outcome::Create(self.apply_create(b, c)?),
            Command::User(u) => Outcome::User(apply_user(b, u)?.map(Box::new)),
            Command::Close(c) => Outcome::Admin(
                self.close(b, &c.account, &c.reason, &c.by)?
                    .map(|(deleted, effects)| (Reply::Deleted(DeletedReply { deleted }), effects)),
            ),
            Command::Tag(c) => Outcome::Admin(self.tag(b, &c.account, &c.add, &c.remove)?),
            Command::Bulk(c) => Outcome::Admin(self.bulk(b, c)?),
            Command::Reap(c) => Outcome::Admin(self.reap(b, c.below, &c.reason, &c.by)?),
            Command::Settle(c) => Outcome::Admin(self.settle_hold(b, c)?),
            Command::Key(k) => Outcome::Key(apply_key(b, k)?.map(Box::new)),
            Command::Probe(_) | Command::Shutdown(_) => Outcome::Probe(Ok(())),
        })
    }

    /// Appends one record: links it into its parties' histories, hashes it
    /// onto the chain and moves the head.
    fn append(&mut self, b: &mut Batch<'_>, fields: Fields<'_>, applied: Applied) -> Done {
        let id = self.head.id + 1;
        let links = match applied.nums {
            Some((f, t)) => self.book.link_nums(id, f, t, fields.fee > 0),
            None => self.book.link(id, fields.from, fields.to, fields.fee > 0),
        };
        let rec = RecordRef {
            id,
            kind: fields.kind,
            from: fields.from,
            to: fields.to,
            amount: fields.amount,
            fee: fields.fee,
            memo: fields.memo,
            time: b.time,
            key: fields.key,
            prev: self.head.hash,
            links,
            by: fields.by,
        };
        // Straight into the batch's buffer in chunk format; `chunks` cuts
        // it where each chunk's header is.
        let starts_chunk = b.w.ends.len().is_multiple_of(CHUNK_RECORDS_MAX);
        let hash = store::append_chunked(&mut b.w.records, starts_chunk, &rec);
        b.w.ends.push(b.w.records.len());
        let (f, t) = applied.nums.unwrap_or((u32::MAX, u32::MAX));
        b.w.nums.extend([f, t]);
        if let Some(key) = fields.key {
            b.w.keys.push((fields.from.into(), key.into(), id));
        }
        let prev = self.head.hash;
        self.head = Head { id, hash };
        Done { id, time: b.time, prev, hash, applied }
    }

    /// Applies a transfer; a `mint` to a user's account also counts one
    /// event for that user (events = rewards received).
    fn apply_transfer(&mut self, b: &mut Batch<'_>, c: &TransferCmd) -> Step<(Done, Option<Box<UserRecord>>)> {
        if c.kind == Kind::Hold {
            return self.apply_hold(b, c);
        }
        let applied = match self.book.transfer_hinted(&c.from, c.from_num, &c.to, c.amount, c.fee, c.mode) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e.into())),
        };
        let done = self.append(b, Fields::of(c), applied);
        let rewarded = if c.kind == Kind::Mint { count_event(b, &c.to)? } else { None };
        Ok(Ok((done, rewarded)))
    }

    /// An atomic batch: every item applies, or the batch leaves no trace.
    /// Each item is checked as a transfer of its own, against the balances
    /// the items before it left (so two items may draw on one account); at
    /// the first refusal the book, the head and the writes go back to where
    /// the batch found them.
    fn apply_batch(&mut self, b: &mut Batch<'_>, c: &BatchCmd) -> Step<Vec<Done>> {
        if let Some(e) = &c.refused {
            return Ok(Err(e.clone()));
        }
        let saved = Savepoint::take(self, b, c);
        let mut done = Vec::with_capacity(c.items.len());
        for (item, t) in &c.items {
            // Items are plain transfers: no hold, no mint (whose event count
            // would be one more thing to roll back).
            debug_assert!(t.kind == Kind::Transfer && t.hold.is_none());
            match self.apply_transfer(b, t)? {
                Ok((d, _)) => done.push(d),
                Err(e) => {
                    saved.restore(self, b);
                    return Ok(Err(e.at_item(*item)));
                }
            }
        }
        Ok(Ok(done))
    }

    /// Both balances as they stand, for a record that moves nothing.
    fn balances(&self, from: &str, to: &str) -> Applied {
        let balance = |id: &str| self.book.get(id).map_or(0, |a| a.balance);
        Applied { from_balance: balance(from), to_balance: balance(to), nums: None }
    }

    /// A hold: nothing moves, the amount stops being spendable on `from`,
    /// and the hold (with its redeem request, if any) is written down.
    fn apply_hold(&mut self, b: &mut Batch<'_>, c: &TransferCmd) -> Step<(Done, Option<Box<UserRecord>>)> {
        let spec = c.hold.as_deref().cloned().unwrap_or_default();
        if let Err(e) = self.book.hold(&c.from, &c.to, c.amount) {
            return Ok(Err(e.into()));
        }
        let applied = self.balances(&c.from, &c.to);
        let done = self.append(b, Fields::of(c), applied);
        let record = HoldRecord {
            id: done.id,
            hold: Hold::new(&c.from, &c.to, c.amount),
            memo: c.memo.as_deref().map(str::to_owned),
            expires_at: spec.expires_at,
            fee_bps: spec.fee_bps,
            redeem: spec.redeem.is_some(),
            created: b.time,
        };
        if let Some(r) = &spec.redeem {
            let request = RedeemRecord {
                request: done.id,
                user: r.user.clone(),
                account: c.from.to_string(),
                item: r.item.clone(),
                amount: c.amount,
                memo: record.memo.clone(),
                status: RedeemStatus::Pending,
                created: b.time,
                decided_by: None,
                decided_at: None,
                note: None,
                settled_by: None,
            };
            b.w.redeems.insert(done.id, request);
            b.w.user_redeems.insert((r.user.clone(), done.id));
        }
        b.w.holds.insert(done.id, record);
        b.w.open_holds.insert(done.id, true);
        if spec.expires_at > 0 {
            self.expiring.insert((spec.expires_at, done.id));
        }
        Ok(Ok((done, None)))
    }

    /// Posts or voids a hold, exactly once, for its source's owner or an
    /// admin (a redeem's hold only through `decide_redeem`), or when its
    /// timeout has passed.
    fn settle_hold(&mut self, b: &mut Batch<'_>, c: &SettleCmd) -> Step<(Reply, Vec<AdminEffect>)> {
        let refuse = |e: ApiError| Ok(Err(e));
        let Some(mut record) = b.hold(c.hold)? else {
            return refuse(ApiError::not_found(format!("hold {}", c.hold)));
        };
        let mut request = if record.redeem { b.redeem(c.hold)? } else { None };
        let due = record.hold.status == HoldStatus::Open && record.expires_at > 0 && b.time >= record.expires_at;
        if c.op == SettleOp::Expire && !due {
            // Settled in the meantime: nothing to do.
            return refuse(ApiError::bad_request("not due"));
        }
        match (c.op, &c.by) {
            (SettleOp::Expire, _) => {}
            (SettleOp::Decide { .. }, by) => {
                let Some(r) = &request else {
                    return refuse(ApiError::not_found(format!("redeem request {}", c.hold)));
                };
                // Accepting moves the held amount out of the user's account,
                // rejecting releases it: either way a key limited to other
                // accounts may not.
                if by.as_ref().is_some_and(|p| !p.may_debit(&record.hold.from, || None)) {
                    return refuse(ApiError::forbidden(format!("request {} is not one this key may decide", c.hold)));
                }
                if r.status != RedeemStatus::Pending {
                    let status = r.status.as_str();
                    return refuse(LedgerError::NotAllowed(format!("request {} was already {status}", c.hold)).into());
                }
            }
            (_, _) if record.redeem => {
                return refuse(ApiError::forbidden("a redeem's hold is settled by decide_redeem"));
            }
            (_, Some(p)) => {
                // Only a user's own holds need the owner read.
                let owner = if p.sees_any() { None } else { b.meta(&record.hold.from)?.and_then(|m| m.owner) };
                if !p.may_debit(&record.hold.from, || owner.as_deref()) {
                    return refuse(ApiError::forbidden(format!("hold {} is not yours", c.hold)));
                }
            }
            _ => {}
        }
        let (from, to, held) = (record.hold.from.clone(), record.hold.to.clone(), record.hold.amount);
        let post = match c.op {
            SettleOp::Post(x) => Some(x),
            SettleOp::Decide { accept: true } => Some(None),
            _ => None,
        };
        // A post moves `x` (its fee to `@treasury`) and releases the rest; a
        // void releases everything and moves nothing. Either way the hold
        // stops counting against `from`.
        let (kind, amount, fee, applied) = if let Some(x) = post {
            let x = match record.hold.post_amount(x) {
                Ok(x) => x,
                Err(e) => return refuse(e.into()),
            };
            let fee = if is_system(&to) {
                0
            } else {
                match net_fee(x, record.fee_bps, self.fee_rounding) {
                    Ok(f) => f,
                    Err(e) => return refuse(e.into()),
                }
            };
            match self.book.post(&from, &to, held, x, fee) {
                Ok(applied) => {
                    record.hold.posted(x);
                    (Kind::Post, x, fee, applied)
                }
                Err(e) => return refuse(e.into()),
            }
        } else {
            if let Err(e) = record.hold.void() {
                return refuse(e.into());
            }
            self.book.release(&from, held);
            (Kind::Void, held, 0, self.balances(&from, &to))
        };
        let memo = format!("hold {}", c.hold);
        let by = c.by.as_ref().map(|p| &*p.user);
        let fields = Fields { kind, from: &from, to: &to, amount, fee, memo: Some(&memo), key: None, by };
        let done = self.append(b, fields, applied);
        let moved = if kind == Kind::Post { amount - fee } else { 0 };
        // A zero move still tells both owners of the record (their history).
        let mut effects = vec![
            AdminEffect::Held { account: from.as_str().into(), delta: -held },
            AdminEffect::Moved { from: from.as_str().into(), to: to.as_str().into(), amount: moved, id: done.id },
        ];
        if fee > 0 {
            effects.push(AdminEffect::Moved {
                from: from.as_str().into(),
                to: TREASURY.into(),
                amount: fee,
                id: done.id,
            });
        }
        self.expiring.remove(&(record.expires_at, c.hold));
        b.w.open_holds.insert(c.hold, false);
        let reply = match (&mut request, c.op) {
            (Some(r), SettleOp::Decide { accept }) => {
                r.status = if accept { RedeemStatus::Accepted } else { RedeemStatus::Rejected };
                r.decided_by = c.by.as_ref().map(|p| p.user.to_string());
                r.decided_at = Some(b.time);
                r.note.clone_from(&c.note);
                r.settled_by = Some(done.id);
                b.w.redeems.insert(c.hold, r.clone());
                Reply::Redeem(Box::new(r.clone()))
            }
            _ => {
                let view = TransferView::new(
                    done.id,
                    kind,
                    from,
                    to,
                    (amount, fee),
                    Some(memo),
                    b.time,
                    None,
                    (done.prev, done.hash),
                    Some((done.applied.from_balance, done.applied.to_balance)),
                    c.by.as_ref().map(|p| p.user.clone()),
                );
                Reply::Settled(Box::new(SettleReply {
                    hold: c.hold,
                    status: record.hold.status.as_str(),
                    posted: record.hold.posted,
                    released: record.hold.released,
                    transfer: view,
                }))
            }
        };
        b.w.holds.insert(c.hold, record);
        Ok(Ok((reply, effects)))
    }

    /// Creates an account (and, for a signup, its user), funded from `@mint`
    /// in the same step: its number, and the funding record if any.
    fn apply_create(&mut self, b: &mut Batch<'_>, c: &CreateCmd) -> Step<(u32, Option<Done>)> {
        if let Some(u) = &c.user {
            if b.user(&u.user)?.is_some() {
                return Ok(Err(ApiError::new(ErrorCode::Exists, format!("user {} exists", c.account))));
            }
        }
        let num = match self.book.create(&c.account) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e.into())),
        };
        let mut meta = c.meta.clone();
        meta.num = num;
        let mut done = None;
        if c.initial > 0 {
            let applied = match self.book.transfer(MINT, &c.account, c.initial, 0, Mode::Unreserved) {
                Ok(a) => a,
                Err(e) => {
                    // The account and its funding are one step: undo the create.
                    self.book.uncreate(&c.account);
                    return Ok(Err(e.into()));
                }
            };
            let fields = Fields {
                kind: Kind::Mint,
                from: MINT,
                to: &c.account,
                amount: c.initial,
                fee: 0,
                memo: meta.memo.as_deref(),
                key: None,
                by: Some(&c.by),
            };
            done = Some(self.append(b, fields, applied));
        }
        if let Some(u) = &c.user {
            b.w.users.insert(u.user.clone(), (**u).clone());
        }
        b.put_account(&c.account, &meta);
        Ok(Ok((num, done)))
    }

    /// Moves an account's whole balance to `@mint` (a `close` record) and
    /// leaves a tombstone with the reason. `Ok(false)` if it was already gone.
    fn close(&mut self, b: &mut Batch<'_>, account: &str, reason: &str, by: &str) -> Step<(bool, Vec<AdminEffect>)> {
        if is_system(account) {
            return Ok(Err(ApiError::forbidden("system accounts cannot be deleted")));
        }
        let Some(a) = self.book.get(account).copied() else {
            return Ok(Err(ApiError::not_found(format!("account {account}"))));
        };
        if a.status == Status::Deleted {
            return Ok(Ok((false, Vec::new())));
        }
        if a.held > 0 {
            return Ok(Err(LedgerError::NotAllowed(format!(
                "{account} has {} held by open holds: post or void them first",
                a.held
            ))
            .into()));
        }
        let mut meta = b.meta(account)?.ok_or_else(|| StoreError::Corrupt(format!("no metadata for {account}")))?;
        let mut effects = Vec::new();
        if a.balance != 0 {
            let (from, to) = if a.balance > 0 { (account, MINT) } else { (MINT, account) };
            let Some(amount) = a.balance.checked_abs() else {
                return Ok(Err(ApiError::bad_request("balance cannot be closed")));
            };
            let applied = match self.book.transfer(from, to, amount, 0, Mode::Force) {
                Ok(a) => a,
                Err(e) => return Ok(Err(e.into())),
            };
            let fields =
                Fields { kind: Kind::Close, from, to, amount, fee: 0, memo: Some(reason), key: None, by: Some(by) };
            let done = self.append(b, fields, applied);
            effects.push(AdminEffect::Moved { from: from.into(), to: to.into(), amount, id: done.id });
        }
        self.book.delete(account);
        meta.deleted = Some(store::Tombstone { reason: reason.to_owned(), time: b.time });
        b.w.accounts.insert(account.to_owned(), meta);
        effects.push(AdminEffect::Deleted(account.into()));
        Ok(Ok((true, effects)))
    }

    /// Adds and removes tags, keeping the tag index in step.
    fn tag(
        &mut self,
        b: &mut Batch<'_>,
        account: &str,
        add: &[String],
        remove: &[String],
    ) -> Step<(Reply, Vec<AdminEffect>)> {
        let Some(mut meta) = b.meta(account)? else {
            return Ok(Err(ApiError::not_found(format!("account {account}"))));
        };
        if meta.deleted.is_some() {
            return Ok(Err(ApiError::new(ErrorCode::Deleted, format!("account {account} was deleted"))));
        }
        let mut tags: BTreeSet<String> = meta.tags.iter().cloned().collect();
        for r in remove {
            tags.remove(r);
        }
        tags.extend(add.iter().cloned());
        if tags.len() > TAGS_PER_ACCOUNT_MAX {
            return Ok(Err(ApiError::bad_request(format!("at most {TAGS_PER_ACCOUNT_MAX} tags"))));
        }
        for old in &meta.tags {
            if !tags.contains(old) {
                b.w.tags.insert((old.clone(), account.to_owned()), false);
            }
        }
        for new in &tags {
            b.w.tags.insert((new.clone(), account.to_owned()), true);
        }
        meta.tags = tags.into_iter().collect();
        b.w.accounts.insert(account.to_owned(), meta.clone());
        let reply = Reply::Tags(TagsReply { account: account.to_owned(), tags: meta.tags.clone() });
        Ok(Ok((reply, vec![AdminEffect::Tagged(account.into(), meta.tags)])))
    }

    /// Adds `delta` to every open account with the tag: checks all first,
    /// then applies all, so it is all or nothing. With `force` the bounds are
    /// ignored (overflow never is).
    fn bulk(&mut self, b: &mut Batch<'_>, c: &BulkCmd) -> Step<(Reply, Vec<AdminEffect>)> {
        let members: Vec<String> = b
            .tagged(&c.tag)?
            .into_iter()
            .filter(|account| self.book.get(account).is_some_and(|a| a.status == Status::Open))
            .collect();
        let n = i64::try_from(members.len()).unwrap_or(i64::MAX);
        let mint = self.book.get(MINT).map_or(0, |a| a.balance);
        if c.delta.checked_mul(n).and_then(|total| mint.checked_sub(total)).is_none() {
            return Ok(Err(ApiError::new(ErrorCode::BelowMin, "the total would overflow @mint")));
        }
        for account in &members {
            let a = self.book.get(account).copied().unwrap_or(crate::ledger::BookAccount::new(0, Status::Open, 0));
            let bounds =
                if c.force { crate::ledger::Bounds { min: None, max: None } } else { self.book.limits.bounds(account) };
            if let Err(e) = crate::ledger::adjust(account, a.balance, c.delta, bounds) {
                return Ok(Err(ApiError::from(e)));
            }
        }
        let mode = if c.force { Mode::Force } else { Mode::Unreserved };
        let mut effects = Vec::with_capacity(members.len());
        for account in &members {
            let (from, to, amount) =
                if c.delta > 0 { (MINT, account.as_str(), c.delta) } else { (account.as_str(), MINT, -c.delta) };
            // Every change was checked above: a refusal here is a bug, and
            // failing the batch undoes the whole bulk change.
            let applied = self
                .book
                .transfer(from, to, amount, 0, mode)
                .map_err(|e| StoreError::Corrupt(format!("bulk_add passed its checks but failed: {e}")))?;
            let fields = Fields {
                kind: Kind::Adjust,
                from,
                to,
                amount,
                fee: 0,
                memo: c.memo.as_deref(),
                key: None,
                by: Some(&c.by),
            };
            let done = self.append(b, fields, applied);
            effects.push(AdminEffect::Moved { from: from.into(), to: to.into(), amount, id: done.id });
        }
        let reply = Reply::Bulk(BulkReply { tag: c.tag.clone(), delta: c.delta, count: members.len() });
        Ok(Ok((reply, effects)))
    }

    /// Deletes every open client account whose balance is below `below`.
    fn reap(&mut self, b: &mut Batch<'_>, below: i64, reason: &str, by: &str) -> Step<(Reply, Vec<AdminEffect>)> {
        let mut doomed: Vec<String> = self
            .book
            .iter()
            .filter(|(id, a)| !is_system(id) && a.status == Status::Open && a.held == 0 && a.balance < below)
            .map(|(id, _)| id.to_owned())
            .collect();
        doomed.sort();
        let mut effects = Vec::new();
        for account in &doomed {
            match self.close(b, account, reason, by)? {
                Ok((_, e)) => effects.extend(e),
                Err(e) => return Err(StoreError::Corrupt(format!("reap could not close {account}: {}", e.message))),
            }
        }
        Ok(Ok((Reply::Count(CountReply { count: doomed.len() }), effects)))
    }
}

/// Counts one event for the user owning `account`, if any.
/// What an atomic batch may change, as it stood before the batch: the
/// book entries of its parties (and `@treasury`), the head, and how much
/// of the writes there was.
struct Savepoint {
    accounts: Vec<(Box<str>, BookAccount)>,
    head: Head,
    records: usize,
    ends: usize,
    keys: usize,
}

impl Savepoint {
    fn take(m: &Machine, b: &Batch<'_>, c: &BatchCmd) -> Savepoint {
        // An account named twice is saved twice, with the same value: all
        // are saved before anything changes.
        let parties = c.items.iter().flat_map(|(_, t)| [&*t.from, &*t.to]).chain([TREASURY]);
        let accounts = parties.filter_map(|id| m.book.get(id).map(|a| (id.into(), *a))).collect();
        Savepoint { accounts, head: m.head, records: b.w.records.len(), ends: b.w.ends.len(), keys: b.w.keys.len() }
    }

    fn restore(self, m: &mut Machine, b: &mut Batch<'_>) {
        for (id, a) in self.accounts {
            m.book.restore(&id, a);
        }
        m.head = self.head;
        b.w.records.truncate(self.records);
        b.w.ends.truncate(self.ends);
        b.w.nums.truncate(2 * self.ends);
        b.w.keys.truncate(self.keys);
    }
}

fn count_event(b: &mut Batch<'_>, account: &str) -> Result<Option<Box<UserRecord>>, StoreError> {
    let Some(owner) = b.meta(account)?.and_then(|m| m.owner) else { return Ok(None) };
    let Some(mut user) = b.user(&owner)? else { return Ok(None) };
    user.events = user.events.saturating_add(1);
    b.w.users.insert(owner, user.clone());
    Ok(Some(Box::new(user)))
}

/// Revokes a user's tokens (and maybe sets a new password hash), or sets
/// their events.
fn apply_user(b: &mut Batch<'_>, u: &UserCmd) -> Step<UserRecord> {
    let mut record = match (&u.change, b.user(&u.user)?) {
        (UserChange::Create(_), Some(_)) => {
            return Ok(Err(ApiError::new(ErrorCode::Exists, format!("user {} exists", u.user))));
        }
        (UserChange::Create(new), None) => (**new).clone(),
        (_, None) => return Ok(Err(ApiError::not_found(format!("user {}", u.user)))),
        (_, Some(record)) => record,
    };
    // Revoked tokens that have expired anyway need no listing.
    record.revoked_tokens.retain(|(_, exp)| *exp > b.time);
    match &u.change {
        UserChange::Create(_) => {}
        UserChange::NewEpoch => record.token_epoch += 1,
        UserChange::Password(hash) => {
            record.password_hash.clone_from(hash);
            record.token_epoch += 1;
        }
        // An admin's count of events attended; tokens stay valid.
        UserChange::Events(n) => record.events = *n,
        UserChange::RevokeToken { jti, exp_ms } => {
            if record.revoked_tokens.len() >= REVOKED_TOKENS_PER_USER_MAX {
                // Too many to list: revoke every token instead.
                record.revoked_tokens.clear();
                record.token_epoch += 1;
            } else {
                record.revoked_tokens.push((jti.clone(), *exp_ms));
            }
        }
    }
    b.w.users.insert(u.user.to_string(), record.clone());
    Ok(Ok(record))
}

/// Creates or revokes a service key.
fn apply_key(b: &mut Batch<'_>, k: &KeyCmd) -> Step<KeyRecord> {
    match &k.change {
        KeyChange::Create(record) => {
            if b.service_key(&record.key_id)?.is_some() {
                return Ok(Err(ApiError::new(ErrorCode::Exists, format!("key {} exists", record.key_id))));
            }
            b.w.service_keys.insert(record.key_id.clone(), (**record).clone());
            Ok(Ok((**record).clone()))
        }
        KeyChange::Revoke { key_id, by } => {
            let Some(mut record) = b.service_key(key_id)? else {
                return Ok(Err(ApiError::not_found(format!("key {key_id}"))));
            };
            if record.revoked_at.is_none() {
                record.revoked_at = Some(b.time);
                record.revoked_by = Some(by.clone());
                b.w.service_keys.insert(key_id.clone(), record.clone());
            }
            Ok(Ok(record))
        }
    }
}

#[cfg(test)]
mod tests;
