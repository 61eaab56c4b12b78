#!/usr/bin/env bash
# Runs the whole Herald test suite on a fresh machine: lint, Rust tests (gateway,
# SDK, black-box), the generated Swift/Kotlin bindings and the samples' checks.
# Installs what it needs (cargo-nextest if missing; bindings scripts fetch kotlinc,
# JNA and tree-sitter themselves). Every step is bounded; the first failure stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

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
cargo build --workspace --bins
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

step "all test steps passed"
