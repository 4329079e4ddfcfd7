"""Named pointers: set, follow, compare-and-set, bounded history and rollback."""

from __future__ import annotations

import json
from collections.abc import Sequence

import fakeredis
import pytest

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    ResourcesExistError,
    ResourcesNotFoundError,
    Rollout,
    Settings,
)
from lightning_queue.core.errors import PointerError
from lightning_queue.core.models import default_actor
from lightning_queue.storage.registry import PointerMove, SnapshotRegistry


def add(registry: SnapshotRegistry, resources_id: str, text: str | None = None) -> None:
    registry.add_resources({"prompt": PromptTemplate(template=text or f"prompt of {resources_id}")}, resources_id)


def template(registry: SnapshotRegistry, ref: str) -> str:
    return registry.get_resources_by_id(ref).resources["prompt"].template  # type: ignore[attr-defined]


def state(fake_redis: fakeredis.FakeRedis) -> dict[bytes, bytes]:
    """Every key and its value: to check that a refused operation wrote nothing."""
    return {key: fake_redis.dump(key) for key in fake_redis.keys("*")}


def moves(registry: SnapshotRegistry, name: str) -> list[tuple[str | None, str | None, str]]:
    """Each move's from, to and operation."""
    return [(m.from_id, m.to_id, m.op) for m in registry.pointer_history(name)]


@pytest.fixture
def two(registry: SnapshotRegistry) -> SnapshotRegistry:
    """A registry holding rs-a and rs-b (latest), no named pointer yet."""
    add(registry, "rs-a")
    add(registry, "rs-b")
    return registry


# --------------------------------------------------------------------------- set, get, list


def test_set_get_and_list_pointers(two: SnapshotRegistry) -> None:
    assert two.pointers() == {"latest": "rs-b"}
    assert two.get_pointer("prod") is None

    assert two.set_pointer("prod", "rs-a") == "rs-a"
    assert two.set_pointer("canary", "rs-b") == "rs-b"

    assert two.get_pointer("prod") == "rs-a"
    assert two.pointers() == {"latest": "rs-b", "prod": "rs-a", "canary": "rs-b"}
    # Adding a snapshot moves latest only.
    add(two, "rs-c")
    assert two.pointers() == {"latest": "rs-c", "prod": "rs-a", "canary": "rs-b"}


def test_set_pointer_to_another_pointer_copies_its_current_target(two: SnapshotRegistry) -> None:
    two.set_pointer("prod", "rs-a")
    assert two.set_pointer("canary", "prod") == "rs-a"
    two.set_pointer("prod", "rs-b")
    assert two.get_pointer("canary") == "rs-a"  # a copy of the target, not an alias


def test_pointer_name_is_accepted_wherever_an_id_is(two: SnapshotRegistry) -> None:
    two.set_pointer("prod", "rs-a")

    assert two.get_resources_by_id("prod") == two.get_resources_by_id("rs-a")
    assert two.get_resources_by_id("prod").resources_id == "rs-a"
    assert two.resolve("prod").resources_id == "rs-a"
    assert two.resolve("latest").resources_id == "rs-b"
    assert two.fetch("prod").pointer == "prod" and two.fetch("rs-a").pointer is None
    assert two.current_versions(["prod", "latest", "rs-a", "nope"]) == {
        "prod": ("rs-a", 1), "latest": ("rs-b", 1), "rs-a": ("rs-a", 1), "nope": None
    }
    assert two.current_versions(["prod", "rs-b", "nope"]) == {"prod": ("rs-a", 1), "rs-b": ("rs-b", 1), "nope": None}

    two.set_pointer("prod", "rs-b")
    assert two.get_resources_by_id("prod").resources_id == "rs-b"


def test_enqueue_accepts_a_pointer_name(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_client, "publish", lambda rollouts, registry_seq=0: None)
    add(fake_client.registry, "rs-a")
    add(fake_client.registry, "rs-b")
    fake_client.set_pointer("prod", "rs-a")

    pinned = fake_client.enqueue_rollout("task", resources_id="prod")
    following = fake_client.enqueue_rollout("task", resources_id="prod", resolve="following")

    assert (pinned.resolve, pinned.resources_id, pinned.resources_version) == ("pinned", "rs-a", 1)
    assert (following.resolve, following.resources_id, following.resources_version) == ("following", "prod", None)
    stored: Sequence[Rollout] = fake_client.get_rollouts([pinned.rollout_id, following.rollout_id])
    assert [(r.resources_id, r.resources_version) for r in stored] == [("rs-a", 1), ("prod", None)]

    with pytest.raises(ResourcesNotFoundError, match="staging"):
        fake_client.enqueue_rollout("task", resources_id="staging")


# --------------------------------------------------------------------------- names never collide


