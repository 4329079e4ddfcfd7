"""Prompt search, run by the Trainer: selective optimization in one script.

Each candidate prompt becomes its own resource snapshot. Rollouts pinned to each candidate run
at the same time in the same fleet, interleaved; the candidate with the best mean reward is
promoted to ``latest``; a validation pass of unpinned rollouts then picks it up by itself.

    python -m algorithms.prompt_search

Needs workers running the demo agent (``lightning-queue worker --agent workers.demo_agent:agent``);
the Trainer waits up to a minute for one. Uses LQ_REDIS_URL / LQ_KEY_PREFIX / LQ_QUEUE like every
lightning-queue program. The search itself is :func:`lightning_queue.ops.demo.search.prompt_search`,
the one ``lightning-queue demo`` runs; :class:`PromptSearch` makes it an :class:`Algorithm` (the
shape every algorithm the Trainer runs has: ``run(run, train, val)``).
"""

from __future__ import annotations

from lightning_queue import Algorithm, Dataset, Trainer
from lightning_queue.ops.demo.agent import agent
from lightning_queue.ops.demo.datasets import arithmetic
from lightning_queue.ops.demo.search import CANDIDATES, SearchReport, prompt_search
from lightning_queue.training import TrainingRun


class PromptSearch(Algorithm[SearchReport]):
    """Score a fixed list of candidate prompts on ``train``, promote the best, validate on ``val``."""

    def __init__(self, candidates: dict[str, str] = CANDIDATES) -> None:
        self.candidates = candidates

    def run(self, run: TrainingRun, train: Dataset, val: Dataset) -> SearchReport:
        return prompt_search(run.client, train.inputs, val.inputs, self.candidates, timeout=run.rollout_timeout)


def main() -> None:
    with Trainer(PromptSearch(), n_runners=1, rollout_timeout=600) as trainer:
        report = trainer.fit(agent, arithmetic("train"), arithmetic("val"))
    for score in report.scores:
        print(f"{score.name:<20} {score.resources_id:<32} {len(score.rollouts):>3} rollouts  "
              f"mean {score.summary.mean_reward:.3f}")
    print(f"promoted {report.promoted.resources_id} (v{report.promoted_version}); validation on latest: "
          f"mean {report.validation_summary.mean_reward:.3f} over {len(report.validation)} rollouts")


if __name__ == "__main__":
    main()
