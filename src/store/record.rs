//! The stored record (format in the module header of `store`), the head of
//! the chain, and records in chunks.

use super::*;
use redb::ReadableTable;

use crate::ledger::{Kind, Links, TREASURY};
use crate::limits::CHUNK_RECORDS_MAX;
use crate::wire::TransferView;

/// One transfer as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRecord {
    pub id: u64,
    pub kind: Kind,
    pub from: Box<str>,
    pub to: Box<str>,
    pub amount: i64,
    pub fee: i64,
    pub memo: Option<Box<str>>,
    pub time: u64,
    pub key: Option<Box<str>>,
    pub prev: [u8; 32],
    pub links: Links,
    /// Who made it: a user id, `key:<key_id>`, or `None` (the server's own
    /// timer, or a record of version 1, which did not say).
    pub by: Option<Box<str>>,
}

/// A record to be stored, borrowing its fields.
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    pub id: u64,
    pub kind: Kind,
    pub from: &'a str,
    pub to: &'a str,
    pub amount: i64,
    pub fee: i64,
    pub memo: Option<&'a str>,
    pub time: u64,
    pub key: Option<&'a str>,
    pub prev: [u8; 32],
    pub links: Links,
    pub by: Option<&'a str>,
}

impl RecordRef<'_> {
    /// Appends the version 2 form to `out` (id and `prev` inside; what
    /// data folders hold from before version 3, and what the tests of
    /// reading it write). Field lengths were bounded when the request was
    /// validated; the casts below rely on that.
    pub fn encode_v2(&self, out: &mut Vec<u8>) {
        out.push(2);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.push(self.kind.to_u8());
        out.extend_from_slice(&self.amount.to_be_bytes());
        out.extend_from_slice(&self.fee.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        out.extend_from_slice(&self.prev);
        out.extend_from_slice(&self.links.from.to_be_bytes());
        out.extend_from_slice(&self.links.to.to_be_bytes());
        out.extend_from_slice(&self.links.fee.to_be_bytes());
        put_short(out, self.from);
        put_short(out, self.to);
        let memo = self.memo.unwrap_or("");
        let n = u16::try_from(memo.len()).expect("memos are at most 256 bytes");
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(memo.as_bytes());
        put_short(out, self.key.unwrap_or(""));
        put_short(out, self.by.unwrap_or(""));
    }

    /// Appends the stored form (version 3) to `out`: no id and no `prev`,
    /// which its chunk gives, and integers as varints (module docs).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(RECORD_VERSION);
        out.push(self.kind.to_u8());
        put_varint(out, zigzag(self.amount));
        put_varint(out, zigzag(self.fee));
        put_varint(out, self.time);
        put_varint(out, self.links.from);
        put_varint(out, self.links.to);
        put_varint(out, self.links.fee);
        put_short(out, self.from);
        put_short(out, self.to);
        let memo = self.memo.unwrap_or("");
        put_varint(out, memo.len() as u64);
        out.extend_from_slice(memo.as_bytes());
        put_short(out, self.key.unwrap_or(""));
        put_short(out, self.by.unwrap_or(""));
    }
}

/// Appends `s` after its length in one byte (ids, keys and who made a
/// record are validated to at most 64 bytes before any record is made).
fn put_short(out: &mut Vec<u8>, s: &str) {
    let n = u8::try_from(s.len()).expect("ids and keys are at most 64 bytes");
    out.push(n);
    out.extend_from_slice(s.as_bytes());
}

/// Appends `v` as a LEB128 varint: 7 bits a byte, low bits first.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Signed to unsigned with small magnitudes small (0, -1, 1, -2 -> 0, 1, 2, 3).
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Reads a version 3 record's fields in order; any read past the end, bad
/// varint or bad UTF-8 is `Corrupt`.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(Self::corrupt)?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            // The tenth byte may carry only the top bit of a u64.
            if shift == 63 && b > 1 {
                return Err(Self::corrupt());
            }
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(Self::corrupt())
    }

    fn text(&mut self, n: usize) -> Result<&'a str, StoreError> {
        std::str::from_utf8(self.take(n)?).map_err(|_| Self::corrupt())
    }

    fn corrupt() -> StoreError {
        StoreError::Corrupt("transfer record".into())
    }
}

