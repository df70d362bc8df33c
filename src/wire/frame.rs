//! The binary wire format: a 4-byte big-endian length, then a MessagePack body.
//!
//! # Format
//!
//! A request body is a map `{"id": uint, "op": str, "args": map}` (`args`
//! optional). The envelope is parsed here by hand, without building a value
//! tree, and the `args` bytes are checked for well-formedness and nesting depth
//! before serde sees them, so a hostile body (claimed lengths of 4 billion,
//! nesting 400,000 deep) costs at most one pass over its own bytes.

use bytes::{BufMut, BytesMut};
use serde::Serialize;

use crate::error::{ApiError, ErrorCode};
use crate::limits::DECODE_DEPTH_MAX;
use crate::wire::{BatchItem, BatchReply, Reply, TransferArgs, TransferBatchArgs, TransferView};

/// Bytes of the length prefix.
pub const HEADER_BYTES: usize = 4;

/// An empty MessagePack map, the `args` of a request that has none.
pub const EMPTY_MAP: &[u8] = &[0x80];

/// A decoded request envelope, borrowing from the frame body.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub id: u64,
    pub op: &'a str,
    /// The raw MessagePack of `args`, already checked to be one well-formed value.
    pub args: &'a [u8],
}

/// Why a body is not a request; `id` is set when it could be read.
#[derive(Debug, PartialEq, Eq)]
pub struct EnvelopeError {
    pub id: Option<u64>,
    pub error: ApiError,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn malformed(what: &str) -> ApiError {
    ApiError::new(ErrorCode::BadFrame, format!("malformed MessagePack: {what}"))
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ApiError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| malformed("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, ApiError> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, ApiError> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn len(&mut self, n: usize) -> Result<usize, ApiError> {
        usize::try_from(self.be(n)?).map_err(|_| malformed("length"))
    }

    /// Reads a map header, returning its number of pairs.
    fn map_len(&mut self) -> Result<usize, ApiError> {
        match self.u8()? {
            m @ 0x80..=0x8f => Ok(usize::from(m & 0x0f)),
            0xde => self.len(2),
            0xdf => self.len(4),
            _ => Err(ApiError::new(ErrorCode::BadFrame, "a request must be a MessagePack map")),
        }
    }

    fn str(&mut self) -> Result<&'a str, ApiError> {
        std::str::from_utf8(self.str_bytes()?).map_err(|_| malformed("invalid UTF-8"))
    }

