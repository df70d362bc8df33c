//! The HTTP gateway against the real binary, spoken by hand over TCP
//! (HTTP/1.1, one request per connection): every error code's status, a
//! transfer over HTTP equal to the same over TCP, exact integers, the
//! metrics counting exactly what was done, readiness following the
//! journal, and the bounds on what a client can make the server hold.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{create, log_line, set_file_size_limit, wait_past, MailServer, Server, ADMIN_PASSWORD};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HTTP: (&str, &str) = ("TALLY_HTTP_LISTEN", "127.0.0.1:0");

/// One request on its own connection: (status, headers, body).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    let given = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if !given("host") {
        head.push_str(&format!("host: {addr}\r\n"));
    }
    if !body.is_empty() && !given("content-type") {
        head.push_str("content-type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await.expect("an answer").unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head");
    let head = String::from_utf8(out[..split].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head, out[split + 4..].to_vec())
}

/// `POST /v1/{op}` with a JSON body and maybe a token: (status, JSON).
async fn post(addr: SocketAddr, op: &str, token: Option<&str>, args: Value) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let (status, _, body) = request(addr, "POST", &format!("/v1/{op}"), &headers, args.to_string().as_bytes()).await;
    (status, serde_json::from_slice(&body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&body))))
}

async fn login(addr: SocketAddr, user: &str, password: &str) -> String {
    let (status, r) = post(addr, "login", None, json!({"user": user, "password": password})).await;
    assert_eq!(status, 200, "{r}");
    r["token"].as_str().unwrap().to_owned()
}

