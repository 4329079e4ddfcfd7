"""Recovery: every path that sends a rollout back to the queue, in one place.

An attempt that ended without finishing its rollout leaves it ``requeuing`` (the retry
policy, :mod:`lightning_queue.core.policy`, decided so); :func:`requeue` sends it again: at
once when the policy sets no backoff, else through the retry schedule
(:class:`~lightning_queue.storage.pending.PendingIndex`), which every worker's fleet duties
empty as retries fall due (:func:`send_due_retries`). No retry waits in an ETA message held
by a worker. The attempts end that way by four routes:

* the agent failed or timed out (soft limit) in the runner: :func:`retry_after_attempt`;
* the agent ignored its soft limit and the pool process was killed (hard limit), seen by
  the worker's main process: :func:`record_hard_timeout`;
* the attempt stopped heartbeating (hung, stopped, or its worker vanished), found by any
  worker's sweep: :func:`sweep_unresponsive`;
* the pool process running it died (SIGKILL, OOM), seen by the worker's main process:
  :func:`release_lost` drops its heartbeat so the message Celery redelivers at once claims
  the next attempt (the claim closes the lost one, :meth:`RolloutStore.claim`).

A task message lost anyway (a Redis restart between two writes, a worker killed between
taking a message and recording it, a message deleted, a client killed between writing its
records and publishing) is found by the reaper, :func:`reap`: a waiting rollout whose message
is nowhere to be found twice in a row is sent again. The claim lets only one delivery run, so
a message sent twice is harmless.

If a requeue's publish fails, the rollout stays ``requeuing`` and the error is logged: the
reaper sends it once its message is found missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis
from celery.exceptions import Reject, Retry

from lightning_queue.core.errors import MessageLostError, PublishError, RolloutNotFoundError
from lightning_queue.core.models import WAITING_STATUSES, ErrorInfo, Rollout
from lightning_queue.core.policy import next_status, retry_delay
from lightning_queue.storage.pending import Found, PendingEntry
from lightning_queue.worker.context import WorkerContext

log = logging.getLogger(__name__)

REAP_LIMIT = 500
"""Due pending entries one reaper sweep takes (the rest wait for the next sweep, or another worker's)."""
RECHECK_GRACES = 20
"""A message found is looked for again after the rollout's age, at most this many graces later."""


def requeue(ctx: WorkerContext, rollouts: Sequence[tuple[Rollout, int]], registry_epoch: str | None = None
            ) -> list[str]:
    """Send again each rollout whose attempt ``seq`` just ended ``requeuing``, after the
    policy's backoff for that attempt, stamped with ``registry_epoch`` (default: the one this
    process knows). Returns the ids that could not be sent or scheduled (logged, not raised:
    the reaper sends them once their message is found missing)."""
    planned = [(rollout, retry_delay(rollout.config, seq)) for rollout, seq in rollouts]
    return _requeue(ctx, planned, registry_epoch)


def _requeue(ctx: WorkerContext, planned: Sequence[tuple[Rollout, float]], registry_epoch: str | None = None
             ) -> list[str]:
    now = time.time()
    later = {rollout.rollout_id: now + delay for rollout, delay in planned if delay > 0}
    at_once = [rollout for rollout, delay in planned if delay <= 0]
    failed: list[str] = []
    if later:
        try:
            ctx.store.pending.schedule_retries(later)
        except redis.RedisError as exc:
            failed += later
            log.error("rollouts %s: could not schedule their retries (%s)", ", ".join(later), exc)
    if at_once:
        try:
            ctx.publisher.publish(at_once, registry_epoch=registry_epoch or ctx.store.epoch.known or "")
        except PublishError as exc:
            failed += exc.rollout_ids
            log.error("rollouts %s: could not publish their retries (%s)", ", ".join(exc.rollout_ids), exc.cause)
    return failed


def retry_after_attempt(ctx: WorkerContext, rollout: Rollout, seq: int, registry_epoch: str | None = None) -> Retry:
    """The runner's attempt ended ``requeuing``: send (or schedule) the retry and return the
    ``Retry`` the task raises, so Celery (and Flower) show the task as retried and ack its message.
    If the retry could not be published, the running message itself goes back to the queue
    instead (``Reject(requeue=True)``, raised here): its next delivery claims the next attempt
    at once, without the backoff, rather than leaving the rollout with no message at all."""
    delay = retry_delay(rollout.config, seq)
    if _requeue(ctx, [(rollout, delay)], registry_epoch):
        raise Reject(f"the retry of rollout {rollout.rollout_id} could not be published", requeue=True)
    return Retry(f"attempt {seq} of rollout {rollout.rollout_id} is retried", when=delay)


def record_hard_timeout(ctx: WorkerContext, rollout_id: str, exc: BaseException) -> None:
    """The agent ignored its soft time limit and its process was killed: record the attempt as
    timed out and requeue the rollout if the policy allows another attempt."""
    try:
        rollout = ctx.store.get_rollout(rollout_id)
    except RolloutNotFoundError:
        return
    if rollout.is_finished or rollout.attempt_count == 0:
        return
    seq = rollout.attempt_count
    error = ErrorInfo(
        type="TimeLimitExceeded",
        message=f"the agent ignored its soft time limit and its process was killed ({exc})",
    )
    status = ctx.store.finish_attempt(rollout_id, seq, "timeout", next_status(rollout.config, seq, "timeout"),
                                      error=error)
    if status == "requeuing":
        requeue(ctx, [(rollout, seq)])
    elif status == "stale":
        log.warning("rollout %s attempt %d: hard time-out not recorded, the attempt was already closed",
                    rollout_id, seq)


def release_lost(ctx: WorkerContext, rollout_id: str, worker_id: str) -> None:
    """The pool process of ``worker_id`` running the rollout died: drop its attempt's
    heartbeat so the redelivered message claims the rollout at once (as ``worker_lost``)
    instead of being dropped as a duplicate until the heartbeat expires. Errors are logged:
    the sweep still recovers the attempt once its heartbeat expires."""
    try:
        ctx.store.release_lost(rollout_id, worker_id)
    except Exception as exc:  # noqa: BLE001 - the sweep is the fallback
        log.warning("rollout %s: could not release the lost attempt (%s)", rollout_id, exc)


def sweep_unresponsive(ctx: WorkerContext, limit: int = 100) -> list[tuple[str, str, int]]:
    """Close attempts whose heartbeat expired as ``unresponsive`` and publish again the
    rollouts the policy retries; return what moved, as :meth:`RolloutStore.close_unresponsive`
    (which holds off for one heartbeat timeout after an outage of the whole fleet's sweeps:
    ``settings.sweep_outage_seconds``, the context's store was made with)."""
    moved = ctx.store.close_unresponsive(limit)
    for rollout_id, status, seq in moved:
        log.warning(
            "rollout %s attempt %d sent no heartbeat for %g s: marked unresponsive, rollout %s",
            rollout_id, seq, ctx.store.heartbeat_timeout, "requeued" if status == "requeuing" else "failed",
        )
    requeued = {rid: seq for rid, status, seq in moved if status == "requeuing"}
    if requeued:
        requeue(ctx, [(r, requeued[r.rollout_id]) for r in ctx.store.get_rollouts(list(requeued))])
    return moved


def send_due_retries(ctx: WorkerContext, limit: int = REAP_LIMIT) -> list[str]:
    """Send the retries whose backoff is over (taken out of the retry schedule atomically, so
    concurrent workers send distinct ones); returns the ids sent. If the publish fails they
    stay requeuing with their pending entries, and the reaper sends them."""
    taken = ctx.store.pending.take_due_retries(limit=limit)
    if not taken:
        return []
    rollouts = [r for r in ctx.store.read_rollouts(taken) if r is not None and r.status in WAITING_STATUSES]
    try:
        ctx.publisher.publish(rollouts, registry_epoch=ctx.store.epoch.known or "")
    except PublishError as exc:
        log.error("rollouts %s: could not publish their due retries (%s); the reaper will send them",
                  ", ".join(exc.rollout_ids), exc.cause)
        return []
    return [r.rollout_id for r in rollouts]


@dataclass
class Reaped:
    """What one :func:`reap` sweep did, by rollout id."""

    looked: int = 0
    missing: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def next_look(age: float, grace: float) -> float:
    """Seconds until a message found is looked for again: the rollout's age, at least one grace
    and at most :data:`RECHECK_GRACES` graces (so a rollout waiting long in a backlog is looked
    at ever less often)."""
    return min(max(grace, age), RECHECK_GRACES * grace)


def reap(ctx: WorkerContext, limit: int = REAP_LIMIT) -> Reaped:
    """One reaper sweep (see :mod:`lightning_queue.storage.pending`): look for the task messages
    of the due pending entries; send again those found missing twice in a row, and fail with
    :class:`MessageLostError` a rollout whose message went missing ``settings.message_resends``
    times. Safe when several workers sweep at once (leased entries)."""
    pending = ctx.store.pending
    grace = pending.grace
    now = time.time()
    lease_end = now + grace
    entries = pending.lease(now, lease_end, limit)
    done = Reaped(looked=len(entries))
    if not entries:
        return done
    found = pending.find_messages({e.rollout_id: e.queue or ctx.settings.queue for e in entries
                                   if e.retry_due is None})
    outcomes: list[tuple[str, float, Found]] = []
    again: list[PendingEntry] = []
    for entry in entries:
        rid = entry.rollout_id
        if entry.retry_due is not None:  # its message is sent when the retry is due: look a grace after
            outcomes.append((rid, max(now, entry.retry_due) + grace, "present"))
        elif rid in found:
            outcomes.append((rid, now + next_look(now - entry.enqueue_time, grace), "present"))
        elif entry.missing_since is None:
            outcomes.append((rid, now + grace / 2, "missing"))
            done.missing.append(rid)
        elif entry.resends >= ctx.settings.message_resends:
            error = ErrorInfo.from_exception(MessageLostError(entry.resends), with_traceback=False)
            if ctx.store.terminate(rid, "failed", error) == "failed":
                log.error("rollout %s: its task message went missing %d times; failed it", rid, entry.resends)
                done.failed.append(rid)
        else:
            again.append(entry)
    if again:
        outcomes += _resend(ctx, again, now, done)
    pending.settle(lease_end, outcomes, now)
    return done


def _resend(
    ctx: WorkerContext, entries: Sequence[PendingEntry], now: float, done: Reaped
) -> list[tuple[str, float, Found]]:
    grace = ctx.store.pending.grace
    rollouts = [r for r in ctx.store.read_rollouts([e.rollout_id for e in entries])
                if r is not None and r.status in WAITING_STATUSES]
    if not rollouts:
        return []
    try:
        seq = int(ctx.redis.get(ctx.settings.keys.seq) or 0)
        ctx.publisher.publish(rollouts, seq, registry_epoch=ctx.store.epoch.known or "")
    except PublishError as exc:
        log.error("could not send again the missing task messages of %d rollouts (%s)", len(rollouts), exc.cause)
        return [(r.rollout_id, now + grace / 2, "missing") for r in rollouts]
    for rollout in rollouts:
        log.warning("rollout %s (%s): its task message was found nowhere twice (queue %s, unacked messages, retry "
                    "schedule); sent it again", rollout.rollout_id, rollout.status, rollout.queue)
        done.resent.append(rollout.rollout_id)
    return [(r.rollout_id, now + grace, "resent") for r in rollouts]
