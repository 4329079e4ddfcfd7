"""Batches cost a constant number of Redis round trips, whatever their size."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis.connection

from lightning_queue import LightningClient, PromptTemplate


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts every command (or pipeline) written to any Redis connection of this process."""
    counter = {"n": 0}
    send = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        counter["n"] += 1
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    yield counter


def test_enqueue_rollouts_round_trips_do_not_grow_with_the_batch(
    client: LightningClient, round_trips: dict[str, int]
) -> None:
    client.add_resources({"prompt": PromptTemplate(template="Q: {question}")}, "rs-a")
    client.enqueue_rollouts([0], resources_id="rs-a")  # scripts loaded, queue declared, connections open
    costs = {}
    for size in (1, 10, 200):
        round_trips["n"] = 0
        rollouts = client.enqueue_rollouts(list(range(size)), resources_id="rs-a")
        costs[size] = round_trips["n"]
        assert len(rollouts) == size
    # resolve the snapshot, write the records, push the messages and publish their task-sent events (one pipeline)
    assert costs == {1: 3, 10: 3, 200: 3}
    queued = client.query_rollouts(status="queuing", limit=1000)
    assert len(queued) == 1 + 1 + 10 + 200


def test_add_resources_batch_round_trips_do_not_grow_with_the_batch(
    client: LightningClient, round_trips: dict[str, int]
) -> None:
    client.add_resources({"prompt": PromptTemplate(template="warm-up {x}")}, "warm-up")
    costs = {}
    for size in (1, 50):
        round_trips["n"] = 0
        client.add_resources_batch(
            [(f"rs-{size}-{i}", {"prompt": PromptTemplate(template=f"v{i} {{x}}")}) for i in range(size)]
        )
        costs[size] = round_trips["n"]
    assert costs[1] == costs[50] <= 2  # SCRIPT EXISTS, then the pipeline
    assert client.get_latest_resources().resources_id == "rs-50-49"  # type: ignore[union-attr]
