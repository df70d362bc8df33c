//! A byte stream cut into frames exactly as the server does, each body
//! parsed as a request envelope: nothing may panic or allocate past the frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > tally::limits::FRAME_BYTES_MAX || rest.len() < 4 + len {
            break;
        }
        let _ = tally::wire::frame::parse_envelope(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
});
