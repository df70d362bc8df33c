//! The network side: the accept loop (bounded by `limits.connections_max`)
//! and, in [`conn`], one reader and one writer task per connection.

pub mod conn;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::api::Ctx;
use crate::error::{ApiError, ErrorCode};
use crate::stats::Stats;
use crate::wire::frame;

/// Accepts connections until the server shuts down.
pub async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    let shutdown = ctx.shutdown.clone();
    let connections = Arc::new(Semaphore::new(ctx.config.limits.connections_max));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            Stats::add(&ctx.stats.connections, 1);
            Stats::add(&ctx.stats.connections_total, 1);
            tracing::debug!(%peer, "connection opened");
            conn::connection(&ctx, stream, peer.ip()).await;
            ctx.stats.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// Tells a client over the connection limit why it is being dropped.
async fn refuse(mut stream: TcpStream) {
    let mut out = BytesMut::new();
    let err: Result<(), ApiError> = Err(ApiError::new(ErrorCode::Overloaded, "too many connections"));
    frame::encode_response(&mut out, None, &err);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}
