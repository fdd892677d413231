//! The fuzz harness itself on a few fixed inputs (stable toolchain: `cargo test` in fuzz/).

#[test]
fn harness_runs_the_seeds() {
    let rt = warren_fuzz::paused_runtime();
    for input in [
        &b""[..],
        b"\x08\x00\x00\x00\x00\x00\x00\xce",
        b"\x09\x00\x01\x00\x00\x00\x00\xce",
    ] {
        warren_fuzz::connection_case(&rt, input);
    }
}

#[test]
fn handshake_harness_runs() {
    let rt = warren_fuzz::paused_runtime();
    let mut valid = b"AMQP\x00\x00\x09\x01".to_vec();
    valid.extend_from_slice(&warren_fuzz::handshake_bytes()[8..]);
    for input in [&b""[..], b"HTTP/1.1", b"AMQP\x00\x00\x09\x01", &valid[..]] {
        warren_fuzz::handshake_case(&rt, input);
    }
}
