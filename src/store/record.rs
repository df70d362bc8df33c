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
    pub prev: &'a [u8; 32],
    pub links: Links,
    pub by: Option<&'a str>,
}

impl RecordRef<'_> {
    /// Appends the stored form to `out`. Field lengths were bounded when the
    /// request was validated; the casts below rely on that.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.push(self.kind.to_u8());
        out.extend_from_slice(&self.amount.to_be_bytes());
        out.extend_from_slice(&self.fee.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        out.extend_from_slice(self.prev);
        out.extend_from_slice(&self.links.from.to_be_bytes());
        out.extend_from_slice(&self.links.to.to_be_bytes());
        out.extend_from_slice(&self.links.fee.to_be_bytes());
        let short = |out: &mut Vec<u8>, s: &str| {
            let n = u8::try_from(s.len()).expect("ids and keys are at most 64 bytes");
            out.push(n);
            out.extend_from_slice(s.as_bytes());
        };
        short(out, self.from);
        short(out, self.to);
        let memo = self.memo.unwrap_or("");
        let n = u16::try_from(memo.len()).expect("memos are at most 256 bytes");
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(memo.as_bytes());
        short(out, self.key.unwrap_or(""));
        short(out, self.by.unwrap_or(""));
    }
}

impl TransferRecord {
    /// Appends the stored form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.as_ref().encode(out);
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
            prev: &self.prev,
            links: self.links,
            by: self.by.as_deref(),
        }
    }

    /// Parses the stored form.
    pub fn decode(bytes: &[u8]) -> Result<TransferRecord, StoreError> {
        RecordRef::decode(bytes).map(|r| r.owned())
    }
}

impl<'a> RecordRef<'a> {
    /// Parses the stored form, borrowing its text from `bytes` (replays and
    /// audits read every field but keep none).
    pub fn decode(bytes: &'a [u8]) -> Result<RecordRef<'a>, StoreError> {
        let corrupt = || StoreError::Corrupt("transfer record".into());
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&'a [u8], StoreError> {
            let s = bytes.get(pos..pos + n).ok_or_else(corrupt)?;
            pos += n;
            Ok(s)
        };
        // Version 1 ends at the key; version 2 adds who made the record.
        let version = take(1)?[0];
        if version != 1 && version != RECORD_VERSION {
            return Err(corrupt());
        }
        let u64_at = |s: &[u8]| u64::from_be_bytes(s.try_into().unwrap_or([0; 8]));
        let id = u64_at(take(8)?);
        let kind = Kind::from_u8(take(1)?[0]).ok_or_else(corrupt)?;
        let amount = u64_at(take(8)?) as i64;
        let fee = u64_at(take(8)?) as i64;
        let time = u64_at(take(8)?);
        let prev: &'a [u8; 32] = take(32)?.try_into().map_err(|_| corrupt())?;
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
            prev: *self.prev,
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

/// Hash of a stored record.
#[must_use]
pub fn record_hash(stored: &[u8]) -> [u8; 32] {
    *blake3::hash(stored).as_bytes()
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

/// Collects a commit's records into chunks and inserts each full chunk.
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

/// The records of one chunk, in order.
pub(super) fn chunk_records(value: &[u8]) -> impl Iterator<Item = Result<&[u8], StoreError>> {
    let mut rest = value;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            rest = &[];
            return Some(Err(StoreError::Corrupt("a chunk ends inside a length".into())));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            rest = &[];
            return Some(Err(StoreError::Corrupt("a chunk ends inside a record".into())));
        }
        let (record, tail) = tail.split_at(len);
        rest = tail;
        Some(Ok(record))
    })
}

/// Calls `f` with the stored bytes of record `id`, if there is one.
pub(super) fn with_record<T>(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
    f: impl FnOnce(&[u8]) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let Some(row) = chunks.range(..=id)?.next_back() else {
        return Ok(None);
    };
    let (first, value) = row?;
    let Ok(index) = usize::try_from(id - first.value()) else {
        return Ok(None);
    };
    if index >= CHUNK_RECORDS_MAX {
        return Ok(None);
    }
    let record = chunk_records(value.value()).nth(index).transpose()?;
    record.map(f).transpose()
}

/// Calls `f(id, record)` for every record from id `from` on, in order, until
/// it returns `false`. The ids are the chunks' (key + position); callers
/// compare them with the ids inside the records.
pub(super) fn for_each_record(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    from: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let start = match chunks.range(..=from)?.next_back() {
        Some(row) => row?.0.value(),
        None => from,
    };
    for row in chunks.range(start..)? {
        let (first, value) = row?;
        for (id, record) in (first.value()..).zip(chunk_records(value.value())) {
            if id >= from && !f(id, record?)? {
                return Ok(());
            }
        }
    }
    Ok(())
}
