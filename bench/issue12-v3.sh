#!/usr/bin/env bash
# The side-by-side run behind BENCHMARKS.md's "v3" section: two Herald builds (before
# and after a change: BENCH_BASE_BIN and BENCH_NEW_BIN, release binaries) beside
# Socket.IO and the floor, one scenario after the other, reports tagged v3-* in
# bench/results/ (BENCH_SERIES=v4 tags them v4-* instead). Every run is bounded by
# bench/run.sh (BENCH_MAX_SECONDS).
#   BENCH_BASE_BIN=/path/herald-before BENCH_NEW_BIN=target/release/herald bench/issue12-v3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-120}
base=${BENCH_BASE_BIN:?the herald binary before the change}
new=${BENCH_NEW_BIN:-target/release/herald}
series=${BENCH_SERIES:-v3}
run() { echo "--- $(cut -d' ' -f1-3 /proc/loadavg) ${BENCH_TAG:+BENCH_TAG=$BENCH_TAG }${BENCH_LOADGEN_ARGS:+BENCH_LOADGEN_ARGS=\"$BENCH_LOADGEN_ARGS\" }bench/run.sh $*"; bash bench/run.sh "$@" >/dev/null || echo "    (failed: $?)"; }
both() { # TAG ARGS…: the scenario on both Herald builds
    local tag=$1
    shift
    BENCH_HERALD_BIN=$base BENCH_TAG=$series-base-$tag run herald "$@"
    BENCH_HERALD_BIN=$new BENCH_TAG=$series-new-$tag run herald "$@"
}
peers() { # TAG ARGS…: the scenario on Socket.IO and the floor
    local tag=$1
    shift
    BENCH_TAG=$series-$tag run socketio "$@"
    BENCH_TAG=$series-$tag run floor "$@"
}
only=${1:-all}
want() { [ "$only" = all ] || [ "$only" = "$1" ]; }
if want throughput; then
    BENCH_LOADGEN_ARGS="--batch 100" both batch100 throughput --connections 1000 --messages 100000 --rate 1000000
    BENCH_LOADGEN_ARGS="--batch 100" peers batch100 throughput --connections 1000 --messages 100000 --rate 1000000
    both single throughput --connections 1000 --messages 30000 --rate 1000000
fi
if want latency; then
    for rate in 2000 5000; do
        both "$rate" latency --connections 1000 --rate "$rate" --seconds 5
        peers "$rate" latency --connections 1000 --rate "$rate" --seconds 5
    done
fi
if want fanout; then
    both fanout fanout --subscribers 10000 --rounds 3
    peers fanout fanout --subscribers 10000 --rounds 3
fi
if want idle; then
    both idle idle --connections 19900 --hold-seconds 5
fi
if want reconnect; then
    both restart reconnect --clients 19900 --messages 3 --restart
fi
