"""Baseline: run a dataset against one snapshot and report the mean reward.

    python -m algorithms.baseline [RESOURCES_ID]     # default: the latest snapshot

Uses LQ_REDIS_URL / LQ_KEY_PREFIX / LQ_QUEUE like every lightning-queue program.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from lightning_queue import LightningClient, RewardSummary, Rollout
from lightning_queue.ops.demo.datasets import arithmetic


@dataclass
class BaselineReport:
    resources_id: str | None
    rollouts: list[Rollout]

    @property
    def summary(self) -> RewardSummary:
        return RewardSummary.of(self.rollouts)


def run_baseline(
    client: LightningClient, dataset: list[dict], resources_id: str | None = None,
    mode: str = "val", timeout: float = 600,
) -> BaselineReport:
    """Enqueue one rollout per row (pinned to ``resources_id``, or following the latest)
    and wait for them all."""
    rollouts = client.enqueue_rollouts(dataset, resources_id=resources_id, mode=mode)
    finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=timeout)
    if len(finished) < len(rollouts):
        raise TimeoutError(f"{len(rollouts) - len(finished)} rollouts did not finish within {timeout} s")
    return BaselineReport(resources_id, finished)


def main() -> None:
    resources_id = sys.argv[1] if len(sys.argv) > 1 else None
    with LightningClient() as client:
        report = run_baseline(client, arithmetic(), resources_id)
    target = resources_id or "latest"
    summary = report.summary
    print(f"{len(report.rollouts)} rollouts on {target}: mean reward {summary.mean_reward:.3f}, "
          f"{summary.failed} failed")


if __name__ == "__main__":
    main()
