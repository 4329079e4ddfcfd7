"""The algorithm-side client on fakeredis; publishing to Celery is replaced by a stub."""

from __future__ import annotations

import base64
import inspect
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

from lightning_queue import (
    LLM,
    AsyncLightningClient,
    EnqueueError,
    LightningClient,
    ResourcesNotFoundError,
    Rollout,
    RolloutConfig,
    RolloutRequest,
    RolloutResult,
)
from lightning_queue.broker.app import make_celery
from lightning_queue.broker.publisher import Publisher
from lightning_queue.core.errors import InvalidQueueNameError
from lightning_queue.core.keys import ROLLOUT_TASK as TASK_NAME
from lightning_queue.core.settings import Settings
from lightning_queue.storage.store import RolloutStore


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The rollout ids of each ``publish`` call, instead of sending them to the broker."""
    batches: list[list[str]] = []

    def publish(self: LightningClient, rollouts: Sequence[Rollout], registry_seq: int = 0) -> None:
        batches.append([r.rollout_id for r in rollouts])

    monkeypatch.setattr(LightningClient, "publish", publish)
    return batches


def test_enqueue_rollout_writes_record_and_publishes(
    fake_client: LightningClient, published: list[list[str]], llm: LLM
) -> None:
    snapshot = fake_client.add_resources({"main": llm})
    rollout = fake_client.enqueue_rollout(
        {"q": "2+2"}, resources_id=snapshot.resources_id, mode="val",
        config=RolloutConfig(max_attempts=3), metadata={"exp": "a"},
    )
    assert published == [[rollout.rollout_id]]
    stored = fake_client.get_rollout(rollout.rollout_id)
    assert stored == rollout
    assert (stored.status, stored.mode, stored.resources_id) == ("queuing", "val", snapshot.resources_id)
    assert stored.config.max_attempts == 3 and stored.metadata == {"exp": "a"}
    assert stored.queue == fake_client.settings.queue


def test_enqueue_rollouts_batch_with_defaults_and_requests(
    fake_client: LightningClient, published: list[list[str]], llm: LLM
) -> None:
    a = fake_client.add_resources({"main": llm}, "rs-a")
    b = fake_client.add_resources({"main": llm}, "rs-b")
    rollouts = fake_client.enqueue_rollouts(
        [1, RolloutRequest(input=2, resources_id=b.resources_id, mode="test", config=RolloutConfig(max_attempts=2),
                           metadata={"arm": "b"}), 3],
        resources_id=a.resources_id, mode="val", metadata={"arm": "a"}, queue="fast",
    )
    assert len(published) == 1 and published[0] == [r.rollout_id for r in rollouts]  # one batch
    assert [r.input for r in rollouts] == [1, 2, 3]
    assert [r.resources_id for r in rollouts] == ["rs-a", "rs-b", "rs-a"]
    assert [r.mode for r in rollouts] == ["val", "test", "val"]
    assert [r.metadata for r in rollouts] == [{"arm": "a"}, {"arm": "b"}, {"arm": "a"}]
    assert [r.config.max_attempts for r in rollouts] == [1, 2, 1]
    assert {r.queue for r in rollouts} == {"fast"}
    assert fake_client.get_rollouts([r.rollout_id for r in rollouts]) == rollouts
    assert len({r.rollout_id for r in rollouts}) == 3


def test_enqueue_unpinned_needs_no_snapshot(fake_client: LightningClient, published: list[list[str]]) -> None:
    rollout = fake_client.enqueue_rollout("x")
    assert rollout.resources_id is None
    assert fake_client.get_rollout(rollout.rollout_id).status == "queuing"


def test_enqueue_nothing(fake_client: LightningClient, published: list[list[str]]) -> None:
    assert fake_client.enqueue_rollouts([]) == []
    assert published == []


def test_enqueue_unknown_snapshot_writes_nothing(
    fake_client: LightningClient, published: list[list[str]], fake_redis: fakeredis.FakeRedis, llm: LLM
) -> None:
    fake_client.add_resources({"main": llm}, "rs-a")
    before = sorted(fake_redis.keys("*"))
    with pytest.raises(ResourcesNotFoundError, match="rs-nope") as info:
        fake_client.enqueue_rollouts([1, RolloutRequest(input=2, resources_id="rs-nope")], resources_id="rs-a")
    assert "nothing was enqueued" in str(info.value)
    assert sorted(fake_redis.keys("*")) == before
    assert published == []


def test_enqueue_to_a_queue_name_the_broker_uses_writes_nothing(
    fake_client: LightningClient, published: list[list[str]]
) -> None:
    for queue in ("unacked", "x.reply.celery.pidbox", "bad name"):
        with pytest.raises(InvalidQueueNameError, match=f"queue name {queue!r} cannot be used"):
            fake_client.enqueue_rollouts([1, 2], queue=queue)
    assert fake_client.query_rollouts() == [] and published == []


def test_enqueue_unknown_snapshot_unchecked(fake_client: LightningClient, published: list[list[str]]) -> None:
    rollout = fake_client.enqueue_rollout(1, resources_id="rs-later", check_resources=False)
    assert published == [[rollout.rollout_id]]


class FakeApp:
    """What ``publish`` uses of the Celery app; ``fail`` makes the broker unreachable."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.real = make_celery(Settings())  # routing and message building need no broker

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @contextmanager
    def producer_or_acquire(self) -> Iterator[object]:
        if self.fail is not None:
            raise self.fail
        yield SimpleNamespace(channel=SimpleNamespace(client=None))  # a kombu Redis producer, as far as it matters


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], list[tuple[Any, Any]], int]]:
    """What ``publish`` hands the message builder: (rollout ids, (hard, soft) limits, registry seq)."""
    calls: list[tuple[list[str], list[tuple[Any, Any]], int]] = []

    def build(self: Publisher, rollouts: Sequence[Rollout], limits: Any, registry_seq: int = 0,
              countdown: float | None = None, registry_epoch: str = "") -> None:
        calls.append(([r.rollout_id for r in rollouts], list(limits), registry_seq))

    monkeypatch.setattr(Publisher, "build", build)
    monkeypatch.setattr(Publisher, "_send", lambda self, producer, batch: None)
    return calls


