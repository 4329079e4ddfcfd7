"""The rollout store: records, status machine, indexes, queries and waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis

from lightning_queue import (
    LightningClient,
    Rollout,
    RolloutConfig,
    RolloutNotFoundError,
    RolloutResult,
)
from lightning_queue.core.errors import RegistryLostError
from lightning_queue.core.keys import ROLLOUT_STATUSES
from lightning_queue.core.models import ErrorInfo
from lightning_queue.storage.store import RolloutStore, StartWith
from lightning_queue.storage.waiting import Read, Step, Waiter

MakeRollouts = Callable[..., list[Rollout]]
IndexMembers = Callable[[str], list[str]]
WAIT_DEADLINE = 30.0  # how long a test waits for an event that should come at once: only a bug reaches it


def expire_heartbeat(store: RolloutStore, rollout_id: str) -> None:
    """The open attempt's worker stopped beating long ago (it died): its deadline is in the past."""
    store.redis.zadd(store.keys.heartbeats, {rollout_id: 0})


def run_to_running(store: RolloutStore, rollout: Rollout, worker: str = "w1", resources_id: str = "rs-a") -> int:
    claim = store.claim(rollout, worker)
    assert claim.outcome == "claimed"
    assert store.start_attempt(rollout.rollout_id, claim.sequence_id, resources_id, 1)
    return claim.sequence_id


def ids(rollouts: list[Rollout]) -> list[str]:
    return [r.rollout_id for r in rollouts]


# --------------------------------------------------------------------------- create


def test_create_rollouts_writes_records_and_indexes(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers
) -> None:
    pinned, = make_rollouts(1, resources_id="rs-a", mode="val", metadata={"tag": "x"})
    unpinned, = make_rollouts(1)

    stored = store.get_rollout(pinned.rollout_id)
    assert stored == pinned
    assert stored.metadata == {"tag": "x"} and stored.config == RolloutConfig()
    r = store.redis
    k = store.keys
    assert r.zscore(k.rollouts, pinned.rollout_id) == pinned.enqueue_time
    assert r.zscore(k.rollouts_by_mode("val"), pinned.rollout_id) == pinned.enqueue_time
    assert r.zscore(k.rollouts_by_resources("rs-a"), pinned.rollout_id) == pinned.enqueue_time
    assert r.zscore(k.rollouts_by_resources("rs-a"), unpinned.rollout_id) is None
    assert status_index_members(pinned.rollout_id) == ["queuing"]
    assert store.count_by_status()["queuing"] == 2


def test_none_input_and_mode_round_trip(store: RolloutStore) -> None:
    rollout = Rollout(input=None, mode=None)
    store.create_rollouts([rollout])
    stored = store.get_rollout(rollout.rollout_id)
    assert stored.input is None
    assert stored.mode is None
    assert stored == rollout


def test_rich_input_round_trips(store: RolloutStore) -> None:
    rollout = Rollout(input={"question": "2+2?", "nested": [1, 2.5, None, {"a": "é"}]}, mode="test")
    store.create_rollouts([rollout])
    assert store.get_rollout(rollout.rollout_id) == rollout


