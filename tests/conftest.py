"""Shared fixtures.

Unit tests get a :class:`LightningClient` on fakeredis (``fake_client``).
Integration tests get a real Redis URL (``redis_url``): ``LQ_TEST_REDIS_URL``
if set, else the server on 127.0.0.1:6379 if it answers, else a
``redis-server`` started for the session, else the embedded fakeredis TCP
server. Every test works under its own key prefix and deletes only the keys
under that prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from lightning_queue import LightningClient, Settings
from lightning_queue.ops.embedded import EmbeddedRedis
from lightning_queue.storage.connections import ping
from tests.openai_stub import OpenAIStub


@pytest.fixture
def prefix() -> str:
    return f"lqtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    client.close()


@pytest.fixture
def fake_client(fake_redis: fakeredis.FakeRedis, prefix: str) -> Iterator[LightningClient]:
    """A client whose registry and store run on fakeredis (publishing to Celery is not available)."""
    settings = Settings(redis_url="redis://fakeredis.invalid:1/0", key_prefix=prefix)
    client = LightningClient(settings, redis_client=fake_redis)
    yield client


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("LQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if ping(url):
        yield url
        return
    server = EmbeddedRedis.start()
    try:
        yield server.url
    finally:
        server.stop()


def delete_prefix(url: str, key_prefix: str) -> None:
    """Delete every key under ``key_prefix`` (and nothing else)."""
    client = redis.Redis.from_url(url)
    try:
        batch = []
        for key in client.scan_iter(match=f"{key_prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Iterator[Settings]:
    """Settings for a real Redis under a fresh prefix (keys removed afterwards)."""
    yield Settings(redis_url=redis_url, key_prefix=prefix, queue=f"{prefix}-q")
    delete_prefix(redis_url, prefix)


@pytest.fixture
def client(settings: Settings) -> Iterator[LightningClient]:
    with LightningClient(settings) as c:
        yield c


@pytest.fixture
def openai_stub() -> Iterator[OpenAIStub]:
    """A local OpenAI-compatible server (``tests/openai_stub.py``); point an LLM at ``openai_stub.endpoint``."""
    with OpenAIStub() as stub:
        yield stub