def test_publish_sends_one_message_per_rollout(
    fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch, sent: list[Any]
) -> None:
    monkeypatch.setattr(fake_client, "_celery", FakeApp())
    monkeypatch.setattr(fake_client.settings, "default_timeout_seconds", 30.0)
    plain, limited = fake_client.enqueue_rollouts(
        [1, RolloutRequest(input=2, resources_id="rs-x", config=RolloutConfig(timeout_seconds=5))],
        check_resources=False,
    )
    grace = fake_client.settings.hard_timeout_grace_seconds
    [(ids, limits, seq)] = sent  # one batch
    assert ids == [plain.rollout_id, limited.rollout_id] and seq == 0
    assert limits == [(30.0 + grace, 30.0), (5 + grace, 5)]  # the default limit, the rollout's own


def test_a_countdown_becomes_the_eta_of_every_message_in_the_batch(fake_client: LightningClient) -> None:
    from datetime import datetime, timedelta

    publisher = fake_client.publisher
    now = datetime.now(UTC)
    batch = publisher.build([Rollout(input=1, queue="q"), Rollout(input=2, queue="q")], [(None, None)] * 2,
                            countdown=30)
    etas = {json.loads(m)["headers"]["eta"] for m in batch.by_queue["q"]}
    [eta] = etas
    assert timedelta(seconds=29) < datetime.fromisoformat(eta) - now < timedelta(seconds=40)
    assert "eta" not in json.loads(publisher.build([Rollout(input=1, queue="q")], [(None, None)]).by_queue["q"][0])[
        "headers"]  # no countdown: no eta header (the worker reads its absence as None)


