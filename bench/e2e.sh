#!/usr/bin/env bash
# End-to-end throughput of durable tasks: submit N `echo` tasks, run them on W workers, and
# wait until every final state is committed in Postgres (the CLI counts the coordinator's
# commit notifications). Uses the release build, a private nats-server with file storage, and
# a fresh Postgres schema that is dropped afterwards.
#
#   bench/e2e.sh                 # 100,000 tasks, 2 workers
#   TASKS=20000 WORKERS=4 bench/e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${TASKS:-100000}
WORKERS=${WORKERS:-2}
PRIORITY=${PRIORITY:-mixed}
source bench/lib.sh
bench_setup e2e
start_coordinator
for i in $(seq "$WORKERS"); do start_worker "$i"; done
sleep 1

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); nats-server $("$TASKFLEET_NATS_SERVER_BIN" --version | awk '{print $2}'), $(psql -h 127.0.0.1 -U postgres -d test -Atc 'show server_version' | cut -d' ' -f1) Postgres (synchronous_commit $(psql -h 127.0.0.1 -U postgres -d test -Atc 'show synchronous_commit'))"
echo "workload: $TASKS echo tasks, priority $PRIORITY, $WORKERS workers, 1 coordinator, JetStream file storage"
python3 bench/rss.py "taskfleet-(coordinator|worker)|nats-server -a 127.0.0.1 -p $port|postgres: .* test 127" > "$work/rss" &
rss_pid=$!
out=$($BIN/taskfleet submit --kind echo --count "$TASKS" --priority "$PRIORITY" --wait --quiet --wait-timeout 20m)
kill -TERM $rss_pid; wait $rss_pid 2>/dev/null || true
echo "$out"
psql -h 127.0.0.1 -U postgres -d test -Atc "select state, count(*) from $schema.tasks group by 1" | sed 's/^/postgres: /'
# Per-task latency, creation to final state (ms resolution, from Postgres).
read -r p50 p99 < <(psql -h 127.0.0.1 -U postgres -d test -AtF' ' -c "select
    percentile_cont(0.5) within group (order by extract(epoch from finished_at - created_at) * 1000),
    percentile_cont(0.99) within group (order by extract(epoch from finished_at - created_at) * 1000)
    from $schema.tasks")
secs=$(sed -n 's/.* final in \([0-9.]*\)s end to end.*/\1/p' <<<"$out")
rate=$(sed -n 's/.*end to end (\([0-9]*\) tasks\/s).*/\1/p' <<<"$out")
echo "{\"system\":\"taskfleet\",\"tasks\":$TASKS,\"seconds\":$secs,\"tasks_per_s\":$rate,\"p50_ms\":$p50,\"p99_ms\":$p99,\"peak_rss_mib\":$(cat "$work/rss")}"
