#!/usr/bin/env bash
# Checks that the generated Swift parses: tree-sitter + tree-sitter-swift (PyPI) in a
# venv under .tools/, reports every ERROR / MISSING node, fails if there is any.
# Run bindings/generate.sh first.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SWIFT_DIR="${SWIFT_DIR:-$ROOT/bindings/generated/swift}"
source "$ROOT/scripts/lib/tools.sh"

shopt -s nullglob
files=("$SWIFT_DIR"/*.swift)
if (( ${#files[@]} == 0 )); then
    echo "no Swift files in $SWIFT_DIR; run bindings/generate.sh first" >&2
    exit 1
fi
ensure_tree_sitter
"$TS_PYTHON" "$ROOT/scripts/lib/swift_syntax.py" "${files[@]}"
