//! The old records, moved out of `tally.redb` into sealed segment files.
//!
//! # Why
//!
//! After a crash redb walks every page reachable from its roots twice
//! before it opens (checksums, then the allocator), on one thread, so a
//! restart grew with the whole history: 12 s of repair for 108M records
//! in an 11 GB file. Records older than the checkpoint and the key index's
//! start are never written again and are read only by id (a transfer, a
//! history page, a key's replay, `audit`, `backup`). So the history is cut
//! into segments: each is a redb file of its own, written once, closed and
//! never opened for writing again. A closed file needs no repair, and the
//! ledger file keeps only the accounts and the newest records.
//!
//! # Files and their states
//!
//! `history/records-FIRST-LAST.redb` holds records `FIRST..=LAST` in a
//! `chunks` table laid out as the ledger's (whole chunks, copied byte for
//! byte, so every hash is unchanged). Two ids in the ledger's `meta` say
//! what it relies on:
//!
//! - `sealed`: the segments from 1 to here are complete. Written in a
//!   journal commit only after the segment's file is written, fsynced,
//!   renamed into place and its folder fsynced.
//! - `archived`: the ledger's own chunks up to here are removed, a few
//!   hundred rows per commit (so no commit stalls), never past `sealed`.
//!
//! A reader's transaction sees one `archived`: records up to it come from
//! the segments, later ones from the ledger's `chunks`. Records in
//! `archived+1..=sealed` are in both, byte for byte the same.
//!
//! # Crash safety
//!
//! Every step leaves a state the next start accepts:
//! - a crash while a segment is written leaves `*.tmp`, removed at start;
//! - a crash after the rename but before `sealed` is committed leaves the
//!   segment from `sealed+1`: removed at start if the ledger still holds
//!   all its records (it does, unless the ledger file is not the one the
//!   segment was written with), and written again later. Any other
//!   segment past `sealed` is refused and nothing is removed: with a
//!   ledger file replaced by a new or an older one, the segments may be
//!   the only copy of their records;
//! - a segment is checked (it opens cleanly, and holds exactly the rows
//!   copied, from its first record to its last) before it is renamed;
//! - `sealed` and `archived` move in the journal's own commits, so they
//!   are as durable as the head.
//!
//! A segment the ledger relies on that is missing, overlaps another or
//! needs repair is refused at start with the file's name: the ledger
//! cannot answer for those records without it.
//!
//! # Open files
//!
//! A segment of the default size holds 4M records, so a long-lived ledger
//! gathers hundreds of them. Each is checked and closed at start, and
//! opened again only when a read needs it: at most [`OPEN_SEGMENTS_MAX`]
//! stay open, the least recently read closed first. A read still using a
//! closed one keeps it open until it ends, so each read under way may add
//! one (reads run on the blocking pool, at most 512 threads, and hold the
//! server's in-flight permits). That bounds the file descriptors and the
//! segments' page caches (4 MiB each) however long the history.
//!
//! A segment is written only with room to spare on the disk (twice its
//! size estimated generously), so that it never takes the journal's last
//! free space; a failed seal is tried again after 10 s, the wait doubling
//! up to ~11 min. The copy reads and writes 4,096 rows at a time, each
//! piece with the ledger's database fetched again, so a stop or a reopen
//! waits for one piece at most.
//!
//! Only a single server seals segments. A cluster member's ledger is the
//! Raft state machine and its snapshot is one file; it keeps every record.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use redb::{ReadOnlyDatabase, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::record::{for_each_record, ChunkCache, Stored};
use super::recovery::{read_checkpoint, read_u64};
use super::{StoreError, CHUNKS, META};

