//! One connection: a reader task that decodes requests (binary frames or
//! text lines) and dispatches them, and a writer task that encodes the
//! answers and writes them, holding each request's reply slots until its
//! answer is on the socket.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::api::{self, Ctx, Session};
use crate::error::{ApiError, ErrorCode};
use crate::limits::{
    ANONYMOUS_FRAME_BYTES_MAX, BATCH_ITEM_SLOT_BYTES, LINE_BYTES_MAX, PAGE_ITEM_BYTES_MAX, REPLY_SLOT_BYTES,
    WRITE_BATCH_BYTES,
};
use crate::reply::{Outgoing, Permits, ReplyTo};
use crate::stats::Stats;
use crate::wire::frame::{self, HEADER_BYTES};
use crate::wire::Op;

enum Mode {
    Binary,
    Text,
}

/// Reads more bytes; `Ok(false)` on a clean end of stream, when the
/// server shuts down or when the writer gave up on the peer (`closed`). A
/// peer that has started a frame must finish it within
/// `limits.frame_timeout_ms`; an anonymous peer may stay idle for
/// `limits.idle_anonymous_ms`, a logged-in one as long as it likes.
async fn fill<R: AsyncRead + Unpin>(
    ctx: &Ctx,
    rd: &mut R,
    buf: &mut BytesMut,
    closed: &CancellationToken,
    anonymous: bool,
) -> std::io::Result<bool> {
    let limits = &ctx.config.limits;
    let (timeout, what) = if !buf.is_empty() {
        (Duration::from_millis(limits.frame_timeout_ms), "incomplete frame")
    } else if anonymous {
        (Duration::from_millis(limits.idle_anonymous_ms), "idle and not logged in")
    } else {
        (Duration::MAX, "")
    };
    tokio::select! {
        biased;
        () = closed.cancelled() => Ok(false),
        r = tokio::time::timeout(timeout, rd.read_buf(buf)) => match r {
            Ok(r) => Ok(r? > 0),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, what)),
        },
    }
}

/// Serves one connection, plaintext or TLS: `rd` and `wr` are its two
/// directions.
pub(super) async fn connection<R, W>(ctx: &Arc<Ctx>, mut rd: R, wr: W, peer: IpAddr)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // Cancelled when the server shuts down, or by the writer when the peer
    // stops taking replies: the reader then stops too.
    let closed = ctx.shutdown.child_token();
    match fill(ctx, &mut rd, &mut buf, &closed, true).await {
        Ok(true) => {}
        _ => return,
    }
    let mode = if ctx.config.text_mode && buf[0].is_ascii_alphabetic() { Mode::Text } else { Mode::Binary };
    let (tx, rx) = mpsc::unbounded_channel();
    let write_timeout = Duration::from_millis(ctx.config.limits.write_timeout_ms);
    let writer = tokio::spawn(write_loop(wr, rx, matches!(mode, Mode::Text), write_timeout, closed.clone(), peer));
    let per_connection = match mode {
        // Text mode answers one line at a time, in order.
        Mode::Text => 1,
        Mode::Binary => ctx.config.limits.inflight_per_connection_max,
    };
    let slots = Arc::new(Semaphore::new(per_connection));
    let mut session = Session::new(peer);
    let mut reader = Reader { ctx, tx: &tx, slots: &slots, per_connection, closed: &closed, session: &mut session };
    let result = match mode {
        Mode::Binary => reader.binary(&mut rd, &mut buf).await,
        Mode::Text => reader.text(&mut rd, &mut buf).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "connection closed");
    }
    // Debits already read are answered like any other request.
    session.outbox.flush(&ctx.router);
    drop(tx);
    // The writer ends once every in-flight request has been answered.
    let _ = writer.await;
}

struct Reader<'a> {
    ctx: &'a Arc<Ctx>,
    tx: &'a mpsc::UnboundedSender<Outgoing>,
    slots: &'a Arc<Semaphore>,
    /// The capacity of `slots`.
    per_connection: usize,
    closed: &'a CancellationToken,
    session: &'a mut Session,
}

