#!/usr/bin/env bash
# Kotlin tests of the generated binding on the JVM, against a real gateway that this
# script starts (and stops). Needs: bindings/generate.sh output (generated if missing),
# kotlinc (npm kotlin-compiler, fetched into .tools/), JNA (Debian libjna-java).
# Prints "N passed, M failed"; exits non-zero on any failure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
TOOLS="$ROOT/.tools"
KOTLIN_VERSION=2.4.20
KOTLIN_HOME="$TOOLS/kotlin-compiler-$KOTLIN_VERSION"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

# --- tools -------------------------------------------------------------------------
if [[ ! -x "$KOTLIN_HOME/bin/kotlinc" ]]; then
    mkdir -p "$TOOLS"
    (cd "$TOOLS" && npm pack --silent "kotlin-compiler@$KOTLIN_VERSION" >/dev/null \
        && rm -rf package && tar xzf "kotlin-compiler-$KOTLIN_VERSION.tgz" \
        && rm -rf "$KOTLIN_HOME" && mv package "$KOTLIN_HOME")
    chmod +x "$KOTLIN_HOME"/bin/*
fi
JNA_JAR="${JNA_JAR:-/usr/share/java/jna.jar}"
if [[ ! -f "$JNA_JAR" ]]; then
    apt-get install -y libjna-java >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y libjna-java >/dev/null; }
fi
STDLIB="$KOTLIN_HOME/lib/kotlin-stdlib.jar"

# --- library, bindings, gateway ----------------------------------------------------
GEN_KT="$ROOT/bindings/generated/kotlin/dev/herald/sdk/herald_ffi.kt"
if [[ ! -f "$GEN_KT" || ! -f "$TARGET_DIR/debug/libherald_ffi.so" ]]; then
    bash "$ROOT/bindings/generate.sh"
fi
cargo build -p herald-gateway --bin herald
HERALD="$TARGET_DIR/debug/herald"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/herald-kotlin-tests.XXXXXX")"
GW_PID=""
cleanup() {
    if [[ -n "$GW_PID" ]]; then
        kill "$GW_PID" 2>/dev/null || true
        wait "$GW_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

API_KEY="$("$HERALD" --data-dir "$WORK/gateway" keys create --name kotlin-tests 2>/dev/null)"
HERALD_PUSH__STUB=true HERALD_LOG=info \
    "$HERALD" --data-dir "$WORK/gateway" --listen 127.0.0.1:0 serve >"$WORK/gateway.out" 2>"$WORK/gateway.log" &
GW_PID=$!
ADDR=""
for _ in $(seq 1 200); do
    ADDR="$(sed -n 's/.*herald listening.*addr=\([0-9.]*:[0-9]*\).*/\1/p' "$WORK/gateway.log" | head -n1)"
    [[ -n "$ADDR" ]] && break
    if ! kill -0 "$GW_PID" 2>/dev/null; then
        echo "gateway exited:" >&2; cat "$WORK/gateway.log" >&2; exit 1
    fi
    sleep 0.1
done
if [[ -z "$ADDR" ]]; then
    echo "gateway did not report its address:" >&2; cat "$WORK/gateway.log" >&2; exit 1
fi
echo "gateway on http://$ADDR"

# --- compile and run ---------------------------------------------------------------
JAR="$WORK/kotlin-tests.jar"
"$KOTLIN_HOME/bin/kotlinc" -nowarn -cp "$JNA_JAR" -d "$JAR" \
    "$GEN_KT" "$ROOT/bindings/kotlin-tests/src/Main.kt" 2>&1 | grep -v '^warning:' || true
[[ -f "$JAR" ]] || { echo "kotlinc failed" >&2; exit 1; }

mkdir -p "$WORK/clients"
set +e
HERALD_URL="http://$ADDR" HERALD_API_KEY="$API_KEY" HERALD_TEST_DIR="$WORK/clients" \
    timeout 300 java -Djna.library.path="$TARGET_DIR/debug" -cp "$JAR:$JNA_JAR:$STDLIB" MainKt
RC=$?
set -e
if [[ $RC -ne 0 ]]; then
    echo "--- gateway log (tail) ---" >&2
    tail -n 40 "$WORK/gateway.log" >&2
fi
exit $RC
