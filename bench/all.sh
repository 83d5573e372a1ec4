#!/usr/bin/env bash
# `make bench`: every benchmark in one run, on this machine, with its core count and versions.
#   1. compare.sh    taskfleet vs BullMQ, Celery (Redis, RabbitMQ), apalis: 100,000 tasks, 2 workers
#   2. latency.sh    per-task latency at 100 tasks/s
#   3. scaling.sh    tasks/s with 1, 2, 4 workers
#   4. priority.sh   a critical task's wait behind 1,000,000 queued low ones
#   5. policies.sh   Redis round trips and tasks/s of cache hits and misses; rate-limit accuracy
#   6. aggregator.sh the aggregator's event throughput ceiling
#   7. workflows.sh  release latency of a dependent step, a DAG against independent steps, a fan-out's join
#   8. semantic_bench semantic cache lookups at 100,000 entries of 256 dims (in-worker index, Redis sync)
# QUICK=1 shrinks every workload (a smoke run of the suite, not figures to report).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${QUICK:-0} == 1 ]]; then
    export TASKS=5000 BACKLOG=20000 PROBES=2 CALLS=1000 EVENTS=50000 COUNT=200
    export WIDTH=100 DEPTH=5 ROUNDS=1 CHILDREN=1000 CHAINS=40 ENTRIES=10000
    scaling_tasks=5000
else
    scaling_tasks=50000
fi
source .dev/nats-bin
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(uname -sr)"
echo "versions: nats-server $("$TASKFLEET_NATS_SERVER_BIN" --version | awk '{print $2}'), Postgres $(psql -h 127.0.0.1 -U postgres -d test -Atc 'show server_version' | cut -d' ' -f1), $(redis-server --version | awk '{print $3}'), $(rustc --version | cut -d' ' -f1-2)"
section() { printf '\n===== %s =====\n' "$1"; }
section "1. end-to-end durable throughput against peers"
bench/compare.sh
section "2. latency at a low steady rate"
bench/latency.sh
section "3. workers"
TASKS=$scaling_tasks bench/scaling.sh
section "4. critical task behind a backlog of low ones"
bench/priority.sh
section "5. shared state: cache hit path, round trips, rate-limit accuracy"
bench/policies.sh
section "6. aggregator"
bench/aggregator.sh
section "7. workflows"
bench/workflows.sh
section "8. semantic cache lookups"
cargo run --release --locked -q -p taskfleet-shared-state --example semantic_bench
