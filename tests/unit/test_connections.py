"""Connections: the error a lost Redis raises, and the clients waits use. Nothing listens on the
ports used here, so every connect is refused at once."""

from __future__ import annotations

import fakeredis
import pytest
import redis

from lightning_queue.core.errors import RedisUnavailableError
from lightning_queue.ops.embedded import free_port
from lightning_queue.storage.connections import (
    WAIT_IO_TIMEOUT,
    LightningRedis,
    RedisUnreachableError,
    connect,
    connect_async,
    retry_policy,
    server_url,
    waiting_client,
)


def test_a_command_that_exhausts_its_retries_raises_redis_unavailable_naming_the_url() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    client = connect(url, check=False, retry_seconds=0.3)
    for call in (lambda: client.get("k"), lambda: client.pipeline().get("k").get("j").execute(),
                 lambda: client.pubsub().subscribe("ch")):  # type: ignore[no-untyped-call]
        with pytest.raises(RedisUnavailableError) as info:
            call()
        message = str(info.value)
        assert "cannot reach Redis at redis://:**@127.0.0.1" in message and "hunter2" not in message
        assert message.count("cannot reach Redis") == 1  # named once, though connect and command both retry
        assert isinstance(info.value, redis.ConnectionError)  # redis-py and the worker still recognise it


def test_the_retry_budget_sets_the_number_of_retries() -> None:
    assert [retry_policy(budget, "redis://h").get_retries() for budget in (0, 0.1, 0.35, 10)] == [0, 1, 2, 8]


def test_waits_get_a_client_of_their_own_that_gives_up_quickly() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/3"
    client = connect(url, check=False)
    assert isinstance(client, LightningRedis) and server_url(client) == url
    with waiting_client(client) as (waiting, server):
        assert waiting is not client and server == url
        kwargs = waiting.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (WAIT_IO_TIMEOUT, WAIT_IO_TIMEOUT)
        assert kwargs["retry"].get_retries() == 0  # the wait retries itself, up to its deadline
        with pytest.raises(RedisUnreachableError):
            waiting.get("k")


def test_other_clients_are_used_as_they_are() -> None:
    fake = fakeredis.FakeRedis()
    with waiting_client(fake) as (waiting, server):
        assert waiting is fake and server.startswith("redis://") and ":**@" not in server


async def test_the_asyncio_client_for_waits() -> None:
    client = connect_async(f"redis://127.0.0.1:{free_port()}/0")
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["retry"].get_retries()) == (WAIT_IO_TIMEOUT, 0)
    with pytest.raises(redis.ConnectionError):
        await client.get("k")
    await client.aclose()