/// The ledger's `meta` row: segments complete from record 1 to here.
pub(super) const SEALED: &str = "sealed";
/// The ledger's `meta` row: its own chunks removed up to here.
pub(super) const ARCHIVED: &str = "archived";
/// What a segment keeps in its cache of pages: old records are read rarely.
const SEGMENT_CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Chunk rows the journal removes from the ledger in one commit: a
/// segment's 65,536 rows go in ~1,000 commits, a few seconds under load,
/// without adding much to any one commit.
pub const TRIM_ROWS_PER_COMMIT: usize = 64;
/// Bytes a segment is assumed to take per record when checking for room
/// (a record takes ~70 bytes of a segment's file).
const SEAL_BYTES_PER_RECORD: u64 = 128;
/// Chunk rows a segment's file takes per commit (~17 MB): its fsyncs stay
/// short, so the journal's own fsyncs, on the same disk, do not queue
/// behind one of the whole segment.
const SEAL_ROWS_PER_COMMIT: usize = 4_096;

/// Segments kept open between reads (see "Open files" above).
pub const OPEN_SEGMENTS_MAX: usize = 16;

/// One sealed segment's file.
#[derive(Clone)]
struct Segment {
    first: u64,
    last: u64,
    path: PathBuf,
}

/// One sealed segment, open for reading.
struct Opened {
    last: u64,
    db: Arc<ReadOnlyDatabase>,
}

/// The segments open now, each with when it was last read.
#[derive(Default)]
struct OpenSegments {
    reads: u64,
    /// (first record, `reads` when last read, database).
    open: Vec<(u64, u64, Arc<ReadOnlyDatabase>)>,
}

impl OpenSegments {
    /// Counts a read, and gives the segment from `first` if it is open.
    fn read(&mut self, first: u64) -> Option<Arc<ReadOnlyDatabase>> {
        self.reads += 1;
        let now = self.reads;
        let entry = self.open.iter_mut().find(|e| e.0 == first)?;
        entry.1 = now;
        Some(entry.2.clone())
    }
}

/// The sealed segments, in order from record 1 (see the module header).
pub struct History {
    dir: PathBuf,
    segments: RwLock<Vec<Segment>>,
    open: Mutex<OpenSegments>,
}

impl History {
    /// The segments next to the ledger file at `path`, up to `sealed` as
    /// the ledger `db` records it. Leftovers of an interrupted seal are
    /// removed; any other file past `sealed` is refused, not removed: it
    /// may be the only copy of records (a ledger file replaced by a new
    /// or an older one).
    pub fn open(path: &Path, db: &redb::Database) -> Result<History, StoreError> {
        let (sealed, head, first_kept) = {
            let txn = db.begin_read()?;
            let first_kept = txn.open_table(CHUNKS)?.first()?.map(|(k, _)| k.value());
            (marks(&txn.open_table(META)?)?.0, super::recovery::read_head(&txn)?.id, first_kept)
        };
        let dir = path.parent().unwrap_or(Path::new(".")).join("history");
        let history = History { dir, segments: RwLock::new(Vec::new()), open: Mutex::default() };
        if !history.dir.exists() {
            if sealed > 0 {
                return Err(StoreError::Corrupt(format!(
                    "the ledger's records up to {sealed} are in {}, which is missing",
                    history.dir.display()
                )));
            }
            return Ok(history);
        }
        let mut found = Vec::new();
        let mut leftovers = Vec::new();
        for entry in std::fs::read_dir(&history.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
            match parse_name(&name) {
                Some((first, last)) if last <= sealed => found.push((first, last, path)),
                // Written, but the journal had not recorded it: a crash
                // between the rename and its commit. Only the next one
                // can be that, and only if the ledger still holds all of
                // its records.
                Some((first, last))
                    if first == sealed + 1 && last <= head && first_kept.is_some_and(|k| k <= first) =>
                {
                    leftovers.push(path);
                }
                Some(_) => {
                    return Err(StoreError::Corrupt(format!(
                        "history segment {} holds records past what the ledger file relies on (up to {sealed}, head \
                         {head}): is this the ledger file these segments were written with? Nothing was removed",
                        path.display()
                    )))
                }
                None if name.ends_with(".tmp") => leftovers.push(path),
                None => {}
            }
        }
        for path in leftovers {
            remove(&path)?;
        }
        found.sort_unstable_by_key(|&(first, _, _)| first);
        let mut next = 1;
        let mut segments = Vec::with_capacity(found.len());
        for (first, last, path) in found {
            if first != next {
                return Err(StoreError::Corrupt(format!(
                    "history segment {} does not follow record {}: records {next}..{first} are missing",
                    path.display(),
                    next - 1
                )));
            }
            // Opened once to check it, then closed until a read needs it.
            drop(open_segment(&path)?);
            segments.push(Segment { first, last, path });
            next = last + 1;
        }
        if next != sealed + 1 {
            return Err(StoreError::Corrupt(format!(
                "the ledger's records up to {sealed} are sealed in {}, but its segments end at {}",
                history.dir.display(),
                next - 1
            )));
        }
        *history.segments.write().map_err(|_| poisoned())? = segments;
        Ok(history)
    }

