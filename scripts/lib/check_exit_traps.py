"""Checks that every EXIT trap in the given shell scripts runs only in the script's own
shell. Bash runs the parent's EXIT trap in a subshell killed right after its fork
(before it has reset its traps); a cleanup that removes the work directory then runs
under the still-running script (the README walkthrough lost its directory that way in
CI). So a trap's handler must check `$BASHPID` against `$$` first: inline, or as the
first line of the function it names (`main_shell_only || return 0`, scripts/lib/tools.sh).

Usage: python3 check_exit_traps.py FILE... ; exits 1 and names file:line for each
unguarded trap."""
import re
import sys

GUARD = re.compile(r"BASHPID|main_shell_only")
TRAP = re.compile(r"""^\s*trap\s+(?P<handler>'[^']*'|"[^"]*"|\S+)\s+(?:\S+\s+)*EXIT\b""")


def problems(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    for no, line in enumerate(lines, 1):
        m = TRAP.match(line)
        if not m:
            continue
        handler = m.group("handler")
        if handler[0] in "'\"":
            if not GUARD.search(handler):
                yield f"{path}:{no}: inline EXIT trap without a $BASHPID check"
            continue
        body = None
        for i, l in enumerate(lines):
            if re.match(rf"^\s*(function\s+)?{re.escape(handler)}\s*\(\)\s*\{{\s*$", l):
                body = next((b for b in lines[i + 1:] if b.strip() and not b.strip().startswith("#")), "")
                break
        if body is None:
            yield f"{path}:{no}: EXIT trap calls {handler}, which is not defined in this file"
        elif not GUARD.search(body):
            yield f"{path}:{no}: {handler}() must start with `main_shell_only || return 0` (or a $BASHPID check)"


found = [p for f in sys.argv[1:] for p in problems(f)]
for p in found:
    print(p)
sys.exit(1 if found else 0)