    /// A string's bytes, unchecked.
    fn str_bytes(&mut self) -> Result<&'a [u8], ApiError> {
        let n = match self.u8()? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.len(1)?,
            0xda => self.len(2)?,
            0xdb => self.len(4)?,
            _ => return Err(malformed("expected a string")),
        };
        self.take(n)
    }

    /// Reads a list header, returning its number of items.
    fn array_len(&mut self) -> Result<usize, ApiError> {
        match self.u8()? {
            m @ 0x90..=0x9f => Ok(usize::from(m & 0x0f)),
            0xdc => self.len(2),
            0xdd => self.len(4),
            _ => Err(malformed("expected a list")),
        }
    }

    /// Reads a non-negative integer of any width.
    fn uint(&mut self) -> Result<u64, ApiError> {
        let v = match self.u8()? {
            m @ 0x00..=0x7f => u64::from(m),
            0xcc => self.be(1)?,
            0xcd => self.be(2)?,
            0xce => self.be(4)?,
            0xcf => self.be(8)?,
            0xd0 => nonneg(i64::from(self.be(1)? as u8 as i8))?,
            0xd1 => nonneg(i64::from(self.be(2)? as u16 as i16))?,
            0xd2 => nonneg(i64::from(self.be(4)? as u32 as i32))?,
            0xd3 => nonneg(self.be(8)? as i64)?,
            _ => return Err(malformed("expected an unsigned integer")),
        };
        Ok(v)
    }

    /// Skips one value, checking lengths against the bytes present, depth
    /// and its strings' UTF-8.
    fn skip(&mut self, depth: usize) -> Result<(), ApiError> {
        self.walk(depth, true)
    }

    /// [`Cursor::skip`], checking strings' UTF-8 only with `utf8`.
    ///
    /// A loop over the values with a count of those left at each open
    /// level, not a call per value: a batch's args are some seven values
    /// an item, and the envelope walks every one of them. The depth
    /// limit keeps the counts in a small array on the stack.
    fn walk(&mut self, depth: usize, utf8: bool) -> Result<(), ApiError> {
        // `open[l]`: the values left at level `l` after the container opened
        // there, taken up again when it closes.
        let mut open = [0usize; DECODE_DEPTH_MAX + 1];
        let mut level = 0;
        let mut left = 1usize;
        loop {
            while left == 0 {
                if level == 0 {
                    return Ok(());
                }
                level -= 1;
                left = open[level];
            }
            left -= 1;
            if depth + level > DECODE_DEPTH_MAX {
                return Err(ApiError::new(ErrorCode::BadFrame, format!("nesting deeper than {DECODE_DEPTH_MAX}")));
            }
            let m = self.u8()?;
            let (skip, items) = match m {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => continue,
                0xa0..=0xbf => {
                    let s = self.take(usize::from(m & 0x1f))?;
                    if utf8 && !s.is_ascii() {
                        std::str::from_utf8(s).map_err(|_| malformed("invalid UTF-8"))?;
                    }
                    continue;
                }
                0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
                0x90..=0x9f => (0, usize::from(m & 0x0f)),
                0xc1 => return Err(malformed("reserved byte 0xc1")),
                0xc4 | 0xd9 => (self.len(1)?, 0),
                0xc5 | 0xda => (self.len(2)?, 0),
                0xc6 | 0xdb => (self.len(4)?, 0),
                0xc7 => (self.len(1)?.saturating_add(1), 0),
                0xc8 => (self.len(2)?.saturating_add(1), 0),
                0xc9 => (self.len(4)?.saturating_add(1), 0),
                0xca => (4, 0),
                0xcb => (8, 0),
                0xcc | 0xd0 => (1, 0),
                0xcd | 0xd1 => (2, 0),
                0xce | 0xd2 => (4, 0),
                0xcf | 0xd3 => (8, 0),
                0xd4 => (2, 0),
                0xd5 => (3, 0),
                0xd6 => (5, 0),
                0xd7 => (9, 0),
                0xd8 => (17, 0),
                0xdc => (0, self.len(2)?),
                0xdd => (0, self.len(4)?),
                0xde => (0, 2 * self.len(2)?),
                0xdf => (0, self.len(4)?.saturating_mul(2)),
            };
            if utf8 && (0xd9..=0xdb).contains(&m) {
                std::str::from_utf8(self.take(skip)?).map_err(|_| malformed("invalid UTF-8"))?;
            } else {
                self.take(skip)?;
            }
            if items > 0 {
                // Each item takes at least one byte, so a claimed count larger
                // than what is left is rejected before looping over it.
                if items > self.buf.len() - self.pos {
                    return Err(malformed("container claims more items than bytes"));
                }
                // `depth + level <= DECODE_DEPTH_MAX` (checked above), so
                // `level` is within `open`.
                open[level] = left;
                level += 1;
                left = items;
            }
        }
    }
}

fn nonneg(v: i64) -> Result<u64, ApiError> {
    u64::try_from(v).map_err(|_| malformed("negative id"))
}

/// Parses a request body into its envelope.
pub fn parse_envelope(body: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let mut c = Cursor { buf: body, pos: 0 };
    let mut id = None;
    let mut op = None;
    let mut args: Option<&[u8]> = None;
    let fail = |id, error| EnvelopeError { id, error };
    let pairs = c.map_len().map_err(|e| fail(None, e))?;
    if pairs > 3 {
        return Err(fail(None, ApiError::new(ErrorCode::BadFrame, "a request has the keys id, op and args only")));
    }
    for _ in 0..pairs {
        let key = c.str().map_err(|e| fail(id, e))?;
        match key {
            "id" => id = Some(c.uint().map_err(|e| fail(None, e))?),
            "op" => op = Some(c.str().map_err(|e| fail(id, e))?),
            "args" => {
                let start = c.pos;
                c.skip(0).map_err(|e| fail(id, e))?;
                let raw = &body[start..c.pos];
                match raw.first() {
                    Some(0xc0) => args = Some(EMPTY_MAP),
                    Some(0x80..=0x8f | 0xde | 0xdf) => args = Some(raw),
                    _ => {
                        return Err(fail(id, ApiError::bad_request("args must be a map")));
                    }
                }
            }
            other => {
                return Err(fail(id, ApiError::new(ErrorCode::BadFrame, format!("unknown request key {other:?}"))))
            }
        }
    }
    if c.pos != body.len() {
        return Err(fail(id, malformed("trailing bytes after the request")));
    }
    let Some(id) = id else {
        return Err(fail(None, ApiError::new(ErrorCode::BadFrame, "the request has no id")));
    };
    let Some(op) = op else {
        return Err(fail(Some(id), ApiError::new(ErrorCode::BadFrame, "the request has no op")));
    };
    Ok(Envelope { id, op, args: args.unwrap_or(EMPTY_MAP) })
}

