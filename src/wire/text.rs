//! Dev text mode: `op key=value key="quoted value"` in, one JSON line out.
//!
//! A line is turned into the same `args` MessagePack map a binary client
//! would send, so both modes share one dispatcher and one set of checks.
//!
//! # Values
//!
//! `true`/`false` are booleans, `null` is nil, an optional `-` followed by
//! digits is an integer, `[a,b]` is a list of strings, `"..."` is a string
//! (with `\"` and `\\` escapes), anything else is a string. A value that
//! starts with `{` or `[{` is JSON, read to its closing bracket (spaces
//! allowed inside): `transfer_batch transfers=[{"to":"bob","amount":5}]`.

use crate::error::ApiError;

/// One parsed value of a `key=value` pair.
#[derive(Clone, Debug, PartialEq)]
pub enum TextValue {
    Nil,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Str(String),
    List(Vec<String>),
    Json(serde_json::Value),
}

/// A parsed line: the op and its arguments in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub op: String,
    pub args: Vec<(String, TextValue)>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

/// Parses one line (without its newline).
pub fn parse_line(line: &str) -> Result<Line, ApiError> {
    let mut chars = line.trim().char_indices().peekable();
    let line = line.trim();
    let mut op = String::new();
    while let Some(&(_, c)) = chars.peek() {
        if c.is_whitespace() {
            break;
        }
        op.push(c);
        chars.next();
    }
    if op.is_empty() {
        return Err(bad("empty line: type `help` for the ops"));
    }
    let mut args = Vec::new();
    loop {
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key_end = None;
        for (i, c) in chars.by_ref() {
            if c == '=' {
                key_end = Some(i);
                break;
            }
            if c.is_whitespace() {
                break;
            }
        }
        let Some(key_end) = key_end else {
            return Err(bad(format!("expected key=value at {:?}", &line[start..])));
        };
        let key = &line[start..key_end];
        if key.is_empty() {
            return Err(bad("empty key before '='"));
        }
        let value = if chars.peek().is_some_and(|&(_, c)| c == '"') {
            chars.next();
            let mut s = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some((_, e @ ('"' | '\\'))) => s.push(e),
                        Some((_, 'n')) => s.push('\n'),
                        _ => return Err(bad("bad escape in quoted value")),
                    },
                    c => s.push(c),
                }
            }
            if !closed {
                return Err(bad("unterminated quoted value"));
            }
            if chars.peek().is_some_and(|&(_, c)| !c.is_whitespace()) {
                return Err(bad("expected a space after a quoted value"));
            }
            TextValue::Str(s)
        } else if line[key_end + 1..].starts_with('{') || line[key_end + 1..].starts_with("[{") {
            let rest = &line[key_end + 1..];
            let mut values = serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
            let value = match values.next() {
                Some(Ok(v)) => v,
                _ => return Err(bad(format!("bad JSON value for {key}"))),
            };
            let end = key_end + 1 + values.byte_offset();
            if line[end..].chars().next().is_some_and(|c| !c.is_whitespace()) {
                return Err(bad("expected a space after a JSON value"));
            }
            while chars.peek().is_some_and(|&(i, _)| i < end) {
                chars.next();
            }
            TextValue::Json(value)
        } else {
            let mut raw = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                raw.push(c);
                chars.next();
            }
            bare_value(raw)
        };
        args.push((key.to_owned(), value));
    }
    Ok(Line { op, args })
}

/// Types an unquoted value: booleans, null, integers, `[a,b]` lists, else a string.
#[must_use]
pub fn bare_value(raw: String) -> TextValue {
    match raw.as_str() {
        "true" => return TextValue::Bool(true),
        "false" => return TextValue::Bool(false),
        "null" => return TextValue::Nil,
        _ => {}
    }
    let digits = raw.strip_prefix('-').unwrap_or(&raw);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(v) = raw.parse::<i64>() {
            return TextValue::Int(v);
        }
        if let Ok(v) = raw.parse::<u64>() {
            return TextValue::Uint(v);
        }
    }
    if let Some(inner) = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let items = inner.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        return TextValue::List(items);
    }
    TextValue::Str(raw)
}

impl TextValue {
    /// The value as JSON (for the CLI, which sends it through the client).
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            TextValue::Nil => serde_json::Value::Null,
            TextValue::Bool(b) => (*b).into(),
            TextValue::Int(i) => (*i).into(),
            TextValue::Uint(u) => (*u).into(),
            TextValue::Str(s) => s.as_str().into(),
            TextValue::List(items) => items.iter().map(|s| serde_json::Value::from(s.as_str())).collect(),
            TextValue::Json(v) => v.clone(),
        }
    }
}

