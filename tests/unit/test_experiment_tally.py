"""The per-variant aggregates kept as an experiment's rollouts finish (``lua/_experiment_tally.lua``),
and the report built from them (:meth:`Experiments.live_report`): the same numbers as the report
read from every rollout record, from a constant number of round trips."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from lightning_queue import LightningClient, PromptTemplate, Rollout
from lightning_queue.core.models import ErrorInfo, RolloutResult
from lightning_queue.experiments.manager import Experiment, Experiments, Variant

Outcome = Callable[[Rollout], tuple[str, float | None]]


@pytest.fixture
def experiments(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> Experiments:
    fake_client.add_resources({"prompt": PromptTemplate(template="a {x}")}, "rs-a")
    fake_client.add_resources({"prompt": PromptTemplate(template="b {x}")}, "rs-b")
    rng = np.random.default_rng(7)
    store = fake_client.store

    def outcome(r: Rollout) -> tuple[str, float | None]:
        if r.input.get("cancel"):
            return "cancelled", None
        if r.metadata.get("variant") == "treatment" and rng.random() < 0.1:
            return "failed", None
        return "succeeded", float(rng.normal(0.8 if r.metadata.get("variant") == "treatment" else 0.5, 0.1))

    def publish(rollouts: list[Rollout], registry_seq: int = 0) -> None:
        # Each rollout finishes as soon as it is published, through the store's own scripts.
        for rollout in rollouts:
            status, reward = outcome(rollout)
            if status == "cancelled":
                store.terminate(rollout.rollout_id, "cancelled")
                continue
            claim = store.claim(rollout, "sim@host")
            store.start_attempt(rollout.rollout_id, claim.sequence_id, rollout.resources_id or "",
                                rollout.resources_version or 0)
            if status == "succeeded":
                store.finish_attempt(rollout.rollout_id, claim.sequence_id, "succeeded", "succeeded",
                                     result=RolloutResult(reward=reward))
            else:
                store.finish_attempt(rollout.rollout_id, claim.sequence_id, "failed", "failed",
                                     error=ErrorInfo(type="ToolError", message="the tool broke"))

    monkeypatch.setattr(fake_client, "publish", publish)
    return Experiments(fake_client)


def ab(name: str = "ab", **fields: Any) -> Experiment:
    return Experiment(name=name, variants=[Variant(name="control", resources_id="rs-a"),
                                           Variant(name="treatment", resources_id="rs-b")],
                      unit_key="input.user", **fields)


def same_report(live: Any, full: Any) -> None:
    for a, b in zip(live.variants, full.variants, strict=True):
        assert (a.rollouts, a.finished, a.succeeded, a.failed, a.errors, a.units) == \
               (b.rollouts, b.finished, b.succeeded, b.failed, b.errors, b.units)
        assert sorted(a.rewards) == pytest.approx(sorted(b.rewards))
        for field in ("mean_reward", "std_reward", "latency_p50", "latency_p95", "success_rate"):
            assert getattr(a, field) == pytest.approx(getattr(b, field)), field
        assert a.reward_ci == pytest.approx(b.reward_ci)
    for a, b in zip(live.comparisons, full.comparisons, strict=True):
        assert a.verdict == b.verdict
        assert a.sequential.p_value == pytest.approx(b.sequential.p_value)
        assert a.welch.p_value == pytest.approx(b.welch.p_value)
    assert live.winner == full.winner


def test_the_live_report_equals_the_report_read_from_every_rollout(experiments: Experiments) -> None:
    experiments.create(ab())
    experiments.start("ab")
    experiments.enqueue("ab", [{"user": f"u{i}"} for i in range(300)])
    experiments.enqueue("ab", [{"user": f"c{i}", "cancel": True} for i in range(5)])
    live, full = experiments.live_report("ab"), experiments.report("ab")
    same_report(live, full)
    treatment = live.variants[1]
    assert treatment.errors == {"ToolError": treatment.failed} and treatment.failed > 0
    assert live.winner == "treatment"
    tally = experiments.redis.hgetall(experiments.keys.experiment_tally("ab", "control"))
    assert int(tally.get(b"cancelled", 0)) + int(experiments.redis.hget(
        experiments.keys.experiment_tally("ab", "treatment"), "cancelled") or 0) == 5


def test_the_live_report_of_a_paired_experiment_pairs_by_unit(experiments: Experiments) -> None:
    experiments.create(ab(paired=True))
    experiments.start("ab")
    experiments.enqueue("ab", [{"user": f"u{i}"} for i in range(60)])
    live, full = experiments.live_report("ab"), experiments.report("ab")
    same_report(live, full)
    assert live.comparisons[0].paired.n == full.comparisons[0].paired.n > 0  # type: ignore[union-attr]
    assert live.comparisons[0].paired.t_p_value == pytest.approx(full.comparisons[0].paired.t_p_value)  # type: ignore[union-attr]


def test_a_forced_delete_counts_the_rollouts_it_fails(experiments: Experiments, monkeypatch: pytest.MonkeyPatch) -> None:
    client = experiments.client
    monkeypatch.setattr(client, "publish", lambda rollouts, seq=0: None)  # they wait in the queue
    experiments.create(ab())
    experiments.start("ab")
    rollouts = experiments.enqueue("ab", [{"user": f"u{i}"} for i in range(20)])
    on_b = sum(r.metadata["variant"] == "treatment" for r in rollouts)
    client.delete_resources("rs-b", force=True)
    tally = experiments.redis.hgetall(experiments.keys.experiment_tally("ab", "treatment"))
    assert int(tally[b"failed"]) == on_b == int(tally[b"error:SnapshotDeletedError"])
    assert experiments.live_report("ab").variants[1].failed == on_b


def test_rollouts_outside_an_experiment_leave_no_tally(experiments: Experiments, monkeypatch: pytest.MonkeyPatch) -> None:
    client = experiments.client
    before = set(client.redis.keys("*"))
    # Metadata naming an experiment that does not exist (a user's own tag) creates nothing.
    client.enqueue_rollouts([{"user": "x"}], metadata={"experiment": "nope", "variant": "a", "unit": "x"})
    client.enqueue_rollouts([{"user": "y"}])
    new = {k.decode() for k in set(client.redis.keys("*")) - before}
    assert not [k for k in new if ":experiment:" in k]


def test_the_live_report_reads_no_rollout_record(experiments: Experiments, monkeypatch: pytest.MonkeyPatch) -> None:
    experiments.create(ab())
    experiments.start("ab")
    experiments.enqueue("ab", [{"user": f"u{i}"} for i in range(50)])
    commands: list[str] = []
    pipeline = experiments.redis.pipeline

    def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        def run(*a: Any, **k: Any) -> Any:
            commands.extend(str(c[0][0]) for c in pipe.command_stack)
            return execute(*a, **k)

        pipe.execute = run
        return pipe

    monkeypatch.setattr(experiments.redis, "pipeline", counted_pipeline)
    experiments.live_report("ab")
    assert commands and "HGETALL" in commands and len(commands) == 10  # 5 per variant, whatever the rollouts


def test_the_trajectory_ends_at_the_reports_mean_and_interval(experiments: Experiments) -> None:
    from lightning_queue.experiments.report import report_from_outcomes, reward_trajectory

    experiments.create(ab())
    experiments.start("ab")
    experiments.enqueue("ab", [{"user": f"u{i}"} for i in range(200)])
    exp, outcomes, units = experiments.outcomes("ab")
    report = report_from_outcomes(exp, outcomes, units)
    for variant in report.variants:
        points = reward_trajectory(outcomes[variant.name], 0.05)
        assert len(points) == 60 and points[0]["n"] == 1 and points[0]["ci"] is None
        assert points[-1]["n"] == len(variant.rewards)
        assert points[-1]["mean"] == pytest.approx(variant.mean_reward)
        assert points[-1]["ci"] == pytest.approx(list(variant.reward_ci))