impl TransferRecord {
    /// Appends the stored form (version 3) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.as_ref().encode(out);
    }

    /// Appends the version 2 form to `out` (see [`RecordRef::encode_v2`]).
    pub fn encode_v2(&self, out: &mut Vec<u8>) {
        self.as_ref().encode_v2(out);
    }

    /// The record's fields, borrowed.
    #[must_use]
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            id: self.id,
            kind: self.kind,
            from: &self.from,
            to: &self.to,
            amount: self.amount,
            fee: self.fee,
            memo: self.memo.as_deref(),
            time: self.time,
            key: self.key.as_deref(),
            prev: self.prev,
            links: self.links,
            by: self.by.as_deref(),
        }
    }

    /// Parses a version 1 or 2 record, which holds its id and `prev`.
    pub fn decode_v2(bytes: &[u8]) -> Result<TransferRecord, StoreError> {
        RecordRef::decode_v2(bytes).map(|r| r.owned())
    }
}

impl<'a> RecordRef<'a> {
    /// Parses record `id` whose previous hash is `prev`, borrowing its text
    /// from `bytes` (replays and audits read every field but keep none).
    /// A version 1 or 2 record holds its own id and `prev`, and gives
    /// those. The store reads records through [`Stored::record`], which
    /// goes by the chunk's version; this reads a lone record, in tests.
    #[cfg(test)]
    pub fn decode(id: u64, prev: [u8; 32], bytes: &'a [u8]) -> Result<RecordRef<'a>, StoreError> {
        match bytes.first() {
            Some(&RECORD_VERSION) => Self::decode_v3(id, prev, bytes),
            _ => Self::decode_v2(bytes),
        }
    }

    fn decode_v3(id: u64, prev: [u8; 32], bytes: &'a [u8]) -> Result<RecordRef<'a>, StoreError> {
        let corrupt = || StoreError::Corrupt(format!("transfer record {id}"));
        if bytes.first() != Some(&RECORD_VERSION) {
            return Err(corrupt());
        }
        let mut c = Cursor { bytes, pos: 1 };
        let kind = Kind::from_u8(c.byte()?).ok_or_else(corrupt)?;
        let amount = unzigzag(c.varint()?);
        let fee = unzigzag(c.varint()?);
        let time = c.varint()?;
        let links = Links { from: c.varint()?, to: c.varint()?, fee: c.varint()? };
        let n = usize::from(c.byte()?);
        let from = c.text(n)?;
        let n = usize::from(c.byte()?);
        let to = c.text(n)?;
        let n = usize::try_from(c.varint()?).map_err(|_| corrupt())?;
        let memo = Some(c.text(n)?).filter(|m| !m.is_empty());
        let n = usize::from(c.byte()?);
        let key = Some(c.text(n)?).filter(|k| !k.is_empty());
        let n = usize::from(c.byte()?);
        let by = Some(c.text(n)?).filter(|b| !b.is_empty());
        if c.pos != bytes.len() {
            return Err(corrupt());
        }
        Ok(RecordRef { id, kind, from, to, amount, fee, memo, time, key, prev, links, by })
    }

    /// Parses a version 1 or 2 record (its own id and `prev` inside).
    pub fn decode_v2(bytes: &'a [u8]) -> Result<RecordRef<'a>, StoreError> {
        let corrupt = || StoreError::Corrupt("transfer record".into());
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&'a [u8], StoreError> {
            let s = bytes.get(pos..pos + n).ok_or_else(corrupt)?;
            pos += n;
            Ok(s)
        };
        // Version 1 ends at the key; version 2 adds who made the record.
        let version = take(1)?[0];
        if version != 1 && version != 2 {
            return Err(corrupt());
        }
        let u64_at = |s: &[u8]| u64::from_be_bytes(s.try_into().unwrap_or([0; 8]));
        let id = u64_at(take(8)?);
        let kind = Kind::from_u8(take(1)?[0]).ok_or_else(corrupt)?;
        let amount = u64_at(take(8)?) as i64;
        let fee = u64_at(take(8)?) as i64;
        let time = u64_at(take(8)?);
        let prev: [u8; 32] = take(32)?.try_into().map_err(|_| corrupt())?;
        let links = Links { from: u64_at(take(8)?), to: u64_at(take(8)?), fee: u64_at(take(8)?) };
        let text = |s: &'a [u8]| -> Result<&'a str, StoreError> { std::str::from_utf8(s).map_err(|_| corrupt()) };
        let n = usize::from(take(1)?[0]);
        let from = text(take(n)?)?;
        let n = usize::from(take(1)?[0]);
        let to = text(take(n)?)?;
        let len = take(2)?;
        let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let memo = Some(text(take(n)?)?).filter(|m| !m.is_empty());
        let n = usize::from(take(1)?[0]);
        let key = Some(text(take(n)?)?).filter(|k| !k.is_empty());
        let by = if version == 1 {
            None
        } else {
            let n = usize::from(take(1)?[0]);
            Some(text(take(n)?)?).filter(|b| !b.is_empty())
        };
        if pos != bytes.len() {
            return Err(corrupt());
        }
        Ok(RecordRef { id, kind, from, to, amount, fee, memo, time, key, prev, links, by })
    }

    /// The record with its text copied out.
    #[must_use]
    pub fn owned(&self) -> TransferRecord {
        TransferRecord {
            id: self.id,
            kind: self.kind,
            from: self.from.into(),
            to: self.to.into(),
            amount: self.amount,
            fee: self.fee,
            memo: self.memo.map(Into::into),
            time: self.time,
            key: self.key.map(Into::into),
            prev: self.prev,
            links: self.links,
            by: self.by.map(Into::into),
        }
    }
}

impl TransferRecord {
    /// The previous record of `account` in its history list, if `account`
    /// is a party of this record.
    #[must_use]
    pub fn link_of(&self, account: &str) -> Option<u64> {
        if &*self.from == account {
            Some(self.links.from)
        } else if &*self.to == account {
            Some(self.links.to)
        } else if self.fee > 0 && account == TREASURY {
            Some(self.links.fee)
        } else {
            None
        }
    }

    /// The record as the wire shows it, given its own hash.
    #[must_use]
    pub fn view(&self, hash: &[u8; 32]) -> TransferView {
        TransferView::new(
            self.id,
            self.kind,
            self.from.to_string(),
            self.to.to_string(),
            (self.amount, self.fee),
            self.memo.as_deref().map(str::to_owned),
            self.time,
            self.key.as_deref().map(str::to_owned),
            (self.prev, *hash),
            None,
            self.by.as_deref().map(Into::into),
        )
    }
}

/// Hash of a version 1 or 2 record: of its stored bytes, which hold `prev`.
#[must_use]
pub fn record_hash(stored: &[u8]) -> [u8; 32] {
    *blake3::hash(stored).as_bytes()
}

/// Hash of a version 3 record: of the hash before it, then its stored bytes.
#[must_use]
pub fn chained_hash(prev: &[u8; 32], stored: &[u8]) -> [u8; 32] {
    *blake3::Hasher::new().update(prev).update(stored).finalize().as_bytes()
}

/// First byte of a chunk of version 3 records. A chunk of version 1 or 2
/// records starts with the `u32` length of its first record, whose first
/// byte is 0.
pub const CHUNK_V3: u8 = 3;

/// Bytes before a version 3 chunk's first record: [`CHUNK_V3`] and the
/// hash before that record.
pub const CHUNK_V3_HEADER: usize = 1 + 32;

/// Appends `rec` to `out`, a buffer of version 3 chunks, as the journal
/// writes a batch: the chunk's header first if `rec` starts a chunk, then
/// `len u16 | record`. Returns the record's hash.
pub fn append_chunked(out: &mut Vec<u8>, starts_chunk: bool, rec: &RecordRef<'_>) -> [u8; 32] {
    if starts_chunk {
        out.push(CHUNK_V3);
        out.extend_from_slice(&rec.prev);
    }
    let at = out.len();
    out.extend_from_slice(&[0; 2]);
    rec.encode(out);
    let len = u16::try_from(out.len() - at - 2).expect("a record is a few hundred bytes");
    out[at..at + 2].copy_from_slice(&len.to_be_bytes());
    chained_hash(&rec.prev, &out[at + 2..])
}

/// A record as its chunk holds it, with the hashes the chain gives it.
#[derive(Clone, Copy, Debug)]
pub struct Stored<'a> {
    /// The chunk's key plus the record's place in it.
    pub id: u64,
    /// Its stored bytes.
    pub bytes: &'a [u8],
    /// The hash before it: the chunk's (version 3), the record's own
    /// field (versions 1 and 2).
    pub prev: [u8; 32],
    /// Its own hash.
    pub hash: [u8; 32],
    /// In a version 3 chunk: a record of another version there is corrupt.
    v3: bool,
}

impl<'a> Stored<'a> {
    /// Its fields, as its chunk's version reads them.
    pub fn record(&self) -> Result<RecordRef<'a>, StoreError> {
        if self.v3 {
            RecordRef::decode_v3(self.id, self.prev, self.bytes)
        } else {
            RecordRef::decode_v2(self.bytes)
        }
    }
}

