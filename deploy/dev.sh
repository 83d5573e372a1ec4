#!/usr/bin/env bash
# Brings a local fleet up and runs a demo workload: services (deploy/dev-services.sh), the
# debug build (the one `make test` uses, so it is compiled once for both), a nats-server of its
# own with authorization on (each role its user and permissions, passwords made once per
# checkout in .dev/nats-passwords), one coordinator, two workers, the aggregator and a mock LLM
# API, then a demo workload (echo and sleep tasks, then LLM calls through the shared cache and a
# rate limit). The fleet keeps running afterwards; `make stop` (deploy/dev.sh stop) stops it.
#
# Environment: TASKFLEET_DEV_NATS_PORT [4322], the port of the dev fleet's nats-server.
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

deploy/dev-services.sh --no-nats
# shellcheck disable=SC1091
source .dev/nats-bin

command -v cargo >/dev/null || { log "cargo is missing: install Rust (https://rustup.rs)"; exit 1; }
log "building (debug profile, shared with make test)"
cargo build --locked --workspace --bins
BIN=target/debug

stop_fleet
mkdir -p .dev/pids .dev/logs .dev/nats

# NATS with authorization: one user per role, the permissions `taskfleet nats-permissions`
# prints, the passwords in the nats-server's environment (as a Kubernetes Secret gives them).
ROLES=(coordinator worker aggregator client admin)
if [[ ! -s .dev/nats-passwords ]]; then
    (umask 077; for role in "${ROLES[@]}"; do
        echo "NATS_PASSWORD_${role^^}=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    done > .dev/nats-passwords)
fi
# shellcheck disable=SC1091
source .dev/nats-passwords
NATS_PORT=${TASKFLEET_DEV_NATS_PORT:-4322}
$BIN/taskfleet nats-permissions --password-env-prefix NATS_PASSWORD_ > .dev/nats/authorization.conf
cat > .dev/nats/nats.conf <<CONF
listen: "127.0.0.1:$NATS_PORT"
http: "127.0.0.1:$((NATS_PORT + 1))"
jetstream { store_dir: "$PWD/.dev/nats/store" }
include "authorization.conf"
CONF
if [[ -e .dev/nats.pid ]] && kill -0 "$(cat .dev/nats.pid)" 2>/dev/null \
    && [[ "$(cat .dev/nats.conf-path 2>/dev/null)" == "$PWD/.dev/nats/nats.conf" ]]; then
    kill -HUP "$(cat .dev/nats.pid)" && log "nats-server reloaded its configuration"
else
    [[ -e .dev/nats.pid ]] && { kill "$(cat .dev/nats.pid)" 2>/dev/null || true; rm -f .dev/nats.pid; sleep 0.5; }
    if (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null; then
        log "port $NATS_PORT is taken by another process: set TASKFLEET_DEV_NATS_PORT"; exit 1
    fi
    # shellcheck disable=SC2046
    nohup env $(cat .dev/nats-passwords) "$TASKFLEET_NATS_SERVER_BIN" -c "$PWD/.dev/nats/nats.conf" \
        >.dev/logs/nats-server.log 2>&1 &
    echo $! > .dev/nats.pid
    echo "$PWD/.dev/nats/nats.conf" > .dev/nats.conf-path
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.1; done
    log "nats-server with authorization on 127.0.0.1:$NATS_PORT (monitoring :$((NATS_PORT + 1)))"
fi
export TASKFLEET_NATS_URL=nats://127.0.0.1:$NATS_PORT
# The CLI and the examples log in as admin.
cat > .dev/env <<ENV
export TASKFLEET_NATS_URL=$TASKFLEET_NATS_URL
export TASKFLEET_NATS_USER=admin
export TASKFLEET_NATS_PASSWORD=$NATS_PASSWORD_ADMIN
ENV
chmod 600 .dev/env
# shellcheck disable=SC1091
source .dev/env

spawn() { # name binary role|- [VAR=value ...]: logs in to NATS as its role
    local name=$1 bin=$2 role=$3 login=(); shift 3
    if [[ "$role" != - ]]; then
        local password_var="NATS_PASSWORD_${role^^}"
        login=(TASKFLEET_NATS_USER="$role" TASKFLEET_NATS_PASSWORD="${!password_var}")
    fi
    env -u TASKFLEET_NATS_USER -u TASKFLEET_NATS_PASSWORD "${login[@]}" "$@" "$BIN/$bin" >".dev/logs/$name.log" 2>&1 &
    echo $! > ".dev/pids/$name.pid"
}
# The demo's LLM provider: the mock API (taskfleet-mock-api), 30 ms per call; its results are
# cached fleet-wide for an hour and its calls limited to 50/s across both workers.
export TASKFLEET_PROVIDERS_URLS=demo-llm=http://127.0.0.1:8089/v1 TASKFLEET_PROVIDERS_MODELS=demo-model=demo-llm
export TASKFLEET_PROVIDERS_PRICES=demo-model=0.15/0.60 TASKFLEET_PROVIDERS_LIMITS=demo-llm=demo-llm
export TASKFLEET_POLICIES_RATE_LIMITS="demo-llm=50/s burst 10" TASKFLEET_POLICIES_CACHE="llm.chat=1h by model+messages"
spawn mock-api taskfleet-mock-api - TASKFLEET_MOCK_ADDR=127.0.0.1:8089 TASKFLEET_MOCK_NAME=demo-llm TASKFLEET_MOCK_LATENCY_MS=30
spawn coordinator taskfleet-coordinator coordinator TASKFLEET_COORDINATOR_HTTP_ADDR=127.0.0.1:8080
# The demo below submits `sleep` tasks and deploy/demo-run.yaml spawns them: a test handler,
# registered only with worker.test_handlers on.
spawn worker-1 taskfleet-worker worker TASKFLEET_WORKER_HTTP_ADDR=127.0.0.1:8081 TASKFLEET_WORKER_ID=worker-1 TASKFLEET_WORKER_TEST_HANDLERS=true
spawn worker-2 taskfleet-worker worker TASKFLEET_WORKER_HTTP_ADDR=127.0.0.1:8082 TASKFLEET_WORKER_ID=worker-2 TASKFLEET_WORKER_TEST_HANDLERS=true
spawn aggregator taskfleet-aggregator aggregator TASKFLEET_AGGREGATOR_HTTP_ADDR=127.0.0.1:9090

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
for _ in $(seq 100); do curl -fsS http://127.0.0.1:8089/healthz >/dev/null 2>&1 && break; sleep 0.1; done
log "fleet up: coordinator :8080, workers :8081 :8082, aggregator :9090 (logs in .dev/logs)"

log "demo: one task, submitted and awaited"
$BIN/taskfleet submit --kind echo --payload '{"hello":"taskfleet"}' --priority high --wait
first_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
log "first task finished $((first_ms / 1000)).$(printf '%03d' $((first_ms % 1000)))s after make dev started"

log "demo: 2,000 tasks across all priorities (echo and 20 ms sleeps)"
$BIN/taskfleet submit --kind echo --count 1000 --priority mixed --wait
$BIN/taskfleet submit --kind sleep --payload '{"ms":20}' --count 1000 --priority mixed --wait
log "demo: 200 LLM calls over 20 distinct prompts (cache, single-flight, 50/s rate limit)"
submitters=()
for p in $(seq 0 19); do
    # 10 copies of each prompt at once: one calls the API, the others wait for its result.
    $BIN/taskfleet submit --kind llm.chat --count 10 --index-at /metadata/copy --wait --quiet \
        --payload "{\"model\":\"demo-model\",\"messages\":[{\"role\":\"user\",\"content\":\"question $p\"}]}" >/dev/null &
    submitters+=($!)
done
wait "${submitters[@]}"
log "demo: $(curl -fsS 127.0.0.1:8089/stats | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["by_status"]["200"], "calls reached the LLM API for 200 tasks")')"
log "demo: a workflow run (deploy/demo-run.yaml): a spawn with its join, a loop, a join of two steps"
submitted=$($BIN/taskfleet run submit deploy/demo-run.yaml --wait --timeout 60s)
$BIN/taskfleet run show "${submitted%%$'\n'*}"
sleep 5   # workers report every 5 s
$BIN/taskfleet top --once --aggregator http://127.0.0.1:9090 || true
log "demo: recent tasks"
$BIN/taskfleet ls --limit 5
$BIN/taskfleet counts
cat >&2 <<MSG

The fleet is running. Try:
  source .dev/env && target/debug/taskfleet submit --kind sleep --payload '{"ms":500}' --wait
  open http://localhost:9090/            # the dashboard (also: target/debug/taskfleet top)
  curl -s localhost:9090/v1/stats        # aggregator
  curl -s localhost:8080/v1/counts       # coordinator
  source .dev/env && target/debug/taskfleet run submit deploy/demo-run.yaml --wait   # a workflow
  source .dev/env && target/debug/taskfleet run ls                                    # recent runs
  make stop                              # stop the fleet
MSG
