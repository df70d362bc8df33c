//! The network side: the accept loops, plaintext and TLS (together bounded
//! by `limits.connections_max`), and, in [`conn`], one reader and one
//! writer task per connection.

pub mod conn;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::api::Ctx;
use crate::error::{ApiError, ErrorCode};
use crate::stats::Stats;
use crate::wire::frame;

/// Accepts connections until the server shuts down; with `tls`, each
/// must complete a TLS handshake (within `limits.frame_timeout_ms`)
/// before its first request is read; with `http`, they speak HTTP/1.1 to
/// its routes instead of the protocol. `connections` is shared by every
/// listener.
pub async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    tls: Option<TlsAcceptor>,
    http: Option<axum::Router>,
    connections: Arc<Semaphore>,
) {
    let shutdown = ctx.shutdown.clone();
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
            if tls.is_none() {
                tokio::spawn(refuse(stream, http.is_some()));
            }
            // A TLS client gets no plaintext explanation: it could not read it.
            continue;
        };
        let ctx = ctx.clone();
        let tls = tls.clone();
        let http = http.clone();
        tokio::spawn(async move {
            Stats::add(&ctx.stats.connections, 1);
            Stats::add(&ctx.stats.connections_total, 1);
            tracing::debug!(%peer, "connection opened");
            let _ = stream.set_nodelay(true);
            match (tls, http) {
                (None, None) => {
                    let (rd, wr) = stream.into_split();
                    conn::connection(&ctx, rd, wr, peer.ip()).await;
                }
                (Some(acceptor), None) => {
                    if let Some(s) = handshake(&ctx, &acceptor, stream, peer).await {
                        let (rd, wr) = tokio::io::split(s);
                        conn::connection(&ctx, rd, wr, peer.ip()).await;
                    }
                }
                (None, Some(app)) => crate::http::connection(&ctx, app, stream, peer.ip()).await,
                (Some(acceptor), Some(app)) => {
                    if let Some(s) = handshake(&ctx, &acceptor, stream, peer).await {
                        crate::http::connection(&ctx, app, s, peer.ip()).await;
                    }
                }
            }
            ctx.stats.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// The server side of a TLS handshake, bounded in time; `None` if it
/// failed (a plaintext client, an untrusted or missing client
/// certificate), timed out, or the server is shutting down.
async fn handshake(
    ctx: &Ctx,
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let timeout = Duration::from_millis(ctx.config.limits.frame_timeout_ms);
    tokio::select! {
        () = ctx.shutdown.cancelled() => None,
        r = tokio::time::timeout(timeout, acceptor.accept(stream)) => match r {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::info!(target: "security", %peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::info!(target: "security", %peer, "TLS handshake timed out");
                None
            }
        },
    }
}

/// Tells a client over the connection limit why it is being dropped, in
/// its protocol.
async fn refuse(mut stream: TcpStream, http: bool) {
    let mut out = BytesMut::new();
    if http {
        let body = r#"{"code":"overloaded","message":"too many connections"}"#;
        out.extend_from_slice(
            format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    } else {
        let err: Result<(), ApiError> = Err(ApiError::new(ErrorCode::Overloaded, "too many connections"));
        frame::encode_response(&mut out, None, &err);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}
