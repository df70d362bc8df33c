//! The HTTP gateway: `POST /v1/{op}` with the op's arguments as a JSON
//! object runs [`api::dispatch`], the very function a TCP request runs (one
//! op table, one handler per op, no second copy of any rule), and answers
//! the op's result as JSON or its error with a fitting status; beside it
//! `/healthz`, `/readyz`, `/metrics`, `/v1/openapi.json` and the console.
//!
//! Why it is as safe as the TCP port:
//! - Connections share the TCP listeners' `limits.connections_max`; a
//!   request holds the same server-wide reply slots (`limits.inflight_max`)
//!   as a TCP request until its answer is encoded.
//! - Every wait is bounded: the TLS handshake and the request head within
//!   `limits.frame_timeout_ms` (also while a kept-alive connection is idle),
//!   the body within the same, and a write the peer does not take within
//!   `limits.write_timeout_ms` closes the connection (`WriteTimeout`).
//! - Every buffer is bounded: the head at [`HEAD_BYTES_MAX`], the body at
//!   `limits.frame_bytes_max` (at [`ANONYMOUS_FRAME_BYTES_MAX`] without
//!   credentials, as on TCP).
//! - Credentials are checked per request by the `auth` op itself, with its
//!   failure budget; the caller's address is the TCP peer (no forwarded
//!   headers are trusted), so login and reset budgets count as on TCP.

mod console;
pub mod metrics;
pub mod openapi;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::api::{self, Ctx, Session};
use crate::error::{ApiError, ErrorCode};
use crate::limits::ANONYMOUS_FRAME_BYTES_MAX;
use crate::reply::{Outgoing, Permits, ReplyTo};
use crate::stats::Stats;

/// The largest request head (request line and headers) a client may send.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;

/// The header a service key may come in, as an alternative to
/// `Authorization: Bearer SECRET`.
pub const KEY_HEADER: &str = "x-tally-key";

/// The HTTP status of an error code. Each code has one status, so a client
/// may branch on either; the body always carries the code.
#[must_use]
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadFrame | ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnknownOp | ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::Ineligible => StatusCode::FORBIDDEN,
        ErrorCode::Exists | ErrorCode::Deleted | ErrorCode::KeyConflict => StatusCode::CONFLICT,
        ErrorCode::InsufficientFunds
        | ErrorCode::AboveMax
        | ErrorCode::BelowMin
        | ErrorCode::OtpInvalid
        | ErrorCode::OtpExpired => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::RateLimited | ErrorCode::OtpExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Overloaded | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        // Another member is the one to ask (the body names it).
        ErrorCode::NotLeader => StatusCode::MISDIRECTED_REQUEST,
        // The write was proposed and no answer came in time.
        ErrorCode::UnknownOutcome => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// Where a request came from: the TCP peer of its connection.
#[derive(Clone, Copy)]
struct Peer(IpAddr);

/// The gateway's routes, sharing the TCP side's context.
pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/{op}", post(op))
        .route("/healthz", get(|| async { json(StatusCode::OK, &serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::serve))
        .merge(console::routes())
        .fallback(|| async { error(&ApiError::new(ErrorCode::NotFound, "no such path")) })
        .with_state(ctx)
}

/// Serves one HTTP/1.1 connection (plaintext or TLS) until the client
/// closes it or the server shuts down.
pub async fn connection<S>(ctx: &Arc<Ctx>, app: Router, stream: S, peer: IpAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(Peer(peer));
        app.clone().oneshot(req)
    });
    let head_timeout = Duration::from_millis(ctx.config.limits.frame_timeout_ms);
    let write_timeout = Duration::from_millis(ctx.config.limits.write_timeout_ms);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(HEAD_BYTES_MAX)
        .serve_connection(hyper_util::rt::TokioIo::new(WriteTimeout::new(stream, write_timeout)), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, %peer, "http connection closed");
            }
        }
        () = ctx.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// A stream whose writes fail once one has waited `timeout` for the peer
/// to take bytes: a client that stops reading its answers is dropped, and
/// the answer and connection it held with it, as on the TCP port.
struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    /// Running while a write, flush or shutdown waits for the peer.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        WriteTimeout { inner, timeout, waiting: None }
    }

    /// Passes a write's outcome on; while it is pending, fails it once the
    /// timeout has run out.
    fn bounded<T>(&mut self, cx: &mut Context<'_>, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let timeout = self.timeout;
        let sleep = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer stopped reading")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.bounded(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bounded(cx, polled)
    }
}

