#!/usr/bin/env bash
# Runs both fuzz targets one after the other (one core), logging to $LOG_DIR (default
# /tmp/warren-fuzz-logs). Usage: fuzz/run_all.sh [SECONDS_PER_TARGET]
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and, on a stable toolchain, RUSTC_BOOTSTRAP=1.
set -u
cd "$(dirname "$0")"
SECS=${1:-600}
LOG_DIR=${LOG_DIR:-/tmp/warren-fuzz-logs}
mkdir -p "$LOG_DIR" corpus/decode_frames corpus/connection
export RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-1}
python3 seeds/make_seeds.py
cargo fuzz build -O || exit 1
for target in decode_frames connection; do
  # Big stack: step past the known unbounded field-table recursion (see RELIABILITY.md).
  WARREN_FUZZ_STACK_MB=${WARREN_FUZZ_STACK_MB:-1024} cargo fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$SECS" -max_len=16384 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    > "$LOG_DIR/$target.log" 2>&1
  echo "$target: exit $? $(grep -E '^Done [0-9]+ runs' "$LOG_DIR/$target.log")"
done