/// Reads records by id for a walk back through one account's history: it
/// keeps the chunk it read last, with the hashes of its records up to the
/// furthest one read, so a walk that stays in one chunk (an account in
/// most records, such as `@treasury`) hashes each record once.
#[derive(Default)]
pub(super) struct ChunkCache {
    first: u64,
    value: Vec<u8>,
    v3: bool,
    /// Where each record read so far is in `value`, with its hashes.
    found: Vec<(std::ops::Range<usize>, [u8; 32], [u8; 32])>,
}

impl ChunkCache {
    /// Calls `f` with record `id`, if there is one.
    pub(super) fn with<T>(
        &mut self,
        chunks: &impl ReadableTable<u64, &'static [u8]>,
        id: u64,
        f: impl FnOnce(Stored<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let cached = id.checked_sub(self.first).and_then(|i| usize::try_from(i).ok()).filter(|&i| i < self.found.len());
        let index = match cached {
            Some(index) => index,
            None => {
                let Some(row) = chunks.range(..=id)?.next_back() else {
                    return Ok(None);
                };
                let (first, value) = row?;
                let index = match usize::try_from(id - first.value()) {
                    Ok(i) if i < CHUNK_RECORDS_MAX => i,
                    _ => return Ok(None),
                };
                self.first = first.value();
                self.value.clear();
                self.value.extend_from_slice(value.value());
                self.v3 = self.value.first() == Some(&CHUNK_V3);
                self.found.clear();
                let base = self.value.as_ptr() as usize;
                for stored in chunk_records(self.first, &self.value).take(index + 1) {
                    let s = stored?;
                    let at = s.bytes.as_ptr() as usize - base;
                    self.found.push((at..at + s.bytes.len(), s.prev, s.hash));
                }
                if index >= self.found.len() {
                    return Ok(None);
                }
                index
            }
        };
        let (at, prev, hash) = self.found[index].clone();
        f(Stored { id, bytes: &self.value[at], prev, hash, v3: self.v3 }).map(Some)
    }
}

/// The last record of the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    pub id: u64,
    pub hash: [u8; 32],
}

