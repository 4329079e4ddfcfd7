"""Worker processes serve snapshots from their cache and report it, on real workers."""

from __future__ import annotations

import time

from lightning_queue import LightningClient, PromptTemplate, Settings


def test_workers_hit_their_cache_see_updates_and_report_stats(settings: Settings, start_workers) -> None:
    settings = settings.model_copy(update={"cache_stats_interval_seconds": 0.3})
    client = LightningClient(settings)
    client.add_resources({"prompt": PromptTemplate(template="v1 {x}")}, "rs-a")
    start_workers("tests.integration.agents:echo", count=1, settings=settings)

    first = client.wait_for_rollouts([r.rollout_id for r in client.enqueue_rollouts([{"x": i} for i in range(6)])],
                                     timeout=60)
    client.update_resources("rs-a", {"prompt": PromptTemplate(template="v2 {x}")})
    second = client.wait_for_rollouts([r.rollout_id for r in client.enqueue_rollouts([{"x": i} for i in range(3)])],
                                      timeout=60)
    # The update is seen by the very next rollouts, although the first ones were served from memory.
    assert {r.result.output["prompt"] for r in first} == {"v1 {x}"}  # type: ignore[union-attr]
    assert {r.result.output["prompt"] for r in second} == {"v2 {x}"}  # type: ignore[union-attr]

    deadline = time.monotonic() + 20
    while True:
        stats = client.cache_stats()
        if sum(s["hits"] + s["misses"] for s in stats.values()) >= 9:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    (process, reported), = stats.items()  # one worker, one pool process
    assert process.startswith("w1-") and reported["hits"] >= 6, reported  # pre-warmed: v1 never fetched on a rollout
    assert reported["misses"] <= 2, reported  # at most the first v2 fetch (and a race at start)
    client.close()
