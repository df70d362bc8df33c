//! Proves the server's handling of raw bytes: oversized and malformed frames
//! get error replies, the server keeps serving everyone, and the dev text
//! mode works over a plain socket.

mod common;

use std::time::Duration;

use common::{audit_ok, balance, create, frame, Server, ADMIN_PASSWORD};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn read_frame(s: &mut TcpStream) -> Option<Value> {
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len)).await.ok()?.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.ok()?;
    Some(rmp_serde::from_slice(&body).expect("a msgpack reply"))
}

async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test]
async fn oversized_frame_is_refused_and_the_connection_closed() {
    let s = Server::start();
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    raw.write_all(&0xFFFF_FFFFu32.to_be_bytes()).await.unwrap();
    let reply = read_frame(&mut raw).await.expect("an error frame");
    assert_eq!(reply["err"]["code"], "frame_too_large");
    assert!(reply["id"].is_null());
    assert!(closed(&mut raw).await);
    // Everyone else is still served.
    let c = s.admin().await;
    assert_eq!(c.call("ping", serde_json::json!({})).await.unwrap(), "pong");
}

#[tokio::test]
async fn malformed_frames_get_errors_and_the_connection_keeps_working() {
    let s = Server::start();
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let cases: Vec<Vec<u8>> = vec![
        vec![],                                    // zero-length frame
        vec![0xc1],                                // reserved byte
        vec![0x93, 0x01, 0x02, 0x03],              // an array, not a map
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],        // array claiming 4 billion items
        vec![0x81, 0xa2, b'i', b'd'],              // truncated
        [vec![0x91; 60_000], vec![0xc0]].concat(), // nesting 60,000 deep
    ];
    for body in &cases {
        raw.write_all(&frame(body)).await.unwrap();
        let reply = read_frame(&mut raw).await.expect("a reply");
        assert_eq!(reply["err"]["code"], "bad_frame", "body {:?}", &body[..body.len().min(8)]);
    }
    // {"id": 5, "op": "ping"} still works on the same connection.
    raw.write_all(&frame(&[0x82, 0xa2, b'i', b'd', 0x05, 0xa2, b'o', b'p', 0xa4, b'p', b'i', b'n', b'g']))
        .await
        .unwrap();
    let reply = read_frame(&mut raw).await.unwrap();
    assert_eq!(reply["id"], 5);
    assert_eq!(reply["ok"], "pong");
    let c = s.admin().await;
    audit_ok(&c).await;
}

#[tokio::test]
async fn byte_level_example_from_protocol_md() {
    // The exact bytes documented in protocol.md.
    let s = Server::start();
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let request =
        [0x00, 0x00, 0x00, 0x0d, 0x82, 0xa2, 0x69, 0x64, 0x01, 0xa2, 0x6f, 0x70, 0xa4, 0x70, 0x69, 0x6e, 0x67];
    raw.write_all(&request).await.unwrap();
    let mut reply = [0u8; 17];
    raw.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        reply,
        [0x00, 0x00, 0x00, 0x0d, 0x82, 0xa2, 0x69, 0x64, 0x01, 0xa2, 0x6f, 0x6b, 0xa4, 0x70, 0x6f, 0x6e, 0x67]
    );
}

