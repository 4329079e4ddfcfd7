"""Kept versions, pinned vs following rollouts, compare-and-set, and the registry under concurrent writers."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import fakeredis
import pytest

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    Resource,
    ResourcesNotFoundError,
    Rollout,
    RolloutConfig,
    rollout,
)
from lightning_queue.core.errors import (
    PointerError,
    ResourcesExistError,
    VersionConflictError,
)
from lightning_queue.core.keys import Keys
from lightning_queue.storage.registry import SnapshotRegistry, retry_on_conflict
from tests.unit.test_runner import FakeTask, RetryRequested, recording_agent, run


class Counter(Resource):
    """A resource an optimizer would read-modify-write (e.g. a running statistic)."""

    resource_type: Literal["test_versions_counter"] = "test_versions_counter"
    value: int = 0


def prompt(text: str) -> dict[str, PromptTemplate]:
    return {"prompt": PromptTemplate(template=text)}


def state(fake_redis: fakeredis.FakeRedis) -> dict[bytes, bytes]:
    return {key: fake_redis.dump(key) for key in fake_redis.keys("*")}


def prompt_agent() -> tuple[Any, list[tuple[str, str]]]:
    """An agent that records each task it ran and the prompt template it was given."""
    seen: list[tuple[str, str]] = []

    @rollout
    def agent(task: Any, prompt: PromptTemplate, rollout: Rollout) -> float:
        seen.append((task, prompt.template))
        return 1.0

    return agent, seen


def attempts_ran_with(client: LightningClient, rollout_id: str) -> list[tuple[str | None, int | None, str]]:
    return [(a.resources_id, a.resources_version, a.status) for a in client.get_attempts(rollout_id)]


# --------------------------------------------------------------------------- kept versions


def test_update_keeps_earlier_versions_readable(registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis) -> None:
    first = registry.add_resources(prompt("one"), "rs-a")
    second = registry.update_resources("rs-a", prompt("two"))
    third = registry.update_resources("rs-a", prompt("three"))

    for written, text in [(first, "one"), (second, "two"), (third, "three")]:
        read = registry.get_resources_by_id("rs-a", written.version)
        assert (read.resources_id, read.version) == ("rs-a", written.version)
        assert read.resources == prompt(text)
        assert read.create_time == pytest.approx(first.create_time)
        assert read.update_time == pytest.approx(written.update_time)
    assert registry.get_resources_by_id("rs-a") == registry.get_resources_by_id("rs-a", 3)
    assert registry.resolve("rs-a", 1).resources == prompt("one")
    assert fake_redis.exists(registry.keys.snapshot_version("rs-a", 1), registry.keys.snapshot_version("rs-a", 2)) == 2
    assert registry.count() == 1  # versions are not separate snapshots

    registry.set_pointer("prod", "rs-a")
    assert registry.get_resources_by_id("prod", 2).resources == prompt("two")


@pytest.mark.parametrize("version", [0, 4, 99])
def test_unknown_version_is_not_found(registry: SnapshotRegistry, version: int) -> None:
    registry.add_resources(prompt("one"), "rs-a")
    registry.update_resources("rs-a", prompt("two"))
    registry.update_resources("rs-a", prompt("three"))
    with pytest.raises(ResourcesNotFoundError, match=f"rs-a@{version}") as info:
        registry.get_resources_by_id("rs-a", version)
    assert f"version {version} is not stored (the current version is 3" in str(info.value)


# --------------------------------------------------------------------------- pinned vs following


def test_pinned_enqueue_fixes_id_and_version_resolving_a_pointer_then(
    fake_client: LightningClient, enqueue: Callable[..., Rollout]
) -> None:
    fake_client.add_resources(prompt("a1"), "rs-a")
    fake_client.add_resources(prompt("b1"), "rs-b")
    fake_client.set_pointer("prod", "rs-a")
    by_pointer = enqueue("via-prod", resources_id="prod")
    by_id = enqueue("via-id", resources_id="rs-a", resolve="pinned")
    latest_pinned = enqueue("via-latest", resources_id="latest")
    assert [(r.resources_id, r.resources_version) for r in (by_pointer, by_id, latest_pinned)] == [
        ("rs-a", 1), ("rs-a", 1), ("rs-b", 1)
    ]

    # Everything moves while the rollouts wait.
    fake_client.update_resources("rs-a", prompt("a2"))
    fake_client.update_resources("rs-b", prompt("b2"))
    fake_client.set_pointer("prod", "rs-b")

    agent, seen = prompt_agent()
    task = FakeTask(fake_client, agent)
    replies = [run(task, r.rollout_id) for r in (by_pointer, by_id, latest_pinned)]

    assert seen == [("via-prod", "a1"), ("via-id", "a1"), ("via-latest", "b1")]
    assert [(r["resources_id"], r["version"]) for r in replies] == [("rs-a", 1), ("rs-a", 1), ("rs-b", 1)]
    assert attempts_ran_with(fake_client, by_pointer.rollout_id) == [("rs-a", 1, "succeeded")]
    assert attempts_ran_with(fake_client, latest_pinned.rollout_id) == [("rs-b", 1, "succeeded")]


def test_following_enqueue_resolves_when_the_rollout_runs(
    fake_client: LightningClient, enqueue: Callable[..., Rollout]
) -> None:
    fake_client.add_resources(prompt("a1"), "rs-a")
    fake_client.set_pointer("prod", "rs-a")
    on_prod = enqueue("prod", resources_id="prod", resolve="following")
    on_id = enqueue("id", resources_id="rs-a", resolve="following")
    on_latest = enqueue("latest")  # no id: following latest
    assert [(r.resolve, r.resources_id, r.resources_version) for r in (on_prod, on_id, on_latest)] == [
        ("following", "prod", None), ("following", "rs-a", None), ("following", None, None)
    ]

    fake_client.update_resources("rs-a", prompt("a2"))  # latest -> rs-a v2
    fake_client.add_resources(prompt("b1"), "rs-b")  # latest -> rs-b
    fake_client.set_pointer("prod", "rs-b")
    fake_client.update_resources("rs-b", prompt("b2"))

    agent, seen = prompt_agent()
    task = FakeTask(fake_client, agent)
    for r in (on_prod, on_id, on_latest):
        run(task, r.rollout_id)

    assert seen == [("prod", "b2"), ("id", "a2"), ("latest", "b2")]
    # Each attempt records the concrete snapshot, never the pointer name.
    assert attempts_ran_with(fake_client, on_prod.rollout_id) == [("rs-b", 2, "succeeded")]
    assert attempts_ran_with(fake_client, on_id.rollout_id) == [("rs-a", 2, "succeeded")]
    assert attempts_ran_with(fake_client, on_latest.rollout_id) == [("rs-b", 2, "succeeded")]
    # The record keeps what was asked for; the index finds the rollout by what it ran with.
    assert fake_client.get_rollout(on_prod.rollout_id).resources_id == "prod"
    assert on_prod.rollout_id in {r.rollout_id for r in fake_client.query_rollouts(resources_id="rs-b")}


def test_load_snapshot_follows_or_pins(fake_client: LightningClient) -> None:
    fake_client.add_resources(prompt("a1"), "rs-a")
    fake_client.set_pointer("prod", "rs-a")
    fake_client.update_resources("rs-a", prompt("a2"))
    ctx = FakeTask(fake_client, recording_agent()[0]).ctx  # a worker process's context, uncached
    assert ctx.load_snapshot("prod").resources == prompt("a2")
    assert ctx.load_snapshot("rs-a", 1).resources == prompt("a1")
    assert ctx.load_snapshot(None).version == 2


def test_each_attempt_records_the_snapshot_it_ran_with(
    fake_client: LightningClient, enqueue: Callable[..., Rollout]
) -> None:
    """A following rollout retried after a switch runs its second attempt with the new target;
    a pinned one runs every attempt with its pinned version."""
    fake_client.add_resources(prompt("a1"), "rs-a")
    fake_client.set_pointer("prod", "rs-a")
    config = RolloutConfig(max_attempts=2)
    following = enqueue("f", resources_id="prod", resolve="following", config=config)
    pinned = enqueue("p", resources_id="prod", config=config)
    calls: list[str] = []

    @rollout
    def flaky(task: str, prompt: PromptTemplate) -> float:
        calls.append(f"{task}:{prompt.template}")
        if len(calls) <= 2:
            raise ConnectionError("transient")
        return 1.0

    task = FakeTask(fake_client, flaky)
    for r in (following, pinned):
        with pytest.raises(RetryRequested):
            run(task, r.rollout_id)
    fake_client.update_resources("rs-a", prompt("a2"))
    fake_client.add_resources(prompt("b1"), "rs-b")
    fake_client.set_pointer("prod", "rs-b")
    for r in (following, pinned):
        run(task, r.rollout_id)

    assert calls == ["f:a1", "p:a1", "f:b1", "p:a1"]
    assert attempts_ran_with(fake_client, following.rollout_id) == [("rs-a", 1, "failed"), ("rs-b", 1, "succeeded")]
    assert attempts_ran_with(fake_client, pinned.rollout_id) == [("rs-a", 1, "failed"), ("rs-a", 1, "succeeded")]


# --------------------------------------------------------------------------- compare-and-set


def test_update_with_the_expected_version_succeeds(registry: SnapshotRegistry) -> None:
    registry.add_resources(prompt("one"), "rs-a")
    assert registry.update_resources("rs-a", prompt("two"), expected_version=1).version == 2
    assert registry.update_resources("rs-a", prompt("three"), expected_version=2).version == 3


@pytest.mark.parametrize("expected", [0, 1, 3])
def test_version_mismatch_raises_with_the_current_version_and_writes_nothing(
    fake_client: LightningClient, fake_redis: fakeredis.FakeRedis, expected: int
) -> None:
    fake_client.add_resources(prompt("one"), "rs-a")
    fake_client.update_resources("rs-a", prompt("two"))
    fake_client.add_resources(prompt("other"), "rs-b")
    pubsub = fake_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(fake_client.keys.snapshot_events)
    before = state(fake_redis)

    with pytest.raises(VersionConflictError) as info:
        fake_client.update_resources("rs-a", prompt("lost"), expected_version=expected)

    error = info.value
    assert (error.resources_id, error.expected, error.current_version) == ("rs-a", expected, 2)
    assert f"at version 2, not the expected {expected}" in str(error) and "retry" in str(error)
    assert state(fake_redis) == before  # no version, no latest move, no history entry, no seq bump
    assert all(pubsub.get_message(timeout=0.01) is None for _ in range(3))  # nothing announced
    pubsub.close()
    assert fake_client.get_latest_resources().resources_id == "rs-b"  # type: ignore[union-attr]


def test_retry_on_conflict_rereads_after_a_conflict(registry: SnapshotRegistry) -> None:
    registry.add_resources({"counter": Counter(value=0)}, "rs-c")
    reads: list[int] = []

    def change(snapshot: Any) -> dict[str, Counter]:
        reads.append(snapshot.version)
        if len(reads) == 1:  # another writer slips in between our read and our write
            registry.update_resources("rs-c", {"counter": Counter(value=100)})
        return {"counter": Counter(value=snapshot.resources["counter"].value + 1)}

    written = retry_on_conflict(registry, "rs-c", change)

    assert reads == [1, 2]
    assert written.version == 3 and written.resources["counter"] == Counter(value=101)


def test_retry_on_conflict_gives_up_after_its_attempts(registry: SnapshotRegistry) -> None:
    registry.add_resources({"counter": Counter(value=0)}, "rs-c")
    calls: list[int] = []

    def always_beaten(snapshot: Any) -> dict[str, Counter]:
        calls.append(snapshot.version)
        registry.update_resources("rs-c", {"counter": Counter(value=-1)})
        return {"counter": Counter(value=snapshot.resources["counter"].value + 1)}

    with pytest.raises(VersionConflictError) as info:
        retry_on_conflict(registry, "rs-c", always_beaten, attempts=3)
    assert calls == [1, 2, 3]
    assert info.value.current_version == 4


def test_retry_on_conflict_loses_no_update_under_contention(fake_redis: fakeredis.FakeRedis, prefix: str) -> None:
    threads_count, increments = 8, 15
    total = threads_count * increments
    server = fake_redis.connection_pool.connection_kwargs["server"]
    keys = Keys(prefix)
    SnapshotRegistry(fake_redis, keys).add_resources({"counter": Counter(value=0)}, "rs-counter")
    changes = 0
    changes_lock = threading.Lock()
    start = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def increment(snapshot: Any) -> dict[str, Counter]:
        nonlocal changes
        with changes_lock:
            changes += 1
        time.sleep(0.0005)  # widen the read-modify-write window, as real work between read and write would
        return {"counter": Counter(value=snapshot.resources["counter"].value + 1)}

    def writer() -> None:
        client = fakeredis.FakeRedis(server=server)  # one connection per thread, like one per process
        registry = SnapshotRegistry(client, keys)
        try:
            start.wait()
            for _ in range(increments):
                retry_on_conflict(registry, "rs-counter", increment, attempts=1000)
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=writer) for _ in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert not errors, errors
    final = SnapshotRegistry(fake_redis, keys).get_resources_by_id("rs-counter")
    assert final.resources["counter"] == Counter(value=total)
    assert final.version == 1 + total
    assert changes > total, "the writers never conflicted: the test did not exercise contention"
    # Every kept version is one increment on the previous one: no write was ever based on a stale read.
    registry = SnapshotRegistry(fake_redis, keys)
    assert [registry.get_resources_by_id("rs-counter", v).resources["counter"].value
            for v in range(1, total + 2)] == list(range(total + 1))


# --------------------------------------------------------------------------- interleavings

# Atomically: the pointers that name a missing snapshot, and whether latest is unset while snapshots exist.
_CHECK_POINTERS = """
local bad = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  if redis.call('EXISTS', ARGV[1] .. flat[i + 1]) == 0 then table.insert(bad, flat[i] .. '->' .. flat[i + 1]) end
end
if redis.call('HEXISTS', KEYS[1], 'latest') == 0 and redis.call('ZCARD', KEYS[2]) > 0 then
  table.insert(bad, 'latest unset while snapshots exist')
