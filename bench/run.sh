#!/usr/bin/env bash
# Starts one server under test on 127.0.0.1, runs one load-generator scenario against it,
# writes the JSON report, and stops the server. Every run is bounded (loadgen's
# --max-seconds, and `timeout` around it).
#
#   bench/run.sh TARGET SCENARIO [scenario flags…]
#     TARGET:   herald | floor | socketio
#     SCENARIO: idle | throughput | latency | fanout | reconnect   (see `loadgen --help`)
#   e.g. bench/run.sh herald idle --connections 20000 --hold-seconds 5
#
# Environment:
#   BENCH_PROFILE=release|debug   binaries to use (default release; CI smoke uses debug)
#   BENCH_OUT=DIR                 where the JSON goes (default bench/results)
#   BENCH_TAG=name                appended to the report's file name
#   BENCH_MAX_SECONDS=N           hard bound of the load generator (default 300)
#   BENCH_LOADGEN_ARGS="…"        extra loadgen flags (before the scenario)
#   HERALD_*                      passed to the gateway (e.g. HERALD_LIMITS__WS_READ_BUFFER_BYTES)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
target=$1 scenario=$2
shift 2
profile=${BENCH_PROFILE:-release}
out_dir=${BENCH_OUT:-bench/results}
max_seconds=${BENCH_MAX_SECONDS:-300}
report="$out_dir/$target-$scenario${BENCH_TAG:+-$BENCH_TAG}.json"

# 100k sockets on each side: raise the descriptor limit as far as the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 4096 ]; then
    echo "bench/run.sh: open-file limit is $(ulimit -n); raise the hard limit (ulimit -Hn) to run many connections" >&2
    exit 1
fi

cargo_flags=()
[ "$profile" = release ] && cargo_flags=(--release)
cargo build "${cargo_flags[@]}" -q -p herald-gateway --bin herald -p herald-bench --bin loadgen --bin floor
bin="target/$profile"

work=$(mktemp -d /tmp/herald-bench.XXXXXX)
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

wait_for_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        kill -0 "$server_pid" 2>/dev/null || { echo "bench/run.sh: $target exited at start; its log:" >&2; cat "$work/server.log" >&2; exit 1; }
        sleep 0.05
    done
    echo "bench/run.sh: $target did not listen on port $1 within 10 s; its log:" >&2
    cat "$work/server.log" >&2
    exit 1
}

loadgen_env=()
case "$target" in
herald)
    port=${BENCH_HERALD_PORT:-18080}
    secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export HERALD_AUTH__JWT_SECRET=$secret
    # Benchmarks need far more than the per-key/per-IP defaults; the limiter stays on.
    export HERALD_LIMITS__PUBLISH_RATE_PER_KEY=${HERALD_LIMITS__PUBLISH_RATE_PER_KEY:-1000000}
    export HERALD_LIMITS__PUBLISH_BURST_PER_KEY=${HERALD_LIMITS__PUBLISH_BURST_PER_KEY:-1000000}
    export HERALD_LIMITS__CONNECT_RATE_PER_IP=${HERALD_LIMITS__CONNECT_RATE_PER_IP:-100000}
    export HERALD_LIMITS__CONNECT_BURST_PER_IP=${HERALD_LIMITS__CONNECT_BURST_PER_IP:-100000}
    export HERALD_LOG=${HERALD_LOG:-warn}
    key=$("$bin/herald" keys create --name bench --data-dir "$work/data" 2>/dev/null)
    "$bin/herald" serve --listen "127.0.0.1:$port" --data-dir "$work/data" >"$work/server.log" 2>&1 &
    server_pid=$!
    loadgen_env=(HERALD_API_KEY="$key" HERALD_JWT_SECRET="$secret")
    ;;
floor)
    port=${BENCH_FLOOR_PORT:-18091}
    "$bin/floor" --listen "127.0.0.1:$port" >"$work/server.log" 2>&1 &
    server_pid=$!
    ;;
socketio)
    port=${BENCH_SOCKETIO_PORT:-18092}
    peer=bench/peers/socketio
    if ! command -v node >/dev/null; then
        echo "bench/run.sh: node is missing; install it (apt-get install nodejs npm)" >&2
        exit 1
    fi
    [ -d "$peer/node_modules" ] || (cd "$peer" && npm ci --no-audit --no-fund --loglevel=error)
    PORT=$port node "$peer/server.js" >"$work/server.log" 2>&1 &
    server_pid=$!
    ;;
*)
    echo "bench/run.sh: unknown target $target; use herald, floor or socketio" >&2
    exit 2
    ;;
esac
wait_for_port "$port"

mkdir -p "$out_dir"
# shellcheck disable=SC2086
env "${loadgen_env[@]}" timeout --signal=KILL $((max_seconds + 30)) \
    "$bin/loadgen" --target "$target" --url "http://127.0.0.1:$port" --server-pid "$server_pid" \
    --max-seconds "$max_seconds" --out "$report" ${BENCH_LOADGEN_ARGS:-} "$scenario" "$@"
echo "bench/run.sh: report written to $report" >&2