def test_add_resources_with_a_pointer_name_is_refused(two: SnapshotRegistry, fake_redis: fakeredis.FakeRedis) -> None:
    two.set_pointer("prod", "rs-a")
    before = state(fake_redis)

    for name in ("prod", "latest"):
        with pytest.raises(ResourcesExistError, match=name):
            add(two, name)
        with pytest.raises(ResourcesExistError, match=name):
            two.add_resources_batch([(name, {"prompt": PromptTemplate(template="x")})])

    assert state(fake_redis) == before
    assert template(two, "prod") == "prompt of rs-a"


def test_latest_is_never_a_snapshot_id_even_before_latest_exists(registry: SnapshotRegistry,
                                                                  fake_redis: fakeredis.FakeRedis) -> None:
    with pytest.raises(ResourcesExistError, match="latest"):
        add(registry, "latest")
    with pytest.raises(ResourcesExistError, match="latest"):
        registry.add_resources_batch([("latest", {"prompt": PromptTemplate(template="x")})])
    assert fake_redis.keys("*") == []


def test_set_pointer_with_a_snapshot_id_as_name_is_refused(two: SnapshotRegistry, fake_redis: fakeredis.FakeRedis) -> None:
    before = state(fake_redis)
    with pytest.raises(PointerError, match="'rs-a' is the id of a snapshot"):
        two.set_pointer("rs-a", "rs-b")
    assert state(fake_redis) == before
    assert two.get_resources_by_id("rs-a").resources_id == "rs-a"


INVALID_NAMES = ["has:colon", "-leading-dash", "white space", "x" * 129, "näme", "a/b", "*"]


@pytest.mark.parametrize("name", ["", *INVALID_NAMES])
def test_invalid_pointer_names_are_refused(two: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, name: str) -> None:
    before = state(fake_redis)
    with pytest.raises(PointerError, match="invalid pointer name") as info:
        two.set_pointer(name, "rs-a")
    assert "letters, digits" in str(info.value)  # says what a valid name looks like
    assert state(fake_redis) == before


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_ids_are_refused(two: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, name: str) -> None:
    before = state(fake_redis)
    with pytest.raises(PointerError, match="invalid resources_id"):
        add(two, name)
    with pytest.raises(PointerError, match="invalid resources_id"):
        two.add_resources_batch([(name, {"prompt": PromptTemplate(template="x")})])
    assert state(fake_redis) == before


def test_longest_valid_name_is_accepted(two: SnapshotRegistry) -> None:
    name = "p" + "x" * 127
    assert two.set_pointer(name, "rs-a") == "rs-a"
    assert two.get_resources_by_id(name).resources_id == "rs-a"


# --------------------------------------------------------------------------- refused moves


def test_set_pointer_to_a_missing_id_is_refused_and_changes_nothing(
    two: SnapshotRegistry, fake_redis: fakeredis.FakeRedis
) -> None:
    two.set_pointer("prod", "rs-a")
    before = state(fake_redis)

    with pytest.raises(ResourcesNotFoundError, match="rs-nope") as info:
        two.set_pointer("prod", "rs-nope")
    assert "'prod' was not moved" in str(info.value)
    with pytest.raises(ResourcesNotFoundError, match="rs-nope"):
        two.set_pointer("fresh", "rs-nope")

    assert state(fake_redis) == before
    assert two.get_pointer("prod") == "rs-a" and two.get_pointer("fresh") is None


def test_compare_and_set_moves_only_from_the_expected_target(
    two: SnapshotRegistry, fake_redis: fakeredis.FakeRedis
) -> None:
    two.set_pointer("prod", "rs-a")
    before = state(fake_redis)

    with pytest.raises(PointerError, match="names 'rs-a', not the expected 'rs-b'") as info:
        two.set_pointer("prod", "rs-b", expected="rs-b")
    assert "not moved" in str(info.value)
    with pytest.raises(PointerError, match="names None"):
        two.set_pointer("unset", "rs-b", expected="rs-a")
    assert state(fake_redis) == before

    assert two.set_pointer("prod", "rs-b", expected="rs-a") == "rs-b"
    assert two.get_pointer("prod") == "rs-b"
    # The loser of a race sees the winner's target in the error.
    with pytest.raises(PointerError, match="names 'rs-b'"):
        two.set_pointer("prod", "rs-a", expected="rs-a")
    assert two.get_pointer("prod") == "rs-b"


# --------------------------------------------------------------------------- history


def test_history_records_from_to_time_and_by_newest_first(two: SnapshotRegistry) -> None:
    two.set_pointer("prod", "rs-a", by="alice")
    two.set_pointer("prod", "rs-b", by="bob")
    two.set_pointer("prod", "rs-b")  # a no-op move is still a recorded decision

    history = two.pointer_history("prod")
    # "by" is the actor (default: this process's user@host), "op" the operation
    assert [(m.pointer, m.from_id, m.to_id, m.by, m.op) for m in history] == [
        ("prod", "rs-b", "rs-b", default_actor(), "set_pointer"),
        ("prod", "rs-a", "rs-b", "bob", "set_pointer"),
        ("prod", None, "rs-a", "alice", "set_pointer"),
    ]
    times = [m.time for m in history]
    assert times == sorted(times, reverse=True) and all(t > 1e9 for t in times)
    assert [(m.to_id, m.by, m.op) for m in two.pointer_history("latest")] == [
        ("rs-b", default_actor(), "add_resources"), ("rs-a", default_actor(), "add_resources")]
    assert len(two.pointer_history("prod", limit=2)) == 2
    assert two.pointer_history("never-set") == []


