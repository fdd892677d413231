#!/usr/bin/env bash
# Runs both fuzz targets one after the other (one core), logging to $LOG_DIR (default
# /tmp/warren-fuzz-logs). Usage: fuzz/run_all.sh [SECONDS_PER_TARGET]
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and, on a stable toolchain, RUSTC_BOOTSTRAP=1
# (set here unless already set). SANITIZER=address for ASan (about 25x slower on the
# connection target); the default, none, suits safe Rust and gives millions of runs.
set -u
cd "$(dirname "$0")"
SECS=${1:-600}
LOG_DIR=${LOG_DIR:-/tmp/warren-fuzz-logs}
mkdir -p "$LOG_DIR" corpus/decode_frames corpus/connection corpus/handshake
export RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-1}
python3 seeds/make_seeds.py
SAN=${SANITIZER:-none}
cargo fuzz build -O -s "$SAN" || exit 1
for target in decode_frames connection handshake; do
  # WARREN_FUZZ_STACK_MB=N (optional) runs each input on a thread with N MiB of stack, to step
  # past a known stack overflow while it is being fixed (see RELIABILITY.md).
  cargo fuzz run -O -s "$SAN" "$target" "corpus/$target" -- \
    -max_total_time="$SECS" -max_len=16384 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    > "$LOG_DIR/$target.log" 2>&1
  echo "$target: exit $? $(grep -E '^Done [0-9]+ runs' "$LOG_DIR/$target.log")"
done
