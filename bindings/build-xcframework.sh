#!/usr/bin/env bash
# macOS + Xcode only. Builds the inputs of bindings/Package.swift:
#   bindings/apple/HeraldFFI.xcframework   Rust static library for iOS devices
#                                          (aarch64-apple-ios) and simulators
#                                          (aarch64-apple-ios-sim + x86_64-apple-ios,
#                                          one lipo'd library) and macOS (arm64 +
#                                          x86_64, one lipo'd library), C header,
#                                          module map; built for the SDK's minimums,
#                                          iOS 16 and macOS 13 (as Package.swift says)
#   bindings/apple/Sources/Herald/Herald.swift   the generated Swift binding
# Usage: bash bindings/build-xcframework.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
APPLE="$ROOT/bindings/apple"
IOS_TARGETS=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios)
MACOS_TARGETS=(aarch64-apple-darwin x86_64-apple-darwin)
# The minimum OS versions of the static libraries: those of Package.swift's `platforms`.
export IPHONEOS_DEPLOYMENT_TARGET=16.0 MACOSX_DEPLOYMENT_TARGET=13.0

if [[ "$(uname -s)" != Darwin ]]; then
    echo "build-xcframework.sh needs macOS with Xcode (xcodebuild, lipo); on Linux only the Swift syntax can be checked (bindings/check-swift.sh)" >&2
    exit 1
fi
if ! xcodebuild -version >/dev/null 2>&1; then
    echo "xcodebuild does not work: install Xcode, then run 'sudo xcode-select -s /Applications/Xcode.app'" >&2
    exit 1
fi
if command -v rustup >/dev/null 2>&1; then
    rustup target add "${IOS_TARGETS[@]}" "${MACOS_TARGETS[@]}"
fi

# Host build: generates Herald.swift, HeraldFFI.h and the module map.
bash bindings/generate.sh --release
for t in "${IOS_TARGETS[@]}" "${MACOS_TARGETS[@]}"; do
    cargo build -p herald-ffi --lib --release --target "$t"
done

rm -rf "$APPLE/HeraldFFI.xcframework" "$APPLE/headers" "$APPLE/Sources" "$TARGET_DIR/ios-sim" "$TARGET_DIR/macos"
mkdir -p "$APPLE/headers" "$APPLE/Sources/Herald" "$TARGET_DIR/ios-sim" "$TARGET_DIR/macos"
# One simulator slice may hold both architectures; the device slice is arm64 only.
lipo -create \
    "$TARGET_DIR/aarch64-apple-ios-sim/release/libherald_ffi.a" \
    "$TARGET_DIR/x86_64-apple-ios/release/libherald_ffi.a" \
    -output "$TARGET_DIR/ios-sim/libherald_ffi.a"
lipo -create \
    "$TARGET_DIR/aarch64-apple-darwin/release/libherald_ffi.a" \
    "$TARGET_DIR/x86_64-apple-darwin/release/libherald_ffi.a" \
    -output "$TARGET_DIR/macos/libherald_ffi.a"
cp bindings/generated/swift/HeraldFFI.h bindings/generated/swift/module.modulemap "$APPLE/headers/"
cp bindings/generated/swift/Herald.swift "$APPLE/Sources/Herald/"
xcodebuild -create-xcframework \
    -library "$TARGET_DIR/aarch64-apple-ios/release/libherald_ffi.a" -headers "$APPLE/headers" \
    -library "$TARGET_DIR/ios-sim/libherald_ffi.a" -headers "$APPLE/headers" \
    -library "$TARGET_DIR/macos/libherald_ffi.a" -headers "$APPLE/headers" \
    -output "$APPLE/HeraldFFI.xcframework"
echo "Built $APPLE/HeraldFFI.xcframework and $APPLE/Sources/Herald/Herald.swift (Swift package: bindings/Package.swift)"
