"""The pending index, the retry schedule and the reaper of lost task messages, on fakeredis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
import redis
from celery.exceptions import Reject

from lightning_queue import LightningClient, Rollout, RolloutConfig
from lightning_queue.core.keys import Keys
from lightning_queue.storage import pending as pending_module
from lightning_queue.storage.store import RolloutStore
from lightning_queue.worker import recovery
from tests.unit.test_runner import FakeTask, recording_agent
from tests.unit.test_store import run_to_running

MakeRollouts = Callable[..., list[Rollout]]


def score(store: RolloutStore, key: str, rollout_id: str) -> float | None:
    return store.redis.zscore(key, rollout_id)


def make_due(store: RolloutStore, *rollouts: Rollout) -> None:
    """Bring the rollouts' pending entries due now (as if their grace had passed)."""
    store.redis.zadd(store.keys.pending, {r.rollout_id: 0 for r in rollouts})


def enqueue_now(store: RolloutStore, n: int) -> list[Rollout]:
    """Rollouts enqueued now (``make_rollouts`` dates its rollouts in 1970, long due)."""
    rollouts = [Rollout(input=i) for i in range(n)]
    store.create_rollouts(rollouts)
    return rollouts


def envelope(client: LightningClient, rollout: Rollout) -> bytes:
    """The task message the publisher sends for ``rollout`` (no broker needed to build it)."""
    return client.publisher.build([rollout], [(None, None)]).by_queue[rollout.queue][0]


def push(client: LightningClient, rollout: Rollout, priority: int = 0) -> None:
    client.redis.lpush(client.keys.celery_queue(rollout.queue, priority), envelope(client, rollout))


def hold_unacked(client: LightningClient, rollout: Rollout) -> None:
    """What kombu writes when a worker takes a message: ``[message, exchange, routing key]``,
    re-serialized with its own JSON separators."""
    message = json.loads(envelope(client, rollout))
    client.redis.hset(client.keys.celery_unacked, message["properties"]["delivery_tag"],
                      json.dumps([message, "", rollout.queue]))


@pytest.fixture
def task(fake_client: LightningClient) -> FakeTask:
    return FakeTask(fake_client, recording_agent()[0])


# --------------------------------------------------------------------------- the pending index


def test_a_rollout_is_pending_from_its_record_until_a_worker_claims_it(
    fake_client: LightningClient, make_rollouts: MakeRollouts
) -> None:
    store, k = fake_client.store, fake_client.keys
    plain, = make_rollouts(1)
    assert score(store, k.pending, plain.rollout_id) == plain.enqueue_time + store.message_grace
    chosen = Rollout(rollout_id="ro-chosen", input=1)
    store.create_rollouts_if_absent([chosen])  # the idempotent path's script too
    assert score(store, k.pending, "ro-chosen") == chosen.enqueue_time + store.message_grace

    seq = run_to_running(store, plain)
    assert score(store, k.pending, plain.rollout_id) is None  # its message arrived
    before = time.time()
    store.finish_attempt(plain.rollout_id, seq, "failed", "requeuing")
    assert before + store.message_grace <= score(store, k.pending, plain.rollout_id) <= time.time() + store.message_grace
    seq = run_to_running(store, plain)
    store.finish_attempt(plain.rollout_id, seq, "succeeded", "succeeded")
    assert score(store, k.pending, plain.rollout_id) is None


def test_lease_drops_rollouts_that_no_longer_wait_and_leases_the_rest(
    fake_client: LightningClient, make_rollouts: MakeRollouts
) -> None:
    store = fake_client.store
    waiting, cancelled, expired, running = make_rollouts(4)
    store.terminate(cancelled.rollout_id, "cancelled")
    store.redis.delete(store.keys.rollout(expired.rollout_id))
    run_to_running(store, running)
    make_due(store, waiting, cancelled, expired, running)

    lease_end = time.time() + 60
    entries = store.pending.lease(time.time(), lease_end)

    assert [(e.rollout_id, e.status, e.queue, e.missing_since, e.resends, e.retry_due) for e in entries] == [
        (waiting.rollout_id, "queuing", waiting.queue, None, 0, None)]
    assert store.redis.zrange(store.keys.pending, 0, -1, withscores=True) == [(waiting.rollout_id.encode(), lease_end)]
    assert store.pending.lease(time.time(), time.time() + 120) == []  # leased: not due again before the lease ends


