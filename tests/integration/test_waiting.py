"""``wait_for_rollouts`` (sync and async clients) against a Redis server of the test's own that
restarts, loses its data or stops: the wait learns of what finished while its subscription was
down, notices records that vanished, and keeps to its timeout while Redis is unreachable."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from lightning_queue import (
    AsyncLightningClient,
    LightningClient,
    Rollout,
    RolloutNotFoundError,
    RolloutResult,
    Settings,
)
from lightning_queue.core.errors import RedisUnavailableError
from lightning_queue.core.keys import Keys
from lightning_queue.storage.store import RolloutStore
from tests.integration.private_redis import PrivateRedis, private_redis_fixture  # noqa: F401 (a fixture)
from tests.unit.test_store import run_to_running

AOF = ["--appendonly", "yes", "--appendfsync", "always"]
PASSWORD = "not-shown-pw"
WAIT = 30.0  # a bound for the test to fail rather than hang; the waits below return well before


def start_wait(kind: str, settings: Settings, ids: list[str], timeout: float | None,
               on_finished: Callable[[Rollout], None] | None = None) -> Future[tuple[list[Rollout], float]]:
    """Run ``wait_for_rollouts`` in a thread of its own, through the sync client or the async one
    (in that thread's event loop); the future gives the rollouts and the seconds the call took."""

    def sync() -> tuple[list[Rollout], float]:
        with LightningClient(settings) as client:
            started = time.monotonic()
            return client.wait_for_rollouts(ids, timeout, on_finished), time.monotonic() - started

    async def in_loop() -> tuple[list[Rollout], float]:
        async with AsyncLightningClient(settings) as client:
            started = time.monotonic()
            return await client.wait_for_rollouts(ids, timeout, on_finished), time.monotonic() - started

    executor = ThreadPoolExecutor(1)
    future = executor.submit(sync if kind == "sync" else lambda: asyncio.run(in_loop()))
    executor.shutdown(wait=False)
    return future


@dataclass
class Setup:
    server: PrivateRedis
    settings: Settings
    store: RolloutStore  # a store of the test's own, on its own connection
    done_before: Rollout  # finished before the wait starts: its on_finished says the first read happened
    running: list[Rollout]

    def kill_and_restart(self) -> None:
        """SIGKILL (no chance to write anything more) and start again on the same port and directory."""
        assert self.server.process is not None
        self.server.process.kill()
        self.server.process.wait()
        self.server.start()

    def subscribers(self) -> int:
        return int(self.store.redis.pubsub_numsub(self.store.keys.events)[0][1])


@pytest.fixture
def make_setup(private_redis: Callable[..., PrivateRedis], prefix: str) -> Iterator[Callable[..., Setup]]:
    """``make_setup(args)``: a private redis-server with a password (and ``args``), one finished and
    three running rollouts."""
    clients: list[redis.Redis] = []

    def make(args: list[str] | None = None) -> Setup:
        server = private_redis(args=[*(args or []), "--requirepass", PASSWORD])
        settings = Settings(redis_url=server.url(password=PASSWORD), key_prefix=prefix, redis_retry_seconds=10)
        client = redis.Redis.from_url(settings.redis_url)
        clients.append(client)
        store = RolloutStore(client, Keys(prefix))
        done_before, *running = [Rollout(input=i) for i in range(4)]
        store.create_rollouts([done_before, *running])
        seq = run_to_running(store, done_before)
        store.finish_attempt(done_before.rollout_id, seq, "succeeded", "succeeded", result=RolloutResult(reward=0.5))
        for rollout in running:
            run_to_running(store, rollout)
        return Setup(server, settings, store, done_before, running)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def setup(make_setup: Callable[..., Setup]) -> Setup:
    """A server without persistence: a restart loses every key."""
    return make_setup()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def first_read_done(setup: Setup, kind: str, timeout: float | None) -> Future[tuple[list[Rollout], float]]:
    """Start a wait on all four rollouts and return once it has subscribed and read the statuses."""
    seen = threading.Event()
    ids = [setup.done_before.rollout_id, *(r.rollout_id for r in setup.running)]
    future = start_wait(kind, setup.settings, ids, timeout, lambda _: seen.set())
    assert seen.wait(WAIT), "the wait never reported the rollout that had finished before it started"
    wait_for(lambda: setup.subscribers() >= 1, "the waiter's subscription")
    return future


def muted(store: RolloutStore) -> RolloutStore:
    """The same store, but its final transitions publish on a channel nobody listens to: as if the
    notifications were sent while the waiter was not subscribed."""

    class Muted(Keys):
        @property
        def events(self) -> str:
            return f"{self.prefix}:events-nobody-hears"

    return RolloutStore(store.redis, Muted(store.keys.prefix))


# ----------------------------------------------------------------------------- completions while reconnecting


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_wait_rereads_statuses_when_its_subscription_is_reestablished(
    make_setup: Callable[..., Setup], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = make_setup(AOF)
    # Only the resubscription may save the wait: the periodic re-read is pushed out of reach.
    try:
        from lightning_queue.storage import waiting
    except ImportError:
        pass  # the code before the waiting module (which had no periodic re-read)
    else:
        monkeypatch.setattr(waiting, "RECONCILE_SECONDS", 3600.0)
    future = first_read_done(setup, kind, timeout=WAIT / 2)
    quiet = muted(setup.store)
    for rollout in setup.running:  # their notifications never reach the waiter
        quiet.finish_attempt(rollout.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1.0))
    setup.kill_and_restart()  # the append-only file keeps them finished; the waiter reconnects by itself

    done, elapsed = future.result(WAIT)
    print(f"{kind}: returned {[r.status for r in done]} {elapsed:.2f} s after it started")
    assert [r.rollout_id for r in done] == [setup.done_before.rollout_id, *(r.rollout_id for r in setup.running)]
    assert [r.status for r in done] == ["succeeded"] * 4


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_wait_raises_when_the_records_it_waits_on_vanish(setup: Setup, kind: str) -> None:
    # No persistence: the restarted server has lost every key, and the rollouts will never finish.
    future = first_read_done(setup, kind, timeout=WAIT / 2)
    setup.kill_and_restart()
    error, after_restart = outcome(lambda: future.result(WAIT))
    print(f"{kind}: ended {after_restart:.2f} s after the restart with {error!r:.120}")
    assert isinstance(error, RolloutNotFoundError)
    assert error.rollout_id in {r.rollout_id for r in setup.running}


# ----------------------------------------------------------------------------- Redis unreachable


def outcome(call: Callable[[], Any]) -> tuple[Any, float]:
    """What ``call`` returned or raised, and how long it took."""
    started = time.monotonic()
    try:
        result = call()
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_wait_keeps_its_timeout_when_redis_is_down_from_the_start(setup: Setup, kind: str) -> None:
    ids = [r.rollout_id for r in setup.running]
    with LightningClient(setup.settings) as client:  # built while Redis is up: the start-up check passes
        setup.server.stop()
        if kind == "sync":
            error, elapsed = outcome(lambda: client.wait_for_rollouts(ids, timeout=2))
        else:
            async def wait() -> tuple[Any, float]:
                async with AsyncLightningClient(setup.settings, redis_client=client.redis) as aclient:
                    started = time.monotonic()
                    try:
                        return await aclient.wait_for_rollouts(ids, timeout=2), time.monotonic() - started
                    except Exception as exc:
                        return exc, time.monotonic() - started

            error, elapsed = asyncio.run(wait())
    print(f"{kind}: wait_for_rollouts(timeout=2) ended after {elapsed:.2f} s with {error!r:.120}")
    assert isinstance(error, RedisUnavailableError)
    assert elapsed < 2 + 3
    message = str(error)
    assert f"127.0.0.1:{setup.server.port}" in message and PASSWORD not in message


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_wait_keeps_its_timeout_when_redis_stops_while_it_waits(setup: Setup, kind: str) -> None:
    future = first_read_done(setup, kind, timeout=4)
    setup.server.stop()
    error, after_stop = outcome(lambda: future.result(WAIT))
    print(f"{kind}: wait_for_rollouts(timeout=4) ended {after_stop:.2f} s after Redis stopped with {error!r:.120}")
    assert isinstance(error, RedisUnavailableError)
    assert after_stop < 4 + 3


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_wait_keeps_its_timeout_when_redis_hangs(setup: Setup, kind: str) -> None:
    # SIGSTOP: connections stay open and nothing answers, so only time-outs can end a read.
    assert setup.server.process is not None
    ids = [r.rollout_id for r in setup.running]
    with LightningClient(setup.settings) as client:  # built while Redis answers

        async def wait() -> list[Rollout]:
            async with AsyncLightningClient(setup.settings, redis_client=client.redis) as aclient:
                setup.server.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
                return await aclient.wait_for_rollouts(ids, timeout=2)

        def sync() -> list[Rollout]:
            setup.server.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            return client.wait_for_rollouts(ids, timeout=2)

        try:
            error, elapsed = outcome(sync if kind == "sync" else lambda: asyncio.run(wait()))
        finally:
            setup.server.process.send_signal(signal.SIGCONT)
    print(f"{kind}: wait_for_rollouts(timeout=2) on a hung Redis ended after {elapsed:.2f} s with {error!r:.120}")
    assert isinstance(error, RedisUnavailableError)
    assert elapsed < 2 + 3


def test_client_calls_raise_redis_unavailable_when_redis_is_down(setup: Setup) -> None:
    settings = setup.settings.model_copy(update={"redis_retry_seconds": 1.0})
    with LightningClient(settings) as client:
        setup.server.stop()
        error, elapsed = outcome(lambda: client.get_pointer("prod"))
        print(f"get_pointer raised after {elapsed:.2f} s (retry budget 1 s): {error!r:.120}")
        assert isinstance(error, RedisUnavailableError)
        with pytest.raises(RedisUnavailableError):
            client.get_rollouts([r.rollout_id for r in setup.running])  # a pipeline
        with pytest.raises(RedisUnavailableError):
            client.store.terminate(setup.running[0].rollout_id, "cancelled")  # a Lua script

        async def call() -> None:
            async with AsyncLightningClient(settings, redis_client=client.redis) as aclient:
                await aclient.get_pointer("prod")

        with pytest.raises(RedisUnavailableError):
            asyncio.run(call())
    message = str(error)
    assert f"127.0.0.1:{setup.server.port}" in message and PASSWORD not in message and "**" in message
    assert isinstance(error, redis.ConnectionError)  # code written against redis-py still catches it
