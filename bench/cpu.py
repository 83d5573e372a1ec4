"""CPU time of a benchmark's own processes: every 100 ms, notes user+system time of each
descendant of ROOT_PID whose command line matches REGEX, until SIGTERM/SIGINT; then prints the
CPU seconds per program as JSON. CPU time, unlike throughput, hardly depends on what else runs
on a shared machine.

    python3 bench/cpu.py $! 'target/release/taskfleet' & ...; kill %1
"""

import json
import os
import re
import signal
import sys
import time

root = int(sys.argv[1])
pattern = re.compile(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")
seen = {}  # pid -> (program, cpu seconds)
running = True


def stop(*_):
    global running
    running = False


def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command: state ppid ... utime (14th field) stime (15th field).
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
while running:
    parents = {}
    cpu = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(pid)], cpu[int(pid)] = stat(pid)
        except (OSError, IndexError, ValueError):
            continue
    for pid in cpu:
        p = pid
        while p > 1 and p != root:
            p = parents.get(p, 0)
        if p != root:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if pattern.search(cmd):
            seen[pid] = (os.path.basename(cmd), cpu[pid])
    time.sleep(0.1)
out = {}
for program, seconds in seen.values():
    out[program] = round(out.get(program, 0) + seconds, 2)
print(json.dumps(dict(sorted(out.items()))))
