//! A request body parsed as an envelope, then its args decoded as every
//! op's argument type: only errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::wire::frame::{decode_args, parse_envelope};
use tally::wire::*;

fuzz_target!(|data: &[u8]| {
    let Ok(env) = parse_envelope(data) else { return };
    let a = env.args;
    let _ = decode_args::<TransferArgs>(a);
    let _ = decode_args::<MintArgs>(a);
    let _ = decode_args::<CreateAccountArgs>(a);
    let _ = decode_args::<HistoryArgs>(a);
    let _ = decode_args::<LoginArgs>(a);
    let _ = decode_args::<SignupArgs>(a);
    let _ = decode_args::<AccountArg>(a);
    let _ = decode_args::<GetTransferArgs>(a);
    let _ = decode_args::<NoArgs>(a);
    let _ = decode_args::<serde_json::Value>(a);
});
