//! Proves the envelope decoder accepts good requests and refuses every
//! malformed body with an error rather than a panic or a large allocation.

use proptest::prelude::*;

use super::*;

fn request(id: u64, op: &str, args: &serde_json::Value) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_request(&mut out, id, op, args).unwrap();
    out[HEADER_BYTES..].to_vec()
}

#[test]
fn parses_a_request() {
    let body = request(7, "transfer", &serde_json::json!({"to": "b", "amount": 5}));
    let env = parse_envelope(&body).unwrap();
    assert_eq!(env.id, 7);
    assert_eq!(env.op, "transfer");
    let v: serde_json::Value = decode_args(env.args).unwrap();
    assert_eq!(v, serde_json::json!({"to": "b", "amount": 5}));
}

#[test]
fn missing_args_is_an_empty_map() {
    // {"id": 1, "op": "ping"}
    let body = [0x82, 0xa2, b'i', b'd', 0x01, 0xa2, b'o', b'p', 0xa4, b'p', b'i', b'n', b'g'];
    let env = parse_envelope(&body).unwrap();
    assert_eq!(env.args, EMPTY_MAP);
}

#[test]
fn refuses_non_maps_and_garbage() {
    for body in [&[][..], &[0x90], &[0xc1], &[0x81, 0xa2, b'i', b'd'], &[0x83]] {
        assert_eq!(parse_envelope(body).unwrap_err().error.code, ErrorCode::BadFrame);
    }
}

#[test]
fn refuses_huge_claimed_lengths_without_allocating() {
    // {"id":1,"op":"x","args": array32 claiming 4 billion items}
    let mut body = vec![0x83, 0xa2, b'i', b'd', 0x01, 0xa2, b'o', b'p', 0xa1, b'x', 0xa4, b'a', b'r', b'g', b's'];
    body.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
    let e = parse_envelope(&body).unwrap_err();
    assert_eq!(e.id, Some(1));
    assert_eq!(e.error.code, ErrorCode::BadFrame);
    let map32 = [0xdf, 0xff, 0xff, 0xff, 0xff, 0x01];
    assert!(validate_value(&map32).is_err());
}

#[test]
fn refuses_deep_nesting() {
    let mut deep = vec![0x91; 400_000];
    deep.push(0xc0);
    assert!(validate_value(&deep).is_err());
    let mut ok = vec![0x91; DECODE_DEPTH_MAX];
    ok.push(0xc0);
    assert!(validate_value(&ok).is_ok());
}

#[test]
fn refuses_invalid_utf8_op() {
    let body = [0x82, 0xa2, b'i', b'd', 0x01, 0xa2, b'o', b'p', 0xa2, 0xff, 0xfe];
    let e = parse_envelope(&body).unwrap_err();
    assert_eq!(e.id, Some(1));
}

