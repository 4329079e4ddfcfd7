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

An outcome is never thrown away for a Redis outage: the runner keeps it and records it once
Redis answers again (for up to ``outage_tolerance_seconds``), while the attempt keeps beating. An
attempt starts only with content read in the registry epoch Redis holds then
(:mod:`lightning_queue.storage.epoch`): after Redis lost its data, a snapshot re-added under an
id the cache holds is read again, never served from the old entry.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from lightning_queue.core import hooks
from lightning_queue.core.errors import (
    RegistryLostError,
    ResourcesNotFoundError,
    RolloutFailed,
    SnapshotCorruptedError,
)
from lightning_queue.core.models import ErrorInfo, Rollout, RolloutResult, is_rollout_id
from lightning_queue.core.policy import NextStatus, next_status
from lightning_queue.storage.connections import text
from lightning_queue.storage.registry import LATEST
from lightning_queue.storage.store import RolloutStore, StartWith
from lightning_queue.storage.traces import TraceWrite
from lightning_queue.worker import recovery
from lightning_queue.worker.agent import LitAgent, run_agent, snapshot_ref
from lightning_queue.worker.cache import Held
from lightning_queue.worker.context import WorkerContext

log = logging.getLogger(__name__)

RECORD_RETRY_PAUSE = 1.0
"""Seconds between two tries at recording an outcome while Redis is unreachable (each try itself
retries through the client's budget, ``LQ_REDIS_RETRY_SECONDS``)."""

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
    registry_epoch: str | None = None,
    traceparent: str | None = None,
) -> Outcome:
    """Run one rollout on this process. ``resources_id``/``resources_version`` are what the task
    message says the rollout asks for (Flower shows them; the worker uses them to resolve the
    snapshot from its cache before claiming); the rollout record is authoritative.
    ``registry_seq`` and ``registry_epoch`` are the registry state at enqueue: the snapshot cache
    must have caught up with it, in that registry, before it may answer without asking Redis.
    ``traceparent`` (the message's W3C trace context) is the parent of the attempt's root span.

    Raises :class:`RolloutFailed` when the rollout ends ``failed`` (so Celery and Flower show the
    task failed) and Celery's ``Retry`` when it is retried; returns the outcome otherwise.
    """
    store = ctx.store
    if not is_rollout_id(rollout_id):
        # Only a forged message can say so: such an id could address another rollout's keys.
        log.error("rollout id %r is not a valid rollout id; dropping the message", rollout_id)
        return {"rollout_id": rollout_id, "status": "invalid"}
    # The message says which snapshot the rollout asks for; when this process's cache holds it
    # (nearly always), the claim opens the attempt running with it: one round trip instead of
    # three (read the record, claim, start). The claim checks the record asks for the same
    # reference and the registry is still of the epoch the snapshot was read in; on a miss or a
    # mismatch the attempt opens preparing and the snapshot is resolved from the record below.
    start = None
    cached = ctx.peek_snapshot(resources_id or agent.default_resources or LATEST, resources_version, registry_seq,
                               registry_epoch or None)
    if cached is not None:
        start = StartWith(resources_id, resources_version, cached.snapshot.resources_id, cached.snapshot.version,
                          cached.epoch)
    claim = store.claim(rollout_id, worker_id, start)
    if claim.outcome == "missing":
        log.error("rollout %s: no such record (expired or deleted); dropping the message", rollout_id)
    if claim.outcome == "duplicate":
        log.warning("rollout %s: delivered again while attempt %d runs on a live worker; dropping this duplicate",
                    rollout_id, claim.sequence_id)
    if claim.outcome == "held":
        log.warning("rollout %s: delivered again while attempt %d may still run: its heartbeat lapsed during a "
                    "Redis outage; dropping this delivery (the watchdog sends the rollout again if that attempt "
                    "does not beat again)", rollout_id, claim.sequence_id)
    if claim.outcome != "claimed":
        return {"rollout_id": rollout_id, "status": claim.status or claim.outcome}
    assert claim.rollout is not None
    seq = claim.sequence_id
    with ctx.heartbeat.attempt(rollout_id, seq):
        return _run_attempt(ctx, agent, claim.rollout, seq, registry_seq, cached if claim.started else None,
                            registry_epoch or None, attempt_id=claim.attempt_id, worker_id=worker_id,
                            traceparent=traceparent)


def _start(ctx: WorkerContext, agent: LitAgent, rollout: Rollout, seq: int, registry_seq: int,
           registry_epoch: str | None, worker_id: str = "") -> Held | str:
    """Resolve the snapshot from the record and start attempt ``seq`` with it; return it, or the
    rollout's status when the attempt must not run (cancelled, superseded, or failed for a
    snapshot that is missing or corrupt)."""
    store = ctx.store
    rollout_id = rollout.rollout_id
    ref, version = snapshot_ref(rollout, agent)  # ref None: latest
    lost: RegistryLostError | None = None
    for _ in range(2):
        try:
            held = ctx.load(ref, version, registry_seq, registry_epoch)
        except (ResourcesNotFoundError, SnapshotCorruptedError) as exc:
            info = ErrorInfo.from_exception(exc, False)
            status = _record(ctx, rollout_id, seq, "failed", "failed", info, None)
            _finished(rollout, seq, status, ref, version, worker_id, None, info)
            if status == "failed":
                raise RolloutFailed(rollout_id, type(exc).__name__, str(exc)) from None
            return status
        try:
            if not store.start_attempt(rollout_id, seq, held.snapshot.resources_id, held.snapshot.version,
                                       held.epoch):
                return store.get_rollout(rollout_id).status
            return held
        except RegistryLostError as exc:
            # Read in another registry epoch than Redis holds now: (id, version) may name other
            # content there. Drop what the cache holds and read it again.
            log.error("rollout %s: %s", rollout_id, exc)
            if ctx.cache is not None:
                ctx.cache.drop(exc.current_epoch)
            registry_epoch, lost = None, exc
    # The registry changed under both reads (Redis lost its data twice in a row): fail this
    # attempt, retried per the policy, rather than run with content nobody can vouch for.
    assert lost is not None
    status = _record(ctx, rollout_id, seq, "failed", next_status(rollout.config, seq, "failed"),
                     ErrorInfo.from_exception(lost, with_traceback=False), None)
    if status == "requeuing":
        raise recovery.retry_after_attempt(ctx, rollout, seq)
    if status == "failed":
        raise RolloutFailed(rollout_id, type(lost).__name__, str(lost))
    return status