    /// No segments: a ledger that keeps every record (tests, tools).
    #[must_use]
    pub fn none() -> History {
        History { dir: PathBuf::new(), segments: RwLock::new(Vec::new()), open: Mutex::default() }
    }

    /// The last record in a complete segment (0: none).
    pub fn sealed(&self) -> u64 {
        self.segments.read().ok().and_then(|s| s.last().map(|s| s.last)).unwrap_or(0)
    }

    /// The segment holding record `id`, opened if it is not open.
    fn segment_of(&self, id: u64) -> Result<Option<Opened>, StoreError> {
        let segment = {
            let segments = self.segments.read().map_err(|_| poisoned())?;
            let i = segments.partition_point(|s| s.last < id);
            match segments.get(i).filter(|s| s.first <= id) {
                Some(s) => s.clone(),
                None => return Ok(None),
            }
        };
        Ok(Some(Opened { last: segment.last, db: self.opened(&segment)? }))
    }

    /// `segment`'s database: the open one, or opened now (outside the
    /// lock, so that reads of open segments do not wait for a file to
    /// open), closing the least recently read one beyond
    /// [`OPEN_SEGMENTS_MAX`].
    fn opened(&self, segment: &Segment) -> Result<Arc<ReadOnlyDatabase>, StoreError> {
        if let Some(db) = self.open.lock().map_err(|_| poisoned())?.read(segment.first) {
            return Ok(db);
        }
        let db = Arc::new(open_segment(&segment.path)?);
        let mut o = self.open.lock().map_err(|_| poisoned())?;
        // Another reader may have opened it meanwhile: keep one.
        if let Some(db) = o.read(segment.first) {
            return Ok(db);
        }
        if o.open.len() >= OPEN_SEGMENTS_MAX {
            if let Some(oldest) = o.open.iter().enumerate().min_by_key(|(_, e)| e.1).map(|(i, _)| i) {
                o.open.swap_remove(oldest);
            }
        }
        let now = o.reads;
        o.open.push((segment.first, now, db.clone()));
        Ok(db)
    }

