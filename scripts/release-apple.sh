#!/usr/bin/env bash
# Makes the Swift package of a release, so that Xcode's "Add Package Dependencies…" with
# this repository's URL works at the release tag:
#   1. builds HeraldFFI.xcframework (bindings/build-xcframework.sh: macOS + Xcode) and
#      zips it into dist/HeraldFFI.xcframework.zip;
#   2. writes into the root Package.swift the version (the workspace version of
#      Cargo.toml: one version for gateway, protocol and SDK), the zip's URL
#      ($HERALD_RELEASE_URL_BASE/v<version>/HeraldFFI.xcframework.zip) and its checksum
#      (SHA-256 of the zip, what `swift package compute-checksum` prints);
#   3. copies the generated Swift binding to swift/Sources/Herald/Herald.swift.
# Then commit those files, tag v<version>, and upload the zip to that URL (the steps are
# in README.md, "Releasing"). A real release also needs a "## <version>" section in
# CHANGELOG.md and a compatibility row for <major>.<minor>.x in README.md.
#
# Usage: HERALD_RELEASE_URL_BASE=https://github.com/OWNER/REPO/releases/download \
#            bash scripts/release-apple.sh
#        bash scripts/release-apple.sh --dry-run
# --dry-run runs anywhere (scripts/test.d/packaging.sh runs it in CI): the same steps with
# a stand-in XCFramework (the generated header and module map, no Apple libraries) into a
# temporary copy of Package.swift, then checks the result; it changes nothing here.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib/tools.sh"

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
die() {
    echo "release-apple: $*" >&2
    exit 1
}

VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
[[ "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || die "no workspace version in Cargo.toml"

if ((DRY_RUN)); then
    OUT="$(mktemp -d "${TMPDIR:-/tmp}/herald-release.XXXXXX")"
    trap '[[ $BASHPID != "$$" ]] || rm -rf "$OUT"' EXIT
    URL_BASE="https://example.invalid/releases/download"
    PKG_ROOT="$OUT/pkg"
    mkdir -p "$PKG_ROOT"
    cp Package.swift "$PKG_ROOT/"
    ensure_bindings
    XCF="$OUT/HeraldFFI.xcframework"
    mkdir -p "$XCF/stand-in/Headers"
    cp "$GEN_SWIFT_DIR/HeraldFFI.h" "$GEN_SWIFT_DIR/module.modulemap" "$XCF/stand-in/Headers/"
    printf '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict/></plist>\n' >"$XCF/Info.plist"
    ZIP="$OUT/dist/HeraldFFI.xcframework.zip"
    mkdir -p "$OUT/dist"
    (cd "$OUT" && python3 -m zipfile -c "$ZIP" HeraldFFI.xcframework)
    SWIFT_SRC="$GEN_SWIFT_DIR/Herald.swift"
else
    [[ "$(uname -s)" == Darwin ]] || die "a release needs macOS with Xcode (try --dry-run)"
    grep -qx "## $VERSION" CHANGELOG.md || die "CHANGELOG.md has no '## $VERSION' section (rename 'Unreleased')"
    grep -q "^| ${VERSION%.*}\.x |" README.md || die "README.md's compatibility table has no row for ${VERSION%.*}.x"
    URL_BASE="${HERALD_RELEASE_URL_BASE:?set HERALD_RELEASE_URL_BASE, e.g. https://github.com/OWNER/REPO/releases/download}"
    PKG_ROOT="$ROOT"
    bash bindings/build-xcframework.sh
    ZIP="$ROOT/dist/HeraldFFI.xcframework.zip"
    rm -rf "$ROOT/dist" && mkdir -p "$ROOT/dist"
    (cd bindings/apple && ditto -c -k --keepParent HeraldFFI.xcframework "$ZIP")
    SWIFT_SRC="$ROOT/bindings/apple/Sources/Herald/Herald.swift"
fi

CHECKSUM="$(python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$ZIP")"
URL="$URL_BASE/v$VERSION/HeraldFFI.xcframework.zip"
python3 - "$PKG_ROOT/Package.swift" "$VERSION" "$URL" "$CHECKSUM" <<'PY'
import re, sys
path, version, url, checksum = sys.argv[1:]
text = open(path).read()
for name, value in (("version", version), ("heraldFFIURL", url), ("heraldFFIChecksum", checksum)):
    text, n = re.subn(rf'^let {name} = "[^"]*"$', f'let {name} = "{value}"', text, flags=re.M)
    if n != 1:
        sys.exit(f"release-apple: Package.swift must have exactly one line `let {name} = \"…\"` (found {n})")
open(path, "w").write(text)
PY
mkdir -p "$PKG_ROOT/swift/Sources/Herald"
cp "$SWIFT_SRC" "$PKG_ROOT/swift/Sources/Herald/Herald.swift"

# What SwiftPM will read: the three values, the binary target on them, and Swift that parses.
grep -qx "let heraldFFIChecksum = \"$CHECKSUM\"" "$PKG_ROOT/Package.swift" || die "checksum not written"
grep -qx "let heraldFFIURL = \"$URL\"" "$PKG_ROOT/Package.swift" || die "URL not written"
grep -qx "let version = \"$VERSION\"" "$PKG_ROOT/Package.swift" || die "version not written"
grep -q '\.binaryTarget(name: "HeraldFFI", url: heraldFFIURL, checksum: heraldFFIChecksum)' "$PKG_ROOT/Package.swift" \
    || die "Package.swift has no binary target on heraldFFIURL/heraldFFIChecksum"
grep -q 'path: "swift/Sources/Herald"' "$PKG_ROOT/Package.swift" || die "the Herald target is not swift/Sources/Herald"
ensure_tree_sitter
"$TS_PYTHON" scripts/lib/swift_syntax.py "$PKG_ROOT/Package.swift" "$PKG_ROOT/swift/Sources/Herald/Herald.swift" \
    || die "the package's Swift does not parse"
python3 -m zipfile -l "$ZIP" | grep 'HeraldFFI.xcframework/' >/dev/null || die "the zip does not hold HeraldFFI.xcframework/"

if ((DRY_RUN)); then
    echo "release-apple --dry-run: v$VERSION, zip $(wc -c <"$ZIP") bytes, checksum $CHECKSUM written to a copy of Package.swift; nothing changed here"
else
    echo "Package.swift and swift/Sources/Herald/Herald.swift now name v$VERSION ($CHECKSUM)."
    echo "Next: git commit them, git tag v$VERSION, upload $ZIP to $URL"
fi
