"""How snapshot payloads are stored: plain or compressed, checksummed, size-limited; batched adds."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis
import zstandard

from lightning_queue import (
    LLM,
    InvalidResourcesError,
    LightningClient,
    PromptTemplate,
    ResourcesExistError,
    RolloutConfig,
    SnapshotCorruptedError,
)
from lightning_queue.core.errors import RolloutFailed, SnapshotTooLargeError
from lightning_queue.core.models import dump_resources
from lightning_queue.core.settings import Settings
from lightning_queue.storage import codec
from lightning_queue.storage.registry import SnapshotRegistry
from tests.unit.test_runner import FakeTask, recording_agent, run

NAMES = ["Ava", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal"]
ITEMS = ["apples", "marbles", "stamps", "books", "pencils", "seashells", "coins", "stickers"]


def few_shot_prompt(examples: int = 40) -> str:
    """A system prompt with worked few-shot examples, the kind of text prompt optimization stores."""
    shots = []
    for i in range(examples):
        name, other, item = NAMES[i % 10], NAMES[(i * 3 + 1) % 10], ITEMS[(i * 5) % 8]
        a, b, c = 7 + i * 3, 2 + (i * 7) % 11, 2 + i % 4
        shots.append(
            f"Question: {name} has {a} {item}. {other} gives {name} {b} more {item}, and then {name} shares them "
            f"equally among {c} friends, keeping none. How many {item} does each friend get, rounded down?\n"
            f"Let's think step by step. {name} starts with {a} {item}. After receiving {b} from {other}, {name} "
            f"has {a} + {b} = {a + b} {item}. Splitting {a + b} {item} among {c} friends gives {(a + b) // c} each.\n"
            f"Answer: {(a + b) // c}\n"
        )
    return (
        "You are a careful math tutor. Read the question, reason step by step, show each intermediate result, "
        "and finish with a line of the form 'Answer: <number>'. Never skip a step, never guess, and if the "
        "question is ambiguous say which reading you chose. Keep the explanation short and plain.\n\n"
        + "\n".join(shots)
        + "\nQuestion: {question}\nLet's think step by step."
    )


@pytest.fixture
def big(llm: LLM) -> dict[str, Any]:
    return {"main": llm, "system": PromptTemplate(template=few_shot_prompt()),
            "judge": PromptTemplate(template="Grade the answer to {question}: ✓ or ✗, then explain. " * 20)}


def stored_fields(registry: SnapshotRegistry, resources_id: str, version: int | None = None) -> dict[str, bytes]:
    key = registry.keys.snapshot(resources_id) if version is None else registry.keys.snapshot_version(resources_id, version)
    return {k.decode(): v for k, v in registry.redis.hgetall(key).items()}


def state(fake_redis: fakeredis.FakeRedis) -> dict[bytes, bytes]:
    return {key: fake_redis.dump(key) for key in fake_redis.keys("*")}


def registry_with(fake_redis: fakeredis.FakeRedis, prefix: str, **settings: Any) -> SnapshotRegistry:
    s = Settings(redis_url="redis://fakeredis.invalid:1/0", key_prefix=prefix, **settings)
    return SnapshotRegistry(fake_redis, s.keys, s)


# --------------------------------------------------------------------------- the codec


def zstd(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=codec.LEVEL).compress(raw)


def test_codec_round_trips_plain_and_compressed() -> None:
    small = b'{"resources": {}}'
    text = json.dumps({"t": few_shot_prompt()}).encode()

    plain = codec.encode(small, compress_threshold=1024, max_bytes=10**6)
    packed = codec.encode(text, compress_threshold=1024, max_bytes=10**6)

    assert (plain.encoding, plain.data, plain.size) == (codec.PLAIN, small, len(small))
    assert packed.encoding == codec.ZSTD and packed.size == len(text) and len(packed.data) * 3 <= len(text)
    for encoded, raw in [(plain, small), (packed, text)]:
        assert encoded.checksum == codec.checksum(raw)
        assert codec.decode(encoded.data, encoded.encoding, encoded.checksum, "rs-a") == raw


def test_codec_threshold_and_incompressible_payloads() -> None:
    raw = b"x" * 100
    assert codec.encode(raw, compress_threshold=100, max_bytes=10**6).encoding == codec.ZSTD  # at the threshold
    assert codec.encode(raw, compress_threshold=101, max_bytes=10**6).encoding == codec.PLAIN
    noise = os.urandom(4096)  # compression would only make it bigger: kept plain
    encoded = codec.encode(noise, compress_threshold=0, max_bytes=10**6)
    assert (encoded.encoding, encoded.data) == (codec.PLAIN, noise)


def test_codec_size_limit_is_on_the_uncompressed_payload() -> None:
    raw = b"a" * 1000  # compresses to almost nothing, still too big
    assert codec.encode(raw, compress_threshold=10, max_bytes=1000).size == 1000
    with pytest.raises(SnapshotTooLargeError) as info:
        codec.encode(raw, compress_threshold=10, max_bytes=999, resources_id="rs-big")
    assert (info.value.size, info.value.limit) == (1000, 999)


@pytest.mark.parametrize(
    "data, encoding, checksum, reason",
    [
        (b'{"resources": {"other": 1}}', codec.PLAIN, codec.checksum(b'{"resources": {}}'), "checksum mismatch"),
        (zstd(b'{"resources": 2}'), codec.ZSTD, codec.checksum(b'{"resources": 1}'), "checksum mismatch"),
        (b"not zstd at all", codec.ZSTD, None, "payload does not decompress"),
        (zstd(b'{"resources": {}}')[:-4], codec.ZSTD, None, "payload does not decompress"),
        (b'{"resources": {}}', "brotli", None, "unknown payload encoding 'brotli'"),
    ],
    ids=["plain-checksum", "zstd-checksum", "not-zstd", "truncated-zstd", "unknown-encoding"],
)
def test_codec_rejects_damaged_payloads(data: bytes, encoding: str, checksum: str | None, reason: str) -> None:
    with pytest.raises(SnapshotCorruptedError) as info:
        codec.decode(data, encoding, checksum, "rs-a")
    assert info.value.resources_id == "rs-a"
    assert reason in str(info.value) and "'rs-a'" in str(info.value)


# --------------------------------------------------------------------------- in the registry


def test_small_snapshots_are_stored_plain(registry: SnapshotRegistry, llm: LLM) -> None:
    registry.add_resources({"main": llm}, "rs-a")
    fields = stored_fields(registry, "rs-a")
    assert fields["encoding"] == codec.PLAIN.encode()
    assert json.loads(fields["resources"]) == json.loads(dump_resources({"main": llm}))  # readable in redis-cli
    assert int(fields["size"]) == len(fields["resources"])
    assert fields["checksum"].decode() == codec.checksum(fields["resources"])


def test_large_text_snapshots_are_compressed_at_least_3x(registry: SnapshotRegistry, big: dict[str, Any]) -> None:
    registry.add_resources(big, "rs-big")
    fields = stored_fields(registry, "rs-big")
    size, stored = int(fields["size"]), len(fields["resources"])

    assert fields["encoding"] == codec.ZSTD.encode()
    assert size == len(dump_resources(big).encode()) and size > 8192
    assert size / stored >= 3, f"{size} bytes stored as {stored}"
    assert registry.fetch("rs-big").size == size


def test_round_trip_is_exact(registry: SnapshotRegistry, big: dict[str, Any], llm: LLM) -> None:
    small = {"main": llm, "p": PromptTemplate(template="Ünïcödé {x} \n\t \"quoted\" 🙂")}
    registry.add_resources(small, "rs-a")
    registry.update_resources("rs-a", big)  # v1 plain, v2 compressed
    registry.update_resources("rs-a", small)  # v3 plain again

    assert registry.get_resources_by_id("rs-a", 1).resources == small
    assert registry.get_resources_by_id("rs-a", 2).resources == big
    assert registry.get_resources_by_id("rs-a").resources == small
    assert stored_fields(registry, "rs-a", 2)["encoding"] == codec.ZSTD.encode()  # kept as it was written
    secret = registry.get_resources_by_id("rs-a", 2).resources["main"].api_key  # type: ignore[attr-defined]
    assert secret.get_secret_value() == "sk-very-secret"
    assert dump_resources(registry.get_resources_by_id("rs-a", 2).resources) == dump_resources(big)


def corrupt(registry: SnapshotRegistry, resources_id: str, how: str) -> str:
    """Damage the stored payload of ``resources_id`` the way ``how`` says; return the reason expected."""
    key = registry.keys.snapshot(resources_id)
    fields = stored_fields(registry, resources_id)
    if how == "checksum":
        # A payload that still decodes and validates, but is not what was written.
        if fields["encoding"] == codec.ZSTD.encode():
            payload = json.loads(zstandard.ZstdDecompressor().decompress(fields["resources"]))
            payload["resources"]["judge"]["template"] = "tampered"
            registry.redis.hset(key, "resources", zstd(json.dumps(payload).encode()))
        else:
            payload = json.loads(fields["resources"])
            payload["resources"]["main"]["model"] = "tampered"
            registry.redis.hset(key, "resources", json.dumps(payload))
        return "checksum mismatch"
    if how == "zstd":
        registry.redis.hset(key, mapping={"encoding": codec.ZSTD, "resources": fields["resources"][:40]})
        return "payload does not decompress"
    registry.redis.hset(key, "encoding", "lz4")
    return "unknown payload encoding 'lz4'"


CORRUPTIONS = ["checksum", "zstd", "encoding"]


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("size", ["small", "big"])
def test_damaged_stored_payload_raises(registry: SnapshotRegistry, big: dict[str, Any], llm: LLM, how: str, size: str) -> None:
    registry.add_resources(big if size == "big" else {"main": llm}, "rs-a")
    reason = corrupt(registry, "rs-a", how)
    for read in (lambda: registry.get_resources_by_id("rs-a"), registry.get_latest_resources,
                 lambda: registry.resolve(None), registry.query_resources):
        with pytest.raises(SnapshotCorruptedError, match=reason) as info:
            read()
        assert info.value.resources_id == "rs-a"
        assert "store it again with update_resources()" in str(info.value)


def test_damaged_old_version_does_not_affect_the_current_one(registry: SnapshotRegistry, llm: LLM) -> None:
    registry.add_resources({"main": llm}, "rs-a")
    registry.update_resources("rs-a", {"main": llm.model_copy(update={"model": "v2"})})
    registry.redis.hset(registry.keys.snapshot_version("rs-a", 1), "checksum", "0" * 32)
    with pytest.raises(SnapshotCorruptedError, match="checksum mismatch"):
        registry.get_resources_by_id("rs-a", 1)
    assert registry.get_resources_by_id("rs-a").resources["main"].model == "v2"  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("resolve", ["pinned", "following"])
def test_a_damaged_payload_fails_the_rollout_cleanly(
    fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch, big: dict[str, Any], how: str, resolve: str
) -> None:
    monkeypatch.setattr(fake_client, "publish", lambda rollouts, registry_seq=0: None)
    fake_client.add_resources(big, "rs-a")
    queued = fake_client.enqueue_rollout("task", resources_id="rs-a", resolve=resolve,  # type: ignore[arg-type]
                                         config=RolloutConfig(max_attempts=3))
    reason = corrupt(fake_client.registry, "rs-a", how)
    agent, calls = recording_agent()
    task = FakeTask(fake_client, agent)

    with pytest.raises(RolloutFailed) as info:  # the only exception the runner lets out
        run(task, queued.rollout_id)

    assert info.value.error_type == "SnapshotCorruptedError"
    failed = fake_client.get_rollout(queued.rollout_id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.type == "SnapshotCorruptedError"
    assert "'rs-a'" in failed.error.message and reason in failed.error.message
    assert calls == [] and task.retries == []  # never ran the agent, never retried a permanent error
    attempt, = fake_client.get_attempts(queued.rollout_id)
    assert attempt.status == "failed"


# --------------------------------------------------------------------------- size limit


def test_too_large_snapshot_is_refused_with_a_clear_message(
    fake_redis: fakeredis.FakeRedis, prefix: str, big: dict[str, Any], llm: LLM
) -> None:
    registry = registry_with(fake_redis, prefix, max_snapshot_bytes=4096)
    registry.add_resources({"main": llm}, "rs-a")
    before = state(fake_redis)
    size = len(dump_resources(big).encode())

    for write in (lambda: registry.add_resources(big, "rs-big"), lambda: registry.update_resources("rs-a", big),
                  lambda: registry.add_resources_batch([("rs-ok", {"main": llm}), ("rs-big", big)])):
        with pytest.raises(SnapshotTooLargeError) as info:
            write()
        error = info.value
        assert (error.size, error.limit) == (size, 4096)
        message = str(error)
        assert f"{size} bytes" in message and "limit of 4096 bytes" in message
        assert "LQ_MAX_SNAPSHOT_BYTES" in message and "reference" in message  # what to do instead
    assert isinstance(error, InvalidResourcesError)
    assert state(fake_redis) == before  # nothing written, not even the batch's valid item


# --------------------------------------------------------------------------- batched adds


@pytest.fixture
def round_trips(fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> Callable[[], dict[str, Any]]:
    """Count what reaches the (fake) server: socket writes, and pipeline executions with their sizes."""
    sent: list[Any] = []
    pipelines: list[int] = []
    connection_class = type(fake_redis.connection_pool.get_connection())
    send = connection_class.send_packed_command
    execute = redis.client.Pipeline.execute

    def counting_send(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(command)
        send(self, command, check_health)

    def counting_execute(self: Any, raise_on_error: bool = True) -> list[Any]:
        pipelines.append(len(self.command_stack))
        return execute(self, raise_on_error)

    monkeypatch.setattr(connection_class, "send_packed_command", counting_send)
    monkeypatch.setattr(redis.client.Pipeline, "execute", counting_execute)

    def counts() -> dict[str, Any]:
        out = {"sends": len(sent), "pipelines": list(pipelines)}
        sent.clear()
        pipelines.clear()
        return out

    return counts


def test_batch_adds_many_in_one_round_trip(
    registry: SnapshotRegistry, round_trips: Callable[[], dict[str, Any]], llm: LLM
) -> None:
    registry.add_resources({"main": llm}, "rs-warm")  # connection handshake and script load out of the way
    round_trips()

    few = registry.add_resources_batch([{"p": PromptTemplate(template=f"few {i}")} for i in range(3)])
    few_counts = round_trips()
    items: list[Any] = [(f"rs-{i:02d}", {"p": PromptTemplate(template=f"prompt {i}")}) for i in range(40)]
    items.insert(7, {"p": PromptTemplate(template="no id given")})
    many = registry.add_resources_batch(items)
    many_counts = round_trips()

    assert few_counts["pipelines"] == [3] and many_counts["pipelines"] == [41]  # one pipeline of one script each
    # Round trips do not grow with the batch (redis-py checks the script is loaded first: one small extra trip).
    assert many_counts["sends"] == few_counts["sends"] <= 2
    assert [u.version for u in many] == [1] * 41 and len(few) == 3
    assert [u.resources_id for u in many][:7] == [f"rs-{i:02d}" for i in range(7)]
    assert many[7].resources_id.startswith("rs-") and many[7].resources["p"].template == "no id given"  # type: ignore[attr-defined]
    assert registry.get_latest_resources().resources_id == "rs-39"  # type: ignore[union-attr]
    assert registry.get_resources_by_id("rs-12").resources["p"].template == "prompt 12"  # type: ignore[attr-defined]
    assert registry.count() == 1 + 3 + 41
    assert registry.list_ids()[:3] == ["rs-39", "rs-38", "rs-37"]  # newest write first, in batch order
    assert len(registry.pointer_history("latest", limit=100)) == 1 + 3 + 41


def test_batch_with_taken_ids_adds_the_others(registry: SnapshotRegistry, llm: LLM) -> None:
    registry.add_resources({"main": llm}, "rs-a")
    registry.set_pointer("prod", "rs-a")
    items = [("rs-x", {"p": PromptTemplate(template="x first")}),
             ("rs-a", {"p": PromptTemplate(template="would overwrite rs-a")}),
             ("rs-y", {"p": PromptTemplate(template="y")}),
             ("rs-x", {"p": PromptTemplate(template="x again")}),
             ("prod", {"p": PromptTemplate(template="a pointer's name")}),
             ("rs-z", {"p": PromptTemplate(template="z")}),
             ("rs-y", {"p": PromptTemplate(template="y again")})]

    with pytest.raises(ResourcesExistError) as info:
        registry.add_resources_batch(items)

    assert info.value.resources_id == "rs-a"  # the first taken id
    assert sorted(registry.list_ids()) == ["rs-a", "rs-x", "rs-y", "rs-z"]
    assert registry.get_resources_by_id("rs-a").resources == {"main": llm}
    assert registry.get_resources_by_id("rs-x").resources["p"].template == "x first"  # type: ignore[attr-defined]
    assert registry.get_resources_by_id("rs-x").version == 1
    assert registry.get_pointer("prod") == "rs-a"
    assert registry.get_latest_resources().resources_id == "rs-z"  # the last one added  # type: ignore[union-attr]


def test_batch_with_an_invalid_item_writes_nothing(registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis, llm: LLM) -> None:
    with pytest.raises(InvalidResourcesError):
        registry.add_resources_batch([("rs-ok", {"main": llm}), ("rs-bad", {"main": {"resource_type": "llm"}})])
    assert fake_redis.keys("*") == []


def test_empty_batch(registry: SnapshotRegistry) -> None:
    assert registry.add_resources_batch([]) == []
    assert registry.count() == 0


def test_client_batch_delegates(fake_client: LightningClient, llm: LLM) -> None:
    added = fake_client.add_resources_batch([("rs-1", {"main": llm}), ("rs-2", {"main": llm})])
    assert [u.resources_id for u in added] == ["rs-1", "rs-2"]
    assert fake_client.get_latest_resources().resources_id == "rs-2"  # type: ignore[union-attr]


def test_frame_header_claiming_an_impossible_size_is_corruption() -> None:
    # A zstd frame header (magic, descriptor with an 8-byte content size) declaring 2**50 bytes.
    forged = b"\x28\xb5\x2f\xfd" + bytes([0xC0]) + (2**50).to_bytes(8, "little") + b"\x01\x00\x00"
    with pytest.raises(SnapshotCorruptedError, match="rs-x"):
        codec.decode(forged, codec.ZSTD, None, "rs-x")
