//! A text-mode line parsed and re-encoded as MessagePack args: never a
//! panic, and what the parser produces is always a valid request map.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    if let Ok(parsed) = tally::wire::text::parse_line(line) {
        let args = parsed.args_msgpack();
        tally::wire::frame::validate_value(&args).expect("the text parser produced invalid MessagePack");
        let _ = tally::wire::frame::decode_args::<serde_json::Value>(&args).expect("args decode as a map");
    }
});
