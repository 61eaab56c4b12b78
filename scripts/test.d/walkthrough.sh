#!/usr/bin/env bash
# Runs README.md's "Five-minute walkthrough" and "Device tokens from your backend" word
# for word, so the README stays true. The code blocks run are the ones README.md marks with
# `<!-- walkthrough: ROLE STEP -->`; nothing here retypes them. The only differences
# from a reader's run, all of them needed to run unattended next to other tests:
#   - the gateway listens on a free port: `127.0.0.1:8080` in the blocks becomes that port
#     (HERALD_LISTEN for the gateway itself);
#   - the blocks run in a temporary directory whose target/release/ is a link to the debug
#     build the test suite already made (a release build would cost ~10 more minutes);
#   - the reader's keyboard is a FIFO: Ctrl-C is SIGINT, "type into wscat" writes the
#     block to wscat's standard input;
#   - HERALD_JWT_SECRET, which the reader copies from the first-start banner, is read
#     from the gateway's output.
# After each step it checks what the README says the reader sees. Bounded: every wait
# has a deadline; the whole script takes about a minute once npm/PyPI packages are cached.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/lib/tools.sh"

step() { printf -- '--- walkthrough: %s\n' "$*"; }
die() {
    echo "walkthrough: FAILED: $*" >&2
    for f in "$WORK"/*.out "$WORK"/*.log; do
        [[ -s "$f" ]] || continue
        echo "----- $f" >&2
        tail -n 40 "$f" >&2
    done
    exit 1
}

WORK="$(test_work_dir readme-walkthrough)"
GROUPS_STARTED=()
cleanup() {
    main_shell_only || return 0
    exec 7>&- 2>/dev/null || true
    # Each background step runs in its own process group (setsid), ended by its id.
    for g in "${GROUPS_STARTED[@]}"; do
        kill -TERM -- "-$g" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# wait_grep FILE PATTERN SECONDS WHAT: fixed-string search, polled every 0.2 s.
wait_grep() {
    local file="$1" pattern="$2" seconds="$3" what="$4" i
    for ((i = 0; i < seconds * 5; i++)); do
        grep -qF -- "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.2
    done
    die "$what: no '$pattern' in $file after ${seconds} s"
}

# ctrl_c GROUP SECONDS: what the reader's Ctrl-C does (SIGINT to the foreground process
# group); waits for the group's leader to exit, sets LAST_RC to its exit code. The wait is
# a poll in this shell, not a watchdog subshell: bash runs the parent's EXIT trap in a
# subshell that is killed before it has reset its traps, and a watchdog killed just after
# its fork (herald-device exits within milliseconds of SIGINT) ran `cleanup`, removing
# $WORK under the running script (the CI failures of 2026-12-01 and -02).
ctrl_c() {
    local g="$1" seconds="$2" i
    LAST_RC=0
    kill -INT -- "-$g" 2>/dev/null || true
    for ((i = 0; i < seconds * 10; i++)); do
        kill -0 "$g" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$g" 2>/dev/null; then
        kill -KILL -- "-$g" 2>/dev/null || true
        wait "$g" 2>/dev/null || true
        die "process group $g still running ${seconds} s after Ctrl-C"
    fi
    wait "$g" || LAST_RC=$?
}

step "extract the README blocks"
BLOCKS="$WORK/blocks"
python3 - README.md "$BLOCKS" <<'EOF'
import os, re, sys
readme, out = sys.argv[1], sys.argv[2]
os.makedirs(out)
tag, block, found = None, None, []
for line in open(readme, encoding="utf-8"):
    m = re.match(r"<!-- walkthrough: (\w+) (\w+) -->\s*$", line)
    if m:
        tag = f"{m.group(1)}-{m.group(2)}"
    elif block is not None:
        if line.startswith("```"):
            open(os.path.join(out, tag), "w").write("".join(block))
            found.append(tag)
            tag, block = None, None
        else:
            block.append(line)
    elif tag and line.startswith("```"):
        block = []
print(" ".join(found))
EOF
for b in build-release gateway-serve backend-setup device-connect backend-hello type-ack backend-offline \
    device-reconnect device-sdk mint-python mint-node; do
    [[ -s "$BLOCKS/$b" ]] || die "README.md has no block marked '<!-- walkthrough: ${b/-/ } -->'"
done
grep -q "cargo build --release" "$BLOCKS/build-release" || die "the build block no longer builds release binaries"

step "binaries (debug build linked as target/release)"
bash scripts/build-debug.sh
mkdir -p "$WORK/run/target"
ln -s "$HERALD_TARGET_DIR/debug" "$WORK/run/target/release"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
H="http://127.0.0.1:$PORT"
block() { sed "s/127\.0\.0\.1:8080/127.0.0.1:$PORT/g" "$BLOCKS/$1"; }

# background NAME BLOCK [stdin]: runs the block in $WORK/run in its own process group.
# Terminal 3's shell keeps what its first block sourced, so its later blocks start with it.
background() {
    local name="$1" b="$2" input="${3:-/dev/null}" prefix=""
    [[ "$b" == device-connect || "$b" != device-* ]] || prefix="source .walkthrough.env"$'\n'
    (cd "$WORK/run" && exec setsid bash -c "$prefix$(block "$b")" <"$input" >"$WORK/$name.out" 2>&1) &
    GROUPS_STARTED+=("$!")
    LAST_GROUP=$!
}

# backend STEP: runs the block in this shell (its exports persist, like the reader's
# terminal 2), output in $WORK/STEP.out.
backend() {
    local b
    b="$(block "backend-$1")"
    # The blocks are the reader's interactive commands: none of this script's options.
    pushd "$WORK/run" >/dev/null
    set +eu +o pipefail
    { eval "$b"; } >"$WORK/$1.out" 2>&1
    local rc=$?
    set -euo pipefail
    popd >/dev/null
    sed 's/^/    /' "$WORK/$1.out"
    ((rc == 0)) || die "backend block '$1' exited $rc"
}

device_json() { curl -sS "$H/v1/devices/phone-1" -H "Authorization: Bearer $KEY"; }

step "terminal 1: the gateway"
HERALD_LISTEN="127.0.0.1:$PORT" background gateway gateway-serve
GW_GROUP=$LAST_GROUP
wait_grep "$WORK/gateway.out" "herald listening on $H" 60 "gateway start"
SECRET="$(sed -n 's/^device-token secret (HS256): *\([0-9a-f]*\).*/\1/p' "$WORK/gateway.out")"
[[ ${#SECRET} -eq 64 ]] || die "no 64-character device-token secret in the first-start banner"

step "terminal 2: API key and device token"
backend setup
[[ "$KEY" == hk_* ]] || die "KEY is not an API key: $KEY"
[[ "$TOKEN" =~ ^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]] || die "TOKEN is not a JWT: $TOKEN"
grep -qF "TOKEN=$TOKEN" "$WORK/run/.walkthrough.env" || die ".walkthrough.env does not carry TOKEN"
# TOKEN and H must come from the file, as in the reader's fresh terminal 3.
unset TOKEN
H_SAVED="$H"
unset H
export -n KEY

step "terminal 3: wscat connects"
mkfifo "$WORK/keyboard"
background device1 device-connect "$WORK/keyboard"
DEV_GROUP=$LAST_GROUP
exec 7>"$WORK/keyboard"
H="$H_SAVED"
wait_grep "$WORK/device1.out" '"type":"welcome"' 120 "wscat connect (npx fetches wscat the first time)"

step "terminal 2: publish; terminal 3 shows it"
backend hello
grep -qF '"recipients":1' "$WORK/hello.out" || die "publish did not reach one device"
wait_grep "$WORK/device1.out" '"data":{"text":"hello"}' 10 "live delivery"

step "terminal 3: type the ack, at reading speed"
# Longer than the default ack timeout (10 s): the walkthrough's gateway must wait for a
# reader, or wscat is closed with ack_timeout before this line arrives.
sleep 12
cat "$BLOCKS/type-ack" >&7
for ((i = 0; i < 50; i++)); do
    device_json | grep -qF '"acked_seq":1' && break
    sleep 0.2
done
device_json | grep -qF '"acked_seq":1' || die "the typed ack was not recorded: $(device_json)"
if grep -qE '"code":"ack_timeout"|Disconnected' "$WORK/device1.out"; then die "wscat was disconnected before the ack (ack_timeout?)"; fi

step "terminal 3: Ctrl-C"
exec 7>&-
ctrl_c "$DEV_GROUP" 10
for ((i = 0; i < 50; i++)); do
    device_json | grep -qF '"online":false' && break
    sleep 0.2
done

step "terminal 2: a message while offline, its record, the device"
backend offline
grep -qF '"text":"while you were away"' "$WORK/offline.out" || die "no message status for \$MSG"
grep -qE '"state":"(push_failed|queued)"' "$WORK/offline.out" || die "the offline message is neither push_failed nor queued"
# The push is decided just after the 202: a fast reader (this script) may still see queued.
for ((i = 0; i < 50; i++)); do
    STATUS="$(curl -sS "$H/v1/messages/$MSG" -H "Authorization: Bearer $KEY")"
    [[ "$STATUS" == *'"state":"push_failed"'* ]] && break
    sleep 0.2
done
[[ "$STATUS" == *'"reason":"no push token registered"'* ]] || die "no push_failed with its reason: $STATUS"
grep -qF '"online":false' "$WORK/offline.out" || die "the device is not offline"
grep -qF '"acked_seq":1' "$WORK/offline.out" || die "the device's acked_seq is not 1"

step "terminal 3: reconnect with after=1"
background device2 device-reconnect "$WORK/keyboard"
DEV_GROUP=$LAST_GROUP
exec 7>"$WORK/keyboard"
wait_grep "$WORK/device2.out" '"seq":2' 60 "catch-up on reconnect"
grep -qF '"text":"while you were away"' "$WORK/device2.out" || die "seq 2 is not the missed message"
if grep -qF '"seq":1,' "$WORK/device2.out"; then die "after=1 replayed seq 1"; fi
exec 7>&-
ctrl_c "$DEV_GROUP" 10

step "terminal 3: herald-device"
background device3 device-sdk
DEV_GROUP=$LAST_GROUP
wait_grep "$WORK/device3.out" '[push] registered Fcm token' 30 "herald-device push token"
wait_grep "$WORK/device3.out" 'data={"text":"while you were away"}' 30 "herald-device catch-up"
ctrl_c "$DEV_GROUP" 10
[[ -d "$WORK/run/herald-device-data/phone-1" ]] || die "herald-device kept no cursor in herald-device-data/"

step "device tokens from your backend: PyJWT and jsonwebtoken"
VENV="$HERALD_TOOLS/venv-walkthrough"
if ! "$VENV/bin/python" -c 'import jwt' 2>/dev/null; then
    echo "installing PyJWT (PyPI) into $VENV"
    mkdir -p "$HERALD_TOOLS"
    python3 -m venv "$VENV" || die "python3 -m venv failed; install python3-venv"
    timeout 300 "$VENV/bin/pip" install --quiet --disable-pip-version-check pyjwt || die "pip install pyjwt failed"
fi
NODE_DIR="$HERALD_TOOLS/node-walkthrough"
if [[ ! -d "$NODE_DIR/node_modules/jsonwebtoken" ]]; then
    echo "installing jsonwebtoken (npm) into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    timeout 300 npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" jsonwebtoken@9 >/dev/null \
        || die "npm install jsonwebtoken failed"
fi
KEY_SAVED="$KEY"
sync_status() { # TOKEN -> HTTP status of a device route
    curl -sS -o "$WORK/sync.out" -w '%{http_code}' "$H/v1/me/sync?device_id=phone-1" -H "Authorization: Bearer $1"
}
PY_TOKEN="$(HERALD_JWT_SECRET="$SECRET" "$VENV/bin/python" "$BLOCKS/mint-python")" || die "the Python example failed"
[[ "$(sync_status "$PY_TOKEN")" == 200 ]] || die "the Python example's token was refused: $(cat "$WORK/sync.out")"
grep -qF 'while you were away' "$WORK/sync.out" || die "sync with the Python token did not return alice's messages"
NODE_TOKEN="$(HERALD_JWT_SECRET="$SECRET" NODE_PATH="$NODE_DIR/node_modules" node "$BLOCKS/mint-node")" || die "the Node example failed"
[[ "$(sync_status "$NODE_TOKEN")" == 200 ]] || die "the Node example's token was refused: $(cat "$WORK/sync.out")"
# The mistake the README warns about must fail, or the check above proves nothing.
HEX_TOKEN="$(HERALD_JWT_SECRET="$SECRET" "$VENV/bin/python" -c '
import os, sys
src = open(sys.argv[1]).read().replace("os.environ[\"HERALD_JWT_SECRET\"]", "bytes.fromhex(os.environ[\"HERALD_JWT_SECRET\"])")
exec(src)' "$BLOCKS/mint-python")"
[[ "$(sync_status "$HEX_TOKEN")" == 401 ]] || die "a token signed with the hex-decoded secret was not refused"
KEY="$KEY_SAVED"

step "terminal 1: Ctrl-C stops the gateway"
ctrl_c "$GW_GROUP" 20
((LAST_RC == 0)) || die "the gateway exited $LAST_RC after Ctrl-C"
echo "walkthrough: README.md's walkthrough and token examples ran as written"
