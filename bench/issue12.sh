#!/usr/bin/env bash
# The side-by-side run behind BENCHMARKS.md's "Delivery engine v2" section (issues #12
# and #17): every #12 target for Herald, Socket.IO and the floor, plus Herald over SSE,
# one scenario after the other (each bounded by bench/run.sh), reports tagged v2-* in
# bench/results/. `bench/issue12.sh profile` instead records a perf profile of the
# gateway under the 1:1-with-acks load (needs `perf`: Debian's linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-180}
run() { echo "--- $(cut -d' ' -f1-3 /proc/loadavg) ${BENCH_TAG:+BENCH_TAG=$BENCH_TAG }${BENCH_LOADGEN_ARGS:+BENCH_LOADGEN_ARGS=\"$BENCH_LOADGEN_ARGS\" }bench/run.sh $*"; bash bench/run.sh "$@" >/dev/null; }

if [ "${1:-}" = profile ]; then
    out=${2:-/tmp/herald-perf.data}
    # BENCH_LOADGEN_ARGS="" BENCH_PROFILE_MESSAGES=40000 profiles one message per request.
    BENCH_TAG=${BENCH_TAG:-v2-profile} BENCH_LOADGEN_ARGS=${BENCH_LOADGEN_ARGS---batch 100} \
        bash bench/run.sh herald throughput --connections 1000 \
        --messages "${BENCH_PROFILE_MESSAGES:-100000}" --rate 1000000 >/dev/null &
    runner=$!
    pid=
    for _ in $(seq 1 400); do
        pid=$(pgrep -f "herald[^ ]* serve --listen 127.0.0.1:${BENCH_HERALD_PORT:-18080}" | head -1 || true)
        [ -n "$pid" ] && break
        sleep 0.05
    done
    [ -n "$pid" ] || { echo "no herald process"; wait $runner; exit 1; }
    sleep 2 # the 1,000 connections open; the publishes start
    # BENCH_PERF_ARGS="--call-graph dwarf" resolves user-space callers (large files).
    # shellcheck disable=SC2086
    perf record ${BENCH_PERF_ARGS:--g} -o "$out" -p "$pid" -- sleep 5
    wait $runner || echo "(the load run ended with $?)"
    perf report -i "$out" --no-children --stdio --sort symbol 2>/dev/null | grep -v '^#' | grep '%' | head -40
    exit 0
fi

only=${1:-all}
want() { [ "$only" = all ] || [ "$only" = "$1" ]; }
if want throughput; then
    for t in herald socketio floor; do
        BENCH_TAG=v2-batch100 BENCH_LOADGEN_ARGS="--batch 100" run "$t" throughput --connections 1000 --messages 100000 --rate 1000000
    done
    BENCH_TAG=v2-single run herald throughput --connections 1000 --messages 30000 --rate 1000000
    BENCH_TAG=v2-sse-batch100 BENCH_LOADGEN_ARGS="--batch 100 --transport sse" run herald throughput --connections 1000 --messages 100000 --rate 1000000
fi
if want latency; then
    for rate in 2000 5000; do
        for t in herald socketio floor; do
            BENCH_TAG=v2-$rate run "$t" latency --connections 1000 --rate "$rate" --seconds 5
        done
    done
fi
if want fanout; then
    for t in herald socketio floor; do
        BENCH_TAG=v2 run "$t" fanout --subscribers 10000 --rounds 3
    done
fi
if want idle; then
    for t in herald socketio floor; do
        BENCH_TAG=v2 run "$t" idle --connections 19900 --hold-seconds 5
    done
    BENCH_TAG=v2-sse BENCH_LOADGEN_ARGS="--transport sse" run herald idle --connections 19900 --hold-seconds 5
fi
if want reconnect; then
    BENCH_TAG=v2-restart run herald reconnect --clients 19900 --messages 3 --restart
fi
