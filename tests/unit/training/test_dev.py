"""``Trainer.dev``: the agent runs inline with the worker's rules, and gives what the runner records; what the
Trainer refuses before it starts."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_queue import (
    LLM,
    ConfigurationError,
    LightningClient,
    NoRunnersError,
    PromptTemplate,
    ResourcesNotFoundError,
    Rollout,
    RolloutConfig,
    Settings,
    rollout,
)
from lightning_queue.training import APO, Trainer
from tests.unit.training.conftest import SEED, InlineFleet, ScriptedCritic, arithmetic, calc

UNREACHABLE = Settings(redis_url="redis://127.0.0.1:1/0", redis_retry_seconds=0)


def comparable(r: Rollout) -> dict[str, Any]:
    """What dev mode and a worker must agree on (ids and times differ by nature)."""
    return {"status": r.status, "attempts": r.attempt_count, "result": r.result,
            "error": (r.error.type, r.error.message) if r.error else None}


def test_dev_with_a_resources_mapping_needs_no_redis() -> None:
    trainer: Trainer[Any] = Trainer(settings=UNREACHABLE)

    done = trainer.dev(calc, arithmetic(4), {"prompt": PromptTemplate(template=SEED)})

    assert [r.status for r in done] == ["succeeded"] * 4
    assert [r.reward for r in done] == [1.0, 0.0, 0.0, 0.0]  # only q0 is easy
    assert done[1].result is not None and done[1].result.output == {"prompt": "Q: 1 * 7 + 3"}
    assert [r.metadata["input_id"] for r in done] == ["q0", "q1", "q2", "q3"]
    assert all(r.resources_id == "dev" and r.resolve == "pinned" for r in done)
    assert trainer._client is None  # Redis was never asked


def test_dev_gives_what_a_worker_records_on_the_same_inputs_and_snapshot(
    fake_client: LightningClient, fleet: InlineFleet
) -> None:
    attempts: dict[str, int] = {}

    @rollout
    def moody(task: dict[str, Any], prompt: PromptTemplate, llm: LLM) -> float:
        # Fails its first attempt at each input, then answers; q3 always breaks.
        key = f"{task['id']}-{prompt.template}"
        attempts[key] = attempts.get(key, 0) + 1
        if task["id"] == "q3" or attempts[key] == 1:
            raise ValueError(f"moody on {task['id']}")
        return 0.5 if llm.model == "m" else 0.0

    fleet.agent = moody
    snapshot = fake_client.add_resources({"prompt": PromptTemplate(template=SEED),
                                          "llm": LLM(endpoint="http://llm.local/v1", model="m")}, "calc-seed")
    config = RolloutConfig(max_attempts=2)
    inputs = arithmetic(4)
    on_worker = fake_client.wait_for_rollouts(
        [r.rollout_id for r in fake_client.enqueue_rollouts(inputs, resources_id="calc-seed", config=config)],
        timeout=5)
    attempts.clear()

    inline = Trainer(client=fake_client).dev(moody, inputs, "calc-seed", config=config)

    assert [comparable(r) for r in inline] == [comparable(r) for r in on_worker]
    assert [r.status for r in inline] == ["succeeded"] * 3 + ["failed"]
    assert inline[0].attempt_count == 2 and inline[0].error is None  # a retry's success clears the error
    assert inline[3].error is not None and inline[3].error.traceback  # as the runner records it
    assert [(r.resources_id, r.resources_version) for r in inline] == [(snapshot.resources_id, 1)] * 4


def test_dev_follows_the_agents_pointer_as_a_worker_does(fake_client: LightningClient) -> None:
    fake_client.add_resources({"prompt": PromptTemplate(template=SEED)}, "plain")
    fake_client.add_resources({"prompt": PromptTemplate(template="calculator: {question}")}, "tooled")
    fake_client.set_pointer("prod", "plain")
    follows_prod = rollout(calc.func, default_resources="prod")
    trainer: Trainer[Any] = Trainer(client=fake_client)

    assert trainer.dev(calc, arithmetic(2), None)[1].reward == 1.0  # latest: tooled
    assert trainer.dev(follows_prod, arithmetic(2), None)[1].reward == 0.0  # prod: plain
    # A snapshot the agent needs but that is missing fails the rollout, as on a worker.
    missing = rollout(calc.func, default_resources="nowhere")
    failed = trainer.dev(missing, arithmetic(1), None)[0]
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.type == "ResourcesNotFoundError" and failed.attempt_count == 1
    # A reference given to dev() is resolved now, as enqueue_rollouts pins it.
    with pytest.raises(ResourcesNotFoundError):
        trainer.dev(calc, arithmetic(1), "nowhere")


def test_dev_reports_a_missing_resource_once_and_does_not_retry() -> None:
    @rollout
    def needs_llm(task: Any, llm: LLM) -> float:
        return 1.0

    done = Trainer(settings=UNREACHABLE).dev(needs_llm, [{"id": "a"}], {"prompt": PromptTemplate(template="x")},
                                             config=RolloutConfig(max_attempts=3))

    assert done[0].status == "failed" and done[0].attempt_count == 1
    assert done[0].error is not None and done[0].error.type == "MissingResourceError"
    assert "snapshot 'dev' (version 1)" in done[0].error.message


def test_the_trainer_refuses_what_it_cannot_run(fake_client: LightningClient) -> None:
    with pytest.raises(ConfigurationError, match=r"invalid run_name 'a/b'"):
        Trainer(client=fake_client, run_name="a/b")
    with pytest.raises(ConfigurationError, match="no algorithm"):
        Trainer(client=fake_client).fit(calc, arithmetic(2))
    with pytest.raises(ConfigurationError, match="n_runners"):
        Trainer(client=fake_client, n_runners=-1)


def test_fit_waits_for_runners_and_says_when_none_came(fake_client: LightningClient) -> None:
    trainer: Trainer[Any] = Trainer(APO(ScriptedCritic().critic()), client=fake_client, n_runners=2,
                                    runners_timeout=0.2)

    with pytest.raises(NoRunnersError, match=r"waited 0.2 s for 2 rollout slot\(s\) consuming queue 'lightning_queue' "
                                             r"and found 0; start workers"):
        trainer.fit(calc, arithmetic(2))
    assert fake_client.redis.exists(fake_client.keys.training_run(trainer.run_name)) == 0  # nothing started
