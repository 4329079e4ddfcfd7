"""The runner: the Celery task that runs one rollout on a worker.

For each message it claims the rollout (opening an attempt), resolves the
snapshot by the seed's rule (an explicit ``resources_id`` gives that
snapshot, none gives the latest at the moment the rollout runs), injects the
resources into the agent, runs it and records the outcome. When the worker's
snapshot cache already holds the snapshot the message names, the claim opens
the attempt running with it: two Redis round trips per rollout (claim,
finish) instead of four (read, claim, start, finish). Nothing is left
stuck: a missing snapshot fails the rollout with an error naming the id and
the message is acked; an agent exception fails the attempt and retries
through Celery while ``max_attempts`` allows; a soft time limit raises inside
the agent, a hard one kills the process and is recorded by the worker's main
process; a worker that dies has its message redelivered, and the next claim
marks the lost attempt.

While the attempt is open the process heartbeats it (:mod:`lightning_queue.watchdog`).
A second delivery of a message whose attempt still beats is dropped without
running, and an outcome the store refuses (the attempt was superseded, or
closed as unresponsive, lost or cancelled meanwhile) is logged and not
recorded. Retries wait the config's backoff (``RolloutConfig.retry_delay``).
"""

from __future__ import annotations

import logging
import os
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import redis
from billiard.exceptions import (
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery import Task
from celery.exceptions import Reject
from celery.worker.request import Request
from pydantic_core import PydanticSerializationError

from lightning_queue.core.errors import (
    InvalidRolloutResultError,
    MissingResourceError,
    ResourcesNotFoundError,
    RolloutFailed,
    RolloutNotFoundError,
    SnapshotCorruptedError,
)
from lightning_queue.core.models import (
    ErrorInfo,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
)
from lightning_queue.storage.connections import text
from lightning_queue.storage.registry import LATEST
from lightning_queue.storage.store import StartWith
from lightning_queue.worker.heartbeat import heartbeat_of

if TYPE_CHECKING:
    from lightning_queue.storage.store import RolloutStore
    from lightning_queue.worker.app import LightningCelery

log = logging.getLogger(__name__)

TASK_NAME = "lightning_queue.rollout"

# Errors that another attempt cannot fix: retrying would only repeat them.
_PERMANENT = (ResourcesNotFoundError, SnapshotCorruptedError, MissingResourceError)


def next_status(
    config: RolloutConfig, sequence_id: int, attempt_status: str, retryable: bool = True
) -> Literal["succeeded", "failed", "requeuing"]:
    """Where a rollout goes after attempt ``sequence_id`` ended with ``attempt_status``."""
    if attempt_status == "succeeded":
        return "succeeded"
    if retryable and attempt_status in config.retry_condition and sequence_id < config.max_attempts:
        return "requeuing"
    return "failed"


class RolloutTaskRequest(Request):
    """The worker's main process's view of one rollout message.

    When the pool process running it dies (SIGKILL, OOM), Celery requeues the
    message at once; the attempt's heartbeat is dropped first, so the
    redelivery claims the rollout (marking the attempt ``worker_lost``)
    instead of being dropped as a duplicate of an attempt that seems alive.
    """

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info, "exception", None)
        if isinstance(exc, WorkerLostError) or isinstance(getattr(exc, "exc", None), WorkerLostError):
            rollout_id = (self.kwargs or {}).get("rollout_id") or self.id
            try:
                self.task.app.lightning.store.release_lost(rollout_id, self.hostname)
            except Exception as err:  # noqa: BLE001 - the watchdog still recovers the attempt later
                log.warning("rollout %s: could not release the lost attempt (%s)", rollout_id, err)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class RolloutTask(Task):
    """Base class of the rollout task; handles what happens outside the task body."""

    Request = RolloutTaskRequest
    acks_late = True
    reject_on_worker_lost = True
    typing = True
    # An expected outcome: Flower shows the task failed, the worker logs no traceback.
    throws = (RolloutFailed,)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # A hard time limit kills the child process; this runs in the worker's main process.
        if isinstance(exc, TimeLimitExceeded):
            record_hard_timeout(self.app, kwargs.get("rollout_id") or task_id, exc)