impl Reader<'_> {
    /// The return address of a request whose reply may take `slots` reply
    /// slots ([`reply_slots`]), holding that many per-connection and
    /// server-wide permits until the reply is written. Waiting here is the
    /// back-pressure: a client past its limit is simply not read from until
    /// written answers free slots. `None` if the connection closed while
    /// waiting.
    ///
    /// Each semaphore is asked for at most its capacity: a connection's
    /// (1 in the text mode, which answers in order) may be smaller than
    /// what the reply needs, and the server-wide count still takes it all.
    async fn reply_to(&mut self, id: Option<u64>, slots: usize) -> Option<ReplyTo> {
        let connection = self.permit(self.slots.clone(), permits(slots, self.per_connection)).await?;
        let server =
            self.permit(self.ctx.inflight.clone(), permits(slots, self.ctx.config.limits.inflight_max)).await?;
        Some(ReplyTo::new(self.tx.clone(), id, Permits { connection, server }))
    }

    /// `n` permits of `semaphore`; before waiting for them, the debits in
    /// the outbox go out (they hold permits, and only their answers free
    /// more). `None` if the connection closed while waiting; `Some(None)`
    /// if the semaphore was closed.
    async fn permit(&mut self, semaphore: Arc<Semaphore>, n: u32) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
        match semaphore.clone().try_acquire_many_owned(n) {
            Ok(p) => Some(Some(p)),
            Err(tokio::sync::TryAcquireError::Closed) => Some(None),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.session.outbox.flush(&self.ctx.router);
                tokio::select! {
                    () = self.closed.cancelled() => None,
                    p = semaphore.acquire_many_owned(n) => Some(p.ok()),
                }
            }
        }
    }

    /// Reads more bytes, sending the outbox first (nothing waits in it
    /// while the reader waits for the client).
    async fn fill<R: AsyncRead + Unpin>(&mut self, rd: &mut R, buf: &mut BytesMut) -> std::io::Result<bool> {
        self.session.outbox.flush(&self.ctx.router);
        let anonymous = self.session.binding.is_none();
        let more = fill(self.ctx, rd, buf, self.closed, anonymous).await?;
        self.session.read_ms = crate::clock::now_ms();
        self.session.read_ticket = self.ctx.cluster.as_ref().map(|c| c.reads.ticket());
        Ok(more)
    }

    /// The largest frame this connection may send now: an anonymous one
    /// only needs room for a login or signup.
    fn frame_max(&self) -> usize {
        let configured = self.ctx.config.limits.frame_bytes_max;
        if self.session.binding.is_none() {
            configured.min(ANONYMOUS_FRAME_BYTES_MAX)
        } else {
            configured
        }
    }

    fn error_now(&self, id: Option<u64>, error: ApiError) {
        ReplyTo::new(self.tx.clone(), id, Permits::default()).counted(None).err(error);
    }

    async fn binary<R: AsyncRead + Unpin>(&mut self, rd: &mut R, buf: &mut BytesMut) -> std::io::Result<()> {
        loop {
            let frame_max = self.frame_max();
            while buf.len() < HEADER_BYTES {
                if !self.fill(rd, buf).await? {
                    return Ok(());
                }
            }
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len > frame_max {
                self.error_now(
                    None,
                    ApiError::new(
                        ErrorCode::FrameTooLarge,
                        format!("frame of {len} bytes exceeds the limit of {frame_max}"),
                    ),
                );
                return Ok(());
            }
            buf.reserve(HEADER_BYTES + len);
            while buf.len() < HEADER_BYTES + len {
                if !self.fill(rd, buf).await? {
                    return Ok(());
                }
            }
            buf.advance(HEADER_BYTES);
            let body = buf.split_to(len);
            Stats::add(&self.ctx.stats.ops, 1);
            match frame::parse_envelope(&body) {
                Err(e) => self.error_now(e.id, e.error),
                Ok(env) => {
                    let Some(reply) = self.reply_to(Some(env.id), reply_slots(env.op, env.args)).await else {
                        return Ok(());
                    };
                    let reply = reply.counted(Op::parse(env.op));
                    api::dispatch(self.ctx, self.session, env.op, env.args, reply).await;
                }
            }
        }
    }

    async fn text<R: AsyncRead + Unpin>(&mut self, rd: &mut R, buf: &mut BytesMut) -> std::io::Result<()> {
        let mut scanned = 0;
        loop {
            let Some(pos) = buf[scanned..].iter().position(|&b| b == b'\n').map(|p| p + scanned) else {
                scanned = buf.len();
                if buf.len() > LINE_BYTES_MAX {
                    self.error_now(
                        None,
                        ApiError::new(ErrorCode::FrameTooLarge, format!("line longer than {LINE_BYTES_MAX} bytes")),
                    );
                    return Ok(());
                }
                if !self.fill(rd, buf).await? {
                    return Ok(());
                }
                continue;
            };
            let raw = buf.split_to(pos + 1);
            scanned = 0;
            let line = &raw[..pos];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            Stats::add(&self.ctx.stats.ops, 1);
            let Ok(line) = std::str::from_utf8(line) else {
                self.error_now(None, ApiError::bad_request("the line is not valid UTF-8"));
                continue;
            };
            match crate::wire::text::parse_line(line) {
                Err(e) => self.error_now(None, e),
                Ok(parsed) => {
                    let args = parsed.args_msgpack();
                    let Some(reply) = self.reply_to(None, reply_slots(&parsed.op, &args)).await else {
                        return Ok(());
                    };
                    let reply = reply.counted(Op::parse(&parsed.op));
                    api::dispatch(self.ctx, self.session, &parsed.op, &args, reply).await;
                }
            }
        }
    }
}