#[tokio::test]
async fn text_mode_over_a_plain_socket() {
    let s = Server::start();
    {
        let c = s.admin().await;
        create(&c, "alice", 50).await;
        create(&c, "bob", 0).await;
    }
    let stream = TcpStream::connect(s.addr).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let mut say = async |line: &str| -> Value {
        wr.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        let got = lines.next_line().await.unwrap().expect("a line");
        serde_json::from_str(&got).expect("one JSON object per line")
    };
    assert_eq!(say("ping").await["ok"], "pong");
    assert_eq!(say("balance account=alice").await["err"]["code"], "unauthenticated");
    assert_eq!(say(&format!("login user=admin password=\"{ADMIN_PASSWORD}\"")).await["ok"]["user"], "admin");
    let t = say("transfer from=alice to=bob amount=20 memo=\"for the \\\"good\\\" coffee\"").await;
    assert_eq!(t["ok"]["to_balance"], 20);
    assert_eq!(t["ok"]["memo"], "for the \"good\" coffee");
    assert_eq!(say("transfer from=alice to=bob amount=abc").await["err"]["code"], "bad_request");
    assert_eq!(say("transfer from=alice to=bob amount=18446744073709551615").await["err"]["code"], "bad_request");
    assert_eq!(say("nonsense").await["err"]["code"], "unknown_op");
    assert_eq!(say("transfer from=alice to=\"bob").await["err"]["code"], "bad_request");
    let help = say("help").await;
    assert!(help["ok"].as_array().unwrap().iter().any(|o| o == "transfer"));
    assert_eq!(say("balance account=alice").await["ok"]["balance"], 30);
    // A batch as a JSON value, spaces inside it.
    let b = say(r#"transfer_batch transfers=[{"from": "alice", "to": "bob", "amount": 5}, {"from":"alice","to":"bob","amount":99}] atomic=false"#).await;
    assert_eq!(
        (b["ok"]["applied"].as_u64(), b["ok"]["results"][1]["code"].as_str()),
        (Some(1), Some("insufficient_funds")),
        "{b}"
    );
    let b = say(r#"transfer_batch transfers=[{"from":"alice","to":"bob","amount":5},{"from":"bob","to":"alice","amount":99}] atomic=true"#).await;
    assert_eq!((b["err"]["code"].as_str(), b["err"]["item"].as_u64()), (Some("insufficient_funds"), Some(1)), "{b}");
    assert_eq!(say(r#"transfer_batch transfers=[{"to":"bob""#).await["err"]["code"], "bad_request");
    assert_eq!(say("balance account=alice").await["ok"]["balance"], 25);
}

#[tokio::test]
async fn overlong_text_line_is_refused() {
    let s = Server::start();
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let line = vec![b'a'; 200_000];
    // The server may close before reading everything; a failed write is fine.
    let _ = raw.write_all(&line).await;
    let mut reply = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_string(&mut reply)).await;
    assert!(reply.contains("frame_too_large"), "{reply:?}");
    let c = s.admin().await;
    assert_eq!(c.call("ping", serde_json::json!({})).await.unwrap(), "pong");
}

#[tokio::test]
async fn connection_limit_refuses_with_overloaded() {
    let s = Server::start_with(&[("TALLY_LIMITS_CONNECTIONS_MAX", "2")]);
    let a = s.admin().await;
    let _b = s.admin().await;
    let mut third = TcpStream::connect(s.addr).await.unwrap();
    let reply = read_frame(&mut third).await.expect("a refusal frame");
    assert_eq!(reply["err"]["code"], "overloaded");
    assert!(closed(&mut third).await);
    assert_eq!(a.call("ping", serde_json::json!({})).await.unwrap(), "pong");
}

#[tokio::test]
async fn a_small_in_flight_limit_applies_back_pressure_without_losing_requests() {
    let s = Server::start_with(&[("TALLY_LIMITS_INFLIGHT_PER_CONNECTION_MAX", "4")]);
    let c = std::sync::Arc::new(s.admin().await);
    create(&c, "a", 1000).await;
    create(&c, "b", 0).await;
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.call("transfer", serde_json::json!({"from": "a", "to": "b", "amount": 1})).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(balance(&c, "b").await, 300);
}

/// Encodes `{"id", "op", "args"}` as one frame.
fn request(id: u64, op: &str, args: Value) -> Vec<u8> {
    frame(&rmp_serde::to_vec_named(&serde_json::json!({"id": id, "op": op, "args": args})).unwrap())
}

#[tokio::test]
async fn requests_read_together_are_applied_in_the_order_sent() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "a", 10).await;
    create(&c, "x", 5).await;
    create(&c, "b", 0).await;
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    raw.write_all(&request(1, "login", serde_json::json!({"user": "admin", "password": ADMIN_PASSWORD})))
        .await
        .unwrap();
    assert!(read_frame(&mut raw).await.unwrap()["ok"].is_object());
    // One write, so the server reads these together: debits of the same
    // account must still be reserved in the order sent, around other ops.
    let transfer = |from: &str, amount: i64| serde_json::json!({"from": from, "to": "b", "amount": amount});
    let batch = [
        request(2, "transfer", transfer("a", 10)),
        request(3, "transfer", transfer("a", 1)),
        request(4, "ping", serde_json::json!({})),
        request(5, "transfer", transfer("x", 4)),
        request(6, "balance", serde_json::json!({"account": "x"})),
        request(7, "transfer", transfer("x", 2)),
        request(8, "transfer", transfer("x", 1)),
    ]
    .concat();
    raw.write_all(&batch).await.unwrap();
    let mut outcomes = std::collections::BTreeMap::new();
    for _ in 2..=8 {
        let r = read_frame(&mut raw).await.expect("every request is answered");
        let outcome = match r["err"]["code"].as_str() {
            Some(code) => code.to_owned(),
            None => "ok".to_owned(),
        };
        outcomes.insert(r["id"].as_u64().unwrap(), outcome);
    }
    let expected: std::collections::BTreeMap<u64, String> =
        [(2, "ok"), (3, "insufficient_funds"), (4, "ok"), (5, "ok"), (6, "ok"), (7, "insufficient_funds"), (8, "ok")]
            .into_iter()
            .map(|(id, o)| (id, o.to_owned()))
            .collect();
    assert_eq!(outcomes, expected);
    // The raw login above revoked `c`'s token.
    let c = s.client().await;
    c.login("admin", ADMIN_PASSWORD).await.unwrap();
    assert_eq!((balance(&c, "a").await, balance(&c, "x").await, balance(&c, "b").await), (0, 0, 15));
    audit_ok(&c).await;
}

/// Sends `sig` (`-STOP`, `-CONT`) to the server's process.
fn signal(s: &Server, sig: &str) {
    common::signal(s.pid(), sig);
}

/// The Rust client bounds each wait: a stopped server's silence is a
/// `Timeout`, the connection goes on once the server answers again, and
/// the late answer to the timed-out call reaches no later call.
#[tokio::test]
async fn a_call_answered_too_late_times_out_and_the_connection_goes_on() {
    use tally::client::ClientError;
    let s = Server::start();
    let c = s.client().await.with_timeout(Some(Duration::from_millis(300)));
    assert_eq!(c.call("ping", serde_json::json!({})).await.unwrap(), "pong");
    signal(&s, "-STOP");
    let silent = tokio::time::timeout(Duration::from_secs(30), c.call("hello", serde_json::json!({}))).await;
    signal(&s, "-CONT");
    assert!(matches!(silent, Ok(Err(ClientError::Timeout))), "{silent:?}");
    // The server answers `hello` now, to no one; `ping` gets its own answer.
    let pong = tokio::time::timeout(Duration::from_secs(30), c.call_within(None, "ping", serde_json::json!({})));
    assert_eq!(pong.await.expect("an answer once the server runs").unwrap(), "pong");
}

/// A call whose timeout cuts its request short leaves a half-written frame
/// that the server would complete with the next request's bytes: the
/// client sends nothing more on that connection, whichever call comes next.
/// A call whose frame did not leave whole is `NotSent` (nothing applied);
/// one whose frame left whole and got no answer is `Timeout` (unknown).
#[tokio::test]
async fn a_request_cut_short_by_its_timeout_ends_the_connection_for_later_calls() {
    use tally::client::ClientError;
    let s = Server::start();
    // Logged in: its frames may be up to `frame_bytes_max` (1 MiB).
    let c = std::sync::Arc::new(s.admin().await.with_timeout(Some(Duration::from_millis(500))));
    signal(&s, "-STOP");
    // 48 requests of 900 KiB are more than the sockets can buffer for a
    // server that reads nothing: a write is blocked halfway when its
    // call's time runs out, and the calls queued behind it find it torn.
    let pad = "x".repeat(900 * 1024);
    let calls: Vec<_> = (0..48)
        .map(|_| {
            let (c, pad) = (c.clone(), pad.clone());
            tokio::spawn(async move { c.call("ping", serde_json::json!({ "pad": pad })).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(tokio::time::timeout(Duration::from_secs(30), call).await.expect("bounded").unwrap());
    }
    // Still stopped: a call that wrote anything would wait out its timeout.
    let after = tokio::time::timeout(Duration::from_secs(30), c.call("ping", serde_json::json!({}))).await;
    signal(&s, "-CONT");
    let (timed_out, not_sent) = (
        outcomes.iter().filter(|r| matches!(r, Err(ClientError::Timeout))).count(),
        outcomes.iter().filter(|r| matches!(r, Err(ClientError::NotSent))).count(),
    );
    assert_eq!(timed_out + not_sent, outcomes.len(), "{outcomes:?}");
    assert!(timed_out > 0 && not_sent > 0, "the frames that fit left whole, the rest did not: {outcomes:?}");
    assert!(matches!(after, Ok(Err(ClientError::NotSent))), "{after:?}");
    // The server itself serves everyone else.
    assert_eq!(s.client().await.call("ping", serde_json::json!({})).await.unwrap(), "pong");
}

/// A connection the server has closed (here: a frame past the anonymous
/// limit) sends nothing more: the next call is `NotSent`, which says that
/// nothing was applied, not `Closed`, which leaves the outcome unknown.
#[tokio::test]
async fn a_call_on_a_connection_the_server_closed_is_not_sent() {
    use tally::client::ClientError;
    let s = Server::start();
    let c = s.client().await;
    let pad = "x".repeat(128 * 1024);
    let refused = c.call("ping", serde_json::json!({ "pad": pad })).await;
    // The refusal names no id (the frame was never read), and the server
    // closes: after the frame was written (`Closed`), or while the rest of
    // it still was (`NotSent`).
    assert!(matches!(refused, Err(ClientError::Closed | ClientError::NotSent)), "{refused:?}");
    let next = c.call("ping", serde_json::json!({})).await;
    assert!(matches!(next, Err(ClientError::NotSent)), "{next:?}");
}
