"""The waiting algorithm (:class:`Waiter`, no I/O, a fake clock) and its two drivers on fakeredis."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis

from lightning_queue import AsyncLightningClient, Rollout, RolloutNotFoundError, RolloutResult
from lightning_queue.core.errors import RedisAuthError, RedisUnavailableError
from lightning_queue.core.keys import Keys
from lightning_queue.storage.store import RolloutStore, decode_rollout, encode_rollout
from lightning_queue.storage.waiting import Done, Listen, Read, Subscribe, Waiter
from tests.unit.test_store import run_to_running

KEYS = Keys("t")
URL = "redis://:hunter2@redis.example:6379/0"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_waiter(ids: list[str], clock: Clock, timeout: float | None = 10.0, retry_seconds: float = 10.0,
                on_finished: Callable[[Rollout], None] | None = None) -> Waiter:
    return Waiter(ids, KEYS, decode_rollout, timeout=timeout, retry_seconds=retry_seconds, server=URL,
                  on_finished=on_finished, reconcile_seconds=5.0, clock=clock)


def confirmation() -> dict[str, Any]:
    return {"type": "subscribe", "pattern": None, "channel": KEYS.events.encode(), "data": 1}


def notification(rollout_id: str, channel: str = KEYS.events) -> dict[str, Any]:
    return {"type": "message", "pattern": None, "channel": channel.encode(), "data": rollout_id.encode()}


def record(rollout_id: str, status: str = "succeeded") -> dict[bytes, bytes]:
    rollout = Rollout(rollout_id=rollout_id, input=1, status=status)  # type: ignore[arg-type]
    return {k.encode(): v.encode() for k, v in encode_rollout(rollout).items()}


def subscribed(waiter: Waiter) -> None:
    assert waiter.next_step() == Subscribe(KEYS.events)
    waiter.subscribe_sent()
    waiter.received(confirmation())


def statuses_read(step: object, ids: list[str]) -> bool:
    return step == Read(tuple(("HGET", KEYS.rollout(rid), "status") for rid in ids))


def records_read(step: object, ids: list[str]) -> bool:
    return step == Read(tuple(("HGETALL", KEYS.rollout(rid)) for rid in ids))


# ----------------------------------------------------------------------------- the algorithm


def test_statuses_are_read_once_the_subscription_is_confirmed() -> None:
    clock = Clock()
    waiter = make_waiter(["a", "b"], clock)
    assert waiter.next_step() == Subscribe(KEYS.events)
    waiter.subscribe_sent()
    # Not before: a rollout finishing between the read and the subscription would go unseen.
    assert waiter.next_step() == Listen(5.0)
    waiter.received(confirmation())
    step = waiter.next_step()
    assert statuses_read(step, ["a", "b"])
    waiter.replied([b"succeeded", b"running"])
    assert records_read(waiter.next_step(), ["a"])
    waiter.replied([record("a")])
    assert waiter.next_step() == Listen(5.0)  # until the periodic re-read
    waiter.received(notification("b"))
    assert records_read(waiter.next_step(), ["b"])
    waiter.replied([record("b", "failed")])
    done = waiter.next_step()
    assert isinstance(done, Done) and [(r.rollout_id, r.status) for r in done.rollouts] == [
        ("a", "succeeded"), ("b", "failed")]


def test_every_new_subscription_confirmation_rereads_the_unfinished() -> None:
    clock = Clock()
    seen: list[str] = []
    waiter = make_waiter(["a", "b", "c"], clock, timeout=None, on_finished=lambda r: seen.append(r.rollout_id))
    subscribed(waiter)
    waiter.next_step()
    waiter.replied([b"succeeded", b"running", b"running"])
    waiter.next_step()
    waiter.replied([record("a")])
    # The connection drops; redis-py reconnects and re-subscribes by itself. b finished meanwhile
    # and its notification is lost: the confirmation alone must make the waiter look again.
    clock.now += 1
    assert 0 < waiter.failed(redis.ConnectionError("reset by peer")) <= 2.0
    assert isinstance(waiter.next_step(), Listen)  # not before the new confirmation
    waiter.received(confirmation())
    assert statuses_read(waiter.next_step(), ["b", "c"])
    waiter.replied([b"succeeded", b"running"])
    assert records_read(waiter.next_step(), ["b"])
    waiter.replied([record("b")])
    assert isinstance(waiter.next_step(), Listen)
    assert seen == ["a", "b"]  # once each


def test_statuses_are_reread_every_reconcile_interval() -> None:
    clock = Clock()
    waiter = make_waiter(["a"], clock, timeout=None)
    subscribed(waiter)
    waiter.next_step()
    waiter.replied([b"running"])
    clock.now += 2
    assert waiter.next_step() == Listen(3.0)
    clock.now += 3
    assert statuses_read(waiter.next_step(), ["a"])  # a lost notification is found this way
    waiter.replied([b"cancelled"])
    assert records_read(waiter.next_step(), ["a"])


def test_notifications_postpone_the_periodic_reread() -> None:
    clock = Clock()
    waiter = make_waiter(["a", "b", "c"], clock, timeout=None)
    subscribed(waiter)
    waiter.next_step()
    waiter.replied([b"running"] * 3)
    clock.now += 4
    waiter.received(notification("a"))  # the subscription evidently works
    assert records_read(waiter.next_step(), ["a"])
    waiter.replied([record("a")])
    assert waiter.next_step() == Listen(5.0)
    clock.now += 5
    assert statuses_read(waiter.next_step(), ["b", "c"])  # five seconds of silence


def test_notifications_that_arrived_together_are_read_in_one_round_trip() -> None:
    clock = Clock()
    waiter = make_waiter(["a", "b", "c"], clock)
    subscribed(waiter)
    waiter.next_step()
    waiter.replied([b"running"] * 3)
    for message in [notification("c"), notification("x"), notification("a", channel="other:events"),
                    notification("a"), notification("c")]:
        waiter.received(message)
    assert records_read(waiter.next_step(), ["c", "a"])  # not x (not waited on), c once


@pytest.mark.parametrize("when", ["at the start", "on a re-read", "on a record read"])
def test_a_missing_record_raises_rollout_not_found(when: str) -> None:
    clock = Clock()
    waiter = make_waiter(["a", "b"], clock)
    subscribed(waiter)
    waiter.next_step()
    with pytest.raises(RolloutNotFoundError, match="'b'"):
        if when == "at the start":
            waiter.replied([b"running", None])
        waiter.replied([b"running", b"running"])
        if when == "on a re-read":  # e.g. Redis restarted without persistence
            clock.now += 5
            waiter.next_step()
            waiter.replied([b"running", None])
        waiter.received(notification("b"))
        waiter.next_step()
        waiter.replied([{}])  # expired between the notification and the read


def test_a_zero_timeout_reads_once_without_subscribing() -> None:
    waiter = make_waiter(["a", "b"], Clock(), timeout=0)
    assert statuses_read(waiter.next_step(), ["a", "b"])
    waiter.replied([b"succeeded", b"queuing"])
    assert records_read(waiter.next_step(), ["a"])
    waiter.replied([record("a")])
    done = waiter.next_step()
    assert isinstance(done, Done) and [r.rollout_id for r in done.rollouts] == ["a"]


def test_the_deadline_ends_the_wait_with_what_finished() -> None:
    clock = Clock()
    waiter = make_waiter(["a", "b"], clock, timeout=3)
    subscribed(waiter)
    waiter.next_step()
    waiter.replied([b"running", b"running"])
    clock.now += 1
    assert waiter.next_step() == Listen(2.0)
    clock.now += 2
    assert waiter.next_step() == Done([])


def test_backoff_while_unreachable_never_passes_the_deadline() -> None:
    clock = Clock()
    waiter = make_waiter(["a"], clock, timeout=1.0)
    delays = []
    for _ in range(4):
        delays.append(waiter.failed(redis.ConnectionError("refused")))
        clock.now += delays[-1]
    assert delays[:3] == [0.1, 0.2, 0.4] and delays[3] == pytest.approx(0.3)  # capped by the deadline
    # At the deadline the last try is a plain read (no subscription needed to answer now).
    assert statuses_read(waiter.next_step(), ["a"])
    with pytest.raises(RedisUnavailableError) as info:
        waiter.failed(redis.ConnectionError("refused"))
    message = str(info.value)
    assert "redis://:**@redis.example:6379/0" in message and "hunter2" not in message and "refused" in message
    assert isinstance(info.value, redis.ConnectionError)


def test_an_outage_longer_than_the_retry_budget_raises_even_without_a_deadline() -> None:
    clock = Clock()
    waiter = make_waiter(["a"], clock, timeout=None, retry_seconds=3.0)
    subscribed(waiter)
    waiter.next_step()
    waiter.replied([b"running"])
    while True:
        try:
            clock.now += waiter.failed(redis.TimeoutError("timed out"))
        except RedisUnavailableError:
            break
        assert isinstance(waiter.next_step(), Listen)  # which reconnects
    assert clock.now - 100.0 == pytest.approx(3.0)


def test_a_short_outage_is_ridden_out() -> None:
    clock = Clock()
    waiter = make_waiter(["a"], clock, timeout=None, retry_seconds=3.0)
    subscribed(waiter)
    waiter.next_step()
    waiter.replied([b"running"])
    clock.now += waiter.failed(redis.ConnectionError("refused"))
    clock.now += 2.5
    waiter.received(confirmation())  # reconnected: the budget starts again
    waiter.next_step()
    waiter.replied([b"running"])
    clock.now += 2.9
    assert waiter.failed(redis.ConnectionError("refused")) > 0


def test_refused_credentials_raise_at_once() -> None:
    waiter = make_waiter(["a"], Clock())
    with pytest.raises(RedisAuthError):
        waiter.failed(redis.AuthenticationError("WRONGPASS"))


def test_nothing_to_wait_for() -> None:
    assert make_waiter([], Clock()).next_step() == Done([])


# ----------------------------------------------------------------------------- the drivers, on fakeredis


@pytest.fixture
def running(store: RolloutStore, make_rollouts: Callable[..., list[Rollout]]) -> list[Rollout]:
    rollouts = make_rollouts(3)
    for rollout in rollouts:
        run_to_running(store, rollout)
    return rollouts


def muted(store: RolloutStore) -> RolloutStore:
    """The same store, whose final transitions publish where no waiter listens (a lost notification)."""

    class Muted(Keys):
        @property
        def events(self) -> str:
            return f"{self.prefix}:muted"

    return RolloutStore(store.redis, Muted(store.keys.prefix))


def subscribers(store: RolloutStore) -> int:
    return int(store.redis.pubsub_numsub(store.keys.events)[0][1])


def finish_quietly(store: RolloutStore, rollouts: list[Rollout]) -> None:
    for rollout in rollouts:
        muted(store).finish_attempt(rollout.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition never held")


def test_sync_wait_finds_rollouts_whose_notification_was_lost(
    store: RolloutStore, running: list[Rollout], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lightning_queue.storage.waiting.RECONCILE_SECONDS", 0.2)
    thread, outcome = in_thread(lambda: store.wait_for_rollouts([r.rollout_id for r in running], timeout=30))
    wait_until(lambda: subscribers(store) == 1)
    finish_quietly(store, running)
    thread.join(30)
    assert [r.status for r in outcome[0]] == ["succeeded"] * 3


def test_sync_wait_raises_when_a_record_vanishes_while_it_waits(
    store: RolloutStore, running: list[Rollout], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lightning_queue.storage.waiting.RECONCILE_SECONDS", 0.2)
    thread, outcome = in_thread(lambda: store.wait_for_rollouts([r.rollout_id for r in running], timeout=30))
    wait_until(lambda: subscribers(store) == 1)
    store.redis.delete(store.keys.rollout(running[1].rollout_id))
    thread.join(30)
    assert isinstance(outcome[0], RolloutNotFoundError) and outcome[0].rollout_id == running[1].rollout_id
    assert subscribers(store) == 0


def test_sync_waits_keep_one_pubsub_connection_unsubscribed_between_calls(
    store: RolloutStore, running: list[Rollout]
) -> None:
    # Making a client and a pub/sub connection per wait cost ten handshake round trips per wait.
    first, second, third = running
    for rollout in (first, second):
        store.finish_attempt(rollout.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))
    assert [r.rollout_id for r in store.wait_for_rollouts([first.rollout_id], timeout=5)] == [first.rollout_id]
    kept = store._waits._idle
    assert kept is not None and kept.pubsub.connection is not None
    connection = kept.pubsub.connection
    assert subscribers(store) == 0  # unsubscribed while idle: nothing piles up for it
    assert [r.rollout_id for r in store.wait_for_rollouts([second.rollout_id], timeout=5)] == [second.rollout_id]
    assert store._waits._idle is kept and kept.pubsub.connection is connection
    kept.pid = -1  # as a forked child sees its parent's connections: it makes its own
    store.wait_for_rollouts([second.rollout_id], timeout=5)
    assert store._waits._idle is not kept
    kept = store._waits._idle
    # Meanwhile another thread's wait makes its own connections and closes them after.
    thread, outcome = in_thread(lambda: store.wait_for_rollouts([third.rollout_id], timeout=30))
    wait_until(lambda: subscribers(store) == 1)
    assert store.wait_for_rollouts([first.rollout_id], timeout=5)[0].status == "succeeded"
    store.finish_attempt(third.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))
    thread.join(30)
    assert outcome[0][0].rollout_id == third.rollout_id
    assert store._waits._idle is not None
    # A wait that ends with an error does not keep its connections; close() drops the idle ones.
    store.redis.delete(store.keys.rollout(first.rollout_id))
    with pytest.raises(RolloutNotFoundError):
        store.wait_for_rollouts([first.rollout_id], timeout=5)
    assert store._waits._idle is None
    store.wait_for_rollouts([second.rollout_id], timeout=5)
    store.close()
    assert store._waits._idle is None and subscribers(store) == 0


async def test_async_wait_finds_rollouts_whose_notification_was_lost(
    async_client: AsyncLightningClient, store: RolloutStore, running: list[Rollout], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lightning_queue.storage.waiting.RECONCILE_SECONDS", 0.2)
    task = asyncio.create_task(async_client.wait_for_rollouts([r.rollout_id for r in running], timeout=30))
    while subscribers(store) < 1:
        await asyncio.sleep(0.01)
    finish_quietly(store, running)
    done = await asyncio.wait_for(task, 30)
    assert [r.status for r in done] == ["succeeded"] * 3


async def test_async_wait_raises_when_a_record_vanishes_while_it_waits(
    async_client: AsyncLightningClient, store: RolloutStore, running: list[Rollout], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lightning_queue.storage.waiting.RECONCILE_SECONDS", 0.2)
    task = asyncio.create_task(async_client.wait_for_rollouts([r.rollout_id for r in running], timeout=30))
    while subscribers(store) < 1:
        await asyncio.sleep(0.01)
    store.redis.delete(store.keys.rollout(running[2].rollout_id))
    with pytest.raises(RolloutNotFoundError, match=running[2].rollout_id):
        await asyncio.wait_for(task, 30)
    # (fakeredis keeps counting a closed asyncio subscriber: tests/integration/test_aio.py checks that
    # the subscription is given back, on a real server.)


def test_the_sync_wait_uses_a_bounded_client_of_its_own(fake_redis: fakeredis.FakeRedis) -> None:
    # A fakeredis client is used as it is (only clients built by connect() know their URL).
    from lightning_queue.storage.connections import waiting_client

    with waiting_client(fake_redis) as (client, server):
        assert client is fake_redis and server.startswith("redis://")
