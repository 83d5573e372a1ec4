#!/usr/bin/env bash
# Runs the five example workloads (examples/, `taskfleet-examples`) on the dev fleet and prints
# one table: workload, figure, target, measured, pass. Brings the dev fleet up first when its
# coordinator does not answer (deploy/dev.sh). `QUICK=1` runs them at small scale (per-minute
# limits per second, latencies a tenth); `EXAMPLE=research` runs one.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\033[1m[examples]\033[0m %s\n' "$*" >&2; }

if ! curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1; then
    log "the dev fleet is not running: starting it (make dev)"
    deploy/dev.sh
fi
cargo build --locked -p taskfleet-examples
# shellcheck disable=SC1091
source .dev/env
export TASKFLEET_NATS_URL TASKFLEET_AGGREGATOR_URL=http://127.0.0.1:9090
args=("${EXAMPLE:-all}")
[[ -n "${QUICK:-}" ]] && args+=(--quick)
log "running ${args[*]} (watch them: target/debug/taskfleet top, or http://127.0.0.1:9090/)"
exec target/debug/taskfleet-examples "${args[@]}"
