//! Where a request's answer goes, and the permits it holds until then.

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::error::ApiError;
use crate::wire::{Op, Reply};

/// One answer on its way to a connection's writer.
pub struct Outgoing {
    pub id: Option<u64>,
    pub result: Result<Reply, ApiError>,
    /// Released when the writer has taken the answer: this is what bounds
    /// the requests in flight per connection and in the whole server.
    pub permits: Permits,
}

/// The per-connection and server-wide in-flight permits of one request.
#[derive(Default)]
pub struct Permits {
    pub connection: Option<OwnedSemaphorePermit>,
    pub server: Option<OwnedSemaphorePermit>,
}

impl Permits {
    /// Takes over `other`'s permits, so that one release returns both (a
    /// release locks the semaphore; the writer releases once per write).
    pub fn absorb(&mut self, other: Permits) {
        fn merge(into: &mut Option<OwnedSemaphorePermit>, p: Option<OwnedSemaphorePermit>) {
            match (into.as_mut(), p) {
                (Some(a), Some(b)) if std::sync::Arc::ptr_eq(a.semaphore(), b.semaphore()) => a.merge(b),
                (None, p) => *into = p,
                // Another semaphore (not made by this server): released at once.
                (Some(_), p) => drop(p),
            }
        }
        merge(&mut self.connection, other.connection);
        merge(&mut self.server, other.server);
    }
}

/// The return address of one request. Every path sends exactly one answer;
/// if a reply is dropped unanswered anyway (an actor killed with requests in
/// its mailbox), the client gets `internal` instead of waiting forever.
pub struct ReplyTo {
    inner: Option<Inner>,
}

struct Inner {
    tx: mpsc::UnboundedSender<Outgoing>,
    id: Option<u64>,
    permits: Permits,
    /// The op slot this request is counted under in the metrics, if it is
    /// a client's request (not one an op runs inside another).
    counted: Option<u8>,
}

impl ReplyTo {
    #[must_use]
    pub fn new(tx: mpsc::UnboundedSender<Outgoing>, id: Option<u64>, permits: Permits) -> Self {
        ReplyTo { inner: Some(Inner { tx, id, permits, counted: None }) }
    }

    /// Counts this request in the metrics (`tally_requests_total`, in
    /// flight until answered) as one for `op` (`None`: unknown or unreadable).
    #[must_use]
    pub fn counted(mut self, op: Option<Op>) -> Self {
        if let Some(i) = self.inner.as_mut() {
            if i.counted.is_none() {
                crate::metrics::started();
                i.counted = Some(crate::metrics::op_slot(op));
            }
        }
        self
    }

    /// A reply whose answer the caller awaits itself (an op that runs
    /// another op first, e.g. a check before an OTP session is opened).
    #[must_use]
    pub fn channel() -> (ReplyTo, mpsc::UnboundedReceiver<Outgoing>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ReplyTo::new(tx, None, Permits::default()), rx)
    }

    /// Sends the answer; a closed connection simply drops it.
    pub fn send(mut self, result: Result<Reply, ApiError>) {
        if let Some(i) = self.inner.take() {
            i.deliver(result);
        }
    }

    pub fn ok(self, reply: Reply) {
        self.send(Ok(reply));
    }

    pub fn err(self, error: ApiError) {
        self.send(Err(error));
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        if let Some(i) = self.inner.take() {
            i.deliver(Err(ApiError::internal("the request was dropped before it was answered")));
        }
    }
}

impl Inner {
    fn deliver(self, result: Result<Reply, ApiError>) {
        if let Some(slot) = self.counted {
            crate::metrics::answered(slot, &result);
        }
        let _ = self.tx.send(Outgoing { id: self.id, result, permits: self.permits });
    }
}

/// Awaits the one answer sent to a [`ReplyTo::channel`].
pub async fn answer(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Result<Reply, ApiError> {
    rx.recv().await.map_or_else(|| Err(ApiError::internal("no answer")), |o| o.result)
}
