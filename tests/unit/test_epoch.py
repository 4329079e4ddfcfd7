"""The registry epoch (``lightning_queue/storage/epoch.py``) on fakeredis: Redis losing its data is
noticed by writes, enqueues, waits and worker caches, and content of a lost registry never runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest

from lightning_queue import LightningClient, PromptTemplate, Rollout, RolloutNotFoundError, RolloutRequest, rollout
from lightning_queue.broker.app import make_celery
from lightning_queue.broker.publisher import Publisher
from lightning_queue.core.errors import RegistryLostError
from lightning_queue.storage.epoch import RegistryEpoch
from lightning_queue.worker import runner
from lightning_queue.worker.cache import SnapshotCache
from lightning_queue.worker.context import WorkerContext
from lightning_queue.worker.heartbeat import Heartbeat


def prompt(text: str) -> dict[str, PromptTemplate]:
    return {"prompt": PromptTemplate(template=text)}


@pytest.fixture
def wipe(fake_client: LightningClient, fake_redis: fakeredis.FakeRedis) -> Callable[[], None]:
    """What a Redis restarted without persistence does to this prefix: every key gone."""

    def wipe() -> None:
        keys = list(fake_redis.scan_iter(match=f"{fake_client.keys.prefix}:*"))
        if keys:
            fake_redis.delete(*keys)

    return wipe


@pytest.fixture
def quiet_publish(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    sent: list[str] = []
    monkeypatch.setattr(fake_client, "publish", lambda rollouts, registry_seq=0: sent.extend(
        r.rollout_id for r in rollouts))
    return sent


def test_the_first_write_creates_the_epoch_and_every_process_adopts_it(
    fake_client: LightningClient, fake_redis: fakeredis.FakeRedis
) -> None:
    assert fake_redis.get(fake_client.keys.epoch) is None and fake_client.epoch.known is None  # reads write nothing
    fake_client.add_resources(prompt("a"), "rs-a")
    epoch = fake_redis.get(fake_client.keys.epoch).decode()
    assert fake_client.epoch.known == epoch
    other = RegistryEpoch(fake_redis, fake_client.keys)
    assert other.establish() == epoch and other.check() == epoch  # proposals of later writers lose


def test_a_write_after_redis_lost_its_data_is_refused_once_then_goes_to_the_new_registry(
    fake_client: LightningClient, fake_redis: fakeredis.FakeRedis, wipe: Callable[[], None]
) -> None:
    fake_client.add_resources(prompt("old"), "rs-a")
    old = fake_client.epoch.known
    wipe()
    with pytest.raises(RegistryLostError, match="Redis lost its data") as lost:
        fake_client.add_resources(prompt("new"), "rs-a")
    assert lost.value.known_epoch == old and lost.value.current_epoch is None
    assert list(fake_redis.scan_iter(match=f"{fake_client.keys.prefix}:*")) == []  # nothing written
    again = fake_client.add_resources(prompt("new"), "rs-a")
    assert again.version == 1 and fake_client.epoch.known not in (None, old)


@pytest.mark.parametrize("other_process_wrote_first", [False, True])
@pytest.mark.parametrize("chosen_ids", [False, True], ids=["plain", "idempotent"])
def test_an_enqueue_after_redis_lost_its_data_is_refused_and_sends_nothing(
    fake_client: LightningClient, fake_redis: fakeredis.FakeRedis, wipe: Callable[[], None], quiet_publish: list[str],
    chosen_ids: bool, other_process_wrote_first: bool
) -> None:
    fake_client.add_resources(prompt("a"), "rs-a")
    old = fake_client.epoch.known
    wipe()
    if other_process_wrote_first:  # e.g. a worker's check, which starts the new registry
        RegistryEpoch(fake_redis, fake_client.keys).establish()
    request = RolloutRequest(input=1, rollout_id="job-1") if chosen_ids else RolloutRequest(input=1)
    with pytest.raises(RegistryLostError, match=str(old)):
        fake_client.enqueue_rollouts([request], check_resources=False)
    assert quiet_publish == []
    if chosen_ids:  # its script refuses before writing
        assert fake_redis.exists(fake_client.keys.rollout("job-1")) == 0
    else:  # written by the MULTI/EXEC before the epoch could be compared: marked failed, never sent
        [written] = fake_client.query_rollouts()
        assert written.status == "failed" and written.error is not None and written.error.type == "RegistryLostError"
    [queued] = fake_client.enqueue_rollouts([request], check_resources=False)  # the next one goes through
    assert quiet_publish == [queued.rollout_id] and fake_client.get_rollout(queued.rollout_id).status == "queuing"


def test_a_wait_tells_records_lost_with_the_registry_from_one_that_expired(
    fake_client: LightningClient, fake_redis: fakeredis.FakeRedis, wipe: Callable[[], None], quiet_publish: list[str]
) -> None:
    fake_client.add_resources(prompt("a"), "rs-a")
    gone, kept = fake_client.enqueue_rollouts([1, 2])
    fake_redis.delete(fake_client.keys.rollout(gone.rollout_id))  # expired, or deleted by hand
    with pytest.raises(RolloutNotFoundError) as expired:
        fake_client.wait_for_rollouts([gone.rollout_id], timeout=1)
    assert type(expired.value) is RolloutNotFoundError
    wipe()
    with pytest.raises(RegistryLostError, match="Redis lost its data") as lost:
        fake_client.wait_for_rollouts([kept.rollout_id], timeout=1)
    assert isinstance(lost.value, RolloutNotFoundError) and lost.value.rollout_id == kept.rollout_id


# ----------------------------------------------------------------------------- worker caches and the runner


@pytest.fixture
def cache(fake_client: LightningClient) -> Iterator[SnapshotCache]:
    cache = SnapshotCache(fake_client.registry, 10_000_000, poll_seconds=0.02)
    assert cache.start()
    yield cache
    cache.close()


def test_the_cache_answers_from_memory_only_for_its_epoch_and_drops_everything_on_another(
    fake_client: LightningClient, cache: SnapshotCache, wipe: Callable[[], None]
) -> None:
    fake_client.add_resources(prompt("old"), "rs-a")
    old = fake_client.epoch.known
    assert cache.take("rs-a", 1).epoch == old
    assert cache.peek("rs-a", 1, 0, old) is not None
    assert cache.peek("rs-a", 1, 0, "ep-another-registry") is None  # a message of another registry
    wipe()
    fake_client.epoch.forget()
    fake_client.add_resources(prompt("new"), "rs-a")  # the same (id, version), other content
    new = fake_client.epoch.known
    held = cache.take("rs-a", 1, 0, new)  # a miss: read, and the old registry's entries dropped
    assert (held.snapshot.resources["prompt"].template, held.epoch) == ("new", new)  # type: ignore[attr-defined]
    stats = cache.stats()
    assert stats["epoch"] == new and stats["epoch_changes"] == 1 and stats["entries"] == 1


@pytest.mark.parametrize("message_epoch", ["new", "old", None])
def test_a_snapshot_re_added_after_redis_lost_its_data_never_runs_with_the_cached_old_content(
    fake_client: LightningClient, cache: SnapshotCache, wipe: Callable[[], None], quiet_publish: list[str],
    message_epoch: str | None
) -> None:
    ran_with: list[str] = []

    @rollout
    def agent(task: Any, prompt: PromptTemplate) -> float:
        ran_with.append(prompt.template)
        return 1.0

    settings = fake_client.settings
    ctx = WorkerContext(settings=settings, redis=fake_client.redis, registry=fake_client.registry,
                        store=fake_client.store, publisher=Publisher(make_celery(settings), settings),
                        heartbeat=Heartbeat(fake_client.store, settings.heartbeat_interval), cache=cache)
    fake_client.add_resources(prompt("old {x}"), "rs-a")
    old = fake_client.epoch.known
    first = fake_client.enqueue_rollout({"x": 1}, resources_id="rs-a")
    runner.run(ctx, agent, "w1", first.rollout_id, 0, "rs-a", 1, old)
    assert ran_with == ["old {x}"]  # the cache holds (rs-a, 1) = "old {x}" now

    wipe()
    with pytest.raises(RegistryLostError):
        fake_client.add_resources(prompt("new {x}"), "rs-a")
    fake_client.add_resources(prompt("new {x}"), "rs-a")
    queued = fake_client.enqueue_rollout({"x": 2}, resources_id="rs-a")
    # The message carries the new epoch; or the old one (a retry a worker published before it
    # noticed); or none: the claim and start scripts still refuse the old content.
    epoch = {"new": fake_client.epoch.known, "old": old, None: None}[message_epoch]
    outcome = runner.run(ctx, agent, "w1", queued.rollout_id, 0, "rs-a", 1, epoch)
    assert outcome["status"] == "succeeded" and ran_with == ["old {x}", "new {x}"]
    [attempt] = fake_client.get_attempts(queued.rollout_id)
    assert (attempt.resources_id, attempt.resources_version) == ("rs-a", 1)


def test_rollout_ids_that_could_address_another_key_are_refused_on_every_read(
    fake_client: LightningClient, quiet_publish: list[str]
) -> None:
    from lightning_queue.core.errors import InvalidRolloutIdError

    fake_client.add_resources(prompt("a"), "rs-a")
    job: Rollout = fake_client.enqueue_rollout(1, rollout_id="job-2")
    forged = f"{job.rollout_id}:attempt:1"
    for call in (fake_client.get_rollout, fake_client.get_attempts, fake_client.cancel_rollout,
                 lambda rid: fake_client.get_rollouts([rid]), lambda rid: fake_client.wait_for_rollouts([rid], 1)):
        with pytest.raises(InvalidRolloutIdError):
            call(forged)


def test_an_attempt_whose_snapshot_reads_keep_meeting_another_registry_fails_and_is_retried(
    fake_client: LightningClient, cache: SnapshotCache, quiet_publish: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import Retry

    from lightning_queue import RolloutConfig

    @rollout
    def agent(task: Any, prompt: PromptTemplate) -> float:
        raise AssertionError("must not run")

    settings = fake_client.settings
    ctx = WorkerContext(settings=settings, redis=fake_client.redis, registry=fake_client.registry,
                        store=fake_client.store, publisher=Publisher(make_celery(settings), settings),
                        heartbeat=Heartbeat(fake_client.store, settings.heartbeat_interval), cache=cache)
    monkeypatch.setattr(ctx.publisher, "publish", lambda *args, **kwargs: None)
    fake_client.add_resources(prompt("p"), "rs-a")
    queued = fake_client.enqueue_rollout({"x": 1}, resources_id="rs-a", config=RolloutConfig(max_attempts=2))

    def always_lost(rollout_id: str, seq: int, resources_id: str, version: int, epoch: str | None = None) -> bool:
        raise RegistryLostError(epoch or "", "ep-yet-another", rollout_id)  # Redis lost its data again

    monkeypatch.setattr(fake_client.store, "start_attempt", always_lost)
    with pytest.raises(Retry):
        runner.run(ctx, agent, "w1", queued.rollout_id, 0, None, None, fake_client.epoch.known)
    [attempt] = fake_client.get_attempts(queued.rollout_id)
    assert attempt.status == "failed" and attempt.error is not None and attempt.error.type == "RegistryLostError"
    assert fake_client.get_rollout(queued.rollout_id).status == "requeuing"
