#!/usr/bin/env bash
# Memory under a burst of large submissions: 1,000 `echo` tasks of 500 KB each published at
# once (500 MB in flight) to a coordinator and one worker; prints the coordinator's and the
# worker's peak resident memory against the coordinator's Kubernetes memory limit. Intake,
# recording and event batches are bounded by bytes, so the peak stays far below the burst.
#
#   bench/burst.sh            (after `cargo build --release`; N=... and KB=... change the burst)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
N=${N:-1000}
KB=${KB:-500}

bench_setup burst
start_coordinator
start_worker 1
limit=$(grep -A3 'limits:' k8s/base/coordinator.yaml | grep -m1 memory | awk '{print $2}')
python3 bench/rss.py 'taskfleet-coordinator' >"$work/rss-coordinator" &
rss_c=$!
pids+=($rss_c)
python3 bench/rss.py 'taskfleet-worker' >"$work/rss-worker" &
rss_w=$!
pids+=($rss_w)
python3 -c "import json; print(json.dumps({'text': 'x' * ($KB * 1000)}))" >"$work/payload.json"
start=$(date +%s.%N)
$BIN/taskfleet submit --kind echo --payload "@$work/payload.json" --count "$N" --wait --quiet --wait-timeout 10m
end=$(date +%s.%N)
kill -TERM $rss_c $rss_w
wait $rss_c $rss_w 2>/dev/null || true
printf 'burst of %d x %d KB (%d MB), %s cores: all final in %.1f s; peak RSS coordinator %s MiB (k8s limit %s), worker %s MiB\n' \
    "$N" "$KB" $((N * KB / 1000)) "$(nproc)" "$(echo "$end - $start" | bc)" \
    "$(cat "$work/rss-coordinator")" "$limit" "$(cat "$work/rss-worker")"
