#!/usr/bin/env bash
# Builds what android-sample/herald (or your own library module) takes from here:
#   bindings/generated/kotlin/dev/herald/sdk/herald_ffi.kt         the Kotlin binding
#   bindings/generated/android/jniLibs/<abi>/libherald_ffi.so      arm64-v8a, armeabi-v7a, x86_64
# The libraries are linked for 16 KB pages (bindings/build.rs) and checked for it here.
# Needs the Android NDK (Android Studio → SDK Manager → NDK; found by cargo-ndk in the
# default SDK location, or set ANDROID_NDK_HOME). Installs cargo-ndk and the Rust
# Android targets if missing. Usage: bash bindings/build-android.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CARGO_NDK_VERSION=3.5.4
ABIS=(arm64-v8a armeabi-v7a x86_64)
RUST_TARGETS=(aarch64-linux-android armv7-linux-androideabi x86_64-linux-android)
OUT="$ROOT/bindings/generated/android/jniLibs"

if ! cargo ndk --version >/dev/null 2>&1; then
    cargo install --locked "cargo-ndk@$CARGO_NDK_VERSION"
fi
if command -v rustup >/dev/null 2>&1; then
    rustup target add "${RUST_TARGETS[@]}"
fi

# Host build: generates the Kotlin binding (and the Swift one).
bash bindings/generate.sh --release

rm -rf "$OUT"
abi_flags=()
for abi in "${ABIS[@]}"; do abi_flags+=(-t "$abi"); done
cargo ndk "${abi_flags[@]}" -o "$OUT" build -p herald-ffi --lib --release || {
    echo "cargo ndk failed; if it could not find the NDK, set ANDROID_NDK_HOME to <sdk>/ndk/<version>" >&2
    exit 1
}
for abi in "${ABIS[@]}"; do
    [[ -f "$OUT/$abi/libherald_ffi.so" ]] || { echo "missing $OUT/$abi/libherald_ffi.so" >&2; exit 1; }
done
python3 scripts/lib/elf_align.py "$OUT"/*/libherald_ffi.so || {
    echo "the libraries are not 16 KB page-aligned (see above); Android 15+ devices with 16 KB pages would refuse them" >&2
    exit 1
}
echo "Built $(cd "$OUT" && find . -name '*.so' | sort | tr '\n' ' ')in $OUT"
