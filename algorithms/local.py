"""Run an example against its own local fleet: ``--workers N`` in the example scripts.

Starts N ``celery worker`` processes for ``workers/demo_agent.py`` under a fresh key
prefix (and queue) on the Redis named by ``LQ_REDIS_URL``, yields a client for
them, and afterwards stops the workers and deletes that prefix's keys. Without it
the scripts use the settings and the workers you already run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_queue import LightningClient, Settings
from lightning_queue.ops.fleet import LocalFleet

DEMO_AGENT = "workers.demo_agent:agent"
ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def client_for(workers: int, agent: str = DEMO_AGENT, app: str = "lightning_queue.app") -> Iterator[LightningClient]:
    if workers <= 0:
        with LightningClient() as client:
            yield client
        return
    base = Settings()
    prefix = f"lq-example-{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(update={"key_prefix": prefix, "queue": f"{prefix}-rollouts"})
    client = LightningClient(settings)
    try:
        with LocalFleet(settings, agent, count=workers, concurrency=2, pythonpath=[str(ROOT)], cwd=str(ROOT),
                        app=app):
            yield client
    finally:
        keys = list(client.redis.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.redis.delete(*keys[i : i + 500])
        client.close()