/// Checks that `body` is exactly one well-formed MessagePack value.
pub fn validate_value(body: &[u8]) -> Result<(), ApiError> {
    let mut c = Cursor { buf: body, pos: 0 };
    c.skip(0)?;
    if c.pos != body.len() {
        return Err(malformed("trailing bytes"));
    }
    Ok(())
}

/// The length of the one MessagePack value at the start of `buf`: its
/// lengths checked against the bytes present, its strings' UTF-8 not (for
/// a reader that only steps over values, as the load harness steps over a
/// batch reply's results). `None` if it is cut short, nests deeper than
/// [`DECODE_DEPTH_MAX`] or uses the reserved byte.
#[must_use]
pub fn value_len(buf: &[u8]) -> Option<usize> {
    let mut c = Cursor { buf, pos: 0 };
    c.walk(0, false).ok()?;
    Some(c.pos)
}

/// The number of items in the list under `field` of the map `args`, read
/// from the headers alone (no string is checked or copied), for sizing a
/// reply before the args are decoded. `args` are as the envelope gives
/// them: one well-formed value whose strings are checked (see
/// [`parse_envelope`]). `None` unless `args` is a map whose keys are all
/// strings and which holds `field` once, as a list: the caller then asks
/// serde, which decides every other case (`net::conn` proves the two agree
/// wherever this answers).
///
/// A list in the map's last pair is not walked: the envelope has walked
/// it, and it ends where `args` do. Clients send a batch's `transfers`
/// last or alone, and walking its items again was a fifth of the
/// envelope's cost.
pub fn list_len(args: &[u8], field: &str) -> Option<usize> {
    let mut c = Cursor { buf: args, pos: 0 };
    let mut found = None;
    let pairs = c.map_len().ok()?;
    for pair in 0..pairs {
        if c.str_bytes().ok()? == field.as_bytes() {
            // Read ahead: unless the list ends the map, the walk below
            // still steps over it.
            let mut ahead = Cursor { buf: c.buf, pos: c.pos };
            let items = ahead.array_len().ok()?;
            if found.replace(items).is_some() {
                return None;
            }
            if pair + 1 == pairs {
                // Each item takes at least a byte.
                return (items <= args.len() - ahead.pos).then_some(items);
            }
        }
        c.walk(1, false).ok()?;
    }
    (c.pos == args.len()).then_some(found).flatten()
}

/// Decodes a request's `args` into the op's argument type.
pub fn decode_args<T: serde::de::DeserializeOwned>(args: &[u8]) -> Result<T, ApiError> {
    rmp_serde::from_slice(args).map_err(|e| ApiError::bad_request(format!("bad args: {}", explain::<T>(args, &e))))
}

/// `transfer_batch`'s args. The shape every client sends (a map of
/// string keys, items as maps of string keys, strings as `str`, integers
/// as integers) is read here by hand: serde's decode of a batch's items
/// was ~5% of the server's CPU under batched load. Any other shape, and
/// every error, goes to serde, which decides; where the hand reader
/// answers, it answers what serde does (property-tested).
pub fn decode_transfer_batch(args: &[u8]) -> Result<TransferBatchArgs, ApiError> {
    match read_transfer_batch(args) {
        Some(a) => Ok(a),
        None => decode_args(args),
    }
}

/// Items a batch's list is given room for before they are read, as
/// serde's `size_hint::cautious` does: a claimed length costs no more
/// than a MiB until its items are there.
const BATCH_PREALLOC_MAX: usize = (1 << 20) / std::mem::size_of::<TransferArgs>();

fn read_transfer_batch(args: &[u8]) -> Option<TransferBatchArgs> {
    let mut c = Cursor { buf: args, pos: 0 };
    let (mut transfers, mut atomic) = (None, None);
    for _ in 0..c.map_len().ok()? {
        match c.str_bytes().ok()? {
            b"transfers" if transfers.is_none() => {
                let n = c.array_len().ok()?;
                let mut items = Vec::with_capacity(n.min(BATCH_PREALLOC_MAX));
                for _ in 0..n {
                    items.push(c.transfer_args()?);
                }
                transfers = Some(items);
            }
            b"atomic" if atomic.is_none() => {
                atomic = Some(match c.u8().ok()? {
                    0xc0 => None,
                    0xc2 => Some(false),
                    0xc3 => Some(true),
                    _ => return None,
                });
            }
            _ => return None,
        }
    }
    if c.pos != args.len() {
        return None;
    }
    Some(TransferBatchArgs { transfers: transfers?, atomic: atomic.flatten() })
}

