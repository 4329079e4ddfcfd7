"""Rollout queries on a real Redis (the unit tests run the same scripts on fakeredis's Lua)."""

from __future__ import annotations

import itertools
from typing import Any

from lightning_queue import LightningClient, Rollout, RolloutConfig
from lightning_queue.core.queries import RolloutFilter
from tests.unit.test_queries import agree_with_brute_force


def test_queries_agree_with_a_brute_force_reading(client: LightningClient) -> None:
    clock = itertools.count(1_000_000)

    def make(n: int = 1, **fields: Any) -> list[Rollout]:
        fields.setdefault("config", RolloutConfig())
        rollouts = [Rollout(input={"i": i}, enqueue_time=float(next(clock)), **fields) for i in range(n)]
        client.store.create_rollouts(rollouts)
        return rollouts

    agree_with_brute_force(client.store, make)
    # The finished stream: every final transition once, in the order they happened.
    finished = [i.rollout_id for i in client.finished_rollouts(limit=1000).items]
    ended = client.query_rollouts(RolloutFilter(order_by="end_time", newest_first=False), limit=1000)
    assert len(finished) == len(set(finished)) == len(ended) and set(finished) == {r.rollout_id for r in ended}
    end_times = {r.rollout_id: r.end_time or 0.0 for r in ended}
    assert [end_times[rid] for rid in finished] == sorted(end_times[rid] for rid in finished)
    assert not client.redis.keys(f"{client.keys.prefix}:query:*")  # scratch keys never outlive a call
