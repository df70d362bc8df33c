//! Loading the ledger: the balance rows, then the records after the
//! checkpoint replayed by the one replay rule (`legs`), checked to chain
//! onto each other and end at the head. Used at start-up and by the
//! journal after a storage failure; `audit` follows the same rules
//! without building a book.

use super::balances::Rows;
use super::record::{for_each_record_group, with_record, Stored};
use super::*;
use std::io::Read;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::ledger::book::Fill;
use crate::ledger::{AccountKey, Book, BookAccount, Kind, Limits, Status, TREASURY};

/// An account as loaded at start-up, handed to its owning shard.
pub struct LoadedAccount {
    pub id: AccountKey,
    /// Its balance row as stored: at least as new as the checkpoint.
    pub balance: i64,
    pub last: u64,
    /// Milliseconds since the Unix epoch.
    pub created: u64,
    /// The key of its balance row (its place in the book).
    pub num: u32,
    pub deleted: bool,
    /// Owner, tags and memo, when any is set (most accounts have none).
    pub extra: Option<Box<AccountExtra>>,
}

/// An account's stored metadata decoded straight into the form its slot
/// keeps (`AccountMeta`'s fields, by name): no intermediate copies of its
/// strings.
#[derive(serde::Deserialize)]
pub(super) struct StoredMeta {
    pub num: u32,
    pub owner: Option<Box<str>>,
    pub tags: Box<[Box<str>]>,
    pub created: u64,
    pub memo: Option<Box<str>>,
    /// Decoded whole, so that a malformed tombstone is refused as
    /// `AccountMeta` refuses it, though only its presence is kept.
    pub deleted: Option<Tombstone>,
}

impl StoredMeta {
    pub(super) fn decode(bytes: &[u8]) -> Result<StoredMeta, StoreError> {
        rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("account: {e}")))
    }
}

/// The accounts as start-up reads them, in key order, in batches handed
/// over from the reading thread (see [`load_with`]). Each account is put
/// in its place in the book as it passes, so the book is built on the
/// owners' thread too, beside the shards' maps, while the reader decodes.
pub struct LoadedAccounts {
    /// How many accounts there are in all.
    pub len: usize,
    batches: std::sync::mpsc::Receiver<Vec<LoadedAccount>>,
    batch: std::vec::IntoIter<LoadedAccount>,
    book: Book,
    /// Accounts placed so far: all `len` of them leave no number unfilled.
    placed: usize,
    error: Option<StoreError>,
}

impl LoadedAccounts {
    /// An account already read that comes a few after the one `next` last
    /// returned: its owner can start loading that account's place in its
    /// map (reached by hash, in no order) so that the cache miss overlaps.
    #[must_use]
    pub fn ahead(&self) -> Option<&LoadedAccount> {
        self.batch.as_slice().get(PLACE_AHEAD)
    }

    /// Puts `a` in its place in the book, once.
    fn place(&mut self, a: &LoadedAccount) -> Result<(), StoreError> {
        let status = if a.deleted { Status::Deleted } else { Status::Open };
        let num = a.num;
        match self.book.fill(num, a.id.clone(), BookAccount::new(a.balance, status, a.last)) {
            Fill::Placed => {
                self.placed += 1;
                Ok(())
            }
            Fill::PastEnd => Err(StoreError::Corrupt(format!("account number {num} out of range"))),
            Fill::Taken => Err(StoreError::Corrupt(format!("account number {num} is used twice"))),
        }
    }

    /// The book, once every account has passed (those the owners left
    /// are placed here).
    fn finish(mut self) -> Result<Book, StoreError> {
        self.by_ref().for_each(drop);
        if let Some(e) = self.error {
            return Err(e);
        }
        if let Some(skipped) = (self.placed < self.len).then(|| self.book.first_unfilled()).flatten() {
            return Err(StoreError::Corrupt(format!("account numbers skip {skipped}")));
        }
        Ok(self.book)
    }
}

impl Iterator for LoadedAccounts {
    type Item = LoadedAccount;

