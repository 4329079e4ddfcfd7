"""Worker liveness records: consumption health of each worker and cache stats of each process.

Liveness is judged by consumption rather than by the process being up.

A worker can stay alive yet stop consuming (a known Celery/kombu failure mode
after a Redis reconnect): its process answers, its pool is idle, and its queue
fills up. So each worker's main process records, under
``{p}:worker:{hostname}`` with a TTL, when it last received a message, how many
it runs and can run, the queues it was started to consume (and those it
consumes now), and since when it has seen messages waiting in those queues
without receiving any. :func:`judge` reads such a record: a worker is
**stalled** when messages have waited in its queues longer than the threshold
while it had free slots and received nothing. A worker whose main process is
gone or hung stops refreshing its record, which then expires.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from lightning_queue.core.keys import Keys
from lightning_queue.storage.connections import text


@dataclass
class WorkerHealth:
    """One worker main process, as it last reported itself, and the verdict on it."""

    hostname: str
    pid: int
    concurrency: int
    active: int
    queues: list[str]
    consuming: list[str]
    queued: dict[str, int]
    last_received: float | None
    backlog_since: float | None
    updated: float
    stalled: bool = False
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def free_slots(self) -> int:
        return max(0, self.concurrency - self.active)


def judge(record: dict[str, Any], threshold: float, now: float | None = None) -> WorkerHealth:
    """A worker's health from its record: stalled when messages waited in its queues for at
    least ``threshold`` seconds while it had free slots and received nothing."""
    now = time.time() if now is None else now
    known = set(WorkerHealth.__dataclass_fields__) - {"stalled", "reason", "extra"}
    health = WorkerHealth(**{k: record[k] for k in known if k in record},
                          extra={k: v for k, v in record.items() if k not in known})
    waited = now - health.backlog_since if health.backlog_since is not None else 0.0
    idle = now - health.last_received if health.last_received is not None else float("inf")
    if waited >= threshold and idle >= threshold and health.free_slots > 0:
        health.stalled = True
        missing = sorted(set(health.queues) - set(health.consuming))
        health.reason = (
            f"messages waited {waited:.0f} s in {', '.join(q for q, n in health.queued.items() if n) or 'its queue'} "
            f"while it had {health.free_slots} free slot(s) and received nothing "
            f"{'since it started' if health.last_received is None else f'for {idle:.0f} s'}"
            + (f"; it no longer consumes {', '.join(missing)}" if missing else "")
            + ". Restart it (its process is up but it does not consume)"
        )
    return health


class HealthRecorder:
    """Kept by a worker's main process: notes each message received and, on each tick,
    writes the worker's record (one pipelined round trip to read queue lengths, one write)."""

    def __init__(self, client: redis.Redis, keys: Keys, hostname: str, ttl: float) -> None:
        self.redis = client
        self.keys = keys
        self.hostname = hostname
        self.ttl = max(1, int(ttl))
        self.last_received: float | None = None
        self.backlog_since: float | None = None

    def received(self) -> None:
        self.last_received = time.time()
        self.backlog_since = None

    def report(self, queues: list[str], consuming: list[str], active: int, concurrency: int) -> dict[str, Any]:
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(self.keys.celery_queue(queue))
        queued = dict(zip(queues, pipe.execute(), strict=True))
        now = time.time()
        if any(queued.values()):
            if self.backlog_since is None:
                self.backlog_since = now
        else:
            self.backlog_since = None
        record = {
            "hostname": self.hostname, "pid": os.getpid(), "concurrency": concurrency, "active": active,
            "queues": queues, "consuming": consuming, "queued": queued, "last_received": self.last_received,
            "backlog_since": self.backlog_since, "updated": now,
        }
        self.redis.set(self.keys.worker_health(self.hostname), json.dumps(record), ex=self.ttl)
        return record


def read_worker_health(client: redis.Redis, keys: Keys, threshold: float) -> list[WorkerHealth]:
    """Every worker whose record has not expired, by hostname, judged against ``threshold``."""
    names = sorted(client.scan_iter(match=keys.worker_health_pattern, count=1000))
    values = client.mget(names) if names else []
    now = time.time()
    return [judge(json.loads(text(v)), threshold, now) for v in values if v is not None]


def read_cache_stats(client: redis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """The snapshot-cache stats each live worker process last reported, by ``node@host:pid``."""
    names = sorted(client.scan_iter(match=keys.cache_stats_pattern, count=1000))
    prefix = len(keys.cache_stats(""))
    values = client.mget(names) if names else []
    return {text(k)[prefix:]: json.loads(v) for k, v in zip(names, values, strict=True) if v is not None}
