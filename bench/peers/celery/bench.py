"""Driver: starts a Celery worker (prefork, --concurrency W) on the given broker (default: the
Redis), with the Redis as result backend, purges the task queue, submits N tasks, waits until
every one completed, prints one JSON line like the other peers.

    python3 bench.py --redis redis://127.0.0.1:6390/0 --tasks 100000 --workers 2
    python3 bench.py --redis redis://127.0.0.1:6390/0 --broker amqp://guest:guest@127.0.0.1:5672// \
        --system celery-rabbitmq --tasks 100000 --workers 2
"""

import argparse
import json
import os
import subprocess
import sys
import time

import redis


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--broker", default=None, help="broker URL (default: the --redis URL)")
    ap.add_argument("--system", default="celery", help="the output's system field")
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, BENCH_REDIS_URL=args.redis, BENCH_BROKER_URL=args.broker or args.redis,
               BENCH_LATENCY_KEY=f"bench:celery:{os.getpid()}")
    r = redis.Redis.from_url(args.redis)
    r.delete(env["BENCH_LATENCY_KEY"])
    os.environ.update(env)
    sys.path.insert(0, here)
    import benchapp  # noqa: E402  (reads the environment set above)

    # Start from an empty queue: leftovers of an earlier run would be counted as this run's.
    purged = benchapp.app.control.purge()
    if purged:
        print(f"{args.system}: purged {purged} leftover messages", file=sys.stderr)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchapp", "worker", "--pool=prefork",
         f"--concurrency={args.workers}", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    start = time.time()
    for i in range(args.tasks):
        benchapp.echo.apply_async(args=({"i": i}, time.time()))
    deadline = start + 1800
    while r.llen(env["BENCH_LATENCY_KEY"]) < args.tasks and time.time() < deadline:
        time.sleep(0.05)
    seconds = time.time() - start
    lat = sorted(float(x) * 1000 for x in r.lrange(env["BENCH_LATENCY_KEY"], 0, -1))
    worker.terminate()
    worker.wait(timeout=30)
    r.delete(env["BENCH_LATENCY_KEY"])
    done = len(lat)
    pct = lambda p: lat[min(done - 1, int(done * p))] if done else None  # noqa: E731
    print(json.dumps({"system": args.system, "tasks": args.tasks, "completed": done, "seconds": seconds,
                      "tasks_per_s": done / seconds, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}))


if __name__ == "__main__":
    main()
