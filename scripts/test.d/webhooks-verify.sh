#!/usr/bin/env bash
# Runs docs/webhooks.md's Python and Node signature-verification snippets, extracted
# from the page (the first ```python and the first ```js block; nothing is retyped
# here), against a webhook POST the gateway really signed: the test
# `a_real_signed_post_for_the_docs_snippets` (gateway/tests/system/webhooks.rs) writes its body,
# Herald-Signature header and secret to $HERALD_WEBHOOK_FIXTURE_DIR. Each snippet must
# accept it and refuse a tampered body and a wrong secret. Bounded: about 10 s once the
# test binary is built (the suite built it already).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

die() { echo "webhooks-verify: FAILED: $*" >&2; exit 1; }

for tool in python3 node; do
    if ! command -v "$tool" >/dev/null; then
        pkg=$([[ $tool == node ]] && echo nodejs || echo python3)
        echo "installing $pkg (apt-get)" >&2
        { apt-get update >/dev/null && apt-get install -y "$pkg" >/dev/null; } \
            || die "$tool is missing and apt-get could not install $pkg"
    fi
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/webhooks-verify.XXXXXX")"
trap '[[ $BASHPID != "$$" ]] || rm -rf "$WORK"' EXIT

HERALD_WEBHOOK_FIXTURE_DIR="$WORK/fixture" timeout 600 \
    cargo nextest run --workspace --no-fail-fast \
    -E 'binary_id(herald-gateway::system) & test(webhooks::a_real_signed_post_for_the_docs_snippets)' \
    || die "the fixture test failed"
for f in body.json signature.txt secret.txt; do
    [[ -s "$WORK/fixture/$f" ]] || die "the fixture test wrote no $f"
done

snippet() { # first ```$1 block of docs/webhooks.md
    awk -v lang="$1" '$0 == "```" lang {f=1; next} f && $0 == "```" {exit} f' docs/webhooks.md
}
snippet python >"$WORK/verify.py"
snippet js >"$WORK/verify.js"
[[ -s "$WORK/verify.py" && -s "$WORK/verify.js" ]] || die "no python/js snippet in docs/webhooks.md"

cat >>"$WORK/verify.py" <<'PY'


import pathlib
import sys

d = pathlib.Path(sys.argv[1])
secret = d.joinpath("secret.txt").read_text()
header = d.joinpath("signature.txt").read_text()
body = d.joinpath("body.json").read_bytes()
assert verify(secret, header, body), "the gateway's signature was refused"
assert not verify(secret, header, body.replace(b'"phone"', b'"phono"')), "a tampered body was accepted"
assert not verify("wrong-" + secret, header, body), "a wrong secret was accepted"
print("python snippet: ok")
PY
cat >>"$WORK/verify.js" <<'JS'

const fs = require("node:fs");
const path = require("node:path");
const d = process.argv[2];
const secret = fs.readFileSync(path.join(d, "secret.txt"), "utf8");
const header = fs.readFileSync(path.join(d, "signature.txt"), "utf8");
const body = fs.readFileSync(path.join(d, "body.json"));
const tampered = Buffer.from(body.toString("utf8").replace('"phone"', '"phono"'));
if (!verify(secret, header, body)) throw new Error("the gateway's signature was refused");
if (verify(secret, header, tampered)) throw new Error("a tampered body was accepted");
if (verify("wrong-" + secret, header, body)) throw new Error("a wrong secret was accepted");
console.log("node snippet: ok");
JS

timeout 30 python3 "$WORK/verify.py" "$WORK/fixture" || die "the Python snippet"
timeout 30 node "$WORK/verify.js" "$WORK/fixture" || die "the Node snippet"
echo "webhooks-verify: both snippets verify a real Herald-Signature"
