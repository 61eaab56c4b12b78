"""Parses Swift files with tree-sitter-swift; reports every ERROR / MISSING node.

Usage: python swift_syntax.py FILE.swift...  (exit 1 on any syntax problem). Used by
bindings/check-swift.sh (the generated binding) and scripts/test.d/samples.sh (the iOS
sample). A syntax check, not a type check: this machine has no Swift toolchain.
"""
import re
import sys

import tree_sitter_swift
from tree_sitter import Language, Parser

lang = Language(tree_sitter_swift.language())
try:
    parser = Parser(lang)
except TypeError:  # older py-tree-sitter
    parser = Parser()
    parser.set_language(lang)

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
    tree = parser.parse(text.encode("utf-8"))
    lines = text.splitlines()
    stack = [tree.root_node]
    nodes = 0
    while stack:
        node = stack.pop()
        nodes += 1
        if node.type == "ERROR" or node.is_missing:
            problems += 1
            row, col = node.start_point
            kind = "MISSING " + node.type if node.is_missing else "ERROR"
            line = lines[row].strip() if row < len(lines) else ""
            print(f"{path}:{row + 1}:{col + 1}: {kind}: {line[:120]}")
        stack.extend(node.children)
    gaps = f", {rewrites} known grammar gaps normalised" if rewrites else ""
    print(f"{path}: {len(lines)} lines, {nodes} nodes parsed{gaps}")
if problems:
    print(f"FAILED: {problems} Swift syntax problem(s) (see above)")
    sys.exit(1)
print(f"Swift syntax OK ({len(sys.argv) - 1} files)")
