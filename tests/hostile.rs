//! Proves hostile and careless clients cannot hurt the server or anyone
//! else: malformed frames of every kind, wrong types, NaN and huge numbers,
//! a 3 MB line without a newline, thousands of random blobs, and 1,500 idle
//! or half-sent connections. The server stays up, its memory stays bounded,
//! other clients are served, and nothing in the ledger changes.

mod common;

use std::time::Duration;

use common::{audit_ok, balance, code, create, frame, Server};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `{"id": 1, "op": op, "args": <raw>}` with `args` given as raw MessagePack.
fn request_with_raw_args(op: &str, args: &[u8]) -> Vec<u8> {
    let mut b = vec![0x83, 0xa2, b'i', b'd', 0x01, 0xa2, b'o', b'p'];
    rmp::encode::write_str(&mut b, op).unwrap();
    rmp::encode::write_str(&mut b, "args").unwrap();
    b.extend_from_slice(args);
    b
}

/// Sends `bytes` on a fresh connection and reads whatever comes back until
/// the server closes or goes quiet.
async fn throw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    out
}

fn first_code(reply: &[u8]) -> String {
    assert!(reply.len() >= 4, "no reply frame");
    let n = u32::from_be_bytes(reply[..4].try_into().unwrap()) as usize;
    let v: serde_json::Value = rmp_serde::from_slice(&reply[4..4 + n]).unwrap();
    v["err"]["code"].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn malformed_input_of_every_kind_changes_nothing() {
    let s = Server::start();
    let c = s.admin().await;
    create(&c, "alice", 100).await;
    create(&c, "bob", 0).await;
    s.client()
        .await
        .call(
            "signup",
            json!({"user": "mallory", "name": "M", "email": "m@x.example", "password": "mallory's password"}),
        )
        .await
        .unwrap();
    let before = audit_ok(&c).await;
    // A login frame, so that the NaN request gets past authentication.
    let mut login = tally::wire::frame::encode_request_vec(
        0,
        "login",
        &json!({"user": "mallory", "password": "mallory's password"}),
    );

    let login_frame = login.clone();
    let mut deep = vec![0x91; 400_000];
    deep.push(0xc0);
    let mut nan_amount = vec![0x83];
    for (k, v) in [("from", "alice"), ("to", "bob")] {
        rmp::encode::write_str(&mut nan_amount, k).unwrap();
        rmp::encode::write_str(&mut nan_amount, v).unwrap();
    }
    rmp::encode::write_str(&mut nan_amount, "amount").unwrap();
    rmp::encode::write_f64(&mut nan_amount, f64::NAN).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("zero-length frame", frame(&[]), "bad_frame"),
        ("length 0xFFFFFFFF", 0xFFFF_FFFFu32.to_be_bytes().to_vec(), "frame_too_large"),
        ("array claiming 4 billion items", frame(&[0xdd, 0xff, 0xff, 0xff, 0xff]), "bad_frame"),
        (
            "args map claiming 4 billion pairs",
            frame(&request_with_raw_args("transfer", &[0xdf, 0xff, 0xff, 0xff, 0xff])),
            "bad_frame",
        ),
        // Logged in first: an anonymous connection may not send this much.
        (
            "nesting 400,000 deep",
            [login_frame.clone(), frame(&request_with_raw_args("transfer", &deep))].concat(),
            "bad_frame",
        ),
        ("invalid UTF-8 op", frame(&[0x82, 0xa2, b'i', b'd', 0x01, 0xa2, b'o', b'p', 0xa2, 0xc3, 0x28]), "bad_frame"),
        (
            "invalid UTF-8 in args",
            frame(&request_with_raw_args("transfer", &[0x81, 0xa2, b't', b'o', 0xa2, 0xff, 0xfe])),
            "bad_frame",
        ),
    ];
    login.extend(frame(&request_with_raw_args("transfer", &nan_amount)));
    let reply = throw(s.addr, &login).await;
    let n = u32::from_be_bytes(reply[..4].try_into().unwrap()) as usize;
    assert_eq!(first_code(&reply[4 + n..]), "bad_request", "NaN amount");
    for (what, bytes, expected) in &cases {
        let mut reply = throw(s.addr, bytes).await;
        if bytes.starts_with(&login_frame) {
            // Skip the login's answer.
            let n = u32::from_be_bytes(reply[..4].try_into().unwrap()) as usize;
            reply.drain(..4 + n);
        }
        assert_eq!(&first_code(&reply), expected, "{what}");
    }
    // Wrong types in every argument of a transfer, huge and negative integers.
    let bad_args = [
        json!({"from": 1, "to": "bob", "amount": 1}),
        json!({"from": "alice", "to": ["bob"], "amount": 1}),
        json!({"from": "alice", "to": "bob", "amount": {"n": 1}}),
        json!({"from": "alice", "to": "bob", "amount": true}),
        json!({"from": "alice", "to": "bob", "amount": 1, "memo": 5}),
        json!({"from": "alice", "to": "bob", "amount": 1, "key": false}),
        json!({"from": "alice", "to": "bob", "amount": i64::MIN}),
        json!({"from": "alice", "to": "bob", "amount": u64::MAX}),
        json!({"from": "alice", "to": "bob", "amount": 1e300}),
        json!(["not", "a", "map"]),
    ];
    for a in bad_args {
        assert_eq!(code(c.call("transfer", a.clone()).await), "bad_request", "{a}");
    }
    // A 3 MB text line without a newline.
    let mut line = b"transfer from=alice to=bob amount=1 memo=".to_vec();
    line.extend(std::iter::repeat_n(b'x', 3 * 1024 * 1024));
    let reply = throw(s.addr, &line).await;
    assert!(String::from_utf8_lossy(&reply).contains("frame_too_large"));

    let rss_before = s.rss_kb();
    // Thousands of random blobs over many connections at once.
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut tasks = Vec::new();
    for conn in 0..40 {
        let mut blobs = Vec::new();
        for _ in 0..100 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 300) as usize;
            let blob: Vec<u8> = (0..len).map(|i| (seed.rotate_left(i as u32 % 64) >> (i % 8)) as u8).collect();
            // Half are framed (valid length, random body), half raw bytes.
            blobs.extend(if conn % 2 == 0 { frame(&blob) } else { blob });
        }
        let addr = s.addr;
        tasks.push(tokio::spawn(async move { throw(addr, &blobs).await }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The server is up, serves others, changed nothing, and its memory is bounded.
    assert_eq!(c.call("ping", json!({})).await.unwrap(), "pong");
    let other = s.admin().await;
    assert_eq!(balance(&other, "alice").await, 100);
    assert_eq!(balance(&other, "bob").await, 0);
    let after = audit_ok(&c).await;
    assert_eq!(after["head"], before["head"]);
    assert_eq!(after["transfers"], before["transfers"]);
    let rss_after = s.rss_kb();
    assert!(rss_after < rss_before + 64 * 1024, "memory grew from {rss_before} KiB to {rss_after} KiB");
}

#[tokio::test]
async fn fifteen_hundred_idle_or_half_sent_connections_do_not_block_others() {
    let s = Server::start_with(&[("TALLY_LIMITS_FRAME_TIMEOUT_MS", "1000"), ("TALLY_LIMITS_CONNECTIONS_MAX", "1600")]);
    let c = s.admin().await;
    create(&c, "a", 10).await;
    create(&c, "b", 0).await;
    let mut idle = Vec::new();
    let mut half = Vec::new();
    for i in 0..1500 {
        let mut conn = TcpStream::connect(s.addr).await.unwrap();
        if i % 2 == 0 {
            // A header promising 100 bytes, then only 10 of them.
            conn.write_all(&100u32.to_be_bytes()).await.unwrap();
            conn.write_all(&[0x83; 10]).await.unwrap();
            half.push(conn);
        } else {
            idle.push(conn);
        }
    }
    // Everyone else is still served while they hang around.
    let fresh = s.admin().await;
    assert_eq!(fresh.call("ping", json!({})).await.unwrap(), "pong");
    let t = fresh.call("transfer", json!({"from": "a", "to": "b", "amount": 3})).await.unwrap();
    assert_eq!(t["to_balance"], 3);
    // Half-sent frames are cut off after the frame timeout; idle ones
    // (idle as long, and not for a minute yet) stay.
    let mut byte = [0u8; 1];
    let cut = tokio::time::timeout(Duration::from_secs(10), half[0].read(&mut byte)).await;
    assert!(matches!(cut, Ok(Ok(0)) | Ok(Err(_))), "a half-sent connection was not closed: {cut:?}");
    let still = tokio::time::timeout(Duration::from_millis(200), idle[0].read(&mut byte)).await;
    assert!(still.is_err(), "an idle connection was closed");
    let stats = c.call("stats", json!({})).await.unwrap();
    assert!(stats["connections"].as_u64().unwrap() >= 750, "{stats}");
}

/// Every op the server lists, called by an admin and by a user with
/// arguments of the wrong shape, answers an error and moves nothing.
#[tokio::test]
async fn every_op_refuses_wrong_shaped_arguments() {
    let s = Server::start_with(&[("TALLY_PRESET", "campus")]);
    let admin = s.admin().await;
    create(&admin, "alice", 100).await;
    let anon = s.client().await;
    let pw = "correct horse battery";
    let args = json!({"user": "uma", "name": "Uma", "email": "uma@example.org", "password": pw});
    anon.call("signup", args).await.unwrap();
    let user = s.client().await;
    user.login("uma", pw).await.unwrap();
    let before = audit_ok(&admin).await;
    let ops = admin.call("help", json!({})).await.unwrap();
    let shapes = [
        json!({"no_such_argument": 1}),
        json!({"account": 5, "to": ["x"], "amount": "1", "user": {}, "hold": -1, "request": "x", "pending": 7, "otp": 1.5, "item": null, "accept": "yes", "delta": 0.5, "status": 3, "token": 1}),
        json!(["not", "a", "map"]),
    ];
    let known = ["bad_request", "unauthenticated", "forbidden", "not_found", "rate_limited", "unknown_op"];
    for op in ops.as_array().unwrap().iter().map(|o| o.as_str().unwrap()) {
        for shape in &shapes {
            for (who, c) in [("admin", &admin), ("user", &user)] {
                let e = code(c.call(op, shape.clone()).await);
                assert!(known.contains(&e.as_str()), "{op} as {who} with {shape}: {e}");
            }
        }
    }
    // Nothing moved, and both sessions still work.
    let after = audit_ok(&admin).await;
    assert_eq!(
        (after["head"].clone(), after["transfers"].clone()),
        (before["head"].clone(), before["transfers"].clone())
    );
    assert_eq!(balance(&admin, "alice").await, 100);
    assert_eq!(user.call("whoami", json!({})).await.unwrap()["user"], "uma");
}
