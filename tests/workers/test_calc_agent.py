"""The calculator agent, run in-process against the local OpenAI-compatible stub."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_queue import LLM, PromptTemplate, Rollout
from lightning_queue.worker.app import WorkerApp, load_agent
from tests.openai_stub import OpenAIStub
from workers import calc_agent
from workers.calc_agent import (
    CalculatorError,
    LLMRequestError,
    calculate,
    format_number,
    last_number,
    score,
)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2", 3), ("12 * (3 + 4)", 84), ("7 / 2", 3.5), ("2 ** 10", 1024), ("2 ** -1", 0.5), ("-(3 - 5)", 2),
        ("17 % 5", 2), ("+4 - -4", 8), ("1.5 * 4", 6.0), (" 2*3 ", 6),
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, value: float) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')", "x + 1", "abs(-1)", "(1).real", "[1, 2]", "'a' * 3",
        "1 if 1 else 2", "True + 1", "1 / 0", "9 ** 9 ** 9", "10 ** 100000", "(-8) ** 0.5", "", "1 +", "1 << 64",
    ],
)
def test_calculator_refuses_anything_else(expression: str) -> None:
    with pytest.raises(CalculatorError):
        calculate(expression)


def test_numbers_read_and_write_like_a_person_would() -> None:
    assert [format_number(v) for v in (6 / 3, 3.5, 7, 1 / 3)] == ["2", "3.5", "7", "0.333333333333"]
    assert last_number("first 3, then 1,234.5 apples") == 1234.5
    assert last_number("no digits") is None
    assert score("The answer is 84", 84) == score("84.0", "84") == score("= -2", -2) == 1.0
    assert score("The answer is 85", 84) == score(None, 84) == score("none", 84) == 0.0


def run(task: dict[str, Any], **resources: Any) -> Any:
    """Run the agent as a worker would: resources injected from a snapshot mapping."""
    return calc_agent.agent.execute(task, resources, Rollout(input=task))


def llm(stub: OpenAIStub, **fields: Any) -> LLM:
    return LLM(endpoint=stub.endpoint, model="tiny", **fields)


def test_agent_uses_the_calculator_and_rewards_a_correct_answer(openai_stub: OpenAIStub) -> None:
    result = run({"question": "What is (2 + 3) * 4?", "answer": 20},
                 llm=llm(openai_stub, api_key="sk-1", sampling_parameters={"temperature": 0.7}))

    assert (result.reward, result.output) == (1.0, {"answer": "The answer is 20"})
    assert [m["role"] for m in result.trace] == ["user", "assistant", "tool", "assistant"]
    call = result.trace[1]["tool_calls"][0]
    assert result.trace[2] == {"role": "tool", "tool_call_id": call["id"], "content": "20"}
    first, second = openai_stub.chat_requests()
    assert first.authorization == "Bearer sk-1"
    assert (first.model, first.body["temperature"]) == ("tiny", 0.7)
    assert first.body["messages"][0]["content"] == calc_agent.DEFAULT_PROMPT.format(question="What is (2 + 3) * 4?")
    assert second.body["messages"] == result.trace[:3]


def test_agent_uses_the_snapshot_prompt_and_sends_no_key_when_none(openai_stub: OpenAIStub) -> None:
    result = run({"question": "What is 9 - 10?", "answer": "-1"},
                 llm=llm(openai_stub), prompt=PromptTemplate(template="Q: {question}"))

    assert result.reward == 1.0
    assert result.trace[0]["content"] == "Q: What is 9 - 10?"
    assert {r.authorization for r in openai_stub.chat_requests()} == {None}


def test_a_wrong_answer_or_a_failed_tool_call_gets_no_reward(openai_stub: OpenAIStub) -> None:
    assert run({"question": "What is 2 + 2?", "answer": 5}, llm=llm(openai_stub)).reward == 0.0

    result = run({"question": "What is 1 / 0?", "answer": 0}, llm=llm(openai_stub))
    assert result.reward == 0.0
    assert result.trace[2]["content"] == "error: division by zero"


def test_a_model_that_never_answers_stops_after_max_turns(monkeypatch: pytest.MonkeyPatch, openai_stub: OpenAIStub) -> None:
    loop = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}
    ]}
    monkeypatch.setattr(calc_agent, "chat", lambda *args: loop)

    result = run({"question": "?", "answer": 2}, llm=llm(openai_stub))

    assert (result.reward, result.output) == (0.0, {"answer": None})
    assert len(result.trace) == 1 + 2 * calc_agent.MAX_TURNS


def test_http_errors_raise_a_clear_error(openai_stub: OpenAIStub) -> None:
    openai_stub.fail_status = 503
    with pytest.raises(LLMRequestError, match=r"chat/completions answered HTTP 503: .*told to fail"):
        run({"question": "What is 1 + 1?", "answer": 2}, llm=llm(openai_stub))

    unreachable = LLM(endpoint="http://127.0.0.1:9/v1", model="tiny")
    with pytest.raises(LLMRequestError, match=r"cannot reach the LLM endpoint http://127.0.0.1:9/v1/chat/completions"):
        run({"question": "What is 1 + 1?", "answer": 2}, llm=unreachable)


def test_module_exposes_a_worker_app_and_the_agent() -> None:
    assert isinstance(calc_agent.app, WorkerApp)
    assert calc_agent.app.agent is calc_agent.agent
    assert load_agent("workers.calc_agent:agent") is calc_agent.agent
