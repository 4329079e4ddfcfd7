"""An A/B test of two prompts on the demo agent, paired (every question under both) or split by user.

    python -m algorithms.ab_test --workers 2                  # paired, on a local fleet
    python -m algorithms.ab_test --workers 2 --split --users 400
    python -m algorithms.ab_test --promote prod               # move `prod` to the winner

The report prints per-variant metrics and the comparison (paired t-test and
Wilcoxon for a paired test; Welch for a split; the sequential p-value for both),
and a chart of the rewards is written to ``ab_test.png``. Uses only the public
API of lightning_queue; LQ_REDIS_URL / LQ_KEY_PREFIX / LQ_QUEUE as usual.
"""

from __future__ import annotations

import argparse
import itertools
import uuid
from typing import Any

from algorithms.local import client_for
from lightning_queue import (
    Experiment,
    ExperimentReport,
    Experiments,
    LightningClient,
    PromptTemplate,
    Variant,
)
from lightning_queue.ops.demo.datasets import arithmetic

CONTROL = "Think step by step. Q: {question}"
TREATMENT = "Think step by step, then reply with only the final number. Q: {question}"


def ab_test(
    client: LightningClient,
    inputs: list[Any],
    *,
    control: str = CONTROL,
    treatment: str = TREATMENT,
    paired: bool = True,
    unit_key: str = "input.question",
    name: str | None = None,
    timeout: float = 600,
    promote: str | None = None,
) -> ExperimentReport:
    """Store the two prompts as snapshots, run ``inputs`` through an experiment on them,
    wait, and report; with ``promote``, move that pointer to a significant winner."""
    run = uuid.uuid4().hex[:6]
    name = name or f"ab-{run}"
    a = client.add_resources({"prompt": PromptTemplate(template=control)}, f"ab-control-{run}")
    b = client.add_resources({"prompt": PromptTemplate(template=treatment)}, f"ab-treatment-{run}")
    experiments = Experiments(client)
    experiments.create(Experiment(
        name=name, paired=paired, unit_key=unit_key,
        variants=[Variant(name="control", resources_id=a.resources_id),
                  Variant(name="treatment", resources_id=b.resources_id)],
    ))
    experiments.start(name)
    rollouts = experiments.enqueue(name, inputs, mode="val")
    finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=timeout)
    if len(finished) < len(rollouts):
        raise TimeoutError(f"{len(rollouts) - len(finished)} rollouts did not finish within {timeout} s")
    report = experiments.report(name, min_sample=min(30, max(2, len(inputs) // 2)))
    if promote and report.winner:
        experiments.promote(name, report.winner, promote)
    else:
        experiments.stop(name, "evaluation done")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0,
                        help="start this many local demo workers (default: use yours)")
    parser.add_argument("--split", action="store_true", help="split users by hash instead of pairing on questions")
    parser.add_argument("--users", type=int, default=200, help="with --split: simulated users (one question each)")
    parser.add_argument("--promote", metavar="POINTER", help="move POINTER to a significant winner")
    parser.add_argument("--chart", default="ab_test.png")
    args = parser.parse_args()
    rows = arithmetic()
    if args.split:
        inputs = [{"user_id": f"user-{i}", **row} for i, row in zip(range(args.users), itertools.cycle(rows))]
        options = {"paired": False, "unit_key": "input.user_id"}
    else:
        inputs, options = rows, {"paired": True, "unit_key": "input.question"}
    with client_for(args.workers) as client:
        report = ab_test(client, inputs, promote=args.promote, **options)  # type: ignore[arg-type]
    from rich.console import Console

    console = Console()
    for table in report.tables():
        console.print(table)
    winner = report.winner or "none (no significant difference)"
    console.print(f"chart: {report.save_chart(args.chart)}; winner: {winner}")


if __name__ == "__main__":
    main()
