#!/usr/bin/env bash
# The aggregator's event throughput ceiling: EVENTS (default 1,000,000) synthetic `succeeded`
# events (100 per message, four kinds, four priorities) are published into the event stream while
# the aggregator is stopped; then it starts and the time until its snapshot has counted them all
# gives events/s (decode, HDR histograms per series, rollups to Postgres, acks included).
#   EVENTS=200000 bench/aggregator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-1000000}
source bench/lib.sh
bench_setup aggregator
http=127.0.0.1:$(free_port)
start_aggregator() {
    TASKFLEET_AGGREGATOR_HTTP_ADDR=$http $BIN/taskfleet-aggregator >>"$work/aggregator.log" 2>&1 &
    agg=$!
    pids+=($agg)
    for _ in $(seq 100); do curl -fsS "http://$http/readyz" >/dev/null 2>&1 && return; sleep 0.1; done
    echo "aggregator did not become ready" >&2; tail -n 20 "$work/aggregator.log" >&2; return 1
}
# A first start creates the streams and the aggregator's durable consumer; then it stops.
start_aggregator
kill -TERM "$agg"; wait "$agg" 2>/dev/null || true
$BIN/taskfleet bench events --count "$EVENTS" --batch 100
t0=$(date +%s.%N)
start_aggregator
while :; do
    n=$(curl -fsS "http://$http/v1/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("fleet",{}).get("completed_total",0))' 2>/dev/null || echo 0)
    [[ $n -ge $EVENTS ]] && break
    sleep 0.2
done
t1=$(date +%s.%N)
python3 -c 'import json,sys; n,a,b=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]); print(json.dumps({"workload":"aggregator","events":n,"seconds":round(b-a,2),"events_per_s":round(n/(b-a))}))' "$EVENTS" "$t0" "$t1"
