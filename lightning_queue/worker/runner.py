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
while ``max_attempts`` allows; a soft time limit raises inside the agent, a
hard one kills the process and is recorded by the worker's main process; a
worker that dies has its message redelivered, and the next claim marks the
lost attempt.

While the attempt is open the process heartbeats it (:mod:`lightning_queue.worker.heartbeat`).
A second delivery of a message whose attempt still beats is dropped without
running, and an outcome the store refuses (the attempt was superseded, or
closed as unresponsive, lost or cancelled meanwhile) is logged and not
recorded. Whether an attempt is retried is the policy's decision
(:mod:`lightning_queue.core.policy`); the retry is sent by :mod:`lightning_queue.worker.recovery`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from pydantic_core import PydanticSerializationError

from lightning_queue.core.errors import (
    InvalidRolloutResultError,
    MissingResourceError,
    ResourcesNotFoundError,
    RolloutFailed,
    SnapshotCorruptedError,
)
from lightning_queue.core.models import ErrorInfo, Resource, ResourcesUpdate, Rollout
from lightning_queue.core.policy import is_retryable, next_status
from lightning_queue.storage.connections import text
from lightning_queue.storage.registry import LATEST
from lightning_queue.storage.store import RolloutStore, StartWith
from lightning_queue.worker import recovery
from lightning_queue.worker.agent import LitAgent
from lightning_queue.worker.context import WorkerContext

log = logging.getLogger(__name__)

Outcome = dict[str, Any]
"""What the rollout task returns (Flower shows it): the rollout id, its status, and on
success the concrete snapshot and the reward."""


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


def run(
    ctx: WorkerContext,
    agent: LitAgent,
    worker_id: str,
    rollout_id: str,
    registry_seq: int = 0,
    resources_id: str | None = None,
    resources_version: int | None = None,
    traceparent: str | None = None,
) -> Outcome:
    """Run one rollout on this process. ``resources_id``/``resources_version`` are what the task
    message says the rollout asks for (Flower shows them; the worker uses them to resolve the
    snapshot from its cache before claiming); the rollout record is authoritative.
    ``registry_seq`` is the registry state at enqueue: the snapshot cache must have caught up
    with it before it may answer without asking Redis. ``traceparent`` (the message's W3C trace
    context) is the parent of the attempt's root span.

    Raises :class:`RolloutFailed` when the rollout ends ``failed`` (so Celery and Flower show the
    task failed) and Celery's ``Retry`` when it is retried; returns the outcome otherwise.
    """
    store = ctx.store
    # The message says which snapshot the rollout asks for; when this process's cache holds it
    # (nearly always), the claim opens the attempt running with it: one round trip instead of
    # three (read the record, claim, start). The claim checks the record asks for the same
    # reference; on a miss or a mismatch the attempt opens preparing and the snapshot is
    # resolved from the record below.
    start = None
    cached = ctx.peek_snapshot(resources_id or agent.default_resources or LATEST, resources_version, registry_seq)
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
    with ctx.heartbeat.attempt(rollout_id, seq):
        return _run_attempt(ctx, agent, claim.rollout, seq, registry_seq, cached if claim.started else None,
                            attempt_id=claim.attempt_id, worker_id=worker_id, traceparent=traceparent)


def _run_attempt(
    ctx: WorkerContext, agent: LitAgent, rollout: Rollout, seq: int, registry_seq: int,
    started: ResourcesUpdate | None = None, *, attempt_id: str = "", worker_id: str = "",
    traceparent: str | None = None,
) -> Outcome:
    """Run attempt ``seq`` (``attempt_id``) of ``rollout`` (the record as the claim left it).
    ``started``: the claim already opened the attempt running with this snapshot."""
    store = ctx.store
    rollout_id = rollout.rollout_id
    snapshot = started
    if snapshot is None:
        try:
            version = rollout.resources_version if rollout.resolve == "pinned" else None
            ref = rollout.resources_id or agent.default_resources  # None: latest
            snapshot = ctx.load_snapshot(ref, version, registry_seq)
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
    # Tracing: the attempt's root span, under which the agent runs; ProxyLLMs scoped to the attempt.
    trace = ctx.tracing.start(rollout, seq, attempt_id, snapshot, worker_id, traceparent)
    # Read-only: the snapshot may be the worker cache's own copy, shared by later rollouts.
    resources: Mapping[str, Resource] = MappingProxyType(trace.scope(snapshot.resources))
    try:
        with trace.active():
            result = agent.execute(rollout.input, resources, rollout)
        result.model_dump_json()  # the output must be JSON-able to be stored
    except SoftTimeLimitExceeded as exc:
        attempt_status, result = "timeout", None
        limit = rollout.config.timeout_seconds or ctx.settings.default_timeout_seconds
        error = ErrorInfo(
            type="SoftTimeLimitExceeded",
            message=f"the rollout ran past its time limit of {limit} s",
            traceback=ErrorInfo.from_exception(exc).traceback,
        )
    except PydanticSerializationError as exc:
        attempt_status, result = "failed", None
        error = ErrorInfo.from_exception(
            InvalidRolloutResultError(f"the agent's output is not JSON-serializable: {exc}")
        )
    except Exception as exc:  # noqa: BLE001 - the agent's own failure, whatever it is
        attempt_status, result = "failed", None
        retryable = is_retryable(exc)
        if isinstance(exc, MissingResourceError):
            exc = MissingResourceError(f"snapshot {snapshot.resources_id!r} (version {snapshot.version}): {exc}")
        error = ErrorInfo.from_exception(exc)
        log.warning("rollout %s attempt %d failed: %s: %s", rollout_id, seq, error.type, error.message)

    # The trace (spans, LLM usage) is written with the outcome; the result gets the emitted rewards.
    written, result = trace.finish(attempt_status, result)
    status = store.finish_attempt(
        rollout_id, seq, attempt_status, next_status(rollout.config, seq, attempt_status, retryable),
        error=error, result=result, trace=written,
    )
    log_refused(store, rollout_id, seq, status, attempt_status)
    if status == "requeuing":
        raise recovery.retry_after_attempt(ctx, rollout, seq)
    if status == "failed" and error is not None:
        raise RolloutFailed(rollout_id, error.type, error.message)
    return {
        "rollout_id": rollout_id,
        "status": status,
        "resources_id": snapshot.resources_id,
        "version": snapshot.version,
        "reward": result.reward if result else None,
    }