def test_concurrent_leases_take_distinct_entries(fake_client: LightningClient, make_rollouts: MakeRollouts) -> None:
    store = fake_client.store
    rollouts = make_rollouts(40)
    make_due(store, *rollouts)
    taken: list[list[str]] = []
    threads = [threading.Thread(target=lambda: taken.append(
        [e.rollout_id for e in store.pending.lease(time.time(), time.time() + 60, limit=7)])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [rid for batch in taken for rid in batch]
    assert sorted(flat) == sorted(r.rollout_id for r in rollouts)


def test_messages_are_found_in_every_priority_list_and_in_the_unacked_hash(
    fake_client: LightningClient, make_rollouts: MakeRollouts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pending_module, "SCAN_CHUNK", 3)  # several slices per list
    queued, prioritized, held, other_queue, lost = make_rollouts(5)
    filler = make_rollouts(7)
    for r in (*filler[:4], queued, *filler[4:]):
        push(fake_client, r)
    push(fake_client, prioritized, priority=6)
    hold_unacked(fake_client, held)
    elsewhere = other_queue.model_copy(update={"queue": "other"})
    push(fake_client, elsewhere)  # its message sits in another queue than the one it names

    wanted = {r.rollout_id: r.queue for r in (queued, prioritized, held, other_queue, lost)}
    found = fake_client.store.pending.find_messages(wanted)

    assert found == {queued.rollout_id, prioritized.rollout_id, held.rollout_id}


# --------------------------------------------------------------------------- the reaper


def test_a_message_found_is_looked_for_again_later_and_ever_less_often(
    fake_client: LightningClient, make_rollouts: MakeRollouts, task: FakeTask
) -> None:
    store = fake_client.store
    fresh, old = enqueue_now(store, 2)
    store.redis.hset(store.keys.rollout(old.rollout_id), "enqueue_time", repr(time.time() - 5 * store.message_grace))
    push(fake_client, fresh)
    push(fake_client, old)
    make_due(store, fresh, old)

    before = time.time()
    done = recovery.reap(task.ctx)

    assert (done.looked, done.missing, done.resent) == (2, [], [])
    grace = store.message_grace
    assert before + grace <= score(store, store.keys.pending, fresh.rollout_id) <= time.time() + grace
    assert score(store, store.keys.pending, old.rollout_id) >= before + 5 * grace - 1  # looked at after its age
    assert task.retries == []


def test_next_look_grows_with_the_age_up_to_twenty_graces() -> None:
    assert [recovery.next_look(age, 10) for age in (0, 5, 10, 60, 150, 10_000)] == [10, 10, 10, 60, 150, 200]


def test_a_message_missing_twice_in_a_row_is_sent_again(
    fake_client: LightningClient, make_rollouts: MakeRollouts, task: FakeTask
) -> None:
    store = fake_client.store
    lost, = make_rollouts(1)
    make_due(store, lost)

    first = recovery.reap(task.ctx)  # missing once: maybe between a worker's BRPOP and its unacked write
    assert (first.missing, first.resent, task.retries) == ([lost.rollout_id], [], [])
    assert store.redis.hget(store.keys.rollout(lost.rollout_id), "missing") is not None
    assert score(store, store.keys.pending, lost.rollout_id) <= time.time() + store.message_grace / 2

    make_due(store, lost)
    second = recovery.reap(task.ctx)
    assert (second.missing, second.resent) == ([], [lost.rollout_id])
    assert task.retries == [{"countdown": 0}]  # published again, at once
    record = store.redis.hmget(store.keys.rollout(lost.rollout_id), ["missing", "resends"])
    assert record == [None, b"1"]
    assert store.get_rollout(lost.rollout_id).status == "queuing"  # the bookkeeping is not part of the model


def test_a_message_in_flight_is_missing_once_and_found_the_next_time(
    fake_client: LightningClient, make_rollouts: MakeRollouts, task: FakeTask
) -> None:
    store = fake_client.store
    moving, = make_rollouts(1)
    make_due(store, moving)
    assert recovery.reap(task.ctx).missing == [moving.rollout_id]
    hold_unacked(fake_client, moving)  # a worker took it meanwhile
    make_due(store, moving)
    done = recovery.reap(task.ctx)
    assert (done.missing, done.resent, task.retries) == ([], [], [])
    assert store.redis.hget(store.keys.rollout(moving.rollout_id), "missing") is None


def test_a_claim_during_a_sweep_wins(fake_client: LightningClient, make_rollouts: MakeRollouts, task: FakeTask) -> None:
    store = fake_client.store
    claimed, = make_rollouts(1)
    lease_end = time.time() + 60
    make_due(store, claimed)
    [entry] = store.pending.lease(time.time(), lease_end)
    run_to_running(store, claimed)  # its message arrived while the reaper looked
    store.pending.settle(lease_end, [(entry.rollout_id, time.time() + 1, "missing")])
    assert score(store, store.keys.pending, claimed.rollout_id) is None  # not re-armed
    assert store.redis.hget(store.keys.rollout(claimed.rollout_id), "missing") is None  # record untouched


def test_a_rollout_whose_message_keeps_vanishing_fails_with_a_clear_error(
    fake_client: LightningClient, make_rollouts: MakeRollouts, task: FakeTask
) -> None:
    store = fake_client.store
    lost, = make_rollouts(1)
    limit = fake_client.settings.message_resends
    store.redis.hset(store.keys.rollout(lost.rollout_id), mapping={"resends": limit, "missing": 1.0})
    make_due(store, lost)
    done = recovery.reap(task.ctx)
    assert done.failed == [lost.rollout_id] and task.retries == []
    failed = store.get_rollout(lost.rollout_id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.type == "MessageLostError" and f"went missing {limit} times" in failed.error.message


def test_reaping_reads_only_the_due_head(fake_client: LightningClient, make_rollouts: MakeRollouts,
                                         task: FakeTask) -> None:
    store = fake_client.store
    finished = make_rollouts(50)
    for r in finished:
        store.finish_attempt(r.rollout_id, run_to_running(store, r), "succeeded", "succeeded")
    waiting = enqueue_now(store, 5)  # not due: their grace has not passed
    assert store.redis.zcard(store.keys.pending) == 5  # finished rollouts are not in the index at all
    assert recovery.reap(task.ctx).looked == 0
    assert store.pending.counts() == {"pending": 5, "due": 0, "delayed": 0}
    assert {r.rollout_id for r in waiting} == {m.decode() for m in store.redis.zrange(store.keys.pending, 0, -1)}


# --------------------------------------------------------------------------- the retry schedule


def test_a_retry_with_a_backoff_waits_in_the_schedule_then_is_sent(
    fake_client: LightningClient, make_rollouts: MakeRollouts, task: FakeTask
) -> None:
    store = fake_client.store
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2, retry_backoff_seconds=30))
    seq = run_to_running(store, rollout)
    store.finish_attempt(rollout.rollout_id, seq, "failed", "requeuing")
    assert recovery.requeue(task.ctx, [(rollout, seq)]) == []

    due = score(store, store.keys.delayed, rollout.rollout_id)
    assert due is not None and due > time.time() + 29
    assert score(store, store.keys.pending, rollout.rollout_id) == pytest.approx(due + store.message_grace)
    assert recovery.send_due_retries(task.ctx) == [] and task.retries == [{"countdown": 30.0}]

    make_due(store, rollout)
    assert recovery.reap(task.ctx).missing == []  # scheduled: its message is not missing
    assert score(store, store.keys.pending, rollout.rollout_id) == pytest.approx(due + store.message_grace)

    store.redis.zadd(store.keys.delayed, {rollout.rollout_id: 0})  # the backoff is over
    assert recovery.send_due_retries(task.ctx) == [rollout.rollout_id]
    assert task.retries[-1] == {"countdown": 0}  # published, with no ETA
    assert score(store, store.keys.delayed, rollout.rollout_id) is None


def test_a_retry_already_claimed_is_not_scheduled_and_a_claim_clears_the_schedule(
    fake_client: LightningClient, make_rollouts: MakeRollouts
) -> None:
    store = fake_client.store
    first, second = make_rollouts(2)
    run_to_running(store, first)
    assert store.pending.schedule_retries({first.rollout_id: time.time() + 5,
                                           second.rollout_id: time.time() + 5}) == [second.rollout_id]
    run_to_running(store, second)  # claimed through another message before its retry was due
    assert score(store, store.keys.delayed, second.rollout_id) is None


def test_concurrent_takers_send_distinct_retries(fake_client: LightningClient, make_rollouts: MakeRollouts) -> None:
    store = fake_client.store
    rollouts = make_rollouts(30)
    store.redis.zadd(store.keys.delayed, {r.rollout_id: 0 for r in rollouts})
    taken: list[list[str]] = []
    threads = [threading.Thread(target=lambda: taken.append(store.pending.take_due_retries(limit=4)))
               for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [rid for batch in taken for rid in batch]
    assert sorted(flat) == sorted(r.rollout_id for r in rollouts)


def test_keys_of_the_pending_index_and_schedule_are_under_the_prefix() -> None:
    k = Keys("p1")
    assert (k.pending, k.delayed, k.dead_letters) == ("p1:pending", "p1:delayed", "p1:dead-letters")


def test_a_retry_that_cannot_be_scheduled_hands_the_running_message_back(
    fake_client: LightningClient, make_rollouts: MakeRollouts, task: FakeTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fake_client.store
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2, retry_backoff_seconds=5))
    seq = run_to_running(store, rollout)
    store.finish_attempt(rollout.rollout_id, seq, "failed", "requeuing")

    def unreachable(due: object) -> list[str]:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(store.pending, "schedule_retries", unreachable)
    with pytest.raises(Reject):
        recovery.retry_after_attempt(task.ctx, rollout, seq)
    # Its pending entry, written with the requeue, lets the reaper send it should the message be lost too.
    assert score(store, store.keys.pending, rollout.rollout_id) is not None
