"""The worker's Celery tasks: ``lightning_queue.rollout`` (one rollout) and
``lightning_queue.retention`` (the retention policy, for ``celery beat``).

The task classes also handle what happens outside the task body, in the worker's main
process: the time limits (the hard one from this worker's grace), a hard time limit that
killed the agent, a pool process that died, and a cancel whose SIGTERM the agent ignores.
"""

from __future__ import annotations

import logging
import os
import signal as signals
import threading
from typing import Any

import psutil
import redis
from billiard.einfo import ExceptionInfo
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import Task
from celery.exceptions import Reject
from celery.platforms import signals as celery_signals
from celery.worker.request import Request

from lightning_queue.core.errors import RolloutFailed
from lightning_queue.core.keys import RETENTION_TASK, ROLLOUT_TASK
from lightning_queue.storage.retention import apply_retention
from lightning_queue.worker import recovery, runner
from lightning_queue.worker.app import WorkerApp

log = logging.getLogger(__name__)

SCHEDULE_ENTRY = "lightning-queue-retention"


class RolloutTaskRequest(Request):  # type: ignore[misc]  # Celery ships no type information
    """The worker's main process's view of one rollout message.

    When the pool process running it dies (SIGKILL, OOM), Celery requeues the
    message at once; the attempt's heartbeat is dropped first, so the
    redelivery claims the rollout (marking the attempt ``worker_lost``)
    instead of being dropped as a duplicate of an attempt that seems alive.

    Time limits: the message's ``timelimit`` header is written by the enqueuing client. The soft
    limit is the rollout's (its config or the client's default); the hard limit is computed here,
    from it and *this worker's* ``hard_timeout_grace_seconds``, so a worker's grace holds whatever
    the client's settings were.

    Cancel: ``revoke(terminate=True)`` sends the pool process SIGTERM. An agent that ignores it
    would keep the slot busy until it ends; after the same grace, if the process still runs this
    rollout, it gets SIGKILL (and the pool replaces it).
    """

    _header_limits: Any = (None, None)

    @property
    def time_limits(self) -> tuple[float | None, float | None]:
        hard, soft = self._header_limits or (None, None)
        if soft:
            hard = soft + self.task.app.settings.hard_timeout_grace_seconds
        return hard, soft

    @time_limits.setter
    def time_limits(self, value: Any) -> None:
        self._header_limits = value

    def terminate(self, pool: Any, signal: Any = None) -> None:
        pid, job = self.worker_pid, self._apply_result() if self._apply_result is not None else None
        super().terminate(pool, signal)
        if pid is None or job is None or celery_signals.signum(signal or "TERM") == signals.SIGKILL:
            return
        try:
            process = psutil.Process(pid)  # remembers the process, not just its pid (which may be reused)
        except psutil.Error:
            return
        grace = self.task.app.settings.hard_timeout_grace_seconds
        timer = threading.Timer(grace, _kill_if_still_running, (process, job, self.id, grace))
        timer.daemon = True
        timer.start()

    def on_failure(self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info, "exception", None)
        if isinstance(exc, WorkerLostError) or isinstance(getattr(exc, "exc", None), WorkerLostError):
            rollout_id = (self.kwargs or {}).get("rollout_id") or self.id
            app: WorkerApp = self.task.app
            recovery.release_lost(app.context, rollout_id, self.hostname)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def _kill_if_still_running(process: psutil.Process, job: Any, task_id: str, grace: float) -> None:
    """The cancel's grace is over: SIGKILL the pool process if it still runs that job."""
    try:
        if job.ready() or not process.is_running():
            return
        log.warning("rollout %s: its agent ignored SIGTERM for %g s after the cancel; killing pool process %d",
                    task_id, grace, process.pid)
        process.kill()
    except psutil.Error:
        pass  # gone meanwhile


class RolloutTask(Task):  # type: ignore[misc]
    """Base class of the rollout task."""

    Request = RolloutTaskRequest
    acks_late = True
    reject_on_worker_lost = True
    typing = True
    # An expected outcome: Flower shows the task failed, the worker logs no traceback.
    throws = (RolloutFailed,)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # A hard time limit kills the child process; this runs in the worker's main process.
        if isinstance(exc, TimeLimitExceeded):
            app: WorkerApp = self.app
            recovery.record_hard_timeout(app.context, kwargs.get("rollout_id") or task_id, exc)


def run_rollout(
    task: RolloutTask,
    rollout_id: str,
    resources_id: str | None = None,
    resources_version: int | None = None,
    registry_seq: int = 0,
    registry_epoch: str = "",
) -> runner.Outcome:
    """The ``lightning_queue.rollout`` task: :func:`lightning_queue.worker.runner.run` on this
    process's context, with the worker's agent."""
    app: WorkerApp = task.app
    worker_id = task.request.hostname or f"pid-{os.getpid()}"
    traceparent = getattr(task.request, "traceparent", None)  # a message header: the enqueuer's span
    try:
        return runner.run(app.context, app.agent, worker_id, rollout_id, registry_seq, resources_id, resources_version,
                          registry_epoch or None, traceparent if isinstance(traceparent, str) else None)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Redis stayed unreachable through the retry budget: give the message back so the
        # rollout runs again once Redis is back, instead of acking it unrecorded.
        log.error("rollout %s: lost the connection to Redis (%s); requeuing the message", rollout_id, exc)
        raise Reject(str(exc), requeue=True) from exc


def run_retention(task: Task, keep: int | None = None, dry_run: bool = False) -> dict[str, Any]:
    """The ``lightning_queue.retention`` task: apply the policy with ``settings.gc_keep``
    (or ``keep``) and log the summary."""
    app: WorkerApp = task.app
    ctx = app.context
    report = apply_retention(ctx.registry, ctx.store, ctx.settings.gc_keep if keep is None else keep, dry_run)
    log.info("%s", report.summary())
    if report.skipped:
        log.info("retention skipped: %s", report.skipped)
    return report.as_dict()


def register_tasks(app: WorkerApp) -> None:
    """Register both tasks on ``app`` and, when ``gc_interval_seconds`` is set, schedule
    retention in ``app.conf.beat_schedule`` (run by ``celery beat`` or ``worker -B``). A
    retention run that no worker took before the next one is due expires: runs never pile up."""
    app.task(bind=True, base=RolloutTask, name=ROLLOUT_TASK)(run_rollout)
    app.task(bind=True, name=RETENTION_TASK, ignore_result=True)(run_retention)
    interval = app.settings.gc_interval_seconds
    if interval:
        app.conf.beat_schedule = {
            **(app.conf.beat_schedule or {}),
            SCHEDULE_ENTRY: {"task": RETENTION_TASK, "schedule": interval, "options": {"expires": interval}},
        }