def test_history_is_bounded_by_settings(fake_redis: fakeredis.FakeRedis, prefix: str) -> None:
    settings = Settings(redis_url="redis://fakeredis.invalid:1/0", key_prefix=prefix, pointer_history_length=3)
    registry = SnapshotRegistry(fake_redis, settings.keys, settings)
    for i in range(6):
        add(registry, f"rs-{i}")
        registry.set_pointer("prod", f"rs-{i}")

    assert [(m.from_id, m.to_id) for m in registry.pointer_history("prod", limit=100)] == [
        ("rs-4", "rs-5"), ("rs-3", "rs-4"), ("rs-2", "rs-3")
    ]
    assert fake_redis.llen(settings.keys.pointer_history("prod")) == 3
    assert fake_redis.llen(settings.keys.pointer_history("latest")) == 3
    registry.rollback("prod")
    assert fake_redis.llen(settings.keys.pointer_history("prod")) == 3


# --------------------------------------------------------------------------- rollback


def test_rollback_moves_to_the_previous_target_and_records_it(two: SnapshotRegistry) -> None:
    add(two, "rs-c")
    two.set_pointer("prod", "rs-a")
    two.set_pointer("prod", "rs-c")

    move = two.rollback("prod", by="oncall")

    assert isinstance(move, PointerMove)
    assert (move.pointer, move.from_id, move.to_id, move.by) == ("prod", "rs-c", "rs-a", "oncall")
    assert two.get_pointer("prod") == "rs-a"
    assert template(two, "prod") == "prompt of rs-a"
    assert moves(two, "prod")[0] == ("rs-c", "rs-a", "rollback")
    assert two.pointer_history("prod")[0].by == "oncall"
    assert two.pointer_history("prod")[0].time == pytest.approx(move.time)


def test_second_rollback_toggles_back(two: SnapshotRegistry) -> None:
    add(two, "rs-c")
    for target in ("rs-a", "rs-b", "rs-c"):
        two.set_pointer("prod", target)

    assert two.rollback("prod").to_id == "rs-b"
    assert two.rollback("prod").to_id == "rs-c"
    assert two.rollback("prod").to_id == "rs-b"
    assert moves(two, "prod")[:3] == [("rs-c", "rs-b", "rollback"), ("rs-b", "rs-c", "rollback"),
                                      ("rs-c", "rs-b", "rollback")]


def test_rollback_of_latest_undoes_the_last_add(two: SnapshotRegistry) -> None:
    assert two.rollback().to_id == "rs-a"
    assert two.get_latest_resources().resources_id == "rs-a"  # type: ignore[union-attr]
    assert two.rollback("latest").to_id == "rs-b"


@pytest.mark.parametrize("setup", ["never-set", "set-once"])
def test_nothing_to_roll_back(two: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, setup: str) -> None:
    if setup == "set-once":
        two.set_pointer("prod", "rs-a")
    before = state(fake_redis)
    with pytest.raises(PointerError, match="'prod' has no earlier target to roll back to"):
        two.rollback("prod")
    assert state(fake_redis) == before


def test_rollback_to_a_deleted_target_is_refused(two: SnapshotRegistry, fake_redis: fakeredis.FakeRedis) -> None:
    two.set_pointer("prod", "rs-a")
    two.set_pointer("prod", "rs-b")
    two.delete_resources("rs-a")  # nothing names rs-a any more
    before = state(fake_redis)

    with pytest.raises(PointerError) as info:
        two.rollback("prod")

    message = str(info.value)
    assert "'rs-a'" in message and "deleted" in message and "'prod'" in message
    assert "set" in message  # what to do next: pick a target and set it
    assert state(fake_redis) == before
    assert two.get_pointer("prod") == "rs-b"


def test_pointer_moves_are_announced_with_a_sequence_number(two: SnapshotRegistry, fake_redis: fakeredis.FakeRedis) -> None:
    pubsub = fake_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(two.keys.snapshot_events)
    seq_before = int(fake_redis.get(two.keys.seq))

    two.set_pointer("prod", "rs-a")
    two.set_pointer("prod", "rs-b")
    two.rollback("prod")

    events: list[dict] = []
    for _ in range(6):  # None also stands for the (ignored) subscribe confirmation
        message = pubsub.get_message(timeout=0.02)
        if message is not None:
            events.append(json.loads(message["data"]))
    pubsub.close()
    assert [(e["op"], e["pointers"]) for e in events] == [
        ("pointer", {"prod": "rs-a"}), ("pointer", {"prod": "rs-b"}), ("pointer", {"prod": "rs-a"})
    ]
    assert [e["seq"] for e in events] == [seq_before + 1, seq_before + 2, seq_before + 3]