#[test]
fn wrong_arguments_say_which_and_what_was_expected() {
    use crate::wire::TransferArgs;
    let args = |v: serde_json::Value| rmp_serde::to_vec_named(&v).unwrap();
    let e = decode_args::<TransferArgs>(&args(serde_json::json!({"to": "b", "amount": "1.5"}))).unwrap_err();
    assert_eq!(e.message, r#"bad args: amount: invalid type: string "1.5", expected an integer"#);
    let e = decode_args::<TransferArgs>(&args(serde_json::json!({"to": "b", "amount": 1.5}))).unwrap_err();
    assert_eq!(e.message, "bad args: amount: invalid type: floating point `1.5`, expected an integer");
    let e = decode_args::<TransferArgs>(&args(serde_json::json!({"to": "b"}))).unwrap_err();
    assert_eq!(e.message, "bad args: missing field `amount`");
    let e = decode_args::<TransferArgs>(&args(serde_json::json!({"to": "b", "amount": 1, "frm": "a"}))).unwrap_err();
    assert!(e.message.starts_with("bad args: unknown field `frm`, expected one of"), "{}", e.message);
    // Long input quoted back is cut: every error reply stays small.
    let long = "x".repeat(10_000);
    let e = decode_args::<TransferArgs>(&args(serde_json::json!({"to": "b", "amount": long}))).unwrap_err();
    assert_eq!(e.message.len(), crate::limits::ERROR_MESSAGE_BYTES_MAX);
    assert!(e.message.ends_with("..."));
}

#[test]
fn responses_round_trip() {
    let mut out = BytesMut::new();
    encode_response::<u32>(&mut out, Some(3), &Ok(5));
    encode_response::<u32>(&mut out, None, &Err(ApiError::bad_request("no")));
    let n = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
    let first: serde_json::Value = rmp_serde::from_slice(&out[4..4 + n]).unwrap();
    assert_eq!(first, serde_json::json!({"id": 3, "ok": 5}));
    let second: serde_json::Value = rmp_serde::from_slice(&out[8 + n..]).unwrap();
    assert_eq!(second, serde_json::json!({"id": null, "err": {"code": "bad_request", "message": "no"}}));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Random bytes: a request, or `bad_frame` (or `bad_request` for args
    /// that are not a map), never a panic.
    #[test]
    fn random_bytes_are_a_request_or_a_clean_refusal(body in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = parse_envelope(&body) {
            prop_assert!(matches!(e.error.code, ErrorCode::BadFrame | ErrorCode::BadRequest), "{:?}", e.error);
        }
        if let Err(e) = validate_value(&body) {
            prop_assert_eq!(e.code, ErrorCode::BadFrame);
        }
    }

    /// A request mutated and cut anywhere: `bad_frame` (or `bad_request`)
    /// when it no longer parses; when it does, its args decode or are
    /// `bad_request`.
    #[test]
    fn mutated_requests_are_refused_cleanly(
        pos in 0usize..64,
        byte in any::<u8>(),
        cut in 0usize..64,
    ) {
        let mut body = request(9, "transfer", &serde_json::json!({"to": "b", "amount": 5, "memo": "m"}));
        let i = pos % body.len();
        body[i] = byte;
        body.truncate(body.len() - cut % body.len());
        match parse_envelope(&body) {
            Ok(env) => {
                if let Err(e) = decode_args::<crate::wire::TransferArgs>(env.args) {
                    prop_assert_eq!(e.code, ErrorCode::BadRequest);
                }
            }
            Err(e) => prop_assert!(matches!(e.error.code, ErrorCode::BadFrame | ErrorCode::BadRequest), "{:?}", e.error),
        }
    }

    /// Arrays and maps nested `k` deep, up to four times the limit: accepted
    /// exactly up to `DECODE_DEPTH_MAX` levels, refused past it with
    /// `bad_frame` naming the limit, as a value and as a request's args
    /// (whose id is still reported).
    #[test]
    fn nesting_is_accepted_up_to_the_limit_and_refused_past_it(k in 0usize..64, maps in any::<u64>()) {
        let mut chain = Vec::new();
        for i in 0..k {
            if maps >> i & 1 == 1 {
                chain.extend([0x81, 0xa1, b'k']);
            } else {
                chain.push(0x91);
            }
        }
        chain.push(0xc0);
        let too_deep = format!("nesting deeper than {DECODE_DEPTH_MAX}");
        match validate_value(&chain) {
            Ok(()) => prop_assert!(k <= DECODE_DEPTH_MAX),
            Err(e) => {
                prop_assert!(k > DECODE_DEPTH_MAX);
                prop_assert_eq!((e.code, e.message), (ErrorCode::BadFrame, too_deep.clone()));
            }
        }
        // The same chain as the value of an args map: one level deeper.
        let mut args = vec![0x81, 0xa1, b'k'];
        args.extend(&chain);
        let mut body = vec![0x83, 0xa2, b'i', b'd', 0x07, 0xa2, b'o', b'p', 0xa4, b'p', b'i', b'n', b'g'];
        body.extend([0xa4, b'a', b'r', b'g', b's']);
        body.extend(&args);
        match parse_envelope(&body) {
            Ok(env) => prop_assert!(k < DECODE_DEPTH_MAX && env.id == 7),
            Err(e) => {
                prop_assert!(k >= DECODE_DEPTH_MAX);
                prop_assert_eq!((e.id, e.error.code, e.error.message), (Some(7), ErrorCode::BadFrame, too_deep));
            }
        }
    }
}

/// Integers around every boundary of MessagePack's integer forms.
fn edge_ints() -> impl Strategy<Value = i64> {
    let edges: Vec<i64> = [0i64, 1, 31, 32, 33, 127, 128, 255, 256, 65_535, 65_536, 4_294_967_295, 4_294_967_296]
        .iter()
        .flat_map(|&e| [e, -e, e - 1, -e - 1])
        .chain([i64::MAX, i64::MIN, i64::MIN + 1, i32::MIN.into(), i16::MIN.into(), i8::MIN.into()])
        .collect();
    prop_oneof![prop::sample::select(edges), any::<i64>()]
}

fn transfer_view() -> impl Strategy<Value = crate::wire::TransferView> {
    use crate::ledger::Kind;
    let kinds =
        [Kind::Transfer, Kind::Mint, Kind::Adjust, Kind::Redeem, Kind::Close, Kind::Hold, Kind::Post, Kind::Void];
    (
        (edge_ints(), prop::sample::select(kinds.to_vec()), ".{0,40}", "[a-z@]{0,300}", edge_ints(), edge_ints()),
        (prop::option::of(".{0,70000}"), edge_ints(), prop::option::of("[ -~]{0,40}")),
        (any::<[u8; 32]>(), any::<[u8; 32]>(), prop::option::of(edge_ints()), prop::option::of(edge_ints())),
        prop::option::of("[a-z:0-9]{0,70}"),
    )
        .prop_map(|((id, kind, from, to, amount, fee), (memo, time, key), (prev, hash, fb, tb), by)| {
            crate::wire::TransferView {
                id: id.unsigned_abs(),
                kind,
                from,
                to,
                amount,
                fee,
                memo,
                time: time.unsigned_abs(),
                key,
                prev: crate::wire::Hash32(prev),
                hash: crate::wire::Hash32(hash),
                by: by.map(Into::into),
                from_balance: fb,
                to_balance: tb,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The hand-written transfer reply is byte for byte what serde writes.
    #[test]
    fn transfer_replies_encode_as_serde_does(v in transfer_view(), id in prop::option::of(edge_ints())) {
        let id = id.map(i64::unsigned_abs);
        let reply = Ok(crate::wire::Reply::Transfer(std::sync::Arc::new(v)));
        let (mut fast, mut serde) = (BytesMut::from(&b"xy"[..]), BytesMut::from(&b"xy"[..]));
        encode_reply(&mut fast, id, &reply);
        encode_response(&mut serde, id, &reply);
        prop_assert_eq!(&fast[..], &serde[..]);
        // After "xy" and the length prefix: one value, stepped over whole.
        prop_assert_eq!(value_len(&fast[6..]), Some(fast.len() - 6));
    }
}

fn batch_reply() -> impl Strategy<Value = crate::wire::BatchReply> {
    use crate::error::ErrorCode;
    use crate::wire::BatchItem;
    let item = prop_oneof![
        (edge_ints(), prop::option::of(edge_ints()), prop::option::of(edge_ints()))
            .prop_map(|(id, f, t)| { BatchItem::Done { id: id.unsigned_abs(), from_balance: f, to_balance: t } }),
        (prop::sample::select(ErrorCode::ALL.to_vec()), ".{0,300}")
            .prop_map(|(code, message)| BatchItem::Failed { code, message }),
    ];
    (prop::collection::vec(item, 0..300usize), edge_ints(), edge_ints()).prop_map(|(results, a, f)| {
        crate::wire::BatchReply { results, applied: a.unsigned_abs() as usize, failed: f.unsigned_abs() as usize }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The hand-written batch reply is byte for byte what serde writes.
    #[test]
    fn batch_replies_encode_as_serde_does(b in batch_reply(), id in prop::option::of(edge_ints())) {
        let id = id.map(i64::unsigned_abs);
        let reply = Ok(crate::wire::Reply::Batch(b));
        let (mut fast, mut serde) = (BytesMut::from(&b"xy"[..]), BytesMut::from(&b"xy"[..]));
        encode_reply(&mut fast, id, &reply);
        encode_response(&mut serde, id, &reply);
        prop_assert_eq!(&fast[..], &serde[..]);
    }
}

/// A MessagePack value for the batch reader's tests, written with the
/// integer width chosen (MessagePack lets a sender pick any that fits).
#[derive(Clone, Debug)]
enum Mp {
    Nil,
    Bool(bool),
    Int(i64, u8),
    Big(u64),
    F64(f64),
    Str(String),
    Bin(Vec<u8>),
    Arr(Vec<Mp>),
    Map(Vec<(Mp, Mp)>),
}

impl Mp {
    fn write(&self, out: &mut Vec<u8>) {
        use rmp::encode::*;
        match self {
            Mp::Nil => write_nil(out).unwrap(),
            Mp::Bool(b) => write_bool(out, *b).unwrap(),
            Mp::Int(v, width) => {
                let v = *v;
                // The narrowest form, or a wider one when asked.
                match (width % 3, v >= 0) {
                    (1, true) => write_u64(out, v.unsigned_abs()).unwrap(),
                    (2, _) => write_i64(out, v).unwrap(),
                    (_, true) => drop(write_uint(out, v.unsigned_abs()).unwrap()),
                    (_, false) => drop(write_sint(out, v).unwrap()),
                }
            }
            Mp::Big(v) => write_u64(out, *v).unwrap(),
            Mp::F64(v) => write_f64(out, *v).unwrap(),
            Mp::Str(s) => write_str(out, s).unwrap(),
            Mp::Bin(b) => write_bin(out, b).unwrap(),
            Mp::Arr(items) => {
                write_array_len(out, items.len() as u32).unwrap();
                items.iter().for_each(|i| i.write(out));
            }
            Mp::Map(pairs) => {
                write_map_len(out, pairs.len() as u32).unwrap();
                for (k, v) in pairs {
                    k.write(out);
                    v.write(out);
                }
            }
        }
    }
}

fn mp_leaf() -> impl Strategy<Value = Mp> {
    prop_oneof![
        4 => "[a-z@:]{0,12}".prop_map(Mp::Str),
        4 => (edge_ints(), any::<u8>()).prop_map(|(v, w)| Mp::Int(v, w)),
        1 => Just(Mp::Nil),
        1 => any::<bool>().prop_map(Mp::Bool),
        1 => prop_oneof![Just(u64::MAX), Just(1u64 << 63), any::<u64>()].prop_map(Mp::Big),
        1 => any::<f64>().prop_map(Mp::F64),
        1 => prop::collection::vec(any::<u8>(), 0..6).prop_map(Mp::Bin),
        1 => prop::collection::vec(edge_ints().prop_map(|v| Mp::Int(v, 0)), 0..3).prop_map(Mp::Arr),
    ]
}

/// A key from `names` (so duplicates come up), now and then another
/// name, or an integer.
fn mp_key(names: &'static [&'static str]) -> impl Strategy<Value = Mp> {
    prop_oneof![
        8 => prop::sample::select(names).prop_map(|k| Mp::Str(k.into())),
        1 => "[a-z]{1,8}".prop_map(Mp::Str),
        1 => (0i64..6).prop_map(|v| Mp::Int(v, 0)),
    ]
}

/// An item of a batch: mostly the fields `transfer` takes, with the
/// right types, sometimes not.
fn mp_item() -> impl Strategy<Value = Mp> {
    let value = |good: BoxedStrategy<Mp>| prop_oneof![16 => good, 1 => mp_leaf()];
    let name = || "[a-z@]{1,10}".prop_map(Mp::Str).boxed();
    let amount = || (edge_ints(), any::<u8>()).prop_map(|(v, w)| Mp::Int(v, w)).boxed();
    let opt = |s: BoxedStrategy<Mp>| prop_oneof![3 => s, 1 => Just(Mp::Nil)].boxed();
    prop_oneof![
        // The fields in order, each present or not.
        8 => (
            prop::option::of(value(opt(name()))),
            prop::option::weighted(0.95, value(name())),
            prop::option::weighted(0.95, value(amount())),
            prop::option::of(value(opt(".{0,20}".prop_map(Mp::Str).boxed()))),
            prop::option::of(value(opt("[a-z0-9]{1,12}".prop_map(Mp::Str).boxed()))),
            // Now and then one field twice.
            prop::option::weighted(0.1, any::<prop::sample::Index>()),
        )
            .prop_map(|(from, to, amount, memo, key, twice)| {
                let fields = [("from", from), ("to", to), ("amount", amount), ("memo", memo), ("key", key)];
                let mut pairs: Vec<_> =
                    fields.into_iter().filter_map(|(k, v)| v.map(|v| (Mp::Str(k.into()), v))).collect();
                if let (Some(i), false) = (twice, pairs.is_empty()) {
                    pairs.push(i.get(&pairs).clone());
                }
                pairs
            })
            .prop_shuffle()
            .prop_map(Mp::Map),
        // Any keys, repeats included.
        1 => prop::collection::vec((mp_key(&["from", "to", "amount", "memo", "key"]), mp_leaf()), 0..7).prop_map(Mp::Map),
        1 => mp_leaf(),
    ]
}

fn mp_batch() -> impl Strategy<Value = Mp> {
    let transfers = prop_oneof![8 => prop::collection::vec(mp_item(), 0..5).prop_map(Mp::Arr), 1 => mp_leaf()];
    let atomic = prop_oneof![2 => any::<bool>().prop_map(Mp::Bool), 1 => Just(Mp::Nil), 1 => mp_leaf()];
    prop_oneof![
        6 => (transfers.clone(), prop::option::of(atomic.clone())).prop_map(|(t, a)| {
            let mut pairs = vec![(Mp::Str("transfers".into()), t)];
            pairs.extend(a.map(|a| (Mp::Str("atomic".into()), a)));
            pairs
        }).prop_shuffle().prop_map(Mp::Map),
        1 => prop::collection::vec((mp_key(&["transfers", "atomic"]), prop_oneof![transfers, atomic]), 0..4)
            .prop_map(Mp::Map),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Wherever the batch reader answers, serde gives the same args; where
    /// serde refuses, the reader leaves it to serde.
    #[test]
    fn batch_args_read_by_hand_as_serde_reads_them(args in mp_batch()) {
        let mut raw = Vec::new();
        args.write(&mut raw);
        let serde = rmp_serde::from_slice::<crate::wire::TransferBatchArgs>(&raw);
        match (read_transfer_batch(&raw), &serde) {
            (None, _) => {}
            (Some(fast), Ok(serde)) => prop_assert_eq!(format!("{fast:?}"), format!("{serde:?}")),
            (Some(fast), Err(e)) => prop_assert!(false, "read {fast:?}, serde refused: {e}"),
        }
        let decoded = decode_transfer_batch(&raw).map(|a| format!("{a:?}")).map_err(|e| e.message);
        let expected = decode_args::<crate::wire::TransferBatchArgs>(&raw).map(|a| format!("{a:?}")).map_err(|e| e.message);
        prop_assert_eq!(decoded, expected);
    }
}

/// A batch as the clients send it, with or without its optional fields,
/// with every kind of integer, is read by hand: the Rust client's (keys
/// in sorted order, through a JSON value), and the Python client's and the
/// harness's (keys in the order written: `transfers` first or last, an
/// item's `from`, `to`, `amount`, ...).
#[test]
fn batches_as_clients_send_them_are_read_by_hand() {
    let items = serde_json::json!([
        {"from": "alice", "to": "bob", "amount": 1},
        {"to": "bob", "amount": -40_000},
        {"from": null, "to": "b", "amount": 4_294_967_296_i64, "memo": "lunch ☕", "key": "k1"},
        {"to": "b", "amount": i64::MAX, "memo": null, "key": null},
        {"to": "b", "amount": i64::MIN},
    ]);
    let mut bodies: Vec<Vec<u8>> = [
        serde_json::json!({"transfers": items}),
        serde_json::json!({"transfers": items, "atomic": true}),
        serde_json::json!({"transfers": []}),
    ]
    .iter()
    .map(|args| rmp_serde::to_vec_named(args).unwrap())
    .collect();
    let s = |v: &str| Mp::Str(v.into());
    let item = |fields: Vec<(&str, Mp)>| Mp::Map(fields.into_iter().map(|(k, v)| (s(k), v)).collect());
    let written = Mp::Arr(vec![
        item(vec![("from", s("alice")), ("to", s("bob")), ("amount", Mp::Int(1, 0))]),
        item(vec![("from", s("alice")), ("to", s("bob")), ("amount", Mp::Int(7, 0)), ("key", s("run-1-0"))]),
        item(vec![("to", s("b")), ("amount", Mp::Int(-3, 0)), ("memo", s("fee")), ("from", Mp::Nil)]),
        item(vec![("from", s("a")), ("to", s("b")), ("amount", Mp::Int(70_000, 1)), ("memo", Mp::Nil)]),
    ]);
    for pairs in [
        vec![(s("transfers"), written.clone()), (s("atomic"), Mp::Bool(false))],
        vec![(s("atomic"), Mp::Bool(true)), (s("transfers"), written.clone())],
        vec![(s("transfers"), written)],
    ] {
        let mut raw = Vec::new();
        Mp::Map(pairs).write(&mut raw);
        bodies.push(raw);
    }
    for raw in bodies {
        let fast = read_transfer_batch(&raw).unwrap_or_else(|| panic!("not read by hand: {raw:?}"));
        let serde = rmp_serde::from_slice::<crate::wire::TransferBatchArgs>(&raw).unwrap();
        assert_eq!(format!("{fast:?}"), format!("{serde:?}"));
    }
}

/// A batch whose list claims more items than its bytes hold is left to
/// serde without the hand reader reserving room for the claim (4 billion
/// items would be ~400 GiB).
#[test]
fn a_claimed_batch_length_reserves_no_more_than_a_mebibyte() {
    let mut raw = vec![0x81, 0xa9];
    raw.extend_from_slice(b"transfers");
    raw.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
    assert!(read_transfer_batch(&raw).is_none());
    assert_eq!(decode_transfer_batch(&raw).unwrap_err().code, ErrorCode::BadRequest);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `value_len` steps over exactly one value, whatever follows it, never
    /// over a cut one, and takes random bytes without a panic.
    #[test]
    fn value_len_steps_over_exactly_one_value(
        v in mp_batch(),
        tail in prop::collection::vec(any::<u8>(), 0..8),
        cut in any::<prop::sample::Index>(),
        noise in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut b = Vec::new();
        v.write(&mut b);
        let n = b.len();
        prop_assert_eq!(value_len(&b[..cut.index(n)]), None);
        b.extend(&tail);
        prop_assert_eq!(value_len(&b), Some(n));
        if let Some(len) = value_len(&noise) {
            prop_assert!(len <= noise.len());
        }
    }
}

/// Every string width has its UTF-8 checked when asked, whatever the
/// others do, and a bin or ext with the same bytes is not; `value_len`
/// checks none.
#[test]
fn the_walk_checks_utf8_in_every_string_width() {
    let bad = [0xc3, 0x28];
    for head in [vec![0xa2], vec![0xd9, 2], vec![0xda, 0, 2], vec![0xdb, 0, 0, 0, 2]] {
        let mut v = head.clone();
        v.extend(bad);
        let e = validate_value(&v).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::BadFrame, "malformed MessagePack: invalid UTF-8"),
            "{v:x?}"
        );
        assert_eq!(value_len(&v), Some(v.len()), "{v:x?}");
        let mut ok = head;
        ok.extend("é".as_bytes());
        assert_eq!(validate_value(&ok), Ok(()), "{ok:x?}");
    }
    for head in [vec![0xc4, 2], vec![0xc5, 0, 2], vec![0xc6, 0, 0, 0, 2], vec![0xd5, 7]] {
        let mut v = head;
        v.extend(bad);
        assert_eq!(validate_value(&v), Ok(()), "{v:x?}");
    }
}

/// The walker written the plain way, one call per value: the loop of
/// `Cursor::walk` must agree with it on every input.
fn walk_by_calls(c: &mut Cursor<'_>, depth: usize, utf8: bool) -> Result<(), ApiError> {
    if depth > DECODE_DEPTH_MAX {
        return Err(ApiError::new(ErrorCode::BadFrame, format!("nesting deeper than {DECODE_DEPTH_MAX}")));
    }
    let m = c.u8()?;
    let (skip, items) = match m {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
        0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
        0x90..=0x9f => (0, usize::from(m & 0x0f)),
        0xa0..=0xbf => (usize::from(m & 0x1f), 0),
        0xc1 => return Err(malformed("reserved byte 0xc1")),
        0xc4 | 0xd9 => (c.len(1)?, 0),
        0xc5 | 0xda => (c.len(2)?, 0),
        0xc6 | 0xdb => (c.len(4)?, 0),
        0xc7 => (c.len(1)?.saturating_add(1), 0),
        0xc8 => (c.len(2)?.saturating_add(1), 0),
        0xc9 => (c.len(4)?.saturating_add(1), 0),
        0xca => (4, 0),
        0xcb => (8, 0),
        0xcc | 0xd0 => (1, 0),
        0xcd | 0xd1 => (2, 0),
        0xce | 0xd2 => (4, 0),
        0xcf | 0xd3 => (8, 0),
        0xd4 => (2, 0),
        0xd5 => (3, 0),
        0xd6 => (5, 0),
        0xd7 => (9, 0),
        0xd8 => (17, 0),
        0xdc => (0, c.len(2)?),
        0xdd => (0, c.len(4)?),
        0xde => (0, 2 * c.len(2)?),
        0xdf => (0, c.len(4)?.saturating_mul(2)),
    };
    if utf8 && ((0xd9..=0xdb).contains(&m) || (0xa0..=0xbf).contains(&m)) {
        std::str::from_utf8(c.take(skip)?).map_err(|_| malformed("invalid UTF-8"))?;
    } else {
        c.take(skip)?;
    }
    if items > c.buf.len() - c.pos {
        return Err(malformed("container claims more items than bytes"));
    }
    for _ in 0..items {
        walk_by_calls(c, depth + 1, utf8)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// `Cursor::walk` ends where a call per value ends, with the same
    /// error, at every starting depth and with and without UTF-8 checks:
    /// on batches wrapped in lists up to past the depth limit, with bytes
    /// changed (invalid UTF-8, wrong lengths and markers) and cut short,
    /// and on random bytes.
    #[test]
    fn the_walk_agrees_with_a_call_per_value(
        v in mp_batch(),
        nest in 0usize..20,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        cut in any::<prop::sample::Index>(),
        noise in prop::collection::vec(any::<u8>(), 0..128),
        depth in 0usize..3,
        utf8 in any::<bool>(),
    ) {
        let mut b = vec![0x91; nest];
        v.write(&mut b);
        for (at, byte) in flips {
            let i = at.index(b.len());
            b[i] = byte;
        }
        let cut = b[..cut.index(b.len() + 1)].to_vec();
        for input in [&b, &cut, &noise] {
            let run = |f: &dyn Fn(&mut Cursor<'_>) -> Result<(), ApiError>| {
                let mut c = Cursor { buf: input, pos: 0 };
                let r = f(&mut c).map_err(|e| (e.code, e.message));
                (r, c.pos)
            };
            prop_assert_eq!(run(&|c| c.walk(depth, utf8)), run(&|c| walk_by_calls(c, depth, utf8)));
        }
    }
}
