#!/usr/bin/env bash
# Kotlin tests of the generated binding on the JVM, against a real gateway that this
# script starts (and stops). Needs: bindings/generate.sh output (generated if missing),
# kotlinc (npm kotlin-compiler, fetched into .tools/), JNA (Debian libjna-java); see
# scripts/lib/tools.sh. Prints "N passed, M failed"; exits non-zero on any failure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib/tools.sh"

ensure_kotlinc
ensure_jna
ensure_bindings

WORK="$(mktemp -d "${TMPDIR:-/tmp}/herald-kotlin-tests.XXXXXX")"
cleanup() {
    main_shell_only || return 0
    stop_test_gateway
    rm -rf "$WORK"
}
trap cleanup EXIT
start_test_gateway "$WORK"

# The SDK as a user gets it: dev.herald:herald-jvm from a local Maven repository (the
# binding + this host's library inside the jar, loaded by JNA from there).
bash "$ROOT/scripts/package-jvm.sh" "$WORK/maven"
VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml")"
SDK_JAR="$WORK/maven/dev/herald/herald-jvm/$VERSION/herald-jvm-$VERSION.jar"
JAR="$WORK/kotlin-tests.jar"
"$KOTLINC" -nowarn -cp "$SDK_JAR:$JNA_JAR" -d "$JAR" \
    "$ROOT/bindings/kotlin-tests/src/Main.kt" "$ROOT/bindings/kotlin-tests/src/TestKit.kt" 2>&1 | grep -v '^warning:' || true
[[ -f "$JAR" ]] || { echo "kotlinc failed" >&2; exit 1; }

mkdir -p "$WORK/clients"
set +e
HERALD_URL="$GW_URL" HERALD_API_KEY="$GW_API_KEY" HERALD_TEST_DIR="$WORK/clients" \
    timeout 300 java -cp "$JAR:$SDK_JAR:$JNA_JAR:$KOTLIN_STDLIB" MainKt
RC=$?
set -e
if [[ $RC -ne 0 ]]; then
    echo "--- gateway log (tail) ---" >&2
    tail -n 40 "$WORK/gateway.log" >&2
fi
exit $RC
