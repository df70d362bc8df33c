//! The web console at `/`: plain HTML, CSS and one JavaScript module,
//! built into the binary (no build step). It uses only the `/v1` API.
//!
//! Every page goes out with a strict Content-Security-Policy: scripts,
//! styles and connections only from this origin, no inline script or
//! style, no framing, no plugins, no forms posting elsewhere. With the
//! console putting server data on the page only as text, a memo or a name
//! holding markup stays text.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use std::sync::Arc;

use crate::api::Ctx;

const INDEX: &str = include_str!("console/index.html");
const APP: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");

/// The policy every console response carries.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                       img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes() -> Router<Arc<Ctx>> {
    Router::new()
        .route("/", get(|| async { page("text/html; charset=utf-8", INDEX) }))
        .route("/console/app.js", get(|| async { page("text/javascript; charset=utf-8", APP) }))
        .route("/console/style.css", get(|| async { page("text/css; charset=utf-8", STYLE) }))
        // Browsers ask for it; there is none.
        .route("/favicon.ico", get(|| async { axum::http::StatusCode::NO_CONTENT }))
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
