#!/usr/bin/env bash
# What dependencies cost, on a release fleet (1 coordinator, 2 workers) with a private
# nats-server and schema: `taskfleet bench workflows` measures, in one invocation,
#   * the release latency of a dependent step: CHAINS (300) two-step runs at RATE (20/s),
#     parent's handler end -> child's handler start;
#   * a run of WIDTH x DEPTH (1,000 x 10) independent echo steps against a DAG of the same
#     size (each step after 2 steps of the layer before), alternately, ROUNDS (3) times, and the
#     same number of plain tasks submitted one by one;
#   * a fan-out of CHILDREN (10,000) children with one join.
set -euo pipefail
cd "$(dirname "$0")/.."
WIDTH=${WIDTH:-1000}
DEPTH=${DEPTH:-10}
ROUNDS=${ROUNDS:-3}
CHILDREN=${CHILDREN:-10000}
CHAINS=${CHAINS:-300}
RATE=${RATE:-20}
source bench/lib.sh
bench_setup workflows
start_coordinator
for i in 1 2; do start_worker "$i"; done
sleep 1
echo "machine: $(nproc) cores; 1 coordinator, 2 workers"
$BIN/taskfleet bench workflows --width "$WIDTH" --depth "$DEPTH" --rounds "$ROUNDS" --children "$CHILDREN" \
    --chains "$CHAINS" --rate "$RATE"