def test_unknown_rollout_lookups_raise(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    known, = make_rollouts(1)
    with pytest.raises(RolloutNotFoundError, match="ro-nope"):
        store.get_rollout("ro-nope")
    with pytest.raises(RolloutNotFoundError, match="ro-nope"):
        store.get_rollouts([known.rollout_id, "ro-nope"])
    with pytest.raises(RolloutNotFoundError, match="ro-nope"):
        store.get_attempts("ro-nope")
    with pytest.raises(RolloutNotFoundError, match="ro-nope"):
        store.terminate("ro-nope", "cancelled")


def test_get_rollouts_keeps_order(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    a, b, c = make_rollouts(3)
    assert ids(store.get_rollouts([c.rollout_id, a.rollout_id, b.rollout_id])) == [c.rollout_id, a.rollout_id, b.rollout_id]


# --------------------------------------------------------------------------- status machine


def test_claim_start_finish_success(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers
) -> None:
    rollout, = make_rollouts(1)
    rid = rollout.rollout_id

    claim = store.claim(rollout, "w1")
    assert (claim.outcome, claim.sequence_id) == ("claimed", 1)
    assert status_index_members(rid) == ["preparing"]
    after_claim = store.get_rollout(rid)
    assert after_claim.status == "preparing" and after_claim.attempt_count == 1
    assert after_claim.start_time is not None
    attempt, = store.get_attempts(rid)
    assert (attempt.sequence_id, attempt.worker_id, attempt.status) == (1, "w1", "preparing")
    assert attempt.attempt_id.startswith("at-")
    assert attempt.resources_id is None

    assert store.start_attempt(rid, 1, "rs-a", 4)
    assert status_index_members(rid) == ["running"]
    attempt, = store.get_attempts(rid)
    assert (attempt.status, attempt.resources_id, attempt.resources_version) == ("running", "rs-a", 4)
    # An unpinned rollout is indexed under the snapshot it actually ran with.
    assert store.redis.zscore(store.keys.rollouts_by_resources("rs-a"), rid) == rollout.enqueue_time

    result = RolloutResult(reward=0.75, output={"answer": 4})
    assert store.finish_attempt(rid, 1, "succeeded", "succeeded", result=result) == "succeeded"
    assert status_index_members(rid) == ["succeeded"]
    done = store.get_rollout(rid)
    assert done.status == "succeeded" and done.is_finished
    assert done.result == result and done.reward == 0.75
    assert done.end_time is not None and done.error is None
    attempt, = store.get_attempts(rid)
    assert attempt.status == "succeeded" and attempt.result == result and attempt.end_time is not None


def test_failed_attempt_requeues_then_succeeds(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    run_to_running(store, rollout)
    error = ErrorInfo(type="ValueError", message="boom")
    assert store.finish_attempt(rid, 1, "failed", "requeuing", error=error) == "requeuing"
    assert status_index_members(rid) == ["requeuing"]
    requeued = store.get_rollout(rid)
    assert requeued.error == error and requeued.end_time is None and not requeued.is_finished

    assert run_to_running(store, rollout, worker="w2") == 2
    assert store.finish_attempt(rid, 2, "succeeded", "succeeded", result=RolloutResult(reward=1)) == "succeeded"
    done = store.get_rollout(rid)
    assert done.status == "succeeded" and done.attempt_count == 2
    assert done.error is None  # a success clears the earlier attempt's error
    first, second = store.get_attempts(rid)
    assert (first.status, first.worker_id, first.error) == ("failed", "w1", error)
    assert (second.status, second.worker_id) == ("succeeded", "w2")
    assert status_index_members(rid) == ["succeeded"]


def test_final_failure_keeps_error(store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers) -> None:
    rollout, = make_rollouts(1)
    run_to_running(store, rollout)
    error = ErrorInfo(type="RuntimeError", message="nope", traceback="tb")
    assert store.finish_attempt(rollout.rollout_id, 1, "failed", "failed", error=error) == "failed"
    failed = store.get_rollout(rollout.rollout_id)
    assert failed.status == "failed" and failed.error == error and failed.end_time is not None
    assert status_index_members(rollout.rollout_id) == ["failed"]


def test_claim_of_finished_rollout(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    done, cancelled = make_rollouts(2)
    run_to_running(store, done)
    store.finish_attempt(done.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))
    store.terminate(cancelled.rollout_id, "cancelled")

    claim = store.claim(done, "w2")
    assert (claim.outcome, claim.status) == ("finished", "succeeded")
    assert store.claim(cancelled, "w2").status == "cancelled"
    assert store.get_rollout(done.rollout_id).attempt_count == 1
    assert store.get_rollout(cancelled.rollout_id).attempt_count == 0


def test_claim_of_missing_rollout(store: RolloutStore) -> None:
    assert store.claim(Rollout(input=1), "w1").outcome == "missing"


@pytest.mark.parametrize("opened_to", ["preparing", "running"])
def test_claim_with_open_attempt_marks_it_worker_lost(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers, opened_to: str
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    store.claim(rollout, "w-dead")
    if opened_to == "running":
        store.start_attempt(rid, 1, "rs-a", 1)
    expire_heartbeat(store, rid)

    claim = store.claim(rollout, "w-alive")  # the broker redelivered the message
    assert (claim.outcome, claim.sequence_id) == ("claimed", 2)
    lost, current = store.get_attempts(rid)
    assert lost.status == "worker_lost" and lost.end_time is not None
    assert lost.error is not None and lost.error.type == "WorkerLostError"
    assert (current.status, current.worker_id) == ("preparing", "w-alive")
    assert status_index_members(rid) == ["preparing"]
    # The dead worker's late report is stale and changes nothing.
    assert store.finish_attempt(rid, 1, "succeeded", "succeeded", result=RolloutResult(reward=1)) == "stale"
    assert store.get_attempts(rid)[0].status == "worker_lost"
    assert store.get_rollout(rid).status == "preparing"
    assert not store.start_attempt(rid, 1, "rs-a", 1)


@pytest.mark.parametrize(
    "config",
    [RolloutConfig(max_attempts=1), RolloutConfig(max_attempts=3, retry_condition=["failed", "timeout"])],
    ids=["no-attempt-left", "worker_lost-not-retried"],
)
def test_claim_with_open_attempt_fails_rollout_when_not_retryable(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers, config: RolloutConfig
) -> None:
    rollout, = make_rollouts(1, config=config)
    rid = rollout.rollout_id
    run_to_running(store, rollout, worker="w-dead")
    expire_heartbeat(store, rollout.rollout_id)

    claim = store.claim(rollout, "w-alive")
    assert (claim.outcome, claim.sequence_id) == ("lost", 1)
    failed = store.get_rollout(rid)
    assert failed.status == "failed" and failed.attempt_count == 1
    assert failed.error is not None and failed.error.type == "WorkerLostError"
    assert failed.end_time is not None
    attempt, = store.get_attempts(rid)
    assert attempt.status == "worker_lost"
    assert status_index_members(rid) == ["failed"]


def test_claim_lost_publishes_completion(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    run_to_running(store, rollout, worker="w-dead")
    expire_heartbeat(store, rollout.rollout_id)
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.keys.events)
    try:
        assert store.claim(rollout, "w-alive").outcome == "lost"
        deadline = time.monotonic() + 1
        message = None
        while message is None and time.monotonic() < deadline:  # the first read eats the subscribe reply
            message = pubsub.get_message(timeout=0.1)
        assert message is not None and message["data"] == rollout.rollout_id.encode()
    finally:
        pubsub.close()


def test_start_attempt_refused_after_cancel(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    claim = store.claim(rollout, "w1")
    assert store.terminate(rollout.rollout_id, "cancelled") == "cancelled"
    assert not store.start_attempt(rollout.rollout_id, claim.sequence_id, "rs-a", 1)
    assert store.get_rollout(rollout.rollout_id).status == "cancelled"


def test_finish_after_cancel_keeps_cancelled(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers
) -> None:
    rollout, = make_rollouts(1)
    rid = rollout.rollout_id
    run_to_running(store, rollout)
    assert store.terminate(rid, "cancelled") == "cancelled"

    result = RolloutResult(reward=1.0)
    assert store.finish_attempt(rid, 1, "succeeded", "succeeded", result=result) == "cancelled"
    cancelled = store.get_rollout(rid)
    assert cancelled.status == "cancelled" and cancelled.result is None
    attempt, = store.get_attempts(rid)
    assert attempt.status == "succeeded" and attempt.result == result  # kept on the attempt only
    assert status_index_members(rid) == ["cancelled"]


def test_stale_finish_returns_stale(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=3))
    rid = rollout.rollout_id
    run_to_running(store, rollout)
    store.finish_attempt(rid, 1, "failed", "requeuing", error=ErrorInfo(type="E", message="m"))
    run_to_running(store, rollout)
    assert store.finish_attempt(rid, 1, "succeeded", "succeeded") == "stale"
    assert store.finish_attempt(rid, 5, "succeeded", "succeeded") == "stale"
    assert store.get_rollout(rid).status == "running"
    assert store.get_attempts(rid)[0].status == "failed"


@pytest.mark.parametrize("status", ["queuing", "preparing", "running", "requeuing"])
def test_terminate_unfinished(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers, status: str
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    if status != "queuing":
        store.claim(rollout, "w1")
    if status in ("running", "requeuing"):
        store.start_attempt(rid, 1, "rs-a", 1)
    if status == "requeuing":
        store.finish_attempt(rid, 1, "failed", "requeuing")
    assert store.get_rollout(rid).status == status

    assert store.terminate(rid, "cancelled") == "cancelled"
    cancelled = store.get_rollout(rid)
    assert cancelled.status == "cancelled" and cancelled.end_time is not None
    assert status_index_members(rid) == ["cancelled"]


def test_terminate_failed_records_error(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    error = ErrorInfo(type="OperationalError", message="broker down")
    assert store.terminate(rollout.rollout_id, "failed", error) == "failed"
    failed = store.get_rollout(rollout.rollout_id)
    assert failed.status == "failed" and failed.error == error


def test_terminate_finished_leaves_it(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers
) -> None:
    rollout, = make_rollouts(1)
    run_to_running(store, rollout)
    store.finish_attempt(rollout.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))
    before = store.get_rollout(rollout.rollout_id)
    assert store.terminate(rollout.rollout_id, "cancelled") == "succeeded"
    assert store.terminate(rollout.rollout_id, "failed", ErrorInfo(type="E", message="m")) == "succeeded"
    assert store.get_rollout(rollout.rollout_id) == before
    assert status_index_members(rollout.rollout_id) == ["succeeded"]


def test_every_key_is_under_the_prefix(
    store: RolloutStore, make_rollouts: MakeRollouts, fake_redis: fakeredis.FakeRedis, prefix: str
) -> None:
    a, b = make_rollouts(2, resources_id="rs-a")
    run_to_running(store, a)
    store.finish_attempt(a.rollout_id, 1, "succeeded", "succeeded")
    store.terminate(b.rollout_id, "cancelled")
    keys = [k.decode() for k in fake_redis.keys("*")]
    assert len(keys) > 5
    assert all(k.startswith(f"{prefix}:") for k in keys), keys


# --------------------------------------------------------------------------- queries


@pytest.fixture
def populated(store: RolloutStore, make_rollouts: MakeRollouts) -> dict[str, Rollout]:
    """Six rollouts in increasing enqueue order, in various states."""
    r = {}
    r["train_a_ok"], = make_rollouts(1, mode="train", resources_id="rs-a")
    r["val_a_failed"], = make_rollouts(1, mode="val", resources_id="rs-a")
    r["train_latest_ok"], = make_rollouts(1, mode="train")  # ran with rs-b
    r["train_b_queued"], = make_rollouts(1, mode="train", resources_id="rs-b")
    r["val_latest_running"], = make_rollouts(1, mode="val")  # runs with rs-a
    r["test_cancelled"], = make_rollouts(1, mode="test")

    run_to_running(store, r["train_a_ok"], worker="w1", resources_id="rs-a")
    store.finish_attempt(r["train_a_ok"].rollout_id, 1, "succeeded", "succeeded")
    run_to_running(store, r["val_a_failed"], worker="w2", resources_id="rs-a")
    store.finish_attempt(r["val_a_failed"].rollout_id, 1, "failed", "failed")
    run_to_running(store, r["train_latest_ok"], worker="w1", resources_id="rs-b")
    store.finish_attempt(r["train_latest_ok"].rollout_id, 1, "succeeded", "succeeded")
    run_to_running(store, r["val_latest_running"], worker="w2", resources_id="rs-a")
    store.terminate(r["test_cancelled"].rollout_id, "cancelled")
    return r


def names(populated: dict[str, Rollout], rollouts: list[Rollout]) -> list[str]:
    by_id = {r.rollout_id: name for name, r in populated.items()}
    return [by_id[r.rollout_id] for r in rollouts]


def test_query_all_newest_first_with_pagination(store: RolloutStore, populated: dict[str, Rollout]) -> None:
    everything = ["test_cancelled", "val_latest_running", "train_b_queued", "train_latest_ok", "val_a_failed", "train_a_ok"]
    assert names(populated, store.query_rollouts()) == everything
    assert names(populated, store.query_rollouts(offset=2, limit=3)) == everything[2:5]
    assert store.query_rollouts(offset=6) == []


@pytest.mark.parametrize(
    "filters, expected",
    [
        ({"status": "succeeded"}, ["train_latest_ok", "train_a_ok"]),
        ({"status": ["failed", "cancelled"]}, ["test_cancelled", "val_a_failed"]),
        ({"status": ("queuing", "running")}, ["val_latest_running", "train_b_queued"]),
        ({"mode": "val"}, ["val_latest_running", "val_a_failed"]),
        ({"mode": "test"}, ["test_cancelled"]),
        ({"resources_id": "rs-a"}, ["val_latest_running", "val_a_failed", "train_a_ok"]),
        ({"resources_id": "rs-b"}, ["train_b_queued", "train_latest_ok"]),
        ({"worker_id": "w1"}, ["train_latest_ok", "train_a_ok"]),
        ({"worker_id": "w2"}, ["val_latest_running", "val_a_failed"]),
        ({"mode": "train", "status": "succeeded"}, ["train_latest_ok", "train_a_ok"]),
        ({"mode": "train", "resources_id": "rs-b"}, ["train_b_queued", "train_latest_ok"]),
        ({"mode": "val", "status": "failed", "resources_id": "rs-a", "worker_id": "w2"}, ["val_a_failed"]),
        ({"worker_id": "w1", "resources_id": "rs-b", "status": "succeeded"}, ["train_latest_ok"]),
        ({"mode": "test", "status": "succeeded"}, []),
        ({"worker_id": "w-unknown"}, []),
        ({"resources_id": "rs-unknown"}, []),
    ],
)
def test_query_filters(store: RolloutStore, populated: dict[str, Rollout], filters: dict, expected: list[str]) -> None:
    assert names(populated, store.query_rollouts(**filters)) == expected


def test_query_filtered_pagination(store: RolloutStore, populated: dict[str, Rollout]) -> None:
    assert names(populated, store.query_rollouts(resources_id="rs-a", offset=1, limit=1)) == ["val_a_failed"]
    assert names(populated, store.query_rollouts(mode="train", limit=2)) == ["train_b_queued", "train_latest_ok"]
    assert store.query_rollouts(mode="train", offset=10) == []


def test_query_by_worker_orders_by_enqueue_time_not_claim_time(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    older, newer = make_rollouts(2)
    run_to_running(store, newer, worker="w1")
    run_to_running(store, older, worker="w1")  # claimed last, but enqueued first
    assert ids(store.query_rollouts(worker_id="w1")) == [newer.rollout_id, older.rollout_id]


def test_query_invalid_status(store: RolloutStore) -> None:
    with pytest.raises(ValueError, match="done"):
        store.query_rollouts(status="done")
    with pytest.raises(ValueError, match="nope"):
        store.query_rollouts(status=["succeeded", "nope"])


@pytest.mark.parametrize("offset, limit", [(-1, 10), (0, 0)])
def test_query_bad_pagination(store: RolloutStore, offset: int, limit: int) -> None:
    with pytest.raises(ValueError):
        store.query_rollouts(offset=offset, limit=limit)


def test_count_by_status(store: RolloutStore, populated: dict[str, Rollout]) -> None:
    counts = store.count_by_status()
    assert set(counts) == set(ROLLOUT_STATUSES)
    assert counts == {"queuing": 1, "preparing": 0, "running": 1, "requeuing": 0,
                      "succeeded": 2, "failed": 1, "cancelled": 1}


def test_statuses(store: RolloutStore, populated: dict[str, Rollout]) -> None:
    rid = populated["train_a_ok"].rollout_id
    assert store.statuses([rid, "ro-nope"]) == {rid: "succeeded", "ro-nope": None}


def test_get_attempts_first_to_last(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=3))
    rid = rollout.rollout_id
    assert store.get_attempts(rid) == []
    for seq, worker in [(1, "w1"), (2, "w2")]:
        run_to_running(store, rollout, worker=worker)
        store.finish_attempt(rid, seq, "failed", "requeuing", error=ErrorInfo(type="E", message=str(seq)))
    run_to_running(store, rollout, worker="w3")
    attempts = store.get_attempts(rid)
    assert [(a.sequence_id, a.worker_id, a.status) for a in attempts] == [
        (1, "w1", "failed"), (2, "w2", "failed"), (3, "w3", "running")
    ]
    assert [a.error.message for a in attempts[:2]] == ["1", "2"]  # type: ignore[union-attr]
    assert len({a.attempt_id for a in attempts}) == 3


# --------------------------------------------------------------------------- waiting


def finish(store: RolloutStore, rollout: Rollout, reward: float = 1.0) -> None:
    seq = run_to_running(store, rollout)
    store.finish_attempt(rollout.rollout_id, seq, "succeeded", "succeeded", result=RolloutResult(reward=reward))


@dataclass
class SubscriptionRead:
    """One read of the waiter's subscription: how long it could block, and whether anything came."""

    timeout: float | None
    received: bool


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SubscriptionRead]]:
    """Every read a waiter makes on its subscription (``PubSub.parse_response`` returns None only
    when nothing arrived before the read's time-out). What woke a waiter is told by these, not by
    a clock: a read that blocked and timed out is a safety wake-up or the deadline."""
    seen: list[SubscriptionRead] = []
    parse_response = redis.client.PubSub.parse_response

    def spy(self: redis.client.PubSub, block: bool = True, timeout: float = 0) -> Any:
        response = parse_response(self, block=block, timeout=timeout)
        seen.append(SubscriptionRead(None if block else timeout, response is not None))
        return response

    monkeypatch.setattr(redis.client.PubSub, "parse_response", spy)
    yield seen


def blocked_in_vain(reads: list[SubscriptionRead]) -> list[SubscriptionRead]:
    """The reads that could wait and got nothing: the waiter woke by a time-out, not a notification."""
    return [r for r in reads if (r.timeout is None or r.timeout > 0) and not r.received]


def test_wait_returns_at_once_for_finished(
    store: RolloutStore, make_rollouts: MakeRollouts, reads: list[SubscriptionRead]
) -> None:
    a, b = make_rollouts(2)
    finish(store, a, 0.1)
    store.terminate(b.rollout_id, "cancelled")
    seen: list[str] = []
    done = store.wait_for_rollouts([b.rollout_id, a.rollout_id, b.rollout_id], timeout=2,
                                   on_finished=lambda r: seen.append(r.rollout_id))
    assert blocked_in_vain(reads) == []  # answered from the status read: it never waited for a notification
    assert ids(done) == [b.rollout_id, a.rollout_id]
    assert [r.status for r in done] == ["cancelled", "succeeded"]
    assert sorted(seen) == sorted([a.rollout_id, b.rollout_id])


def test_wait_empty(store: RolloutStore) -> None:
    assert store.wait_for_rollouts([], timeout=1) == []


def test_wait_unknown_id_raises(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    a, = make_rollouts(1)
    with pytest.raises(RolloutNotFoundError, match="ro-ghost"):
        store.wait_for_rollouts([a.rollout_id, "ro-ghost"], timeout=1)


def test_wait_times_out_with_partial_list(store: RolloutStore, make_rollouts: MakeRollouts, reads: list[SubscriptionRead]) -> None:
    a, b, c = make_rollouts(3)
    finish(store, b)
    done = store.wait_for_rollouts(ids([a, b, c]), timeout=0.5)
    assert ids(done) == [b.rollout_id]
    # It waited: it gave up when a read found nothing before the time-out, not before reading.
    assert reads and reads[-1] in blocked_in_vain(reads)


def another_client(fake_redis: fakeredis.FakeRedis, fake_client: LightningClient) -> LightningClient:
    """A second client on the same fake server, like a worker in another process."""
    server = fake_redis.connection_pool.connection_kwargs["server"]
    return LightningClient(fake_client.settings, redis_client=fakeredis.FakeRedis(server=server))


def wait_for_subscriber(fake_redis: fakeredis.FakeRedis, store: RolloutStore) -> None:
    """Until a waiter has subscribed to the completion notifications."""
    deadline = time.monotonic() + WAIT_DEADLINE
    while fake_redis.pubsub_numsub(store.keys.events)[0][1] < 1:
        assert time.monotonic() < deadline, "no waiter subscribed"
        time.sleep(0.005)


def test_wait_wakes_on_notification_from_another_client(
    store: RolloutStore, make_rollouts: MakeRollouts, fake_redis: fakeredis.FakeRedis, fake_client: LightningClient,
    reads: list[SubscriptionRead],
) -> None:
    a, b, c = make_rollouts(3)
    worker = another_client(fake_redis, fake_client)
    seen: list[tuple[str, float | None]] = []
    lock = threading.Lock()

    def on_finished(rollout: Rollout) -> None:
        with lock:
            seen.append((rollout.rollout_id, rollout.reward))

    def work() -> None:
        wait_for_subscriber(fake_redis, store)
        finish(worker.store, b, 2.0)
        time.sleep(0.05)  # spacing, not synchronization: the waiter may see them together or apart
        finish(worker.store, a, 1.0)
        time.sleep(0.05)
        worker.store.terminate(c.rollout_id, "cancelled")

    thread = threading.Thread(target=work)
    thread.start()
    try:
        done = store.wait_for_rollouts(ids([a, b, c]), timeout=WAIT_DEADLINE, on_finished=on_finished)
    finally:
        thread.join()
        worker.close()
    assert blocked_in_vain(reads) == []  # woken by notifications, never by the 5 s safety wake-up
    assert ids(done) == ids([a, b, c])  # in the order asked for
    assert [r.status for r in done] == ["succeeded", "succeeded", "cancelled"]
    assert seen == [(b.rollout_id, 2.0), (a.rollout_id, 1.0), (c.rollout_id, None)]  # once each, as they finish


def test_wait_ignores_requeues_and_other_rollouts(
    store: RolloutStore, make_rollouts: MakeRollouts, fake_redis: fakeredis.FakeRedis, fake_client: LightningClient
) -> None:
    wanted, other = make_rollouts(2, config=RolloutConfig(max_attempts=2))
    worker = another_client(fake_redis, fake_client)

    def work() -> None:
        wait_for_subscriber(fake_redis, store)
        finish(worker.store, other)
        seq = run_to_running(worker.store, wanted)
        worker.store.finish_attempt(wanted.rollout_id, seq, "failed", "requeuing")
        time.sleep(0.05)  # spacing, not synchronization: the waiter may see the requeue apart from the finish
        finish(worker.store, wanted, 3.0)

    calls: list[Rollout] = []
    thread = threading.Thread(target=work)
    thread.start()
    try:
        done = store.wait_for_rollouts([wanted.rollout_id], timeout=10, on_finished=calls.append)
    finally:
        thread.join()
        worker.close()
    assert ids(done) == [wanted.rollout_id]
    assert done[0].reward == 3.0 and done[0].attempt_count == 2
    assert ids(calls) == [wanted.rollout_id]


def test_wait_wakes_when_a_lost_worker_fails_the_rollout(
    store: RolloutStore, make_rollouts: MakeRollouts, fake_redis: fakeredis.FakeRedis, fake_client: LightningClient,
    reads: list[SubscriptionRead],
) -> None:
    rollout, = make_rollouts(1)
    run_to_running(store, rollout, worker="w-dead")
    expire_heartbeat(store, rollout.rollout_id)
    worker = another_client(fake_redis, fake_client)

    def redeliver() -> None:
        wait_for_subscriber(fake_redis, store)
        worker.store.claim(rollout, "w-alive")

    thread = threading.Thread(target=redeliver)
    thread.start()
    try:
        done = store.wait_for_rollouts([rollout.rollout_id], timeout=WAIT_DEADLINE)
    finally:
        thread.join()
        worker.close()
    assert [r.status for r in done] == ["failed"]
    assert blocked_in_vain(reads) == []  # the failure's notification woke it


def test_wait_reads_notifications_that_arrived_together_in_one_round_trip(
    store: RolloutStore, make_rollouts: MakeRollouts, monkeypatch: pytest.MonkeyPatch
) -> None:
    rollouts = make_rollouts(5)
    for rollout in rollouts:
        run_to_running(store, rollout)
    reads: list[list[str]] = []
    next_step, replied = Waiter.next_step, Waiter.replied

    def record(waiter: Waiter) -> Step:
        step = next_step(waiter)
        if isinstance(step, Read):
            reads.append([command[0] for command in step.commands])
        return step

    def then_finish(waiter: Waiter, replies: Sequence[Any]) -> None:
        replied(waiter, replies)
        if len(reads) == 1:
            # The waiter is subscribed and has read the statuses (all running); the five then
            # finish before it looks at its notifications, which are all waiting together.
            for rollout in rollouts:
                store.finish_attempt(rollout.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))

    monkeypatch.setattr(Waiter, "next_step", record)
    monkeypatch.setattr(Waiter, "replied", then_finish)
    done = store.wait_for_rollouts(ids(rollouts), timeout=5)
    assert ids(done) == ids(rollouts) and {r.status for r in done} == {"succeeded"}
    # One status read, then one read of all five records; each with the registry epoch.
    assert reads == [["GET", *["HGET"] * 5], ["GET", *["HGETALL"] * 5]]


# --------------------------------------------------------------------------- claim and start in one script


def test_claim_returns_the_record_it_leaves(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1, metadata={"k": "v"})
    claim = store.claim(rollout.rollout_id, "w1")
    assert claim.outcome == "claimed" and not claim.started and claim.rollout is not None
    assert claim.rollout == store.get_rollout(rollout.rollout_id)
    assert (claim.rollout.status, claim.rollout.attempt_count, claim.rollout.metadata) == ("preparing", 1, {"k": "v"})


def test_claim_with_the_snapshot_starts_the_attempt_running(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: IndexMembers
) -> None:
    rollout, = make_rollouts(1, resources_id="rs-a", resources_version=3, resolve="pinned")
    claim = store.claim(rollout.rollout_id, "w1", StartWith("rs-a", 3, "rs-a", 3, store.epoch.establish()))
    assert claim.started and claim.rollout is not None and claim.rollout.status == "running"
    attempt, = store.get_attempts(rollout.rollout_id)
    assert (attempt.status, attempt.resources_id, attempt.resources_version) == ("running", "rs-a", 3)
    assert status_index_members(rollout.rollout_id) == ["running"]
    assert ids(store.query_rollouts(resources_id="rs-a")) == [rollout.rollout_id]
    assert store.finish_attempt(rollout.rollout_id, 1, "succeeded", "succeeded") == "succeeded"


@pytest.mark.parametrize(
    "stored, message",
    [
        ({"resources_id": "rs-a", "resources_version": 3, "resolve": "pinned"}, ("rs-a", 2)),  # other version
        ({"resources_id": "rs-a", "resources_version": 3, "resolve": "pinned"}, ("rs-b", 3)),  # other id
        ({"resources_id": "prod", "resolve": "following"}, ("prod", 3)),  # follows, message says pinned
        ({"resolve": "following"}, ("rs-a", None)),  # latest, message names an id
    ],
)
def test_claim_does_not_start_with_a_snapshot_the_record_does_not_ask_for(
    store: RolloutStore, make_rollouts: MakeRollouts, stored: dict, message: tuple[str, int | None]
) -> None:
    rollout, = make_rollouts(1, **stored)
    claim = store.claim(rollout.rollout_id, "w1", StartWith(*message, "rs-a", 3, store.epoch.establish()))
    assert claim.outcome == "claimed" and not claim.started
    assert store.get_attempts(rollout.rollout_id)[0].status == "preparing"
    # Only the index entry it was created with (a pinned rollout's own id), none for the snapshot offered.
    assert ids(store.query_rollouts(resources_id="rs-a")) == ([rollout.rollout_id] if "rs-a" in stored.values() else [])


def test_claim_does_not_start_with_a_snapshot_read_in_another_registry_epoch(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    # The worker read (rs-a, 3) before Redis lost its data: the new registry's (rs-a, 3) may be
    # other content, so the attempt opens preparing, and start_attempt refuses that epoch too.
    rollout, = make_rollouts(1, resources_id="rs-a", resources_version=3, resolve="pinned")
    now = store.epoch.establish()
    claim = store.claim(rollout.rollout_id, "w1", StartWith("rs-a", 3, "rs-a", 3, "ep-of-a-lost-registry"))
    assert claim.outcome == "claimed" and not claim.started
    with pytest.raises(RegistryLostError, match="ep-of-a-lost-registry"):
        store.start_attempt(rollout.rollout_id, 1, "rs-a", 3, "ep-of-a-lost-registry")
    assert store.get_attempts(rollout.rollout_id)[0].status == "preparing"
    assert store.start_attempt(rollout.rollout_id, 1, "rs-a", 3, now)


def test_claim_start_of_a_cancelled_rollout_does_nothing(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    store.terminate(rollout.rollout_id, "cancelled")
    claim = store.claim(rollout.rollout_id, "w1", StartWith(None, None, "rs-a", 1, store.epoch.establish()))
    assert (claim.outcome, claim.status, claim.started) == ("finished", "cancelled", False)
    assert store.get_attempts(rollout.rollout_id) == []


# --------------------------------------------------------------------------- compact records


def test_default_config_and_empty_fields_are_not_stored(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    plain, custom = make_rollouts(2)
    custom = custom.model_copy(update={"config": RolloutConfig(max_attempts=3), "rollout_id": "ro-custom"})
    store.create_rollouts([custom])
    fields = {k.decode() for k in store.redis.hkeys(store.keys.rollout(plain.rollout_id))}
    assert not fields & {"config", "metadata", "error", "result"}
    assert store.redis.hget(store.keys.rollout("ro-custom"), "config") == b'{"max_attempts":3}'
    assert store.get_rollout(plain.rollout_id).config == RolloutConfig()
    assert store.get_rollout("ro-custom").config == RolloutConfig(max_attempts=3)


def test_result_is_stored_once_and_read_back_on_its_attempt(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    seq = run_to_running(store, rollout)
    result = RolloutResult(output={"a": None, "b": [1]})
    store.finish_attempt(rollout.rollout_id, seq, "succeeded", "succeeded", result=result)
    assert store.redis.hget(store.keys.rollout(rollout.rollout_id), "result") == b'{"output":{"a":null,"b":[1]}}'
    assert not store.redis.hexists(store.keys.attempt(rollout.rollout_id, seq), "result")
    assert store.get_rollout(rollout.rollout_id).result == result
    assert store.get_attempts(rollout.rollout_id)[0].result == result


def test_refused_result_of_a_cancelled_rollout_stays_on_its_attempt(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    seq = run_to_running(store, rollout)
    store.terminate(rollout.rollout_id, "cancelled")
    late = RolloutResult(reward=0.5)
    assert store.finish_attempt(rollout.rollout_id, seq, "succeeded", "succeeded", result=late) == "cancelled"
    assert store.get_rollout(rollout.rollout_id).result is None
    assert store.get_attempts(rollout.rollout_id)[0].result == late


def test_scripts_apply_the_default_config_to_a_record_that_stores_none(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    # Defaults retry worker_lost and unresponsive but allow one attempt: both end the rollout failed.
    lost, hung, retried = make_rollouts(3)
    retried = retried.model_copy(update={"rollout_id": "ro-retried", "config": RolloutConfig(max_attempts=2)})
    store.create_rollouts([retried])
    for rollout in (lost, hung, retried):
        run_to_running(store, rollout)
        expire_heartbeat(store, rollout.rollout_id)
    assert store.claim(lost.rollout_id, "w2").outcome == "lost"
    moved = {rid: status for rid, status, _ in store.close_unresponsive()}
    assert moved == {hung.rollout_id: "failed", "ro-retried": "requeuing"}


def test_create_rollouts_sends_one_zadd_per_index(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    sent: list[str] = []
    pipeline = store.redis.pipeline

    def counting_pipeline(*args: object, **kwargs: object) -> object:
        pipe = pipeline(*args, **kwargs)
        zadd = pipe.zadd

        def spy(key: str, mapping: dict, *rest: object, **options: object) -> object:
            sent.append(key)
            return zadd(key, mapping, *rest, **options)

        pipe.zadd = spy  # type: ignore[method-assign]
        return pipe

    store.redis.pipeline = counting_pipeline  # type: ignore[method-assign]
    try:
        rollouts = [Rollout(input=i, resources_id="rs-a" if i % 2 else None) for i in range(10)]
        store.create_rollouts(rollouts)
    finally:
        del store.redis.pipeline
    k = store.keys
    assert sorted(sent) == sorted([k.rollouts, k.rollouts_by_status("queuing"), k.rollouts_by_mode("train"),
                                   k.rollouts_by_resources("rs-a"), k.pending])
    assert len(store.query_rollouts(limit=100)) == 10 and len(store.query_rollouts(resources_id="rs-a")) == 5


def test_a_root_only_trace_keeps_its_own_status_only_where_the_attempt_records_another(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    from lightning_queue.core import traces as t
    from lightning_queue.storage.traces import Traces, TraceWrite, compact_root

    def root_write(rid: str, seq: int, attempt_id: str, status: str) -> TraceWrite:
        attributes = t.attempt_attributes(rid, attempt_id, seq, "rs-a", 1, f"w{seq}", "train", {})
        entry = ["ab" * 8, None, t.ATTEMPT_SPAN, 4, 10, 20, 0, None, {**attributes, t.STATUS: status}, None, None]
        batch = compact_root(entry, "cd" * 16, attributes)
        assert batch is not None
        return TraceWrite(batch)

    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    first = store.claim(rollout, "w1", StartWith(None, None, "rs-a", 1, ""))
    expire_heartbeat(store, rid)
    second = store.claim(rollout, "w2", StartWith(None, None, "rs-a", 1, ""))  # attempt 1 closed as worker_lost
    # Attempt 1's late report is refused, its trace kept: the root span says what its agent reported.
    assert store.finish_attempt(rid, 1, "succeeded", "succeeded",
                                trace=root_write(rid, 1, first.attempt_id, "succeeded")) == "stale"
    assert store.finish_attempt(rid, 2, "failed", "failed",
                                trace=root_write(rid, 2, second.attempt_id, "failed")) == "failed"
    assert store.redis.hget(store.keys.attempt(rid, 1), "root_status") == b"succeeded"
    assert store.redis.hget(store.keys.attempt(rid, 2), "root_status") is None  # the attempt's status says it
    one, two = Traces(store.redis, store.keys).query_spans(rid)
    assert [s.attributes[t.STATUS] for s in (one, two)] == ["succeeded", "failed"]
    assert [a.status for a in store.get_attempts(rid)] == ["worker_lost", "failed"]
    assert (two.attributes[t.SEQUENCE_ID], two.attributes[t.WORKER_ID], two.span_id) == (2, "w2", "ab" * 8)


def test_a_record_leaves_out_its_id_and_the_fields_at_their_default(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    default, other = make_rollouts(1)[0], make_rollouts(1, mode="val")[0]
    stored = store.redis.hgetall(store.keys.rollout(default.rollout_id))
    assert not {b"rollout_id", b"resolve", b"mode"} & set(stored)  # the key says the id; the rest are defaults
    assert b"mode" in store.redis.hgetall(store.keys.rollout(other.rollout_id))
    assert store.get_rollout(default.rollout_id) == default and store.get_rollout(other.rollout_id) == other
    assert (store.get_rollout(default.rollout_id).mode, store.get_rollout(other.rollout_id).mode) == ("train", "val")
    # A record written before keeps its fields and reads the same.
    store.redis.hset(store.keys.rollout(default.rollout_id), mapping={"rollout_id": default.rollout_id,
                                                                        "resolve": "following"})
    assert store.get_rollout(default.rollout_id) == default


def test_the_first_attempts_start_and_the_last_attempts_end_are_stored_once_on_the_record(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    store.claim(rollout, "w1")
    store.start_attempt(rid, 1, "rs-a", 1)
    assert store.get_attempts(rid)[0].end_time is None  # running: no end yet
    assert store.finish_attempt(rid, 1, "failed", "requeuing") == "requeuing"
    store.claim(rollout, "w2")
    store.start_attempt(rid, 2, "rs-a", 1)
    assert store.finish_attempt(rid, 2, "succeeded", "succeeded", result=RolloutResult(reward=1.0)) == "succeeded"
    first, second = (store.redis.hgetall(store.keys.attempt(rid, n)) for n in (1, 2))
    assert b"start_time" not in first and b"end_time" in first  # it did not end the rollout
    assert b"start_time" in second and b"end_time" not in second
    record = store.get_rollout(rid)
    one, two = store.get_attempts(rid)
    assert one.start_time == record.start_time and two.end_time == record.end_time
    assert one.end_time is not None and one.end_time <= two.start_time <= two.end_time  # type: ignore[operator]
