#!/usr/bin/env bash
# OpenTelemetry end to end (the `otel` cargo feature, docs/operations.md): builds
# `herald` with --features otel, starts a tiny OTLP/HTTP receiver
# (scripts/lib/otlp_receiver.py), runs the gateway with OTEL_EXPORTER_OTLP_ENDPOINT
# pointing at it, sends requests with a known x-request-id, stops the gateway (which
# flushes its spans) and checks the exported protobuf holds the service name `herald`,
# the `http` span, its route and the request id. Not in scripts/test.d: the extra
# feature build costs minutes; CI runs `cargo check --features otel` instead
# (scripts/test.d/observability.sh). Run: bash scripts/otel-e2e.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$(mktemp -d)"
RECV_PID="" GW_PID=""
cleanup() {
    [[ $BASHPID == "$$" ]] || return 0 # not in a subshell (see main_shell_only in scripts/lib/tools.sh)
    [[ -n "$GW_PID" ]] && kill "$GW_PID" 2>/dev/null || true
    [[ -n "$RECV_PID" ]] && kill "$RECV_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

timeout 1200 cargo build -q -p herald-gateway --features otel --bin herald
cp "$TARGET/debug/herald" "$WORK/herald-otel"

python3 scripts/lib/otlp_receiver.py "$WORK/traces.bin" >"$WORK/recv.out" &
RECV_PID=$!
for _ in $(seq 1 50); do grep -q listening "$WORK/recv.out" 2>/dev/null && break; sleep 0.1; done
PORT="$(sed -n 's/listening on //p' "$WORK/recv.out")"
[[ -n "$PORT" ]] || { echo "otel-e2e: receiver did not start" >&2; exit 1; }

OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$PORT" OTEL_BSP_SCHEDULE_DELAY=200 \
    HERALD_PUSH__STUB=true HERALD_LOG=info \
    "$WORK/herald-otel" serve --listen 127.0.0.1:0 --data-dir "$WORK/data" \
    >"$WORK/gw.out" 2>"$WORK/gw.err" &
GW_PID=$!
URL=""
for _ in $(seq 1 200); do
    URL="$(sed -n 's/^herald listening on //p' "$WORK/gw.out" | head -n1)"
    [[ -n "$URL" ]] && break
    sleep 0.1
done
[[ -n "$URL" ]] || { echo "otel-e2e: gateway did not start" >&2; cat "$WORK/gw.err" >&2; exit 1; }
KEY="$(sed -n 's/^API key (service routes): *//p' "$WORK/gw.out")"
RID="otel-e2e-$RANDOM$RANDOM"
code="$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$URL/v1/messages" \
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -H "x-request-id: $RID" -d '{"to":{"user":"nobody"},"data":{}}')"
[[ "$code" == 202 ]] || { echo "otel-e2e: publish answered $code" >&2; exit 1; }
curl -sS -o /dev/null "$URL/healthz"
kill -TERM "$GW_PID"
wait "$GW_PID" || true
GW_PID=""

python3 - "$WORK/traces.bin" "$RID" <<'PY'
import sys
data = open(sys.argv[1], "rb").read() if __import__("os").path.exists(sys.argv[1]) else b""
rid = sys.argv[2].encode()
need = {b"herald": "service name", b"http": "span name", b"/v1/messages": "route", rid: "request id"}
missing = [what for token, what in need.items() if token not in data]
if missing:
    sys.exit(f"otel-e2e: FAILED: {len(data)} bytes of OTLP received; missing {missing}")
print(f"otel-e2e: {len(data)} bytes of OTLP spans received with service, span, route and request id")
PY