    /// Writes the next segment from the ledger's chunks, if at least
    /// `records` of them are before the checkpoint (start-up's replay and
    /// `list_accounts` read the ledger's chunks from the checkpoint's on):
    /// records `sealed+1` up to the end of the last chunk that fits in
    /// `records`. Returns its last record. The ledger does not
    /// rely on it until the journal commits `sealed` ([`note_sealed`]).
    ///
    /// `ledger` gives the database for each piece copied, so that a stop
    /// (which takes it out of the store to close it) is never held up by
    /// more than one piece.
    pub fn seal_next(
        &self,
        ledger: &dyn Fn() -> Result<Arc<redb::Database>, StoreError>,
        records: u64,
    ) -> Result<Option<u64>, StoreError> {
        let sealed = self.sealed();
        let db = ledger()?;
        let txn = db.begin_read()?;
        let old_below = read_checkpoint(&txn)?;
        if records == 0 || old_below <= sealed.saturating_add(records) {
            return Ok(None);
        }
        let chunks = txn.open_table(CHUNKS)?;
        // The chunk after the segment's last: its key bounds what fits.
        let Some(end) = chunks.range(..=sealed + 1 + records)?.next_back() else { return Ok(None) };
        let end = end?.0.value();
        if end <= sealed + 1 {
            return Ok(None);
        }
        let (first, last) = (sealed + 1, end - 1);
        // Nothing removes these rows before the segment is recorded, so
        // each piece is read in a transaction of its own: a long copy
        // keeps no old pages of the ledger from being reused.
        drop((chunks, txn, db));
        // A segment must not take the journal's last free space: it needs
        // room for itself (records are ~70 bytes; twice that, for slack)
        // and as much again to spare.
        let wanted = (last - sealed).saturating_mul(2 * SEAL_BYTES_PER_RECORD);
        make_private_dir(&self.dir)?;
        let free = free_bytes(&self.dir)?;
        if free < wanted {
            return Err(StoreError::Redb(redb::Error::Io(std::io::Error::other(format!(
                "{free} bytes free in {}, a history segment wants {wanted}",
                self.dir.display()
            )))));
        }
        let tmp = self.dir.join(format!("{}.tmp", segment_name(first, last)));
        let written = write_segment(&tmp, ledger, first..end).and_then(|rows| check_segment(&tmp, first, last, rows));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let path = self.dir.join(segment_name(first, last));
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.segments.write().map_err(|_| poisoned())?.push(Segment { first, last, path });
        tracing::info!(first, last, "history segment sealed");
        Ok(Some(last))
    }
}

/// Copies the ledger's chunk rows `keys` into a new file at `path`,
/// readable by its owner only (like the ledger's), committed and closed.
/// Returns the rows copied, having checked on the way that they hold
/// every record of `keys`, each chunk starting where the one before ended.
///
/// The rows are counted as they are copied rather than by a pass of
/// their own: that pass read every page of the segment's records a
/// second time, a fifth of the sealing thread's time under load.
fn write_segment(
    path: &Path,
    ledger: &dyn Fn() -> Result<Arc<redb::Database>, StoreError>,
    keys: std::ops::Range<u64>,
) -> Result<u64, StoreError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    // Written pages stay in redb's cache: a small one, not the default GiB.
    let out = redb::Database::builder()
        .set_cache_size(SEGMENT_CACHE_BYTES)
        .create_with_backend(redb::backends::FileBackend::new(opts.open(path)?)?)?;
    // The first record not yet copied, and the first key not yet read:
    // each piece reads on from the key after the last row read, not from
    // `next`, so that a row inside the last chunk copied (a chunk that
    // overlaps it) is seen and refused, whichever piece it falls in.
    let (mut next, mut from) = (keys.start, keys.start);
    let mut rows = 0u64;
    // A half-written file is never used (it keeps its `.tmp` name), so
    // its commits need one phase.
    while from < keys.end {
        let db = ledger()?;
        let txn = db.begin_read()?;
        let chunks = txn.open_table(CHUNKS)?;
        let w = out.begin_write()?;
        {
            let mut to = w.open_table(CHUNKS)?;
            for row in chunks.range(from..keys.end)?.take(SEAL_ROWS_PER_COMMIT) {
                let (k, v) = row?;
                if k.value() != next {
                    return Err(StoreError::Corrupt(format!(
                        "the ledger's chunks break at record {next}: the next one starts at {}",
                        k.value()
                    )));
                }
                to.insert(k.value(), v.value())?;
                next = k.value() + super::record::chunk_len(k.value(), v.value())?;
                from = k.value() + 1;
                rows += 1;
            }
        }
        w.commit()?;
        if chunks.range(from..keys.end)?.next().is_none() {
            break;
        }
    }
    if next != keys.end {
        return Err(StoreError::Corrupt(format!("the ledger's chunks end at record {next}, not {}", keys.end)));
    }
    // Closed here, so that an error closing it is not lost.
    out.close().map_err(|e| StoreError::Corrupt(format!("closing {}: {e}", path.display())))?;
    Ok(rows)
}

