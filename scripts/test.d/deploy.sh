#!/usr/bin/env bash
# Deployment artefacts (issue #16 item 5), checked without Docker Hub:
#   1. deploy/compose.yml is valid (`docker compose config`, or Debian 12's
#      `docker-compose` 1.29 when the v2 plugin is missing) and describes 3 Herald nodes
#      on PostgreSQL + NATS behind the load balancer; it refuses to run without a password;
#   2. deploy/haproxy.cfg is valid (`haproxy -c`, Debian's haproxy);
#   3. the Dockerfile names what docs/deploy.md says (the image itself cannot be built
#      here: no access to Docker Hub);
#   4. the .deb: cargo-deb packages the `herald` binary the test suite built, dpkg
#      installs it (user, config as conffile, unit), `systemd-analyze verify` accepts the
#      installed unit, the unit's ExecStartPre/ExecStart run as the herald user the way
#      systemd would (systemd is not PID 1 here) and /readyz answers, then it is purged
#      and leaves nothing behind.
# Needs root (apt-get, dpkg). Bounded: every wait has a deadline; ~1 minute once
# cargo-deb is installed (its first `cargo install` takes a few minutes).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

step() { printf -- '--- deploy: %s\n' "$*"; }
die() {
    echo "deploy: FAILED: $*" >&2
    for f in "${WORK:-/nonexistent}"/*.log; do
        [[ -s "$f" ]] && { echo "----- $f" >&2; tail -n 30 "$f" >&2; }
    done
    exit 1
}
need_root() { [[ $(id -u) == 0 ]] || die "needs root (apt-get, dpkg -i); run it as root"; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/herald-deploy.XXXXXX")"
SERVER_PID=""
PURGE=0
POLICY_ADDED=0
cleanup() {
    [[ $BASHPID == "$$" ]] || return 0 # not in a subshell (see main_shell_only in scripts/lib/tools.sh)
    [[ -n "$SERVER_PID" ]] && kill -TERM "$SERVER_PID" 2>/dev/null || true
    [[ $PURGE == 1 ]] && dpkg --purge herald >/dev/null 2>&1 || true
    [[ $POLICY_ADDED == 1 ]] && rm -f /usr/sbin/policy-rc.d
    rm -rf "$WORK"
}
trap cleanup EXIT

apt_install() {
    need_root
    # Never start the services these packages bring (haproxy) on the test machine.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        POLICY_ADDED=1
    fi
    echo "installing $* (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >"$WORK/apt.log" 2>&1 \
        || { apt-get update >>"$WORK/apt.log" 2>&1 \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >>"$WORK/apt.log" 2>&1; } \
        || die "apt-get install $* failed"
}

# ---- 1. compose ----------------------------------------------------------------------
step "deploy/compose.yml"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    command -v docker-compose >/dev/null || apt_install docker-compose
    COMPOSE=(docker-compose)
fi
# `head -1` would close the pipe while docker-compose 1.29 still writes its other
# lines: SIGPIPE, exit 141 under pipefail (seen in CI). sed reads to the end.
"${COMPOSE[@]}" version | sed -n 1p
HERALD_DB_PASSWORD=ci-check timeout 60 "${COMPOSE[@]}" -f deploy/compose.yml config >"$WORK/compose.out" 2>"$WORK/compose.log" \
    || die "compose config refused deploy/compose.yml"
python3 -c 'import yaml' 2>/dev/null || apt_install python3-yaml
python3 - "$WORK/compose.out" <<'EOF' || die "deploy/compose.yml does not describe the cluster docs/deploy.md promises"
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
s = c["services"]
nodes = [n for n in s if n.startswith("herald-")]
assert sorted(nodes) == ["herald-1", "herald-2", "herald-3"], nodes
for n in nodes:
    env = s[n]["environment"]
    assert env["HERALD_STORE"] == "postgres" and env["HERALD_BUS"] == "nats", env
    assert env["HERALD_DATABASE_URL"].startswith("postgres://herald:ci-check@postgres:5432/"), env
    assert env["HERALD_NATS__URL"] == "nats://nats:4222", env
    assert s[n]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s[n]["build"]["dockerfile"] == "Dockerfile"
assert "--jetstream" in s["nats"]["command"], s["nats"]
assert s["postgres"]["environment"]["POSTGRES_PASSWORD"] == "ci-check"
lb = s["lb"]
assert any(str(p).endswith("8080") or "8080" in str(p) for p in lb["ports"]), lb
assert any("haproxy.cfg" in str(v) for v in lb["volumes"]), lb
print("compose: 3 herald nodes (postgres + nats), postgres, nats (JetStream), lb")
EOF
if env -u HERALD_DB_PASSWORD "${COMPOSE[@]}" -f deploy/compose.yml config >/dev/null 2>"$WORK/nopw.log"; then
    die "compose.yml must refuse to run without HERALD_DB_PASSWORD"
fi
grep -q "HERALD_DB_PASSWORD" "$WORK/nopw.log" || die "no word of HERALD_DB_PASSWORD when it is missing"

# ---- 2. load balancer ----------------------------------------------------------------
step "deploy/haproxy.cfg"
command -v haproxy >/dev/null || apt_install haproxy
timeout 30 haproxy -c -f deploy/haproxy.cfg >"$WORK/haproxy.log" 2>&1 || die "haproxy -c refused deploy/haproxy.cfg"
for want in "option httpchk GET /readyz" "timeout tunnel" "X-Forwarded-For %\[src\]" "server herald-3"; do
    grep -q "$want" deploy/haproxy.cfg || die "deploy/haproxy.cfg lacks '$want'"
done

# ---- 3. Dockerfile -------------------------------------------------------------------
step "Dockerfile (not built: no Docker Hub here)"
for want in "^FROM rust:1-bookworm AS build" "cargo build --release --locked -p herald-gateway" \
    "^FROM debian:bookworm-slim" "^USER herald" '^VOLUME \["/var/lib/herald"\]' \
    '^HEALTHCHECK .*' 'CMD \["herald", "healthcheck"\]' '^ENTRYPOINT \["herald"\]'; do
    grep -qE "$want" Dockerfile || die "Dockerfile: no line matches /$want/"
done
grep -qx "target/" .dockerignore || die ".dockerignore must keep target/ out of the build context"

# ---- 4. the .deb ---------------------------------------------------------------------
step ".deb (cargo-deb)"
need_root
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb (cargo install --locked)" >&2
    cargo install --locked cargo-deb >"$WORK/cargo-install.log" 2>&1 || die "cargo install cargo-deb failed"
fi
cargo deb --version
# The debug build scripts/test.sh made (a release build would cost ~10 minutes more),
# put where cargo-deb looks for the release binary (`assets` in gateway/Cargo.toml):
# `cargo deb -p herald-gateway` builds and packages the release binary itself.
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ -x "$TARGET/debug/herald" ]] || bash scripts/build-debug.sh
mkdir -p "$WORK/target/release"
cp "$TARGET/debug/herald" "$WORK/target/release/herald"
CARGO_TARGET_DIR="$WORK/target" timeout 300 cargo deb -p herald-gateway --no-build \
    --output "$WORK/herald.deb" >"$WORK/cargo-deb.log" 2>&1 || die "cargo deb failed"
rm -f "$WORK/target/release/herald"
dpkg-deb --info "$WORK/herald.deb" >"$WORK/info.txt"
dpkg-deb --contents "$WORK/herald.deb" >"$WORK/contents.txt"
for f in ./usr/bin/herald ./etc/herald/herald.toml herald.service ./usr/share/doc/herald/configuration.md; do
    grep -q "$f" "$WORK/contents.txt" || die "the .deb lacks $f: $(cat "$WORK/contents.txt")"
done
dpkg-deb --ctrl-tarfile "$WORK/herald.deb" | tar -xO ./conffiles | grep -qx /etc/herald/herald.toml \
    || die "/etc/herald/herald.toml is not a conffile"

dpkg --purge herald >/dev/null 2>&1 || true
PURGE=1
dpkg -i "$WORK/herald.deb" >"$WORK/dpkg.log" 2>&1 || die "dpkg -i failed"
getent passwd herald >/dev/null || die "postinst did not create the herald user"
[[ "$(stat -c '%U:%G %a' /etc/herald/herald.toml)" == "root:herald 640" ]] \
    || die "/etc/herald/herald.toml is $(stat -c '%U:%G %a' /etc/herald/herald.toml), not root:herald 640"
[[ "$(stat -c '%U' /var/lib/herald)" == herald ]] || die "/var/lib/herald is not owned by herald"
UNIT=$(dpkg -L herald | grep '/herald.service$' | sed -n 1p)
[[ -n "$UNIT" ]] || die "no herald.service installed"
command -v systemd-analyze >/dev/null || apt_install systemd
timeout 30 systemd-analyze verify "$UNIT" >"$WORK/verify.log" 2>&1 \
    || die "systemd-analyze verify $UNIT: $(cat "$WORK/verify.log")"
echo "systemd-analyze verify $UNIT: ok"

# What the unit runs, as the unit runs it (User=herald, WorkingDirectory, Environment),
# but on a free port: port 8080 may be someone else's on a test machine.
# setpriv execs (runuser forks and turns SIGTERM into its own non-zero exit), so the
# exit status checked below is herald's own.
AS_HERALD=(setpriv --reuid=herald --regid=herald --init-groups env HERALD_DATA_DIR=/var/lib/herald)
grep -q '^ExecStartPre=/usr/bin/herald config check --config /etc/herald/herald.toml$' "$UNIT" \
    || die "the unit's ExecStartPre is not the config check this script runs"
grep -q '^ExecStart=/usr/bin/herald serve --config /etc/herald/herald.toml$' "$UNIT" \
    || die "the unit's ExecStart is not the command this script runs"
(cd /var/lib/herald && "${AS_HERALD[@]}" /usr/bin/herald config check --config /etc/herald/herald.toml) \
    >"$WORK/check.log" 2>&1 || die "herald config check refused the installed config"
(cd /var/lib/herald && exec "${AS_HERALD[@]}" HERALD_LISTEN=127.0.0.1:0 \
    /usr/bin/herald serve --config /etc/herald/herald.toml) >"$WORK/serve.out" 2>"$WORK/serve.log" &
SERVER_PID=$!
URL=""
for _ in $(seq 1 150); do
    URL=$(sed -n 's/^herald listening on //p' "$WORK/serve.out" | head -1)
    [[ -n "$URL" ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "the installed herald exited at start"
    sleep 0.2
done
[[ -n "$URL" ]] || die "the installed herald did not listen within 30 s"
READY=$(curl -sS --max-time 5 -w ' %{http_code}' "$URL/readyz") || die "GET $URL/readyz failed"
[[ "$READY" == *"ready"*" 200" ]] || die "GET $URL/readyz answered: $READY"
/usr/bin/herald healthcheck --url "$URL" >/dev/null || die "herald healthcheck failed against $URL"
[[ "$(stat -c '%U' /var/lib/herald/herald.db)" == herald ]] || die "the store is not the herald user's"
kill -TERM "$SERVER_PID"
for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
kill -0 "$SERVER_PID" 2>/dev/null && die "herald did not stop within 20 s of SIGTERM"
wait "$SERVER_PID" || die "herald exited non-zero after SIGTERM"
SERVER_PID=""
echo "installed herald: /readyz $READY, stopped cleanly"

dpkg --purge herald >"$WORK/purge.log" 2>&1 || die "dpkg --purge failed"
PURGE=0
for gone in /usr/bin/herald /etc/herald /var/lib/herald "$UNIT"; do
    [[ ! -e "$gone" ]] || die "$gone is left after purge"
done
step "ok"
