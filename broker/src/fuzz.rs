//! Entry points for fuzzers and property tests of untrusted input. Not part of the stable API.

use bytes::BytesMut;

/// Decodes frames from `data` until it is exhausted, incomplete or invalid, as the connection
/// task does (with `frame_max` as negotiated, 0 for none). Returns how many frames decoded and
/// whether decoding stopped on a protocol error. Never panics.
///
/// ```
/// let (frames, failed) = warren_broker::fuzz::decode_frames(&[8, 0, 0, 0, 0, 0, 0, 0xCE], 4096);
/// assert_eq!((frames, failed), (1, false));
/// ```
pub fn decode_frames(data: &[u8], frame_max: u32) -> (usize, bool) {
    let mut buf = BytesMut::from(data);
    let mut frames = 0;
    loop {
        match crate::codec::decode(&mut buf, frame_max) {
            Ok(Some(_)) => frames += 1,
            Ok(None) => return (frames, false),
            Err(_) => return (frames, true),
        }
    }
}
