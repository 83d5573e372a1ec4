"""Peak resident memory of a set of processes: every 200 ms, sums VmRSS of the processes whose
command line matches REGEX, until SIGTERM/SIGINT; then prints the peak in MiB.

    python3 bench/rss.py 'taskfleet-(coordinator|worker)|nats-server' & ...; kill %1
"""

import os
import re
import signal
import sys
import time

pattern = re.compile(sys.argv[1])
me = os.getpid()
peak = 0
running = True


def stop(*_):
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
while running:
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            if not pattern.search(cmd):
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    peak = max(peak, total)
    time.sleep(0.2)
print(f"{peak / 1024:.0f}")
