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


# ------------------------------------------------------------------------------- Prometheus aggregates

DURATION_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
"""Upper bounds (seconds) of the rollout duration histograms (``lq_rollout_duration_seconds`` and the
per snapshot version and per variant ones): start of its first attempt to its final status. Spelled
into the final-transition scripts (``lua/_final_metrics.lua``) by ``storage/scripts.py``, and read
back by the exporter: defined here only."""

QUEUE_WAIT_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0)
"""Upper bounds (seconds) of ``lq_rollout_queue_wait_seconds``: enqueue to the start of the first attempt."""

MAX_SNAPSHOT_SERIES = 200
"""Default cap on the snapshot versions with their own series (``Settings.metrics_max_snapshot_versions``)."""

MAX_VARIANT_SERIES = 100
"""Default cap on the experiment variants with their own series (``Settings.metrics_max_variants``)."""

OTHER = "other"
"""The label value (``resources_id``, ``version``; ``experiment``, ``variant``) of the series that holds
what the series folded past a cap had counted."""


@dataclass(frozen=True)
class SeriesCaps:
    """How many snapshot versions and experiment variants keep series of their own in the aggregates
    the final transitions write (see ``lua/_final_metrics.lua``). Past a cap, the least recently
    finished one is folded into the ``other`` series, so the exporter's label sets stay bounded."""

    snapshot_versions: int = MAX_SNAPSHOT_SERIES
    variants: int = MAX_VARIANT_SERIES

    def __post_init__(self) -> None:
        if self.snapshot_versions < 1 or self.variants < 1:
            raise ValueError("series caps must be >= 1")

    @property
    def arg(self) -> str:
        """The caps as the final-transition scripts take them: one argument, ``"{snapshots} {variants}"``."""
        return f"{self.snapshot_versions} {self.variants}"
