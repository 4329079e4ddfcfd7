"""A canary rollout of a new prompt on the demo agent: 1% -> 5% -> 25% -> 50% -> 100% of users.

    python -m algorithms.canary --workers 2                    # a better prompt: promoted to `prod`
    python -m algorithms.canary --workers 2 --candidate broken # fails every rollout: rolled back
    python -m algorithms.canary --workers 2 --candidate worse  # lower reward: rolled back

``prod`` starts at the baseline prompt; the candidate is reached through the
``canary`` pointer. Each step waits for enough treatment rollouts, and after
every batch the guardrail (failure rate, reward drop, judged by the sequential
test) may move ``canary`` back to the baseline and stop the experiment.
Uses only the public API of lightning_queue.
"""

from __future__ import annotations

import argparse
import itertools
import uuid
from collections.abc import Iterator
from typing import Any

from algorithms.local import client_for
from lightning_queue import (
    Canary,
    CanaryResult,
    Guardrail,
    LightningClient,
    PromptTemplate,
)
from lightning_queue.ops.demo.datasets import arithmetic

BASELINE = "Think step by step. Q: {question}"
CANDIDATES = {
    "better": "Think step by step, then reply with only the final number. Q: {question}",
    # No "step by step": the demo model ignores precedence, wrong on half the questions (mean reward 0.25, not 0.5).
    # ("Reply with only the final number" would not do: its exact answers on the other half make up the loss.)
    "worse": "Q: {question}",
    "broken": "Q: {query}",  # names a variable the agent does not pass: every rollout fails
}


def traffic(start: int = 0) -> Iterator[dict[str, Any]]:
    """An endless stream of tasks from distinct users (the unit a canary splits on)."""
    for i, row in zip(itertools.count(start), itertools.cycle(arithmetic())):
        yield {"user_id": f"user-{i}", **row}


def run_canary(
    client: LightningClient,
    candidate: str,
    *,
    schedule: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 1.0),
    rollouts_per_step: int = 30,
    batch_size: int = 100,
    guardrail: Guardrail | None = None,
    name: str | None = None,
    pointer: str = "prod",
) -> CanaryResult:
    run = uuid.uuid4().hex[:6]
    if client.get_pointer(pointer) is None:
        baseline = client.add_resources({"prompt": PromptTemplate(template=BASELINE)}, f"baseline-{run}")
        client.set_pointer(pointer, baseline.resources_id)
    new = client.add_resources({"prompt": PromptTemplate(template=candidate)}, f"candidate-{run}")
    canary = Canary(client, name or f"canary-{run}", new.resources_id, pointer=pointer, unit_key="input.user_id",
                    schedule=schedule, rollouts_per_step=rollouts_per_step,
                    guardrail=guardrail or Guardrail(max_failure_increase=0.05, max_reward_drop=0.1, min_sample=20))
    return canary.run(traffic(), batch_size=batch_size,
                      on_batch=lambda step, done: print(f"  step {step.weight:>4.0%}: batch {step.batches}, "
                                                        f"{step.treatment_finished} treatment rollouts finished"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0,
                        help="start this many local demo workers (default: use yours)")
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), default="better")
    parser.add_argument("--schedule", default="0.01,0.05,0.25,0.5,1.0", help="treatment weights, comma-separated")
    parser.add_argument("--per-step", type=int, default=30, help="treatment rollouts to finish before each step")
    args = parser.parse_args()
    schedule = tuple(float(w) for w in args.schedule.split(","))
    with client_for(args.workers) as client:
        result = run_canary(client, CANDIDATES[args.candidate], schedule=schedule, rollouts_per_step=args.per_step)
        pointers = client.pointers()
    print(f"{result.outcome}: {result.reason}")
    if result.conclusion:
        c = result.conclusion
        print(f"{c.pointer}: {c.from_id} -> {c.to_id}; pointers now {pointers}")


if __name__ == "__main__":
    main()