/// Asserts an error answer: its status and code.
fn refused((status, body): (u16, Value), want: (u16, &str)) {
    assert_eq!((status, body["code"].as_str().unwrap_or("")), want, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[tokio::test]
async fn every_error_code_a_client_can_cause_has_its_status() {
    let s = MailServer::start(&[HTTP, ("TALLY_LIMITS_MAX_BALANCE", "1000")]);
    let mut mail = s.mail;
    let h = s.s.http_addr.unwrap();
    let admin = login(h, "admin", ADMIN_PASSWORD).await;
    let a = Some(admin.as_str());
    assert_eq!(post(h, "create_account", a, json!({"account": "alice", "initial": 500})).await.0, 200);
    assert_eq!(post(h, "create_account", a, json!({"account": "bob"})).await.0, 200);

    refused(post(h, "transfer", a, json!({"from": "alice", "to": "bob"})).await, (400, "bad_request"));
    refused(post(h, "transfer", a, json!({"from": "alice", "to": "bob", "amount": 1.5})).await, (400, "bad_request"));
    refused(post(h, "no_such_op", a, json!({})).await, (404, "unknown_op"));
    refused(post(h, "balance", None, json!({"account": "alice"})).await, (401, "unauthenticated"));
    refused(post(h, "balance", Some("not-a-token"), json!({})).await, (401, "unauthenticated"));
    refused(post(h, "balance", a, json!({"account": "ghost"})).await, (404, "not_found"));
    refused(post(h, "create_account", a, json!({"account": "alice"})).await, (409, "exists"));
    refused(
        post(h, "transfer", a, json!({"from": "alice", "to": "bob", "amount": 501})).await,
        (422, "insufficient_funds"),
    );
    refused(post(h, "mint", a, json!({"to": "bob", "amount": 1001})).await, (422, "above_max"));
    let t = json!({"from": "alice", "to": "bob", "amount": 1, "key": "k1"});
    assert_eq!(post(h, "transfer", a, t).await.0, 200);
    refused(
        post(h, "transfer", a, json!({"from": "alice", "to": "bob", "amount": 2, "key": "k1"})).await,
        (409, "key_conflict"),
    );
    assert_eq!(post(h, "create_account", a, json!({"account": "gone"})).await.0, 200);
    assert_eq!(post(h, "delete_account", a, json!({"account": "gone", "reason": "test"})).await.0, 200);
    refused(post(h, "transfer", a, json!({"from": "alice", "to": "gone", "amount": 1})).await, (409, "deleted"));
    refused(post(h, "add", a, json!({"account": "bob", "delta": -1000})).await, (422, "below_min"));

    // A user: forbidden ops, and a transfer that needs a mailed code.
    let args =
        json!({"user": "ann", "role": "user", "name": "Ann", "email": "ann@example.org", "password": "ann-password"});
    assert_eq!(post(h, "create_user", a, args).await.0, 200);
    assert_eq!(post(h, "mint", a, json!({"to": "ann", "amount": 300})).await.0, 200);
    let ann = login(h, "ann", "ann-password").await;
    refused(post(h, "mint", Some(&ann), json!({"to": "ann", "amount": 1})).await, (403, "forbidden"));
    let (status, pending) = post(h, "transfer", Some(&ann), json!({"to": "bob", "amount": 100})).await;
    assert_eq!((status, &pending["delivered"]), (200, &json!(true)), "{pending}");
    let code = mail.next().1;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let confirm = json!({"pending": pending["pending"], "otp": wrong});
    refused(post(h, "confirm", Some(&ann), confirm.clone()).await, (422, "otp_invalid"));
    for _ in 0..3 {
        refused(post(h, "confirm", Some(&ann), confirm.clone()).await, (422, "otp_invalid"));
    }
    refused(post(h, "confirm", Some(&ann), confirm).await, (429, "otp_exhausted"));
    // Wrong passwords until the login budget says no.
    let mut last = (0, Value::Null);
    for _ in 0..10 {
        last = post(h, "login", None, json!({"user": "ann", "password": "wrong-password"})).await;
        if last.0 == 429 {
            break;
        }
        refused(last.clone(), (401, "unauthenticated"));
    }
    refused(last, (429, "rate_limited"));
    // Nothing refused moved anything.
    let (_, b) = post(h, "balance", a, json!({"account": "bob"})).await;
    assert_eq!(b["balance"], 1);
}

#[tokio::test]
async fn an_ineligible_campus_transfer_is_403() {
    let s = Server::start_with(&[HTTP, ("TALLY_PRESET", "campus")]);
    let h = s.http_addr.unwrap();
    for user in ["ann", "bob"] {
        let args = json!({"user": user, "name": user, "email": format!("{user}@campus.example"), "password": "pw-of-the-user"});
        assert_eq!(post(h, "signup", None, args).await.0, 200);
    }
    let admin = login(h, "admin", ADMIN_PASSWORD).await;
    assert_eq!(post(h, "mint", Some(&admin), json!({"to": "ann", "amount": 100})).await.0, 200);
    let ann = login(h, "ann", "pw-of-the-user").await;
    refused(post(h, "transfer", Some(&ann), json!({"to": "bob", "amount": 10})).await, (403, "ineligible"));
}

#[test]
fn the_status_of_every_code_is_the_documented_one() {
    use tally::error::ErrorCode as C;
    let want = [
        (C::BadFrame, 400),
        (C::FrameTooLarge, 413),
        (C::BadRequest, 400),
        (C::UnknownOp, 404),
        (C::Unauthenticated, 401),
        (C::Forbidden, 403),
        (C::NotFound, 404),
        (C::Exists, 409),
        (C::Deleted, 409),
        (C::InsufficientFunds, 422),
        (C::AboveMax, 422),
        (C::BelowMin, 422),
        (C::Ineligible, 403),
        (C::OtpInvalid, 422),
        (C::OtpExpired, 422),
        (C::OtpExhausted, 429),
        (C::RateLimited, 429),
        (C::KeyConflict, 409),
        (C::Overloaded, 503),
        (C::Unavailable, 503),
        (C::Internal, 500),
        (C::NotLeader, 421),
        (C::UnknownOutcome, 504),
    ];
    assert_eq!(want.len(), C::ALL.len());
    for (code, status) in want {
        assert_eq!(tally::http::status_of(code).as_u16(), status, "{code:?}");
    }
    // protocol.md's table says the same.
    let doc = include_str!("../protocol.md");
    for (code, status) in want {
        let row = format!("| `{}` | {status} |", code.as_str());
        assert!(doc.contains(&row), "protocol.md lacks {row}");
    }
}

/// Drops what differs between two servers that did the same thing: the
/// times and what is hashed with them.
fn without_times(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        m.retain(|k, _| !matches!(k.as_str(), "at" | "time" | "created" | "hash" | "prev"));
    }
    v
}

#[tokio::test]
async fn a_transfer_over_http_equals_the_same_over_tcp() {
    let over_http = Server::start_with(&[HTTP]);
    let over_tcp = Server::start();
    let h = over_http.http_addr.unwrap();
    let token = login(h, "admin", ADMIN_PASSWORD).await;
    let tcp = over_tcp.admin().await;
    let accounts = [json!({"account": "alice", "initial": 100}), json!({"account": "bob"})];
    for a in &accounts {
        assert_eq!(post(h, "create_account", Some(&token), a.clone()).await.0, 200);
        tcp.call("create_account", a.clone()).await.unwrap();
    }
    for args in [
        json!({"from": "alice", "to": "bob", "amount": 30, "memo": "lunch <script>", "key": "t-1"}),
        json!({"from": "alice", "to": "bob", "amount": 30, "memo": "lunch <script>", "key": "t-1"}),
        json!({"from": "bob", "to": "alice", "amount": 5}),
    ] {
        let (status, via_http) = post(h, "transfer", Some(&token), args.clone()).await;
        let via_tcp = tcp.call("transfer", args).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(without_times(via_http), without_times(via_tcp));
    }
    let (_, via_http) = post(h, "history", Some(&token), json!({"account": "bob"})).await;
    let via_tcp = tcp.call("history", json!({"account": "bob"})).await.unwrap();
    let strip = |v: &Value| v["transfers"].as_array().unwrap().iter().cloned().map(without_times).collect::<Vec<_>>();
    assert_eq!(strip(&via_http), strip(&via_tcp));
    assert_eq!(strip(&via_http).len(), 2);
}

#[tokio::test]
async fn integers_beyond_two_to_the_53_stay_exact() {
    let s = Server::start_with(&[HTTP]);
    let h = s.http_addr.unwrap();
    let token = login(h, "admin", ADMIN_PASSWORD).await;
    let big: i64 = (1 << 53) + 1;
    let body = format!(r#"{{"account": "whale", "initial": {big}}}"#);
    let auth = format!("Bearer {token}");
    let (status, _, created) =
        request(h, "POST", "/v1/create_account", &[("authorization", &auth)], body.as_bytes()).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(created).unwrap();
    assert!(text.contains(&format!(r#""balance":{big}"#)), "{text}");
    assert_eq!(s.admin().await.balance(Some("whale")).await.unwrap(), big);
}

/// One counter's value in a `/metrics` text (0 when absent).
fn metric(text: &str, line_start: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok()).unwrap_or(0)
}

async fn scrape(h: SocketAddr) -> String {
    let (status, head, body) = request(h, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200, "{head}");
    String::from_utf8(body).unwrap()
}

#[tokio::test]
async fn metrics_rise_by_exactly_what_was_done() {
    let s = Server::start_with(&[HTTP]);
    let h = s.http_addr.unwrap();
    let tcp = s.admin().await;
    create(&tcp, "a", 1000).await;
    create(&tcp, "b", 0).await;
    let before = scrape(h).await;
    let token = login(h, "admin", ADMIN_PASSWORD).await;
    for _ in 0..7 {
        tcp.call("transfer", json!({"from": "a", "to": "b", "amount": 1})).await.unwrap();
    }
    for _ in 0..5 {
        assert_eq!(post(h, "transfer", Some(&token), json!({"from": "a", "to": "b", "amount": 1})).await.0, 200);
    }
    for _ in 0..3 {
        let (status, _) = post(h, "transfer", Some(&token), json!({"from": "a", "to": "b", "amount": 100_000})).await;
        assert_eq!(status, 422);
    }
    // Refused before reaching the op (a body that is not JSON, a token
    // nobody issued): counted all the same.
    for _ in 0..2 {
        let (status, _, _) = request(h, "POST", "/v1/transfer", &[], b"{not json").await;
        assert_eq!(status, 400);
    }
    refused(
        post(h, "transfer", Some("forged"), json!({"from": "a", "to": "b", "amount": 1})).await,
        (401, "unauthenticated"),
    );
    let after = scrape(h).await;
    let malformed = r#"tally_requests_total{op="transfer",code="bad_request"}"#;
    let forged = r#"tally_requests_total{op="transfer",code="unauthenticated"}"#;
    assert_eq!(metric(&after, malformed) - metric(&before, malformed), 2);
    assert_eq!(metric(&after, forged) - metric(&before, forged), 1);
    let ok = r#"tally_requests_total{op="transfer",code="ok"}"#;
    let poor = r#"tally_requests_total{op="transfer",code="insufficient_funds"}"#;
    let login_ok = r#"tally_requests_total{op="login",code="ok"}"#;
    assert_eq!(metric(&after, ok) - metric(&before, ok), 12);
    assert_eq!(metric(&after, poor) - metric(&before, poor), 3);
    assert_eq!(metric(&after, login_ok) - metric(&before, login_ok), 1);
    assert_eq!(metric(&after, "tally_transfers_total") - metric(&before, "tally_transfers_total"), 12);
    assert!(metric(&after, "tally_commits_total") > metric(&before, "tally_commits_total"));
    assert_eq!(metric(&after, "tally_requests_inflight"), 0);
    for name in
        ["tally_fsync_seconds_count", "tally_commit_batch_size_count", "tally_connections ", "tally_mails_sent_total"]
    {
        assert!(after.lines().any(|l| l.starts_with(name)), "no {name} in\n{after}");
    }
}

#[tokio::test]
async fn metrics_from_another_address_need_a_staff_credential() {
    // Every 127/8 address is loopback, which /metrics lets in: this test
    // listens on, and so connects from, the machine's own network address.
    let ip = non_loopback_address().expect("a non-loopback address on this machine");
    let s = Server::start_with(&[("TALLY_HTTP_LISTEN", &format!("{ip}:0")), ("TALLY_LOG", "warn")]);
    let h = s.http_addr.unwrap();
    // Plain HTTP off loopback carries passwords in clear: the operator is told.
    log_line(&s, &["WARN", "security", "plain HTTP on a non-loopback address", &format!("addr={h}")]);
    let (status, _, body) = request(h, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    let user =
        json!({"user": "ann", "role": "user", "name": "Ann", "email": "ann@example.org", "password": "ann-password"});
    let admin = login(h, "admin", ADMIN_PASSWORD).await;
    assert_eq!(post(h, "create_user", Some(&admin), user).await.0, 200);
    let ann = format!("Bearer {}", login(h, "ann", "ann-password").await);
    let (status, _, _) = request(h, "GET", "/metrics", &[("authorization", &ann)], b"").await;
    assert_eq!(status, 403);
    let auth = format!("Bearer {admin}");
    let (status, _, body) = request(h, "GET", "/metrics", &[("authorization", &auth)], b"").await;
    assert_eq!(status, 200);
    assert!(String::from_utf8(body).unwrap().contains("tally_requests_total"));
}

fn non_loopback_address() -> Option<std::net::IpAddr> {
    // The address the kernel would use toward a public one (no packet is sent).
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.1:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn readyz_follows_the_journal_and_healthz_the_process() {
    // The log goes to a file, which cannot grow either while the disk is
    // full: the server must keep serving without its log.
    let s = Server::start_with(&[HTTP, ("TALLY_LOG", "info")]);
    let h = s.http_addr.unwrap();
    let ok = (200, br#"{"status":"ok"}"#.to_vec());
    let get = |path: &'static str| async move {
        let (status, _, body) = request(h, "GET", path, &[], b"").await;
        (status, body)
    };
    assert_eq!(get("/healthz").await, ok);
    assert_eq!(get("/readyz").await, ok);
    let token = login(h, "admin", ADMIN_PASSWORD).await;
    assert_eq!(post(h, "create_account", Some(&token), json!({"account": "a", "initial": 10})).await.0, 200);

    // No write fits: the next commit fails, and the journal cannot commit.
    set_file_size_limit(s.pid(), Some(0));
    let failed = post(h, "create_account", Some(&token), json!({"account": "b"})).await;
    refused(failed, (503, "unavailable"));
    let (status, body) = get("/readyz").await;
    let e: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, e["code"].as_str()), (503, Some("unavailable")), "{e}");
    assert_eq!(get("/healthz").await, ok);

    // Room again: the journal reopens by itself and readyz follows.
    set_file_size_limit(s.pid(), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get("/readyz").await != ok {
        assert!(std::time::Instant::now() < deadline, "not ready again: {:?}", get("/readyz").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(post(h, "create_account", Some(&token), json!({"account": "b"})).await.0, 200);
}

#[tokio::test]
async fn bodies_and_heads_are_bounded_and_bad_ones_harm_nobody() {
    let s = Server::start_with(&[HTTP, ("TALLY_LIMITS_FRAME_TIMEOUT_MS", "500")]);
    let h = s.http_addr.unwrap();
    let token = login(h, "admin", ADMIN_PASSWORD).await;
    let auth = format!("Bearer {token}");
    // Anonymous: the small limit; with a token: limits.frame_bytes_max.
    let big = vec![b' '; 64 * 1024 + 1];
    let (status, _, body) = request(h, "POST", "/v1/ping", &[], &big).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = request(h, "POST", "/v1/ping", &[("authorization", &auth)], &big).await;
    assert_eq!(status, 200);
    let huge = vec![b' '; 2 * 1024 * 1024];
    let (status, _, _) = request(h, "POST", "/v1/ping", &[("authorization", &auth)], &huge).await;
    assert_eq!(status, 413);
    // Not sent as JSON: a page on another site could post that unasked.
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let (status, _, out) = request(h, "POST", "/v1/login", &form, b"user=admin&password=x").await;
    let e: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!((status, e["code"].as_str()), (400, Some("bad_request")), "{e}");
    // Not JSON, not an object.
    for body in [&b"{"[..], b"[1,2]", b"\xff\xfe"] {
        let (status, _, out) = request(h, "POST", "/v1/ping", &[("authorization", &auth)], body).await;
        let e: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!((status, e["code"].as_str()), (400, Some("bad_request")), "{e}");
    }
    // A head that never ends is cut off after limits.frame_timeout_ms.
    let mut slow = TcpStream::connect(h).await.unwrap();
    slow.write_all(b"POST /v1/ping HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the slow head was not cut off");
    // So is a kept-alive connection that stays idle after an answer.
    let mut idle = TcpStream::connect(h).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut seen)).await;
    assert!(closed.is_ok(), "the idle connection was kept open");
    assert!(seen.starts_with(b"HTTP/1.1 200") && seen.ends_with(br#"{"status":"ok"}"#), "{seen:?}");
    // A head larger than the bound is refused.
    let mut long = TcpStream::connect(h).await.unwrap();
    let header = format!("POST /v1/ping HTTP/1.1\r\nx-long: {}\r\n\r\n", "a".repeat(64 * 1024));
    let _ = long.write_all(header.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), long.read_to_end(&mut answer)).await.expect("closed");
    assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&answer));
    // The server is fine, on both ports.
    assert_eq!(post(h, "ping", None, json!({})).await, (200, json!("pong")));
    assert_eq!(s.client().await.call("ping", json!({})).await.unwrap(), json!("pong"));
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answers_is_dropped() {
    let s = Server::start_with(&[HTTP, ("TALLY_LIMITS_WRITE_TIMEOUT_MS", "300")]);
    let h = s.http_addr.unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(h).await.unwrap();
    // Pipelined requests for a ~100 KB document, never read: the server's
    // writes stall once the socket buffers are full.
    let requests = "GET /v1/openapi.json HTTP/1.1\r\nhost: x\r\n\r\n".repeat(300);
    stuck.write_all(requests.as_bytes()).await.unwrap();
    let open = |text: &str| metric(text, "tally_connections ");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // Counted once its task runs (with the scraping connection: 2), then
    // dropped when a write has waited 300 ms (the scraper alone: 1).
    for want in [2, 1] {
        while open(&scrape(h).await) != want {
            assert!(std::time::Instant::now() < deadline, "never {want} connections open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut rest = Vec::new();
    // What was sent before, then the end (or a reset: requests were left unread).
    let end = tokio::time::timeout(Duration::from_secs(10), stuck.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "the stuck socket was not closed");
}

#[tokio::test]
async fn a_login_whose_caller_hangs_up_still_counts_against_the_guesser() {
    let s = Server::start_with(&[HTTP]);
    let h = s.http_addr.unwrap();
    let body = r#"{"user": "admin", "password": "wrong-password"}"#;
    let request = format!(
        "POST /v1/login HTTP/1.1\r\nhost: {h}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut callers = Vec::new();
    for _ in 0..60 {
        let mut c = TcpStream::connect(h).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        callers.push(c);
    }
    // Two hashes run at a time: most of the 60 are still waiting when
    // their callers hang up.
    let inflight = |text: &str| metric(text, "tally_requests_inflight");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while inflight(&scrape(h).await) < 30 {
        assert!(std::time::Instant::now() < deadline, "the logins never queued up");
    }
    drop(callers);
    // Each runs to its end all the same: a wrong password, hashed and
    // counted (or, once the budget is spent, refused), never cut off.
    let mut text = scrape(h).await;
    while inflight(&text) > 0 {
        assert!(std::time::Instant::now() < deadline, "the abandoned logins did not end:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = scrape(h).await;
    }
    let answered = |code: &str| metric(&text, &format!(r#"tally_requests_total{{op="login",code="{code}"}}"#));
    assert_eq!((answered("unauthenticated") + answered("rate_limited"), answered("internal")), (60, 0), "{text}");
    assert_eq!(metric(&text, "tally_logins_failed_total"), answered("unauthenticated"));
    let again = post(h, "login", None, json!({"user": "admin", "password": "wrong-password"})).await;
    refused(again, (429, "rate_limited"));
}

#[tokio::test]
async fn metrics_by_another_host_name_need_credentials_even_from_loopback() {
    let s = Server::start_with(&[HTTP]);
    let h = s.http_addr.unwrap();
    let (status, _, _) = request(h, "GET", "/metrics", &[("host", "rebound.example:7780")], b"").await;
    assert_eq!(status, 401);
    let (status, _, _) = request(h, "GET", "/metrics", &[("host", "localhost:7780")], b"").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_expired_code_is_422_and_a_full_server_503() {
    let s = MailServer::start(&[HTTP, ("TALLY_OTP_TTL_S", "1"), ("TALLY_LIMITS_CONNECTIONS_MAX", "3")]);
    let h = s.s.http_addr.unwrap();
    let admin = login(h, "admin", ADMIN_PASSWORD).await;
    let a = Some(admin.as_str());
    let args =
        json!({"user": "ann", "role": "user", "name": "Ann", "email": "ann@example.org", "password": "ann-password"});
    assert_eq!(post(h, "create_user", a, args).await.0, 200);
    assert_eq!(post(h, "create_account", a, json!({"account": "bob"})).await.0, 200);
    assert_eq!(post(h, "mint", a, json!({"to": "ann", "amount": 300})).await.0, 200);
    let ann = login(h, "ann", "ann-password").await;
    let (_, pending) = post(h, "transfer", Some(&ann), json!({"to": "bob", "amount": 100})).await;
    let mut mail = s.mail;
    let code = mail.next().1;
    wait_past(pending["expires_at"].as_u64().unwrap()).await;
    let confirm = json!({"pending": pending["pending"], "otp": code});
    refused(post(h, "confirm", Some(&ann), confirm).await, (422, "otp_expired"));

    // Three connections held open fill the server: the fourth is told so.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(h).await.unwrap();
        // A complete request whose answer is read: the connection is surely counted.
        c.write_all(format!("GET /healthz HTTP/1.1\r\nhost: {h}\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(c);
    }
    // The answer comes at once, before any request is read.
    let mut fourth = TcpStream::connect(h).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), fourth.read_to_end(&mut answer)).await.unwrap().unwrap();
    let text = String::from_utf8(answer).unwrap();
    assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
    assert!(text.ends_with(r#"{"code":"overloaded","message":"too many connections"}"#), "{text}");
    drop(held);
}
