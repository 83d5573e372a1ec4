#!/usr/bin/env bash
# taskfleet side by side with the job queues users would pick instead, on the same machine, in
# the same run, on the same workload: N no-op tasks submitted, run by W workers, and completed
# with their results kept. Prints one table: system, tasks/s, p50/p99 per-task latency
# (creation to completion, under this saturating load), peak memory, ratio to taskfleet.
#
#   bench/compare.sh                  # 100,000 tasks, 2 workers
#   TASKS=20000 PEERS="bullmq" bench/compare.sh
#
# Durability, as close as each system allows:
#   taskfleet  JetStream file storage (default fsync), Postgres synchronous_commit on, results in Postgres
#   bullmq     Redis with appendonly yes, appendfsync everysec; completed jobs kept in Redis
#   celery     same Redis as broker and result backend, acks_late
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${TASKS:-100000}
WORKERS=${WORKERS:-2}
PEERS=${PEERS:-bullmq celery}
results=$(mktemp)
work=$(mktemp -d)
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work" "$results"; }
trap cleanup EXIT

echo "== taskfleet" >&2
TASKS=$TASKS WORKERS=$WORKERS bench/e2e.sh | tee /dev/stderr | grep '^{' >> "$results"

redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --dir "$work" --appendonly yes \
    --appendfsync everysec --save "" --logfile "$work/redis.log"
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

for peer in $PEERS; do
    echo "== $peer" >&2
    case $peer in
        bullmq)
            (cd bench/peers/bullmq && [[ -d node_modules ]] || npm install --no-audit --no-fund --silent)
            pattern="redis-server 127.0.0.1:$redis_port|bench.mjs"
            cmd=(node bench/peers/bullmq/bench.mjs --redis "redis://127.0.0.1:$redis_port" --tasks "$TASKS" --workers "$WORKERS" --concurrency 64)
            ;;
        celery)
            python3 -c 'import celery' 2>/dev/null || python3 -m pip install -q -r bench/peers/celery/requirements.txt
            pattern="redis-server 127.0.0.1:$redis_port|celery|bench.py"
            cmd=(python3 bench/peers/celery/bench.py --redis "redis://127.0.0.1:$redis_port/0" --tasks "$TASKS" --workers "$WORKERS")
            ;;
        *) echo "unknown peer $peer" >&2; exit 1 ;;
    esac
    redis-cli -p "$redis_port" flushall >/dev/null
    python3 bench/rss.py "$pattern" > "$work/rss" &
    rss_pid=$!
    line=$("${cmd[@]}" | grep '^{')
    kill -TERM $rss_pid; wait $rss_pid 2>/dev/null || true
    echo "$line" >&2
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["peak_rss_mib"]=int(sys.argv[2]); print(json.dumps(d))' "$line" "$(cat "$work/rss")" >> "$results"
done

python3 - "$results" "$WORKERS" <<'PY'
import json, os, subprocess, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = next(r for r in rows if r["system"] == "taskfleet")["tasks_per_s"]
cores = os.cpu_count()
print(f"\n{rows[0]['tasks']} no-op tasks, {sys.argv[2]} workers, {cores} cores, one machine; latency = creation to completion under this load")
print(f"{'system':<10} {'tasks/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'peak MiB':>9} {'vs taskfleet':>13}")
for r in rows:
    print(f"{r['system']:<10} {r['tasks_per_s']:>9.0f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['peak_rss_mib']:>9} {r['tasks_per_s'] / base:>12.2f}x")
PY
