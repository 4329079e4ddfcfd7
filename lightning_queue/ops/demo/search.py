"""Prompt search: selective optimization in one script.

Each candidate prompt becomes its own resource snapshot. Rollouts pinned to
each candidate run at the same time in the same fleet, interleaved; the
candidate with the best mean reward is promoted to ``latest``; a validation
pass of unpinned rollouts then picks it up by itself.

    python -m algorithms.prompt_search   (the script in the repository's algorithms/)

Uses LQ_REDIS_URL / LQ_KEY_PREFIX / LQ_QUEUE like every lightning-queue program.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_queue.client import LightningClient
from lightning_queue.core.metrics import RewardSummary
from lightning_queue.core.models import PromptTemplate, Rollout, RolloutRequest

CANDIDATES: dict[str, str] = {
    "plain": "Q: {question}",
    "terse": "Reply with only the final number. Q: {question}",
    "step-by-step": "Think step by step. Q: {question}",
    "step-by-step-terse": "Think step by step, then reply with only the final number. Q: {question}",
}


@dataclass
class CandidateScore:
    name: str
    resources_id: str
    rollouts: list[Rollout] = field(default_factory=list)

    @property
    def summary(self) -> RewardSummary:
        return RewardSummary.of(self.rollouts)


@dataclass
class SearchReport:
    scores: list[CandidateScore]
    promoted: CandidateScore
    promoted_version: int
    validation: list[Rollout]

    @property
    def validation_summary(self) -> RewardSummary:
        return RewardSummary.of(self.validation)


def prompt_search(
    client: LightningClient,
    train: list[dict[str, Any]],
    val: list[dict[str, Any]],
    candidates: dict[str, str] = CANDIDATES,
    timeout: float = 600,
    on_finished: Callable[[Rollout], None] | None = None,
) -> SearchReport:
    run = uuid.uuid4().hex[:6]
    scores = {
        name: CandidateScore(
            name, client.add_resources({"prompt": PromptTemplate(template=text)}, f"prompt-{name}-{run}").resources_id
        )
        for name, text in candidates.items()
    }
    # Interleave the candidates so every worker runs several versions side by side.
    requests = [
        RolloutRequest(input=row, resources_id=score.resources_id, mode="train", metadata={"candidate": score.name})
        for row in train
        for score in scores.values()
    ]
    rollouts = client.enqueue_rollouts(requests)
    finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=timeout, on_finished=on_finished)
    if len(finished) < len(rollouts):
        raise TimeoutError(f"{len(rollouts) - len(finished)} rollouts did not finish within {timeout} s")
    by_candidate: dict[str, list[Rollout]] = defaultdict(list)
    for rollout in finished:
        by_candidate[rollout.metadata["candidate"]].append(rollout)
    for name, score in scores.items():
        score.rollouts = by_candidate[name]

    best = max(scores.values(), key=lambda s: s.summary.mean_reward)
    # Promote: a new version of the winner becomes latest, atomically.
    promoted = client.update_resources(best.resources_id, client.get_resources_by_id(best.resources_id).resources)

    # Unpinned rollouts follow latest: they run with the promoted prompt.
    val_rollouts = client.enqueue_rollouts(val, mode="val")
    validation = client.wait_for_rollouts([r.rollout_id for r in val_rollouts], timeout=timeout,
                                          on_finished=on_finished)
    return SearchReport(list(scores.values()), best, promoted.version, validation)