impl Head {
    #[must_use]
    pub fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.id.to_be_bytes());
        out[8..].copy_from_slice(&self.hash);
        out
    }
    pub(super) fn decode(bytes: &[u8]) -> Result<Head, StoreError> {
        if bytes.len() != 40 {
            return Err(StoreError::Corrupt("head".into()));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[..8]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[8..]);
        Ok(Head { id: u64::from_be_bytes(id), hash })
    }
}

/// Collects version 1 or 2 records into chunks of that version and inserts
/// each full chunk: the move of records kept one per row into chunks, and
/// tests of reading what older versions wrote. The journal writes version
/// 3 chunks with [`append_chunked`].
#[derive(Default)]
pub struct ChunkWriter {
    first: u64,
    count: usize,
    bytes: Vec<u8>,
}

impl ChunkWriter {
    /// Adds record `id`, which must follow the one added before it.
    pub fn push(
        &mut self,
        chunks: &mut redb::Table<'_, u64, &'static [u8]>,
        id: u64,
        record: &[u8],
    ) -> Result<(), StoreError> {
        if self.count == 0 {
            self.first = id;
        } else if id != self.first + self.count as u64 {
            // Not the next id (cannot happen from the journal): start a new chunk.
            self.flush(chunks)?;
            self.first = id;
        }
        let len = u32::try_from(record.len()).map_err(|_| StoreError::Corrupt(format!("record {id} is too long")))?;
        self.bytes.extend_from_slice(&len.to_be_bytes());
        self.bytes.extend_from_slice(record);
        self.count += 1;
        if self.count == CHUNK_RECORDS_MAX {
            self.flush(chunks)?;
        }
        Ok(())
    }

