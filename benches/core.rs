//! Criterion micro-benchmarks of the hot path's pure parts: the frame codec
//! and the ledger core. `cargo bench --bench core`.

use std::hint::black_box;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use tally::ledger::{Book, Kind, Limits, Mode, OwnerAccount};
use tally::wire::frame::{decode_args, encode_reply, encode_request, encode_response, parse_envelope};
use tally::wire::{Hash32, Reply, TransferArgs, TransferView};

fn codec(c: &mut Criterion) {
    let args = serde_json::json!({"from": "acct12345", "to": "acct67890", "amount": 1, "memo": "coffee"});
    let mut frame = BytesMut::new();
    encode_request(&mut frame, 42, "transfer", &args).unwrap();
    let body = frame[4..].to_vec();
    c.bench_function("parse envelope + decode transfer args", |b| {
        b.iter(|| {
            let env = parse_envelope(black_box(&body)).unwrap();
            let a: TransferArgs = decode_args(env.args).unwrap();
            black_box(a.amount)
        })
    });
    let mut out = BytesMut::with_capacity(4096);
    c.bench_function("encode a small response", |b| {
        b.iter(|| {
            out.clear();
            encode_response::<&str>(&mut out, Some(42), &Ok("pong"));
            black_box(out.len())
        })
    });
    let reply = Ok(Reply::Transfer(Arc::new(TransferView {
        id: 123_456_789,
        kind: Kind::Transfer,
        from: "acct12345".into(),
        to: "acct67890".into(),
        amount: 1,
        fee: 0,
        memo: None,
        time: 1_795_000_000_000,
        key: None,
        prev: Hash32([7; 32]),
        hash: Hash32([9; 32]),
        by: Some("acct12345".into()),
        from_balance: Some(999_999),
        to_balance: Some(1_000_001),
    })));
    c.bench_function("encode a transfer reply (by hand)", |b| {
        b.iter(|| {
            out.clear();
            encode_reply(&mut out, Some(42), black_box(&reply));
            black_box(out.len())
        })
    });
    c.bench_function("encode a transfer reply (serde)", |b| {
        b.iter(|| {
            out.clear();
            encode_response(&mut out, Some(42), black_box(&reply));
            black_box(out.len())
        })
    });
}

fn ledger(c: &mut Criterion) {
    let mut book = Book::new(Limits::default());
    let ids: Vec<String> = (0..10_000).map(|i| format!("acct{i}")).collect();
    for id in &ids {
        book.create(id).unwrap();
        book.transfer("@mint", id, 1_000_000_000, 0, Mode::Unreserved).unwrap();
    }
    let mut i = 0usize;
    c.bench_function("book transfer (10k accounts)", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            let j = (i + 1) % ids.len();
            black_box(book.transfer(&ids[i], &ids[j], 1, 0, Mode::Reserved).unwrap())
        })
    });
    let mut owner = OwnerAccount::new(i64::MAX / 2);
    let bounds = Limits::default().bounds("acct1");
    c.bench_function("owner reserve + settle", |b| {
        b.iter(|| {
            owner.reserve("acct1", black_box(5), bounds).unwrap();
            owner.settle(-5, 5);
        })
    });
}

criterion_group!(benches, codec, ledger);
criterion_main!(benches);
