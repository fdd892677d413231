//! Target (b): a whole connection. A fresh broker serves a `tokio::io::duplex` pipe; the client
//! completes a valid handshake (and opens channel 1), sends the fuzz input, and closes its side.
//! The connection must end within a bounded (virtual) time, everything the broker wrote must
//! be well-formed frames, no task may panic (libfuzzer-sys aborts on any panic), and a second
//! client must then still get a channel open on the same broker.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(warren_fuzz::paused_runtime);
    let input = data.to_vec();
    warren_fuzz::run(move || warren_fuzz::connection_case(rt, &input));
});