    /// Inserts the chunk being collected, if any.
    pub fn flush(&mut self, chunks: &mut redb::Table<'_, u64, &'static [u8]>) -> Result<(), StoreError> {
        if self.count > 0 {
            chunks.insert(self.first, &self.bytes[..])?;
            self.bytes.clear();
            self.count = 0;
        }
        Ok(())
    }
}

/// The records of the chunk whose first record is `first`, in order, with
/// their hashes: each hash costs one BLAKE3 of a record.
pub fn chunk_records(first: u64, value: &[u8]) -> impl Iterator<Item = Result<Stored<'_>, StoreError>> {
    let Frames { v3, mut prev, records } = chunk_frames(first, value);
    fuse(records.map(move |frame| {
        let (id, bytes) = frame?;
        Ok(if v3 {
            let hash = chained_hash(&prev, bytes);
            Stored { id, bytes, prev: std::mem::replace(&mut prev, hash), hash, v3 }
        } else {
            // Versions 1 and 2 hold `prev` after version, id, kind,
            // amount, fee and time.
            let p = bytes.get(34..66).ok_or_else(|| StoreError::Corrupt(format!("transfer record {id}")))?;
            Stored { id, bytes, prev: p.try_into().unwrap_or([0; 32]), hash: record_hash(bytes), v3 }
        })
    }))
}

/// The records of the chunk whose first record is `first`, decoded, in
/// order, each with its id (the chunk's key plus its place), without their
/// hashes, for readers that need neither the chain nor the hashes (a
/// `list_accounts` page's pass over the tail): they save a BLAKE3 a
/// record. A version 3 record's `prev` is not known here and reads as
/// zeros.
pub(super) fn chunk_records_unhashed(
    first: u64,
    value: &[u8],
) -> impl Iterator<Item = Result<(u64, RecordRef<'_>), StoreError>> {
    let Frames { v3, records, .. } = chunk_frames(first, value);
    fuse(records.map(move |frame| {
        let (id, bytes) = frame?;
        let record = if v3 { RecordRef::decode_v3(id, [0; 32], bytes) } else { RecordRef::decode_v2(bytes) };
        Ok((id, record?))
    }))
}

/// A chunk as stored: its version, the hash before its first record
/// (version 3), and its records' ids and bytes.
struct Frames<I> {
    v3: bool,
    prev: [u8; 32],
    records: I,
}

/// Splits the chunk whose first record is `first` into its records, each
/// with its id (the chunk's key plus its place), stopping at the first
/// fault.
fn chunk_frames(first: u64, value: &[u8]) -> Frames<impl Iterator<Item = Result<(u64, &[u8]), StoreError>>> {
    let v3 = value.first() == Some(&CHUNK_V3);
    let mut rest = value;
    let mut prev = [0u8; 32];
    if v3 {
        match value.get(1..CHUNK_V3_HEADER) {
            Some(p) => {
                prev.copy_from_slice(p);
                rest = &value[CHUNK_V3_HEADER..];
            }
            None => rest = &[],
        }
    }
    let cut = v3 && value.len() < CHUNK_V3_HEADER;
    let mut id = first;
    let mut failed = false;
    let records = std::iter::from_fn(move || {
        if failed {
            return None;
        }
        if cut {
            failed = true;
            return Some(Err(StoreError::Corrupt(format!("chunk {first} ends inside its header"))));
        }
        if rest.is_empty() {
            return None;
        }
        let width = if v3 { 2 } else { 4 };
        let (len, tail) = match rest.split_at_checked(width) {
            Some((len, tail)) => (len.iter().fold(0usize, |n, &b| n << 8 | usize::from(b)), tail),
            None => {
                failed = true;
                return Some(Err(StoreError::Corrupt(format!("chunk {first} ends inside a length"))));
            }
        };
        let Some((bytes, tail)) = tail.split_at_checked(len) else {
            failed = true;
            return Some(Err(StoreError::Corrupt(format!("chunk {first} ends inside a record"))));
        };
        rest = tail;
        let this = id;
        let Some(next) = id.checked_add(1) else {
            failed = true;
            return Some(Err(StoreError::Corrupt(format!("chunk {first} runs past the last id"))));
        };
        id = next;
        Some(Ok((this, bytes)))
    });
    Frames { v3, prev, records }
}

