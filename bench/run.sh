#!/usr/bin/env bash
# Starts one server under test on 127.0.0.1, runs one load-generator scenario against it,
# writes the JSON report, and stops the server. Every run is bounded (loadgen's
# --max-seconds, and `timeout` around it).
#
#   bench/run.sh TARGET SCENARIO [scenario flags…]
#     TARGET:   herald | floor | socketio | pushpin
#     SCENARIO: idle | throughput | latency | fanout | reconnect   (see `loadgen --help`)
#   e.g. bench/run.sh herald idle --connections 20000 --hold-seconds 5
#        bench/run.sh herald reconnect --clients 19900 --messages 3 --restart
#
# Environment:
#   BENCH_PROFILE=release|debug   binaries to use (default release; CI smoke uses debug)
#   BENCH_OUT=DIR                 where the JSON goes (default bench/results)
#   BENCH_TAG=name                appended to the report's file name
#   BENCH_MAX_SECONDS=N           hard bound of the load generator (default 300)
#   BENCH_LOADGEN_ARGS="…"        extra loadgen flags (before the scenario)
#   BENCH_HERALD_BIN=path         the herald binary to run (default target/PROFILE/herald),
#                                 e.g. two builds side by side in one run
#   HERALD_*                      passed to the gateway (e.g. HERALD_LIMITS__WS_READ_BUFFER_BYTES)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
    sed -n '2,19p' "$0" >&2
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

if [ "$profile" = release ]; then
    cargo build --release -q -p herald-gateway --bin herald -p herald-bench --bin loadgen --bin floor
else
    bash scripts/build-debug.sh -q # the tests' build (bench-smoke): nothing compiled twice
fi
bin="target/$profile"
herald_bin=$(realpath -m "${BENCH_HERALD_BIN:-$bin/herald}")

