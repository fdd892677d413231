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