impl Cursor<'_> {
    /// One item of a batch, or `None` for anything but the plain shape.
    fn transfer_args(&mut self) -> Option<TransferArgs> {
        let (mut from, mut to, mut amount, mut memo, mut key) = (None, None, None, None, None);
        for _ in 0..self.map_len().ok()? {
            match self.str_bytes().ok()? {
                b"from" if from.is_none() => from = Some(self.opt_string()?),
                b"to" if to.is_none() => to = Some(self.string()?),
                b"amount" if amount.is_none() => amount = Some(self.i64()?),
                b"memo" if memo.is_none() => memo = Some(self.opt_string()?),
                b"key" if key.is_none() => key = Some(self.opt_string()?),
                _ => return None,
            }
        }
        Some(TransferArgs { from: from.flatten(), to: to?, amount: amount?, memo: memo.flatten(), key: key.flatten() })
    }

    fn string(&mut self) -> Option<String> {
        self.str().ok().map(str::to_owned)
    }

    /// A string, or nil for `None`.
    fn opt_string(&mut self) -> Option<Option<String>> {
        if self.buf.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            return Some(None);
        }
        self.string().map(Some)
    }

    /// An integer of any width that fits an `i64`.
    fn i64(&mut self) -> Option<i64> {
        let m = self.u8().ok()?;
        let v = match m {
            0x00..=0x7f => i64::from(m),
            0xe0..=0xff => i64::from(m as i8),
            0xcc => self.be(1).ok()? as i64,
            0xcd => self.be(2).ok()? as i64,
            0xce => self.be(4).ok()? as i64,
            0xcf => i64::try_from(self.be(8).ok()?).ok()?,
            0xd0 => i64::from(self.be(1).ok()? as u8 as i8),
            0xd1 => i64::from(self.be(2).ok()? as u16 as i16),
            0xd2 => i64::from(self.be(4).ok()? as u32 as i32),
            0xd3 => self.be(8).ok()? as i64,
            _ => return None,
        };
        Some(v)
    }
}

/// Says which argument was wrong and what was expected. MessagePack's own
/// errors name neither (`wrong msgpack marker FixStr(3)`), so on this cold
/// path the args are decoded again through a JSON value, whose errors do.
fn explain<T: serde::de::DeserializeOwned>(args: &[u8], e: &rmp_serde::decode::Error) -> String {
    let Ok(value) = rmp_serde::from_slice::<serde_json::Value>(args) else {
        return e.to_string();
    };
    match serde_path_to_error::deserialize::<_, T>(value) {
        Err(e) => {
            let inner = e.inner().to_string();
            let inner = ["i64", "u64", "u32", "i32", "u8"]
                .iter()
                .fold(inner, |m, t| m.replace(&format!("expected {t}"), "expected an integer"));
            let path = e.path().to_string();
            // "unknown field `frm`" names the field already.
            if path == "." || inner.contains(&format!("`{path}`")) {
                inner
            } else {
                format!("{path}: {inner}")
            }
        }
        Ok(_) => e.to_string(),
    }
}

#[derive(Serialize)]
struct OkFrame<'a, T: Serialize> {
    id: Option<u64>,
    ok: &'a T,
}

#[derive(Serialize)]
struct ErrFrame<'a> {
    id: Option<u64>,
    err: &'a ApiError,
}

/// Appends one response frame (length prefix and body) to `out`.
pub fn encode_response<T: Serialize>(out: &mut BytesMut, id: Option<u64>, result: &Result<T, ApiError>) {
    let start = out.len();
    out.put_u32(0);
    let mut w = out.writer();
    let encoded = match result {
        Ok(ok) => rmp_serde::encode::write_named(&mut w, &OkFrame { id, ok }),
        Err(err) => rmp_serde::encode::write_named(&mut w, &ErrFrame { id, err }),
    };
    let out = w.into_inner();
    if let Err(e) = encoded {
        // Only a serializer bug can get here; answer with an error frame
        // rather than a half-written one.
        out.truncate(start + HEADER_BYTES);
        let err = ApiError::internal(format!("could not encode the reply: {e}"));
        let mut w = out.writer();
        let _ = rmp_serde::encode::write_named(&mut w, &ErrFrame { id, err: &err });
    }
    let body_len = u32::try_from(out.len() - start - HEADER_BYTES).unwrap_or(u32::MAX);
    out[start..start + HEADER_BYTES].copy_from_slice(&body_len.to_be_bytes());
}

