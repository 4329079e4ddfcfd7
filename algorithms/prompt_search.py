"""Prompt search: selective optimization in one script.

Each candidate prompt becomes its own resource snapshot. Rollouts pinned to each candidate run
at the same time in the same fleet, interleaved; the candidate with the best mean reward is
promoted to ``latest``; a validation pass of unpinned rollouts then picks it up by itself.

    python -m algorithms.prompt_search

Needs workers running the demo agent (``lightning-queue worker --agent workers.demo_agent:agent``).
Uses LQ_REDIS_URL / LQ_KEY_PREFIX / LQ_QUEUE like every lightning-queue program. The search
itself is :func:`lightning_queue.ops.demo.search.prompt_search`, the one ``lightning-queue demo`` runs.
"""

from __future__ import annotations

from lightning_queue import LightningClient
from lightning_queue.ops.demo.datasets import arithmetic
from lightning_queue.ops.demo.search import prompt_search


def main() -> None:
    with LightningClient() as client:
        report = prompt_search(client, arithmetic("train"), arithmetic("val"))
    for score in report.scores:
        print(f"{score.name:<20} {score.resources_id:<32} {len(score.rollouts):>3} rollouts  "
              f"mean {score.summary.mean_reward:.3f}")
    print(f"promoted {report.promoted.resources_id} (v{report.promoted_version}); validation on latest: "
          f"mean {report.validation_summary.mean_reward:.3f} over {len(report.validation)} rollouts")


if __name__ == "__main__":
    main()
