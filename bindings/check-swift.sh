#!/usr/bin/env bash
# Checks that the generated Swift parses: tree-sitter + tree-sitter-swift (PyPI) in a
# venv under .tools/, reports every ERROR / MISSING node, fails if there is any.
# Run bindings/generate.sh first.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SWIFT_DIR="${SWIFT_DIR:-$ROOT/bindings/generated/swift}"
VENV="$ROOT/.tools/venv-swift-check"

shopt -s nullglob
files=("$SWIFT_DIR"/*.swift)
if (( ${#files[@]} == 0 )); then
    echo "no Swift files in $SWIFT_DIR; run bindings/generate.sh first" >&2
    exit 1
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    mkdir -p "$ROOT/.tools"
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import tree_sitter, tree_sitter_swift' 2>/dev/null; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check tree-sitter tree-sitter-swift
fi

"$VENV/bin/python" - "${files[@]}" <<'PY'
import sys
import tree_sitter_swift
from tree_sitter import Language, Parser

lang = Language(tree_sitter_swift.language())
try:
    parser = Parser(lang)
except TypeError:  # older py-tree-sitter
    parser = Parser()
    parser.set_language(lang)

import re

# Valid Swift that the tree-sitter-swift grammar cannot parse. Each rewrite keeps the
# line count (so reported positions stay true) and the meaning; anything else that
# fails to parse is reported.
KNOWN_GRAMMAR_GAPS = [
    # An attribute wrapped in `#if swift(>=5.8)` ... `#endif` (conditional attribute,
    # as UniFFI emits for `@_documentation`): keep the attribute, blank the directives.
    (re.compile(r"^([ \t]*)#if swift\(>=5\.8\)\n([ \t]*@_documentation\(visibility: private\))\n[ \t]*#endif$", re.M),
     lambda m: "\n" + m.group(2) + "\n"),
    # `{ () }`: a closure returning the empty tuple; the grammar has no `()` expression.
    (re.compile(r"\{ \(\) \}"), lambda m: "{ }"),
]

problems = 0
for path in sys.argv[1:]:
    text = open(path, "rb").read().decode("utf-8")
    rewrites = 0
    for pattern, repl in KNOWN_GRAMMAR_GAPS:
        text, n = pattern.subn(repl, text)
        rewrites += n
    src = text.encode("utf-8")
    tree = parser.parse(src)
    lines = text.splitlines()
    print(f"{path}: {rewrites} known tree-sitter-swift grammar gaps normalised")
    stack = [tree.root_node]
    nodes = 0
    while stack:
        node = stack.pop()
        nodes += 1
        if node.type == "ERROR" or node.is_missing:
            problems += 1
            row, col = node.start_point
            kind = "MISSING " + node.type if node.is_missing else "ERROR"
            text = lines[row].strip() if row < len(lines) else ""
            print(f"{path}:{row + 1}:{col + 1}: {kind}: {text[:120]}")
        stack.extend(node.children)
    print(f"{path}: {len(lines)} lines, {nodes} nodes parsed")
if problems:
    print(f"FAILED: {problems} syntax problem(s)")
    sys.exit(1)
print("Swift syntax OK")
PY
