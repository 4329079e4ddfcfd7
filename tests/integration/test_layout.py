"""How a finished rollout is laid out in a real Redis with its default configuration.

Redis keeps a small hash as a listpack (about half the memory of a hash table) only while
every value fits ``hash-max-listpack-value`` (64 bytes by default). These tests check that
a finished no-op rollout's record and attempt stay listpacks, on a ``redis-server`` of
their own (a shared server may have been configured otherwise). Layout, not timing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    RolloutConfig,
    RolloutResult,
    Settings,
    rollout,
)
from lightning_queue.broker.app import make_celery
from lightning_queue.core.models import Rollout
from lightning_queue.ops.embedded import EmbeddedRedis
from lightning_queue.worker import runner
from lightning_queue.worker.cache import SnapshotCache, start_cache
from lightning_queue.worker.context import WorkerContext

COMPACT = {"listpack", "ziplist"}  # Redis 7 / Redis 6 name for the same compact encoding


@rollout
def noop(task: Any) -> RolloutResult:
    return RolloutResult(output={"end": time.time()})


@pytest.fixture
def own_client() -> Iterator[LightningClient]:
    if not shutil.which("redis-server"):
        pytest.skip("needs the redis-server binary (its default configuration is what is checked)")
    server = EmbeddedRedis.start(prefer_binary=True)
    client = LightningClient(Settings(redis_url=server.url, key_prefix="layout", queue="layout-q"))
    try:
        yield client
    finally:
        client.close()
        server.stop()


def run_one(client: LightningClient, record: Rollout, cache: SnapshotCache | None) -> str:
    """Run the rollout through the runner in this process (no broker), as a worker would."""
    client.store.create_rollouts([record])
    ctx = WorkerContext.create(client.settings, make_celery(client.settings), redis_client=client.redis)
    ctx.cache = cache
    seq = int(client.redis.get(client.keys.seq) or 0)
    try:
        return str(runner.run(ctx, noop, "layout@host", record.rollout_id, seq, record.resources_id,
                              record.resources_version)["status"])
    finally:
        if cache is not None:
            cache.close()


def encodings(client: LightningClient, rollout_id: str) -> dict[str, str]:
    raw = redis.Redis.from_url(client.settings.redis_url)
    try:
        assert raw.config_get("hash-max-listpack-value").get("hash-max-listpack-value", "64") == "64"
        return {key: raw.object("encoding", key).decode()
                for key in (client.keys.rollout(rollout_id), client.keys.attempt(rollout_id, 1))}
    finally:
        raw.close()


@pytest.mark.parametrize("cached", [False, True], ids=["claim-then-start", "claim-starts"])
@pytest.mark.parametrize("config", [RolloutConfig(), RolloutConfig(max_attempts=3, timeout_seconds=60)],
                         ids=["default-config", "custom-config"])
def test_finished_noop_rollout_keys_stay_listpacks(own_client: LightningClient, cached: bool,
                                                   config: RolloutConfig) -> None:
    own_client.add_resources({"prompt": PromptTemplate(template="{question}")}, "layout-snap")
    cache = start_cache(own_client.registry, own_client.settings) if cached else None
    assert (cache is not None) == cached
    record = Rollout(input={"i": 1}, resources_id="layout-snap", resources_version=1, resolve="pinned",
                     config=config)
    assert run_one(own_client, record, cache) == "succeeded"
    done = own_client.get_rollout(record.rollout_id)
    assert done.status == "succeeded" and done.result is not None and done.config == config
    attempt, = own_client.get_attempts(record.rollout_id)
    assert attempt.result == done.result and attempt.resources_id == "layout-snap"
    found = encodings(own_client, record.rollout_id)
    assert set(found.values()) <= COMPACT, found
