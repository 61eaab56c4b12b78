#!/usr/bin/env bash
# Runs the whole Herald test suite on a fresh machine: lint, Rust tests (gateway,
# SDK, black-box), the generated Swift/Kotlin bindings and the samples' checks.
# Installs what it needs (cargo-nextest if missing; bindings scripts fetch kotlinc,
# JNA and tree-sitter themselves). Every step is bounded; the first failure stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's wall time, printed as it ends and summed up at the end, so a slow CI run
# says where its minutes went.
SUITE_START=$SECONDS
STEP_NAME="" STEP_START=$SECONDS TIMINGS=""
end_step() {
    [ -n "$STEP_NAME" ] || return 0
    local took=$((SECONDS - STEP_START))
    printf '<== %s: %ss\n' "$STEP_NAME" "$took"
    TIMINGS+=$(printf '%6ss  %s' "$took" "$STEP_NAME")$'\n'
}
trap 'rc=$?; if [ $rc -ne 0 ] && [ "$BASHPID" = "$$" ]; then end_step; printf "\n==> FAILED (exit %s) after %ss\n%s" "$rc" "$((SECONDS - SUITE_START))" "$TIMINGS"; fi' EXIT
step() {
    end_step
    STEP_NAME="$*" STEP_START=$SECONDS
    printf '\n==> %s\n' "$*"
}

step "toolchain"
cargo --version
if ! cargo nextest --version >/dev/null 2>&1; then
    step "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

step "services the tests use (PostgreSQL, NATS)"
bash scripts/ensure-services.sh

step "Rust tests (gateway, SDK, integration)"
bash scripts/build-debug.sh
cargo nextest run --workspace --no-fail-fast

step "bindings: generate Swift + Kotlin, check the Swift parses, Kotlin tests on the JVM"
bash bindings/generate.sh
bash bindings/check-swift.sh
bash bindings/kotlin-tests/run.sh

for extra in scripts/test.d/*.sh; do
    [ -e "$extra" ] || continue
    step "$extra"
    bash "$extra"
done

end_step
printf '\n==> all test steps passed in %ss\n%s' "$((SECONDS - SUITE_START))" "$TIMINGS"
