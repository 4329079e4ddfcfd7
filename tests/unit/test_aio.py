"""The asyncio client on fakeredis: native waits, cancellation, and the calls that go through threads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from lightning_queue import AsyncLightningClient, Rollout, RolloutNotFoundError, RolloutResult
from lightning_queue.core.queries import RolloutFilter
from lightning_queue.storage.store import RolloutStore
from tests.unit.test_store import run_to_running


async def test_cancelled_waits_leave_the_client_usable(
    async_client: AsyncLightningClient, make_rollouts: Callable[..., list[Rollout]]
) -> None:
    (never,) = make_rollouts(1)
    for _ in range(20):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(async_client.wait_for_rollouts([never.rollout_id]), 0.05)
    started = time.perf_counter()
    assert await asyncio.wait_for(async_client.get_pointer("prod"), 5) is None  # generous: a shared machine
    print(f"get_pointer after 20 cancelled waits: {(time.perf_counter() - started) * 1000:.1f} ms")
    await asyncio.wait_for(async_client.close(), 5)


async def test_wait_is_woken_by_a_notification(
    async_client: AsyncLightningClient, store: RolloutStore, make_rollouts: Callable[..., list[Rollout]]
) -> None:
    a, b = make_rollouts(2)
    seen: list[str] = []
    task = asyncio.create_task(async_client.wait_for_rollouts([b.rollout_id, a.rollout_id], timeout=30,
                                                              on_finished=lambda r: seen.append(r.rollout_id)))
    while store.redis.pubsub_numsub(store.keys.events)[0][1] < 1:
        await asyncio.sleep(0.01)
    for rollout, reward in ((a, 1.0), (b, 2.0)):
        seq = run_to_running(store, rollout)
        store.finish_attempt(rollout.rollout_id, seq, "succeeded", "succeeded", result=RolloutResult(reward=reward))
    done = await asyncio.wait_for(task, 30)
    assert [(r.rollout_id, r.reward) for r in done] == [(b.rollout_id, 2.0), (a.rollout_id, 1.0)]
    assert sorted(seen) == sorted([a.rollout_id, b.rollout_id])


async def test_wait_times_out_with_what_finished(
    async_client: AsyncLightningClient, store: RolloutStore, make_rollouts: Callable[..., list[Rollout]]
) -> None:
    a, b = make_rollouts(2)
    store.terminate(a.rollout_id, "cancelled")
    done = await async_client.wait_for_rollouts([a.rollout_id, b.rollout_id], timeout=0.1)
    assert [(r.rollout_id, r.status) for r in done] == [(a.rollout_id, "cancelled")]


async def test_wait_on_an_unknown_id_raises(async_client: AsyncLightningClient) -> None:
    with pytest.raises(RolloutNotFoundError, match="ro-ghost"):
        await async_client.wait_for_rollouts(["ro-ghost"], timeout=1)


async def test_async_with_closes(async_client: AsyncLightningClient) -> None:
    async with async_client as client:
        assert await client.pointers() == {}
        assert await client.query_rollouts(status=["queuing", "running"]) == []


async def test_queries_the_finished_cursor_and_bulk_cancel(
    async_client: AsyncLightningClient, store: RolloutStore, make_rollouts: Callable[..., list[Rollout]]
) -> None:
    a, b, c = make_rollouts(3, metadata={"team": "x"})
    store.terminate(a.rollout_id, "cancelled")
    assert [r.rollout_id for r in await async_client.query_rollouts(metadata={"team": "x"}, status="queuing")] == [
        c.rollout_id, b.rollout_id]
    page = await async_client.query_page(RolloutFilter(newest_first=False), limit=2)
    assert [r.rollout_id for r in page.rollouts] == [a.rollout_id, b.rollout_id] and page.next_cursor
    assert [i.rollout_id for i in (await async_client.finished_rollouts()).items] == [a.rollout_id]
    report = await async_client.cancel_rollouts(RolloutFilter(metadata={"team": "x"}), dry_run=False, terminate=False)
    assert report.cancelled == [c.rollout_id, b.rollout_id]
    seen = [item.rollout_id async for item in async_client.iter_finished_rollouts(idle_seconds=0.05)]
    assert seen == [a.rollout_id, c.rollout_id, b.rollout_id]
