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
    }
}