def test_built_messages_are_celery_task_messages(fake_client: LightningClient) -> None:
    plain = Rollout(input=1, queue="q1")
    pinned = Rollout(input=2, queue="q2", resources_id="rs-x", resources_version=3)
    batch = fake_client.publisher.build([plain, pinned], [(None, None), (15.0, 5.0)], registry_seq=7)  # no broker needed
    assert list(batch.by_queue) == ["q1", "q2"]
    first, second = (json.loads(batch.by_queue[q][0]) for q in ("q1", "q2"))
    assert first["headers"]["task"] == TASK_NAME and first["headers"]["id"] == plain.rollout_id
    assert second["headers"]["timelimit"] == [15.0, 5.0] and "timelimit" not in first["headers"]
    assert "'resources_id': 'rs-x'" in second["headers"]["kwargsrepr"]  # what Flower shows
    assert second["properties"]["delivery_info"] == {"exchange": "", "routing_key": "q2"}
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]
    args, kwargs, _ = json.loads(base64.b64decode(second["body"]))
    assert args == [] and kwargs == {"rollout_id": pinned.rollout_id, "resources_id": "rs-x",
                                     "resources_version": 3, "registry_seq": 7}
    assert json.loads(base64.b64decode(first["body"]))[1:] == [{"rollout_id": plain.rollout_id, "registry_seq": 7},
                                                               {}]  # None kwargs and the empty embed left out
    # Headers a worker reads with a default are left out while they hold it (~430 bytes a message).
    assert not {"shadow", "eta", "expires", "group", "stamps", "retries"} & set(first["headers"])
    assert "reply_to" not in first["properties"] and len(batch.by_queue["q1"][0]) < 750
    assert [(e["type"], e["uuid"], e["queue"]) for e in batch.sent_events] == [
        ("task-sent", plain.rollout_id, "q1"), ("task-sent", pinned.rollout_id, "q2")]


def test_publish_failure_fails_rollouts_and_raises(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> None:
    class BrokerDown(ConnectionError):
        pass

    monkeypatch.setattr(fake_client, "_celery", FakeApp(fail=BrokerDown("connection refused")))
    with pytest.raises(EnqueueError) as info:
        fake_client.enqueue_rollouts(["a", "b"])
    rollout_ids = info.value.rollout_ids
    assert len(rollout_ids) == 2
    assert "connection refused" in str(info.value) and "2 rollout" in str(info.value)
    assert isinstance(info.value.__cause__, BrokerDown)
    for rollout in fake_client.get_rollouts(rollout_ids):
        assert rollout.status == "failed" and rollout.end_time is not None
        assert rollout.error is not None and rollout.error.type == "BrokerDown"
        assert "could not be published" in rollout.error.message
    counts = fake_client.store.count_by_status()
    assert (counts["failed"], counts["queuing"]) == (2, 0)
    # Nothing waits on them forever.
    assert [r.status for r in fake_client.wait_for_rollouts(rollout_ids, timeout=1)] == ["failed", "failed"]


def test_resources_passthrough(fake_client: LightningClient, llm: LLM) -> None:
    assert fake_client.get_latest_resources() is None
    added = fake_client.add_resources({"main": llm}, "rs-a")
    updated = fake_client.update_resources("rs-a", {"main": llm.model_copy(update={"model": "v2"})})
    assert (added.version, updated.version) == (1, 2)
    assert fake_client.get_resources_by_id("rs-a") == updated
    assert fake_client.get_latest_resources() == updated
    assert [u.resources_id for u in fake_client.query_resources()] == ["rs-a"]


def test_cancel_and_queries(fake_client: LightningClient, published: list[list[str]]) -> None:
    first, second = fake_client.enqueue_rollouts([1, 2], mode="val")
    assert fake_client.cancel_rollout(first.rollout_id, terminate=False) == "cancelled"
    assert fake_client.cancel_rollout(first.rollout_id, terminate=False) == "cancelled"
    assert [r.rollout_id for r in fake_client.query_rollouts(status="cancelled")] == [first.rollout_id]
    assert [r.rollout_id for r in fake_client.query_rollouts(mode="val", status="queuing")] == [second.rollout_id]
    assert fake_client.get_attempts(second.rollout_id) == []
    assert [r.status for r in fake_client.wait_for_rollouts([first.rollout_id], timeout=1)] == ["cancelled"]


async def test_async_client(
    fake_client: LightningClient, async_client: AsyncLightningClient, published: list[list[str]], llm: LLM
) -> None:
    client = async_client
    snapshot = await client.add_resources({"main": llm}, "rs-a")
    assert (await client.get_latest_resources()) == snapshot
    rollout = await client.enqueue_rollout({"q": 1}, resources_id="rs-a")
    batch = await client.enqueue_rollouts([2, 3], mode="test")
    assert published == [[rollout.rollout_id], [r.rollout_id for r in batch]]

    store = fake_client.store
    claim = store.claim(rollout, "w1")
    store.start_attempt(rollout.rollout_id, claim.sequence_id, "rs-a", 1)
    store.finish_attempt(rollout.rollout_id, claim.sequence_id, "succeeded", "succeeded", result=RolloutResult(reward=1))

    done = await client.wait_for_rollouts([rollout.rollout_id], timeout=1)
    assert [r.reward for r in done] == [1.0]
    assert (await client.get_rollout(rollout.rollout_id)).status == "succeeded"
    assert len(await client.get_attempts(rollout.rollout_id)) == 1
    assert [r.rollout_id for r in await client.query_rollouts(mode="test")] == [r.rollout_id for r in reversed(batch)]
    assert await client.cancel_rollout(batch[0].rollout_id, terminate=False) == "cancelled"


async def test_async_client_has_every_method_of_the_sync_one(async_client: AsyncLightningClient, llm: LLM) -> None:
    public = {n for n in vars(LightningClient) if not n.startswith("_") and callable(getattr(LightningClient, n))}
    worker_side = {"publish"}  # the client sends messages through it; an algorithm calls enqueue_rollouts
    async_public = {n for n in vars(AsyncLightningClient) if not n.startswith("_")}
    assert public - worker_side == async_public, "the async and sync clients' public methods differ"
    for name in sorted(async_public):
        method = vars(AsyncLightningClient)[name]
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), \
            f"AsyncLightningClient.{name} is not written out as async def"
        ours = inspect.signature(method, eval_str=True)
        theirs = inspect.signature(getattr(LightningClient, name), eval_str=True)
        if any(p.kind is p.VAR_KEYWORD for p in theirs.parameters.values()):
            theirs = inspect.signature(getattr(RolloutStore, name), eval_str=True)  # query_rollouts(**filters)
        # Same parameters (names, kinds, defaults) and the same result type; the async client may
        # accept any iterable where the sync one takes a sequence.
        assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
            (p.name, p.kind, p.default) for p in theirs.parameters.values()], name
        if inspect.isasyncgenfunction(method):  # an iterator there, an async iterator here
            assert ours.return_annotation == AsyncIterator[theirs.return_annotation.__args__[0]], name
        else:
            assert ours.return_annotation == theirs.return_annotation, name

    client = async_client
    await client.add_resources_batch((f"rs-{i}", {"main": llm}) for i in range(3))  # a generator is fine
    assert await client.set_pointer("prod", "rs-0") == "rs-0"
    assert (await client.pointers())["prod"] == "rs-0"
    await client.set_pointer("prod", "rs-1")
    assert (await client.rollback("prod")).to_id == "rs-0"
    assert [m.to_id for m in await client.pointer_history("prod")] == ["rs-0", "rs-1", "rs-0"]


