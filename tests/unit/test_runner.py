"""The runner's task body (:func:`lightning_queue.worker.runner.run`) and the retry rules,
on a worker context built over the test's fakeredis client."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
import redis
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.exceptions import Reject, Retry

from lightning_queue import (
    LLM,
    LightningClient,
    LitAgent,
    PromptTemplate,
    Rollout,
    RolloutConfig,
    RolloutResult,
    Settings,
    rollout,
)
from lightning_queue.broker.app import make_celery
from lightning_queue.broker.publisher import Publisher
from lightning_queue.core.errors import (
    ResourcesNotFoundError,
    RolloutFailed,
    RolloutNotFoundError,
    SnapshotCorruptedError,
)
from lightning_queue.core.policy import next_status, retry_delay
from lightning_queue.worker import recovery, runner
from lightning_queue.worker.cache import SnapshotCache, start_cache
from lightning_queue.worker.context import WorkerContext
from lightning_queue.worker.heartbeat import Heartbeat
from lightning_queue.worker.tasks import run_rollout

RetryRequested = Retry  # what the runner raises when the policy retries an attempt


class FakeTask:
    """A worker process as the runner sees it: a context sharing the test client's registry
    and store (so tests can patch them), the agent, and the worker's hostname. Messages the
    recovery publishes (retries) are recorded in ``retries`` instead of sent, as are the retries
    it schedules (``countdown``: their backoff, to the millisecond)."""

    cache: SnapshotCache | None = None  # set per test by the ``worker_cache`` fixture

    def __init__(self, client: LightningClient, agent: LitAgent, hostname: str | None = "worker-1@host") -> None:
        self.client = client
        self.agent = agent
        self.hostname = hostname or f"pid-{os.getpid()}"
        settings = client.settings
        self.ctx = WorkerContext(settings=settings, redis=client.redis, registry=client.registry, store=client.store,
                                 publisher=Publisher(make_celery(settings), settings),
                                 heartbeat=Heartbeat(client.store, settings.heartbeat_interval), cache=self.cache)
        self.retries: list[dict[str, Any]] = []

        def publish(rollouts: Any, registry_seq: int = 0, countdown: float | None = None,
                    registry_epoch: str = "") -> None:
            self.retries.extend({"countdown": countdown or 0} for _ in rollouts)

        self.ctx.publisher.publish = publish  # type: ignore[method-assign]
        pending = client.store.pending
        schedule = pending.schedule_retries

        def schedule_retries(due: Mapping[str, float]) -> list[str]:
            now = time.time()
            self.retries.extend({"countdown": round(when - now, 3)} for when in due.values())
            return schedule(due)

        pending.schedule_retries = schedule_retries  # type: ignore[method-assign]

    def as_celery_task(self) -> Any:
        """What the ``lightning_queue.rollout`` task body reads of its bound Celery task."""
        return SimpleNamespace(app=SimpleNamespace(context=self.ctx, agent=self.agent),
                               request=SimpleNamespace(hostname=self.hostname))


@pytest.fixture(params=["no cache", "cache"], autouse=True)
def worker_cache(request: pytest.FixtureRequest, fake_client: LightningClient) -> Iterator[SnapshotCache | None]:
    """Every test runs twice: on a worker without a snapshot cache (the claim opens the attempt
    preparing, the runner resolves the snapshot, then starts it) and with one (a cached snapshot
    lets the claim open the attempt running at once)."""
    if request.param == "no cache":
        yield None
        return
    cache = start_cache(fake_client.registry, fake_client.settings)
    FakeTask.cache = cache
    yield cache
    FakeTask.cache = None
    if cache is not None:
        cache.close()


def run(task: FakeTask, rollout_id: str) -> dict[str, Any]:
    """:func:`runner.run` with the message ``publish`` would send: the record's reference and the
    registry sequence now (with a cache, once its listener caught up with that sequence)."""
    client = task.client
    message: dict[str, Any] = {}
    try:
        record = client.store.get_rollout(rollout_id)
        message = {"resources_id": record.resources_id, "resources_version": record.resources_version}
    except RolloutNotFoundError:
        pass
    seq = int(client.redis.get(client.keys.seq) or 0)
    cache = task.ctx.cache
    if cache is not None:
        deadline = time.monotonic() + 10
        while cache.stats()["applied_seq"] < seq:
            assert time.monotonic() < deadline, "the cache listener did not catch up"
            time.sleep(0.005)
        warm(task, message.get("resources_id"), message.get("resources_version"), seq)
    return runner.run(task.ctx, task.agent, task.hostname, rollout_id, seq, **message)


def warm(task: FakeTask, resources_id: str | None, version: int | None, seq: int) -> None:
    """Load the snapshot the message names into the cache, as an earlier rollout would have
    (so the claim can start the attempt at once); a snapshot that does not load is left out."""
    try:
        task.ctx.load_snapshot(resources_id or task.agent.default_resources, version, seq)
    except (ResourcesNotFoundError, SnapshotCorruptedError):
        pass


def recording_agent(reward: float = 1.0) -> tuple[LitAgent, list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    @rollout
    def agent(task: Any, llm: LLM, resources: dict, rollout: Rollout) -> float:
        calls.append({"task": task, "llm": llm, "resources": resources, "rollout": rollout})
        return reward

    return agent, calls


def failing_agent(exc: BaseException) -> tuple[LitAgent, list[int]]:
    calls: list[int] = []

    @rollout
    def agent(task: Any) -> float:
        calls.append(1)
        raise exc

    return agent, calls


# --------------------------------------------------------------------------- next_status


@pytest.mark.parametrize(
    "config, seq, attempt_status, retryable, expected",
    [
        (RolloutConfig(), 1, "succeeded", True, "succeeded"),
        (RolloutConfig(max_attempts=3), 3, "succeeded", False, "succeeded"),
        (RolloutConfig(), 1, "failed", True, "failed"),  # one attempt only
        (RolloutConfig(max_attempts=2), 1, "failed", True, "requeuing"),
        (RolloutConfig(max_attempts=2), 2, "failed", True, "failed"),  # attempts used up
        (RolloutConfig(max_attempts=2), 1, "failed", False, "failed"),  # a permanent error
        (RolloutConfig(max_attempts=2), 1, "timeout", True, "requeuing"),
        (RolloutConfig(max_attempts=2), 1, "worker_lost", True, "requeuing"),
        (RolloutConfig(max_attempts=2, retry_condition=["timeout"]), 1, "failed", True, "failed"),
        (RolloutConfig(max_attempts=2, retry_condition=["failed"]), 1, "timeout", True, "failed"),
        (RolloutConfig(max_attempts=5, retry_condition=[]), 1, "failed", True, "failed"),
        (RolloutConfig(max_attempts=2), 1, "unresponsive", True, "requeuing"),
    ],
)
def test_next_status(config: RolloutConfig, seq: int, attempt_status: str, retryable: bool, expected: str) -> None:
    assert next_status(config, seq, attempt_status, retryable) == expected


# --------------------------------------------------------------------------- success


def test_success_records_reward_and_snapshot(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, prompt: PromptTemplate
) -> None:
    snapshot = fake_client.add_resources({"main": llm, "prompt": prompt}, "rs-a")
    fake_client.update_resources("rs-a", {"main": llm, "prompt": prompt})  # version 2
    queued = enqueue({"q": 1}, resources_id="rs-a", metadata={"k": "v"})
    agent, calls = recording_agent(0.75)
    task = FakeTask(fake_client, agent)

    reply = run(task, queued.rollout_id)

    assert reply == {"rollout_id": queued.rollout_id, "status": "succeeded", "resources_id": "rs-a",
                     "version": 2, "reward": 0.75}
    call, = calls
    assert call["task"] == {"q": 1} and call["llm"] == llm
    assert call["llm"].api_key.get_secret_value() == "sk-very-secret"  # the worker gets the real key
    assert call["resources"] == {"main": llm, "prompt": prompt}
    assert call["rollout"].rollout_id == queued.rollout_id and call["rollout"].metadata == {"k": "v"}
    done = fake_client.get_rollout(queued.rollout_id)
    assert done.status == "succeeded" and done.reward == 0.75 and done.error is None
    attempt, = fake_client.get_attempts(queued.rollout_id)
    assert (attempt.status, attempt.resources_id, attempt.resources_version) == ("succeeded", "rs-a", 2)
    assert attempt.worker_id == "worker-1@host"
    assert attempt.result == RolloutResult(reward=0.75)
    assert task.retries == []
    assert snapshot.version == 1


def test_worker_id_falls_back_to_pid(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    fake_client.add_resources({"main": llm})
    queued = enqueue()
    run(FakeTask(fake_client, recording_agent()[0], hostname=None), queued.rollout_id)
    assert fake_client.get_attempts(queued.rollout_id)[0].worker_id == f"pid-{os.getpid()}"


def test_unpinned_rollout_uses_latest_at_run_time(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"main": llm}, "rs-old")
    queued = enqueue()  # unpinned, while rs-old is the latest
    newer = llm.model_copy(update={"model": "newer"})
    fake_client.add_resources({"main": newer}, "rs-new")
    agent, calls = recording_agent()

    reply = run(FakeTask(fake_client, agent), queued.rollout_id)

    assert (reply["resources_id"], reply["version"]) == ("rs-new", 1)
    assert calls[0]["llm"] == newer
    attempt, = fake_client.get_attempts(queued.rollout_id)
    assert (attempt.resources_id, attempt.resources_version) == ("rs-new", 1)
    assert fake_client.get_rollout(queued.rollout_id).resources_id is None  # still "latest" on the record
    assert [r.rollout_id for r in fake_client.query_rollouts(resources_id="rs-new")] == [queued.rollout_id]


def test_pinned_rollout_ignores_latest(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    fake_client.add_resources({"main": llm}, "rs-pinned")
    queued = enqueue(resources_id="rs-pinned")
    fake_client.add_resources({"main": llm.model_copy(update={"model": "other"})}, "rs-latest")
    agent, calls = recording_agent()
    assert run(FakeTask(fake_client, agent), queued.rollout_id)["resources_id"] == "rs-pinned"
    assert calls[0]["llm"] == llm


def test_async_agent_runs(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    @rollout
    async def agent(task: str, llm: LLM) -> RolloutResult:
        return RolloutResult(reward=0.5, output={"model": llm.model, "task": task})

    fake_client.add_resources({"main": llm})
    queued = enqueue("hi")
    assert run(FakeTask(fake_client, agent), queued.rollout_id)["reward"] == 0.5
    assert fake_client.get_rollout(queued.rollout_id).result == RolloutResult(reward=0.5, output={"model": "tiny", "task": "hi"})


# --------------------------------------------------------------------------- snapshot problems


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_unknown_resources_id_fails_without_retry(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, max_attempts: int
) -> None:
    fake_client.add_resources({"main": llm}, "rs-a")
    queued = enqueue(resources_id="rs-gone", check_resources=False, config=RolloutConfig(max_attempts=max_attempts))
    agent, calls = recording_agent()
    task = FakeTask(fake_client, agent)

    with pytest.raises(RolloutFailed, match="rs-gone") as info:
        run(task, queued.rollout_id)

    assert info.value.rollout_id == queued.rollout_id
    assert calls == [] and task.retries == []
    failed = fake_client.get_rollout(queued.rollout_id)
    assert failed.status == "failed" and failed.end_time is not None
    assert failed.error is not None and failed.error.type == "ResourcesNotFoundError"
    assert "rs-gone" in failed.error.message
    attempt, = fake_client.get_attempts(queued.rollout_id)
    assert attempt.status == "failed" and attempt.error == failed.error


def test_no_latest_snapshot_fails(fake_client: LightningClient, enqueue: Callable[..., Rollout]) -> None:
    queued = enqueue(config=RolloutConfig(max_attempts=2))
    task = FakeTask(fake_client, recording_agent()[0])
    with pytest.raises(RolloutFailed, match="NoLatestResourcesError"):
        run(task, queued.rollout_id)
    failed = fake_client.get_rollout(queued.rollout_id)
    assert failed.status == "failed" and "add_resources" in failed.error.message  # type: ignore[union-attr]
    assert task.retries == []


def test_corrupted_snapshot_fails(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], fake_redis: fakeredis.FakeRedis, llm: LLM
) -> None:
    fake_client.add_resources({"main": llm}, "rs-a")
    fake_redis.hset(fake_client.keys.snapshot("rs-a"), "resources", "{garbage")
    queued = enqueue(resources_id="rs-a", config=RolloutConfig(max_attempts=2))
    task = FakeTask(fake_client, recording_agent()[0])
    with pytest.raises(RolloutFailed, match="SnapshotCorruptedError"):
        run(task, queued.rollout_id)
    assert fake_client.get_rollout(queued.rollout_id).status == "failed"
    assert task.retries == []


# --------------------------------------------------------------------------- agent failures


def test_agent_exception_retries_then_fails(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    fake_client.add_resources({"main": llm}, "rs-a")
    queued = enqueue(config=RolloutConfig(max_attempts=2))
    agent, calls = failing_agent(ZeroDivisionError("division by zero in step 3"))
    task = FakeTask(fake_client, agent)

    with pytest.raises(RetryRequested):
        run(task, queued.rollout_id)
    assert task.retries == [{"countdown": 0}]
    requeued = fake_client.get_rollout(queued.rollout_id)
    assert requeued.status == "requeuing" and requeued.error is not None
    first, = fake_client.get_attempts(queued.rollout_id)
    assert first.status == "failed"
    assert first.error is not None
    assert (first.error.type, first.error.message) == ("ZeroDivisionError", "division by zero in step 3")
    assert first.error.traceback is not None and "ZeroDivisionError" in first.error.traceback

    with pytest.raises(RolloutFailed, match="ZeroDivisionError: division by zero in step 3"):
        run(task, queued.rollout_id)  # the retried message
    assert len(task.retries) == 1 and len(calls) == 2
    failed = fake_client.get_rollout(queued.rollout_id)
    assert failed.status == "failed" and failed.attempt_count == 2
    assert failed.error is not None and failed.error.type == "ZeroDivisionError"
    assert [a.status for a in fake_client.get_attempts(queued.rollout_id)] == ["failed", "failed"]


def test_agent_exception_retried_then_succeeds(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    attempts: list[int] = []

    @rollout
    def flaky(task: Any) -> float:
        attempts.append(1)
        if len(attempts) == 1:
            raise TimeoutError("upstream LLM timed out")
        return 1.0

    fake_client.add_resources({"main": llm})
    queued = enqueue(config=RolloutConfig(max_attempts=3))
    task = FakeTask(fake_client, flaky)
    with pytest.raises(RetryRequested):
        run(task, queued.rollout_id)
    assert run(task, queued.rollout_id)["status"] == "succeeded"
    done = fake_client.get_rollout(queued.rollout_id)
    assert done.status == "succeeded" and done.error is None and done.attempt_count == 2


def test_agent_exception_not_retried_when_not_in_retry_condition(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"main": llm})
    queued = enqueue(config=RolloutConfig(max_attempts=3, retry_condition=["timeout"]))
    task = FakeTask(fake_client, failing_agent(ValueError("bad"))[0])
    with pytest.raises(RolloutFailed):
        run(task, queued.rollout_id)
    assert task.retries == []
    assert fake_client.get_rollout(queued.rollout_id).status == "failed"


def test_missing_resource_not_retried(fake_client: LightningClient, enqueue: Callable[..., Rollout], prompt: PromptTemplate) -> None:
    @rollout
    def agent(task: Any, llm: LLM) -> float:
        return 1.0

    fake_client.add_resources({"prompt": prompt}, "rs-prompt-only")
    queued = enqueue(config=RolloutConfig(max_attempts=3))
    task = FakeTask(fake_client, agent)
    with pytest.raises(RolloutFailed, match="MissingResourceError"):
        run(task, queued.rollout_id)
    assert task.retries == []
    failed = fake_client.get_rollout(queued.rollout_id)
    assert failed.status == "failed" and failed.attempt_count == 1
    assert failed.error is not None and failed.error.type == "MissingResourceError"
    assert "rs-prompt-only" in failed.error.message and "version 1" in failed.error.message  # which snapshot
    assert "'llm'" in failed.error.message and "LLM" in failed.error.message  # what was asked for


def test_non_json_output_fails(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    @rollout
    def agent(task: Any) -> RolloutResult:
        return RolloutResult(reward=1.0, output=object())

    fake_client.add_resources({"main": llm})
    queued = enqueue()
    with pytest.raises(RolloutFailed, match="InvalidRolloutResultError"):
        run(FakeTask(fake_client, agent), queued.rollout_id)
    failed = fake_client.get_rollout(queued.rollout_id)
    assert failed.status == "failed" and failed.result is None
    assert failed.error is not None and failed.error.type == "InvalidRolloutResultError"
    assert "JSON" in failed.error.message
    assert fake_client.get_attempts(queued.rollout_id)[0].status == "failed"


def test_bad_return_type_fails(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    @rollout
    def agent(task: Any) -> str:
        return "perfect"

    fake_client.add_resources({"main": llm})
    queued = enqueue()
    with pytest.raises(RolloutFailed, match="InvalidRolloutResultError"):
        run(FakeTask(fake_client, agent), queued.rollout_id)


def test_soft_time_limit_records_timeout_and_retries(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"main": llm})
    queued = enqueue(config=RolloutConfig(max_attempts=2, timeout_seconds=7))
    task = FakeTask(fake_client, failing_agent(SoftTimeLimitExceeded())[0])
    with pytest.raises(RetryRequested):
        run(task, queued.rollout_id)
    attempt, = fake_client.get_attempts(queued.rollout_id)
    assert attempt.status == "timeout"
    assert attempt.error is not None and attempt.error.type == "SoftTimeLimitExceeded"
    assert "7" in attempt.error.message
    with pytest.raises(RolloutFailed, match="SoftTimeLimitExceeded"):
        run(task, queued.rollout_id)
    assert [a.status for a in fake_client.get_attempts(queued.rollout_id)] == ["timeout", "timeout"]


# --------------------------------------------------------------------------- messages that must not run


def test_missing_rollout_is_dropped(fake_client: LightningClient) -> None:
    agent, calls = recording_agent()
    assert run(FakeTask(fake_client, agent), "ro-nope") == {"rollout_id": "ro-nope", "status": "missing"}
    assert calls == []


def test_cancelled_before_run_is_skipped(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    fake_client.add_resources({"main": llm})
    queued = enqueue()
    fake_client.cancel_rollout(queued.rollout_id, terminate=False)
    agent, calls = recording_agent()
    assert run(FakeTask(fake_client, agent), queued.rollout_id)["status"] == "cancelled"
    assert calls == [] and fake_client.get_attempts(queued.rollout_id) == []


def test_finished_rollout_is_not_run_again(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    fake_client.add_resources({"main": llm})
    queued = enqueue()
    agent, calls = recording_agent()
    task = FakeTask(fake_client, agent)
    run(task, queued.rollout_id)
    assert run(task, queued.rollout_id) == {"rollout_id": queued.rollout_id, "status": "succeeded"}
    assert len(calls) == 1


def test_cancelled_while_running_stays_cancelled(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, caplog: pytest.LogCaptureFixture
) -> None:
    @rollout
    def agent(task: Any, rollout: Rollout) -> float:
        fake_client.cancel_rollout(rollout.rollout_id, terminate=False)
        return 1.0

    fake_client.add_resources({"main": llm})
    queued = enqueue()
    assert run(FakeTask(fake_client, agent), queued.rollout_id)["status"] == "cancelled"
    cancelled = fake_client.get_rollout(queued.rollout_id)
    assert cancelled.status == "cancelled" and cancelled.result is None
    assert fake_client.get_attempts(queued.rollout_id)[0].result == RolloutResult(reward=1.0)
    assert f"rollout {queued.rollout_id} attempt 1: result (succeeded) refused: the rollout was cancelled" in caplog.text


def test_redelivery_after_lost_worker(fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM) -> None:
    fake_client.add_resources({"main": llm})
    retried = enqueue(config=RolloutConfig(max_attempts=2))
    final = enqueue(config=RolloutConfig(max_attempts=1))
    for queued in (retried, final):
        fake_client.store.claim(queued, "dead-worker")  # that worker died mid-attempt
        fake_client.redis.zadd(fake_client.keys.heartbeats, {queued.rollout_id: 0})  # and stopped beating

    agent, calls = recording_agent()
    task = FakeTask(fake_client, agent)
    assert run(task, retried.rollout_id)["status"] == "succeeded"
    assert [a.status for a in fake_client.get_attempts(retried.rollout_id)] == ["worker_lost", "succeeded"]

    assert run(task, final.rollout_id)["status"] == "lost"
    assert len(calls) == 1
    lost = fake_client.get_rollout(final.rollout_id)
    assert lost.status == "failed" and lost.error is not None and lost.error.type == "WorkerLostError"


# --------------------------------------------------------------------------- outside the task body


@pytest.mark.parametrize("max_attempts, expected", [(1, "failed"), (2, "requeuing")])
def test_hard_time_limit_is_recorded(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], published: list[str], llm: LLM,
    max_attempts: int, expected: str,
) -> None:
    fake_client.add_resources({"main": llm})
    queued = enqueue(config=RolloutConfig(max_attempts=max_attempts, timeout_seconds=1))
    claim = fake_client.store.claim(queued, "w1")
    fake_client.store.start_attempt(queued.rollout_id, claim.sequence_id, "rs", 1)
    task = FakeTask(fake_client, recording_agent()[0])

    recovery.record_hard_timeout(task.ctx, queued.rollout_id, TimeLimitExceeded(11))

    assert fake_client.get_rollout(queued.rollout_id).status == expected
    attempt, = fake_client.get_attempts(queued.rollout_id)
    assert attempt.status == "timeout" and attempt.error is not None and attempt.error.type == "TimeLimitExceeded"
    assert len(task.retries) == (1 if expected == "requeuing" else 0)  # republished to retry


def test_hard_time_limit_ignores_finished_and_unknown(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], published: list[str]
) -> None:
    queued = enqueue()
    fake_client.cancel_rollout(queued.rollout_id, terminate=False)
    task = FakeTask(fake_client, recording_agent()[0])
    recovery.record_hard_timeout(task.ctx, queued.rollout_id, TimeLimitExceeded(1))
    recovery.record_hard_timeout(task.ctx, "ro-nope", TimeLimitExceeded(1))
    assert fake_client.get_rollout(queued.rollout_id).status == "cancelled"


def test_redis_outage_requeues_the_message(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(fake_client.store, "claim", unreachable)  # the runner's first Redis call
    with pytest.raises(Reject) as info:
        run_rollout(FakeTask(fake_client, recording_agent()[0]).as_celery_task(), "ro-x")
    assert info.value.requeue is True



def test_agent_sees_the_record_of_its_own_attempt(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"main": llm})
    seen: list[Rollout] = []

    @rollout
    def agent(task: Any, rollout: Rollout) -> float:
        seen.append(rollout)
        if len(seen) == 1:
            raise RuntimeError("first attempt fails")
        return 1.0

    queued = enqueue(config=RolloutConfig(max_attempts=2))
    task = FakeTask(fake_client, agent)
    with pytest.raises(RetryRequested):
        run(task, queued.rollout_id)
    run(task, queued.rollout_id)
    assert [(r.status, r.attempt_count) for r in seen] == [("running", 1), ("running", 2)]
    assert all(r.start_time is not None for r in seen)


def test_agent_default_resources_replaces_latest_for_unpinned_rollouts(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"main": llm, "prompt": PromptTemplate(template="prod {x}")}, "rs-prod")
    fake_client.set_pointer("prod", "rs-prod")
    fake_client.add_resources({"main": llm, "prompt": PromptTemplate(template="newer {x}")}, "rs-newer")  # latest
    seen: list[str] = []

    @rollout(default_resources="prod")
    def agent(task: Any, prompt: PromptTemplate) -> float:
        seen.append(prompt.template)
        return 1.0

    unpinned = enqueue()
    pinned = enqueue(resources_id="rs-newer")
    task = FakeTask(fake_client, agent)
    run(task, unpinned.rollout_id)
    run(task, pinned.rollout_id)
    assert seen == ["prod {x}", "newer {x}"]
    assert fake_client.get_attempts(unpinned.rollout_id)[0].resources_id == "rs-prod"


def test_agent_cannot_change_the_snapshot_it_runs_with(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"main": llm}, "rs-a")

    @rollout
    def agent(task: Any, resources: dict) -> float:
        resources["main"] = "something else"  # type: ignore[index]
        return 1.0

    queued = enqueue(resources_id="rs-a")
    with pytest.raises(RolloutFailed, match="does not support item assignment"):
        run(FakeTask(fake_client, agent), queued.rollout_id)
    assert fake_client.get_resources_by_id("rs-a").resources["main"] == llm


# --------------------------------------------------------------------------- heartbeats, duplicates, backoff


def test_duplicate_delivery_is_dropped_without_running(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, caplog: pytest.LogCaptureFixture
) -> None:
    fake_client.add_resources({"main": llm})
    queued = enqueue(config=RolloutConfig(max_attempts=3))
    fake_client.store.claim(queued, "worker-0@host")  # another worker runs it and still beats
    agent, calls = recording_agent()

    reply = run(FakeTask(fake_client, agent), queued.rollout_id)

    assert reply == {"rollout_id": queued.rollout_id, "status": "duplicate"}
    assert calls == []
    assert [a.worker_id for a in fake_client.get_attempts(queued.rollout_id)] == ["worker-0@host"]
    assert f"rollout {queued.rollout_id}: delivered again while attempt 1 runs" in caplog.text


def test_result_of_an_attempt_closed_meanwhile_is_refused_and_logged(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, caplog: pytest.LogCaptureFixture
) -> None:
    fake_client.add_resources({"main": llm})
    queued = enqueue(config=RolloutConfig(max_attempts=1))
    store = fake_client.store

    @rollout
    def hangs(task: Any) -> float:
        # While it "hangs", the watchdog declares it unresponsive and fails the rollout.
        store.redis.zadd(store.keys.heartbeats, {queued.rollout_id: 0})
        assert store.close_unresponsive() == [(queued.rollout_id, "failed", 1)]
        return 1.0

    reply = run(FakeTask(fake_client, hangs), queued.rollout_id)

    assert reply["status"] == "stale"
    done = fake_client.get_rollout(queued.rollout_id)
    assert (done.status, done.result) == ("failed", None)  # never flips to succeeded
    assert [a.status for a in fake_client.get_attempts(queued.rollout_id)] == ["unresponsive"]
    assert (f"rollout {queued.rollout_id} attempt 1: result (succeeded) refused: the attempt was already "
            "closed as unresponsive") in caplog.text


def test_the_attempt_is_heartbeated_while_the_agent_runs(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    fake_client.add_resources({"main": llm})
    queued = enqueue()
    monkeypatch.setattr(fake_client.settings, "heartbeat_interval", 0.02)
    beats: list[tuple[str, int]] = []
    real = fake_client.store.heartbeat
    monkeypatch.setattr(fake_client.store, "heartbeat", lambda rid, seq: beats.append((rid, seq)) or real(rid, seq))

    @rollout
    def slow(task: Any) -> float:
        limit = time.monotonic() + 30
        while not beats:
            assert time.monotonic() < limit
            time.sleep(0.01)
        return 1.0

    assert run(FakeTask(fake_client, slow), queued.rollout_id)["status"] == "succeeded"
    assert beats[0] == (queued.rollout_id, 1)
    assert fake_client.redis.zscore(fake_client.keys.heartbeats, queued.rollout_id) is None


def test_retry_waits_the_configured_backoff(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM
) -> None:
    fake_client.add_resources({"main": llm})
    config = RolloutConfig(max_attempts=4, retry_backoff_seconds=2, retry_backoff_max_seconds=5)
    queued = enqueue(config=config)
    task = FakeTask(fake_client, failing_agent(ValueError("flaky"))[0])
    for _ in range(3):
        with pytest.raises(RetryRequested):
            run(task, queued.rollout_id)
    assert [r["countdown"] for r in task.retries] == pytest.approx([2, 4, 5], abs=0.01)  # doubled, then capped
    assert fake_client.redis.zscore(fake_client.keys.delayed, queued.rollout_id) is not None  # the last one waits
    with pytest.raises(RolloutFailed, match="ValueError: flaky"):
        run(task, queued.rollout_id)
    failed = fake_client.get_rollout(queued.rollout_id)
    assert (failed.status, failed.attempt_count, failed.error.message) == ("failed", 4, "flaky")


def test_hard_timeout_republishes_with_backoff(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = enqueue(config=RolloutConfig(max_attempts=2, retry_backoff_seconds=3))
    fake_client.store.claim(queued, "w1")
    task = FakeTask(fake_client, recording_agent()[0])
    recovery.record_hard_timeout(task.ctx, queued.rollout_id, TimeLimitExceeded(4))
    assert task.retries == [{"countdown": pytest.approx(3.0, abs=0.01)}]


def test_retry_delay_with_jitter_stays_within_the_backoff() -> None:
    config = RolloutConfig(retry_backoff_seconds=1, retry_backoff_max_seconds=8, retry_jitter=True)
    delays = [retry_delay(config, seq) for seq in range(1, 7) for _ in range(50)]
    assert all(0 <= d <= 8 for d in delays)
    assert len(set(delays)) > 1
    assert retry_delay(RolloutConfig(), 3) == 0.0


def test_result_of_a_superseded_attempt_is_refused_naming_the_new_one(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, caplog: pytest.LogCaptureFixture
) -> None:
    fake_client.add_resources({"main": llm})
    queued = enqueue(config=RolloutConfig(max_attempts=2))
    store = fake_client.store

    @rollout
    def overtaken(task: Any, rollout: Rollout) -> float:
        # Meanwhile its heartbeat lapsed and a redelivery opened attempt 2 on another worker.
        store.redis.zadd(store.keys.heartbeats, {rollout.rollout_id: 0})
        assert store.claim(rollout, "worker-2@host").sequence_id == 2
        return 1.0

    assert run(FakeTask(fake_client, overtaken), queued.rollout_id)["status"] == "stale"
    assert [a.status for a in fake_client.get_attempts(queued.rollout_id)] == ["worker_lost", "preparing"]
    assert fake_client.get_rollout(queued.rollout_id).result is None
    assert f"rollout {queued.rollout_id} attempt 1: result (succeeded) refused: the attempt was superseded by attempt 2" \
        in caplog.text


# --------------------------------------------------------------------------- claim and start in one step


def forbid(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a round trip the claim should have saved")


@pytest.mark.parametrize("worker_cache", ["cache"], indirect=True)
def test_cached_snapshot_starts_the_attempt_in_the_claim(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM,
    worker_cache: SnapshotCache | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert worker_cache is not None
    fake_client.add_resources({"main": llm}, "rs-a")
    queued = enqueue(resources_id="rs-a")
    seq = int(fake_client.redis.get(fake_client.keys.seq) or 0)
    agent, calls = recording_agent()
    task = FakeTask(fake_client, agent)
    warm(task, "rs-a", 1, seq)
    monkeypatch.setattr(fake_client.store, "get_rollout", forbid)
    monkeypatch.setattr(fake_client.store, "start_attempt", forbid)
    monkeypatch.setattr(fake_client.registry, "fetch", forbid)

    reply = runner.run(task.ctx, task.agent, task.hostname, queued.rollout_id, seq, "rs-a", 1)

    assert reply["status"] == "succeeded" and (reply["resources_id"], reply["version"]) == ("rs-a", 1)
    assert calls[0]["rollout"].status == "running" and calls[0]["rollout"].attempt_count == 1
    monkeypatch.undo()
    attempt, = fake_client.get_attempts(queued.rollout_id)
    assert (attempt.status, attempt.resources_id, attempt.resources_version) == ("succeeded", "rs-a", 1)
    assert [r.rollout_id for r in fake_client.query_rollouts(resources_id="rs-a")] == [queued.rollout_id]


@pytest.mark.parametrize("worker_cache", ["cache"], indirect=True)
def test_a_message_naming_another_snapshot_than_the_record_resolves_from_the_record(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM,
    worker_cache: SnapshotCache | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert worker_cache is not None
    fake_client.add_resources({"main": llm}, "rs-a")
    queued = enqueue()  # follows latest
    newer = llm.model_copy(update={"model": "newer"})
    fake_client.add_resources({"main": newer}, "rs-b")
    seq = int(fake_client.redis.get(fake_client.keys.seq) or 0)
    agent, calls = recording_agent()
    task = FakeTask(fake_client, agent)
    warm(task, "rs-a", 1, seq)
    started: list[tuple[str, int]] = []
    start_attempt = fake_client.store.start_attempt

    def spy(rollout_id: str, seq: int, resources_id: str, version: int, epoch: str | None = None) -> bool:
        started.append((resources_id, version))
        return start_attempt(rollout_id, seq, resources_id, version, epoch)

    monkeypatch.setattr(fake_client.store, "start_attempt", spy)
    # A message that disagrees with the record (pinned to rs-a): the record decides.
    reply = runner.run(task.ctx, task.agent, task.hostname, queued.rollout_id, seq, "rs-a", 1)

    assert started == [("rs-b", 1)] and reply["resources_id"] == "rs-b"
    assert calls[0]["llm"] == newer


# --------------------------------------------------------------------------- what an agent reports, outages


@pytest.mark.parametrize(("raw", "fragment"), [
    (float("nan"), "reward = nan"),
    (float("-inf"), "reward = -inf"),
    ({"reward": 1.0, "step_rewards": [0.5, float("nan")]}, "step_rewards[1] = nan"),
])
def test_a_reward_that_is_not_finite_fails_the_attempt(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, raw: Any, fragment: str
) -> None:
    fake_client.add_resources({"main": llm}, "rs-a")
    queued = enqueue()

    @rollout
    def agent(task: Any) -> Any:
        return raw

    with pytest.raises(RolloutFailed, match="NonFiniteRewardError"):
        run(FakeTask(fake_client, agent), queued.rollout_id)
    failed = fake_client.get_rollout(queued.rollout_id)
    assert failed.status == "failed" and failed.result is None and failed.error is not None
    assert failed.error.type == "NonFiniteRewardError" and fragment in failed.error.message


@pytest.mark.parametrize(("exc", "fragment"), [(SystemExit(3), "sys.exit(3)"), (KeyboardInterrupt(), "KeyboardInterrupt")])
def test_an_agent_that_tries_to_exit_fails_its_attempt_and_the_process_goes_on(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, exc: BaseException, fragment: str
) -> None:
    fake_client.add_resources({"main": llm}, "rs-a")
    queued = enqueue(config=RolloutConfig(max_attempts=2))
    agent, _ = failing_agent(exc)
    task = FakeTask(fake_client, agent)
    with pytest.raises(RetryRequested):
        run(task, queued.rollout_id)
    [attempt] = fake_client.get_attempts(queued.rollout_id)
    assert attempt.status == "failed" and attempt.error is not None
    assert attempt.error.type == "AgentExitError" and fragment in attempt.error.message
    assert attempt.error.traceback is not None and type(exc).__name__ in attempt.error.traceback


def test_an_outcome_is_kept_through_an_outage_longer_than_the_retry_budget(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_client.add_resources({"main": llm}, "rs-a")
    queued = enqueue()
    agent, _ = recording_agent(reward=0.75)
    task = FakeTask(fake_client, agent)
    finish = fake_client.store.finish_attempt
    failures = iter([redis.ConnectionError("Redis is down"), redis.TimeoutError("still down")])

    def flaky_finish(*args: Any, **kwargs: Any) -> str:
        error = next(failures, None)
        if error is not None:
            raise error  # what the client raises once its retry budget is spent
        return finish(*args, **kwargs)

    monkeypatch.setattr(fake_client.store, "finish_attempt", flaky_finish)
    monkeypatch.setattr(runner, "RECORD_RETRY_PAUSE", 0.0)
    assert run(task, queued.rollout_id)["status"] == "succeeded"
    done = fake_client.get_rollout(queued.rollout_id)
    assert (done.status, done.reward, done.attempt_count) == ("succeeded", 0.75, 1)


def test_the_hard_time_limit_is_the_soft_one_plus_the_workers_grace() -> None:
    from lightning_queue.worker.tasks import RolloutTaskRequest

    request = RolloutTaskRequest.__new__(RolloutTaskRequest)  # what the message's header would set
    request._task = SimpleNamespace(app=SimpleNamespace(settings=Settings(hard_timeout_grace_seconds=2)))
    request.time_limits = [31.0, 1.0]  # written by a client whose grace is 30 s
    assert request.time_limits == (3.0, 1.0)
    request.time_limits = [None, None]  # no limit at all
    assert request.time_limits == (None, None)
