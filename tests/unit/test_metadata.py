"""Version metadata (message, author, tags, parent): written with the version, kept with it, validated."""

from __future__ import annotations

import json

import fakeredis
import pytest

from lightning_queue import (
    LLM,
    InvalidVersionMetadataError,
    LightningClient,
    PromptTemplate,
    ResourcesNotFoundError,
)
from lightning_queue.core.models import default_actor
from lightning_queue.storage.registry import SnapshotRegistry, parse_ref


def prompt(text: str) -> dict[str, PromptTemplate]:
    return {"prompt": PromptTemplate(template=text)}


def test_metadata_round_trips_through_every_read(registry: SnapshotRegistry) -> None:
    written = registry.add_resources(prompt("a {x}"), "rs-a", message="first try", author="alice",
                                     tags=["baseline", "exp:42"])
    assert (written.message, written.author, written.tags) == ("first try", "alice", ("baseline", "exp:42"))
    assert (written.parent_id, written.parent_version) == (None, None)  # a new snapshot derives from nothing

    for read in (registry.get_resources_by_id("rs-a"), registry.get_resources_by_id("latest"),
                 registry.query_resources()[0], registry.fetch("rs-a", 1).snapshot):
        assert read == written


def test_author_defaults_to_the_os_user_and_host(registry: SnapshotRegistry,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.add_resources(prompt("a"), "rs-a").author == default_actor()
    assert "@" in default_actor()
    monkeypatch.setenv("LQ_ACTOR", "ci-job-17")
    assert registry.add_resources(prompt("b"), "rs-b").author == "ci-job-17"
    assert registry.get_resources_by_id("rs-b").author == "ci-job-17"


def test_an_update_records_the_version_it_replaced_and_old_versions_keep_their_metadata(
    registry: SnapshotRegistry,
) -> None:
    registry.add_resources(prompt("v1"), "rs-a", message="one", tags=["t1"], author="alice")
    v2 = registry.update_resources("rs-a", prompt("v2"), message="two", author="bob")
    v3 = registry.update_resources("rs-a", prompt("v3"), message="three", author="carol")

    assert (v2.parent_id, v2.parent_version, v3.parent_id, v3.parent_version) == ("rs-a", 1, "rs-a", 2)
    v1_read, v2_read = registry.get_resources_by_id("rs-a", 1), registry.get_resources_by_id("rs-a", 2)
    assert (v1_read.message, v1_read.author, v1_read.tags, v1_read.parent_id) == ("one", "alice", ("t1",), None)
    assert (v2_read.message, v2_read.author, v2_read.parent_version) == ("two", "bob", 1)
    assert registry.get_resources_by_id("rs-a") == v3
    assert [(v.version, v.message) for v in registry.versions("rs-a")] == [(3, "three"), (2, "two"), (1, "one")]


def test_a_named_parent_may_be_another_snapshot_a_pointer_or_a_version(registry: SnapshotRegistry) -> None:
    registry.add_resources(prompt("a1"), "rs-a")
    registry.update_resources("rs-a", prompt("a2"))
    registry.set_pointer("prod", "rs-a")

    assert (lambda s: (s.parent_id, s.parent_version))(
        registry.add_resources(prompt("b"), "rs-b", parent="rs-a@1")) == ("rs-a", 1)
    assert (lambda s: (s.parent_id, s.parent_version))(
        registry.add_resources(prompt("c"), "rs-c", parent="prod")) == ("rs-a", 2)  # the pointer's target, now
    updated = registry.update_resources("rs-b", prompt("b2"), parent="rs-c")  # a merge-like derivation
    assert (updated.parent_id, updated.parent_version) == ("rs-c", 1)
    assert registry.get_resources_by_id("rs-b", 1).parent_id == "rs-a"  # the old version keeps its own


@pytest.mark.parametrize("parent", ["rs-nope", "rs-a@9"])
def test_a_parent_that_is_not_stored_writes_nothing(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, parent: str
) -> None:
    registry.add_resources(prompt("a"), "rs-a")
    before = {key: fake_redis.dump(key) for key in fake_redis.keys("*")}
    with pytest.raises(ResourcesNotFoundError, match="parent"):
        registry.add_resources(prompt("b"), "rs-b", parent=parent)
    with pytest.raises(ResourcesNotFoundError, match="parent"):
        registry.update_resources("rs-a", prompt("a2"), parent=parent)
    assert {key: fake_redis.dump(key) for key in fake_redis.keys("*")} == before


@pytest.mark.parametrize("fields, problem", [
    ({"message": "x" * 4001}, "message"),
    ({"author": "a" * 201}, "author"),
    ({"tags": ["has space"]}, "tags.0"),
    ({"tags": ["-leading"]}, "tags.0"),
    ({"tags": [f"t{i}" for i in range(33)]}, "tags"),
])
def test_bad_metadata_is_refused_before_anything_is_written(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, fields: dict, problem: str
) -> None:
    with pytest.raises(InvalidVersionMetadataError, match=problem):
        registry.add_resources(prompt("a"), "rs-a", **fields)
    assert fake_redis.keys("*") == []


def test_a_single_tag_string_is_one_tag_and_repeats_are_dropped(registry: SnapshotRegistry) -> None:
    assert registry.add_resources(prompt("a"), "rs-a", tags="prod-candidate").tags == ("prod-candidate",)  # type: ignore[arg-type]
    assert registry.add_resources(prompt("b"), "rs-b", tags=["x", "y", "x"]).tags == ("x", "y")


def test_batch_writes_the_metadata_on_each(fake_client: LightningClient) -> None:
    out = fake_client.add_resources_batch([("rs-a", prompt("a")), ("rs-b", prompt("b"))], message="sweep 3",
                                          tags=["sweep"])
    assert [(s.message, s.tags) for s in out] == [("sweep 3", ("sweep",))] * 2
    assert fake_client.get_resources_by_id("rs-b").message == "sweep 3"


def test_snapshots_written_before_metadata_existed_still_decode(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis
) -> None:
    """A hash as an earlier release wrote it (no meta, no parent): read, listed, updated."""
    registry.add_resources(prompt("old"), "rs-old")
    key = registry.keys.snapshot("rs-old")
    fake_redis.hdel(key, "meta", "parent_id", "parent_version")

    old = registry.get_resources_by_id("rs-old")
    assert (old.message, old.author, old.tags, old.parent_id) == ("", None, (), None)
    new = registry.update_resources("rs-old", prompt("new"), message="now with a message")
    assert (new.parent_id, new.parent_version) == ("rs-old", 1)
    kept = registry.get_resources_by_id("rs-old", 1)
    assert (kept.message, kept.author, kept.parent_id) == ("", None, None)
    assert not fake_redis.hexists(registry.keys.snapshot_version("rs-old", 1), "meta")


def test_metadata_is_one_json_field_in_the_snapshot_hash(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis
) -> None:
    registry.add_resources({"llm": LLM(endpoint="http://x/v1", model="m")}, "rs-a", message="m", author="a", tags=["t"])
    stored = json.loads(fake_redis.hget(registry.keys.snapshot("rs-a"), "meta"))  # type: ignore[arg-type]
    assert stored == {"message": "m", "author": "a", "tags": ["t"]}


def test_parse_ref() -> None:
    assert parse_ref("rs-a@3") == ("rs-a", 3) and parse_ref("prod") == ("prod", None)
    for bad in ("rs-a@0", "rs-a@x", "rs-a@", "a:b@1"):
        with pytest.raises(ResourcesNotFoundError):
            parse_ref(bad)
