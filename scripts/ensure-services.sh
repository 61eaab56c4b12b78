#!/usr/bin/env bash
# Makes sure the services the test suite needs are running on this machine:
#   - PostgreSQL on 127.0.0.1:5432, reachable as postgres://postgres@127.0.0.1:5432/test
#     (gateway/tests/system/store_conformance.rs; override with HERALD_TEST_DATABASE_URL, in
#     which case only that URL is checked and no local server is managed);
#   - NATS (with JetStream) on 127.0.0.1:4222.
# Starts what is installed but stopped, installs what is missing (apt-get), and exits
# non-zero with the reason when it cannot. Safe to run repeatedly.
set -euo pipefail

PG_PORT=5432
NATS_PORT=4222
DEFAULT_TEST_URL="postgres://postgres@127.0.0.1:${PG_PORT}/test"

log() { printf 'ensure-services: %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# Runs a command as root (directly, or through password-less sudo).
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    log "installing $* (apt-get)"
    if ! as_root env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q "$@" >&2; then
        as_root env DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -q >&2 || return 1
        as_root env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q "$@" >&2 || return 1
    fi
}

# wait_for SECONDS CMD...: polls CMD once a second.
wait_for() {
    local seconds=$1
    shift
    for _ in $(seq "$seconds"); do
        "$@" && return 0
        sleep 1
    done
    "$@"
}

pg_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h 127.0.0.1 -p "$PG_PORT"
    else
        port_open 127.0.0.1 "$PG_PORT"
    fi
}

pg_url_works() { psql "$1" -Atq -c 'SELECT 1' >/dev/null 2>&1; }

# psql as the postgres OS user over the local socket (peer/trust auth).
psql_superuser() { as_root su postgres -s /bin/sh -c "psql -p $PG_PORT -Atq $(printf '%q ' "$@")"; }

ensure_postgres() {
    if [ -n "${HERALD_TEST_DATABASE_URL:-}" ]; then
        command -v psql >/dev/null 2>&1 || apt_install postgresql-client ||
            die "psql is missing and could not be installed; cannot check HERALD_TEST_DATABASE_URL"
        pg_url_works "$HERALD_TEST_DATABASE_URL" ||
            die "cannot connect to HERALD_TEST_DATABASE_URL ($(psql "$HERALD_TEST_DATABASE_URL" -c 'SELECT 1' 2>&1 | head -n1))"
        log "PostgreSQL at HERALD_TEST_DATABASE_URL answers"
        return
    fi

    local fresh=0
    if ! pg_ready; then
        if ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
            apt_install postgresql ||
                die "PostgreSQL is not installed and apt-get install postgresql failed (need root or password-less sudo)"
            fresh=1
        fi
        local version
        version=$(ls /etc/postgresql | sort -V | tail -n1)
        log "starting PostgreSQL $version/main"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 ||
            log "pg_ctlcluster start returned an error (it may already be starting)"
        wait_for 30 pg_ready ||
            die "PostgreSQL does not accept connections on 127.0.0.1:$PG_PORT (see /var/log/postgresql/)"
    fi
    log "PostgreSQL is accepting connections on 127.0.0.1:$PG_PORT"

    command -v psql >/dev/null 2>&1 || apt_install postgresql-client ||
        die "psql is missing and could not be installed"
    if pg_url_works "$DEFAULT_TEST_URL"; then
        return
    fi
    # The server is up but the tests' URL does not work yet: create the database and,
    # on a cluster this script just installed, let local TCP clients in without a
    # password (a throwaway test server; existing clusters are not reconfigured).
    if [ "$(psql_superuser -c "SELECT 1 FROM pg_database WHERE datname = 'test'" 2>/dev/null)" != 1 ]; then
        log "creating database test"
        psql_superuser -c "CREATE DATABASE test" >&2 || true
    fi
    if ! pg_url_works "$DEFAULT_TEST_URL" && [ "$fresh" = 1 ]; then
        local hba
        hba=$(psql_superuser -c "SHOW hba_file")
        log "allowing trust authentication for 127.0.0.1 in $hba (freshly installed test server)"
        as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
        psql_superuser -c "SELECT pg_reload_conf()" >/dev/null
        sleep 1
    fi
    pg_url_works "$DEFAULT_TEST_URL" ||
        die "PostgreSQL runs but $DEFAULT_TEST_URL is refused ($(psql "$DEFAULT_TEST_URL" -c 'SELECT 1' 2>&1 | head -n1)). Allow it (pg_hba.conf: 'host all all 127.0.0.1/32 trust') or set HERALD_TEST_DATABASE_URL."
}

ensure_nats() {
    if port_open 127.0.0.1 "$NATS_PORT"; then
        log "NATS is listening on 127.0.0.1:$NATS_PORT"
        return
    fi
    local bin
    bin=$(command -v nats-server || true)
    [ -z "$bin" ] && [ -x /usr/sbin/nats-server ] && bin=/usr/sbin/nats-server
    if [ -z "$bin" ]; then
        apt_install nats-server || die "nats-server is not installed and apt-get install nats-server failed"
        bin=$(command -v nats-server || echo /usr/sbin/nats-server)
    fi
    local store_dir=/var/lib/nats-server log_file=/var/log/nats-server.log
    if ! as_root mkdir -p "$store_dir" 2>/dev/null; then
        store_dir="${TMPDIR:-/tmp}/herald-nats-server"
        log_file="${TMPDIR:-/tmp}/herald-nats-server.log"
        mkdir -p "$store_dir"
    fi
    log "starting $bin on 127.0.0.1:$NATS_PORT (JetStream in $store_dir)"
    local starter=(start-stop-daemon --start --oknodo --background
        --make-pidfile --pidfile "${TMPDIR:-/tmp}/herald-nats-server.pid"
        --exec "$bin" -- -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$store_dir" -l "$log_file")
    as_root "${starter[@]}" >&2 || "${starter[@]}" >&2 ||
        die "could not start nats-server"
    wait_for 15 port_open 127.0.0.1 "$NATS_PORT" ||
        die "nats-server did not start listening on 127.0.0.1:$NATS_PORT (see $log_file; or run it by hand: $bin -a 127.0.0.1 -p $NATS_PORT -js -sd $store_dir)"
    log "NATS is listening on 127.0.0.1:$NATS_PORT"
}

ensure_postgres
ensure_nats
log "all services up"
