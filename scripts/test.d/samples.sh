#!/usr/bin/env bash
# Checks of the sample apps that need neither a Swift toolchain nor the Android SDK:
#   1. every .swift file of ios-sample/ parses with tree-sitter-swift;
#   2. the plain-Kotlin core of android-sample (app/src/main/java/dev/herald/sample/core)
#      imports no Android class and compiles with kotlinc against the generated binding;
#      so does the :herald module's HeraldAndroid.kt (the TLS init), against a stub of
#      the one Android class it uses (android.content.Context);
#   3. API drift: every use of the generated binding in ios-sample/ and android-sample/
#      (including the Android-only Kotlin that cannot be compiled here) exists in the
#      generated Swift / Kotlin binding (scripts/lib/api_drift.py), and the check itself
#      fails on deliberately wrong uses (self-test on temporary copies);
#   4. that core's JVM tests (android-sample/core-tests) pass against a real gateway and
#      the real sample backend (sample-backend/token-server.py).
# Runs after bindings/generate.sh in scripts/test.sh; standalone it generates them.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib/tools.sh"

step() { printf -- '--- samples: %s\n' "$*"; }
die() {
    echo "samples: FAILED: $*" >&2
    exit 1
}

ensure_tree_sitter
ensure_kotlinc
ensure_jna
ensure_bindings

WORK="$(test_work_dir herald-samples)"
BACKEND_PID=""
cleanup() {
    main_shell_only || return 0
    if [[ -n "$BACKEND_PID" ]]; then
        kill "$BACKEND_PID" 2>/dev/null || true
        wait "$BACKEND_PID" 2>/dev/null || true
    fi
    stop_test_gateway
    rm -rf "$WORK"
}
trap cleanup EXIT

