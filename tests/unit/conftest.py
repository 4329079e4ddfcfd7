"""Fixtures shared by the unit tests (all on fakeredis, see ``tests/conftest.py``)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import fakeredis
import pytest

from lightning_queue import LLM, AsyncLightningClient, LightningClient, PromptTemplate, Rollout, RolloutConfig
from lightning_queue.core.keys import ROLLOUT_STATUSES
from lightning_queue.storage.registry import SnapshotRegistry
from lightning_queue.storage.store import RolloutStore


@pytest.fixture
def llm() -> LLM:
    return LLM(endpoint="http://llm.local/v1", model="tiny", api_key="sk-very-secret", sampling_parameters={"temperature": 0.2})


@pytest.fixture
def prompt() -> PromptTemplate:
    return PromptTemplate(template="Solve: {question}")


@pytest.fixture
async def async_client(fake_client: LightningClient, fake_redis: fakeredis.FakeRedis) -> AsyncIterator[AsyncLightningClient]:
    """An :class:`AsyncLightningClient` on ``fake_client``'s fake server (its sync calls share
    ``fake_client``'s connection, its waits use a ``FakeAsyncRedis``)."""
    server = fake_redis.connection_pool.connection_kwargs["server"]
    client = AsyncLightningClient(fake_client.settings, redis_client=fake_redis,
                                  async_redis_client=fakeredis.FakeAsyncRedis(server=server))
    yield client
    await client.redis.aclose()


@pytest.fixture
def registry(fake_client: LightningClient) -> SnapshotRegistry:
    return fake_client.registry


@pytest.fixture
def store(fake_client: LightningClient) -> RolloutStore:
    return fake_client.store


@pytest.fixture
def make_rollouts(store: RolloutStore) -> Callable[..., list[Rollout]]:
    """Create rollouts with strictly increasing enqueue times (so "newest first" is well defined)."""
    clock = itertools.count(1_000_000)

    def make(n: int = 1, **fields: Any) -> list[Rollout]:
        fields.setdefault("config", RolloutConfig())
        rollouts = [Rollout(input={"i": i}, enqueue_time=float(next(clock)), **fields) for i in range(n)]
        store.create_rollouts(rollouts)
        return rollouts

    return make


@pytest.fixture
def status_index_members(store: RolloutStore) -> Callable[[str], list[str]]:
    """The status indexes that hold ``rollout_id`` (must always be exactly one)."""

    def members(rollout_id: str) -> list[str]:
        return [s for s in ROLLOUT_STATUSES
                if store.redis.zscore(store.keys.rollouts_by_status(s), rollout_id) is not None]

    return members


@pytest.fixture
def published(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Rollout ids handed to ``publish`` (no broker in unit tests)."""
    sent: list[str] = []

    def publish(rollouts: Sequence[Rollout], registry_seq: int = 0, countdown: float | None = None) -> None:
        sent.extend(r.rollout_id for r in rollouts)

    monkeypatch.setattr(fake_client, "publish", publish)
    return sent


@pytest.fixture
def enqueue(fake_client: LightningClient, published: list[str]) -> Callable[..., Rollout]:
    def enqueue(input: Any = "task", **options: Any) -> Rollout:
        return fake_client.enqueue_rollout(input, **options)

    return enqueue
