#!/usr/bin/env bash
# taskfleet end-to-end tasks/s with 1, 2 and 4 workers (bench/e2e.sh for each).
#   TASKS=50000 bench/scaling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${TASKS:-50000}
printf '%-8s %10s %8s %8s %9s\n' workers tasks/s p50_ms p99_ms peak_MiB
for w in ${WORKER_COUNTS:-1 2 4}; do
    line=$(TASKS=$TASKS WORKERS=$w bench/e2e.sh | grep '^{')
    python3 - "$line" "$w" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
print(f"{sys.argv[2]:<8} {d['tasks_per_s']:>10} {d['p50_ms']:>8.0f} {d['p99_ms']:>8.0f} {d['peak_rss_mib']:>9}")
PY
done
