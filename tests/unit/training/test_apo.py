"""APO on fakeredis, its rollouts run by the real runner inline, its critic scripted."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lightning_queue import (
    InvalidDatasetError,
    LightningClient,
    PointerError,
    PromptNotFoundError,
    PromptTemplate,
    RunConflictError,
    TrainingTimeoutError,
)
from lightning_queue.training import APO, Algorithm, APOResult, Dataset, Evaluation, Trainer, TrainingRun, lineage
from tests.unit.training.conftest import BETTER, SEED, WORSE, InlineFleet, ScriptedCritic, arithmetic, calc

TRAIN = arithmetic(8, "t")
VAL = arithmetic(12, "v")


class Crash(Exception):
    """Stands for the optimizer's process dying."""


@pytest.fixture
def start(fake_client: LightningClient) -> str:
    return fake_client.add_resources({"prompt": PromptTemplate(template=SEED)}, "calc").resources_id


def fit(client: LightningClient, critic: ScriptedCritic, run: str = "apo", **config: Any) -> APOResult:
    config = {"rounds": 1, "branch_factor": 2, "val_batch_size": 4, **config}
    with Trainer(APO(critic.critic(), **config), client=client, run_name=run) as trainer:
        return trainer.fit(calc, TRAIN, VAL)


def test_apo_finds_the_better_prompt_and_promotes_it_with_its_lineage(
    fake_client: LightningClient, fleet: InlineFleet, scripted: ScriptedCritic, start: str
) -> None:
    result = fit(fake_client, scripted)

    assert result.improved and result.best.template == BETTER
    assert result.best.verdict == "better" and result.best.mean_diff == 0.75
    assert result.best.p_value is not None and result.best.p_value < 0.05
    assert result.promoted is not None
    assert (result.promoted.pointer, result.promoted.from_id, result.promoted.to_id) == (
        "latest", start, result.best.resources_id)
    assert result.promoted.rollouts == result.rollouts_spent == 36  # 4 training, then 3 looks of 12, 12 and 8
    assert fake_client.get_pointer("latest") == fake_client.get_pointer("apo.best") == result.best.resources_id
    # Candidates were stored without moving latest: its only moves are the start's add and the promotion.
    assert [m.to_id for m in fake_client.pointer_history("latest")] == [result.best.resources_id, start]
    steps = lineage(fake_client, result.best.resources_id)
    assert [(s.template, s.round) for s in steps] == [(BETTER, 1), (SEED, 0)]
    assert steps[0].critique == scripted.critique and steps[0].parent_id == steps[1].resources_id
    assert (steps[1].parent_id, steps[1].parent_version) == (start, 1)
    # ...and the same lineage as version metadata, for `resources versions` and `diff`
    best = fake_client.get_resources_by_id(result.best.resources_id)
    assert (best.parent_id, best.parent_version) == (steps[1].resources_id, 1)
    assert best.message.startswith(f"APO {result.run} round 1: ")
    # The critic read the failed rollouts: their inputs, outputs and traces.
    critique_request = scripted.requests[0]["messages"][1]["content"]
    assert "Rollouts that went badly (3)" in critique_request and '"question": "1 * 7 + 3"' in critique_request
    assert "trace:" in critique_request and "output:" in critique_request
    # Every evaluation was paired on the same validation inputs, and the worse edit was not promoted.
    worse = next(c for c in result.candidates if c.template == WORSE)
    assert worse.verdict != "better" and worse.compared_with == result.start.resources_id
    assert result.rollouts_spent == result.stats.rollouts_created == len(fleet.ran) == len(set(fleet.ran))
    assert 0 < result.stats.fleet_seconds <= result.stats.wall_seconds