work=$(mktemp -d /tmp/herald-bench.XXXXXX)
server_pid=
extra_pids=()
cleanup() {
    [[ $BASHPID == "$$" ]] || return 0 # not in a subshell (see main_shell_only in scripts/lib/tools.sh)
    for pid in $server_pid "${extra_pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    # A server started by restart.sh is not our child: wait for it by its pid.
    if [ -f "$work/server.pid" ] && [ "$(cat "$work/server.pid")" != "$server_pid" ]; then
        pid=$(cat "$work/server.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    fi
    [ -n "${BENCH_KEEP_WORK:-}" ] && echo "bench/run.sh: kept $work" >&2 || rm -rf "$work"
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

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "${BENCH_HERALD_PORT:-18080}" "${BENCH_FLOOR_PORT:-18091}" "${BENCH_SOCKETIO_PORT:-18092}" \
    "${BENCH_PUSHPIN_PORT:-18093}" "$((${BENCH_PUSHPIN_PORT:-18093} + 1))" "$((${BENCH_PUSHPIN_PORT:-18093} + 2))"; do
    # A server still up from an earlier run would be measured instead of the new one.
    for _ in $(seq 1 100); do port_busy "$p" || break; sleep 0.1; done
    if port_busy "$p"; then
        echo "bench/run.sh: port $p is still in use (an earlier run's server?); stop it or set BENCH_*_PORT" >&2
        exit 1
    fi
done

loadgen_env=()
loadgen_args=()
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
    key=$("$herald_bin" keys create --name bench --data-dir "$work/data" 2>/dev/null)
    "$herald_bin" serve --listen "127.0.0.1:$port" --data-dir "$work/data" >"$work/server.log" 2>&1 &
    server_pid=$!
    echo "$server_pid" >"$work/server.pid"
    # `loadgen reconnect --restart` runs this: SIGTERM (graceful shutdown), wait until the
    # process is gone (or a zombie of ours), start it again on the same store, wait until
    # it listens, print the new pid. Bounded: 30 s to stop, 10 s to listen.
    cat >"$work/restart.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
pid=\$(cat "$work/server.pid")
kill "\$pid"
for _ in \$(seq 1 600); do
    state=\$(ps -o stat= -p "\$pid" 2>/dev/null || true)
    case "\$state" in ""|Z*) break ;; esac
    sleep 0.05
done
case "\$(ps -o stat= -p "\$pid" 2>/dev/null || true)" in ""|Z*) ;; *) echo "restart: \$pid did not stop" >&2; exit 1 ;; esac
setsid "$herald_bin" serve --listen "127.0.0.1:$port" --data-dir "$work/data" >>"$work/server.log" 2>&1 </dev/null &
new=\$!
echo "\$new" >"$work/server.pid"
for _ in \$(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "\$new"; exit 0; fi
    sleep 0.05
done
echo "restart: herald did not listen again within 10 s" >&2
exit 1
EOF
    chmod +x "$work/restart.sh"
    loadgen_env=(HERALD_API_KEY="$key" HERALD_JWT_SECRET="$secret" BENCH_RESTART_COMMAND="$work/restart.sh")
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
pushpin)
    # Pushpin (Debian package) holds the WebSockets; bench/peers/pushpin/origin.js is the
    # GRIP origin it forwards socket events to, and takes the publishes.
    port=${BENCH_PUSHPIN_PORT:-18093}
    origin_port=$((port + 1)) publish_port=$((port + 2))
    if ! command -v pushpin >/dev/null; then
        echo "bench/run.sh: pushpin is missing; install it (apt-get install pushpin)" >&2
        exit 1
    fi
    mkdir -p "$work/pushpin/run" "$work/pushpin/log"
    echo "* 127.0.0.1:$origin_port,over_http" >"$work/pushpin/routes"
    # The packaged config, moved to our ports and dirs; its publish throttle
    # (message_rate 2500/s) and 50k connection cap raised like Herald's limits. The
    # package expects a system-wide zurl (Pushpin's HTTP client to the origin); the
    # runner starts its own instead, so the proxy is pointed at that one.
    sed -e "s|^services=.*|services=condure,zurl,pushpin-proxy,pushpin-handler|" \
        -e 's|^\[proxy\]$|[proxy]\nzurl_out_specs=ipc://{rundir}/{ipc_prefix}zurl-in\nzurl_out_stream_specs=ipc://{rundir}/{ipc_prefix}zurl-in-stream\nzurl_in_specs=ipc://{rundir}/{ipc_prefix}zurl-out|' \
        -e "s|^rundir=.*|rundir=$work/pushpin/run|" -e "s|^logdir=.*|logdir=$work/pushpin/log|" \
        -e "s|^http_port=.*|http_port=$port|" -e "s|^push_in_http_port=.*|push_in_http_port=$publish_port|" \
        -e "s|^client_maxconn=.*|client_maxconn=250000|" -e "s|^message_rate=.*|message_rate=1000000|" \
        -e "s|^message_hwm=.*|message_hwm=1000000|" -e "s|^routesfile=.*|routesfile=$work/pushpin/routes|" \
        -e "s|^log_level=.*|log_level=${BENCH_PUSHPIN_LOG_LEVEL:-1}|" \
        /etc/pushpin/pushpin.conf >"$work/pushpin/pushpin.conf"
    PORT=$origin_port PUSHPIN_PUBLISH="http://127.0.0.1:$publish_port/publish/" \
        node bench/peers/pushpin/origin.js >"$work/origin.log" 2>&1 &
    extra_pids+=($!)
    pushpin --config "$work/pushpin/pushpin.conf" >"$work/server.log" 2>&1 &
    server_pid=$!
    # Pushpin answers 502 to handshakes beyond what its proxy can queue towards the origin
    # (a 1000-client run at 512 in flight lost 448 of them); connect time is not compared.
    loadgen_args+=(--publish-url "http://127.0.0.1:$origin_port" --server-pid "${extra_pids[0]}"
        --connect-concurrency "${BENCH_PUSHPIN_CONNECT_CONCURRENCY:-64}")
    ;;
*)
    echo "bench/run.sh: unknown target $target; use herald, floor, socketio or pushpin" >&2
    exit 2
    ;;
esac
wait_for_port "$port"
[ -z "${origin_port:-}" ] || wait_for_port "$origin_port"

mkdir -p "$out_dir"
# shellcheck disable=SC2086
env "${loadgen_env[@]}" timeout --signal=KILL $((max_seconds + 30)) \
    "$bin/loadgen" --target "$target" --url "http://127.0.0.1:$port" --server-pid "$server_pid" \
    --max-seconds "$max_seconds" --out "$report" "${loadgen_args[@]}" ${BENCH_LOADGEN_ARGS:-} \
    "$scenario" "$@"
# Herald's own counters of the run (live deliveries against re-reads from the store,
# queue kicks, pushes) go into the report beside the load generator's figures.
if [ "$target" = herald ] && [ -f "$report" ]; then
    if metrics=$(curl -fsS --max-time 5 "http://127.0.0.1:$port/metrics" 2>/dev/null); then
        printf '%s\n' "$metrics" | python3 -c '
import json, re, sys
report = sys.argv[1]
counters = {}
for line in sys.stdin:
    m = re.match(r"^(herald_[a-z_]+_total)(\{[^}]*\})? ([0-9.e+]+)$", line.strip())
    if m:
        key = m.group(1) + (m.group(2) or "")
        counters[key] = float(m.group(3))
r = json.load(open(report))
r["server_counters"] = counters
json.dump(r, open(report, "w"), indent=2)
' "$report" || echo "bench/run.sh: could not add the server counters to the report" >&2
    fi
fi
echo "bench/run.sh: report written to $report" >&2
