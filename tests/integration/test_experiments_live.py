"""Experiments end to end: real Redis, real `celery worker` processes running the demo agent.

The tests share one fleet (``shared_workers``) and so one key prefix: each names its snapshots,
pointers and experiments apart from the others' and reads only its own rollouts."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from algorithms.ab_test import ab_test
from lightning_queue import (
    Canary,
    Experiment,
    Experiments,
    Guardrail,
    LightningClient,
    PromptTemplate,
    Variant,
)
from lightning_queue.ops.demo.datasets import arithmetic

DEMO = "workers.demo_agent:agent"
WAIT = 120.0
STEP_BY_STEP = "Think step by step. Q: {question}"
TERSE_STEPS = "Think step by step, then reply with only the final number. Q: {question}"


def test_a_split_experiment_routes_units_to_their_snapshots_and_promotes_the_winner(
    shared_workers: Any, tmp_path: Path
) -> None:
    client: LightningClient = shared_workers(DEMO, count=2).client
    client.add_resources({"prompt": PromptTemplate(template=STEP_BY_STEP)}, "steps")
    client.add_resources({"prompt": PromptTemplate(template=TERSE_STEPS)}, "terse-steps")
    client.set_pointer("prod", "steps")
    experiments = Experiments(client)
    experiments.create(Experiment(name="live", unit_key="input.user_id", variants=[
        Variant(name="control", resources_id="prod"), Variant(name="treatment", resources_id="terse-steps")]))
    experiments.start("live")
    tasks = [{"user_id": f"user-{i}", **row} for i, row in zip(range(120), itertools.cycle(arithmetic()))]

    rollouts = experiments.enqueue("live", tasks)
    finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=WAIT)

    assert len(finished) == 120 and all(r.status == "succeeded" for r in finished)
    exp = experiments.get("live")
    ran_with = Counter()
    for r in finished:
        attempt = client.get_attempts(r.rollout_id)[-1]
        expected = "steps" if exp.assign(r.input["user_id"]) == "control" else "terse-steps"
        assert attempt.resources_id == expected  # the worker ran the variant's snapshot
        ran_with[attempt.worker_id] += 1
    assert len(ran_with) == 2  # both workers took part

    report = experiments.report("live", min_sample=20)
    control, treatment = report.variants
    assert control.rollouts + treatment.rollouts == 120 and control.units + treatment.units == 120
    assert control.mean_reward == 0.5 and treatment.mean_reward == 1.0  # the demo agent is deterministic
    assert control.latency_p50 is not None and control.latency_p50 > 0
    assert report.winner == "treatment" and not report.srm.flagged  # type: ignore[union-attr]
    assert report.save_chart(tmp_path / "live.png").stat().st_size > 0

    done = experiments.promote("live", pointer="prod")
    assert (done.from_id, done.to_id) == ("steps", "terse-steps")
    assert client.get_pointer("prod") == "terse-steps" and experiments.get("live").status == "stopped"


def test_the_ab_test_script_pairs_every_question(shared_workers: Any) -> None:
    client: LightningClient = shared_workers(DEMO, count=2).client
    report = ab_test(client, arithmetic(), paired=True, timeout=WAIT, promote="latest")
    (comparison,) = report.comparisons
    assert comparison.paired is not None and comparison.paired.n == len(arithmetic())
    assert comparison.verdict == "better" and report.winner == "treatment"
    assert client.get_resources_by_id("latest").resources["prompt"].template == TERSE_STEPS  # type: ignore[attr-defined]


def _traffic() -> Iterator[dict[str, Any]]:
    for i, row in zip(itertools.count(), itertools.cycle(arithmetic())):
        yield {"user_id": f"user-{i}", **row}


def test_a_canary_that_fails_on_real_workers_is_rolled_back(shared_workers: Any) -> None:
    client: LightningClient = shared_workers(DEMO, count=2).client
    client.add_resources({"prompt": PromptTemplate(template=STEP_BY_STEP)}, "stable")
    client.set_pointer("canary-prod", "stable")
    # The agent formats the prompt with `question`; this one names `query`, so every rollout fails.
    client.add_resources({"prompt": PromptTemplate(template="Q: {query}")}, "broken")
    canary = Canary(client, "live-canary", "broken", pointer="canary-prod", unit_key="input.user_id",
                    schedule=(0.25, 0.5, 1.0), rollouts_per_step=20, timeout=WAIT,
                    guardrail=Guardrail(max_failure_increase=0.05, min_sample=10))

    result = canary.run(_traffic(), batch_size=40)

    assert result.outcome == "rolled_back", result
    assert "failure rate 100.0% in treatment vs 0.0% in control" in result.reason
    assert client.get_pointer("canary") == "stable" and client.get_pointer("canary-prod") == "stable"
    assert Experiments(client).get("live-canary").status == "stopped"
    failed = [r for r in result.rollouts if r.metadata["variant"] == "treatment"]
    assert failed and all(r.status == "failed" and r.error.type == "TemplateRenderError" for r in failed)  # type: ignore[union-attr]
