"""Parses Gradle Kotlin DSL files (*.gradle.kts) with tree-sitter-kotlin; reports every
ERROR / MISSING node. Usage: python kts_syntax.py FILE.gradle.kts...  (exit 1 on any).
A syntax check only: without Gradle and the Android SDK nothing here resolves the
plugins or evaluates the scripts. Used by scripts/test.d/packaging.sh.
"""
import sys

import tree_sitter_kotlin
from tree_sitter import Language, Parser

lang = Language(tree_sitter_kotlin.language())
try:
    parser = Parser(lang)
except TypeError:  # older py-tree-sitter
    parser = Parser()
    parser.set_language(lang)

problems = 0
for path in sys.argv[1:]:
    text = open(path, "rb").read()
    tree = parser.parse(text)
    lines = text.decode("utf-8").splitlines()
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
    print(f"{path}: {len(lines)} lines, {nodes} nodes parsed")
if problems:
    print(f"FAILED: {problems} Kotlin syntax problem(s) (see above)")
    sys.exit(1)
print(f"Kotlin (Gradle) syntax OK ({len(sys.argv) - 1} files)")
