#!/usr/bin/env bash
# taskfleet side by side with the job queues users would pick instead, on the same machine, in
# the same run, on the same workload: N no-op tasks submitted, run by W workers, and completed
# with their results kept. Prints one table: system, tasks/s, p50/p99 per-task latency
# (creation to completion, under this saturating load), peak memory, ratio to taskfleet and
# the durability settings below.
#
#   bench/compare.sh                  # 100,000 tasks, 2 workers
#   TASKS=20000 PEERS="bullmq apalis" bench/compare.sh
#
# Durability, as close as each system allows (the peers' Redis is a private redis-server with
# appendonly yes, appendfsync everysec, no RDB snapshots):
#   taskfleet        JetStream file storage (default fsync), Postgres synchronous_commit on, results in Postgres
#   bullmq           the Redis; completed jobs kept in Redis
#   celery           the Redis as broker and result backend, acks_late
#   celery-rabbitmq  RabbitMQ at 127.0.0.1:5672 (guest/guest; skipped if nothing answers there) as broker:
#                    durable queue, persistent messages (no publisher confirms), acks_late; results in the Redis
#   apalis           apalis 0.7 with apalis-redis on the Redis: a job is acked (moved to the done set, its
#                    result stored) after it ran; done jobs and results kept in Redis (apalis' default)
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${TASKS:-100000}
WORKERS=${WORKERS:-2}
PEERS=${PEERS:-bullmq celery celery-rabbitmq apalis}
results=$(mktemp)
work=$(mktemp -d)
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work" "$results"; }
trap cleanup EXIT

echo "== taskfleet" >&2
# (Not `tee /dev/stderr`: when stderr is a file, reopening it truncates what came before.)
out=$(TASKS=$TASKS WORKERS=$WORKERS bench/e2e.sh)
echo "$out" >&2
grep '^{' <<<"$out" >> "$results"

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
        celery-rabbitmq)
            # RabbitMQ is a system service, not started here: its memory (beam.smp) is the whole broker's.
            if ! timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' 2>/dev/null; then
                echo "skipping celery-rabbitmq: no RabbitMQ answers on 127.0.0.1:5672" >&2
                continue
            fi
            python3 -c 'import celery' 2>/dev/null || python3 -m pip install -q -r bench/peers/celery/requirements.txt
            pattern="redis-server 127.0.0.1:$redis_port|celery|bench.py|beam.smp"
            cmd=(python3 bench/peers/celery/bench.py --redis "redis://127.0.0.1:$redis_port/0" --broker "amqp://guest:guest@127.0.0.1:5672//"
                 --system celery-rabbitmq --tasks "$TASKS" --workers "$WORKERS")
            ;;
        apalis)
            CARGO_TARGET_DIR=target/peers/apalis cargo build --release --locked --quiet --manifest-path bench/peers/apalis/Cargo.toml
            pattern="redis-server 127.0.0.1:$redis_port|apalis-bench"
            cmd=(target/peers/apalis/release/apalis-bench --redis "redis://127.0.0.1:$redis_port" --tasks "$TASKS" --workers "$WORKERS" --concurrency 64)
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
durability = {
    "taskfleet": "JetStream file storage, Postgres synchronous_commit on",
    "bullmq": "Redis AOF everysec",
    "celery": "Redis AOF everysec, acks_late",
    "celery-rabbitmq": "RabbitMQ durable queue, persistent messages, acks_late",
    "apalis": "Redis AOF everysec",
}
print(f"\n{rows[0]['tasks']} no-op tasks, {sys.argv[2]} workers, {cores} cores, one machine; latency = creation to completion under this load")
print(f"{'system':<16} {'tasks/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'peak MiB':>9} {'vs taskfleet':>13}  durability")
for r in rows:
    print(f"{r['system']:<16} {r['tasks_per_s']:>9.0f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['peak_rss_mib']:>9} {r['tasks_per_s'] / base:>12.2f}x  {durability.get(r['system'], '')}")
PY