/// Appends the response frame of any reply: a committed transfer's by
/// hand (the reply of nearly every request under load, where serde's
/// encoding was ~8% of the server's CPU), the rest through serde. Both write
/// the same bytes (unit-tested).
pub fn encode_reply(out: &mut BytesMut, id: Option<u64>, result: &Result<Reply, ApiError>) {
    match result {
        Ok(Reply::Transfer(v)) => encode_transfer_response(out, id, v),
        Ok(Reply::Batch(b)) => encode_batch_response(out, id, b),
        _ => encode_response(out, id, result),
    }
}

/// `{"id": id, "ok": batch}` as rmp-serde writes it, length prefix first:
/// a batch's reply holds an answer an item, and serde's encoding of them
/// was ~4% of the server's CPU under batched load.
fn encode_batch_response(out: &mut BytesMut, id: Option<u64>, b: &BatchReply) {
    encode_framed(out, 32 + 40 * b.results.len(), |w| write_batch(w, id, b));
}

/// Appends one frame, length prefix first, whose body `write` writes
/// (about `room` bytes, reserved first).
fn encode_framed(
    out: &mut BytesMut,
    room: usize,
    write: impl FnOnce(&mut bytes::buf::Writer<&mut BytesMut>) -> std::io::Result<()>,
) {
    let start = out.len();
    out.reserve(HEADER_BYTES + room);
    out.put_u32(0);
    let mut w = out.writer();
    // Writing to a `BytesMut` cannot fail.
    let _ = write(&mut w);
    let out = w.into_inner();
    let body_len = u32::try_from(out.len() - start - HEADER_BYTES).unwrap_or(u32::MAX);
    out[start..start + HEADER_BYTES].copy_from_slice(&body_len.to_be_bytes());
}

/// `{"id": id, "ok": ` as rmp-serde writes the start of a reply.
fn write_ok_head<W: std::io::Write>(w: &mut W, id: Option<u64>) -> std::io::Result<()> {
    w.write_all(b"\x82\xa2id")?;
    match id {
        Some(id) => rmp::encode::write_uint(w, id).map(drop)?,
        None => rmp::encode::write_nil(w)?,
    }
    w.write_all(b"\xa2ok")
}

fn write_batch<W: std::io::Write>(w: &mut W, id: Option<u64>, b: &BatchReply) -> std::io::Result<()> {
    use rmp::encode::{write_array_len, write_map_len, write_sint, write_str, write_uint};
    write_ok_head(w, id)?;
    w.write_all(b"\x83\xa7results")?;
    let len = u32::try_from(b.results.len()).map_err(std::io::Error::other)?;
    write_array_len(w, len)?;
    for item in &b.results {
        match item {
            BatchItem::Done { id, from_balance, to_balance } => {
                write_map_len(w, 1 + u32::from(from_balance.is_some()) + u32::from(to_balance.is_some()))?;
                w.write_all(b"\xa2id")?;
                write_uint(w, *id)?;
                if let Some(v) = from_balance {
                    w.write_all(b"\xacfrom_balance")?;
                    write_sint(w, *v)?;
                }
                if let Some(v) = to_balance {
                    w.write_all(b"\xaato_balance")?;
                    write_sint(w, *v)?;
                }
            }
            BatchItem::Failed { code, message } => {
                w.write_all(b"\x82\xa4code")?;
                write_str(w, code.as_str())?;
                w.write_all(b"\xa7message")?;
                write_str(w, message)?;
            }
        }
    }
    w.write_all(b"\xa7applied")?;
    write_uint(w, b.applied as u64)?;
    w.write_all(b"\xa6failed")?;
    write_uint(w, b.failed as u64)?;
    Ok(())
}

/// `{"id": id, "ok": transfer}` as rmp-serde writes it (maps with string keys,
/// integers in their shortest form, `None` as nil), length prefix first.
/// Values go through `rmp::encode`, as serde's do; the constant keys are
/// written with their string headers in one go.
fn encode_transfer_response(out: &mut BytesMut, id: Option<u64>, v: &TransferView) {
    let room = 256 + v.from.len() + v.to.len() + v.memo.as_ref().map_or(0, String::len);
    encode_framed(out, room, |w| write_transfer(w, id, v));
}

