#!/usr/bin/env bash
# Observability checks (issue #16 items 3 and 4), bounded (~2 min on a warm build):
#   1. docs/prometheus/alerts.yml passes `promtool check rules`, and its unit tests
#      (docs/prometheus/alerts_test.yml: alerts fire, and only on the node at fault) pass
#      `promtool test rules` (Debian `prometheus`, installed here when missing);
#   2. docs/grafana/herald.json is an importable dashboard (JSON, panels with queries);
#   3. the `otel` feature compiles (`cargo check … --features herald-gateway/otel`).
# gateway/tests/system/observability.rs (JSON logs of the real binary, request ids through
# publish -> delivery -> push, the access log, the new metrics after real traffic, every
# metric the dashboard and the alerts use exported) runs with the workspace's tests.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

echo "--- observability: 1. promtool check rules"
if ! command -v promtool >/dev/null 2>&1; then
    if [[ "$(id -u)" != 0 ]]; then
        echo "observability: promtool missing and not root: install the Debian package prometheus" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 300 apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
timeout 60 promtool check rules docs/prometheus/alerts.yml
timeout 60 promtool test rules docs/prometheus/alerts_test.yml

echo "--- observability: 2. the Grafana dashboard"
python3 - <<'PY'
import json, sys
d = json.load(open("docs/grafana/herald.json"))
assert d.get("title") and d.get("uid"), "dashboard needs a title and a uid"
panels = d["panels"]
assert panels, "no panels"
ids = [p["id"] for p in panels]
assert len(ids) == len(set(ids)), "panel ids repeat"
for p in panels:
    assert p.get("targets"), f"panel {p['title']!r} has no query"
    for t in p["targets"]:
        assert "herald_" in t["expr"], f"panel {p['title']!r}: {t['expr']}"
names = {v["name"] for v in d["templating"]["list"]}
assert {"datasource", "instance"} <= names, names
print(f"dashboard: {len(panels)} panels")
PY

echo "--- observability: 3. cargo check --features otel"
# The workspace selection, as clippy's: the dependencies' check results are reused and
# only the otel crates and the gateway are checked (a `-p herald-gateway` selection
# would re-check everything under other features).
timeout 600 cargo check -q --workspace --all-targets --features herald-gateway/otel

echo "observability: all checks passed"