def test_apo_promotes_nothing_when_every_proposal_is_worse(
    fake_client: LightningClient, fleet: InlineFleet, start: str
) -> None:
    good = fake_client.add_resources({"prompt": PromptTemplate(template=BETTER)}, "good").resources_id
    fake_client.set_pointer("prod", good)
    worse_only = ScriptedCritic(proposals=[WORSE, "Q: {question} (never use the calculator)"])

    # Every rollout counts as bad (reward < 2), so the critic is asked even about a perfect prompt.
    result = fit(fake_client, worse_only, rounds=2, start="prod", promote_to="prod", success_threshold=2.0)

    assert not result.improved and result.promoted is None and result.promotions == []
    assert result.best.resources_id == result.start.resources_id
    assert fake_client.get_pointer("prod") == good and fake_client.get_pointer("latest") == good
    assert [m.to_id for m in fake_client.pointer_history("prod")] == [good]
    tried = [c for c in result.candidates if c.round]
    assert [c.verdict for c in tried] == ["worse", "worse"]
    # The sequential test stopped each comparison as soon as it could: 8 of the 12 pairs.
    assert [c.pairs for c in tried] == [8, 8] and all(c.mean_diff == -1.0 for c in tried)


def test_proposals_that_would_break_the_agent_are_dropped(
    fake_client: LightningClient, fleet: InlineFleet, start: str
) -> None:
    critic = ScriptedCritic(proposals=["Use the calculator: {query}", "Use the calculator {", "```\n```", BETTER])

    result = fit(fake_client, critic, branch_factor=4)

    reasons = {r["template"]: r["reason"] for r in result.rejected}
    assert reasons["Use the calculator: {query}"] == "placeholders changed (missing ['question'], added ['query'])"
    assert reasons["Use the calculator {"].startswith("does not parse")
    assert reasons[""] == "empty"
    assert [c.template for c in result.candidates if c.round] == [BETTER]
    assert result.best.template == BETTER


def test_the_paired_test_judges_on_the_whole_validation_set(
    fake_client: LightningClient, fleet: InlineFleet, scripted: ScriptedCritic, start: str
) -> None:
    result = fit(fake_client, scripted, test="paired")

    assert result.best.template == BETTER and result.best.pairs == len(VAL)
    assert result.best.p_value == pytest.approx(0.0039, abs=1e-4)  # Wilcoxon, 9 of 12 pairs better, none worse


def test_the_search_stops_before_passing_its_rollout_budget(
    fake_client: LightningClient, fleet: InlineFleet, scripted: ScriptedCritic, start: str
) -> None:
    result = fit(fake_client, scripted, rounds=3, max_rollouts=20)

    assert result.stopped == "budget" and result.rollouts_spent <= 20
    assert result.promoted is None  # 4 training rollouts, then one look (12): too few pairs to decide
    assert fake_client.get_pointer("latest") == start
    again = fit(fake_client, scripted, rounds=3, max_rollouts=20)  # a finished run stays finished
    assert again.rollouts_spent == result.rollouts_spent and again.stats.rollouts_created == 0
    assert again.rounds == result.rounds == 1
    more = fit(fake_client, scripted, rounds=3, max_rollouts=200)  # with more budget, the run goes on
    assert more.rounds == 3 and more.stopped == "rounds" and more.rollouts_spent > 20
    assert more.best.template == BETTER and fake_client.get_pointer("latest") == more.best.resources_id


def test_a_crashed_run_resumes_from_redis_without_asking_or_running_anything_twice(
    fake_client: LightningClient, fleet: InlineFleet, scripted: ScriptedCritic, start: str
) -> None:
    def crash_at_the_tenth(rollout_id: str) -> None:
        if len(fleet.ran) == 9:  # training batch done, critique made, midway through the first look
            raise Crash()

    fleet.before_run = crash_at_the_tenth
    with pytest.raises(Crash):
        fit(fake_client, scripted)
    assert scripted.critiques == 1 and len(scripted.requests) == 3
    fleet.before_run = None

    resumed = fit(fake_client, scripted)

    assert scripted.critiques == 1 and len(scripted.requests) == 3  # nothing asked again
    assert len(fleet.ran) == len(set(fleet.ran))  # no rollout ran twice
    # The first process had written 16 records (4 training, then the whole first look's 12) when it died.
    assert resumed.stats.rollouts_reused == 12 and resumed.stats.rollouts_created == resumed.rollouts_spent - 16
    assert resumed.best.template == BETTER and fake_client.get_pointer("latest") == resumed.best.resources_id
    # The same search uninterrupted spends exactly as many rollouts.
    assert fit(fake_client, ScriptedCritic(), run="again", start="calc").rollouts_spent == resumed.rollouts_spent