def _run_attempt(
    ctx: WorkerContext, agent: LitAgent, rollout: Rollout, seq: int, registry_seq: int,
    started: Held | None = None, registry_epoch: str | None = None, *, attempt_id: str = "",
    worker_id: str = "", traceparent: str | None = None,
) -> Outcome:
    """Run attempt ``seq`` (``attempt_id``) of ``rollout`` (the record as the claim left it).
    ``started``: the claim already opened the attempt running with this snapshot."""
    store = ctx.store
    rollout_id = rollout.rollout_id
    held = started
    if held is None:
        resolved = _start(ctx, agent, rollout, seq, registry_seq, registry_epoch, worker_id)
        if isinstance(resolved, str):
            return {"rollout_id": rollout_id, "status": resolved}
        held = resolved
    snapshot = held.snapshot
    # The agent sees the record as it now stands: running, on this attempt.
    rollout = rollout.model_copy(update={"status": "running"})
    hooks.on_start.fire(hooks.RolloutStarted(rollout_id, seq, snapshot.resources_id, snapshot.version, worker_id,
                                             rollout))

    # Tracing: the attempt's root span, under which the agent runs; ProxyLLMs scoped to the attempt.
    trace = ctx.tracing.start(rollout, seq, attempt_id, snapshot, worker_id, traceparent)
    outcome = run_agent(agent, rollout, snapshot,
                        rollout.config.timeout_seconds or ctx.settings.default_timeout_seconds,
                        resources=trace.scope(snapshot.resources), context=trace.active())
    attempt_status, result, error = outcome.status, outcome.result, outcome.error
    if attempt_status == "failed" and error is not None:
        log.warning("rollout %s attempt %d failed: %s: %s", rollout_id, seq, error.type, error.message)

    # The trace (spans, LLM usage) is written with the outcome; the result gets the emitted rewards.
    written, result = trace.finish(attempt_status, result)
    status = _record(ctx, rollout_id, seq, attempt_status,
                     next_status(rollout.config, seq, attempt_status, outcome.retryable), error, result, written)
    log_refused(store, rollout_id, seq, status, attempt_status)
    _finished(rollout, seq, status, snapshot.resources_id, snapshot.version, worker_id,
              result.reward if result else None, error)
    if status == "requeuing":
        raise recovery.retry_after_attempt(ctx, rollout, seq, registry_epoch or held.epoch)
    if status == "failed" and error is not None:
        raise RolloutFailed(rollout_id, error.type, error.message)
    return {
        "rollout_id": rollout_id,
        "status": status,
        "resources_id": snapshot.resources_id,
        "version": snapshot.version,
        "reward": result.reward if result else None,
    }


def _finished(rollout: Rollout, seq: int, status: str, resources_id: str | None, version: int | None,
              worker_id: str, reward: float | None, error: ErrorInfo | None) -> None:
    """Fire ``on_success``/``on_failure`` when the rollout reached that final status (a retried
    or refused attempt fires nothing)."""
    hook = hooks.on_success if status == "succeeded" else hooks.on_failure if status == "failed" else None
    if hook is None:
        return
    hook.fire(hooks.RolloutFinished(
        rollout.rollout_id, status, seq, resources_id, version, worker_id, reward,
        f"{error.type}: {error.message}" if error is not None else None,
        rollout.model_copy(update={"status": status})))


def _record(
    ctx: WorkerContext, rollout_id: str, seq: int, attempt_status: str, decided: NextStatus,
    error: ErrorInfo | None, result: RolloutResult | None, trace: TraceWrite | None = None,
) -> str:
    """:meth:`RolloutStore.finish_attempt`, riding out a Redis outage: the outcome is kept and
    recorded once Redis answers again, for up to ``settings.outage_tolerance_seconds``, while the
    attempt keeps beating (a redelivery of its message meanwhile is dropped as a duplicate).
    Returns the status."""
    deadline = time.monotonic() + ctx.settings.outage_tolerance_seconds
    warned = False
    while True:
        try:
            return ctx.store.finish_attempt(rollout_id, seq, attempt_status, decided, error=error, result=result,
                                            trace=trace)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise
            if not warned:
                log.warning("rollout %s attempt %d: Redis is unreachable (%s); keeping its outcome (%s) and "
                            "recording it when Redis is back", rollout_id, seq, exc, attempt_status)
                warned = True
            time.sleep(min(RECORD_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
