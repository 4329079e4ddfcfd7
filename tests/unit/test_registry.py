"""The snapshot registry: versioned, immutable snapshots and the ``latest`` pointer."""

from __future__ import annotations

import json

import fakeredis
import pytest

from lightning_queue import (
    LLM,
    InvalidResourcesError,
    NoLatestResourcesError,
    PromptTemplate,
    ResourcesExistError,
    ResourcesNotFoundError,
    SnapshotCorruptedError,
)
from lightning_queue.storage.registry import SnapshotRegistry


def latest_id(registry: SnapshotRegistry) -> str | None:
    latest = registry.get_latest_resources()
    return latest.resources_id if latest else None


def test_add_resources_returns_version_1_and_becomes_latest(registry: SnapshotRegistry, llm: LLM) -> None:
    added = registry.add_resources({"main": llm}, "rs-a")
    assert (added.resources_id, added.version) == ("rs-a", 1)
    assert added.create_time == added.update_time

    latest = registry.get_latest_resources()
    assert latest == registry.get_resources_by_id("rs-a")
    assert latest is not None and latest.version == 1
    assert latest.resources == {"main": llm}
    assert latest.resources["main"].api_key.get_secret_value() == "sk-very-secret"  # type: ignore[attr-defined]

    second = registry.add_resources({"p": PromptTemplate(template="{x}")}, "rs-b")
    assert second.version == 1
    assert latest_id(registry) == "rs-b"
    assert registry.count() == 2


def test_add_resources_can_leave_latest_where_it_is(registry: SnapshotRegistry, llm: LLM) -> None:
    """An optimizer writes candidates that unpinned rollouts must not follow until one is promoted."""
    registry.add_resources({"main": llm}, "rs-prod")
    seq = int(registry.redis.get(registry.keys.seq))
    events = registry.redis.pubsub()
    events.subscribe(registry.keys.snapshot_events)
    events.get_message(timeout=1)  # the subscription's confirmation

    candidate = registry.add_resources({"p": PromptTemplate(template="{x}")}, "rs-candidate", make_latest=False)
    batch = registry.add_resources_batch([("rs-c2", {"p": PromptTemplate(template="a {x}")})], make_latest=False)

    assert (candidate.version, [s.resources_id for s in batch]) == (1, ["rs-c2"])
    assert latest_id(registry) == "rs-prod"
    assert [m.to_id for m in registry.pointer_history("latest")] == ["rs-prod"]
    assert registry.get_resources_by_id("rs-candidate").resources == candidate.resources
    assert [s.resources_id for s in registry.query_resources()] == ["rs-c2", "rs-candidate", "rs-prod"]
    announced = json.loads(events.get_message(timeout=1)["data"])
    assert announced["seq"] == seq + 1 and announced["id"] == "rs-candidate" and not announced["pointers"]
    events.close()


def test_add_resources_generates_an_id(registry: SnapshotRegistry, llm: LLM) -> None:
    added = registry.add_resources({"main": llm})
    assert added.resources_id.startswith("rs-")
    assert registry.get_resources_by_id(added.resources_id).resources == {"main": llm}


def test_add_resources_accepts_plain_mappings(registry: SnapshotRegistry) -> None:
    added = registry.add_resources({"main": {"resource_type": "llm", "endpoint": "http://e", "model": "m"}}, "rs-a")
    assert isinstance(registry.get_resources_by_id("rs-a").resources["main"], LLM)
    assert added.resources["main"] == LLM(endpoint="http://e", model="m")


def test_add_duplicate_id_raises_and_changes_nothing(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, llm: LLM
) -> None:
    registry.add_resources({"main": llm}, "rs-a")
    registry.add_resources({"main": llm}, "rs-b")
    before = {key: fake_redis.dump(key) for key in fake_redis.keys("*")}

    with pytest.raises(ResourcesExistError, match="rs-a") as info:
        registry.add_resources({"other": PromptTemplate(template="t")}, "rs-a")
    assert info.value.resources_id == "rs-a"
    assert "update_resources" in str(info.value)

    assert {key: fake_redis.dump(key) for key in fake_redis.keys("*")} == before
    assert latest_id(registry) == "rs-b"
    assert registry.get_resources_by_id("rs-a").resources == {"main": llm}


