#!/usr/bin/env bash
# Smoke run of the benchmark suite so it cannot rot: every scenario of bench/run.sh with a
# few hundred clients for a few seconds against the real `herald` binary, plus the floor
# and Socket.IO peers. Asserts what must hold at any speed (every client connected, every
# message delivered and acked once, in order, no errors, no loss), never timings.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    if [ "${CI:-}" = true ] || [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
    else
        echo "bench-smoke: node and npm are needed for the Socket.IO peer; install them (apt-get install nodejs npm)" >&2
        exit 1
    fi
fi

out=$(mktemp -d /tmp/bench-smoke.XXXXXX)
trap '[[ $BASHPID != "$$" ]] || rm -rf "$out"' EXIT
export BENCH_PROFILE=debug BENCH_OUT=$out BENCH_MAX_SECONDS=40
export BENCH_LOADGEN_ARGS="--source-addrs 8 --device-prefix smoke"

base_args=$BENCH_LOADGEN_ARGS
run() { echo "--- ${BENCH_TAG:+BENCH_TAG=$BENCH_TAG }bench/run.sh $*"; bash bench/run.sh "$@" >/dev/null; }
# with extra loadgen flags (before the scenario) and a report name tag
run_with() {
    local tag=$1 flags=$2
    shift 2
    BENCH_TAG=$tag BENCH_LOADGEN_ARGS="$base_args $flags" run "$@"
}
run herald idle --connections 300 --hold-seconds 1
run herald throughput --connections 200 --messages 2000 --rate 2000
run herald latency --connections 200 --rate 500 --seconds 2
run herald fanout --subscribers 300 --rounds 2
run herald reconnect --clients 300 --messages 3
run_with restart "" herald reconnect --clients 300 --messages 3 --restart
run floor throughput --connections 200 --messages 2000 --rate 2000
run floor fanout --subscribers 300 --rounds 2
run socketio throughput --connections 200 --messages 2000 --rate 2000
run socketio fanout --subscribers 300 --rounds 2
# batch publish, the same batch size on every target
for t in herald floor socketio; do
    run_with batch "--batch 50" "$t" throughput --connections 200 --messages 2000 --rate 4000
done
# publishes addressed to users instead of devices
run_with batch-user "--batch 50 --to user" herald throughput --connections 200 --messages 2000 --rate 4000
# Server-Sent Events with acks over HTTP
run_with sse "--transport sse" herald idle --connections 300 --hold-seconds 1
run_with sse "--transport sse" herald throughput --connections 200 --messages 2000 --rate 2000

python3 - "$out" <<'PY'
import json, pathlib, sys

failures = []
reports = sorted(pathlib.Path(sys.argv[1]).glob("*.json"))
expected = {"herald-idle", "herald-throughput", "herald-latency", "herald-fanout", "herald-reconnect",
            "herald-reconnect-restart", "floor-throughput", "floor-fanout", "socketio-throughput",
            "socketio-fanout", "herald-throughput-batch", "floor-throughput-batch",
            "socketio-throughput-batch", "herald-throughput-batch-user", "herald-idle-sse",
            "herald-throughput-sse"}
found = {p.stem for p in reports}
if found != expected:
    failures.append(f"reports {sorted(found)} != expected {sorted(expected)}")
for path in reports:
    r = json.loads(path.read_text())
    name = path.stem
    def check(cond, what):
        if not cond:
            failures.append(f"{name}: {what} (report: {json.dumps({k: v for k, v in r.items() if k not in ('rss_samples', 'latency')})})")
    check(r["errors"] == 0, f"{r['errors']} errors, first: {r['first_error']}")
    check(r["gaps"] == 0, f"{r['gaps']} seq gaps")
    scenario = r["scenario"]
    check(r["to"] == ("user" if name.endswith("-user") else "device"), f"publishes went to {r['to']}")
    if scenario == "Idle":
        check(r["connections_held"] == 300, "not all 300 connections held")
        check(r.get("server_rss_per_connection_kib") is not None, "no RSS per connection")
    elif scenario in ("Throughput", "Latency"):
        check(r["all_delivered"] and r["delivered"] == r["published"] > 0, "not every published message was delivered")
        check(r["acked"] == r["delivered"], "not every delivered message was acked")
        check(r.get("server_cpu_seconds") is not None, "no server CPU time")
        if r["transport"] == "sse":
            check(0 < r["ack_requests"] <= r["acked"], "SSE acks not sent over HTTP")
        check(r["duplicates"] == 0, "duplicates without a reconnect")
        check(r["latency"]["samples"] == r["delivered"], "latency not recorded for every message")
    elif scenario == "Fanout":
        check(len(r["round_seconds"]) == 2 and all(s is not None for s in r["round_seconds"]), "a round did not reach every subscriber")
        check(r["delivered"] == 600, "expected 300 subscribers x 2 rounds deliveries")
    elif scenario == "Reconnect":
        check(r["reconnected"] == 300 and r["published_while_away"] == 900, "not every client came back / got 3 messages queued")
        check(r["messages_lost"] == 0 and r["catch_up_seconds"] is not None, "messages lost across the reconnect")
        if name.endswith("-restart"):
            check(r.get("restart_seconds") is not None, "the server was not restarted")
if failures:
    print("bench smoke FAILED:\n" + "\n".join(failures))
    sys.exit(1)
print(f"bench-smoke: {len(reports)} passed, 0 failed")
PY
