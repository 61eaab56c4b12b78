#!/usr/bin/env bash
# Packaging checks that run without Xcode or the Android SDK (issue #18 item 7):
#   1. one version: the workspace version (gateway, protocol, SDK) is the one the root
#      Package.swift names, `herald --version` prints, CHANGELOG.md has a section for
#      (or an "Unreleased" one above it) and README's compatibility table has a row for;
#   2. the minimum OS versions agree everywhere: Package.swift, bindings/Package.swift,
#      the XCFramework build, ios-sample/project.yml, the Android modules, the READMEs;
#   3. the Swift package: scripts/release-apple.sh --dry-run (zip, checksum and URL
#      written into a copy of Package.swift, the generated binding beside it, all Swift
#      parsing), and the committed Package.swift files parse;
#   4. the Gradle files parse (tree-sitter-kotlin) and the :herald library publishes
#      dev.herald:herald-android with the workspace version, the three ABIs, JNA >= 5.17;
#   5. the 16 KB page-alignment check of the Android libraries (scripts/lib/elf_align.py)
#      on generated ELF files and on this host's library.
# The JVM artifact (scripts/package-jvm.sh, a local Maven repository) is built and used by
# bindings/kotlin-tests/run.sh. Standalone it generates the bindings if missing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib/tools.sh"

FAILED=0
fail() {
    echo "packaging: FAILED: $*" >&2
    FAILED=1
}
# expect FILE REGEX WHAT: FILE must have a line matching the extended REGEX.
expect() { grep -qE -- "$2" "$1" || fail "$1: $3 (no line matches /$2/)"; }

ensure_tree_sitter
ensure_bindings

echo "--- packaging: 1. one version"
VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
[[ -n "$VERSION" ]] || fail "no [workspace.package] version in Cargo.toml"
for toml in protocol/Cargo.toml gateway/Cargo.toml sdk/Cargo.toml bindings/Cargo.toml; do
    expect "$toml" '^version\.workspace = true$' "takes the workspace version"
done
expect Package.swift "^let version = \"$VERSION\"$" "names version $VERSION"
bash scripts/build-debug.sh -q
HERALD_VERSION="$("$HERALD_TARGET_DIR/debug/herald" --version)"
[[ "$HERALD_VERSION" == "herald $VERSION" ]] || fail "herald --version says '$HERALD_VERSION', not 'herald $VERSION'"
expect CHANGELOG.md "^## ($VERSION|Unreleased)\$" "has a section for $VERSION or Unreleased"
expect README.md "^\| ${VERSION%.*}\.x \| \`herald\.v1\`" "has a compatibility row for ${VERSION%.*}.x"
echo "version $VERSION"

echo "--- packaging: 2. minimum OS versions (iOS 16, macOS 13, Android 7.0 / API 24)"
for pkg in Package.swift bindings/Package.swift; do
    expect "$pkg" 'platforms: \[\.iOS\(\.v16\), \.macOS\(\.v13\)\]' "platforms are iOS 16 and macOS 13"
done
expect bindings/build-xcframework.sh '^export IPHONEOS_DEPLOYMENT_TARGET=16\.0 MACOSX_DEPLOYMENT_TARGET=13\.0$' \
    "builds the static libraries for iOS 16.0 and macOS 13.0"
expect ios-sample/project.yml '^ +iOS: "16\.0"$' "deploys to iOS 16.0"
for gradle in android-sample/app/build.gradle.kts android-sample/herald/build.gradle.kts; do
    expect "$gradle" '^ +minSdk = 24$' "has minSdk 24"
done
expect README.md 'iOS 16, macOS 13, Android 7\.0 \(API 24\)' "states the same minimums"
expect ios-sample/README.md 'iOS 16' "states iOS 16"
expect android-sample/README.md 'API 24' "states API 24"
# No other minimum may creep in (an old .v15, a deployment target or minSdk that differs).
SCOPE=(Package.swift bindings/Package.swift bindings/README.md bindings/build-xcframework.sh ios-sample android-sample README.md)
others="$(grep -rhoE '\.iOS\(\.v[0-9]+\)|\.macOS\(\.v[0-9]+\)|minSdk *= *[0-9]+|(IPHONEOS|MACOSX)_DEPLOYMENT_TARGET=[0-9.]+|iOS: "[0-9.]+"' "${SCOPE[@]}" \
    | grep -vxE '\.iOS\(\.v16\)|\.macOS\(\.v13\)|minSdk *= *24|IPHONEOS_DEPLOYMENT_TARGET=16\.0|MACOSX_DEPLOYMENT_TARGET=13\.0|iOS: "16\.0"' || true)"
[[ -z "$others" ]] || fail "other minimum OS versions: $(echo $others)"

echo "--- packaging: 3. Swift package: release script dry run, Package.swift files parse"
"$TS_PYTHON" scripts/lib/swift_syntax.py Package.swift bindings/Package.swift || fail "Package.swift does not parse"
bash scripts/release-apple.sh --dry-run || fail "scripts/release-apple.sh --dry-run"

echo "--- packaging: 4. Gradle files"
mapfile -t KTS < <(find android-sample -name '*.gradle.kts' -not -path '*/build/*' | sort)
"$TS_PYTHON" scripts/lib/kts_syntax.py "${KTS[@]}" || fail "a Gradle file does not parse"
LIB=android-sample/herald/build.gradle.kts
expect android-sample/settings.gradle.kts 'include\(":herald"' "includes :herald"
expect "$LIB" '^    id\("maven-publish"\)$' "applies maven-publish"
expect "$LIB" '^            groupId = "dev\.herald"$' "publishes group dev.herald"
expect "$LIB" '^            artifactId = "herald-android"$' "publishes artifact herald-android"
expect "$LIB" '^            version = heraldVersion$' "publishes the workspace version"
expect "$LIB" 'resolve\("Cargo\.toml"\)' "reads the version from Cargo.toml"
expect "$LIB" 'singleVariant\("release"\)' "publishes the release variant"
expect "$LIB" '^val abis = listOf\("arm64-v8a", "armeabi-v7a", "x86_64"\)$' "requires the three ABIs"
expect bindings/build-android.sh '^ABIS=\(arm64-v8a armeabi-v7a x86_64\)$' "builds the three ABIs"
expect bindings/build-android.sh 'elf_align\.py' "checks the 16 KB alignment"
expect bindings/build.rs 'max-page-size=16384' "links Android libraries for 16 KB pages"
JNA="$(sed -n 's/.*"net\.java\.dev\.jna:jna:\([0-9.]*\)@aar".*/\1/p' "$LIB")"
if [[ -z "$JNA" ]] || ! printf '5.17.0\n%s\n' "$JNA" | sort -C -V; then
    fail "$LIB: JNA '$JNA' (its Android AAR needs >= 5.17.0 for 16 KB pages)"
fi
echo "herald-android: dev.herald:herald-android:$VERSION, JNA $JNA"

echo "--- packaging: 5. 16 KB page-alignment check"
python3 scripts/lib/elf_align.py --self-test || fail "elf_align.py self-test"
python3 scripts/lib/elf_align.py --min 4096 "$FFI_LIB_DIR/libherald_ffi.so" || fail "elf_align.py cannot read $FFI_LIB_DIR/libherald_ffi.so"

((FAILED == 0)) || exit 1
echo "packaging: checks passed"
