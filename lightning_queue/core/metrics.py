"""Summaries of finished rollouts, for algorithms and reports."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from lightning_queue.core.models import Rollout


@dataclass(frozen=True)
class RewardSummary:
    """How a set of rollouts went.

    ``mean_reward`` averages the rewards of the rollouts that succeeded and
    reported one (0.0 when none did); failed and cancelled rollouts are counted
    in ``failed``, not averaged in as zeros.
    """

    count: int
    succeeded: int
    failed: int
    mean_reward: float

    @classmethod
    def of(cls, rollouts: Iterable[Rollout]) -> RewardSummary:
        rollouts = list(rollouts)
        rewards = [r.reward for r in rollouts if r.status == "succeeded" and r.reward is not None]
        succeeded = sum(r.status == "succeeded" for r in rollouts)
        return cls(len(rollouts), succeeded, len(rollouts) - succeeded,
                   statistics.fmean(rewards) if rewards else 0.0)
