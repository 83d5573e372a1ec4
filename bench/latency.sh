#!/usr/bin/env bash
# Per-task latency at a low steady rate: a release fleet (1 coordinator, 2 workers) on a private
# nats-server and schema; `taskfleet bench latency` sends COUNT (1,000) `echo` tasks at RATE
# (100/s) one by one and measures submit → the worker's event and submit → final state committed
# in Postgres. A first run warms the fleet up; the second is reported.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-1000}
RATE=${RATE:-100}
source bench/lib.sh
bench_setup latency
start_coordinator
for i in 1 2; do start_worker "$i"; done
sleep 1
$BIN/taskfleet bench latency --rate "$RATE" --count "$((COUNT / 4 + 1))" >/dev/null
echo "machine: $(nproc) cores; $COUNT echo tasks at $RATE/s, 2 workers"
$BIN/taskfleet bench latency --rate "$RATE" --count "$COUNT"
