//! Target (c): the whole client stream from its first byte (protocol header, start-ok, tune-ok,
//! open, or anything else), before any login: the part of the broker an unauthenticated peer
//! reaches. Same checks as `connection`: the connection ends within a bounded (virtual) time
//! once the client closes, the broker writes a protocol header or whole frames, no task
//! panics, and a second client still gets a channel open.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(warren_fuzz::paused_runtime);
    let input = data.to_vec();
    warren_fuzz::run(move || warren_fuzz::handshake_case(rt, &input));
});
