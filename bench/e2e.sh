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
BIN=target/release
source .dev/nats-bin
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
schema="bench_$(date +%s)_$$"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    psql -h 127.0.0.1 -U postgres -d test -qc "drop schema if exists $schema cascade" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$TASKFLEET_NATS_SERVER_BIN" -a 127.0.0.1 -p "$port" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
pids+=($!)
export TASKFLEET_NATS_URL=nats://127.0.0.1:$port TASKFLEET_DATABASE_SCHEMA=$schema TASKFLEET_LOG=warn
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

c_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TASKFLEET_COORDINATOR_HTTP_ADDR=127.0.0.1:$c_port $BIN/taskfleet-coordinator >"$work/coordinator.log" 2>&1 &
pids+=($!)
for i in $(seq "$WORKERS"); do
    w_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    TASKFLEET_WORKER_HTTP_ADDR=127.0.0.1:$w_port TASKFLEET_WORKER_ID=bench-$i $BIN/taskfleet-worker >"$work/worker-$i.log" 2>&1 &
    pids+=($!)
done
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$c_port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
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
