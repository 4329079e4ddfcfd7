"""Deleting snapshots: refused while in use, forced deletion fails its rollouts and moves its pointers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest

from lightning_queue import (
    LightningClient,
    NoLatestResourcesError,
    PromptTemplate,
    ResourcesNotFoundError,
    Rollout,
    RolloutConfig,
    rollout,
)
from lightning_queue.core.errors import RolloutFailed, SnapshotInUseError
from lightning_queue.storage.registry import DeleteReport
from tests.unit.test_runner import FakeTask, recording_agent, run


def prompt(text: str) -> dict[str, PromptTemplate]:
    return {"prompt": PromptTemplate(template=text)}


def state(fake_redis: fakeredis.FakeRedis) -> dict[bytes, bytes]:
    return {key: fake_redis.dump(key) for key in fake_redis.keys("*")}


def snapshot_keys(client: LightningClient, resources_id: str) -> list[bytes]:
    return sorted(client.redis.keys(f"{client.keys.snapshot(resources_id)}*"))


@pytest.fixture
def three(fake_client: LightningClient) -> LightningClient:
    """rs-a (versions 1-3), rs-b, rs-c; latest names rs-c."""
    fake_client.add_resources(prompt("a1"), "rs-a")
    fake_client.update_resources("rs-a", prompt("a2"))
    fake_client.update_resources("rs-a", prompt("a3"))
    fake_client.add_resources(prompt("b1"), "rs-b")
    fake_client.add_resources(prompt("c1"), "rs-c")
    return fake_client


def moves(client: LightningClient, pointer: str) -> list[tuple[str | None, str | None, str]]:
    return [(m.from_id, m.to_id, m.op) for m in client.pointer_history(pointer)]


def start_running(client: LightningClient, queued: Rollout, resources_id: str, version: int = 1) -> None:
    """What a worker does before calling the agent: claim, then start with a concrete snapshot."""
    claim = client.store.claim(queued, "worker-1@host")
    assert client.store.start_attempt(queued.rollout_id, claim.sequence_id, resources_id, version)


# --------------------------------------------------------------------------- refused


def test_delete_refused_while_pointers_name_it(three: LightningClient, fake_redis: fakeredis.FakeRedis) -> None:
    three.set_pointer("prod", "rs-a")
    three.set_pointer("canary", "rs-a")
    before = state(fake_redis)

    with pytest.raises(SnapshotInUseError) as info:
        three.delete_resources("rs-a")
    error = info.value
    assert error.resources_id == "rs-a"
    assert sorted(error.pointers) == ["canary", "prod"] and error.rollout_ids == []
    message = str(error)
    assert "'rs-a' is in use" in message and "pointers canary, prod name it" in message
    assert "force=True" in message  # what to do next

    with pytest.raises(SnapshotInUseError, match="pointers latest name it"):
        three.delete_resources("rs-c")
    assert state(fake_redis) == before


def test_delete_refused_while_queued_or_running_rollouts_use_it(
    three: LightningClient, enqueue: Callable[..., Rollout], fake_redis: fakeredis.FakeRedis
) -> None:
    queued_pinned = enqueue(resources_id="rs-a")
    queued_following_id = enqueue(resources_id="rs-a", resolve="following")
    running = enqueue()  # follows latest: uses rs-a once it starts with it
    start_running(three, running, "rs-a", 3)
    done = enqueue(resources_id="rs-a")
    three.store.terminate(done.rollout_id, "cancelled")
    enqueue(resources_id="rs-b")  # another snapshot's rollout
    before = state(fake_redis)

    with pytest.raises(SnapshotInUseError) as info:
        three.delete_resources("rs-a")

    error = info.value
    expected = {queued_pinned.rollout_id, queued_following_id.rollout_id, running.rollout_id}
    assert error.pointers == [] and set(error.rollout_ids) == expected
    assert "3 queued or running rollouts use it" in str(error)
    assert all(rid in str(error) for rid in expected)
    assert state(fake_redis) == before


def test_in_use_message_lists_a_few_rollouts_and_both_reasons(three: LightningClient, enqueue: Callable[..., Rollout]) -> None:
    queued = [enqueue(resources_id="rs-c") for _ in range(7)]
    with pytest.raises(SnapshotInUseError) as info:
        three.delete_resources("rs-c")
    message = str(info.value)
    assert "pointers latest name it" in message and "7 queued or running rollouts use it" in message
    assert sum(r.rollout_id in message for r in queued) == 5 and "..." in message
    assert len(info.value.rollout_ids) == 7


# --------------------------------------------------------------------------- allowed


def test_deleting_an_unused_snapshot_removes_every_version(
    three: LightningClient, enqueue: Callable[..., Rollout], fake_redis: fakeredis.FakeRedis
) -> None:
    finished = enqueue(resources_id="rs-a")
    three.store.terminate(finished.rollout_id, "cancelled")  # finished rollouts do not hold a snapshot
    pointers_before = three.pointers()
    assert len(snapshot_keys(three, "rs-a")) == 3

    report = three.delete_resources("rs-a")

    assert report == DeleteReport("rs-a", [], [])
    assert snapshot_keys(three, "rs-a") == []
    for version in (None, 1, 2):
        with pytest.raises(ResourcesNotFoundError, match="rs-a"):
            three.get_resources_by_id("rs-a", version)
    assert three.registry.list_ids() == ["rs-c", "rs-b"] and three.registry.count() == 2
    assert three.pointers() == pointers_before
    assert three.get_resources_by_id("rs-b").resources == prompt("b1")
    assert three.get_rollout(finished.rollout_id).status == "cancelled"

    # The id is free again, with no old version coming back.
    assert three.add_resources(prompt("new"), "rs-a").version == 1
    with pytest.raises(ResourcesNotFoundError):
        three.get_resources_by_id("rs-a", 2)


def test_delete_unknown_raises(fake_client: LightningClient, fake_redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(ResourcesNotFoundError, match="rs-nope"):
        fake_client.delete_resources("rs-nope")
    fake_client.add_resources(prompt("a"), "rs-a")
    before = state(fake_redis)
    with pytest.raises(ResourcesNotFoundError, match="rs-nope"):
        fake_client.delete_resources("rs-nope", force=True)
    assert state(fake_redis) == before


# --------------------------------------------------------------------------- forced


def test_forced_delete_fails_its_rollouts_and_wakes_waiters(
    three: LightningClient, enqueue: Callable[..., Rollout], fake_redis: fakeredis.FakeRedis,
    status_index_members: Callable[[str], list[str]],
) -> None:
    queued = enqueue(resources_id="rs-a")
    requeuing = enqueue(resources_id="rs-a", config=RolloutConfig(max_attempts=2))
    seq = three.store.claim(requeuing, "worker-1@host").sequence_id
    three.store.finish_attempt(requeuing.rollout_id, seq, "failed", "requeuing")
    running = enqueue()
    start_running(three, running, "rs-a", 3)
    bystander = enqueue(resources_id="rs-b")
    victims = [queued, requeuing, running]
    ids = [r.rollout_id for r in victims]

    waited: list[Rollout] = []
    waiter = threading.Thread(target=lambda: waited.extend(three.wait_for_rollouts(ids, timeout=30)))
    waiter.start()
    deadline = time.monotonic() + 30
    while fake_redis.pubsub_numsub(three.keys.events)[0][1] < 1:  # the waiter has subscribed
        assert time.monotonic() < deadline, "the waiter never subscribed"
        time.sleep(0.005)

    report = three.delete_resources("rs-a", force=True)
    waiter.join(30)

    assert not waiter.is_alive()
    assert sorted(report.failed_rollouts) == sorted(ids) and report.moved_pointers == []
    # Every one, before the wait's time-out: woken by the notifications (a time-out returns only
    # what had finished when the waiter subscribed, and none had).
    assert [r.rollout_id for r in waited] == ids
    for failed in three.get_rollouts(ids):
        assert failed.status == "failed" and failed.end_time is not None
        assert failed.error is not None and failed.error.type == "SnapshotDeletedError"
        assert "snapshot 'rs-a' was deleted" in failed.error.message
        assert status_index_members(failed.rollout_id) == ["failed"]
    assert three.get_rollout(bystander.rollout_id).status == "queuing"
    assert snapshot_keys(three, "rs-a") == []


def test_a_worker_never_runs_a_rollout_failed_by_a_forced_delete(
    three: LightningClient, enqueue: Callable[..., Rollout]
) -> None:
    queued = enqueue(resources_id="rs-a")
    three.delete_resources("rs-a", force=True)
    agent, calls = recording_agent()

    reply = run(FakeTask(three, agent), queued.rollout_id)  # the message is still in the broker

    assert reply == {"rollout_id": queued.rollout_id, "status": "failed"}
    assert calls == [] and three.get_attempts(queued.rollout_id) == []


def test_forced_delete_while_the_agent_runs_keeps_the_rollout_failed(
    three: LightningClient, enqueue: Callable[..., Rollout]
) -> None:
    queued = enqueue(resources_id="rs-b")

    @rollout
    def deletes_its_snapshot(task: Any, prompt: PromptTemplate) -> float:
        three.delete_resources("rs-b", force=True)
        return 1.0

    reply = run(FakeTask(three, deletes_its_snapshot), queued.rollout_id)

    assert reply["status"] == "failed"
    done = three.get_rollout(queued.rollout_id)
    assert done.status == "failed" and done.error.type == "SnapshotDeletedError"  # type: ignore[union-attr]
    attempt, = three.get_attempts(queued.rollout_id)
    assert (attempt.status, attempt.resources_id) == ("succeeded", "rs-b")  # the outcome stays on the attempt


def test_forced_delete_unsets_pointers_and_moves_latest_to_the_newest_remaining(
    three: LightningClient, fake_redis: fakeredis.FakeRedis
) -> None:
    three.update_resources("rs-a", prompt("a4"))  # rs-a: newest write, so latest
    three.set_pointer("prod", "rs-a")
    three.set_pointer("canary", "rs-b")
    pubsub = fake_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(three.keys.snapshot_events)

    report = three.delete_resources("rs-a", force=True)

    assert sorted(report.moved_pointers) == ["latest", "prod"] and report.failed_rollouts == []
    assert three.pointers() == {"latest": "rs-c", "canary": "rs-b"}  # rs-c is newer than rs-b
    assert three.get_latest_resources().resources == prompt("c1")  # type: ignore[union-attr]
    assert moves(three, "prod")[0] == ("rs-a", None, "delete")
    assert moves(three, "latest")[0] == ("rs-a", "rs-c", "delete")
    with pytest.raises(ResourcesNotFoundError, match="'prod'"):
        three.get_resources_by_id("prod")
    events = [json.loads(m["data"]) for m in (pubsub.get_message(timeout=0.05) for _ in range(5)) if m]
    pubsub.close()
    assert [(e["op"], e["id"], e["pointers"]) for e in events] == [
        ("delete", "rs-a", {"latest": "rs-c", "prod": False})
    ]

    # Newest write wins, not newest id: updating rs-b makes it the fallback.
    three.update_resources("rs-b", prompt("b2"))
    three.set_pointer("latest", "rs-c")
    three.delete_resources("rs-c", force=True)
    assert three.pointers() == {"latest": "rs-b", "canary": "rs-b"}


def test_forced_delete_of_the_last_snapshot_unsets_latest(
    fake_client: LightningClient, enqueue: Callable[..., Rollout]
) -> None:
    fake_client.add_resources(prompt("only"), "rs-only")
    following = enqueue()  # latest, at run time

    assert fake_client.delete_resources("rs-only", force=True).moved_pointers == ["latest"]

    assert fake_client.pointers() == {} and fake_client.get_latest_resources() is None
    with pytest.raises(RolloutFailed, match="NoLatestResourcesError"):
        run(FakeTask(fake_client, recording_agent()[0]), following.rollout_id)
    assert fake_client.get_rollout(following.rollout_id).status == "failed"


def test_following_a_pointer_unset_by_a_forced_delete_fails_at_run_time(
    three: LightningClient, enqueue: Callable[..., Rollout]
) -> None:
    three.set_pointer("prod", "rs-b")
    following = enqueue(resources_id="prod", resolve="following")
    three.delete_resources("rs-b", force=True)
    agent, calls = recording_agent()

    with pytest.raises(RolloutFailed, match="prod"):
        run(FakeTask(three, agent), following.rollout_id)

    failed = three.get_rollout(following.rollout_id)
    assert failed.status == "failed" and failed.error.type == "ResourcesNotFoundError"  # type: ignore[union-attr]
    assert calls == []


def test_no_latest_error_after_everything_is_deleted(fake_client: LightningClient) -> None:
    fake_client.add_resources(prompt("a"), "rs-a")
    fake_client.delete_resources("rs-a", force=True)
    with pytest.raises(NoLatestResourcesError):
        fake_client.registry.resolve(None)
