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
source bench/lib.sh
bench_setup priority
start_coordinator
# A worker creates the lane consumers and leaves, so the backlog waits in JetStream.
TASKFLEET_WORKER_HTTP_ADDR=127.0.0.1:$(free_port) timeout -s TERM 2 $BIN/taskfleet-worker >"$work/w0.log" 2>&1 || true

start=$(date +%s)
$BIN/taskfleet submit --kind echo --count "$BACKLOG" --priority low --quiet --in-flight 4096
until [[ $(psql -h 127.0.0.1 -U postgres -d test -Atc "select count(*) from $schema.tasks" 2>/dev/null || echo 0) -ge $BACKLOG ]]; do sleep 1; done
echo "backlog of $BACKLOG low tasks queued in Postgres and JetStream after $(( $(date +%s) - start ))s"
for i in 1 2; do start_worker "$i"; done
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
