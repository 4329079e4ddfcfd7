"""The worker-side snapshot cache on fakeredis: its listener thread runs against fakeredis pub/sub."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis
from celery import signals

from lightning_queue import LLM, LightningClient, PromptTemplate, Settings, create_app
from lightning_queue.broker.app import make_celery
from lightning_queue.broker.publisher import Publisher
from lightning_queue.core.errors import NoLatestResourcesError, ResourcesNotFoundError
from lightning_queue.storage.registry import SnapshotRegistry
from lightning_queue.worker.cache import SnapshotCache, start_cache
from lightning_queue.worker.context import WorkerContext
from lightning_queue.worker.heartbeat import Heartbeat
from tests.unit.test_runner import recording_agent


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the cache listener")
        time.sleep(0.005)


class Calls:
    """Counts the registry fetches and the Redis commands the test process issues."""

    def __init__(self, registry: SnapshotRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fetches: list[tuple[str, int | None]] = []
        self.commands: list[Any] = []
        fetch, execute = registry.fetch, registry.redis.execute_command

        def counted_fetch(ref: str, version: int | None = None) -> Any:
            self.fetches.append((ref, version))
            return fetch(ref, version)

        def counted_execute(*args: Any, **options: Any) -> Any:
            self.commands.append(args[0])
            return execute(*args, **options)

        monkeypatch.setattr(registry, "fetch", counted_fetch)
        monkeypatch.setattr(registry.redis, "execute_command", counted_execute)

    def reset(self) -> None:
        self.fetches.clear()
        self.commands.clear()


@pytest.fixture
def make_cache(registry: SnapshotRegistry) -> Iterator[Callable[..., SnapshotCache]]:
    caches: list[SnapshotCache] = []

    def make(max_bytes: int = 10_000_000, start: bool = True) -> SnapshotCache:
        cache = SnapshotCache(registry, max_bytes, poll_seconds=0.02)
        caches.append(cache)
        if start:
            assert cache.start()
        return cache

    yield make
    for cache in caches:
        cache.close()


def seq_of(registry: SnapshotRegistry) -> int:
    return int(registry.redis.get(registry.keys.seq) or 0)


def caught_up(cache: SnapshotCache, registry: SnapshotRegistry) -> None:
    seq = seq_of(registry)
    wait_until(lambda: cache.stats()["applied_seq"] >= seq)


def prompt(text: str) -> dict[str, PromptTemplate]:
    return {"prompt": PromptTemplate(template=text)}


def test_hit_makes_no_round_trip(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = registry.add_resources(prompt("Q: {question}"), "rs-a")
    cache = make_cache()
    calls = Calls(registry, monkeypatch)
    seq = seq_of(registry)
    assert cache.get("latest", None, seq) == snap  # a miss: one fetch
    assert len(calls.fetches) == 1
    caught_up(cache, registry)
    calls.reset()

    for _ in range(100):
        assert cache.get("latest", None, seq) is cache.get("rs-a", None, seq) is cache.get("rs-a", 1, seq)
    assert calls.fetches == [] and calls.commands == []
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (300, 1)


def test_update_is_seen_once_the_listener_has_passed_min_seq(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_resources(prompt("v1"), "rs-a")
    cache = make_cache()
    assert cache.get("rs-a", None, seq_of(registry)).version == 1
    registry.update_resources("rs-a", prompt("v2"))
    seq = seq_of(registry)
    caught_up(cache, registry)
    calls = Calls(registry, monkeypatch)

    first = cache.get("rs-a", None, seq)  # the listener knows version 2 is current but has not got it
    assert (first.version, first.resources["prompt"].template) == (2, "v2")
    assert calls.fetches == [("rs-a", None)]
    assert cache.get("latest", None, seq) is first  # then it is a hit, by id or through latest
    assert cache.get("rs-a", 1, seq).version == 1  # the earlier version is still cached
    assert len(calls.fetches) == 1


def test_min_seq_ahead_of_the_listener_forces_a_fetch(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_resources(prompt("v1"), "rs-a")
    cache = make_cache()
    old_seq = seq_of(registry)
    cache.get("latest", None, old_seq)
    caught_up(cache, registry)
    cache.close()  # the listener stops here: it never hears of the update
    registry.update_resources("rs-a", prompt("v2"))
    calls = Calls(registry, monkeypatch)

    assert cache.get("latest", None, old_seq).version == 1  # as fresh as that message asked for
    assert calls.fetches == []
    assert cache.get("latest", None, seq_of(registry)).version == 2
    assert calls.fetches == [("latest", None)]


def test_pointer_move_is_followed_without_a_fetch(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_resources(prompt("a"), "rs-a")
    registry.add_resources(prompt("b"), "rs-b")
    registry.set_pointer("prod", "rs-a")
    cache = make_cache()
    assert cache.prewarm() == 2
    assert cache.get("prod", None, seq_of(registry)).resources_id == "rs-a"
    registry.set_pointer("prod", "rs-b")
    seq = seq_of(registry)
    caught_up(cache, registry)
    calls = Calls(registry, monkeypatch)

    assert cache.get("prod", None, seq).resources_id == "rs-b"
    registry.rollback("prod")
    seq = seq_of(registry)
    caught_up(cache, registry)
    assert cache.get("prod", None, seq).resources_id == "rs-a"
    assert calls.fetches == []


def test_deletion_drops_the_entries_and_the_error_propagates(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache]
) -> None:
    registry.add_resources(prompt("a1"), "rs-a")
    registry.update_resources("rs-a", prompt("a2"))
    registry.add_resources(prompt("b"), "rs-b")
    registry.set_pointer("prod", "rs-a")
    cache = make_cache()
    seq = seq_of(registry)
    cache.get("rs-a", 1, seq)
    cache.get("prod", None, seq)
    cache.get("latest", None, seq)
    assert cache.stats()["entries"] == 3

    registry.delete_resources("rs-a", force=True)  # also unsets prod
    seq = seq_of(registry)
    caught_up(cache, registry)
    stats = cache.stats()
    assert stats["entries"] == 1 and stats["bytes"] == registry.fetch("rs-b").size
    with pytest.raises(ResourcesNotFoundError):
        cache.get("rs-a", 1, seq)
    with pytest.raises(ResourcesNotFoundError):
        cache.get("prod", None, seq)


def test_lru_eviction_by_bytes(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in "abc":
        registry.add_resources(prompt(name * 1000), f"rs-{name}")
    size = registry.fetch("rs-a").size
    assert registry.fetch("rs-b").size == registry.fetch("rs-c").size == size
    cache = make_cache(max_bytes=int(size * 2.5))
    calls = Calls(registry, monkeypatch)
    cache.get("rs-a", 1)
    cache.get("rs-b", 1)
    cache.get("rs-a", 1)  # a hit: a is now the most recently used
    cache.get("rs-c", 1)  # evicts b, the least recently used
    assert cache.stats()["evictions"] == 1 and cache.stats()["bytes"] == 2 * size
    calls.reset()
    cache.get("rs-a", 1)
    cache.get("rs-c", 1)
    assert calls.fetches == []
    cache.get("rs-b", 1)
    assert calls.fetches == [("rs-b", 1)]


def test_snapshot_bigger_than_the_cache_is_returned_but_not_kept(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache]
) -> None:
    registry.add_resources(prompt("x" * 5000), "rs-big")
    cache = make_cache(max_bytes=1000)
    assert cache.get("rs-big", 1).resources["prompt"].template == "x" * 5000
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0


def test_stats(registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache]) -> None:
    registry.add_resources(prompt("a"), "rs-a")
    cache = make_cache()
    seq = seq_of(registry)
    cache.get("latest", None, seq)
    caught_up(cache, registry)
    cache.get("latest", None, seq)
    cache.get("rs-a", 1)
    stats = cache.stats()
    assert {k: stats[k] for k in ("hits", "misses", "entries", "evictions", "load_count")} == {
        "hits": 2, "misses": 1, "entries": 1, "evictions": 0, "load_count": 1,
    }
    assert stats["hit_ratio"] == pytest.approx(2 / 3)
    assert stats["bytes"] == registry.fetch("rs-a").size
    assert stats["load_seconds_total"] > 0
    assert stats["mean_load_ms"] == pytest.approx(1000 * stats["load_seconds_total"])


def test_prewarm_loads_latest_and_every_pointer(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = make_cache()
    assert empty.prewarm() == 0  # an empty registry is fine
    with pytest.raises(NoLatestResourcesError):
        empty.get("latest")
    registry.add_resources(prompt("a"), "rs-a")
    registry.add_resources(prompt("b"), "rs-b")
    registry.add_resources(prompt("c"), "rs-c")
    registry.set_pointer("prod", "rs-a")
    registry.set_pointer("canary", "rs-b")
    cache = make_cache()
    assert cache.prewarm() == 3
    seq = seq_of(registry)
    caught_up(cache, registry)
    calls = Calls(registry, monkeypatch)
    got = {ref: cache.get(ref, None, seq).resources_id for ref in ("latest", "prod", "canary", "rs-a")}
    assert got == {"latest": "rs-c", "prod": "rs-a", "canary": "rs-b", "rs-a": "rs-a"}
    assert calls.fetches == [] and calls.commands == []
    assert cache.stats()["misses"] == 0 and cache.stats()["load_count"] == 3


def test_resubscribe_forgets_versions_and_pointers(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_resources(prompt("v1"), "rs-a")
    cache = make_cache()
    cache.prewarm()
    caught_up(cache, registry)
    down, resume = threading.Event(), threading.Event()
    get_message = redis.client.PubSub.get_message

    def failing_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not down.is_set():
            down.set()
            resume.wait(5)
            raise redis.ConnectionError("simulated: connection reset")
        return get_message(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.PubSub, "get_message", failing_once)
    assert down.wait(5)
    registry.update_resources("rs-a", prompt("v2"))  # published while the listener is down: lost
    resume.set()
    seq = seq_of(registry)
    wait_until(lambda: cache.stats()["resubscribes"] == 2)

    assert cache.stats()["applied_seq"] == seq  # read after subscribing again
    assert cache._versions == {} and cache._pointers == {}
    assert cache.stats()["entries"] == 1  # entries are immutable: kept
    calls = Calls(registry, monkeypatch)
    assert cache.get("latest", None, seq).version == 2  # not the stale v1
    assert calls.fetches == [("latest", None)]
    assert cache.get("rs-a", 1, seq).version == 1 and len(calls.fetches) == 1


def test_a_gap_in_the_event_sequence_forgets_versions_and_pointers(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache]
) -> None:
    cache = make_cache(start=False)
    cache._reset(10)
    cache._apply({"op": "pointer", "pointers": {"prod": "rs-a"}, "seq": 11})
    cache._apply({"op": "write", "id": "rs-b", "version": 3, "pointers": {"latest": "rs-b"}, "seq": 13})
    assert cache._pointers == {"latest": ("rs-b", 13)}  # prod is forgotten: event 12 might have moved it
    assert cache._versions == {"rs-b": (3, 13)} and cache.stats()["applied_seq"] == 13


def test_a_read_older_than_an_applied_event_does_not_overwrite_it(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_resources(prompt("a"), "rs-a")
    registry.add_resources(prompt("b"), "rs-b")
    cache = make_cache(start=False)
    cache._reset(0)
    fetch = registry.fetch

    def slow_fetch(ref: str, version: int | None = None) -> Any:
        fetched = fetch(ref, version)
        # While this read was on its way, the listener applied a later move of latest.
        cache._apply({"op": "write", "id": "rs-c", "version": 1, "pointers": {"latest": "rs-c"},
                      "seq": fetched.seq + 1})
        return fetched

    monkeypatch.setattr(registry, "fetch", slow_fetch)
    assert cache.get("latest").resources_id == "rs-b"
    assert cache._pointers["latest"][0] == "rs-c"


def worker_context(client: LightningClient, cache: SnapshotCache | None) -> WorkerContext:
    """A worker process's context over the client's registry and store, with ``cache``."""
    settings = client.settings
    return WorkerContext(settings=settings, redis=client.redis, registry=client.registry, store=client.store,
                         publisher=Publisher(make_celery(settings), settings),
                         heartbeat=Heartbeat(client.store, settings.heartbeat_interval), cache=cache)


def test_load_snapshot_goes_through_the_cache(fake_client: LightningClient, llm: LLM) -> None:
    snap = fake_client.add_resources({"main": llm})
    cache = start_cache(fake_client.registry, fake_client.settings)
    assert cache is not None
    ctx = worker_context(fake_client, cache)
    try:
        assert cache.stats()["load_count"] == 1  # pre-warmed
        seq = seq_of(fake_client.registry)
        caught_up(cache, fake_client.registry)
        assert ctx.load_snapshot(None, None, seq) == snap
        assert ctx.load_snapshot(snap.resources_id, 1, seq) == snap
        assert cache.stats()["hits"] == 2
    finally:
        cache.close()


def test_cache_max_bytes_zero_disables_it(fake_redis: fakeredis.FakeRedis, prefix: str) -> None:
    settings = Settings(redis_url="redis://fakeredis.invalid:1/0", key_prefix=prefix, cache_max_bytes=0)
    client = LightningClient(settings, redis_client=fake_redis)
    assert start_cache(client.registry, settings) is None


def test_worker_pool_processes_get_a_cache_and_log_its_stats(
    fake_redis: fakeredis.FakeRedis, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    connected: list[str] = []

    def connect(url: str, *args: object, **kwargs: object) -> fakeredis.FakeRedis:
        connected.append(url)
        return fake_redis

    monkeypatch.setattr("lightning_queue.worker.context.connect", connect)  # what WorkerContext.create calls
    app = create_app(Settings(redis_url="redis://fakeredis.invalid:1/0", key_prefix=prefix), agent=noop)
    signals.worker_process_init.send(sender=None)
    assert app.context_pid is None and connected == []  # not this process's worker: nothing built

    monkeypatch.setattr("lightning_queue.worker.signals._worker_app", app)  # what worker_init records
    signals.worker_process_init.send(sender=None)
    assert connected == ["redis://fakeredis.invalid:1/0"]
    cache = app.context.cache
    assert isinstance(cache, SnapshotCache)
    with caplog.at_level(logging.INFO, logger="lightning_queue.worker.context"):
        signals.worker_process_shutdown.send(sender=None, pid=0, exitcode=0)
    assert "snapshot cache stats" in caplog.text and "'hits': 0" in caplog.text
    assert cache._thread is None  # the listener was stopped
    assert app.context_pid is None


def test_a_read_from_before_a_resubscription_or_a_deletion_is_not_learned(
    registry: SnapshotRegistry, make_cache: Callable[..., SnapshotCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.add_resources(prompt("a"), "rs-a")
    cache = make_cache(start=False)
    cache._reset(0)
    fetch = registry.fetch
    meanwhile: list[Callable[[int], None]] = []

    def slow_fetch(ref: str, version: int | None = None) -> Any:
        fetched = fetch(ref, version)
        meanwhile.pop()(fetched.seq)
        return fetched

    monkeypatch.setattr(registry, "fetch", slow_fetch)
    meanwhile.append(lambda seq: cache._reset(seq + 5, resubscribed=True))  # changes up to seq+5 were missed
    assert cache.get("latest").resources_id == "rs-a"
    assert cache._versions == {} and cache._pointers == {}
    registry.add_resources(prompt("b"), "rs-b")
    cache._reset(seq_of(registry))
    meanwhile.append(lambda seq: cache._apply({"op": "delete", "id": "rs-b", "pointers": {"latest": False},
                                               "seq": seq + 1}))
    assert cache.get("rs-b", 1).resources_id == "rs-b"  # the caller gets what it read...
    assert cache.stats()["entries"] == 1  # ...but a snapshot deleted meanwhile is not cached (only rs-a is)
    assert cache._pointers == {"latest": (None, cache.stats()["applied_seq"])}


def test_cache_reports_its_stats_for_the_fleet_view(fake_client: LightningClient, llm: LLM) -> None:
    fake_client.add_resources({"main": llm}, "rs-a")
    fake_client.settings.cache_stats_interval_seconds = 0.05
    cache = start_cache(fake_client.registry, fake_client.settings, "w1@host:123")
    assert cache is not None
    ctx = worker_context(fake_client, cache)
    try:
        ctx.load_snapshot("rs-a", 1)  # pre-warmed by id and version: a hit
        ctx.load_snapshot("rs-a", None, min_seq=10**9)  # not caught up that far: a miss
        deadline = time.monotonic() + 5
        while fake_client.cache_stats().get("w1@host:123", {}).get("misses") != 1:
            assert time.monotonic() < deadline, fake_client.cache_stats()
            time.sleep(0.02)
        reported = fake_client.cache_stats()["w1@host:123"]
        assert reported["hits"] == 1 and reported["hit_ratio"] == 0.5 and reported["entries"] == 1
        ttl = fake_client.redis.ttl(fake_client.keys.cache_stats("w1@host:123"))
        assert ttl != -1 and ttl <= 1  # expires after a few missed reports (-2: already gone): dead processes drop out
    finally:
        cache.close()


def test_peek_answers_from_memory_or_none_without_redis(
    make_cache: Callable[..., SnapshotCache], registry: SnapshotRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = registry.add_resources(prompt("a"), "rs-a")
    cache = make_cache()
    caught_up(cache, registry)
    seq = seq_of(registry)
    calls = Calls(registry, monkeypatch)
    assert cache.peek("rs-a", None, seq) is None  # not loaded yet: no fetch, and no miss counted
    assert cache.stats()["misses"] == 0
    cache.get("rs-a", None, seq)
    calls.reset()
    assert cache.peek("rs-a", None, seq).snapshot == snap  # type: ignore[union-attr]
    assert cache.peek("rs-a", 1, seq).snapshot == snap  # type: ignore[union-attr]
    assert cache.peek("rs-a", None, seq + 1) is None  # not caught up with a newer enqueue
    assert calls.fetches == [] and calls.commands == []
    assert cache.stats()["hits"] == 2


noop, _ = recording_agent()
