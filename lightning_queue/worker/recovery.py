"""Recovery: every path that sends a rollout back to the queue, in one place.

An attempt that ended without finishing its rollout leaves it ``requeuing`` (the retry
policy, :mod:`lightning_queue.core.policy`, decided so); :func:`requeue` publishes it
again after the policy's backoff. The attempts end that way by four routes:

* the agent failed or timed out (soft limit) in the runner: :func:`retry_after_attempt`;
* the agent ignored its soft limit and the pool process was killed (hard limit), seen by
  the worker's main process: :func:`record_hard_timeout`;
* the attempt stopped heartbeating (hung, stopped, or its worker vanished), found by any
  worker's sweep: :func:`sweep_unresponsive`;
* the pool process running it died (SIGKILL, OOM), seen by the worker's main process:
  :func:`release_lost` drops its heartbeat so the message Celery redelivers at once claims
  the next attempt (the claim closes the lost one, :meth:`RolloutStore.claim`).

If the requeue's publish fails, the rollout stays ``requeuing`` and the error is logged:
the rollout's own message is still unacked, and the broker redelivers it after its
visibility timeout, when the claim opens the next attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery.exceptions import Reject, Retry

from lightning_queue.core.errors import PublishError, RolloutNotFoundError
from lightning_queue.core.models import ErrorInfo, Rollout
from lightning_queue.core.policy import next_status, retry_delay
from lightning_queue.worker.context import WorkerContext

log = logging.getLogger(__name__)


def requeue(ctx: WorkerContext, rollouts: Sequence[tuple[Rollout, int]], registry_epoch: str | None = None
            ) -> list[str]:
    """Publish again each rollout whose attempt ``seq`` just ended ``requeuing``, after the
    policy's backoff for that attempt, stamped with ``registry_epoch`` (default: the one this
    process knows). Returns the ids whose publish failed (logged, not raised: see above)."""
    failed = []
    epoch = registry_epoch or ctx.store.epoch.known or ""
    for rollout, seq in rollouts:
        delay = retry_delay(rollout.config, seq)
        try:
            ctx.publisher.publish([rollout], countdown=delay or None, registry_epoch=epoch)
        except PublishError as exc:
            failed.append(rollout.rollout_id)
            log.error("rollout %s: could not publish its retry (%s)", rollout.rollout_id, exc.cause)
    return failed


def retry_after_attempt(ctx: WorkerContext, rollout: Rollout, seq: int, registry_epoch: str | None = None) -> Retry:
    """The runner's attempt ended ``requeuing``: publish the retry and return the ``Retry``
    the task raises, so Celery (and Flower) show the task as retried and ack its message.
    If the retry could not be published, the running message itself goes back to the queue
    instead (``Reject(requeue=True)``, raised here): its next delivery claims the next attempt
    at once, without the backoff, rather than leaving the rollout with no message at all."""
    if requeue(ctx, [(rollout, seq)], registry_epoch):
        raise Reject(f"the retry of rollout {rollout.rollout_id} could not be published", requeue=True)
    return Retry(f"attempt {seq} of rollout {rollout.rollout_id} is retried", when=retry_delay(rollout.config, seq))


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
