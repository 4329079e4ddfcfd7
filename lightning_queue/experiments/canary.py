"""Progressive rollout of a candidate snapshot: a canary experiment with a guardrail.

The candidate is reached through a canary pointer (``canary`` by default)
set to it when the canary starts; the control is the snapshot the production
pointer (``prod``, ``latest``...) names at that moment. The treatment's
weight follows a schedule (1% -> 5% -> 25% -> 50% -> 100%), moving to the
next step once enough treatment rollouts of the current step have finished.
After every batch the guardrail compares the two arms:

* failure rate: the treatment fails more than ``max_failure_increase`` more
  often than the control, and
* reward: the treatment's mean reward is more than ``max_reward_drop`` below
  the control's,

each confirmed by the sequential (always-valid) test at ``alpha``, so looking
after every batch does not inflate false alarms. A tripped guardrail moves the
canary pointer back to the control and stops the experiment in one atomic
step, recording why; a canary that completes the schedule is promoted: the
production pointer moves to the candidate and the experiment stops, also in
one step (compare-and-set on the pointer: if someone moved it meanwhile,
nothing happens and :class:`PointerError` says so).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_queue.core.errors import (
    ExperimentExistsError,
    ExperimentNotFoundError,
    InvalidExperimentError,
)
from lightning_queue.core.models import Rollout, RolloutConfig
from lightning_queue.experiments import stats
from lightning_queue.experiments.manager import (
    Conclusion,
    Experiment,
    Experiments,
    Variant,
)

if TYPE_CHECKING:
    from lightning_queue.client import LightningClient

DEFAULT_SCHEDULE = (0.01, 0.05, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Guardrail:
    """When a canary is rolled back. Thresholds are absolute (failure rate in
    [0, 1], reward in the agent's units); nothing trips before ``min_sample``
    finished rollouts in each arm."""

    max_failure_increase: float = 0.05
    max_reward_drop: float = 0.1
    alpha: float = 0.05
    min_sample: int = 20

    def check(self, control: Sequence[Rollout], treatment: Sequence[Rollout]) -> str | None:
        """Why the treatment must be rolled back, or ``None``. The arms' finished
        rollouts are compared in the order they finished (see :func:`stats.sequential`)."""
        c = [r for r in control if r.status in ("succeeded", "failed")]
        t = [r for r in treatment if r.status in ("succeeded", "failed")]
        if len(c) < self.min_sample or len(t) < self.min_sample:
            return None
        fail_c = np.asarray([r.status == "failed" for r in c], float)
        fail_t = np.asarray([r.status == "failed" for r in t], float)
        increase = float(fail_t.mean() - fail_c.mean())
        if increase > self.max_failure_increase:
            seq = stats.sequential(fail_c, fail_t, control_order=[r.end_time or 0.0 for r in c],
                                   treatment_order=[r.end_time or 0.0 for r in t])
            if seq.p_value < self.alpha:
                return (f"failure rate {fail_t.mean():.1%} in treatment vs {fail_c.mean():.1%} in control "
                        f"(+{increase:.1%}, more than the {self.max_failure_increase:.1%} allowed; "
                        f"sequential p={seq.p_value:.2g} < {self.alpha})")
        rc = [r for r in c if r.status == "succeeded" and r.reward is not None]
        rt = [r for r in t if r.status == "succeeded" and r.reward is not None]
        if len(rc) >= self.min_sample and len(rt) >= self.min_sample:
            seq = stats.sequential([r.reward for r in rc], [r.reward for r in rt],  # type: ignore[misc]
                                   control_order=[r.end_time or 0.0 for r in rc],
                                   treatment_order=[r.end_time or 0.0 for r in rt])
            if -seq.diff > self.max_reward_drop and seq.p_value < self.alpha:
                return (f"mean reward {seq.diff:+.3f} below control (a drop of more than the "
                        f"{self.max_reward_drop:g} allowed; sequential p={seq.p_value:.2g} < {self.alpha})")
        return None


@dataclass
class CanaryStep:
    weight: float
    batches: int = 0
    treatment_finished: int = 0


@dataclass
class CanaryResult:
    """How a canary ended: ``promoted``, ``rolled_back`` or ``exhausted`` (ran out of inputs)."""

    outcome: str
    reason: str
    steps: list[CanaryStep]
    conclusion: Conclusion | None
    rollouts: list[Rollout] = field(default_factory=list)


class Canary:
    """Roll ``candidate`` out against what ``pointer`` names now, step by step.

    ``unit_key`` is how traffic is split (e.g. ``input.user_id``): a unit keeps
    its arm while the treatment's share grows (units only ever move from
    control to treatment, see :func:`lightning_queue.experiments.bucket_bounds`).

    A protected ``pointer`` (``prod``) is promoted only with ``promote_reason``: the promotion is
    then forced, with that reason in the pointer's history; without it the promotion raises
    :class:`ProtectedPointerError` and nothing moves. ``actor`` is recorded as who moved it.
    """

    def __init__(
        self,
        client: LightningClient,
        name: str,
        candidate: str,
        *,
        pointer: str = "latest",
        canary_pointer: str = "canary",
        unit_key: str = "input",
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        rollouts_per_step: int = 30,
        guardrail: Guardrail | None = None,
        timeout: float = 600,
        config: RolloutConfig | None = None,
        promote_reason: str | None = None,
        actor: str | None = None,
    ) -> None:
        if not schedule or any(not 0 < w <= 1 for w in schedule) or list(schedule) != sorted(schedule):
            raise InvalidExperimentError(f"schedule {list(schedule)} must be increasing weights in (0, 1]")
        self.client = client
        self.experiments = Experiments(client)
        self.name = name
        self.candidate = candidate
        self.pointer = pointer
        self.canary_pointer = canary_pointer
        self.promote_reason = promote_reason
        self.actor = actor
        self.unit_key = unit_key
        self.schedule = list(schedule)
        self.rollouts_per_step = rollouts_per_step
        self.guardrail = guardrail or Guardrail()
        self.timeout = timeout
        self.config = config
        self.control_id: str | None = None

    def start(self) -> Experiment:
        """Point the canary pointer at the candidate and start the experiment at the first weight."""
        control = self.client.get_resources_by_id(self.pointer)
        self.control_id = control.resources_id
        self.client.get_resources_by_id(self.candidate)  # fail before anything is written
        try:  # ...and a taken name before the canary pointer moves
            self.experiments.get(self.name)
        except ExperimentNotFoundError:
            pass
        else:
            raise ExperimentExistsError(self.name)
        self.client.registry.set_pointer(self.canary_pointer, self.candidate, op=f"canary {self.name}", by=self.actor)
        w = self.schedule[0]
        self.experiments.create(Experiment(
            name=self.name, unit_key=self.unit_key,
            variants=[Variant(name="control", resources_id=self.control_id, weight=1 - w),
                      Variant(name="treatment", resources_id=self.canary_pointer, weight=w)],
            description=f"canary of {self.candidate} against {self.pointer} ({self.control_id})",
        ))
        return self.experiments.start(self.name)

    def run(
        self,
        inputs: Iterable[Any],
        batch_size: int = 50,
        on_batch: Callable[[CanaryStep, list[Rollout]], None] | None = None,
    ) -> CanaryResult:
        """Start, then enqueue ``inputs`` in batches until the canary is promoted, rolled
        back, or the inputs run out (``exhausted``: the experiment is left running)."""
        if self.control_id is None:
            self.start()
        source: Iterator[Any] = iter(inputs)
        steps: list[CanaryStep] = []
        arms: dict[str, list[Rollout]] = {"control": [], "treatment": []}
        for weight in self.schedule:
            step = CanaryStep(weight)
            steps.append(step)
            self.experiments.set_weights(self.name, {"control": 1 - weight, "treatment": weight})
            while step.treatment_finished < self.rollouts_per_step:
                batch = list(itertools.islice(source, batch_size))
                if not batch:
                    return CanaryResult("exhausted", f"inputs ran out at the {weight:.0%} step", steps, None,
                                        arms["control"] + arms["treatment"])
                enqueued = self.experiments.enqueue(self.name, batch, config=self.config)
                finished = self.client.wait_for_rollouts([r.rollout_id for r in enqueued], timeout=self.timeout)
                step.batches += 1
                for r in finished:
                    if r.metadata.get("variant") in arms:
                        arms[r.metadata["variant"]].append(r)
                step.treatment_finished += sum(r.metadata.get("variant") == "treatment" for r in finished)
                if on_batch:
                    on_batch(step, finished)
                why = self.guardrail.check(arms["control"], arms["treatment"])
                if why:
                    conclusion = self.experiments.rollback(self.name, self.canary_pointer, f"guardrail: {why}",
                                                           expected=self.candidate, by=self.actor)
                    return CanaryResult("rolled_back", why, steps, conclusion, arms["control"] + arms["treatment"])
        conclusion = self.experiments.promote(self.name, "treatment", self.pointer, expected=self.control_id,
                                              by=self.actor, force=self.promote_reason is not None,
                                              reason=self.promote_reason)
        return CanaryResult("promoted", f"the guardrail held through {len(steps)} steps up to 100%", steps, conclusion,
                            arms["control"] + arms["treatment"])
