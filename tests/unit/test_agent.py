"""Agents: the @rollout decorator's injection rules, LitAgent subclasses, result normalization."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Literal

import pytest

from lightning_queue import (
    LLM,
    AgentSignatureError,
    FunctionalLitAgent,
    InvalidRolloutResultError,
    LitAgent,
    MissingResourceError,
    PromptTemplate,
    Resource,
    Rollout,
    RolloutResult,
    rollout,
)
from lightning_queue.worker.agent import to_result


class Calculator(Resource):
    """A user-defined resource type."""

    resource_type: Literal["test_agent_calculator"] = "test_agent_calculator"
    precision: int = 2


MAIN = LLM(endpoint="http://main", model="big")
JUDGE = LLM(endpoint="http://judge", model="small")
PROMPT = PromptTemplate(template="Q: {q}")
CALC = Calculator(precision=4)
RECORD = Rollout(input={"q": "1+1"}, metadata={"tag": "t"})


def run(agent: LitAgent, resources: Mapping[str, Resource], task: Any = "task") -> RolloutResult:
    return agent.execute(task, resources, RECORD)


# --------------------------------------------------------------------------- injection


def test_injects_by_type() -> None:
    seen: dict[str, Any] = {}

    @rollout
    def agent(task: str, model: LLM, template: PromptTemplate, calc: Calculator) -> float:
        seen.update(task=task, model=model, template=template, calc=calc)
        return 0.5

    assert isinstance(agent, FunctionalLitAgent) and agent.name == "agent"
    result = run(agent, {"whatever": MAIN, "p": PROMPT, "c": CALC})
    assert result == RolloutResult(reward=0.5)
    assert seen == {"task": "task", "model": MAIN, "template": PROMPT, "calc": CALC}


def test_injects_by_name_when_several_of_a_type() -> None:
    seen: dict[str, Any] = {}

    @rollout
    def agent(task: str, judge: LLM, main: LLM) -> None:
        seen.update(judge=judge, main=main)

    run(agent, {"main": MAIN, "judge": JUDGE, "p": PROMPT})
    assert seen == {"judge": JUDGE, "main": MAIN}


def test_name_match_must_also_match_type() -> None:
    seen: dict[str, Any] = {}

    @rollout
    def agent(task: str, prompt: LLM) -> None:  # "prompt" names a PromptTemplate, the only LLM is elsewhere
        seen["prompt"] = prompt

    run(agent, {"prompt": PROMPT, "llm": MAIN})
    assert seen == {"prompt": MAIN}


def test_injects_resources_and_rollout() -> None:
    seen: dict[str, Any] = {}

    @rollout
    def agent(task: dict, resources: Mapping[str, Resource], rollout: Rollout) -> float:
        seen.update(task=task, resources=resources, rollout=rollout)
        return 1

    resources = {"main": MAIN, "p": PROMPT}
    assert run(agent, resources, task={"q": 2}).reward == 1.0
    assert seen == {"task": {"q": 2}, "resources": resources, "rollout": RECORD}


def test_optional_and_default_parameters() -> None:
    seen: dict[str, Any] = {}

    @rollout
    def agent(task: str, llm: LLM | None = None, calc: Calculator | None = None, retries: int = 3, **extra: Any) -> None:
        seen.update(llm=llm, calc=calc, retries=retries, extra=extra)

    run(agent, {"p": PROMPT})
    assert seen == {"llm": None, "calc": None, "retries": 3, "extra": {}}
    run(agent, {"main": MAIN, "c": CALC})
    assert seen == {"llm": MAIN, "calc": CALC, "retries": 3, "extra": {}}


def test_default_resource_is_kept_when_snapshot_lacks_it() -> None:
    fallback = PromptTemplate(template="default {q}")
    seen: dict[str, Any] = {}

    @rollout
    def agent(task: str, prompt: PromptTemplate = fallback) -> None:
        seen["prompt"] = prompt

    run(agent, {"main": MAIN})
    assert seen["prompt"] is fallback


def test_missing_resource_message() -> None:
    @rollout
    def agent(task: str, calc: Calculator) -> float:
        return 1.0

    with pytest.raises(MissingResourceError) as info:
        run(agent, {"main": MAIN, "p": PROMPT})
    message = str(info.value)
    assert "'calc'" in message and "Calculator" in message
    assert "main (llm)" in message and "p (prompt_template)" in message  # what the snapshot does hold


def test_ambiguous_resource_message() -> None:
    @rollout
    def agent(task: str, llm: LLM) -> float:
        return 1.0

    with pytest.raises(MissingResourceError) as info:
        run(agent, {"main": MAIN, "judge": JUDGE})
    message = str(info.value)
    assert "'llm'" in message and "several" in message
    assert "judge, main" in message  # the candidates, to rename the parameter after


def test_ambiguous_optional_resource_still_raises() -> None:
    @rollout
    def agent(task: str, llm: LLM | None = None) -> float:
        return 1.0

    with pytest.raises(MissingResourceError, match="several"):
        run(agent, {"main": MAIN, "judge": JUDGE})


def test_uninjectable_parameter_fails_at_decoration() -> None:
    with pytest.raises(AgentSignatureError, match="'temperature'") as info:

        @rollout
        def agent(task: str, temperature: float) -> float:
            return temperature

    assert "resources" in str(info.value) and "default" in str(info.value)  # says how to fix it


def test_collection_of_resources_is_not_injectable() -> None:
    with pytest.raises(AgentSignatureError, match="'llms'"):

        @rollout
        def agent(task: str, llms: list[LLM]) -> None:
            pass


@pytest.mark.parametrize("signature", ["none", "keyword-only"])
def test_task_parameter_required(signature: str) -> None:
    def no_params() -> None:
        pass

    def keyword_only(*, task: str) -> None:
        pass

    with pytest.raises(AgentSignatureError, match="first parameter"):
        rollout(no_params if signature == "none" else keyword_only)


def test_unresolvable_annotation_fails_at_decoration() -> None:
    def agent(task: str, llm: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    with pytest.raises(AgentSignatureError, match="annotations"):
        rollout(agent)


def test_decorator_with_name_and_direct_call() -> None:
    @rollout(name="calc-agent")
    def agent(task: int, llm: LLM) -> float:
        return task * 2.0

    assert agent.name == "calc-agent"
    assert agent(3, MAIN) == 6.0  # the plain function is still callable
    assert not agent.is_async


def test_async_function() -> None:
    seen: dict[str, Any] = {}

    @rollout
    async def agent(task: str, llm: LLM, rollout: Rollout) -> RolloutResult:
        await asyncio.sleep(0)
        seen.update(llm=llm, rollout=rollout)
        return RolloutResult(reward=0.25, output=task.upper())

    assert agent.is_async
    assert run(agent, {"main": MAIN}, task="hi") == RolloutResult(reward=0.25, output="HI")
    assert seen == {"llm": MAIN, "rollout": RECORD}


def test_async_function_missing_resource() -> None:
    @rollout
    async def agent(task: str, calc: Calculator) -> None:
        pass

    with pytest.raises(MissingResourceError, match="Calculator"):
        run(agent, {"main": MAIN})


# --------------------------------------------------------------------------- LitAgent subclasses


class SyncAgent(LitAgent):
    def rollout(self, task: Any, resources: Mapping[str, Resource], rollout: Rollout) -> float:
        return float(len(resources)) + task


class AsyncAgent(LitAgent):
    name = "async-one"

    async def rollout_async(self, task: Any, resources: Mapping[str, Resource], rollout: Rollout) -> dict:
        await asyncio.sleep(0)
        return {"reward": task, "output": {"rollout": rollout.rollout_id, "names": sorted(resources)}}


def test_litagent_sync() -> None:
    agent = SyncAgent()
    assert not agent.is_async
    assert run(agent, {"main": MAIN, "p": PROMPT}, task=0.5) == RolloutResult(reward=2.5)


def test_litagent_async() -> None:
    agent = AsyncAgent()
    assert agent.is_async
    result = run(agent, {"main": MAIN, "p": PROMPT}, task=1)
    assert result == RolloutResult(reward=1.0, output={"rollout": RECORD.rollout_id, "names": ["main", "p"]})
    assert "async-one" in repr(agent)


def test_litagent_without_rollout_method() -> None:
    with pytest.raises(NotImplementedError, match="Empty"):

        class Empty(LitAgent):
            pass

        run(Empty(), {"main": MAIN})


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize(
    "raw, expected",
    [
        (0.5, RolloutResult(reward=0.5)),
        (1, RolloutResult(reward=1.0)),
        (-3, RolloutResult(reward=-3.0)),
        (None, RolloutResult()),
        (RolloutResult(reward=0.1, step_rewards=[0.0, 0.1]), RolloutResult(reward=0.1, step_rewards=[0.0, 0.1])),
        ({"reward": 0.2, "output": "x"}, RolloutResult(reward=0.2, output="x")),
        ({"trace": [{"step": 1}]}, RolloutResult(trace=[{"step": 1}])),
    ],
    ids=["float", "int", "negative", "none", "result", "dict", "dict-trace"],
)
def test_to_result(raw: Any, expected: RolloutResult) -> None:
    result = to_result(raw)
    assert result == expected
    assert isinstance(result.reward, float) or result.reward is None


@pytest.mark.parametrize("raw", ["0.5", [1.0], object(), {"reward": "lots"}, {"step_rewards": 3}])
def test_to_result_rejects(raw: Any) -> None:
    with pytest.raises(InvalidRolloutResultError, match="RolloutResult"):
        to_result(raw)


def test_execute_normalizes_result() -> None:
    @rollout
    def agent(task: str) -> str:
        return "great job"

    with pytest.raises(InvalidRolloutResultError, match="str"):
        run(agent, {"main": MAIN})
