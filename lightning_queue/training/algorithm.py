"""The algorithm side of training: an :class:`Algorithm` and the :class:`TrainingRun` it works in.

An algorithm decides what to try; the run it is handed does everything that touches the
fleet: it enqueues a batch of rollouts pinned to snapshots, waits for them by
notification, and keeps the run's progress in Redis so that a new process with the same
run name resumes where the last one stopped. Every rollout a run enqueues is idempotent
(its id derives from the run name, the snapshot and the input id), so a resumed run never
runs a finished evaluation again: asking for it returns the stored rollout.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from lightning_queue.client import LightningClient
from lightning_queue.core.errors import RunConflictError, TrainingTimeoutError
from lightning_queue.core.models import (
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutRequest,
    idempotent_rollout_id,
)
from lightning_queue.storage.connections import text
from lightning_queue.storage.registry import LATEST
from lightning_queue.training.datasets import Dataset, Example
from lightning_queue.worker.agent import LitAgent

ResultT = TypeVar("ResultT")


class Algorithm(ABC, Generic[ResultT]):
    """An optimization strategy the :class:`~lightning_queue.training.Trainer` runs against the fleet.

    Implement :meth:`run`. Do every evaluation through ``run.evaluate`` (pinned,
    idempotent rollouts, timed as fleet work) and keep whatever must survive a crash in
    ``run.state``; snapshots and pointers go through ``run.client``. What :meth:`run`
    returns is what ``Trainer.fit`` returns.
    """

    @abstractmethod
    def run(self, run: TrainingRun, train: Dataset, val: Dataset) -> ResultT:
        """Optimize on ``train``, judge on ``val``; return what was found."""

    @property
    def name(self) -> str:
        """Recorded with the run: a run name cannot be resumed by another algorithm."""
        return type(self).__name__


@dataclass(frozen=True)
class Evaluation:
    """One snapshot on some examples: a part of a batch :meth:`TrainingRun.evaluate` enqueues.

    ``tag`` separates evaluations that must not share rollouts (e.g. the round of a
    training minibatch); evaluations with the same snapshot, mode, tag and input share one
    rollout, run once.
    """

    snapshot: ResourcesUpdate
    examples: Sequence[Example]
    mode: RolloutMode = "val"
    tag: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RunStats:
    """Where a run's time went and how many rollouts it used, in this process.

    ``fleet_seconds`` is the time spent enqueuing and waiting for rollouts; the rest of
    ``wall_seconds`` is the algorithm's own work (critic calls, statistics, snapshot writes).
    """

    started: float = field(default_factory=time.monotonic)
    fleet_seconds: float = 0.0
    rollouts_created: int = 0
    rollouts_reused: int = 0
    batches: int = 0
    wall_seconds: float = 0.0

    @property
    def own_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.fleet_seconds)

    @property
    def fleet_share(self) -> float:
        """The share of the wall time spent waiting on the fleet (0..1)."""
        return self.fleet_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def stop(self) -> RunStats:
        self.wall_seconds = time.monotonic() - self.started
        return self


class RunState:
    """A run's progress, kept in one Redis hash (``{p}:training:{run}``): field -> JSON value.

    Each :meth:`set` is one HSET, so the fields it writes change together or not at all.
    """

    def __init__(self, client: LightningClient, run: str) -> None:
        self.redis = client.redis
        self.key = client.keys.training_run(run)

    def get(self, name: str, default: Any = None) -> Any:
        raw = self.redis.hget(self.key, name)
        return default if raw is None else json.loads(raw)

    def all(self) -> dict[str, Any]:
        return {text(k): json.loads(v) for k, v in self.redis.hgetall(self.key).items()}

    def set(self, **fields: Any) -> None:
        if fields:
            self.redis.hset(self.key, mapping={k: json.dumps(v) for k, v in fields.items()})

    def set_once(self, name: str, value: Any) -> Any:
        """Write ``name`` unless it is set; return what it holds afterwards (one atomic HSETNX)."""
        self.redis.hsetnx(self.key, name, json.dumps(value))
        return self.get(name)

    def incr(self, name: str, by: int) -> int:
        return int(self.redis.hincrby(self.key, name, by))

    def delete(self) -> None:
        self.redis.delete(self.key)


class TrainingRun:
    """One run of an algorithm against the fleet: its name, its client, its state, its rollouts.

    Made by the Trainer for each ``fit``. ``pointer`` is the pointer the agent's unpinned
    rollouts follow (the agent's ``default_resources``, else ``latest``): where an
    optimizer starts from and what it promotes to, unless told otherwise.
    """

    def __init__(
        self,
        client: LightningClient,
        name: str,
        *,
        agent: LitAgent | None = None,
        config: RolloutConfig | None = None,
        rollout_timeout: float = 3600.0,
        queue: str | None = None,
        on_finished: Callable[[Rollout], None] | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self.agent = agent
        self.config = config or RolloutConfig()
        self.rollout_timeout = rollout_timeout
        self.queue = queue
        self.on_finished = on_finished
        self.state = RunState(client, name)
        self.stats = RunStats()

    @property
    def pointer(self) -> str:
        return (self.agent.default_resources if self.agent is not None else None) or LATEST

    @property
    def rollouts_spent(self) -> int:
        """Rollouts this run has created, over every process that worked on it."""
        return int(self.state.get("rollouts", 0))

    def key(self, evaluation: Evaluation, example: Example) -> str:
        """The idempotency key of ``example``'s rollout in ``evaluation``."""
        snapshot = evaluation.snapshot
        return f"{self.name}/{evaluation.tag}/{snapshot.resources_id}@{snapshot.version}/{evaluation.mode}/{example.id}"

    def evaluate(self, evaluations: Sequence[Evaluation]) -> list[list[Rollout]]:
        """Run every evaluation's rollouts on the fleet and wait for all of them.

        One enqueue for the whole batch (rollouts pinned to each evaluation's snapshot and
        version, interleaved so the workers run the snapshots side by side) and one wait,
        woken by notifications. Returns each evaluation's finished rollouts in the order of
        its examples. A rollout this run already created (in this process or an earlier one)
        is not enqueued again: the stored one is returned, finished or still running.

        Raises :class:`TrainingTimeoutError` when rollouts have not finished within the run's
        ``rollout_timeout``, and :class:`RunConflictError` when a snapshot is no longer at the
        version the evaluation names (another writer updated it).
        """
        began = time.monotonic()
        requests: dict[str, RolloutRequest] = {}  # by idempotency key: two evaluations may share a rollout
        slots: list[tuple[int, int, str]] = []
        longest = max((len(e.examples) for e in evaluations), default=0)
        for position in range(longest):  # interleaved: example 0 of every evaluation, then example 1...
            for index, evaluation in enumerate(evaluations):
                if position >= len(evaluation.examples):
                    continue
                example = evaluation.examples[position]
                key = self.key(evaluation, example)
                if key not in requests:
                    requests[key] = RolloutRequest(
                        input=example.input, resources_id=evaluation.snapshot.resources_id, mode=evaluation.mode,
                        config=self.config, idempotency_key=key,
                        metadata={**evaluation.metadata, "training_run": self.name, "input_id": example.id},
                    )
                slots.append((index, position, key))
        out: list[list[Rollout]] = [[] for _ in evaluations]
        if not requests:
            return out
        known = self.client.store.statuses([idempotent_rollout_id(key) for key in requests])
        fresh = sum(status is None for status in known.values())
        if fresh:
            # Counted before they are written: a crash in between over-counts the budget, never under-counts it.
            self.state.incr("rollouts", fresh)
        enqueued = dict(zip(requests, self.client.enqueue_rollouts(list(requests.values()), queue=self.queue),
                            strict=True))
        self.stats.rollouts_created += fresh
        self.stats.rollouts_reused += len(requests) - fresh
        self.stats.batches += 1
        for index, _, key in slots:
            expected, got = evaluations[index].snapshot, enqueued[key].resources_version
            if got not in (None, expected.version):
                raise RunConflictError(
                    self.name, f"{expected.resources_id} version {expected.version}",
                    f"version {got} (the snapshot was updated during the run)",
                )
        finished = self.client.wait_for_rollouts(
            [r.rollout_id for r in enqueued.values()], timeout=self.rollout_timeout, on_finished=self.on_finished
        )
        self.stats.fleet_seconds += time.monotonic() - began
        if len(finished) < len(enqueued):
            raise TrainingTimeoutError(self.name, len(enqueued) - len(finished), self.rollout_timeout)
        by_id = {r.rollout_id: r for r in finished}
        for index, _, key in slots:  # slots are in position order within each evaluation
            out[index].append(by_id[enqueued[key].rollout_id])
        return out

    def count_new(self, evaluations: Sequence[Evaluation]) -> int:
        """How many rollouts :meth:`evaluate` of ``evaluations`` would create (those this run has
        not created yet); one round trip."""
        keys = {self.key(e, example) for e in evaluations for example in e.examples}
        known = self.client.store.statuses([idempotent_rollout_id(key) for key in keys])
        return sum(status is None for status in known.values())

    def evaluate_one(
        self, snapshot: ResourcesUpdate, examples: Sequence[Example], mode: RolloutMode = "val", tag: str = "",
    ) -> list[Rollout]:
        """:meth:`evaluate` of one snapshot."""
        return self.evaluate([Evaluation(snapshot, examples, mode, tag)])[0]
