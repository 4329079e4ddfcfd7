"""Bare Celery: the no-op task lightning-queue is compared with, on the same Redis and settings.

Started as ``celery -A bare_celery worker`` with ``BENCH_REDIS_URL`` and
``BENCH_PREFIX`` in the environment (``BENCH_EVENTS=0``: task events off). Its
Celery settings are lightning-queue's own (:func:`lightning_queue.broker.app.celery_config`:
JSON, acks_late, prefetch 1, task events on, the same broker key prefix scheme), on kombu's
own Redis transport (lightning-queue's hardened one is part of the product, not of bare
Celery), and results go to a Redis result backend, the natural way a Celery user learns
that tasks finished (``AsyncResult.get``/``ResultSet.get``, which the Redis backend answers
from pub/sub).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from lightning_queue.broker.app import celery_config
from lightning_queue.core.settings import Settings

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("BENCH_PREFIX", "lqbench-bare")
EVENTS = os.environ.get("BENCH_EVENTS", "1") != "0"


def bare_config(url: str, prefix: str, events: bool = True) -> dict[str, Any]:
    """lightning-queue's Celery settings, plus a Redis result backend under ``prefix``;
    ``events=False`` turns the task events (worker's and task-sent) off."""
    config = celery_config(Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q"))
    options = {k: v for k, v in config["broker_transport_options"].items() if not k.startswith("lq_")}
    config.update(
        broker_transport="redis",  # kombu's own
        broker_transport_options=options,
        result_backend=url,
        result_backend_transport_options={"global_keyprefix": f"{prefix}:"},
        task_ignore_result=False,
        # lightning-queue sets it but it is inert there (results are ignored); here it would
        # store and publish a STARTED state per task, a cost the other side does not pay.
        task_track_started=False,
        worker_send_task_events=events,
        task_send_sent_event=events,
    )
    return config


def noop() -> float:
    """The bare counterpart of ``bench_agents.noop``: returns when it returned."""
    return time.time()


def sleeper(seconds: float = 0.05) -> list[float]:
    """The bare counterpart of ``bench_agents.sleeper``: ``[start, end, pid]``."""
    start = time.time()
    time.sleep(seconds)
    return [start, time.time(), os.getpid()]


def make_app(url: str, prefix: str, events: bool = True) -> Celery:
    """The bare app, with its tasks ``bench.noop`` and ``bench.sleeper``."""
    app = Celery("bare_celery", set_as_current=False)
    app.conf.update(bare_config(url, prefix, events))
    app.task(name="bench.noop")(noop)
    app.task(name="bench.sleeper")(sleeper)
    return app


app = make_app(URL, PREFIX, EVENTS)