    fn next(&mut self) -> Option<LoadedAccount> {
        loop {
            // The book's entries (by number) and its index (by hash) are
            // reached in no order: asking for an account's a few accounts
            // ahead lets their cache misses overlap.
            if let Some(ahead) = self.ahead() {
                self.book.prefetch(ahead.id.as_str(), Some(ahead.num));
                self.book.prefetch_index(ahead.id.as_str());
            }
            if let Some(a) = self.batch.next() {
                if let Err(e) = self.place(&a) {
                    // Nothing more passes; the reader's sends fail from now
                    // on, so it cannot wait for room that never comes.
                    self.error = Some(e);
                    self.batches = std::sync::mpsc::sync_channel(0).1;
                    self.batch = Vec::new().into_iter();
                    return None;
                }
                return Some(a);
            }
            self.batch = self.batches.recv().ok()?.into_iter();
        }
    }
}

/// Memory for loading about `n` accounts, made before the database is
/// open: after a crash redb's repair reads the whole file on one core, and
/// meanwhile the other can write the blank book and the balance table
/// (start-up makes the shards' maps beside it). Made during loading, the
/// first touch of their pages (the kernel zeroing them; on a virtual
/// machine, the host backing them) stalls the owners' thread: ~5 s of a
/// 10M-account start. Made for the wrong number it is only resized, or,
/// made for far more, dropped: what loading does with it is the same.
pub struct Room {
    book: Book,
    /// One blank `(0, 0)` for each account it is made for.
    balances: Vec<(i64, u64)>,
}

impl Room {
    /// Room for `n` accounts, and some more without moving (a server
    /// creates accounts after the count its hint was written with).
    #[must_use]
    pub fn new(limits: Limits, n: usize) -> Room {
        let headroom = n + n / 8;
        let mut balances = Vec::with_capacity(headroom);
        balances.resize(n, (0, 0));
        Room { book: Book::unfilled_within(limits, n, headroom), balances }
    }

    /// Whether memory made for `made_for` accounts is worth keeping for
    /// `n`: not if much of it would lie unused for the server's life (a
    /// count noted for another database file, say).
    #[must_use]
    pub fn fits(made_for: usize, n: usize) -> bool {
        made_for <= n.saturating_add(n / 4).saturating_add(4096)
    }

    /// Refitted to exactly `n` accounts, all blank.
    fn refit(mut self, limits: Limits, n: usize) -> Room {
        self.book.refit_unfilled(limits, n);
        self.balances.resize(n, (0, 0));
        self
    }
}

/// The file in the data folder that says how many accounts the last start
/// loaded: read before the database is open, to size a [`Room`]. Only a
/// hint: missing, unreadable or wrong, it costs time, never correctness.
const SIZE_HINT_FILE: &str = "accounts.hint";

/// Fewest bytes of the database file an account takes (its row in
/// `accounts`, id and metadata with redb's offsets, and its 16 bytes in a
/// balance block): a hint claiming more accounts than the file can hold
/// is ignored.
const ACCOUNT_BYTES_MIN: u64 = 32;

/// Most memory made ahead for an account (its book entry, balance, index
/// bucket and shard map bucket, with their headroom): a hint whose memory
/// would take more than half the machine's is ignored, so that a wrong
/// one cannot make a start fail for want of memory.
const AHEAD_BYTES_PER_ACCOUNT: u64 = 320;

/// The count of accounts the last start in `data` loaded, if it was noted
/// and the database file (`db_path`) and the machine's memory could hold
/// that many.
#[must_use]
pub fn size_hint(data: &Path, db_path: &Path) -> Option<usize> {
    let path = data.join(SIZE_HINT_FILE);
    // Not a FIFO or a device, whose open or read could wait forever.
    if !std::fs::metadata(&path).ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    std::fs::File::open(&path).ok()?.take(32).read_to_string(&mut text).ok()?;
    let n: u64 = text.trim().parse().ok()?;
    let file_len = std::fs::metadata(db_path).ok()?.len();
    hint_fits(n, file_len, physical_memory()).then(|| usize::try_from(n).ok()).flatten()
}

/// Whether `n` accounts could be in a database file of `file_len` bytes,
/// with their memory made ahead in half the machine's `memory`.
pub(super) fn hint_fits(n: u64, file_len: u64, memory: Option<u64>) -> bool {
    n <= file_len / ACCOUNT_BYTES_MIN && memory.is_none_or(|m| n.saturating_mul(AHEAD_BYTES_PER_ACCOUNT) <= m / 2)
}