impl Line {
    /// Encodes the arguments as a MessagePack map, as a binary client would.
    #[must_use]
    pub fn args_msgpack(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.args.len() * 16);
        // Writes into a Vec cannot fail.
        let _ = rmp::encode::write_map_len(&mut out, u32::try_from(self.args.len()).unwrap_or(u32::MAX));
        for (k, v) in &self.args {
            let _ = rmp::encode::write_str(&mut out, k);
            match v {
                TextValue::Nil => {
                    let _ = rmp::encode::write_nil(&mut out);
                }
                TextValue::Bool(b) => {
                    let _ = rmp::encode::write_bool(&mut out, *b);
                }
                TextValue::Int(i) => {
                    let _ = rmp::encode::write_sint(&mut out, *i);
                }
                TextValue::Uint(u) => {
                    let _ = rmp::encode::write_uint(&mut out, *u);
                }
                TextValue::Str(s) => {
                    let _ = rmp::encode::write_str(&mut out, s);
                }
                TextValue::List(items) => {
                    let _ = rmp::encode::write_array_len(&mut out, u32::try_from(items.len()).unwrap_or(u32::MAX));
                    for s in items {
                        let _ = rmp::encode::write_str(&mut out, s);
                    }
                }
                TextValue::Json(v) => {
                    let _ = rmp_serde::encode::write(&mut out, v);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_values_with_spaces_inside() {
        let l = parse_line(
            r#"transfer_batch transfers=[{"to": "bob", "amount": 5}, {"to":"c d","amount":-1}] atomic=true"#,
        )
        .unwrap();
        let want = serde_json::json!([{"to": "bob", "amount": 5}, {"to": "c d", "amount": -1}]);
        assert_eq!(l.args, [("transfers".into(), TextValue::Json(want)), ("atomic".into(), TextValue::Bool(true))]);
        let args: serde_json::Value = rmp_serde::from_slice(&l.args_msgpack()).unwrap();
        assert_eq!(args["transfers"][1]["amount"], -1);
        for bad in [r#"x v={"a":1"#, r#"x v=[{"a":1}]y"#, r#"x v={nope}"#] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_ops_and_values() {
        let l = parse_line(r#"transfer to=bob amount=5 memo="coffee \"x\"" key=k-1 ok=true n=-3 tags=[a,b]"#).unwrap();
        assert_eq!(l.op, "transfer");
        assert_eq!(
            l.args,
            vec![
                ("to".into(), TextValue::Str("bob".into())),
                ("amount".into(), TextValue::Int(5)),
                ("memo".into(), TextValue::Str("coffee \"x\"".into())),
                ("key".into(), TextValue::Str("k-1".into())),
                ("ok".into(), TextValue::Bool(true)),
                ("n".into(), TextValue::Int(-3)),
                ("tags".into(), TextValue::List(vec!["a".into(), "b".into()])),
            ]
        );
        let v: serde_json::Value = rmp_serde::from_slice(&l.args_msgpack()).unwrap();
        assert_eq!(v["amount"], 5);
    }

    #[test]
    fn huge_integers_stay_integers() {
        let l = parse_line("x a=18446744073709551615 b=99999999999999999999").unwrap();
        assert_eq!(l.args[0].1, TextValue::Uint(u64::MAX));
        assert_eq!(l.args[1].1, TextValue::Str("99999999999999999999".into()));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Stand-in for the cargo-fuzz target when nightly is missing:
        /// any line parses or fails cleanly, and what parses re-encodes to
        /// a valid MessagePack map.
        #[test]
        fn any_line_parses_or_fails_cleanly(line in "\\PC{0,200}") {
            match parse_line(&line) {
                Ok(parsed) => {
                    let args = parsed.args_msgpack();
                    proptest::prop_assert!(crate::wire::frame::validate_value(&args).is_ok());
                }
                Err(e) => proptest::prop_assert_eq!(e.code, crate::error::ErrorCode::BadRequest),
            }
        }

        #[test]
        fn lines_of_request_shape_parse_or_fail_cleanly(
            op in "[a-z_]{1,12}",
            // (No backslash in quoted values: `\"` would escape the quote.)
            pairs in proptest::collection::vec(("[a-z]{1,6}", "(\"[^\"\\\\]{0,10}\"|[-0-9a-z\\[\\],]{0,12})"), 0..6),
        ) {
            let line = pairs.iter().fold(op.clone(), |l, (k, v)| format!("{l} {k}={v}"));
            match parse_line(&line) {
                Ok(parsed) => {
                    proptest::prop_assert_eq!(&parsed.op, &op);
                    proptest::prop_assert_eq!(parsed.args.len(), pairs.len());
                    proptest::prop_assert!(crate::wire::frame::validate_value(&parsed.args_msgpack()).is_ok());
                }
                Err(e) => proptest::prop_assert_eq!(e.code, crate::error::ErrorCode::BadRequest),
            }
        }
    }

    #[test]
    fn refuses_bad_lines() {
        for line in ["", "   ", "op novalue", "op k=\"open", "op =v", r#"op k="a"b"#, r#"op k="\q""#] {
            assert!(parse_line(line).is_err(), "{line:?}");
        }
    }
}
