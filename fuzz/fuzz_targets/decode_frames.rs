//! Target (a): the frame decoder on arbitrary bytes, with frame_max 0 (no limit), 4096 (the
//! handshake's bound) or 131072 (the default negotiated one) chosen by the first byte. It must
//! never panic, never report more frames than the input could hold (8 bytes each at least), and
//! never reserve much ahead of bytes that have not arrived (libFuzzer's malloc limit: the first
//! runs found a 7-byte header reserving 2.7 GB at frame_max 0, since capped by the broker).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let frame_max = match selector % 3 {
        0 => 0,
        1 => 4096,
        _ => 131_072,
    };
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
