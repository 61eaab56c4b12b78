#!/usr/bin/env bash
# The one debug build every test script uses: all libraries, binaries and tests of the
# workspace, in one cargo selection. Cargo picks dependency features from the packages a
# command selects (and the tests' dev-dependencies), so a narrower `cargo build -p
# herald-gateway` after it compiles a second copy of tokio, hyper, sqlx… and everything
# above them: minutes on two cores, and CI did it six times over (3044 s). After the
# first run this is a no-op, and target/debug/ holds herald, herald-device, herald-demo,
# loadgen, floor, uniffi-bindgen and libherald_ffi.so, the same files the tests used.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo build --workspace --all-targets "$@"
