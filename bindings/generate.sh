#!/usr/bin/env bash
# Builds herald-ffi and generates the Swift and Kotlin bindings into
# bindings/generated/{swift,kotlin}. Usage: bash bindings/generate.sh [--release]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

PROFILE=debug
CARGO_FLAGS=()
if [[ "${1:-}" == "--release" ]]; then
    PROFILE=release
    CARGO_FLAGS+=(--release)
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

if [[ "$PROFILE" == release ]]; then
    cargo build -p herald-ffi --lib --bin uniffi-bindgen --release
else
    # The tests' one debug build (its comment says why not `-p herald-ffi`).
    bash "$ROOT/scripts/build-debug.sh"
fi

case "$(uname -s)" in
    Darwin) LIB="$TARGET_DIR/$PROFILE/libherald_ffi.dylib" ;;
    *) LIB="$TARGET_DIR/$PROFILE/libherald_ffi.so" ;;
esac
BINDGEN="$TARGET_DIR/$PROFILE/uniffi-bindgen"
OUT="$ROOT/bindings/generated"

rm -rf "$OUT/swift" "$OUT/kotlin"
mkdir -p "$OUT/swift" "$OUT/kotlin"
# Library mode: the interface is read from the metadata embedded in the library.
"$BINDGEN" generate --library "$LIB" --language swift --out-dir "$OUT/swift" \
    --config "$ROOT/bindings/uniffi.toml" --no-format
"$BINDGEN" generate --library "$LIB" --language kotlin --out-dir "$OUT/kotlin" \
    --config "$ROOT/bindings/uniffi.toml" --no-format
# SwiftPM and Xcode expect the module map under this name.
if [[ -f "$OUT/swift/HeraldFFI.modulemap" ]]; then
    cp "$OUT/swift/HeraldFFI.modulemap" "$OUT/swift/module.modulemap"
fi

echo "Swift:  $(cd "$OUT/swift" && ls | tr '\n' ' ')"
echo "Kotlin: $(cd "$OUT/kotlin" && find . -name '*.kt' | tr '\n' ' ')"
echo "Library: $LIB"
