"""The Trainer: runs an algorithm against the fleet (``fit``), or an agent inline (``dev``).

``fit`` is the algorithm side only: the agent runs on Celery workers started elsewhere
(``lightning-queue worker --agent module:attr``), which the Trainer can wait for
(``n_runners``). ``dev`` needs neither workers nor Redis: it runs the agent in this
process, rollout after rollout, with the rules a worker applies (which snapshot a rollout
runs with, how resources are injected, how a return value or an exception becomes the
outcome, when a failed attempt is retried), so what works in ``dev`` works on the fleet.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Generic

from lightning_queue.client import LightningClient
from lightning_queue.core.errors import (
    ConfigurationError,
    NoRunnersError,
    ResourcesNotFoundError,
    RunConflictError,
    SnapshotCorruptedError,
)
from lightning_queue.core.models import (
    ErrorInfo,
    Resource,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    validate_resources,
)
from lightning_queue.core.policy import next_status
from lightning_queue.core.settings import Settings
from lightning_queue.storage.registry import LATEST
from lightning_queue.training.algorithm import Algorithm, ResultT, TrainingRun
from lightning_queue.training.datasets import Dataset, DatasetLike
from lightning_queue.worker.agent import LitAgent, run_agent, snapshot_ref

log = logging.getLogger(__name__)

DEV_RESOURCES_ID = "dev"
"""The id a snapshot given to :meth:`Trainer.dev` as a plain mapping runs under."""

RUNNERS_POLL_SECONDS = 0.5

# Snapshot ids allow 128 characters; a run's are "{run_name}-<12 hex digits>".
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,114}")


class Trainer(Generic[ResultT]):
    """Runs an :class:`Algorithm` against the fleet, or an agent inline for debugging.

    ``client`` (or ``settings``; default: ``LQ_*`` from the environment) is made on first
    use, so :meth:`dev` with a resources mapping never touches Redis. ``run_name`` names
    the run's snapshots, rollouts and state: a Trainer given the name of a run that
    stopped (a crash, a time-out) resumes it; default: a fresh name. ``n_runners``: before
    the algorithm starts, wait up to ``runners_timeout`` seconds until workers with at
    least that many rollout slots consume the queue (0: do not wait). Each evaluation's
    rollouts must finish within ``rollout_timeout`` seconds; ``rollout_config`` is their
    time limit and retry policy.
    """

    def __init__(
        self,
        algorithm: Algorithm[ResultT] | None = None,
        *,
        n_runners: int = 0,
        client: LightningClient | None = None,
        settings: Settings | None = None,
        run_name: str | None = None,
        rollout_config: RolloutConfig | None = None,
        rollout_timeout: float = 3600.0,
        runners_timeout: float = 60.0,
        queue: str | None = None,
        on_finished: Callable[[Rollout], None] | None = None,
    ) -> None:
        if n_runners < 0:
            raise ConfigurationError(f"n_runners must be 0 or more, got {n_runners}")
        self.algorithm = algorithm
        self.n_runners = n_runners
        self._client = client
        self._owns_client = client is None
        self.settings = client.settings if client is not None else (settings or Settings())
        self.run_name = run_name or f"{(algorithm.name if algorithm else 'run').lower()}-{uuid.uuid4().hex[:8]}"
        if not _RUN_NAME.fullmatch(self.run_name):
            raise ConfigurationError(
                f"invalid run_name {self.run_name!r}: use 1-115 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit (the run's snapshot ids are its name and 13 more characters)"
            )
        self.rollout_config = rollout_config or RolloutConfig()
        self.rollout_timeout = rollout_timeout
        self.runners_timeout = runners_timeout
        self.queue = queue
        self.on_finished = on_finished
        self.last_run: TrainingRun | None = None

    @property
    def client(self) -> LightningClient:
        if self._client is None:
            self._client = LightningClient(self.settings)
        return self._client

    def close(self) -> None:
        """Close the client if this Trainer made it."""
        if self._client is not None and self._owns_client:
            self._client.close()
            self._client = None

    def __enter__(self) -> Trainer[ResultT]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fit ------------------------------------------------------------------------------

    def fit(self, agent: LitAgent | None, train: DatasetLike, val: DatasetLike | None = None) -> ResultT:
        """Run the algorithm on ``train`` (and ``val``; default: ``train``) against the fleet and
        return what it found.

        ``agent`` is the agent the workers run: its ``default_resources`` (else ``latest``) is the
        pointer the run starts from and promotes to, unless the algorithm is told otherwise; it
        is not run here. The run's statistics (time waiting on the fleet, rollouts) are in
        ``trainer.last_run.stats``. Raises :class:`NoRunnersError` when ``n_runners`` slots do not
        show up in time, :class:`RunConflictError` when ``run_name`` belongs to a run of another
        algorithm, and whatever the algorithm raises (a time-out leaves the run resumable).
        """
        if self.algorithm is None:
            raise ConfigurationError("this Trainer has no algorithm to fit: make it with Trainer(algorithm=...)")
        train_set = Dataset.of(train, name="train")
        val_set = Dataset.of(val, name="val") if val is not None else train_set
        if self.n_runners:
            self.wait_for_runners()
        run = TrainingRun(self.client, self.run_name, agent=agent, config=self.rollout_config,
                          rollout_timeout=self.rollout_timeout, queue=self.queue, on_finished=self.on_finished)
        recorded = run.state.set_once("algorithm", self.algorithm.name)
        if recorded != self.algorithm.name:
            raise RunConflictError(self.run_name, f"algorithm {recorded}", f"algorithm {self.algorithm.name}")
        self.last_run = run
        try:
            return self.algorithm.run(run, train_set, val_set)
        finally:
            run.stats.stop()

    def runner_slots(self) -> int:
        """Rollout slots (worker processes) of live, consuming workers that take the queue."""
        queue = self.client.publisher.queue_for(self.queue)
        return sum(h.concurrency for h in self.client.worker_health()
                   if not h.stalled and queue in (h.consuming or h.queues))

    def wait_for_runners(self) -> int:
        """Wait until at least ``n_runners`` slots take the queue; return how many there are.

        Workers record themselves every sweep interval (``LQ_HEARTBEAT_INTERVAL``), so a worker
        that just started is seen within one. Raises :class:`NoRunnersError` after ``runners_timeout``.
        """
        deadline = time.monotonic() + self.runners_timeout
        while True:
            slots = self.runner_slots()
            if slots >= self.n_runners:
                return slots
            if time.monotonic() >= deadline:
                raise NoRunnersError(self.client.publisher.queue_for(self.queue), self.n_runners, slots,
                                     self.runners_timeout)
            # No event announces a new worker: its health record is the only sign, so look again.
            time.sleep(min(RUNNERS_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    # -- dev ------------------------------------------------------------------------------

    def dev(
        self,
        agent: LitAgent,
        inputs: DatasetLike,
        resources: Mapping[str, Resource | Mapping[str, Any]] | ResourcesUpdate | str | None = None,
        *,
        mode: RolloutMode | None = "train",
        config: RolloutConfig | None = None,
    ) -> list[Rollout]:
        """Run ``agent`` on each input in this process, one after the other, and return the
        finished rollouts (in input order), as a worker would have recorded them.

        ``resources`` is what the rollouts run with:

        * a mapping of named resources (or a :class:`ResourcesUpdate`): that snapshot; Redis is
          not used at all;
        * a snapshot id or pointer name: resolved once, now, as ``enqueue_rollouts`` pins it;
        * ``None``: what the agent's ``default_resources`` (else ``latest``) names when each
          rollout starts, as a worker resolves an unpinned rollout.

        The worker's rules apply: resources are injected by parameter, the return value is
        normalized (``RolloutResult``), an exception fails the attempt with the error recorded
        on the rollout (nothing is raised), a missing snapshot fails the rollout, and a failed
        attempt is retried while ``config.max_attempts`` allows, at once (no backoff).
        """
        config = config or self.rollout_config
        local: ResourcesUpdate | None = None
        if isinstance(resources, ResourcesUpdate):
            local = resources
        elif isinstance(resources, Mapping):
            now = time.time()
            local = ResourcesUpdate(resources_id=DEV_RESOURCES_ID, version=1, create_time=now, update_time=now,
                                    resources=validate_resources(resources))
        pinned: tuple[str, int] | None = None
        if local is not None:
            pinned = (local.resources_id, local.version)
        elif isinstance(resources, str):
            found = self.client.registry.fetch(resources).snapshot
            pinned = (found.resources_id, found.version)
        worker_id = f"dev@{socket.gethostname()}:{os.getpid()}"
        out = []
        for example in Dataset.of(inputs):
            rollout = Rollout(
                input=example.input, mode=mode, config=config,
                resources_id=pinned[0] if pinned else None, resources_version=pinned[1] if pinned else None,
                resolve="pinned" if pinned else "following", metadata={"input_id": example.id},
            )
            out.append(self._dev_rollout(agent, rollout, local, worker_id))
        return out

    def _dev_rollout(self, agent: LitAgent, rollout: Rollout, local: ResourcesUpdate | None, worker_id: str) -> Rollout:
        """One rollout through its attempts, as the runner and the policy take it."""
        fields: dict[str, Any] = {"start_time": time.time()}
        seq = 0
        while True:
            seq += 1
            fields["attempt_count"] = seq
            ref, version = snapshot_ref(rollout, agent)
            try:
                snapshot = local if local is not None else self.client.registry.fetch(ref or LATEST, version).snapshot
            except (ResourcesNotFoundError, SnapshotCorruptedError) as exc:
                fields.update(status="failed", error=ErrorInfo.from_exception(exc, with_traceback=False),
                              end_time=time.time())
                return rollout.model_copy(update=fields)
            running = rollout.model_copy(update={**fields, "status": "running"})
            outcome = run_agent(agent, running, snapshot, _time_limit(rollout.config, self.settings))
            status = next_status(rollout.config, seq, outcome.status, outcome.retryable)
            if outcome.error is not None:
                log.warning("dev rollout %s attempt %d on %s: %s: %s", rollout.rollout_id, seq, worker_id,
                            outcome.error.type, outcome.error.message)
            if status == "requeuing":
                fields["error"] = outcome.error
                continue
            fields.update(status=status, end_time=time.time(), result=outcome.result)
            fields["error"] = outcome.error if status == "failed" else None
            return rollout.model_copy(update=fields)


def _time_limit(config: RolloutConfig, settings: Settings) -> float | None:
    """The soft time limit a worker would give the rollout (only named in messages here: dev
    mode runs the agent in this thread and does not interrupt it)."""
    return config.timeout_seconds or settings.default_timeout_seconds
