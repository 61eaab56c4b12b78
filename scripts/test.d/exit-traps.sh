#!/usr/bin/env bash
# Every EXIT trap of the repository's shell scripts runs only in the script's own shell
# (scripts/lib/check_exit_traps.py says why). The check must also fail on a script
# without the guard, or it proves nothing: it runs on a bad sample first.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
CHECK=scripts/lib/check_exit_traps.py

sample="$(mktemp "${TMPDIR:-/tmp}/exit-trap-sample.XXXXXX")"
trap '[[ $BASHPID != "$$" ]] || rm -f "$sample"' EXIT
printf 'cleanup() {\n    rm -rf "$WORK"\n}\ntrap cleanup EXIT\ntrap '"'"'rm -rf "$X"'"'"' EXIT\n' >"$sample"
if out="$(python3 "$CHECK" "$sample")" || [[ $(grep -c . <<<"$out") -ne 2 ]]; then
    echo "exit-traps: FAILED: the check did not find both unguarded traps of its sample: $out" >&2
    exit 1
fi

mapfile -t SCRIPTS < <(git ls-files '*.sh')
(( ${#SCRIPTS[@]} > 0 )) || { echo "exit-traps: FAILED: no shell scripts found (not a git checkout?)" >&2; exit 1; }
python3 "$CHECK" "${SCRIPTS[@]}" || {
    echo "exit-traps: FAILED: guard the traps above (see scripts/lib/check_exit_traps.py)" >&2
    exit 1
}
echo "exit-traps: ${#SCRIPTS[@]} scripts, every EXIT trap guarded"