fn write_transfer<W: std::io::Write>(w: &mut W, id: Option<u64>, v: &TransferView) -> std::io::Result<()> {
    use rmp::encode::{write_map_len, write_nil, write_sint, write_str, write_uint};
    let opt_str = |w: &mut W, s: Option<&str>| match s {
        Some(s) => write_str(w, s).map_err(std::io::Error::from),
        None => write_nil(w),
    };
    write_ok_head(w, id)?;
    let optional = u32::from(v.by.is_some()) + u32::from(v.from_balance.is_some()) + u32::from(v.to_balance.is_some());
    write_map_len(w, 11 + optional)?;
    w.write_all(b"\xa2id")?;
    write_uint(w, v.id)?;
    w.write_all(b"\xa4kind")?;
    write_str(w, v.kind.as_str())?;
    w.write_all(b"\xa4from")?;
    write_str(w, &v.from)?;
    w.write_all(b"\xa2to")?;
    write_str(w, &v.to)?;
    w.write_all(b"\xa6amount")?;
    write_sint(w, v.amount)?;
    w.write_all(b"\xa3fee")?;
    write_sint(w, v.fee)?;
    w.write_all(b"\xa4memo")?;
    opt_str(w, v.memo.as_deref())?;
    w.write_all(b"\xa4time")?;
    write_uint(w, v.time)?;
    w.write_all(b"\xa3key")?;
    opt_str(w, v.key.as_deref())?;
    // A hash is a 64-byte string: header d9 40, then the digits.
    w.write_all(b"\xa4prev\xd9\x40")?;
    w.write_all(&v.prev.hex())?;
    w.write_all(b"\xa4hash\xd9\x40")?;
    w.write_all(&v.hash.hex())?;
    if let Some(by) = &v.by {
        w.write_all(b"\xa2by")?;
        write_str(w, by)?;
    }
    if let Some(b) = v.from_balance {
        w.write_all(b"\xacfrom_balance")?;
        write_sint(w, b)?;
    }
    if let Some(b) = v.to_balance {
        w.write_all(b"\xaato_balance")?;
        write_sint(w, b)?;
    }
    Ok(())
}

/// Appends one text-mode response line (`{"ok":...}` or `{"err":...}`) to `out`.
pub fn encode_line<T: Serialize>(out: &mut BytesMut, result: &Result<T, ApiError>) {
    #[derive(Serialize)]
    struct OkLine<'a, T: Serialize> {
        ok: &'a T,
    }
    #[derive(Serialize)]
    struct ErrLine<'a> {
        err: &'a ApiError,
    }
    let mut w = out.writer();
    let encoded = match result {
        Ok(ok) => serde_json::to_writer(&mut w, &OkLine { ok }),
        Err(err) => serde_json::to_writer(&mut w, &ErrLine { err }),
    };
    let out = w.into_inner();
    if encoded.is_err() {
        out.extend_from_slice(br#"{"err":{"code":"internal","message":"could not encode the reply"}}"#);
    }
    out.put_u8(b'\n');
}

/// Encodes a request frame (used by the client).
pub fn encode_request<A: Serialize>(
    out: &mut BytesMut,
    id: u64,
    op: &str,
    args: &A,
) -> Result<(), rmp_serde::encode::Error> {
    #[derive(Serialize)]
    struct Request<'a, A: Serialize> {
        id: u64,
        op: &'a str,
        args: &'a A,
    }
    let start = out.len();
    out.put_u32(0);
    let mut w = out.writer();
    let r = rmp_serde::encode::write_named(&mut w, &Request { id, op, args });
    let out = w.into_inner();
    if let Err(e) = r {
        out.truncate(start);
        return Err(e);
    }
    let body_len = u32::try_from(out.len() - start - HEADER_BYTES).unwrap_or(u32::MAX);
    out[start..start + HEADER_BYTES].copy_from_slice(&body_len.to_be_bytes());
    Ok(())
}

/// Encodes a request frame into a new buffer (tests and tools).
///
/// # Panics
///
/// If `args` cannot be encoded as MessagePack (a serializer error).
#[must_use]
pub fn encode_request_vec<A: Serialize>(id: u64, op: &str, args: &A) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_request(&mut out, id, op, args).expect("args encode as MessagePack");
    out.to_vec()
}

#[cfg(test)]
mod tests;