/// The permits a reply of `slots` slots takes from a semaphore of
/// `capacity`: at least one, at most all of them (asking for more would
/// wait forever).
pub(crate) fn permits(slots: usize, capacity: usize) -> u32 {
    u32::try_from(slots.clamp(1, capacity)).unwrap_or(u32::MAX)
}

/// How many reply slots ([`REPLY_SLOT_BYTES`] each) a request may need:
/// one, for a page of records or accounts enough for its `limit`, and for
/// a batch enough for its items.
pub(crate) fn reply_slots(op: &str, args: &[u8]) -> usize {
    if op == Op::TransferBatch.name() {
        let items = frame::list_len(args, "transfers").unwrap_or_else(|| batch_items(args));
        return 1 + (items * BATCH_ITEM_SLOT_BYTES).div_ceil(REPLY_SLOT_BYTES);
    }
    #[derive(serde::Deserialize)]
    struct Limit {
        limit: Option<u64>,
    }
    let Some(items) = Op::parse(op).and_then(|op| {
        op.page_items(None)?;
        let limit = frame::decode_args::<Limit>(args).ok().and_then(|l| l.limit);
        op.page_items(limit)
    }) else {
        return 1;
    };
    1 + (items * PAGE_ITEM_BYTES_MAX).div_ceil(REPLY_SLOT_BYTES)
}

/// A `transfer_batch` request's item count as serde reads it (0 where it
/// cannot), without keeping the items.
fn batch_items(args: &[u8]) -> usize {
    frame::decode_args::<BatchItems>(args).map_or(0, |b| b.transfers.0)
}

#[derive(serde::Deserialize)]
struct BatchItems {
    transfers: Count,
}

struct Count(usize);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct Counter;
        impl<'de> serde::de::Visitor<'de> for Counter {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(Counter)
    }
}