/// `POST /v1/{op}`. The request runs in a task of its own: a client that
/// hangs up cannot cancel it half-way (a login's failure must still count
/// against the guesser's budget, and a hash must still hold its permit).
async fn op(State(ctx): State<Arc<Ctx>>, Path(name): Path<String>, req: Request) -> Response {
    let peer = req.extensions().get::<Peer>().map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0);
    let (parts, body) = req.into_parts();
    let handled = tokio::spawn(async move {
        let op = crate::wire::Op::parse(&name);
        match run(&ctx, &name, &parts.headers, body, peer).await {
            Ok(out) => out,
            Err(e) => {
                // Refused before reaching the op: counted as the op's answer.
                crate::metrics::started();
                crate::metrics::answered(crate::metrics::op_slot(op), &Err::<(), _>(e.clone()));
                error(&e)
            }
        }
    });
    handled.await.unwrap_or_else(|_| error(&ApiError::internal("the request failed")))
}

async fn run(ctx: &Arc<Ctx>, name: &str, headers: &HeaderMap, body: Body, peer: IpAddr) -> Result<Response, ApiError> {
    Stats::add(&ctx.stats.ops, 1);
    // The caller first, from the headers alone: the body may be as large
    // as `limits.frame_bytes_max` only for a caller the server knows.
    let mut session = session(ctx, headers, peer).await?;
    let limit = if session.binding.is_some() {
        ctx.config.limits.frame_bytes_max
    } else {
        ctx.config.limits.frame_bytes_max.min(ANONYMOUS_FRAME_BYTES_MAX)
    };
    let body = read_body(ctx, body, limit).await?;
    let args = args_of(headers, &body)?;
    drop(body);
    let slots = crate::net::conn::reply_slots(name, &args);
    let permits = crate::net::conn::permits(slots, ctx.config.limits.inflight_max);
    let server = tokio::select! {
        () = ctx.shutdown.cancelled() => return Err(ApiError::new(ErrorCode::Unavailable, "the server is shutting down")),
        p = ctx.inflight.clone().acquire_many_owned(permits) => p.ok(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reply = ReplyTo::new(tx, None, Permits { connection: None, server }).counted(crate::wire::Op::parse(name));
    api::dispatch(ctx, &mut session, name, &args, reply).await;
    // Debits wait in the session's outbox to go out with the next ones;
    // this session has no next one.
    session.outbox.flush(&ctx.router);
    let Some(Outgoing { result, permits, .. }) = rx.recv().await else {
        return Err(ApiError::internal("no answer"));
    };
    let out = match result {
        Ok(reply) => json(StatusCode::OK, &reply),
        Err(e) => error(&e),
    };
    // The reply slots stay taken until hyper has written the body (or the
    // connection is gone), as a TCP reply's do until it is on the socket.
    Ok(out.map(|body| Body::new(Held { body, permits: Some(permits) })))
}

/// A response body that holds its request's reply slots until it is
/// written out or dropped.
struct Held {
    body: Body,
    permits: Option<Permits>,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.permits = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// `GET /readyz`: ready when the journal can commit (the `health` op).
async fn readyz(State(ctx): State<Arc<Ctx>>) -> Response {
    let (reply, mut rx) = ReplyTo::channel();
    let mut session = Session::new(IpAddr::from([127, 0, 0, 1]));
    api::dispatch(&ctx, &mut session, "health", &[0x80], reply).await;
    match crate::reply::answer(&mut rx).await {
        Ok(r) => json(StatusCode::OK, &r),
        Err(e) => error(&e),
    }
}

/// A session for one request, bound to the caller its headers name (by
/// the `auth` op, with its checks and failure budget), or anonymous.
async fn session(ctx: &Arc<Ctx>, headers: &HeaderMap, peer: IpAddr) -> Result<Session, ApiError> {
    bind(ctx, credentials(headers)?, peer).await
}

async fn bind(ctx: &Arc<Ctx>, credentials: Option<Credentials>, peer: IpAddr) -> Result<Session, ApiError> {
    let mut session = Session::new(peer);
    session.read_ms = crate::clock::now_ms();
    if let Some(c) = credentials {
        let auth = match c {
            Credentials::Token(t) => serde_json::json!({ "token": t }),
            Credentials::Key(k) => serde_json::json!({ "key": k }),
        };
        let auth = rmp_serde::to_vec_named(&auth).map_err(|_| ApiError::internal("could not encode"))?;
        let (reply, mut rx) = ReplyTo::channel();
        api::dispatch(ctx, &mut session, "auth", &auth, reply).await;
        crate::reply::answer(&mut rx).await?;
    }
    Ok(session)
}

enum Credentials {
    Token(String),
    Key(String),
}

/// `Authorization: Bearer TOKEN` (a token from `login`, or a service key's
/// secret), or `X-Tally-Key: SECRET`; none is anonymous.
fn credentials(headers: &HeaderMap) -> Result<Option<Credentials>, ApiError> {
    fn text(v: &HeaderValue) -> Result<&str, ApiError> {
        v.to_str().map(str::trim).map_err(|_| ApiError::new(ErrorCode::Unauthenticated, "unreadable credentials"))
    }
    let bearer = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(v) => {
            let v = text(v)?;
            let Some(secret) = v.strip_prefix("Bearer ").map(str::trim).filter(|s| !s.is_empty()) else {
                return Err(ApiError::new(ErrorCode::Unauthenticated, "Authorization takes \"Bearer TOKEN\""));
            };
            Some(secret.to_owned())
        }
    };
    let key = headers.get(KEY_HEADER).map(text).transpose()?.map(str::to_owned);
    Ok(match (bearer, key) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("send Authorization or X-Tally-Key, not both")),
        (Some(b), None) if crate::auth::KeySecret::key_id_of(&b).is_some() => Some(Credentials::Key(b)),
        (Some(b), None) => Some(Credentials::Token(b)),
        (None, Some(k)) => Some(Credentials::Key(k)),
        (None, None) => None,
    })
}

