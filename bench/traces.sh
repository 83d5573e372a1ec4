#!/usr/bin/env bash
# Cost of tracing on end-to-end throughput: bench/e2e.sh without, then with
# OTEL_EXPORTER_OTLP_ENDPOINT pointing at a local sink that counts and discards spans
# (bench/otlp_sink.py), alternating ROUNDS times because a shared machine is noisy. With the
# endpoint set every service exports, and the CLI opens a `task.submit` root span for every
# submission: every task is traced. ON_ENV adds settings to the traced runs only, e.g. head
# sampling: ON_ENV="OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01".
# Besides tasks/s, each run reports the CPU seconds of the CLI, coordinator and workers
# (bench/cpu.py), which depend much less on what else the machine is doing.
#
#   TASKS=50000 ROUNDS=2 bench/traces.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export TASKS=${TASKS:-50000}
ROUNDS=${ROUNDS:-2}
dir=$(mktemp -d)
python3 bench/otlp_sink.py "$dir/port" &
sink=$!
trap 'kill $sink 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 50); do [ -s "$dir/port" ] && break; sleep 0.1; done
port=$(cat "$dir/port")
stats() { curl -fsS "http://127.0.0.1:$port/stats"; }

# run [VAR=VALUE...]: one bench/e2e.sh run; prints its result line and the CPU seconds used.
run() {
    env "$@" bench/e2e.sh >"$dir/out" &
    local e2e=$!
    python3 bench/cpu.py "$e2e" 'target/release/taskfleet' >"$dir/cpu" &
    local cpu=$!
    wait "$e2e"
    kill -TERM "$cpu"
    wait "$cpu" || true
    echo "$(tail -n 1 "$dir/out") cpu_s $(cat "$dir/cpu")"
}

for r in $(seq "$ROUNDS"); do
    echo "round $r off: $(run)"
    before=$(stats)
    # shellcheck disable=SC2086 # ON_ENV is a list of VAR=VALUE words
    echo "round $r on:  $(run OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$port" ${ON_ENV:-})"
    sleep 1
    after=$(stats)
    python3 -c '
import json, sys
b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2])
spans = {k: v - b["spans"].get(k, 0) for k, v in a["spans"].items() if v - b["spans"].get(k, 0)}
mib = (a["bytes"] - b["bytes"]) / 1048576
requests = a["requests"] - b["requests"]
cpu = a["cpu_s"] - b["cpu_s"]
print(f"round {sys.argv[3]} spans received: {sum(spans.values())} {dict(sorted(spans.items()))}, "
      f"{mib:.1f} MiB in {requests} requests, sink CPU {cpu:.1f} s")
' "$before" "$after" "$r"
done