/// The machine's memory in bytes, where the system says.
fn physical_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads configuration values.
        let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        let (pages, page) = (u64::try_from(pages).ok()?, u64::try_from(page).ok()?);
        Some(pages.saturating_mul(page))
    }
    #[cfg(not(unix))]
    None
}

/// Notes that `n` accounts were loaded (see [`size_hint`]); replaced
/// whole by a rename, so a crash leaves the old note or the new.
pub fn write_size_hint(data: &Path, n: usize) -> std::io::Result<()> {
    let tmp = data.join(format!("{SIZE_HINT_FILE}.tmp"));
    std::fs::write(&tmp, format!("{n}\n"))?;
    std::fs::rename(tmp, data.join(SIZE_HINT_FILE))
}

/// How many accounts ahead the book's entry is fetched into the cache.
const PLACE_AHEAD: usize = 8;

/// Accounts handed over at a time: large enough that the hand-over costs
/// nothing per account, small enough to stay in the cache.
const LOADED_BATCH: usize = 4096;

/// Batches on their way to the owners at most: the reader waits beyond
/// that, so the hand-over holds a bounded number of accounts.
const LOADED_BATCHES_QUEUED: usize = 16;

/// The committed state: every account's balance in the book, and the head.
pub struct Loaded {
    pub book: Book,
    pub head: Head,
    /// Open holds that expire: (expires_at, id).
    pub expiring: Vec<(u64, u64)>,
    /// Records replayed: those after the checkpoint.
    pub replayed: u64,
}

pub(super) fn read_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let a: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt("meta".into()))?;
    Ok(u64::from_be_bytes(a))
}

pub(super) fn read_checkpoint(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(META)?;
    let v = meta.get(CHECKPOINT)?;
    v.map_or(Ok(0), |v| read_u64(v.value()))
}

/// What a record does to balances: `(account, change)` for each leg. The
/// one replay rule, used by start-up, `audit` and `list_accounts` alike: a
/// hold and a void move nothing (what is held comes from the holds table,
/// written in the same transactions), every other record moves `amount`
/// out of `from`, `amount - fee` into `to` and `fee` into `@treasury`.
pub(super) fn legs<'a>(r: &RecordRef<'a>) -> Result<[(&'a str, i64); 3], StoreError> {
    let moved = if matches!(r.kind, Kind::Hold | Kind::Void) { 0 } else { r.amount };
    let out = moved.checked_neg().ok_or_else(|| StoreError::Corrupt(format!("transfer {}: amount", r.id)))?;
    let fee = if moved == 0 { 0 } else { r.fee };
    Ok([(r.from, out), (r.to, moved - fee), (TREASURY, fee)])
}

/// Applies one replayed record to the book. Each leg is applied only if the
/// account's balance row does not include it yet (its `last` is older).
pub fn replay(book: &mut Book, r: &RecordRef<'_>) -> Result<(), StoreError> {
    replay_noting(book, r, None, |_, _| {})
}

/// [`replay`], telling `before` each account's number and entry before it
/// changes it (a cluster member undoes a batch that does not fit); `nums`:
/// the parties' numbers on the deciding book, tried before a lookup.
pub fn replay_noting(
    book: &mut Book,
    r: &RecordRef<'_>,
    nums: Option<(u32, u32)>,
    mut before: impl FnMut(u32, BookAccount),
) -> Result<(), StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("replaying transfer {}: {what}", r.id));
    for (i, (account, delta)) in legs(r)?.into_iter().enumerate() {
        // Every record links its two parties; the fee leg only when it moves something.
        if i == 2 && delta == 0 {
            continue;
        }
        let hint = nums.and_then(|(f, t)| [Some(f), Some(t), None][i]);
        let num = book.num_hinted(account, hint).ok_or_else(|| corrupt("unknown account"))?;
        let a = *book.by_num(num).ok_or_else(|| corrupt("unknown account"))?;
        if r.id > a.last {
            let balance = a.balance.checked_add(delta).ok_or_else(|| corrupt("overflow"))?;
            before(num, a);
            book.replay_num(num, balance, r.id);
        }
    }
    Ok(())
}