def test_a_run_name_resumes_only_the_same_search(
    fake_client: LightningClient, fleet: InlineFleet, scripted: ScriptedCritic, start: str
) -> None:
    fake_client.add_resources({"prompt": PromptTemplate(template="Other: {question}")}, "other")
    fit(fake_client, scripted, start="calc")

    with pytest.raises(RunConflictError, match=r"training run 'apo' was started from 'calc', not 'other'"):
        fit(fake_client, scripted, start="other")

    class Nothing(Algorithm[None]):
        def run(self, run: TrainingRun, train: Dataset, val: Dataset) -> None:
            return None

    with pytest.raises(RunConflictError, match="started from algorithm APO, not algorithm Nothing"):
        Trainer(Nothing(), client=fake_client, run_name="apo").fit(calc, TRAIN)


def test_the_template_to_optimize_must_be_named_when_there_are_several(
    fake_client: LightningClient, fleet: InlineFleet, scripted: ScriptedCritic
) -> None:
    fake_client.add_resources({"system": PromptTemplate(template="Be exact."),
                               "prompt": PromptTemplate(template=SEED)}, "two")

    with pytest.raises(PromptNotFoundError, match=r"holds several prompt templates \(.*: prompt, system\)"):
        fit(fake_client, scripted)
    assert fit(fake_client, scripted, run="named", prompt_name="prompt").best.template == BETTER


def test_a_pointer_moved_by_someone_else_during_the_run_is_not_overwritten(
    fake_client: LightningClient, fleet: InlineFleet, scripted: ScriptedCritic, start: str
) -> None:
    other = fake_client.add_resources({"prompt": PromptTemplate(template="Hotfix: {question}")}, "hotfix",
                                      make_latest=False).resources_id

    def hotfix(rollout_id: str) -> None:
        if len(fleet.ran) == 10:
            fake_client.set_pointer("latest", other)

    fleet.before_run = hotfix
    with pytest.raises(PointerError, match="names 'hotfix', not the expected 'calc'"):
        fit(fake_client, scripted)
    assert fake_client.get_pointer("latest") == other


def test_what_apo_refuses_before_it_starts(
    fake_client: LightningClient, fleet: InlineFleet, scripted: ScriptedCritic, start: str
) -> None:
    with pytest.raises(ValidationError, match="beam_width"):
        APO(scripted.critic(), beam_width=0)
    with pytest.raises(ValidationError, match="beam_widht"):
        APO(scripted.critic(), beam_widht=2)
    with pytest.raises(InvalidDatasetError, match="APO needs training and validation inputs, got 8 and 0"):
        Trainer(APO(scripted.critic()), client=fake_client).fit(calc, TRAIN, [])
    with pytest.raises(PromptNotFoundError, match="holds no prompt template named 'system'"):
        fit(fake_client, scripted, prompt_name="system")


def test_an_evaluation_that_does_not_finish_in_time_raises_and_the_run_can_go_on(
    fake_client: LightningClient, fleet: InlineFleet, scripted: ScriptedCritic, start: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fake_client, "publish", lambda rollouts, registry_seq=0: None)  # no worker takes them
    apo = APO(scripted.critic(), rounds=1, val_batch_size=4)
    with pytest.raises(TrainingTimeoutError, match=r"training run 'slow': 4 rollout\(s\) did not finish within 0\.2 s"):
        Trainer(apo, client=fake_client, run_name="slow", rollout_timeout=0.2).fit(calc, TRAIN, VAL)


def test_a_snapshot_updated_under_an_evaluation_is_a_conflict(fake_client: LightningClient, fleet: InlineFleet,
                                                              start: str) -> None:
    v1 = fake_client.get_resources_by_id(start)
    fake_client.update_resources(start, {"prompt": PromptTemplate(template="v2 {question}")})
    run = TrainingRun(fake_client, "pinned")

    with pytest.raises(RunConflictError, match="started from calc version 1, not version 2"):
        run.evaluate([Evaluation(v1, Dataset.of(VAL[:1]))])
