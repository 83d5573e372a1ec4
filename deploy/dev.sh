#!/usr/bin/env bash
# Brings a local fleet up and runs a demo workload: services (deploy/dev-services.sh), a
# release build, one coordinator, two workers and the aggregator, then a demo batch.
# The fleet keeps running afterwards; `make stop` (deploy/dev.sh stop) stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
start_ns=$(date +%s%N)
log() { printf '\033[1m[dev]\033[0m %s\n' "$*" >&2; }

stop_fleet() {
    for f in .dev/pids/*.pid; do
        [[ -e "$f" ]] || continue
        pid=$(cat "$f")
        kill -TERM "$pid" 2>/dev/null && log "stopping $(basename "$f" .pid) ($pid)"
        rm -f "$f"
    done
    sleep 1
}

if [[ "${1:-}" == "stop" ]]; then
    stop_fleet
    if [[ -e .dev/nats.pid ]]; then kill "$(cat .dev/nats.pid)" 2>/dev/null || true; rm -f .dev/nats.pid; log "stopped nats-server"; fi
    exit 0
fi

deploy/dev-services.sh
# shellcheck disable=SC1091
source .dev/env
export TASKFLEET_NATS_URL

command -v cargo >/dev/null || { log "cargo is missing: install Rust (https://rustup.rs)"; exit 1; }
log "building (release)"
cargo build --release --locked --workspace --bins
BIN=target/release

stop_fleet
mkdir -p .dev/pids .dev/logs
spawn() { # name binary [VAR=value ...]
    local name=$1 bin=$2; shift 2
    env "$@" "$BIN/$bin" >".dev/logs/$name.log" 2>&1 &
    echo $! > ".dev/pids/$name.pid"
}
spawn coordinator taskfleet-coordinator TASKFLEET_COORDINATOR_HTTP_ADDR=127.0.0.1:8080
spawn worker-1 taskfleet-worker TASKFLEET_WORKER_HTTP_ADDR=127.0.0.1:8081 TASKFLEET_WORKER_ID=worker-1
spawn worker-2 taskfleet-worker TASKFLEET_WORKER_HTTP_ADDR=127.0.0.1:8082 TASKFLEET_WORKER_ID=worker-2
spawn aggregator taskfleet-aggregator TASKFLEET_AGGREGATOR_HTTP_ADDR=127.0.0.1:9090

wait_ready() { # name addr
    for _ in $(seq 300); do
        if curl -fsS "http://$2/readyz" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$(cat ".dev/pids/$1.pid")" 2>/dev/null; then
            log "$1 exited; its log:"; tail -n 30 ".dev/logs/$1.log" >&2; exit 1
        fi
        sleep 0.1
    done
    log "$1 did not become ready"; tail -n 30 ".dev/logs/$1.log" >&2; exit 1
}
wait_ready coordinator 127.0.0.1:8080
wait_ready worker-1 127.0.0.1:8081
wait_ready worker-2 127.0.0.1:8082
wait_ready aggregator 127.0.0.1:9090
log "fleet up: coordinator :8080, workers :8081 :8082, aggregator :9090 (logs in .dev/logs)"

log "demo: one task, submitted and awaited"
$BIN/taskfleet submit --kind echo --payload '{"hello":"taskfleet"}' --priority high --wait
first_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
log "first task finished $((first_ms / 1000)).$(printf '%03d' $((first_ms % 1000)))s after make dev started"

log "demo: 2,000 tasks across all priorities (echo and 20 ms sleeps)"
$BIN/taskfleet submit --kind echo --count 1000 --priority mixed --wait
$BIN/taskfleet submit --kind sleep --payload '{"ms":20}' --count 1000 --priority mixed --wait
log "demo: recent tasks"
$BIN/taskfleet ls --limit 5
$BIN/taskfleet counts
cat >&2 <<MSG

The fleet is running. Try:
  source .dev/env && target/release/taskfleet submit --kind sleep --payload '{"ms":500}' --wait
  curl -s localhost:9090/v1/stats        # aggregator
  curl -s localhost:8080/v1/counts       # coordinator
  make stop                              # stop the fleet
MSG
