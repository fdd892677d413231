#!/usr/bin/env bash
# Interop of warren-rpc with the seed's pika scripts, through one or more brokers.
#
#   interop/check.sh URL...   check through each broker URL given
#   interop/check.sh          check through Warren's standalone broker (started here on a free
#                             port) and through the local RabbitMQ ($AMQP_URL, else
#                             amqp://guest:guest@127.0.0.1:5672/%2F)
#
# Through each broker: (a) delete any stale 'rpc_queue'; (b) the pika seed server
# (rpc_server.py) answers the Rust fib-client; (c) fib-server answers the pika seed client
# (rpc_client.py). Every answer must be fib(N); any mismatch, error or hang fails the check.
#
# Environment:
#   WARREN_RPC_BIN   directory holding fib-server and fib-client; default: build them with
#                    `cargo build --release -p warren-rpc --bins` (in $CARGO_TARGET_DIR or target/)
#   WARREN_BROKER    the warren-broker binary; default: build it the same way
#   N                the n asked for (default 30); STEP_TIMEOUT seconds per step (default 60)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
n=${N:-30}
step_timeout=${STEP_TIMEOUT:-60}
default_rabbit_url=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}
tmp=$(mktemp -d)
pids=()

log() { printf 'interop: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
# A URL for logs, without its password.
shown() { sed -E 's#//([^:/@]*):[^@]*@#//\1:***@#' <<<"$1"; }

cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts a command in the background (under `timeout`: a few steps' worth), its stdout and
# stderr in files.
start() { # name command...
  local name=$1
  shift
  # Emptied here, not only by the background job's redirection: await_line must not find
  # the previous check's line in the file before the job has truncated it.
  : >"$tmp/$name.out"
  : >"$tmp/$name.err"
  timeout "$((4 * step_timeout))" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
  pids+=("$!")
  last_pid=$!
}

# Stops a background process started by `start` and waits for it; returns its exit status.
stop() { # pid
  kill -TERM "$1" 2>/dev/null || true
  local status=0
  wait "$1" || status=$?
  return "$status"
}

# Waits until a background process prints a line matching a pattern on stdout.
await_line() { # name pid pattern
  local name=$1 pid=$2 pattern=$3
  local deadline=$((SECONDS + step_timeout))
  until grep -q -- "$pattern" "$tmp/$name.out" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$tmp/$name.err" >&2 || true
      fail "$name exited before printing '$pattern'"
    fi
    ((SECONDS < deadline)) || fail "$name did not print '$pattern' within ${step_timeout}s"
    sleep 0.1
  done
}

expected=$(python3 -c 'import sys
a, b = 0, 1
for _ in range(int(sys.argv[1])):
    a, b = b, a + b
print(a)' "$n")

build() { # cargo args...
  (cd "$root" && cargo build --release "$@") >&2
  printf '%s/release' "${CARGO_TARGET_DIR:-$root/target}"
}

if [ -n "${WARREN_RPC_BIN:-}" ]; then
  rpc_bin=$WARREN_RPC_BIN
else
  log "building fib-server and fib-client (release)"
  rpc_bin=$(build -p warren-rpc --bins)
fi
for exe in fib-server fib-client; do
  [ -x "$rpc_bin/$exe" ] || fail "$rpc_bin/$exe is missing"
done

delete_rpc_queue() { # url
  AMQP_URL=$1 timeout "$step_timeout" python3 - <<'EOF'
import os
import pika
connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
connection.channel().queue_delete(queue="rpc_queue")
connection.close()
EOF
}

check() { # url
  local url=$1 got pid
  log "through $(shown "$url")"

  # (a) No stale queue, nor stale requests in it.
  delete_rpc_queue "$url" || fail "cannot delete rpc_queue"

  # (b) pika seed server, Rust client.
  AMQP_URL=$url start py-server python3 -u "$here/rpc_server.py"
  pid=$last_pid
  await_line py-server "$pid" ' \[x\] Awaiting RPC requests'
  got=$(timeout "$step_timeout" "$rpc_bin/fib-client" --url "$url" "$n") ||
    fail "fib-client against rpc_server.py failed"
  [ "$got" = "$expected" ] ||
    fail "fib-client against rpc_server.py: got '$got', expected '$expected'"
  grep -q -- " \[\.\] fib($n)" "$tmp/py-server.out" || fail "rpc_server.py did not log fib($n)"
  stop "$pid" || {
    cat "$tmp/py-server.err" >&2
    fail "rpc_server.py did not stop cleanly"
  }
  log "  pika server + fib-client: fib($n) = $got"
  delete_rpc_queue "$url" || fail "cannot delete rpc_queue"

  # (c) Rust fib-server, pika seed client.
  start fib-server "$rpc_bin/fib-server" --url "$url"
  pid=$last_pid
  await_line fib-server "$pid" ' \[x\] Awaiting RPC requests'
  got=$(AMQP_URL=$url RPC_TIMEOUT=$step_timeout timeout "$step_timeout" \
    python3 -u "$here/rpc_client.py" "$n") || fail "rpc_client.py against fib-server failed"
  grep -qx -- " \[\.\] Got $expected" <<<"$got" ||
    fail "rpc_client.py against fib-server: got '$got', expected ' [.] Got $expected'"
  grep -qx -- " \[\.\] fib($n)" "$tmp/fib-server.out" || fail "fib-server did not log fib($n)"
  stop "$pid" || {
    cat "$tmp/fib-server.err" >&2
    fail "fib-server did not stop cleanly"
  }
  log "  fib-server + pika client: fib($n) = $expected"
  delete_rpc_queue "$url" || fail "cannot delete rpc_queue"
}

if [ "$#" -gt 0 ]; then
  for url in "$@"; do
    check "$url"
  done
else
  if [ -n "${WARREN_BROKER:-}" ]; then
    broker=$WARREN_BROKER
  else
    log "building warren-broker (release)"
    broker="$(build -p warren-broker --bin warren-broker)/warren-broker"
  fi
  [ -x "$broker" ] || fail "$broker is missing"
  start warren "$broker" --listen 127.0.0.1:0
  warren_pid=$last_pid
  await_line warren "$warren_pid" 'listening on amqp://'
  warren_url=$(grep -o 'amqp://[^ ]*' "$tmp/warren.out" | head -n 1)
  check "$warren_url"
  stop "$warren_pid" || fail "warren-broker did not stop cleanly"
  check "$default_rabbit_url"
fi
log "OK"