/// Reads the balance rows and replays the records after the checkpoint,
/// checking that they chain onto each other and end at the head. Used by
/// the journal to recover from a failed commit, and by cluster members.
pub fn load(db: &Database, limits: Limits) -> Result<Loaded, StoreError> {
    load_with(db, limits, None, |_| ()).map(|(loaded, ())| loaded)
}

/// [`load`], handing every account as its rows stand to `owners`, which
/// runs on a thread of its own: start-up builds the shards' maps there,
/// and the book is built on that thread as the accounts pass, while this
/// one reads and decodes them; then this one replays the records. The two
/// halves of a 10M-account start overlap on two cores. What `owners` got
/// is stale for exactly the accounts the replay or an open hold changed:
/// the book's entries that are `dirty` or have something `held`. Should
/// loading fail, `owners` sees the accounts end early and its result is
/// dropped. `room`: memory made ahead ([`Room`]); without it, loading
/// makes its own.
pub fn load_with<T: Send>(
    db: &Database,
    limits: Limits,
    room: Option<Room>,
    owners: impl FnOnce(&mut LoadedAccounts) -> T + Send,
) -> Result<(Loaded, T), StoreError> {
    let txn = db.begin_read()?;
    load_txn(&txn, limits, room, owners)
}

/// [`load_with`] within one read transaction.
fn load_txn<T: Send>(
    txn: &redb::ReadTransaction,
    limits: Limits,
    room: Option<Room>,
    owners: impl FnOnce(&mut LoadedAccounts) -> T + Send,
) -> Result<(Loaded, T), StoreError> {
    let started = std::time::Instant::now();
    let accounts_table = txn.open_table(ACCOUNTS)?;
    let n = usize::try_from(accounts_table.len()?).unwrap_or(0);
    let (book, balances) = match room.filter(|r| Room::fits(r.balances.len(), n)) {
        Some(room) => {
            let Room { book, balances } = room.refit(limits, n);
            (Some(book), Some(balances))
        }
        None => (None, None),
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(LOADED_BATCHES_QUEUED);
    std::thread::scope(|scope| {
        let owners = std::thread::Builder::new()
            .name("tally-load".into())
            .spawn_scoped(scope, move || {
                // Made here if not ahead, while the reader reads the
                // balance rows: the blank book is 64 bytes an account.
                let mut accounts = LoadedAccounts {
                    len: n,
                    batches: rx,
                    batch: Vec::new().into_iter(),
                    book: book.unwrap_or_else(|| Book::unfilled(limits, n)),
                    placed: 0,
                    error: None,
                };
                let t = owners(&mut accounts);
                let book = accounts.finish();
                tracing::debug!(ms = started.elapsed().as_millis() as u64, "the book and the owners' accounts built");
                (book, t)
            })
            .map_err(StoreError::from)?;
        let balances = balances.unwrap_or_else(|| vec![(0, 0); n]);
        let read = read_rows(txn, &accounts_table, balances, tx);
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "the accounts read");
        let (book, owners) = match owners.join() {
            Ok(done) => done,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        read?;
        let loaded = replay_onto(txn, book?)?;
        tracing::debug!(ms = started.elapsed().as_millis() as u64, records = loaded.replayed, "the tail replayed");
        Ok((loaded, owners))
    })
}

/// Reads every account with its balance row and sends it on
/// `to_owners`, in key order. `balances`: one blank `(0, 0)` for each
/// account.
fn read_rows(
    txn: &redb::ReadTransaction,
    accounts_table: &redb::ReadOnlyTable<&'static str, &'static [u8]>,
    mut balances: Vec<(i64, u64)>,
    to_owners: std::sync::mpsc::SyncSender<Vec<LoadedAccount>>,
) -> Result<(), StoreError> {
    // The balance rows are read in key (number) order and joined to the
    // accounts by number: one pass over each table, where a lookup per
    // account read the balances tree in random order (~40 s of a 62 s
    // start with 10M accounts).
    Rows::open(txn)?.for_each(|num, row| {
        *balances.get_mut(num as usize).ok_or_else(|| StoreError::Corrupt("balance rows without accounts".into()))? =
            row;
        Ok(())
    })?;
    let mut batch = Vec::with_capacity(LOADED_BATCH);
    for row in accounts_table.iter()? {
        let (k, v) = row?;
        let meta = StoredMeta::decode(v.value())?;
        let (balance, last) = balances.get(meta.num as usize).copied().unwrap_or((0, 0));
        let extra = AccountExtra::new(meta.owner, meta.tags, meta.memo);
        let deleted = meta.deleted.is_some();
        batch.push(LoadedAccount {
            id: k.value().into(),
            balance,
            last,
            created: meta.created,
            num: meta.num,
            deleted,
            extra,
        });
        // Refused only once the owners' side found the accounts corrupt or
        // panicked: its result reports which, and reading on is useless.
        if batch.len() == LOADED_BATCH
            && to_owners.send(std::mem::replace(&mut batch, Vec::with_capacity(LOADED_BATCH))).is_err()
        {
            return Ok(());
        }
    }
    let _ = to_owners.send(batch);
    Ok(())
}

/// Records replayed as one group: the book entries of a whole group's
/// parties are fetched before any of them is applied, so that on a book of
/// millions of accounts their cache misses overlap instead of stalling
/// one after another (the name lookups were 61% of a 10M-account replay).
const REPLAY_GROUP: usize = 32;

/// The book of the accounts' rows with the records after the checkpoint
/// replayed onto it and the open holds' amounts held.
fn replay_onto(txn: &redb::ReadTransaction, mut book: Book) -> Result<Loaded, StoreError> {
    let head = read_head(txn)?;
    let checkpoint = read_checkpoint(txn)?;
    let chunks = txn.open_table(CHUNKS)?;
    let mut prev = match checkpoint {
        0 => GENESIS,
        id => with_record(&chunks, id, |stored| Ok(stored.hash))?
            .ok_or_else(|| StoreError::Corrupt(format!("checkpoint record {id} is missing")))?,
    };
    let mut expected = checkpoint + 1;
    for_each_record_group(&chunks, checkpoint + 1, REPLAY_GROUP, |group| {
        let records: Vec<_> = group.iter().map(Stored::record).collect();
        for r in records.iter().flatten() {
            book.prefetch(r.from, None);
            book.prefetch(r.to, None);
        }
        for (stored, r) in group.iter().zip(records) {
            let r = r?;
            if r.id != stored.id || r.id != expected || r.prev != prev {
                return Err(StoreError::Corrupt(format!("the journal breaks at transfer {}", stored.id)));
            }
            replay(&mut book, &r)?;
            prev = stored.hash;
            expected += 1;
        }
        Ok(true)
    })?;
    if expected - 1 != head.id || prev != head.hash {
        return Err(StoreError::Corrupt(format!(
            "the journal ends at transfer {} but its head says {}",
            expected - 1,
            head.id
        )));
    }
    // What is held: the open holds, committed with the records above.
    let mut expiring = Vec::new();
    for_each_open_hold(txn, |h| {
        let held =
            book.held(&h.hold.from).checked_add(h.hold.amount).ok_or_else(|| StoreError::Corrupt("held".into()))?;
        book.set_held(&h.hold.from, held);
        if h.expires_at > 0 {
            expiring.push((h.expires_at, h.id));
        }
        Ok(())
    })?;
    Ok(Loaded { book, head, expiring, replayed: head.id - checkpoint })
}

/// Calls `f` with every open hold, each checked to be stored and open.
pub(super) fn for_each_open_hold(
    txn: &redb::ReadTransaction,
    mut f: impl FnMut(&HoldRecord) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let holds = txn.open_table(HOLDS)?;
    for row in txn.open_table(OPEN_HOLDS)?.iter()? {
        let id = row?.0.value();
        let stored = holds.get(id)?.ok_or_else(|| StoreError::Corrupt(format!("open hold {id} is missing")))?;
        let h = HoldRecord::decode(stored.value())?;
        if h.hold.status != crate::ledger::HoldStatus::Open {
            return Err(StoreError::Corrupt(format!("hold {id} is listed open but is {}", h.hold.status.as_str())));
        }
        f(&h)?;
    }
    Ok(())
}

pub(super) fn read_head(txn: &redb::ReadTransaction) -> Result<Head, StoreError> {
    let meta = txn.open_table(META)?;
    let head = meta.get(HEAD)?.ok_or_else(|| StoreError::Corrupt("no head".into()))?;
    Head::decode(head.value())
}
