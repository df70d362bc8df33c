//! Where a request's answer goes, and the permits it holds until then.

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::error::ApiError;
use crate::protocol::Reply;

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

/// The return address of one request. Dropping it without sending would
/// leave the client waiting, so every path either sends or hands it on.
pub struct ReplyTo {
    tx: mpsc::UnboundedSender<Outgoing>,
    id: Option<u64>,
    permits: Permits,
}

impl ReplyTo {
    #[must_use]
    pub fn new(tx: mpsc::UnboundedSender<Outgoing>, id: Option<u64>, permits: Permits) -> Self {
        ReplyTo { tx, id, permits }
    }

    /// Sends the answer; a closed connection simply drops it.
    pub fn send(self, result: Result<Reply, ApiError>) {
        let _ = self.tx.send(Outgoing { id: self.id, result, permits: self.permits });
    }

    pub fn ok(self, reply: Reply) {
        self.send(Ok(reply));
    }

    pub fn err(self, error: ApiError) {
        self.send(Err(error));
    }
}