/// Before the ledger relies on it: the written file opens cleanly and
/// holds exactly the `rows` chunk rows of records `first..=last`.
fn check_segment(path: &Path, first: u64, last: u64, rows: u64) -> Result<(), StoreError> {
    let db = open_segment(path)?;
    let txn = db.begin_read()?;
    let chunks = txn.open_table(CHUNKS)?;
    let bad = |what: &str| StoreError::Corrupt(format!("history segment {} {what}", path.display()));
    if chunks.len()? != rows {
        return Err(bad("lacks rows it was given"));
    }
    if chunks.first()?.map(|(k, _)| k.value()) != Some(first) {
        return Err(bad("does not start at its first record"));
    }
    let (k, v) = chunks.last()?.ok_or_else(|| bad("is empty"))?;
    let ends = k.value() + super::record::chunk_records(k.value(), v.value()).count() as u64 - 1;
    if ends != last {
        return Err(bad("does not end at its last record"));
    }
    Ok(())
}

/// Bytes free to this process on the file system of `dir`.
fn free_bytes(dir: &Path) -> Result<u64, StoreError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a NUL-terminated path and `st` a zeroed statvfs that
    // the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Makes `dir` (owner only, as the data folder) if it is not there, and
/// makes its entry in the data folder durable.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)?;
    std::fs::File::open(dir.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// The file of records `first..=last`.
fn segment_name(first: u64, last: u64) -> String {
    format!("records-{first:020}-{last:020}.redb")
}

/// `(first, last)` of a segment's file name.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (first, last) = name.strip_prefix("records-")?.strip_suffix(".redb")?.split_once('-')?;
    let (first, last) = (first.parse().ok()?, last.parse().ok()?);
    (first >= 1 && first <= last).then_some((first, last))
}

/// Opens a segment for reading. A file that cannot be read (gone, or no
/// descriptor left) is an I/O error, which readers answer `unavailable`;
/// only a file redb refuses is corrupt, which `audit` reports as a
/// broken chain.
fn open_segment(path: &Path) -> Result<ReadOnlyDatabase, StoreError> {
    redb::Builder::new().set_cache_size(SEGMENT_CACHE_BYTES).open_read_only(path).map_err(|e| match e {
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => StoreError::Redb(redb::Error::Io(
            std::io::Error::new(io.kind(), format!("history segment {}: {io}", path.display())),
        )),
        e => StoreError::Corrupt(format!("history segment {}: {e}", path.display())),
    })
}

fn remove(path: &Path) -> Result<(), StoreError> {
    tracing::info!(file = %path.display(), "removing a history segment the ledger does not rely on");
    std::fs::remove_file(path)?;
    Ok(())
}

fn poisoned() -> StoreError {
    StoreError::Corrupt("the history's lock was poisoned by a panic".into())
}

