# Shared by the bindings and samples checks (source it; needs ROOT set to the repo root).
# Fetches the tools those checks need into $ROOT/.tools/ once and reuses them, and
# starts a throwaway gateway. Every function fails loudly with what to do next.

HERALD_TOOLS="$ROOT/.tools"
HERALD_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
KOTLIN_VERSION=2.4.20

# test_work_dir NAME: prints a fresh directory for one test script's files. It lives in
# the build directory, not /tmp: CI has twice seen the walkthrough's /tmp directory
# removed under it mid-run by something outside the suite.
test_work_dir() {
    mkdir -p "$HERALD_TARGET_DIR/test-work" && mktemp -d "$HERALD_TARGET_DIR/test-work/$1.XXXXXX"
}

# main_shell_only: true in the script's own shell, false in a subshell. Every EXIT-trap
# cleanup starts with `main_shell_only || return 0`: bash runs the parent's EXIT trap in a
# subshell that is killed before it has reset its traps (a `( … ) &` killed just after its
# fork), and that copy of cleanup would remove the work directory under the running script.
main_shell_only() { [[ $BASHPID == "$$" ]]; }

# kotlinc from npm (`kotlin-compiler` is the official compiler zip, repackaged).
# Sets KOTLIN_HOME, KOTLINC, KOTLIN_STDLIB.
ensure_kotlinc() {
    KOTLIN_HOME="$HERALD_TOOLS/kotlin-compiler-$KOTLIN_VERSION"
    KOTLINC="$KOTLIN_HOME/bin/kotlinc"
    KOTLIN_STDLIB="$KOTLIN_HOME/lib/kotlin-stdlib.jar"
    if [[ ! -x "$KOTLINC" ]]; then
        echo "installing kotlinc $KOTLIN_VERSION (npm package kotlin-compiler) into $KOTLIN_HOME" >&2
        mkdir -p "$HERALD_TOOLS"
        (cd "$HERALD_TOOLS" && npm pack --silent "kotlin-compiler@$KOTLIN_VERSION" >/dev/null \
            && rm -rf package && tar xzf "kotlin-compiler-$KOTLIN_VERSION.tgz" \
            && rm -rf "$KOTLIN_HOME" && mv package "$KOTLIN_HOME") || {
            echo "could not fetch kotlinc (npm pack kotlin-compiler@$KOTLIN_VERSION); check npm's network access" >&2
            return 1
        }
        chmod +x "$KOTLIN_HOME"/bin/*
    fi
}

# JNA from Debian (libjna-java), the jar the generated Kotlin binding loads the
# library with. Sets JNA_JAR (override it to use another jar).
ensure_jna() {
    JNA_JAR="${JNA_JAR:-/usr/share/java/jna.jar}"
    if [[ ! -f "$JNA_JAR" ]]; then
        echo "installing JNA (Debian package libjna-java, apt-get) for $JNA_JAR" >&2
        apt-get install -y libjna-java >/dev/null 2>&1 \
            || { apt-get update >/dev/null && apt-get install -y libjna-java >/dev/null; } || {
            echo "could not install libjna-java; install it or set JNA_JAR to a jna.jar" >&2
            return 1
        }
    fi
}

# A Python venv with py-tree-sitter and the Swift and Kotlin grammars (PyPI).
# Sets TS_PYTHON.
ensure_tree_sitter() {
    local venv="$HERALD_TOOLS/venv-tree-sitter"
    TS_PYTHON="$venv/bin/python"
    if [[ ! -x "$TS_PYTHON" ]]; then
        echo "creating a Python venv in $venv" >&2
        mkdir -p "$HERALD_TOOLS"
        python3 -m venv "$venv" || {
            echo "python3 -m venv failed; install python3-venv" >&2
            return 1
        }
    fi
    if ! "$TS_PYTHON" -c 'import tree_sitter, tree_sitter_swift, tree_sitter_kotlin' 2>/dev/null; then
        echo "installing tree-sitter, tree-sitter-swift, tree-sitter-kotlin (PyPI) into $venv" >&2
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
            tree-sitter tree-sitter-swift tree-sitter-kotlin || {
            echo "pip could not install tree-sitter, tree-sitter-swift, tree-sitter-kotlin" >&2
            return 1
        }
    fi
}

# The generated Swift/Kotlin bindings and the host library (generate.sh if missing).
# Sets GEN_SWIFT_DIR, GEN_KT, FFI_LIB_DIR.
ensure_bindings() {
    GEN_SWIFT_DIR="$ROOT/bindings/generated/swift"
    GEN_KT="$ROOT/bindings/generated/kotlin/dev/herald/sdk/herald_ffi.kt"
    FFI_LIB_DIR="$HERALD_TARGET_DIR/debug"
    if [[ ! -f "$GEN_KT" || ! -f "$GEN_SWIFT_DIR/Herald.swift" || ! -f "$FFI_LIB_DIR/libherald_ffi.so" ]]; then
        bash "$ROOT/bindings/generate.sh"
    fi
}

# Starts `herald serve` on 127.0.0.1:0 with stub push providers in "$1" (a fresh
# directory), after creating an API key there. Sets GW_PID, GW_URL, GW_API_KEY; the
# caller stops it with stop_test_gateway (put that in its EXIT trap).
start_test_gateway() {
    local dir="$1"
    bash "$ROOT/scripts/build-debug.sh"
    local herald="$HERALD_TARGET_DIR/debug/herald"
    GW_API_KEY="$("$herald" --data-dir "$dir/gateway" keys create --name tests 2>/dev/null)"
    HERALD_PUSH__STUB=true HERALD_LOG=info \
        "$herald" --data-dir "$dir/gateway" serve --listen 127.0.0.1:0 \
        >"$dir/gateway.out" 2>"$dir/gateway.log" &
    GW_PID=$!
    local addr=""
    for _ in $(seq 1 200); do
        addr="$(sed -n 's/.*herald listening.*addr=\([0-9.]*:[0-9]*\).*/\1/p' "$dir/gateway.log" | head -n1)"
        [[ -n "$addr" ]] && break
        if ! kill -0 "$GW_PID" 2>/dev/null; then
            echo "gateway exited:" >&2
            cat "$dir/gateway.log" >&2
            return 1
        fi
        sleep 0.1
    done
    if [[ -z "$addr" ]]; then
        echo "gateway did not report its address within 20 s:" >&2
        cat "$dir/gateway.log" >&2
        return 1
    fi
    GW_URL="http://$addr"
    echo "gateway on $GW_URL"
}

stop_test_gateway() {
    if [[ -n "${GW_PID:-}" ]]; then
        kill "$GW_PID" 2>/dev/null || true
        wait "$GW_PID" 2>/dev/null || true
        GW_PID=""
    fi
}