def record_hard_timeout(app: LightningCelery, rollout_id: str, exc: BaseException) -> None:
    """The agent ignored its soft time limit and its process was killed: record the
    attempt as timed out and requeue the rollout if attempts remain."""
    client = app.lightning
    try:
        rollout = client.store.get_rollout(rollout_id)
    except RolloutNotFoundError:
        return
    if rollout.is_finished or rollout.attempt_count == 0:
        return
    seq = rollout.attempt_count
    error = ErrorInfo(
        type="TimeLimitExceeded",
        message=f"the agent ignored its soft time limit and its process was killed ({exc})",
    )
    status = client.store.finish_attempt(
        rollout_id, seq, "timeout", next_status(rollout.config, seq, "timeout"), error=error
    )
    if status == "requeuing":
        client.publish([rollout], countdown=rollout.config.retry_delay(seq) or None)
    elif status == "stale":
        log.warning("rollout %s attempt %d: hard time-out not recorded, the attempt was already closed",
                    rollout_id, seq)


def log_refused(store: RolloutStore, rollout_id: str, seq: int, status: str, attempt_status: str) -> None:
    """Say why an attempt's outcome was not recorded on the rollout (reads the attempt
    only then: a refusal is rare, the normal path pays nothing)."""
    if status == "stale":
        current = store.redis.hget(store.keys.rollout(rollout_id), "attempt_count")
        if current is not None and int(current) != seq:
            reason = f"superseded by attempt {int(current)}"
        else:
            closed = store.redis.hget(store.keys.attempt(rollout_id, seq), "status")
            reason = f"already closed as {text(closed) if closed else 'gone'}"
        log.warning("rollout %s attempt %d: result (%s) refused: the attempt was %s; the rollout keeps its state",
                    rollout_id, seq, attempt_status, reason)
    elif status == "cancelled":
        log.warning("rollout %s attempt %d: result (%s) refused: the rollout was cancelled while it ran",
                    rollout_id, seq, attempt_status)


def run_rollout(
    task: RolloutTask,
    rollout_id: str,
    resources_id: str | None = None,
    resources_version: int | None = None,
    registry_seq: int = 0,
) -> dict[str, Any]:
    """Run one rollout. ``resources_id``/``resources_version`` in the message name the
    snapshot the rollout asks for (Flower shows them; the worker uses them to resolve it
    from its cache before claiming); the rollout record is authoritative.
    ``registry_seq`` is the registry state at enqueue: the snapshot cache must
    have caught up with it before it may answer without asking Redis."""
    app: LightningCelery = task.app  # type: ignore[assignment]
    try:
        return _run(task, app, rollout_id, registry_seq, resources_id, resources_version)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Redis stayed unreachable through the client's retries: give the message back
        # so the rollout runs again once Redis is back, instead of acking it unrecorded.
        log.error("rollout %s: lost the connection to Redis (%s); requeuing the message", rollout_id, exc)
        raise Reject(str(exc), requeue=True) from exc


def _run(task: RolloutTask, app: LightningCelery, rollout_id: str, registry_seq: int = 0,
         resources_id: str | None = None, resources_version: int | None = None) -> dict[str, Any]:
    client = app.lightning
    store = client.store
    worker_id = task.request.hostname or f"pid-{os.getpid()}"
    # The message says which snapshot the rollout asks for; when this process's cache holds it
    # (nearly always), the claim opens the attempt running with it: one round trip instead of
    # three (read the record, claim, start). The claim checks the record asks for the same
    # reference; on a miss or a mismatch the attempt opens preparing and the snapshot is
    # resolved from the record below.
    start = None
    cached = _cached_snapshot(app, resources_id, resources_version, registry_seq)
    if cached is not None:
        start = StartWith(resources_id, resources_version, cached.resources_id, cached.version)
    claim = store.claim(rollout_id, worker_id, start)
    if claim.outcome == "missing":
        log.error("rollout %s: no such record (expired or deleted); dropping the message", rollout_id)
    if claim.outcome == "duplicate":
        log.warning("rollout %s: delivered again while attempt %d runs on a live worker; dropping this duplicate",
                    rollout_id, claim.sequence_id)
    if claim.outcome != "claimed":
        return {"rollout_id": rollout_id, "status": claim.status or claim.outcome}
    assert claim.rollout is not None
    seq = claim.sequence_id
    with heartbeat_of(client).attempt(rollout_id, seq):
        return _run_attempt(task, app, claim.rollout, seq, registry_seq, cached if claim.started else None)


