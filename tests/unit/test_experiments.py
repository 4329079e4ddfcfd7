"""Experiments on fakeredis: assignment, routing, reports, promotion, the canary and the CLI.

Rollout outcomes are simulated by finishing the rollouts through the store's own
scripts as a worker would (claim, start, finish), so reports and the canary read
exactly what real workers would have written.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sp
from typer.testing import CliRunner

from lightning_queue import LightningClient, PromptTemplate, Rollout
from lightning_queue.core.errors import (
    ExperimentError,
    ExperimentExistsError,
    ExperimentNotFoundError,
    ExperimentStateError,
    ExperimentUnitError,
    InvalidExperimentError,
    PointerError,
    ProtectedPointerError,
    ResourcesNotFoundError,
)
from lightning_queue.core.models import ErrorInfo, RolloutResult, default_actor
from lightning_queue.experiments.canary import Canary, Guardrail
from lightning_queue.experiments.manager import (
    BUCKETS,
    Experiment,
    Experiments,
    Variant,
    bucket,
)
from lightning_queue.experiments.report import MAX_REGRESSIONS
from lightning_queue.ops import cli

Outcome = Callable[[Rollout], tuple[str, float | None]]


@pytest.fixture
def snapshots(fake_client: LightningClient) -> LightningClient:
    """rs-a (prod) and rs-b (latest)."""
    fake_client.add_resources({"prompt": PromptTemplate(template="a {x}")}, "rs-a")
    fake_client.add_resources({"prompt": PromptTemplate(template="b {x}")}, "rs-b")
    fake_client.set_pointer("prod", "rs-a")
    return fake_client


@pytest.fixture
def experiments(snapshots: LightningClient) -> Experiments:
    return Experiments(snapshots)


@pytest.fixture
def outcome(snapshots: LightningClient, monkeypatch: pytest.MonkeyPatch) -> dict[str, Outcome]:
    """Rollouts finish as soon as they are published, as ``outcome["fn"](rollout)`` says:
    ``("succeeded", reward)`` or ``("failed", None)``. Default: all succeed with reward 1."""
    rule: dict[str, Outcome] = {"fn": lambda r: ("succeeded", 1.0)}
    store = snapshots.store

    def publish(rollouts: list[Rollout], registry_seq: int = 0) -> None:
        for rollout in rollouts:
            claim = store.claim(rollout, "sim@host")
            # Resolved as a worker does: a pointer names whatever snapshot it names now.
            snap = snapshots.get_resources_by_id(rollout.resources_id or "latest", rollout.resources_version)
            assert store.start_attempt(rollout.rollout_id, claim.sequence_id, snap.resources_id, snap.version)
            status, reward = rule["fn"](rollout)
            if status == "succeeded":
                store.finish_attempt(rollout.rollout_id, claim.sequence_id, "succeeded", "succeeded",
                                     result=RolloutResult(reward=reward))
            else:
                store.finish_attempt(rollout.rollout_id, claim.sequence_id, "failed", "failed",
                                     error=ErrorInfo(type="ToolError", message="the tool broke"))

    monkeypatch.setattr(snapshots, "publish", publish)
    return rule


def ab(name: str = "ab", **fields: Any) -> Experiment:
    fields.setdefault("variants", [Variant(name="control", resources_id="rs-a"),
                                   Variant(name="treatment", resources_id="rs-b")])
    fields.setdefault("unit_key", "input.user")
    return Experiment(name=name, **fields)


def users(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"user": f"u{i}", "question": "1 + 1"} for i in range(start, start + n)]


# --------------------------------------------------------------------------- assignment


def test_buckets_are_the_same_in_another_process() -> None:
    """BLAKE2b, not hash(): another interpreter with another hash seed agrees on every unit."""
    units = [f"user-{i}" for i in range(200)] + ["", "ünïcode", "7"]
    here = [bucket("salt", 3, u) for u in units]
    code = ("import json, sys; from lightning_queue.experiments.manager import bucket; "
            "print(json.dumps([bucket('salt', 3, u) for u in json.loads(sys.stdin.read())]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(units), capture_output=True, text=True,
                         env=env, check=True)
    assert json.loads(out.stdout) == here
    assert len(set(here)) > 150  # and they are not all the same


def test_buckets_are_uniform_over_100k_units() -> None:
    counts = np.bincount([bucket("uniform", 1, f"u{i}") // 100 for i in range(100_000)], minlength=BUCKETS // 100)
    assert len(counts) == 100
    p = sp.chisquare(counts).pvalue
    assert p > 0.001, f"buckets are not uniform (chi-square p={p:.2g})"


def test_weights_are_respected_within_one_percent() -> None:
    exp = ab(variants=[Variant(name="a", resources_id="rs-a", weight=70), Variant(name="b", resources_id="rs-b", weight=20),
                       Variant(name="c", resources_id="rs-b", weight=10)])
    counts = Counter(exp.assign(f"u{i}") for i in range(100_000))
    for name, share in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        assert abs(counts[name] / 100_000 - share) < 0.01, counts


def test_the_same_unit_always_gets_the_same_variant() -> None:
    exp = ab()
    first = [exp.assign(f"u{i}") for i in range(1000)]
    assert first == [ab().assign(f"u{i}") for i in range(1000)]
    assert exp.assign(7) == exp.assign(7) and set(first) == {"control", "treatment"}


def test_a_weight_change_moves_as_few_units_as_possible() -> None:
    before = ab()
    after = ab(variants=[Variant(name="control", resources_id="rs-a", weight=60),
                         Variant(name="treatment", resources_id="rs-b", weight=40)])
    moves = Counter((before.assign(f"u{i}"), after.assign(f"u{i}")) for i in range(100_000))
    moved = sum(n for (a, b), n in moves.items() if a != b)
    assert 0.09 < moved / 100_000 < 0.11  # 50/50 -> 60/40: the minimum is 10%
    assert moves[("control", "treatment")] == 0  # and only in the direction the change asks for


def test_growing_the_treatment_only_ever_moves_units_into_it() -> None:
    steps = [0.01, 0.05, 0.25, 0.5, 1.0]
    assignments = [[ab(variants=[Variant(name="control", resources_id="rs-a", weight=1 - w),
                                 Variant(name="treatment", resources_id="rs-b", weight=w)]).assign(f"u{i}")
                    for i in range(20_000)] for w in steps]
    for earlier, later in itertools.pairwise(assignments):
        assert all(b == "treatment" for a, b in zip(earlier, later) if a == "treatment")
    assert all(a == "treatment" for a in assignments[-1])


def test_coverage_is_independent_of_the_variant_and_only_adds_units() -> None:
    small, large = ab(coverage=0.3), ab(coverage=0.6)
    units = [f"u{i}" for i in range(20_000)]
    a, b = [small.assign(u) for u in units], [large.assign(u) for u in units]
    assert abs(sum(x is not None for x in a) / len(units) - 0.3) < 0.015
    assert all(y == x for x, y in zip(a, b) if x is not None)  # kept, with the same variant
    inside = [x for x in a if x is not None]
    assert abs(inside.count("control") / len(inside) - 0.5) < 0.03  # the split is 50/50 inside coverage


def test_a_new_bucket_version_rebuckets() -> None:
    units = [f"u{i}" for i in range(10_000)]
    v1, v2 = ab(), ab(bucket_version=2)
    changed = sum(v1.assign(u) != v2.assign(u) for u in units) / len(units)
    assert 0.45 < changed < 0.55  # independent draws: about half change


# --------------------------------------------------------------------------- definition and status


def test_create_validates_and_refuses_a_taken_name(experiments: Experiments) -> None:
    exp = experiments.create(ab())
    assert exp.status == "draft" and exp.salt == "ab"
    assert experiments.get("ab") == exp
    with pytest.raises(ExperimentExistsError, match="'ab' already exists"):
        experiments.create(ab())
    with pytest.raises(ResourcesNotFoundError, match=r"'rs-nope'.*was not created"):
        experiments.create(ab("other", variants=[Variant(name="c", resources_id="rs-a"),
                                                 Variant(name="t", resources_id="rs-nope")]))
    with pytest.raises(InvalidExperimentError, match="unique"):
        experiments.create({"name": "dup", "variants": [{"name": "x", "resources_id": "rs-a"},
                                                        {"name": "x", "resources_id": "rs-b"}]})
    with pytest.raises(InvalidExperimentError, match="unit_key"):
        experiments.create({"name": "bad", "unit_key": "user", "variants": [
            {"name": "c", "resources_id": "rs-a"}, {"name": "t", "resources_id": "rs-b"}]})
    with pytest.raises(ExperimentNotFoundError, match="'ghost'"):
        experiments.get("ghost")
    assert [e.name for e in experiments.all()] == ["ab"]


def test_status_changes(experiments: Experiments) -> None:
    experiments.create(ab())
    with pytest.raises(ExperimentStateError, match="draft"):
        experiments.stop("ab")
    assert experiments.start("ab").status == "running"
    with pytest.raises(ExperimentStateError, match="stop it first"):
        experiments.start("ab")
    stopped = experiments.stop("ab", "looked enough")
    assert (stopped.status, stopped.stop_reason) == ("stopped", "looked enough")
    restarted = experiments.start("ab")
    assert restarted.bucket_version == 1  # sticky
    experiments.stop("ab")
    assert experiments.start("ab", rebucket=True).bucket_version == 2
    assert experiments.get("ab").revision == 5


# --------------------------------------------------------------------------- routing


def test_enqueue_pins_each_unit_to_its_variant(experiments: Experiments, snapshots: LightningClient,
                                               published: list[str]) -> None:
    experiments.create(ab())
    with pytest.raises(ExperimentStateError, match="start it"):
        experiments.enqueue("ab", users(3))
    experiments.start("ab")
    rollouts = experiments.enqueue("ab", users(200) + users(50), metadata={"run": "r1"})
    assert len(rollouts) == 250 and len(published) == 250
    exp = experiments.get("ab")
    for r in rollouts:
        variant = exp.assign(r.input["user"])
        assert r.metadata == {"run": "r1", "experiment": "ab", "variant": variant, "unit": r.input["user"],
                              "bucket_version": 1}
        assert (r.resources_id, r.resources_version, r.resolve) == (exp.variant(variant).resources_id, 1, "pinned")
    ids = experiments.rollout_ids("ab")
    assert sorted(ids["control"] + ids["treatment"]) == sorted(r.rollout_id for r in rollouts)
    _, _, units = experiments.snapshot("ab")
    assert units["control"] + units["treatment"] == 200  # repeated users are one unit each


def test_enqueue_resolves_a_pointer_variant_now(experiments: Experiments, snapshots: LightningClient,
                                                published: list[str]) -> None:
    experiments.create(ab(variants=[Variant(name="control", resources_id="prod"),
                                    Variant(name="treatment", resources_id="rs-b")]))
    experiments.start("ab")
    first = [r for r in experiments.enqueue("ab", users(40)) if r.metadata["variant"] == "control"]
    snapshots.set_pointer("prod", "rs-b")
    later = [r for r in experiments.enqueue("ab", users(40)) if r.metadata["variant"] == "control"]
    assert {r.resources_id for r in first} == {"rs-a"} and {r.resources_id for r in later} == {"rs-b"}


def test_a_missing_unit_enqueues_nothing(experiments: Experiments, published: list[str]) -> None:
    experiments.create(ab())
    experiments.start("ab")
    with pytest.raises(ExperimentUnitError, match=r"'input\.user'.*no value"):
        experiments.enqueue("ab", [*users(3), {"question": "no user"}])
    assert published == [] and experiments.rollout_ids("ab") == {"control": [], "treatment": []}
    # A function of the input may name the unit instead.
    rollouts = experiments.enqueue("ab", [{"q": 1}, {"q": 2}], unit=lambda item: item["q"])
    assert [r.metadata["unit"] for r in rollouts] == ["1", "2"]


def test_units_outside_coverage_get_the_fallback_and_are_not_counted(
    experiments: Experiments, snapshots: LightningClient, published: list[str]
) -> None:
    snapshots.add_resources({"prompt": PromptTemplate(template="c {x}")}, "rs-c")
    experiments.create(ab(coverage=0.2, fallback="rs-c"))
    experiments.start("ab")
    rollouts = experiments.enqueue("ab", users(500))
    outside = [r for r in rollouts if r.metadata["variant"] is None]
    assert 0.7 < len(outside) / 500 < 0.9
    assert {r.resources_id for r in outside} == {"rs-c"}
    ids = experiments.rollout_ids("ab")
    assert len(ids["control"]) + len(ids["treatment"]) == 500 - len(outside)


def test_a_paired_experiment_runs_every_input_under_every_variant(
    experiments: Experiments, published: list[str]
) -> None:
    experiments.create(ab(paired=True, unit_key="input.question"))
    experiments.start("ab")
    items = [{"question": f"{i} + {i}"} for i in range(10)]
    rollouts = experiments.enqueue("ab", items)
    assert [(r.input, r.metadata["variant"]) for r in rollouts] == [
        (item, v) for item in items for v in ("control", "treatment")
    ]


def test_enqueue_takes_a_constant_number_of_round_trips(
    experiments: Experiments, snapshots: LightningClient, published: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    experiments.create(ab())
    experiments.start("ab")
    calls: list[str] = []
    redis_type = type(snapshots.redis)
    pipeline_type = type(snapshots.redis.pipeline())
    original, original_execute = redis_type.execute_command, pipeline_type.execute

    def command(self: Any, *args: Any, **kwargs: Any) -> Any:  # one round trip each
        calls.append(str(args[0]))
        return original(self, *args, **kwargs)

    def pipeline(self: Any, *args: Any, **kwargs: Any) -> Any:  # one round trip, whatever it holds
        calls.append("PIPELINE")
        return original_execute(self, *args, **kwargs)

    monkeypatch.setattr(redis_type, "execute_command", command)
    monkeypatch.setattr(pipeline_type, "execute", pipeline)
    experiments.enqueue("ab", users(5))
    small = len(calls)
    calls.clear()
    experiments.enqueue("ab", users(300, start=5))
    assert len(calls) == small, calls


# --------------------------------------------------------------------------- reports


def test_report_per_variant_metrics_and_comparison(
    experiments: Experiments, outcome: dict[str, Outcome], tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)

    def simulate(r: Rollout) -> tuple[str, float | None]:
        if r.metadata["variant"] == "treatment":
            return ("failed", None) if rng.random() < 0.1 else ("succeeded", float(rng.normal(0.8, 0.1)))
        return "succeeded", float(rng.normal(0.5, 0.1))

    outcome["fn"] = simulate
    experiments.create(ab())
    experiments.start("ab")
    experiments.enqueue("ab", users(400))
    report = experiments.report("ab")
    control, treatment = report.variants
    assert control.units + treatment.units == 400 == control.rollouts + treatment.rollouts
    assert control.success_rate == 1.0 and 0.8 < treatment.success_rate < 0.97  # type: ignore[operator]
    assert treatment.errors == {"ToolError": treatment.failed} and treatment.failed > 0
    assert len(treatment.rewards) == treatment.succeeded
    assert control.mean_reward == pytest.approx(0.5, abs=0.03) and treatment.mean_reward == pytest.approx(0.8, abs=0.03)
    assert control.reward_ci[0] < control.mean_reward < control.reward_ci[1]  # type: ignore[index]
    assert control.latency_p50 is not None and control.latency_p50 <= control.latency_p95  # type: ignore[operator]
    (comparison,) = report.comparisons
    assert comparison.verdict == "better" and report.winner == "treatment"
    assert comparison.welch.diff == pytest.approx(0.3, abs=0.04)  # type: ignore[union-attr]
    assert comparison.prob_beats > 0.999 and comparison.prob_success_beats < 0.01  # type: ignore[operator]
    assert report.srm is not None and not report.srm.flagged

    data = json.loads(report.to_json())
    assert data["winner"] == "treatment" and data["variants"][1]["errors"] == {"ToolError": treatment.failed}
    assert "rewards" not in data["variants"][0]
    png = report.save_chart(tmp_path / "ab.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_report_waits_for_the_minimum_sample(experiments: Experiments, outcome: dict[str, Outcome]) -> None:
    outcome["fn"] = lambda r: ("succeeded", 1.0 if r.metadata["variant"] == "treatment" else 0.0)
    experiments.create(ab())
    experiments.start("ab")
    experiments.enqueue("ab", users(20))
    (comparison,) = experiments.report("ab", min_sample=30).comparisons
    n, need = map(int, comparison.verdict.removeprefix("too few: ").split("/"))
    assert n < need == 30 and comparison.sequential is not None  # tested, but not yet judged
    experiments.enqueue("ab", users(200, start=20))
    assert experiments.report("ab", min_sample=30).comparisons[0].verdict == "better"


def test_report_flags_a_sample_ratio_mismatch(
    experiments: Experiments, snapshots: LightningClient, outcome: dict[str, Outcome]
) -> None:
    experiments.create(ab())
    experiments.start("ab")
    rollouts = experiments.enqueue("ab", users(600))
    assert not experiments.report("ab").srm.flagged  # type: ignore[union-attr]
    # A broken pipeline loses half the treatment's units: the split no longer matches 50/50.
    lost = [r.metadata["unit"] for r in rollouts if r.metadata["variant"] == "treatment"][::2]
    snapshots.redis.srem(snapshots.keys.experiment_units("ab", "treatment"), *lost)
    check = experiments.report("ab").srm
    assert check is not None and check.flagged and check.p_value < 0.001


def test_no_sample_ratio_check_once_units_were_assigned_under_other_weights(
    experiments: Experiments, outcome: dict[str, Outcome]
) -> None:
    experiments.create(ab())
    experiments.set_weights("ab", {"treatment": 3})  # before the start: still one split
    experiments.start("ab")
    experiments.enqueue("ab", users(100))
    assert not experiments.get("ab").reassigned and experiments.report("ab").srm is not None
    experiments.set_weights("ab", {"treatment": 1})
    experiments.enqueue("ab", users(100, start=100))
    assert experiments.get("ab").reassigned and experiments.report("ab").srm is None


def test_paired_report_uses_paired_tests(experiments: Experiments, outcome: dict[str, Outcome]) -> None:
    # Inputs vary a lot in difficulty, the treatment adds a small, steady 0.05: only pairing sees it.
    difficulty = {f"{i}": float(d) for i, d in enumerate(np.random.default_rng(2).uniform(0, 1, 40))}
    noise = np.random.default_rng(3)
    outcome["fn"] = lambda r: ("succeeded", difficulty[r.input["question"]]
                               + (0.05 if r.metadata["variant"] == "treatment" else 0.0) + noise.normal(0, 0.01))
    experiments.create(ab(paired=True, unit_key="input.question"))
    experiments.start("ab")
    experiments.enqueue("ab", [{"question": q} for q in difficulty])
    (comparison,) = experiments.report("ab").comparisons
    assert comparison.paired is not None and comparison.paired.n == 40
    assert comparison.paired.t_p_value < 1e-6 and comparison.verdict == "better"
    assert comparison.welch.p_value > 0.05  # type: ignore[union-attr]  # the unpaired test cannot tell
    assert experiments.report("ab").srm is None  # the split is equal by construction


def test_paired_report_lists_the_inputs_worse_under_the_treatment_worst_first(
    experiments: Experiments, outcome: dict[str, Outcome], invoke: Callable[..., Any]
) -> None:
    # 30 inputs: the treatment loses 0.01 * i on input q{i} for i < 25 and gains on the rest.
    def reward(r: Rollout) -> tuple[str, float | None]:
        i = int(r.input["question"][1:])
        delta = -0.01 * i if i < 25 else 0.5
        return "succeeded", 1.0 + (delta if r.metadata["variant"] == "treatment" else 0.0)

    outcome["fn"] = reward
    experiments.create(ab(paired=True, unit_key="input.question"))
    experiments.start("ab")
    experiments.enqueue("ab", [{"question": f"q{i}"} for i in range(30)])
    for report in (experiments.report("ab"), experiments.live_report("ab")):
        (comparison,) = report.comparisons
        worse = comparison.regressions
        assert len(worse) == MAX_REGRESSIONS == 20  # bounded: 24 inputs got worse (q0 did not change)
        assert [r.unit for r in worse] == [f"q{i}" for i in range(24, 4, -1)]  # the worst first
        assert worse[0].control == pytest.approx(1.0) and worse[0].treatment == pytest.approx(0.76)
        assert worse[0].delta == pytest.approx(-0.24)
        assert report.to_dict()["comparisons"][0]["regressions"][0]["unit"] == "q24"
    out = invoke("experiments", "report", "ab").stdout
    assert "inputs worse under treatment" in out and "q24" in out and "-0.240" in out


def test_reports_name_the_snapshot_versions_each_variant_ran(
    experiments: Experiments, snapshots: LightningClient, outcome: dict[str, Outcome], invoke: Callable[..., Any]
) -> None:
    experiments.create(ab(variants=[Variant(name="control", resources_id="prod"),
                                    Variant(name="treatment", resources_id="rs-b")]))
    experiments.start("ab")
    experiments.enqueue("ab", users(40))
    snapshots.add_resources({"prompt": PromptTemplate(template="c {x}")}, "rs-c")
    snapshots.set_pointer("prod", "rs-c")  # as a promotion would
    experiments.enqueue("ab", users(40, start=100))
    for report in (experiments.report("ab"), experiments.live_report("ab")):
        control, treatment = report.variants
        assert control.resources_id == "prod"  # the pointer name, and what it named when each rollout ran:
        assert {(r.resources_id, r.version) for r in control.ran} == {("rs-a", 1), ("rs-c", 1)}
        assert sum(r.rollouts for r in control.ran) == control.finished
        assert [(r.resources_id, r.version, r.rollouts) for r in treatment.ran] == [("rs-b", 1, treatment.finished)]
        assert report.to_dict()["variants"][1]["ran"] == [{"resources_id": "rs-b", "version": 1,
                                                           "rollouts": treatment.finished}]
    shown = invoke("experiments", "report", "ab").stdout
    assert "the snapshot versions each variant ran" in shown and "rs-c" in shown


# --------------------------------------------------------------------------- promotion


def test_promote_moves_the_pointer_and_stops_the_experiment_together(
    experiments: Experiments, snapshots: LightningClient, outcome: dict[str, Outcome]
) -> None:
    outcome["fn"] = lambda r: ("succeeded", 1.0 if r.metadata["variant"] == "treatment" else 0.0)
    experiments.create(ab())
    experiments.start("ab")
    experiments.enqueue("ab", users(200))
    done = experiments.promote("ab", pointer="prod")  # the report's winner
    assert (done.pointer, done.from_id, done.to_id, done.winner) == ("prod", "rs-a", "rs-b", "treatment")
    exp = experiments.get("ab")
    assert (exp.status, exp.winner) == ("stopped", "treatment") and snapshots.get_pointer("prod") == "rs-b"
    move = snapshots.pointer_history("prod", 1)[0]
    assert (move.from_id, move.to_id, move.op, move.by) == ("rs-a", "rs-b", "promote ab", default_actor())
    assert move.reason == "promoted 'treatment' to 'prod'"
    with pytest.raises(ExperimentStateError, match="concluded"):
        experiments.start("ab")


def test_promote_refuses_without_a_winner_and_changes_nothing_on_conflict(
    experiments: Experiments, snapshots: LightningClient, outcome: dict[str, Outcome]
) -> None:
    experiments.create(ab())
    experiments.start("ab")
    experiments.enqueue("ab", users(100))  # every reward 1: no difference
    with pytest.raises(ExperimentError, match=r"no variant .* beats the control"):
        experiments.promote("ab", pointer="prod")
    with pytest.raises(PointerError, match="not the expected 'rs-b'"):
        experiments.promote("ab", "treatment", "prod", expected="rs-b")
    assert experiments.get("ab").status == "running" and snapshots.get_pointer("prod") == "rs-a"


# --------------------------------------------------------------------------- canary


def _canary(client: LightningClient, name: str, **kwargs: Any) -> Canary:
    client.add_resources({"prompt": PromptTemplate(template="new {x}")}, "rs-new")
    return Canary(client, name, "rs-new", pointer="prod", unit_key="input.user", rollouts_per_step=40,
                  guardrail=Guardrail(max_failure_increase=0.05, min_sample=20), **kwargs)


def _traffic() -> Any:
    i = 0
    while True:
        yield {"user": f"u{i}", "question": "2 + 2"}
        i += 1


def test_a_canary_whose_treatment_fails_more_is_rolled_back(
    snapshots: LightningClient, outcome: dict[str, Outcome]
) -> None:
    rng = np.random.default_rng(4)
    outcome["fn"] = lambda r: (("failed", None) if rng.random() < (0.4 if r.resources_id == "rs-new" else 0.02)
                               else ("succeeded", 1.0))
    canary = _canary(snapshots, "cn", schedule=(0.2, 0.5, 1.0))
    result = canary.run(_traffic(), batch_size=100)
    assert result.outcome == "rolled_back", result
    assert "failure rate" in result.reason and "sequential p=" in result.reason
    assert snapshots.get_pointer("canary") == "rs-a" and snapshots.get_pointer("prod") == "rs-a"
    exp = Experiments(snapshots).get("cn")
    assert exp.status == "stopped" and exp.stop_reason.startswith("guardrail: failure rate")  # type: ignore[union-attr]
    move = snapshots.pointer_history("canary", 1)[0]
    assert (move.from_id, move.to_id) == ("rs-new", "rs-a") and "failure rate" in move.reason
    assert move.op == "rollback cn"


def test_a_healthy_canary_walks_the_schedule_and_is_promoted(
    snapshots: LightningClient, outcome: dict[str, Outcome]
) -> None:
    rng = np.random.default_rng(5)
    outcome["fn"] = lambda r: ("failed", None) if rng.random() < 0.02 else ("succeeded", float(rng.normal(0.7, 0.1)))
    result = _canary(snapshots, "cn", schedule=(0.05, 0.25, 1.0)).run(_traffic(), batch_size=100)
    assert result.outcome == "promoted", result
    assert [s.weight for s in result.steps] == [0.05, 0.25, 1.0]
    assert all(s.treatment_finished >= 40 for s in result.steps)
    assert snapshots.get_pointer("prod") == "rs-new"
    assert Experiments(snapshots).get("cn").winner == "treatment"


def test_a_canary_promotes_a_protected_pointer_only_with_a_reason(
    snapshots: LightningClient, outcome: dict[str, Outcome]
) -> None:
    outcome["fn"] = lambda r: ("succeeded", 0.7)
    snapshots.protect_pointer("prod", "serves users")
    with pytest.raises(ProtectedPointerError):
        _canary(snapshots, "cn", schedule=(1.0,)).run(_traffic(), batch_size=100)
    assert snapshots.get_pointer("prod") == "rs-a" and Experiments(snapshots).get("cn").status == "running"

    result = Canary(snapshots, "cn2", "rs-new", pointer="prod", unit_key="input.user", rollouts_per_step=40,
                    schedule=(1.0,), promote_reason="canary cn2 held", actor="ci").run(_traffic(), batch_size=100)
    assert result.outcome == "promoted" and snapshots.get_pointer("prod") == "rs-new"
    move = snapshots.pointer_history("prod", 1)[0]
    assert (move.by, move.op) == ("ci", "promote cn2") and move.reason.endswith("forced: canary cn2 held")


def test_a_canary_with_a_reward_drop_is_rolled_back(snapshots: LightningClient, outcome: dict[str, Outcome]) -> None:
    rng = np.random.default_rng(6)
    outcome["fn"] = lambda r: ("succeeded", float(rng.normal(0.4 if r.resources_id == "rs-new" else 0.7, 0.1)))
    result = _canary(snapshots, "cn", schedule=(0.25, 1.0)).run(_traffic(), batch_size=100)
    assert result.outcome == "rolled_back" and "mean reward" in result.reason
    assert snapshots.get_pointer("canary") == "rs-a"


def test_a_canary_schedule_must_increase(snapshots: LightningClient) -> None:
    with pytest.raises(InvalidExperimentError, match="increasing"):
        Canary(snapshots, "cn", "rs-b", schedule=(0.5, 0.2))


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def invoke(snapshots: LightningClient, outcome: dict[str, Outcome]) -> Callable[..., Any]:
    runner = CliRunner()
    return lambda *args: runner.invoke(cli.app, list(args), obj=cli.CliContext(client=snapshots))


def test_cli_create_start_report_promote(invoke: Callable[..., Any], snapshots: LightningClient,
                                         outcome: dict[str, Outcome], tmp_path: Path) -> None:
    result = invoke("experiments", "create", "cx", "--variant", "control=prod", "--variant", "treatment=rs-b:1",
                    "--unit-key", "input.user")
    assert result.exit_code == 0 and "created cx (draft): control=prod:1, treatment=rs-b:1" in result.stdout
    assert invoke("experiments", "start", "cx").stdout == "cx: running (bucket version 1)\n"
    outcome["fn"] = lambda r: ("succeeded", 1.0 if r.metadata["variant"] == "treatment" else 0.5)
    Experiments(snapshots).enqueue("cx", users(100))
    result = invoke("experiments", "status")
    assert result.exit_code == 0 and "cx" in result.stdout and "running" in result.stdout
    result = invoke("experiments", "report", "cx", "--json", "--chart", str(tmp_path / "cx.png"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["winner"] == "treatment" and (tmp_path / "cx.png").exists()
    result = invoke("experiments", "report", "cx")
    assert result.exit_code == 0 and "better" in result.stdout and "sample ratio" in result.stdout
    result = invoke("experiments", "promote", "cx", "--pointer", "prod")
    assert result.exit_code == 0 and result.stdout == "prod: rs-a -> rs-b (treatment); cx stopped\n"


def test_cli_status_of_one_and_stop(invoke: Callable[..., Any]) -> None:
    assert invoke("experiments", "create", "cx", "-v", "c=rs-a", "-v", "t=rs-b:0.25", "--coverage", "0.5").exit_code == 0
    shown = json.loads(invoke("experiments", "status", "cx").stdout)
    assert shown["status"] == "draft" and shown["coverage"] == 0.5 and shown["variants"][1]["weight"] == 0.25
    invoke("experiments", "start", "cx")
    result = invoke("experiments", "stop", "cx", "--reason", "enough")
    assert result.exit_code == 0 and result.stdout == "cx: stopped (enough)\n"
    result = invoke("experiments", "stop", "cx")
    assert result.exit_code == 1 and "only a running experiment can be stopped" in result.stderr


def test_cli_errors_are_one_line(invoke: Callable[..., Any]) -> None:
    for args, fragment in (
        (("experiments", "start", "ghost"), "no experiment named 'ghost'"),
        (("experiments", "create", "cx", "--variant", "control"), "NAME=RESOURCES"),
        (("experiments", "create", "cx", "--variant", "c=rs-a", "--variant", "t=rs-zzz"), "'rs-zzz'"),
        (("experiments", "create", "cx", "--variant", "c=rs-a:x", "--variant", "t=rs-b"), "not a number"),
        (("experiments", "stop", "ghost"), "no experiment named 'ghost'"),
        (("experiments", "create", "cx", "-v", "c=rs-a", "-v", "t=rs-b", "--unit-key", "user"), "unit_key"),
    ):
        result = invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, (args, result.stderr)


def test_concurrent_changes_are_never_lost(experiments: Experiments, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each change is a WATCH/MULTI/EXEC read-modify-write. Two threads are made to read
    the experiment at the same moment, then each sets a different variant's weight: the
    second write is retried on the fresh state, so both land (a plain read-then-write
    would put the first variant's weight back)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lightning_queue.experiments import manager as module

    experiments.create(ab(variants=[Variant(name="control", resources_id="rs-a"),
                                    Variant(name="t1", resources_id="rs-b"), Variant(name="t2", resources_id="rs-b")]))
    both_read = threading.Barrier(2, timeout=10)
    waited: set[int] = set()
    parse = module.parse_experiment

    def parse_after_both_read(data: Any) -> Experiment:
        if threading.get_ident() not in waited:  # only the first attempt of each thread waits
            waited.add(threading.get_ident())
            both_read.wait()
        return parse(data)

    monkeypatch.setattr(module, "parse_experiment", parse_after_both_read)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: experiments.set_weights("ab", {n: 5.0}), ["t1", "t2"]))
    exp = experiments.get("ab")
    assert exp.weights == {"control": 1.0, "t1": 5.0, "t2": 5.0}
    assert exp.revision == 2


def test_a_canary_with_a_taken_name_moves_no_pointer(snapshots: LightningClient, outcome: dict[str, Outcome]) -> None:
    Experiments(snapshots).create(ab("cn"))
    with pytest.raises(ExperimentExistsError, match="'cn'"):
        _canary(snapshots, "cn").start()
    assert snapshots.get_pointer("canary") is None


def test_an_experiment_is_concluded_once(experiments: Experiments, snapshots: LightningClient) -> None:
    experiments.create(ab(variants=[Variant(name="control", resources_id="rs-a"),
                                    Variant(name="treatment", resources_id="latest")]))  # a pointer variant
    experiments.start("ab")
    done = experiments.promote("ab", "treatment", "prod")
    assert (done.from_id, done.to_id) == ("rs-a", "rs-b")  # the pointer's target, resolved in the same step
    assert experiments.get("ab").concluded
    with pytest.raises(ExperimentStateError, match="already concluded"):
        experiments.promote("ab", "control", "prod")
    with pytest.raises(ExperimentStateError, match="concluded"):
        experiments.set_weights("ab", {"treatment": 2})
    assert snapshots.get_pointer("prod") == "rs-b"