def test_invalid_resources_write_nothing(registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(InvalidResourcesError):
        registry.add_resources({"main": {"resource_type": "llm"}}, "rs-a")
    assert fake_redis.keys("*") == []


def test_update_resources_bumps_version_and_moves_latest(registry: SnapshotRegistry, llm: LLM) -> None:
    first = registry.add_resources({"main": llm}, "rs-a")
    registry.add_resources({"main": llm}, "rs-b")
    assert latest_id(registry) == "rs-b"

    new_prompt = {"p": PromptTemplate(template="v2 {x}")}
    updated = registry.update_resources("rs-a", new_prompt)
    assert (updated.resources_id, updated.version) == ("rs-a", 2)
    assert updated.create_time == pytest.approx(first.create_time)
    assert updated.update_time >= first.update_time
    assert latest_id(registry) == "rs-a"

    stored = registry.get_resources_by_id("rs-a")
    assert stored.version == 2 and stored.resources == new_prompt
    assert stored.create_time == pytest.approx(first.create_time)

    assert registry.update_resources("rs-a", {"main": llm}).version == 3
    assert registry.count() == 2


def test_update_unknown_id_raises_and_writes_nothing(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, llm: LLM
) -> None:
    registry.add_resources({"main": llm}, "rs-a")
    before = {key: fake_redis.dump(key) for key in fake_redis.keys("*")}
    with pytest.raises(ResourcesNotFoundError, match="rs-nope") as info:
        registry.update_resources("rs-nope", {"main": llm})
    assert info.value.resources_id == "rs-nope"
    assert "add_resources" in str(info.value)
    assert {key: fake_redis.dump(key) for key in fake_redis.keys("*")} == before


def test_get_resources_by_id_unknown_names_the_id(registry: SnapshotRegistry) -> None:
    with pytest.raises(ResourcesNotFoundError, match="rs-missing") as info:
        registry.get_resources_by_id("rs-missing")
    assert info.value.resources_id == "rs-missing"


def test_get_latest_resources_none_when_empty(registry: SnapshotRegistry) -> None:
    assert registry.get_latest_resources() is None


def test_resolve(registry: SnapshotRegistry, llm: LLM) -> None:
    with pytest.raises(NoLatestResourcesError, match="add_resources"):
        registry.resolve(None)
    registry.add_resources({"main": llm}, "rs-a")
    registry.add_resources({"main": llm}, "rs-b")
    assert registry.resolve(None).resources_id == "rs-b"
    assert registry.resolve("rs-a").resources_id == "rs-a"
    with pytest.raises(ResourcesNotFoundError, match="rs-c"):
        registry.resolve("rs-c")


def test_no_latest_is_a_resources_not_found_error() -> None:
    assert issubclass(NoLatestResourcesError, ResourcesNotFoundError)


def test_current_versions_tells_what_exists(registry: SnapshotRegistry, llm: LLM) -> None:
    registry.add_resources({"main": llm}, "rs-a")
    assert registry.current_versions(["rs-a", "rs-b"]) == {"rs-a": ("rs-a", 1), "rs-b": None}
    assert registry.current_versions([]) == {}


def test_query_resources_newest_write_first_with_pagination(registry: SnapshotRegistry, llm: LLM) -> None:
    for name in ["rs-1", "rs-2", "rs-3", "rs-4"]:
        registry.add_resources({"main": llm}, name)
    registry.update_resources("rs-2", {"main": llm})  # the newest write now

    assert [u.resources_id for u in registry.query_resources()] == ["rs-2", "rs-4", "rs-3", "rs-1"]
    assert [u.version for u in registry.query_resources()] == [2, 1, 1, 1]
    assert [u.resources_id for u in registry.query_resources(offset=1, limit=2)] == ["rs-4", "rs-3"]
    assert [u.resources_id for u in registry.query_resources(offset=3, limit=10)] == ["rs-1"]
    assert registry.query_resources(offset=4) == []


@pytest.mark.parametrize("offset, limit", [(-1, 10), (0, 0)])
def test_query_resources_rejects_bad_pagination(registry: SnapshotRegistry, offset: int, limit: int) -> None:
    with pytest.raises(ValueError):
        registry.query_resources(offset=offset, limit=limit)


@pytest.mark.parametrize(
    "field, garbage",
    [
        ("resources", "{not json"),
        ("resources", json.dumps({"resources": {"main": {"resource_type": "llm"}}})),
        ("resources", json.dumps({"resources": {"main": {"resource_type": "vanished_type"}}})),
        ("resources", json.dumps({"something": "else"})),
        ("version", "two"),
    ],
    ids=["bad-json", "invalid-resource", "unknown-type", "no-resources-key", "bad-version"],
)
def test_corrupted_snapshot_raises(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, llm: LLM, field: str, garbage: str
) -> None:
    registry.add_resources({"main": llm}, "rs-a")
    fake_redis.hset(registry.keys.snapshot("rs-a"), field, garbage)

    for read in (lambda: registry.get_resources_by_id("rs-a"), registry.get_latest_resources,
                 registry.query_resources, lambda: registry.resolve(None)):
        with pytest.raises(SnapshotCorruptedError, match="rs-a") as info:
            read()
        assert info.value.resources_id == "rs-a"


def test_latest_pointing_at_missing_snapshot_is_corruption(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, llm: LLM
) -> None:
    registry.add_resources({"main": llm}, "rs-a")
    fake_redis.delete(registry.keys.snapshot("rs-a"))
    with pytest.raises(SnapshotCorruptedError, match="rs-a"):
        registry.get_latest_resources()


def test_every_key_is_under_the_prefix(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, prefix: str, llm: LLM
) -> None:
    registry.add_resources({"main": llm}, "rs-a")
    registry.update_resources("rs-a", {"main": llm})
    registry.add_resources({"main": llm})
    keys = [k.decode() for k in fake_redis.keys("*")]
    assert keys
    assert all(k.startswith(f"{prefix}:") for k in keys), keys


def test_two_prefixes_do_not_see_each_other(fake_redis: fakeredis.FakeRedis, llm: LLM) -> None:
    from lightning_queue.core.keys import Keys

    one, two = SnapshotRegistry(fake_redis, Keys("one")), SnapshotRegistry(fake_redis, Keys("two"))
    one.add_resources({"main": llm}, "rs-a")
    assert two.get_latest_resources() is None
    two.add_resources({"main": llm}, "rs-a")  # the same id is free under another prefix
    assert one.count() == two.count() == 1
