#!/usr/bin/env bash
# What the fleet's shared state (Redis) costs on the task path, and how exactly its rate limits
# hold. A private Redis and the mock outside API (`taskfleet-mock-api`, no added latency) stand
# in for production's; 2 workers (WORKERS), 1 coordinator.
#
#   1. Redis round trips per task (EVALSHA/EVAL calls counted by Redis) and tasks/s for:
#      `echo` (no policy), `llm.chat` cache hits (one prompt, cached), `http` cache misses that
#      also take a rate-limit token and pass a circuit breaker.
#   2. Rate-limit accuracy: CALLS (default 5,000) `http` calls through a limit of RATE/s burst
#      BURST (default 500/s burst 50); the mock API's arrival times give the busiest 1 s and 5 s
#      windows against what the limit allows (rate × window + burst).
#
#   TASKS=20000 bench/policies.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${TASKS:-20000}
CALLS=${CALLS:-5000}
RATE=${RATE:-500}
BURST=${BURST:-50}
WORKERS=${WORKERS:-2}
source bench/lib.sh
bench_setup policies

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
mock_port=$(free_port)
$BIN/taskfleet-mock-api --addr "127.0.0.1:$mock_port" --name bench >"$work/mock.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
mock=http://127.0.0.1:$mock_port

export TASKFLEET_REDIS_URL=redis://127.0.0.1:$redis_port TASKFLEET_REDIS_KEY_PREFIX=bench:
export TASKFLEET_PROVIDERS_URLS="llm=$mock/v1,search=$mock,metered=$mock"
export TASKFLEET_PROVIDERS_MODELS=model-a=llm TASKFLEET_PROVIDERS_PRICES=model-a=0.15/0.6
export TASKFLEET_PROVIDERS_LIMITS=search=search,metered=metered
export TASKFLEET_POLICIES_RATE_LIMITS="search=1000000/s burst 1000,metered=$RATE/s burst $BURST"
export TASKFLEET_POLICIES_CACHE="llm.chat=1h by model+messages,http=1h"
start_coordinator
for i in $(seq "$WORKERS"); do start_worker "$i"; done
sleep 1

echo "machine: $(nproc) cores; redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'); $WORKERS workers, 1 coordinator"
script_calls() {
    redis-cli -p "$redis_port" info commandstats |
        awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/ { n += $3 } END { print n + 0 }'
}
# run NAME ARGS...: submits TASKS tasks with --wait and prints tasks/s and round trips per task.
run() {
    local name=$1
    shift
    local before after out rate
    before=$(script_calls)
    out=$($BIN/taskfleet submit --count "$TASKS" --wait --quiet --wait-timeout 20m "$@")
    after=$(script_calls)
    rate=$(sed -n 's/.*end to end (\([0-9]*\) tasks\/s).*/\1/p' <<<"$out")
    python3 -c 'import json,sys; print(json.dumps({"workload": sys.argv[1], "tasks": int(sys.argv[2]), "tasks_per_s": int(sys.argv[3]), "redis_round_trips_per_task": round((int(sys.argv[5]) - int(sys.argv[4])) / int(sys.argv[2]), 2)}))' \
        "$name" "$TASKS" "$rate" "$before" "$after"
}
chat='{"model":"model-a","messages":[{"role":"user","content":"what is a task fleet?"}]}'
$BIN/taskfleet submit --kind llm.chat --payload "$chat" --wait --quiet >/dev/null   # warm the cache
run echo --kind echo
run llm.chat-cache-hit --kind llm.chat --payload "$chat"
run http-miss+limit+breaker --index-at /json/n --kind http --payload '{"provider":"search","method":"POST","path":"/v1/search","json":{"query":"q"}}'

# Rate-limit accuracy at the API.
curl -fsS -X POST "$mock/stats/reset" >/dev/null
TASKS=$CALLS run http-metered --index-at /json/n --kind http --payload '{"provider":"metered","method":"POST","path":"/v1/search","json":{"query":"m"}}'
curl -fsS "$mock/stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
t = sorted(s["accepted_ms"])
rate, burst, calls = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
def busiest(w):
    best, j = 0, 0
    for i in range(len(t)):
        while t[i] - t[j] >= w:
            j += 1
        best = max(best, i - j + 1)
    return best
out = {"workload": "rate-limit-accuracy", "limit": f"{int(rate)}/s burst {int(burst)}", "calls": len(t)}
for w in (1000, 5000):
    allowed = rate * w / 1000 + burst
    got = busiest(w)
    out[f"busiest_{w // 1000}s"] = got
    out[f"allowed_{w // 1000}s"] = int(allowed)
    out[f"overshoot_{w // 1000}s_pct"] = round(max(0.0, (got - allowed) / allowed * 100), 2)
span = (t[-1] - t[0]) / 1000
out["overall_per_s"] = round((len(t) - burst) / span, 1)
print(json.dumps(out))
' "$RATE" "$BURST" "$CALLS"
