//! Target (a): the frame decoder on arbitrary bytes, with frame_max 4096 (the handshake's
//! bound) or 131072 (the default negotiated one) chosen by the first byte. It must never panic,
//! and must never report more frames than the input could hold (8 bytes each at least).
//!
//! frame_max 0 ("no limit") is left out: by definition it lets a frame header reserve as much
//! as it announces (up to 4 GiB), which libFuzzer reports as an out-of-memory at once. Where the
//! broker decodes with 0 although a limit applies, that is a bug of its own (RELIABILITY.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let frame_max = if selector % 2 == 0 { 4096 } else { 131_072 };
    let rest = rest.to_vec();
    warren_fuzz::run(move || {
        let (frames, _failed) = warren_broker::fuzz::decode_frames(&rest, frame_max);
        assert!(
            frames * 8 <= rest.len(),
            "{frames} frames from {} bytes",
            rest.len()
        );
    });
});
