#!/usr/bin/env bash
# The SDK for the JVM (desktop/server Kotlin or Java on this platform) as a Maven artifact,
# dev.herald:herald-jvm:<version>, laid out as a local Maven repository:
#   REPO/dev/herald/herald-jvm/<version>/herald-jvm-<version>.jar   the compiled Kotlin
#       binding (package dev.herald.sdk) + this host's libherald_ffi under JNA's resource
#       prefix (e.g. linux-x86-64/libherald_ffi.so), which JNA extracts and loads itself:
#       no -Djna.library.path
#   REPO/dev/herald/herald-jvm/<version>/herald-jvm-<version>.pom   depends on JNA and
#       kotlin-stdlib
# <version> is the workspace version of Cargo.toml (one version for gateway, protocol
# and SDK). Use it from Gradle with `repositories { maven(url = "REPO") }` (or REPO =
# ~/.m2/repository and mavenLocal()) and `implementation("dev.herald:herald-jvm:<version>")`.
# bindings/kotlin-tests/run.sh builds it and runs the Kotlin tests against it (CI).
# Usage: bash scripts/package-jvm.sh [--release] REPO
# (--release: the optimised library; default the debug one that the tests build anyway.)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib/tools.sh"

PROFILE=debug
if [[ "${1:-}" == "--release" ]]; then
    PROFILE=release
    shift
fi
REPO="${1:?usage: bash scripts/package-jvm.sh [--release] REPO}"
JNA_VERSION=5.17.0

VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
[[ -n "$VERSION" ]] || { echo "package-jvm: no [workspace.package] version in Cargo.toml" >&2; exit 1; }

# JNA's resource prefix of this host (com.sun.jna.Platform.RESOURCE_PREFIX).
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) PREFIX=linux-x86-64 LIB=libherald_ffi.so ;;
    Linux-aarch64) PREFIX=linux-aarch64 LIB=libherald_ffi.so ;;
    Darwin-arm64) PREFIX=darwin-aarch64 LIB=libherald_ffi.dylib ;;
    Darwin-x86_64) PREFIX=darwin-x86-64 LIB=libherald_ffi.dylib ;;
    *) echo "package-jvm: no JNA resource prefix known for $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac

ensure_kotlinc
ensure_jna
if [[ "$PROFILE" == release ]]; then
    bash bindings/generate.sh --release >/dev/null
else
    ensure_bindings
fi
LIB_PATH="$HERALD_TARGET_DIR/$PROFILE/$LIB"

DIR="$REPO/dev/herald/herald-jvm/$VERSION"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/herald-jvm.XXXXXX")"
trap '[[ $BASHPID != "$$" ]] || rm -rf "$STAGE"' EXIT
mkdir -p "$DIR" "$STAGE/classes/$PREFIX"
"$KOTLINC" -nowarn -cp "$JNA_JAR" -d "$STAGE/classes" "$GEN_KT" 2>&1 | grep -v '^warning:' || true
[[ -f "$STAGE/classes/dev/herald/sdk/HeraldClient.class" ]] || { echo "package-jvm: kotlinc failed on $GEN_KT" >&2; exit 1; }
cp "$LIB_PATH" "$STAGE/classes/$PREFIX/"
mkdir -p "$STAGE/classes/META-INF"
printf 'Manifest-Version: 1.0\nImplementation-Title: herald-jvm\nImplementation-Version: %s\n' "$VERSION" >"$STAGE/classes/META-INF/MANIFEST.MF"
rm -f "$DIR/herald-jvm-$VERSION.jar"
(cd "$STAGE/classes" && python3 -m zipfile -c "$DIR/herald-jvm-$VERSION.jar" META-INF dev "$PREFIX")
cat >"$DIR/herald-jvm-$VERSION.pom" <<POM
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.herald</groupId>
  <artifactId>herald-jvm</artifactId>
  <version>$VERSION</version>
  <name>Herald SDK for the JVM ($PREFIX)</name>
  <description>Herald notification client (Kotlin binding + $PREFIX native library)</description>
  <licenses>
    <license><name>Apache-2.0</name><url>https://www.apache.org/licenses/LICENSE-2.0</url></license>
  </licenses>
  <dependencies>
    <dependency>
      <groupId>net.java.dev.jna</groupId>
      <artifactId>jna</artifactId>
      <version>$JNA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.jetbrains.kotlin</groupId>
      <artifactId>kotlin-stdlib</artifactId>
      <version>$KOTLIN_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
python3 - "$DIR/herald-jvm-$VERSION.jar" "$DIR/herald-jvm-$VERSION.pom" <<'PY'
import hashlib, sys
for path in sys.argv[1:]:
    open(path + ".sha1", "w").write(hashlib.sha1(open(path, "rb").read()).hexdigest())
PY
echo "dev.herald:herald-jvm:$VERSION ($PREFIX, $PROFILE) in $REPO: $(cd "$DIR" && ls | tr '\n' ' ')"