/// Encodes the answers of a connection and writes them. The permits of an
/// answer are released only once its bytes are written, so a peer that
/// stops reading holds its slots and is not read from any more; if the
/// socket does not take a batch of replies (up to `WRITE_BATCH_BYTES` and
/// one reply) within `write_timeout`, the connection is closed and
/// everything it held is released.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    text: bool,
    write_timeout: Duration,
    closed: CancellationToken,
    peer: IpAddr,
) {
    let mut out = BytesMut::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut taken = Permits::default();
        while let Some(Outgoing { id, result, permits }) = next {
            if text {
                frame::encode_line(&mut out, &result);
            } else {
                frame::encode_reply(&mut out, id, &result);
            }
            drop(result);
            taken.absorb(permits);
            next = if out.len() < WRITE_BATCH_BYTES { rx.try_recv().ok() } else { None };
        }
        // One timer per batch: the batch (at most `WRITE_BATCH_BYTES` and
        // one reply) must be taken within `write_timeout`. The flush is a
        // no-op on TCP; TLS may hold encrypted bytes back until then.
        let written = tokio::time::timeout(write_timeout, async {
            wr.write_all(&out).await?;
            wr.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                closed.cancel();
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, pending_bytes = out.len(), timeout_ms = write_timeout.as_millis() as u64,
                    "closing a connection whose peer stopped reading");
                closed.cancel();
                return;
            }
        }
        // Every answer of this write is out: its requests' permits go back
        // in one release per semaphore.
        drop(taken);
        out.clear();
        if out.capacity() > 4 * WRITE_BATCH_BYTES {
            // One huge page made the buffer grow: do not keep that memory.
            out = BytesMut::with_capacity(64 * 1024);
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::batch_items;
    use crate::wire::frame::list_len;

    /// Values of every kind, a few levels deep.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{0,3}|transfers", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Batch args as clients send them, and near misses: `transfers` as a
    /// list or as something else, twice, beside other keys.
    fn args() -> impl Strategy<Value = Vec<u8>> {
        let pair = prop_oneof![
            prop::collection::vec(value(), 0..40).prop_map(|v| ("transfers".to_owned(), Value::Array(v))),
            value().prop_map(|v| ("transfers".to_owned(), v)),
            ("[a-z]{0,10}", value()),
        ];
        prop::collection::vec(pair, 0..4).prop_map(|pairs| {
            // A map with its pairs in order, repeats kept.
            let mut out = Vec::new();
            rmp::encode::write_map_len(&mut out, pairs.len() as u32).unwrap();
            for (k, v) in pairs {
                rmp::encode::write_str(&mut out, &k).unwrap();
                out.extend(rmp_serde::to_vec(&v).unwrap());
            }
            out
        })
    }

    proptest! {
        /// Wherever the headers give a count, it is serde's.
        #[test]
        fn the_item_count_from_headers_is_serdes(args in args()) {
            if let Some(n) = list_len(&args, "transfers") {
                prop_assert_eq!(n, batch_items(&args));
            }
        }

        /// Arbitrary bytes: an answer or none, never a panic.
        #[test]
        fn any_bytes_give_a_count_or_none(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = list_len(&bytes, "transfers");
        }
    }

    #[test]
    fn the_count_comes_from_the_headers_of_a_batch() {
        let items: Vec<Value> = (0..300).map(|i| json!({"from": "a", "to": "b", "amount": i})).collect();
        let args = rmp_serde::to_vec_named(&json!({"transfers": items, "atomic": true})).unwrap();
        assert_eq!(list_len(&args, "transfers"), Some(300));
        assert_eq!(batch_items(&args), 300);
        // A list in the last pair is counted from its header alone (the
        // envelope has walked it): a cut list shows it is not walked again.
        let mut alone = rmp_serde::to_vec_named(&json!({"transfers": items})).unwrap();
        alone.pop();
        assert_eq!(list_len(&alone, "transfers"), Some(300));
        // But a header may not claim more items than there are bytes.
        let claims = [&[0x81, 0xa9][..], b"transfers", &[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]].concat();
        assert_eq!(list_len(&claims, "transfers"), None);
        // Twice, or not a list: serde decides.
        let twice = [0x82, 0xa9, b't', b'r', b'a', b'n', b's', b'f', b'e', b'r', b's', 0x90];
        let twice = [&twice[..], &twice[1..]].concat();
        assert_eq!(list_len(&twice, "transfers"), None);
        let args = rmp_serde::to_vec_named(&json!({"transfers": 5})).unwrap();
        assert_eq!(list_len(&args, "transfers"), None);
        assert_eq!(list_len(&rmp_serde::to_vec_named(&json!({"atomic": true})).unwrap(), "transfers"), None);
    }
}
