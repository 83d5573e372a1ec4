#!/usr/bin/env bash
# The wait of a critical task behind a backlog of low-priority ones: BACKLOG (default
# 1,000,000) low `echo` tasks are queued with no worker running, then 2 workers start on the
# backlog and PROBES (default 5) critical tasks are submitted one by one with `--wait`; each
# line shows when the critical task started (its handler, after submission) and when its final
# state was committed, while the backlog drains.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKLOG=${BACKLOG:-1000000}
PROBES=${PROBES:-5}
BIN=target/release
source .dev/nats-bin
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
schema="bench_prio_$(date +%s)_$$"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    psql -h 127.0.0.1 -U postgres -d test -qc "drop schema if exists $schema cascade" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
"$TASKFLEET_NATS_SERVER_BIN" -a 127.0.0.1 -p "$port" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
pids+=($!)
export TASKFLEET_NATS_URL=nats://127.0.0.1:$port TASKFLEET_DATABASE_SCHEMA=$schema TASKFLEET_LOG=warn
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
TASKFLEET_COORDINATOR_HTTP_ADDR=127.0.0.1:$(free_port) $BIN/taskfleet-coordinator >"$work/coordinator.log" 2>&1 &
pids+=($!)
sleep 1
# A worker creates the lane consumers and leaves, so the backlog waits in JetStream.
TASKFLEET_WORKER_HTTP_ADDR=127.0.0.1:$(free_port) timeout -s TERM 2 $BIN/taskfleet-worker >"$work/w0.log" 2>&1 || true

start=$(date +%s)
$BIN/taskfleet submit --kind echo --count "$BACKLOG" --priority low --quiet --in-flight 4096
until [[ $(psql -h 127.0.0.1 -U postgres -d test -Atc "select count(*) from $schema.tasks" 2>/dev/null || echo 0) -ge $BACKLOG ]]; do sleep 1; done
echo "backlog of $BACKLOG low tasks queued in Postgres and JetStream after $(( $(date +%s) - start ))s"
for i in 1 2; do
    TASKFLEET_WORKER_HTTP_ADDR=127.0.0.1:$(free_port) $BIN/taskfleet-worker >"$work/w$i.log" 2>&1 &
    pids+=($!)
done
sleep 3
for i in $(seq "$PROBES"); do
    t0=$(date +%s%N)
    out=$($BIN/taskfleet submit --kind echo --priority critical --wait)
    t1=$(date +%s%N)
    left=$(psql -h 127.0.0.1 -U postgres -d test -Atc "select count(*) from $schema.tasks where state <> 'succeeded'")
    started=$(sed -n '/^{/,$p' <<<"$out" | python3 -c '
import json, sys
from datetime import datetime
t = json.loads(sys.stdin.read())
ms = lambda k: datetime.fromisoformat(t[k].replace("Z", "+00:00")).timestamp() * 1000
print(int(ms("started_at") - ms("created_at")))')
    echo "critical task $i: started ${started} ms after submission; final state committed after $(( (t1 - t0) / 1000000 )) ms; $left low tasks not yet final"
    sleep 1
done
