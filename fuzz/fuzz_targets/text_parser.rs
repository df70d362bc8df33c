//! A text-mode line parsed and re-encoded as MessagePack args: never a
//! panic, and what the parser produces is always a valid request map.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    if let Ok(parsed) = tally::wire::text::parse_line(line) {
        let args = parsed.args_msgpack();
        tally::wire::frame::validate_value(&args).expect("the text parser produced invalid MessagePack");
        // A map with string keys, whatever its values. Not through
        // serde_json::Value: with serde_json's `raw_value` feature (axum
        // turns it on) a map whose first key is serde_json's private
        // raw-value token does not decode as a Value, and the text mode
        // may well send one (the server answers `bad_request`).
        let _ = tally::wire::frame::decode_args::<std::collections::BTreeMap<String, serde::de::IgnoredAny>>(&args)
            .expect("args decode as a map");
    }
});