/// The body, at most `limit` bytes, read within `limits.frame_timeout_ms`.
async fn read_body(ctx: &Ctx, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let timeout = Duration::from_millis(ctx.config.limits.frame_timeout_ms);
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::bad_request(format!("the body did not arrive within {} ms", timeout.as_millis()))),
        Ok(Err(_)) => {
            Err(ApiError::new(ErrorCode::FrameTooLarge, format!("the body exceeds the limit of {limit} bytes")))
        }
        Ok(Ok(b)) => Ok(b),
    }
}

/// The op's arguments: a JSON object (an empty body is `{}`), sent as
/// `application/json`, as the MessagePack map a TCP request carries,
/// transcoded without building a tree and then held to the same bounds
/// (nesting depth, lengths) as a TCP frame. Integers stay integers (i64
/// and u64 exactly); a number with a fraction or exponent is a float,
/// which no integer argument takes.
///
/// The media type matters: a page on another site can post a form or
/// `text/plain` to a server on the visitor's machine without asking, but
/// not `application/json`.
fn args_of(headers: &HeaderMap, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Ok(vec![0x80]);
    };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::bad_request("send the arguments as Content-Type: application/json"));
    }
    if *first != b'{' {
        return Err(ApiError::bad_request("the body must be a JSON object of the op's arguments"));
    }
    let mut out = Vec::with_capacity(body.len());
    let mut from = serde_json::Deserializer::from_slice(body);
    let mut to = rmp_serde::Serializer::new(&mut out).with_struct_map();
    serde_transcode::transcode(&mut from, &mut to)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    from.end().map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    crate::wire::frame::validate_value(&out)?;
    Ok(out)
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(_) => error(&ApiError::internal("could not encode the reply")),
    }
}

/// An error as `{code, message}` (and `item` for a batch) with its status.
fn error(e: &ApiError) -> Response {
    let status = status_of(e.code);
    let bytes = serde_json::to_vec(e).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_become_the_map_a_tcp_request_carries() {
        let mut h = HeaderMap::new();
        assert_eq!(args_of(&h, b"").unwrap(), vec![0x80]);
        assert_eq!(args_of(&h, b" \n").unwrap(), vec![0x80]);
        assert_eq!(args_of(&h, b"{}").unwrap_err().code, ErrorCode::BadRequest, "no media type");
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(args_of(&h, b"{}").unwrap_err().code, ErrorCode::BadRequest, "not JSON's media type");
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        let big = args_of(&h, br#"{"amount": 9007199254740993, "to": "b"}"#).unwrap();
        let back: serde_json::Value = rmp_serde::from_slice(&big).unwrap();
        assert_eq!(back["amount"].as_i64(), Some(9_007_199_254_740_993));
        assert_eq!(back["to"], "b");
        for bad in [&b"[1]"[..], b"1", b"\"x\"", b"{", b"null", b"{} {}", b"{\"a\": 1} x"] {
            assert_eq!(args_of(&h, bad).unwrap_err().code, ErrorCode::BadRequest, "{bad:?}");
        }
        // Deeper than a TCP frame may nest: refused, not decoded.
        let deep = format!("{{\"a\": {}{}}}", "[".repeat(40), "]".repeat(40));
        assert_eq!(args_of(&h, deep.as_bytes()).unwrap_err().code, ErrorCode::BadFrame);
    }

    #[test]
    fn credentials_come_from_one_header() {
        let mut h = HeaderMap::new();
        assert!(credentials(&h).unwrap().is_none());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert!(matches!(credentials(&h).unwrap(), Some(Credentials::Token(t)) if t == "abc"));
        let secret = "tally_0123456789ab_0123456789012345678901234567890123456789012";
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {secret}")).unwrap());
        assert!(matches!(credentials(&h).unwrap(), Some(Credentials::Key(k)) if k == secret));
        h.insert(KEY_HEADER, HeaderValue::from_static("x"));
        assert_eq!(credentials(&h).err().map(|e| e.code), Some(ErrorCode::BadRequest));
        h.remove(KEY_HEADER);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(credentials(&h).err().map(|e| e.code), Some(ErrorCode::Unauthenticated));
    }
}
