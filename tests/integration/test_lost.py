"""Nothing lost, nothing stuck: task messages that vanish, workers that must survive what the
broker holds or throws, queue names that would break the broker. Real workers, real Redis
(a private, restartable ``redis-server`` where Redis restarts)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_queue import LightningClient, PromptTemplate, Rollout, RolloutConfig, Settings
from lightning_queue.core.errors import InvalidQueueNameError
from lightning_queue.ops.fleet import WorkerProcess
from tests.integration.test_resilience import restartable_redis  # noqa: F401 (a fixture: AOF, appendfsync always)

AGENTS = "tests.integration.agents"
WAIT = 90.0
# Fast sweeps, so the reaper and the retry schedule act within a second or two.
FAST = {"message_grace_seconds": 1.0, "watchdog_interval": 0.25, "retry_poll_interval": 0.2,
        "heartbeat_interval": 2.0, "visibility_timeout": 10}


def wait_until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fast_settings(url: str, prefix: str) -> Settings:
    return Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q", **FAST)


def log_of(workers: list[WorkerProcess]) -> str:
    return "\n".join(w.log() for w in workers)


# --------------------------------------------------------------------------- item 1


def test_a_worker_holding_eta_messages_survives_a_redis_restart(
    restartable_redis, prefix: str, start_workers  # noqa: F811
) -> None:
    url, restart = restartable_redis
    # The messages the worker held come back after the visibility timeout: keep it short.
    settings = fast_settings(url, prefix).model_copy(update={"visibility_timeout": 4, "heartbeat_interval": 1.0})
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")}, "rs-a")
        (worker,) = start_workers(f"{AGENTS}:echo", count=1, settings=settings)
        rollouts = [Rollout(input={"i": i}, queue=settings.queue) for i in range(3)]
        ids = [r.rollout_id for r in rollouts]
        # ETA messages, as retries with a backoff used to be: the worker takes them and holds them.
        client.publisher.publish(rollouts, client.store.create_rollouts(rollouts), countdown=3)
        wait_until(lambda: worker.log().count("received") >= 3, "the worker to take the three messages")

        restart(down_seconds=0.5)
        # kombu used to raise AttributeError('NoneType' ... 'hostname') closing the broken connection.
        wait_until(lambda: not worker.alive or worker.log().count("Connected to") >= 2, "the worker to reconnect")
        assert worker.alive and "Unrecoverable error" not in worker.log(), worker.log()[-4000:]

        done = client.wait_for_rollouts(ids, timeout=WAIT)
        assert [r.status for r in done] == ["succeeded"] * 3
        for rid in ids:
            assert [a.status for a in client.get_attempts(rid)] == ["succeeded"]


# --------------------------------------------------------------------------- item 2


def test_retries_with_a_backoff_survive_redis_restarts(
    restartable_redis, prefix: str, start_workers  # noqa: F811
) -> None:
    url, restart = restartable_redis
    settings = fast_settings(url, prefix)
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")}, "rs-a")
        workers = start_workers("tests.integration.lost_agents:fails_twice", count=4, settings=settings)
        # Backoffs of 1 s, then 2 s: retries wait long enough for Redis to restart meanwhile (they
        # used to wait in ETA messages the workers held, and the workers exited on the restart).
        config = RolloutConfig(max_attempts=5, retry_backoff_seconds=1)
        ids = [r.rollout_id for r in client.enqueue_rollouts([{"i": i} for i in range(20)], config=config)]

        def retries_wait() -> bool:
            """Some retries wait their backoff now: in the retry schedule, or (before) as ETA
            messages the workers took (more unacked messages than rollouts running)."""
            running = sum(r.status in ("preparing", "running") for r in client.get_rollouts(ids))
            return client.redis.zcard(client.keys.delayed) > 0 or client.redis.hlen(client.keys.celery_unacked) > running

        wait_until(retries_wait, "retries to wait their backoff")
        restart(down_seconds=0.5)
        wait_until(lambda: any(a.sequence_id == 2 for rid in ids for a in client.get_attempts(rid)) and retries_wait(),
                   "second attempts' retries to wait theirs")
        restart(down_seconds=0.5)

        done = client.wait_for_rollouts(ids, timeout=WAIT)
        assert all(w.alive for w in workers), log_of(workers)[-4000:]
        assert [r.status for r in done] == ["succeeded"] * 20, [r.status for r in client.get_rollouts(ids)]
        for rid in ids:
            attempts = [a.status for a in client.get_attempts(rid)]
            assert attempts.count("succeeded") == 1 and attempts[-1] == "succeeded", (rid, attempts)
        assert client.redis.zcard(client.keys.delayed) == 0


# --------------------------------------------------------------------------- item 3


def test_rollouts_whose_message_vanished_are_sent_again(settings: Settings, start_workers) -> None:
    settings = settings.model_copy(update=FAST)
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")}, "rs-a")
        # Enqueued while no worker runs, then their messages are removed from the queue list.
        deleted = [r.rollout_id for r in client.enqueue_rollouts([{"i": i} for i in range(3)])]
        client.redis.delete(*client.keys.celery_queues(settings.queue).values())
        # A client killed between writing its records and publishing (no idempotency key to retry with).
        unsent = [Rollout(input={"j": j}, queue=settings.queue) for j in range(3)]
        client.store.create_rollouts(unsent)

        workers = start_workers(f"{AGENTS}:echo", count=1, settings=settings)
        ids = deleted + [r.rollout_id for r in unsent]
        done = client.wait_for_rollouts(ids, timeout=WAIT)

        assert [r.status for r in done] == ["succeeded"] * 6
        assert all([a.status for a in client.get_attempts(rid)] == ["succeeded"] for rid in ids)
        assert log_of(workers).count("its task message was found nowhere twice") == 6
        assert client.redis.zcard(client.keys.pending) == 0


def test_a_thread_pool_of_200_acks_and_records_every_rollout(
    settings: Settings, start_workers, tmp_path: Path
) -> None:
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")}, "rs-a")
        (worker,) = start_workers(f"{AGENTS}:gated", count=1, pool="threads", concurrency=200)
        gate = tmp_path / "gate"
        ids = [r.rollout_id for r in client.enqueue_rollouts([{"gate": str(gate)} for _ in range(200)])]
        wait_until(lambda: sum(r.status == "running" for r in client.get_rollouts(ids)) == 200, "200 to run at once")
        gate.touch()  # 200 results recorded and 200 messages acked at once, from 200 threads

        done = client.wait_for_rollouts(ids, timeout=WAIT)
        assert [r.status for r in done] == ["succeeded"] * 200
        wait_until(lambda: client.redis.hlen(client.keys.celery_unacked) == 0, "every message to be acked")
        assert "MaxConnectionsError" not in worker.log() and "Couldn't ack" not in worker.log()


# --------------------------------------------------------------------------- items 10 and 11


def poison(template: bytes) -> dict[str, bytes]:
    """Malformed messages of every shape, made from a good one."""
    good = json.loads(template)

    def changed(**fields: object) -> bytes:
        return json.dumps({**good, **fields}).encode()

    return {
        "not JSON": b"this is not json",
        "a JSON list": b"[1, 2, 3]",
        "no 'properties' object": changed(properties="x"),
        "body is not base64": changed(body="!!!not base64!!!"),
        "body is not JSON": changed(body=base64.b64encode(b"garbage{").decode()),
        "content type": changed(**{"content-type": "application/x-python-serialize"}),
        "above the limit": changed(headers={**good["headers"], "junk": "x" * 2_000_000}),
    }


def test_malformed_messages_are_set_aside_and_the_next_one_runs(shared_workers) -> None:
    share = shared_workers(f"{AGENTS}:echo", count=1)
    client, keys = share.client, share.client.keys
    client.add_resources({"prompt": PromptTemplate(template="p")}, "rs-poison")
    template = client.publisher.build([Rollout(input=0, queue=share.settings.queue)], [(None, None)])
    shapes = poison(template.by_queue[share.settings.queue][0])
    queue_key = keys.celery_queue(share.settings.queue)
    client.redis.delete(keys.dead_letters)
    for reason, message in shapes.items():
        client.redis.lpush(queue_key, message)
        # Each poison message is followed by a good one, which must not be lost with it.
        good = client.enqueue_rollout({"after": reason}, resources_id="rs-poison")
        [done] = client.wait_for_rollouts([good.rollout_id], timeout=WAIT)
        assert done.status == "succeeded", reason

    assert all(w.alive for w in share.workers)
    letters = [json.loads(e) for e in client.redis.lrange(keys.dead_letters, 0, -1)][::-1]  # oldest first
    assert len(letters) == len(shapes)
    for (reason, message), letter in zip(shapes.items(), letters, strict=True):
        assert reason in letter["reason"] and letter["queue"] == share.settings.queue
        assert letter["size"] == len(message)
    assert share.log(share.workers[0]).count("refused a malformed message") == len(shapes)


def test_a_queue_name_the_broker_uses_is_refused_and_workers_go_on(shared_workers) -> None:
    share = shared_workers(f"{AGENTS}:echo", count=1)
    client, keys = share.client, share.client.keys
    for name in ("unacked", "unacked_index", "reply.celery.pidbox"):
        with pytest.raises(InvalidQueueNameError, match=f"queue name '{name}' cannot be used"):
            client.enqueue_rollouts([1], queue=name)
    assert client.redis.type(keys.celery_unacked) in (b"hash", b"none")  # never a list
    good = client.enqueue_rollout({"x": 1})
    [done] = client.wait_for_rollouts([good.rollout_id], timeout=WAIT)
    assert done.status == "succeeded"
