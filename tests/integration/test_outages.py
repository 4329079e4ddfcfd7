"""Redis going away, with real workers and a redis-server of the test's own: restarted empty (no
persistence), and down for longer than the retry budget and the heartbeat timeout. Data loss is
reported, never papered over; an outage is waited out, never turned into failures."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lightning_queue import LightningClient, PromptTemplate, RegistryLostError, RolloutConfig, Settings
from tests.integration.private_redis import private_redis_fixture  # noqa: F401 (the private_redis fixture)

AGENTS = "tests.integration.agents"
WAIT = 90.0
AOF = ["--appendonly", "yes", "--appendfsync", "always"]


def wait_until(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_redis_restarted_empty_is_reported_and_old_content_never_served(
    private_redis, prefix: str, start_workers, worker_pool, tmp_path: Path
) -> None:
    server = private_redis()  # no persistence: a restart loses every key
    settings = Settings(redis_url=server.url(), key_prefix=prefix, queue=f"{prefix}-q", heartbeat_interval=1.0,
                        redis_retry_seconds=5)
    algorithm, waiting = LightningClient(settings), LightningClient(settings)
    try:
        algorithm.add_resources({"prompt": PromptTemplate(template="old {x}")}, "rs-a")
        start_workers(f"{AGENTS}:echo", count=2, settings=settings)
        warm = algorithm.enqueue_rollouts([{"x": i} for i in range(6)], resources_id="rs-a")
        done = algorithm.wait_for_rollouts([r.rollout_id for r in warm], timeout=WAIT)
        assert {r.result.output["prompt"] for r in done} == {"old {x}"}  # type: ignore[union-attr]  # both caches hold it

        gate = tmp_path / "gate"
        queued = algorithm.enqueue_rollouts([{"x": i, "gate": str(gate)} for i in range(30)], resources_id="rs-a")
        with ThreadPoolExecutor(1) as pool:
            wait = pool.submit(waiting.wait_for_rollouts, [r.rollout_id for r in queued], None)
            wait_until(lambda: int(algorithm.redis.pubsub_numsub(algorithm.keys.events)[0][1]) >= 1,
                       "the wait's subscription")
            server.restart()  # everything is gone: the 30 will never finish
            gate.touch()
            # Not a silent hang, not a short list: the wait says why its rollouts vanished.
            with pytest.raises(RegistryLostError, match="Redis lost its data") as lost:
                wait.result(WAIT)
        assert lost.value.rollout_id in {r.rollout_id for r in queued}

        # The algorithm's next write is refused, once, with the same news; then it starts over.
        with pytest.raises(RegistryLostError, match="store the snapshots again"):
            algorithm.add_resources({"prompt": PromptTemplate(template="new {x}")}, "rs-a")
        again = algorithm.add_resources({"prompt": PromptTemplate(template="new {x}")}, "rs-a")
        assert again.version == 1  # the same (id, version) as the content the workers cached
        worker_pool.wait_for_log("Redis lost its data", timeout=WAIT)

        rerun = algorithm.enqueue_rollouts([{"x": i} for i in range(10)], resources_id="rs-a")
        done = algorithm.wait_for_rollouts([r.rollout_id for r in rerun], timeout=WAIT)
        assert [r.status for r in done] == ["succeeded"] * 10
        # Every one ran with the content its attempt records: none with the old prompt from a cache.
        assert [r.result.output["prompt"] for r in done] == ["new {x}"] * 10  # type: ignore[union-attr]
        assert {(a.resources_id, a.resources_version) for r in done for a in algorithm.get_attempts(r.rollout_id)} \
            == {("rs-a", 1)}
    finally:
        algorithm.close()
        waiting.close()


def test_an_outage_longer_than_the_retry_budget_and_the_heartbeat_timeout_fails_nothing(
    private_redis, prefix: str, start_workers, tmp_path: Path
) -> None:
    # A retry budget of 1 s and a heartbeat timeout of 3 s, against a 6-s outage: every command in
    # flight runs out of retries, and every deadline passes, while both agents live.
    server = private_redis(AOF)
    settings = Settings(redis_url=server.url(), key_prefix=prefix, queue=f"{prefix}-q", redis_retry_seconds=1,
                        heartbeat_interval=0.5, heartbeat_timeout=3.0)
    client = LightningClient(settings.model_copy(update={"redis_retry_seconds": 10}))
    try:
        client.add_resources({"prompt": PromptTemplate(template="p {x}")}, "rs-a")
        start_workers(f"{AGENTS}:gated", count=2, settings=settings)
        during, after = tmp_path / "opens-during-the-outage", tmp_path / "opens-after-it"
        queued = client.enqueue_rollouts([{"gate": str(during)}, {"gate": str(after)}], resources_id="rs-a",
                                         config=RolloutConfig(max_attempts=3))
        ids = [r.rollout_id for r in queued]
        wait_until(lambda: all(r.status == "running" for r in client.get_rollouts(ids)), "both to run")

        server.stop()
        during.touch()  # one agent finishes while Redis is down: its worker must keep the result
        time.sleep(6)  # how long Redis stays down, not a synchronization
        server.start()
        wait_until(lambda: client.get_rollout(ids[0]).is_finished, "the result kept through the outage")
        after.touch()  # the other ran through the outage and finishes now

        done = client.wait_for_rollouts(ids, timeout=WAIT)
        assert [r.status for r in done] == ["succeeded", "succeeded"]
        for rid in ids:  # on their first attempt: nobody declared them unresponsive or lost
            assert [a.status for a in client.get_attempts(rid)] == ["succeeded"], client.get_attempts(rid)
    finally:
        client.close()