/// `sealed` and `archived` as a ledger transaction reads them.
pub(super) fn marks(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<(u64, u64), StoreError> {
    let get = |name| meta.get(name)?.map_or(Ok(0), |v| read_u64(v.value()));
    Ok((get(SEALED)?, get(ARCHIVED)?))
}

/// In a journal commit: records that the segments up to `sealed` are
/// complete, and removes up to [`TRIM_ROWS_PER_COMMIT`] of the ledger's
/// chunk rows they hold. Returns `archived` as committed.
pub fn note_sealed(txn: &redb::WriteTransaction, sealed: u64) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(META)?;
    let (was_sealed, mut archived) = marks(&meta)?;
    if sealed > was_sealed {
        meta.insert(SEALED, &sealed.to_be_bytes()[..])?;
    }
    let sealed = sealed.max(was_sealed);
    if archived >= sealed {
        return Ok(archived);
    }
    let mut chunks = txn.open_table(CHUNKS)?;
    // The rows go in one removal of a range: a `first` and a `pop_first`
    // for each went down the tree twice a row and rebuilt its leftmost
    // branch at every removal (15% of the journal thread under batched
    // load). The range ends at the last row of this commit's share. (Its
    // rows are read twice, the second time from the cache: one pass of
    // `extract_from_if` cost no less, the time going to the first reads
    // of the old rows' pages.)
    let mut last = None;
    for row in chunks.range(..=sealed)?.take(TRIM_ROWS_PER_COMMIT) {
        last = Some(row?.0.value());
    }
    if let Some(last) = last {
        chunks.retain_in(..=last, |_, _| false)?;
    }
    // Up to the chunk before the first one left (chunks never straddle a
    // segment's end), at most `sealed`.
    archived = match chunks.first()? {
        Some((k, _)) => (k.value() - 1).min(sealed),
        None => sealed,
    };
    meta.insert(ARCHIVED, &archived.to_be_bytes()[..])?;
    Ok(archived)
}

/// The records as one read transaction of the ledger sees them: the
/// segments up to its `archived`, its own chunks after.
pub struct Records<'a> {
    chunks: redb::ReadOnlyTable<u64, &'static [u8]>,
    archived: u64,
    history: &'a History,
}

impl<'a> Records<'a> {
    pub fn open(txn: &redb::ReadTransaction, history: &'a History) -> Result<Records<'a>, StoreError> {
        let (_, archived) = marks(&txn.open_table(META)?)?;
        Ok(Records { chunks: txn.open_table(CHUNKS)?, archived, history })
    }

    /// Calls `f` with record `id`, if there is one, reading through `cache`.
    pub(super) fn with<T>(
        &self,
        cache: &mut ChunkCache,
        id: u64,
        f: impl FnOnce(Stored<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        if id == 0 || id > self.archived {
            return cache.with(&self.chunks, id, f);
        }
        let segment = self.segment(id)?;
        let txn = segment.db.begin_read()?;
        cache.with(&txn.open_table(CHUNKS)?, id, f)
    }

    /// Calls `f` with record `id`, if there is one.
    pub fn with_record<T>(
        &self,
        id: u64,
        f: impl FnOnce(Stored<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.with(&mut ChunkCache::default(), id, f)
    }

    /// Calls `f(record)` for every record from `from` on, in order, until
    /// it returns `false`.
    pub fn for_each(
        &self,
        from: u64,
        mut f: impl FnMut(Stored<'_>) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut next = from.max(1);
        let mut go_on = true;
        while go_on && next <= self.archived {
            let segment = self.segment(next)?;
            let txn = segment.db.begin_read()?;
            for_each_record(&txn.open_table(CHUNKS)?, next, |s| {
                go_on = f(s)?;
                Ok(go_on)
            })?;
            next = segment.last + 1;
        }
        if go_on {
            for_each_record(&self.chunks, next, f)?;
        }
        Ok(())
    }

    /// Every chunk row in key order: the segments' up to `archived`, then
    /// the ledger's.
    pub fn for_each_chunk(&self, mut f: impl FnMut(u64, &[u8]) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let segments = self.history.segments.read().map_err(|_| poisoned())?.clone();
        for s in segments.iter().filter(|s| s.first <= self.archived) {
            let txn = self.history.opened(s)?.begin_read()?;
            for row in txn.open_table(CHUNKS)?.range(..=self.archived)? {
                let (k, v) = row?;
                f(k.value(), v.value())?;
            }
        }
        for row in self.chunks.range(self.archived + 1..)? {
            let (k, v) = row?;
            f(k.value(), v.value())?;
        }
        Ok(())
    }

    fn segment(&self, id: u64) -> Result<Opened, StoreError> {
        self.history.segment_of(id)?.ok_or_else(|| {
            StoreError::Corrupt(format!("record {id} was moved to the history's segments, but none holds it"))
        })
    }
}