end
return bad
"""


def pointer_violations(client: fakeredis.FakeRedis, keys: Keys) -> list[str]:
    return [v.decode() for v in client.eval(_CHECK_POINTERS, 2, keys.pointers, keys.snapshots, keys.snapshot_prefix)]


def test_pointers_always_name_existing_snapshots_under_interleavings(
    fake_redis: fakeredis.FakeRedis, prefix: str
) -> None:
    threads_count, ops_per_thread = 6, 120
    server = fake_redis.connection_pool.connection_kwargs["server"]
    keys = Keys(prefix)
    seed = SnapshotRegistry(fake_redis, keys)
    for i in range(3):
        seed.add_resources(prompt(f"seed {i}"), f"rs-seed-{i}")
    seed.set_pointer("prod", "rs-seed-0")
    seed.set_pointer("canary", "rs-seed-1")
    violations: list[str] = []
    errors: list[BaseException] = []
    done_ops: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(threads_count)

    def worker(n: int) -> None:
        rng = random.Random(n)
        client = fakeredis.FakeRedis(server=server)
        registry = SnapshotRegistry(client, keys)
        try:
            start.wait()
            for i in range(ops_per_thread):
                ids = registry.list_ids()
                pick = rng.choice(ids) if ids else "rs-none"
                op = rng.choice(["add", "add", "update", "set", "set", "rollback", "delete"])
                try:
                    if op == "add":
                        registry.add_resources(prompt(f"t{n} op{i}"), f"rs-{n}-{i}")
                    elif op == "update":
                        registry.update_resources(pick, prompt(f"t{n} op{i}"))
                    elif op == "set":
                        registry.set_pointer(rng.choice(["prod", "canary", "latest"]), pick)
                    elif op == "rollback":
                        registry.rollback(rng.choice(["prod", "canary", "latest"]))
                    else:
                        registry.delete_resources(pick, force=True)
                except (ResourcesNotFoundError, PointerError):
                    op += "-refused"  # raced with a delete, or nothing to roll back to: refused cleanly
                with lock:
                    done_ops[op] = done_ops.get(op, 0) + 1
                found = pointer_violations(client, keys)
                if found:
                    with lock:
                        violations.append(f"after {op} by thread {n}: {found}")
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert not errors, errors
    assert not violations, violations[:10]
    assert pointer_violations(fake_redis, keys) == []
    # Every op kind really ran and succeeded some of the time.
    assert {"add", "update", "set", "rollback", "delete"} <= set(done_ops), done_ops
    registry = SnapshotRegistry(fake_redis, keys)
    for name, target in registry.pointers().items():
        assert registry.get_resources_by_id(name).resources_id == target
    # The keyspace is consistent: indexed snapshots are exactly the stored ones, and every kept
    # version belongs to a stored snapshot (a delete racing an update leaves no orphan).
    stored = set(registry.list_ids())
    hashes = {k.decode().removeprefix(keys.snapshot_prefix) for k in fake_redis.keys(f"{keys.snapshot_prefix}*")}
    assert {h for h in hashes if keys.VERSION_INFIX not in h} == stored
    for key in (h for h in hashes if keys.VERSION_INFIX in h):
        rid, version = key.split(keys.VERSION_INFIX)
        assert rid in stored and int(version) < registry.get_resources_by_id(rid).version, key


def test_ids_taken_by_concurrent_adds_are_refused_not_overwritten(fake_redis: fakeredis.FakeRedis, prefix: str) -> None:
    server = fake_redis.connection_pool.connection_kwargs["server"]
    keys = Keys(prefix)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def adder(n: int) -> None:
        client = fakeredis.FakeRedis(server=server)
        start.wait()
        try:
            SnapshotRegistry(client, keys).add_resources(prompt(f"by {n}"), "rs-race")
            outcomes.append(f"by {n}")
        except ResourcesExistError:
            outcomes.append("refused")
        finally:
            client.close()

    threads = [threading.Thread(target=adder, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    winners = [o for o in outcomes if o != "refused"]
    assert len(outcomes) == 8 and len(winners) == 1
    stored = SnapshotRegistry(fake_redis, keys).get_resources_by_id("rs-race")
    assert stored.version == 1 and stored.resources == prompt(winners[0])