def test_cancel_revokes_with_terminate_only_what_it_cancelled(
    fake_client: LightningClient, published: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    revoked: list[tuple[str, dict[str, Any]]] = []
    control = SimpleNamespace(revoke=lambda task_id, **options: revoked.append((task_id, options)))
    celery = FakeApp()
    celery.control = control
    monkeypatch.setattr(fake_client, "_celery", celery)
    running, done = fake_client.enqueue_rollouts([1, 2], check_resources=False)
    store = fake_client.store
    claim = store.claim(running, "w1")
    store.start_attempt(running.rollout_id, claim.sequence_id, "rs-a", 1)
    store.terminate(done.rollout_id, "failed")

    assert fake_client.cancel_rollout(running.rollout_id) == "cancelled"
    assert fake_client.cancel_rollout(done.rollout_id) == "failed"  # finished already: nothing to stop
    assert revoked == [(running.rollout_id, {"terminate": True, "signal": "SIGTERM"})]
    (attempt,) = fake_client.get_attempts(running.rollout_id)
    assert attempt.status == "cancelled" and attempt.end_time is not None  # the open attempt is closed


def test_publish_warns_when_a_time_limit_outlasts_the_visibility_timeout(
    fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fake_client, "_celery", FakeApp())
    monkeypatch.setattr(Publisher, "_send", lambda self, producer, batch: None)
    monkeypatch.setattr(fake_client.settings, "visibility_timeout", 100)
    fake_client.enqueue_rollout(1, config=RolloutConfig(timeout_seconds=50), check_resources=False)
    assert "visibility timeout" not in caplog.text
    long = fake_client.enqueue_rollout(2, config=RolloutConfig(timeout_seconds=95), check_resources=False)
    assert f"rollout {long.rollout_id} may run 105 s, longer than the visibility timeout (100 s)" in caplog.text


# --------------------------------------------------------------------------- idempotent enqueue


def test_enqueue_with_a_rollout_id_twice_creates_and_publishes_once(
    fake_client: LightningClient, published: list[list[str]]
) -> None:
    first = fake_client.enqueue_rollout({"q": 1}, rollout_id="job-42", metadata={"try": 1})
    again = fake_client.enqueue_rollout({"q": "other"}, rollout_id="job-42", metadata={"try": 2})

    assert first.rollout_id == again.rollout_id == "job-42"
    assert again == fake_client.get_rollout("job-42")  # the stored one, unchanged
    assert again.input == {"q": 1} and again.metadata == {"try": 1}
    assert published == [["job-42"]]
    assert fake_client.query_rollouts() == [again]


def test_idempotency_key_names_one_rollout(fake_client: LightningClient, published: list[list[str]]) -> None:
    a = fake_client.enqueue_rollouts([RolloutRequest(input=1, idempotency_key="exp-7/item-3"),
                                      RolloutRequest(input=2, idempotency_key="exp-7/item-4")])
    b = fake_client.enqueue_rollouts([RolloutRequest(input=1, idempotency_key="exp-7/item-3"), 5])
    assert a[0].rollout_id == b[0].rollout_id != a[1].rollout_id
    assert published == [[a[0].rollout_id, a[1].rollout_id], [b[1].rollout_id]]
    assert len(fake_client.query_rollouts()) == 3


def test_retried_enqueue_publishes_a_record_whose_message_was_never_sent(
    fake_client: LightningClient, published: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("the process died between writing and publishing")

    monkeypatch.setattr(LightningClient, "publish", crash)
    with pytest.raises(KeyboardInterrupt):
        fake_client.enqueue_rollout(1, rollout_id="job-1")
    assert fake_client.get_rollout("job-1").status == "queuing"
    monkeypatch.undo()
    batches: list[list[str]] = []
    monkeypatch.setattr(LightningClient, "publish", lambda self, rollouts, seq=0: batches.append(
        [r.rollout_id for r in rollouts]))

    fake_client.enqueue_rollout(1, rollout_id="job-1")
    fake_client.enqueue_rollout(1, rollout_id="job-1")  # now marked sent: not again
    assert batches == [["job-1"]]


def test_idempotent_enqueue_does_not_republish_a_rollout_that_started(
    fake_client: LightningClient, published: list[list[str]]
) -> None:
    rollout = fake_client.enqueue_rollout(1, rollout_id="job-1")
    fake_client.redis.hdel(fake_client.keys.rollout("job-1"), "published")  # as if the mark were lost
    fake_client.store.claim(rollout, "w1")
    fake_client.enqueue_rollout(1, rollout_id="job-1")
    assert published == [["job-1"]]


def test_idempotent_enqueue_refuses_bad_ids(fake_client: LightningClient, published: list[list[str]]) -> None:
    from pydantic import ValidationError

    from lightning_queue.core.errors import DuplicateRolloutIdError

    with pytest.raises(DuplicateRolloutIdError, match="'job-1' appears twice"):
        fake_client.enqueue_rollouts([RolloutRequest(input=1, rollout_id="job-1"),
                                      RolloutRequest(input=2, rollout_id="job-1")])
    with pytest.raises(ValidationError, match="rollout_id or idempotency_key, not both"):
        RolloutRequest(input=1, rollout_id="a", idempotency_key="b")
    with pytest.raises(ValidationError, match="rollout_id"):
        RolloutRequest(input=1, rollout_id="has space")
    assert published == [] and fake_client.query_rollouts() == []


def test_idempotent_enqueue_round_trips_do_not_grow_with_the_batch(
    fake_client: LightningClient, published: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = fake_client.redis.execute_command

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(str(args[0]))
        return real(*args, **kwargs)

    fake_client.enqueue_rollout(0, rollout_id="warm-up")  # loads the scripts
    monkeypatch.setattr(fake_client.redis, "execute_command", counting)
    fake_client.enqueue_rollouts([RolloutRequest(input=i, rollout_id=f"a-{i}") for i in range(3)])
    small = len(calls)
    assert calls == ["EVALSHA", "EVALSHA"]  # create-if-absent, then mark-published
    calls.clear()
    fake_client.enqueue_rollouts([RolloutRequest(input=i, rollout_id=f"b-{i}") for i in range(300)])
    assert len(calls) == small
