"""The taskfleet benchmark workload as a Celery app: one no-op task on a Redis broker (or the one
in BENCH_BROKER_URL, e.g. RabbitMQ) with a Redis result backend (results are kept, as taskfleet
keeps them in Postgres), late acks (a task is acknowledged after it ran, as in taskfleet), a
durable queue and persistent messages (what RabbitMQ honours; the Redis broker ignores both).
Each completion pushes its latency (creation on the producer's clock to completion on the
worker's, wall-clock seconds) to a Redis list the driver reads."""

import os
import time

import redis
from celery import Celery
from celery.signals import task_postrun
from kombu import Exchange, Queue

REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
BROKER = os.environ.get("BENCH_BROKER_URL", REDIS)
QUEUE = "taskfleet-bench"
LAT_KEY = os.environ.get("BENCH_LATENCY_KEY", "bench:celery:latency")

app = Celery("benchapp", broker=BROKER, backend=REDIS)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # A queue of its own (not Celery's default `celery`): a shared RabbitMQ may hold other apps'.
    task_default_queue=QUEUE,
    task_queues=[Queue(QUEUE, Exchange(QUEUE, type="direct", durable=True), routing_key=QUEUE, durable=True)],
    task_default_delivery_mode="persistent",
    worker_prefetch_multiplier=64,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)
_lat = redis.Redis.from_url(REDIS)


@app.task(name="echo")
def echo(payload, t0):
    return payload


@task_postrun.connect
def _record(task=None, args=None, **_):
    if args and len(args) == 2:
        _lat.rpush(LAT_KEY, time.time() - args[1])
