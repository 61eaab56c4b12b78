#!/usr/bin/env bash
# Draws the PNGs of BENCHMARKS.md from the load generator's JSON reports:
#   bench/plot.sh [RESULTS_DIR]      (default bench/results; PNGs are written there)
# Installs matplotlib from PyPI into .tools/bench-venv the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.tools/bench-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'matplotlib>=3.8,<4'
fi
"$venv/bin/python" bench/plot.py "${1:-bench/results}"