def _cached_snapshot(
    app: LightningCelery, resources_id: str | None, resources_version: int | None, registry_seq: int
) -> ResourcesUpdate | None:
    """The snapshot the message's reference names, if this process's cache answers it from
    memory (the rule of :func:`_run_attempt`: a pinned version, else the reference's current
    one, ``None`` meaning the agent's default or ``latest``)."""
    cache = app.lightning.cache
    if cache is None:
        return None
    ref = resources_id or app.agent.default_resources or LATEST
    return cache.peek(ref, resources_version, registry_seq)


def _run_attempt(
    task: RolloutTask, app: LightningCelery, rollout: Rollout, seq: int, registry_seq: int,
    started: ResourcesUpdate | None = None,
) -> dict[str, Any]:
    """Run attempt ``seq`` of ``rollout`` (the record as the claim left it). ``started``: the
    claim already opened the attempt running with this snapshot."""
    client = app.lightning
    store = client.store
    rollout_id = rollout.rollout_id
    snapshot = started
    if snapshot is None:
        try:
            version = rollout.resources_version if rollout.resolve == "pinned" else None
            ref = rollout.resources_id or app.agent.default_resources  # None: latest
            snapshot = client.load_snapshot(ref, version, registry_seq)
        except (ResourcesNotFoundError, SnapshotCorruptedError) as exc:
            status = store.finish_attempt(
                rollout_id, seq, "failed", "failed", error=ErrorInfo.from_exception(exc, with_traceback=False)
            )
            if status == "failed":
                raise RolloutFailed(rollout_id, type(exc).__name__, str(exc)) from None
            return {"rollout_id": rollout_id, "status": status}

        if not store.start_attempt(rollout_id, seq, snapshot.resources_id, snapshot.version):
            return {"rollout_id": rollout_id, "status": store.get_rollout(rollout_id).status}
    # The agent sees the record as it now stands: running, on this attempt.
    rollout = rollout.model_copy(update={"status": "running"})

    error: ErrorInfo | None = None
    result = None
    attempt_status = "succeeded"
    retryable = True
    try:
        # Read-only: the snapshot may be the worker cache's own copy, shared by later rollouts.
        result = app.agent.execute(rollout.input, MappingProxyType(snapshot.resources), rollout)
        result.model_dump_json()  # the output must be JSON-able to be stored
    except SoftTimeLimitExceeded as exc:
        attempt_status, result = "timeout", None
        error = ErrorInfo(
            type="SoftTimeLimitExceeded",
            message=f"the rollout ran past its time limit of {rollout.config.timeout_seconds or app.lightning_settings.default_timeout_seconds} s",
            traceback=ErrorInfo.from_exception(exc).traceback,
        )
    except PydanticSerializationError as exc:
        attempt_status, result = "failed", None
        error = ErrorInfo.from_exception(
            InvalidRolloutResultError(f"the agent's output is not JSON-serializable: {exc}")
        )
    except Exception as exc:  # the agent's own failure, whatever it is
        attempt_status, result = "failed", None
        retryable = not isinstance(exc, _PERMANENT)
        if isinstance(exc, MissingResourceError):
            exc = MissingResourceError(f"snapshot {snapshot.resources_id!r} (version {snapshot.version}): {exc}")
        error = ErrorInfo.from_exception(exc)
        log.warning("rollout %s attempt %d failed: %s: %s", rollout_id, seq, error.type, error.message)

    status = store.finish_attempt(
        rollout_id, seq, attempt_status, next_status(rollout.config, seq, attempt_status, retryable),
        error=error, result=result,
    )
    log_refused(store, rollout_id, seq, status, attempt_status)
    if status == "requeuing":
        # Celery's own retry: the same task id goes back to the queue with its time limits.
        raise task.retry(max_retries=None, countdown=rollout.config.retry_delay(seq))
    if status == "failed" and error is not None:
        raise RolloutFailed(rollout_id, error.type, error.message)
    return {
        "rollout_id": rollout_id,
        "status": status,
        "resources_id": snapshot.resources_id,
        "version": snapshot.version,
        "reward": result.reward if result else None,
    }


def register_tasks(app: LightningCelery) -> None:
    app.task(bind=True, base=RolloutTask, name=TASK_NAME)(run_rollout)

