"""The critic's two calls to an OpenAI-compatible endpoint, and how it fails."""

from __future__ import annotations

import json

import httpx
import pytest

from lightning_queue import LLM, ConfigurationError, CriticError, ErrorInfo, Rollout, RolloutResult
from lightning_queue.training import Critic, CriticSettings
from lightning_queue.training.critic import strip_fences
from tests.unit.training.conftest import ScriptedCritic

LLM_ = LLM(endpoint="http://critic.local/v1", model="critic-model", api_key="sk-critic-secret",
           sampling_parameters={"temperature": 0.7})


def failed(i: int) -> Rollout:
    return Rollout(input={"question": f"{i} + 1"}, status="succeeded",
                   result=RolloutResult(reward=0.0, output={"answer": "42"}, trace=[{"role": "user", "content": "x" * 50}]))


def test_the_critic_sends_the_model_the_key_and_the_sampling_parameters() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "```text\nNew: {question}\n```"}}]})

    with Critic(LLM_, transport=httpx.MockTransport(answer), max_chars=40) as critic:
        critique = critic.critique("Old: {question}", [failed(1)])
        proposals = critic.propose("Old: {question}", critique, 2)

    assert proposals == ["New: {question}", "New: {question}"]
    assert [str(r.url) for r in seen] == ["http://critic.local/v1/chat/completions"] * 3
    assert all(r.headers["Authorization"] == "Bearer sk-critic-secret" for r in seen)
    bodies = [json.loads(r.content) for r in seen]
    assert {(b["model"], b["temperature"]) for b in bodies} == {("critic-model", 0.7)}
    shown = bodies[0]["messages"][1]["content"]
    assert "Old: {question}" in shown and '"answer": "42"' in shown
    assert "... (cut)" in shown  # the trace, longer than max_chars, was cut
    assert "variant 2 of 2" in bodies[2]["messages"][1]["content"]


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (httpx.Response(500, text="overloaded"), "answered HTTP 500: overloaded"),
        (httpx.Response(200, text="<html>"), "not a chat completion"),
        (httpx.Response(200, json={"choices": []}), "not a chat completion"),
        (httpx.Response(200, json={"choices": [{"message": {"content": " "}}]}), "empty critique"),
    ],
)
def test_a_critic_that_answers_badly_raises_a_clear_error(reply: httpx.Response, fragment: str) -> None:
    critic = Critic(LLM_, transport=httpx.MockTransport(lambda request: reply))

    with pytest.raises(CriticError, match=fragment) as caught:
        critic.critique("t", [failed(1)])

    message = str(caught.value)
    assert "the critic at http://critic.local/v1 failed" in message and "LQ_CRITIC_ENDPOINT" in message
    assert "sk-critic-secret" not in message


def test_an_unreachable_critic_raises_critic_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(CriticError, match=r"cannot reach it \(ConnectError: connection refused\)"):
        Critic(LLM_, transport=httpx.MockTransport(refuse)).propose("t", "c", 1)


def test_the_critic_is_configured_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LQ_CRITIC_ENDPOINT", raising=False)
    monkeypatch.delenv("LQ_CRITIC_MODEL", raising=False)
    with pytest.raises(ConfigurationError, match="LQ_CRITIC_ENDPOINT and LQ_CRITIC_MODEL"):
        Critic()

    monkeypatch.setenv("LQ_CRITIC_ENDPOINT", "http://critic.env/v1")
    monkeypatch.setenv("LQ_CRITIC_MODEL", "env-model")
    monkeypatch.setenv("LQ_CRITIC_API_KEY", "sk-env")
    critic = Critic()
    assert (critic.llm.endpoint, critic.model, critic.llm.sampling_parameters) == (
        "http://critic.env/v1", "env-model", {"temperature": 1.0})
    assert critic.llm.api_key is not None and critic.llm.api_key.get_secret_value() == "sk-env"
    assert "sk-env" not in repr(CriticSettings())


def test_errors_of_failed_rollouts_are_shown_to_the_critic() -> None:
    scripted = ScriptedCritic()
    broken = Rollout(input={"q": 1}, status="failed",
                     error=ErrorInfo(type="TemplateRenderError", message="missing variable 'question'"))

    scripted.critic().critique("t", [broken])

    assert "error: TemplateRenderError: missing variable 'question'" in scripted.requests[0]["messages"][1]["content"]


@pytest.mark.parametrize(
    ("written", "template"),
    [
        ("Q: {question}", "Q: {question}"),
        ("```\nQ: {question}\n```", "Q: {question}"),
        ("```jinja\n{{ question }}\n```", "{{ question }}"),
        ("```Q: {question}```", "Q: {question}"),
        ("  plain  ", "plain"),
    ],
)
def test_code_fences_around_a_proposal_are_removed(written: str, template: str) -> None:
    assert strip_fences(written) == template