/// The number of records in the chunk whose first record is `first`,
/// without decoding or hashing them; an error if it does not split
/// cleanly into records.
pub(super) fn chunk_len(first: u64, value: &[u8]) -> Result<u64, StoreError> {
    let mut n = 0;
    for frame in chunk_frames(first, value).records {
        frame?;
        n += 1;
    }
    if n == 0 {
        return Err(StoreError::Corrupt(format!("chunk {first} holds no record")));
    }
    Ok(n)
}

/// Ends `items` after its first error.
fn fuse<T>(items: impl Iterator<Item = Result<T, StoreError>>) -> impl Iterator<Item = Result<T, StoreError>> {
    let mut failed = false;
    items.map_while(move |item| {
        if failed {
            return None;
        }
        failed = item.is_err();
        Some(item)
    })
}

/// Calls `f` with record `id`, if there is one: one read, as a
/// [`ChunkCache`] does it.
pub(super) fn with_record<T>(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
    f: impl FnOnce(Stored<'_>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    ChunkCache::default().with(chunks, id, f)
}

/// Calls `f(record)` for every record from id `from` on, in order, until
/// it returns `false`. The ids are the chunks' (key + position); callers
/// that check the chain compare them with the ids inside older records.
pub(super) fn for_each_record(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    from: u64,
    mut f: impl FnMut(Stored<'_>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    for row in chunks_from(chunks, from)? {
        let (first, value) = row?;
        for stored in chunk_records(first.value(), value.value()) {
            let stored = stored?;
            if stored.id >= from && !f(stored)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// [`for_each_record`] decoded and without the hashes
/// ([`chunk_records_unhashed`]): `f(record)` for every record from id
/// `from` on, in order, until it returns `false`.
pub(super) fn for_each_record_unhashed(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    from: u64,
    mut f: impl FnMut(RecordRef<'_>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    for row in chunks_from(chunks, from)? {
        let (first, value) = row?;
        for record in chunk_records_unhashed(first.value(), value.value()) {
            let (id, record) = record?;
            if id >= from && !f(record)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The chunks from the one that holds record `from` on, in order.
fn chunks_from(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    from: u64,
) -> Result<redb::Range<'_, u64, &'static [u8]>, StoreError> {
    let start = match chunks.range(..=from)?.next_back() {
        Some(row) => row?.0.value(),
        None => from,
    };
    Ok(chunks.range(start..)?)
}

/// [`for_each_record`] a group at a time: `f(group)` gets up to `size`
/// consecutive records (at least one; fewer at a chunk's end and before a
/// fault), in order, until it returns `false`. A caller that fetches what
/// a whole group touches before it works on any lets the cache misses
/// overlap.
pub(super) fn for_each_record_group(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    from: u64,
    size: usize,
    mut f: impl FnMut(&[Stored<'_>]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let size = size.max(1);
    for row in chunks_from(chunks, from)? {
        let (first, value) = row?;
        let mut group = Vec::with_capacity(size.min(crate::limits::CHUNK_RECORDS_MAX));
        for stored in chunk_records(first.value(), value.value()) {
            let stored = match stored {
                Ok(stored) => stored,
                // The records before a fault are handed over first, as
                // one at a time they would have been.
                Err(e) => {
                    if !group.is_empty() && !f(&group)? {
                        return Ok(());
                    }
                    return Err(e);
                }
            };
            if stored.id < from {
                continue;
            }
            group.push(stored);
            if group.len() == size {
                if !f(&group)? {
                    return Ok(());
                }
                group.clear();
            }
        }
        if !group.is_empty() && !f(&group)? {
            return Ok(());
        }
    }
    Ok(())
}