mapfile -t SWIFT_FILES < <(find ios-sample -name '*.swift' | sort)
mapfile -t KT_FILES < <(find android-sample -name '*.kt' | sort)
CORE_DIR=android-sample/app/src/main/java/dev/herald/sample/core
mapfile -t CORE_FILES < <(find "$CORE_DIR" -name '*.kt' | sort)
(( ${#SWIFT_FILES[@]} > 0 )) || die "no .swift files under ios-sample/"
(( ${#KT_FILES[@]} > 0 && ${#CORE_FILES[@]} > 0 )) || die "no .kt files under android-sample/ or $CORE_DIR"

step "1. Swift syntax of ios-sample (${#SWIFT_FILES[@]} files)"
"$TS_PYTHON" scripts/lib/swift_syntax.py "${SWIFT_FILES[@]}" || die "ios-sample Swift does not parse (see above)"

step "2. the plain-Kotlin core (${#CORE_FILES[@]} files) compiles with the generated binding"
if grep -nE '^import +(android|androidx|com\.google)\.' "${CORE_FILES[@]}"; then
    die "$CORE_DIR must not use Android classes (it is compiled and tested on a plain JVM); move that code out of core/"
fi
# One kotlinc run: the binding, the core, its tests, HeraldAndroid.kt (with a stub
# Context: its API for step 3, not run), and the API dumper for step 3.
HERALD_ANDROID_KT=android-sample/herald/src/main/java/dev/herald/sdk/HeraldAndroid.kt
[[ -f "$HERALD_ANDROID_KT" ]] || die "missing $HERALD_ANDROID_KT"
mkdir -p "$WORK/stubs"
cat >"$WORK/stubs/Context.kt" <<'KT'
package android.content
// Stub of the Android class HeraldAndroid.kt uses (Java's getApplicationContext()).
abstract class Context { abstract val applicationContext: Context }
KT
JAR="$WORK/sample-core.jar"
"$KOTLINC" -nowarn -cp "$JNA_JAR:$KOTLIN_HOME/lib/kotlin-reflect.jar" -d "$JAR" "$GEN_KT" "${CORE_FILES[@]}" \
    "$HERALD_ANDROID_KT" "$WORK/stubs/Context.kt" \
    android-sample/core-tests/CoreTest.kt bindings/kotlin-tests/src/TestKit.kt scripts/lib/KotlinApiDump.kt 2>&1 | grep -v '^warning:' || true
[[ -f "$JAR" ]] || die "kotlinc could not compile the sample core / HeraldAndroid.kt with the generated binding (errors above)"
echo "compiled ${CORE_FILES[*]}, $HERALD_ANDROID_KT and android-sample/core-tests/CoreTest.kt with $GEN_KT"

step "3. API drift: every binding use in the samples exists in the generated bindings"
# tree-sitter-kotlin cannot parse all of the generated Kotlin; its API comes from reflection.
# The sample's own core is listed too: the Android-only files, which cannot be compiled
# here, call the binding mostly through it.
for pkg in dev.herald.sdk dev.herald.sample.core; do
    java -cp "$JAR:$JNA_JAR:$KOTLIN_STDLIB:$KOTLIN_HOME/lib/kotlin-reflect.jar" KotlinApiDumpKt "$JAR" "$pkg" \
        >"$WORK/api-$pkg.json" || die "could not list the API of $pkg"
done
KT_API="$WORK/api-dev.herald.sdk.json,$WORK/api-dev.herald.sample.core.json"
SWIFT_API="$GEN_SWIFT_DIR/Herald.swift"
"$TS_PYTHON" scripts/lib/api_drift.py swift "$SWIFT_API" "${SWIFT_FILES[@]}" \
    || die "ios-sample uses binding API that $SWIFT_API does not have (see above)"
"$TS_PYTHON" scripts/lib/api_drift.py kotlin "$KT_API" "${KT_FILES[@]}" \
    || die "android-sample uses API that the generated Kotlin binding ($GEN_KT) or its core/ does not have (see above)"

# Self-test: the check must fail on one deliberately wrong use, with every other file as is.
expect_drift() { # lang, api, file, sed expression, text the report must contain
    local lang="$1" api="$2" file="$3" edit="$4" expect="$5" copy out f
    local -a files=()
    copy="$WORK/drift/$file"
    mkdir -p "$(dirname "$copy")"
    sed "$edit" "$file" >"$copy"
    cmp -s "$file" "$copy" && die "self-test edit '$edit' changed nothing in $file"
    if [[ "$lang" == swift ]]; then set -- "${SWIFT_FILES[@]}"; else set -- "${KT_FILES[@]}"; fi
    for f in "$@"; do
        if [[ "$f" == "$file" ]]; then files+=("$copy"); else files+=("$f"); fi
    done
    if out="$("$TS_PYTHON" scripts/lib/api_drift.py "$lang" "$api" "${files[@]}" 2>&1)"; then
        echo "$out"
        die "self-test: the drift check passed $file with '$edit' applied"
    fi
    grep -q -- "$expect" <<<"$out" || { echo "$out"; die "self-test: the drift report does not mention '$expect'"; }
    echo "self-test ok: $file with '$edit' is reported: $(grep -m1 -- "$expect" <<<"$out")"
}
expect_drift swift "$SWIFT_API" ios-sample/HeraldSample/HeraldController.swift \
    's/networkChanged(available:/networkChange(available:/' "no member 'networkChange'"
expect_drift swift "$SWIFT_API" ios-sample/HeraldSample/HeraldController.swift \
    's/case \.suspended:/case .paused:/' "case .paused"
expect_drift swift "$SWIFT_API" ios-sample/NotificationService/NotificationService.swift \
    's/handlePush(payloadJson:/handlePush(payload:/' "labels \['payload'\]"
expect_drift swift "$SWIFT_API" ios-sample/Shared/ReceivedMessage.swift \
    's/message.notification?.title/message.notification?.heading/' "no member 'heading'"
expect_drift kotlin "$KT_API" android-sample/app/src/main/java/dev/herald/sample/SampleApplication.kt \
    's/PushProvider\.FCM/PushProvider.GCM/' "PushProvider.GCM"
expect_drift kotlin "$KT_API" android-sample/app/src/main/java/dev/herald/sample/HeraldMessagingService.kt \
    's/controller.handlePush(remoteMessage.data)/controller.handlePush(remoteMessage.data)\n        HeraldException.Timeot("x")/' "Timeot"
expect_drift kotlin "$KT_API" android-sample/app/src/main/java/dev/herald/sample/SampleApplication.kt \
    's/controller?.background()/controller?.toBackground()/' "no member 'toBackground'"
expect_drift kotlin "$KT_API" android-sample/app/src/main/java/dev/herald/sample/SampleApplication.kt \
    's/HeraldAndroid\.init(this)/HeraldAndroid.initialize(this)/' "no member 'initialize'"
expect_drift kotlin "$KT_API" "$CORE_DIR/HeraldController.kt" \
    's/heraldClient\.appBackground()/heraldClient.appSuspend()/' "no member 'appSuspend'"

step "4. the core's JVM tests against a real gateway and the sample backend"
start_test_gateway "$WORK"
HERALD_API_KEY="$GW_API_KEY" python3 sample-backend/token-server.py --gateway "$GW_URL" --listen 127.0.0.1:0 \
    >"$WORK/backend.out" 2>"$WORK/backend.log" &
BACKEND_PID=$!
BACKEND_URL=""
for _ in $(seq 1 100); do
    BACKEND_URL="$(sed -n 's/^token-server listening on \(http[^ ]*\).*/\1/p' "$WORK/backend.out")"
    [[ -n "$BACKEND_URL" ]] && break
    kill -0 "$BACKEND_PID" 2>/dev/null || { cat "$WORK/backend.log" >&2; die "token-server.py exited"; }
    sleep 0.1
done
[[ -n "$BACKEND_URL" ]] || die "token-server.py did not report its address within 10 s"
echo "sample backend on $BACKEND_URL"
mkdir -p "$WORK/clients"
set +e
HERALD_URL="$GW_URL" HERALD_API_KEY="$GW_API_KEY" SAMPLE_BACKEND_URL="$BACKEND_URL" HERALD_TEST_DIR="$WORK/clients" \
    timeout 300 java -Djna.library.path="$FFI_LIB_DIR" -cp "$JAR:$JNA_JAR:$KOTLIN_STDLIB" CoreTestKt
RC=$?
set -e
if [[ $RC -ne 0 ]]; then
    echo "--- gateway log (tail) ---" >&2
    tail -n 40 "$WORK/gateway.log" >&2
    echo "--- sample backend log (tail) ---" >&2
    tail -n 20 "$WORK/backend.log" >&2
    die "the sample core's JVM tests failed (exit $RC)"
fi
step "all sample checks passed"
