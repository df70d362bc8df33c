//! `GET /metrics`: the server's counters in the Prometheus (OpenMetrics)
//! text format, names prefixed `tally_`. Read at each scrape from the
//! atomics in [`crate::stats`] and [`crate::metrics`]; nothing is kept
//! between scrapes.
//!
//! Who may read it: callers from a loopback address, callers with a staff
//! token or key (admin, operator, auditor), or anyone with
//! `http.metrics_public = true`. The figures are the server's, never a
//! user's (no account, user or amount appears in a label).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{error, session, Peer};
use crate::api::Ctx;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::{self as m, OP_SLOTS, RESULT_SLOTS};
use crate::stats::Stats;

pub(super) async fn serve(State(ctx): State<Arc<Ctx>>, req: Request) -> Response {
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    // A loopback caller that names this host by a name it does not own
    // may be a web page that re-pointed its own name at 127.0.0.1 (DNS
    // rebinding): it is let in only with credentials.
    let local_name = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).is_none_or(is_local_host);
    let open = ctx.config.http.metrics_public || (peer.is_some_and(|p| p.is_loopback()) && local_name);
    if !open {
        let peer = peer.unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        match session(&ctx, req.headers(), peer).await {
            Err(e) => return error(&e),
            Ok(s) => match s.binding.as_ref().map(|b| b.principal.role) {
                Some(role) if role.is_staff() => {}
                Some(_) => return error(&ApiError::forbidden("/metrics is for staff roles")),
                None => {
                    return error(&ApiError::new(
                        ErrorCode::Unauthenticated,
                        "/metrics needs a staff token or key from this address",
                    ))
                }
            },
        }
    }
    let asked = ctx.otp.call(crate::otp::OtpMsg::Count, Some(std::time::Duration::from_secs(5))).await;
    let otp_sessions = match asked {
        Ok(ractor::rpc::CallResult::Success(n)) => n as i64,
        _ => return error(&ApiError::internal("the OTP supervisor is not running")),
    };
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry(&ctx, otp_sessions)).is_err() {
        return error(&ApiError::internal("could not encode the metrics"));
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
        .into_response()
}

/// `localhost` or an IP address, with or without a port.
fn is_local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => return v6.split(']').next().is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn registry(ctx: &Ctx, otp_sessions: i64) -> Registry {
    let mut r = Registry::with_prefix("tally");
    let counter = |v: u64| ConstCounter::new(v);
    let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    let s = &ctx.stats;

    let requests = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    for op in 0..OP_SLOTS {
        for result in 0..RESULT_SLOTS {
            let n = m::requests(op, result);
            if n > 0 {
                requests.get_or_create(&vec![("op", m::op_name(op)), ("code", m::result_name(result))]).inc_by(n);
            }
        }
    }
    r.register("requests", "Requests answered, by op and result code (ok or the error code)", requests);
    r.register("requests_inflight", "Requests read and not yet answered", gauge(m::inflight()));
    r.register(
        "transfers",
        "Balance-changing records committed: transfers, mints, adds (a batch counts each item)",
        counter(Stats::get(&s.transfers)),
    );
    r.register("commits", "Journal commits (each one durable write)", counter(Stats::get(&s.commits)));
    r.register("commit_batch_size", "Commands per journal commit", Snapshot::of(&m::COMMIT_ITEMS));
    r.register("fsync_seconds", "Time of each commit's durable write", Snapshot::of(&m::FSYNC_MICROS));
    r.register("journal_queue_depth", "Commands waiting for the journal", gauge(ctx.journal.depth() as u64));
    r.register("connections", "Open connections (TCP, TLS and HTTP)", gauge(Stats::get(&s.connections)));
    r.register("connections_accepted", "Connections accepted", counter(Stats::get(&s.connections_total)));
    r.register("logins_failed", "Logins refused for a wrong password", counter(Stats::get(&m::LOGINS_FAILED)));
    r.register("rate_limited", "Requests refused with rate_limited", counter(m::answered_with(ErrorCode::RateLimited)));
    r.register("otp_sessions_open", "One-time-password sessions waiting for a code", ConstGauge::new(otp_sessions));
    r.register("otp_failed", "Wrong one-time codes (otp_invalid)", counter(m::answered_with(ErrorCode::OtpInvalid)));
    r.register(
        "otp_exhausted",
        "One-time-password sessions ended by too many wrong codes or resends",
        counter(m::answered_with(ErrorCode::OtpExhausted)),
    );
    r.register("mails_sent", "Mails delivered to the transport", counter(Stats::get(&m::MAILS_SENT)));
    r.register("mails_failed", "Mails the transport refused or that failed", counter(Stats::get(&m::MAILS_FAILED)));
    r
}

/// A histogram as read at one scrape.
#[derive(Debug)]
struct Snapshot {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl Snapshot {
    fn of<const N: usize>(h: &m::Histogram<N>) -> Snapshot {
        let (sum, count, buckets) = h.snapshot();
        Snapshot { sum, count, buckets }
    }
}

impl EncodeMetric for Snapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_hosts_are_addresses_and_localhost() {
        for local in ["127.0.0.1:7780", "127.0.0.1", "localhost:7780", "LOCALHOST", "[::1]:7780", "10.0.0.5:80"] {
            assert!(super::is_local_host(local), "{local}");
        }
        for remote in ["attacker.example:7780", "attacker.example", "127.0.0.1.nip.io:7780", "[evil]:1"] {
            assert!(!super::is_local_host(remote), "{remote}");
        }
    }
}
