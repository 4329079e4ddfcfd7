"""Agents as users write them, run by real workers: injection, async agents, the calculator."""

from __future__ import annotations

from lightning_queue import (
    LLM,
    LightningClient,
    PromptTemplate,
    RolloutConfig,
    RolloutRequest,
)

AGENTS = "tests.integration.agents"
WAIT = 60.0


def test_decorator_injects_resources_by_name_and_by_type(client: LightningClient, start_workers):
    by_name = client.add_resources({
        "main_llm": LLM(endpoint="http://main.local/v1", model="main-model"),
        "judge_llm": LLM(endpoint="http://judge.local/v1", model="judge-model"),
        "system_prompt": PromptTemplate(template="system text"),
        "user_prompt": PromptTemplate(template="user text"),
    })
    by_type = client.add_resources({
        "policy": LLM(endpoint="http://policy.local/v1", model="policy-model"),
        "instructions": PromptTemplate(template="only prompt"),
    })
    ambiguous = client.add_resources({
        "a": LLM(endpoint="http://a.local/v1", model="a"),
        "b": LLM(endpoint="http://b.local/v1", model="b"),
        "instructions": PromptTemplate(template="only prompt"),
    })
    start_workers(f"{AGENTS}:injected", count=2)
    rollouts = client.enqueue_rollouts(
        [RolloutRequest(input={}, resources_id=s.resources_id) for s in (by_name, by_type, ambiguous)],
        config=RolloutConfig(max_attempts=3),
    )

    named, typed, unresolvable = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=WAIT)

    assert named.status == "succeeded"
    assert named.result.output == {
        "main_llm": "main-model", "judge_llm": "judge-model",
        "system_prompt": "system text", "user_prompt": "user text",
        "resources": ["judge_llm", "main_llm", "system_prompt", "user_prompt"],
        "rollout_id": named.rollout_id,
    }
    assert typed.status == "succeeded"
    assert typed.result.output["main_llm"] == typed.result.output["judge_llm"] == "policy-model"
    assert typed.result.output["system_prompt"] == typed.result.output["user_prompt"] == "only prompt"
    # Two LLMs and neither named like the parameter: a clear error, not retried.
    assert unresolvable.status == "failed"
    assert unresolvable.error.type == "MissingResourceError"
    assert ambiguous.resources_id in unresolvable.error.message
    assert "'main_llm'" in unresolvable.error.message
    assert len(client.get_attempts(unresolvable.rollout_id)) == 1


def test_async_agent_runs_in_the_worker(client: LightningClient, start_workers):
    client.add_resources({"prompt": PromptTemplate(template="n is {n}")})
    start_workers(f"{AGENTS}:async_echo", count=2)
    rollouts = client.enqueue_rollouts([{"n": n} for n in (1, 3, 5)])

    finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=WAIT)

    assert [r.status for r in finished] == ["succeeded"] * 3
    assert [r.result.output["text"] for r in finished] == ["n is 1", "n is 3", "n is 5"]
    assert [r.reward for r in finished] == [0.0, 5.0, 30.0]
    assert [r.result.output["rollout_id"] for r in finished] == [r.rollout_id for r in rollouts]


def test_calculator_agent_against_an_openai_compatible_endpoint(client: LightningClient, start_workers, openai_stub):
    client.add_resources({
        "llm": LLM(endpoint=openai_stub.endpoint, model="calc-model", api_key="sk-test-key",
                   sampling_parameters={"temperature": 0.3, "max_tokens": 64}),
        "prompt": PromptTemplate(template="Use the calculator. Question: {question}"),
    })
    # Started as a user would: the module that builds its own app.
    start_workers(None, count=2, app="workers.calc_agent")
    tasks = [
        {"question": "What is 12 * (3 + 4)?", "answer": 84},
        {"question": "What is 7 / 2?", "answer": "3.5"},
        {"question": "What is 2 ** 10 - 1?", "answer": 1023},
        {"question": "What is 5 + 5?", "answer": 11},  # the expected answer is wrong: reward 0
    ]
    rollouts = client.enqueue_rollouts(tasks)

    finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=WAIT)

    assert [r.status for r in finished] == ["succeeded"] * 4
    assert [r.reward for r in finished] == [1.0, 1.0, 1.0, 0.0]
    assert [r.result.output["answer"] for r in finished] == [
        "The answer is 84", "The answer is 3.5", "The answer is 1023", "The answer is 10"
    ]
    trace = finished[0].result.trace
    assert [m["role"] for m in trace] == ["user", "assistant", "tool", "assistant"]
    assert trace[0]["content"] == "Use the calculator. Question: What is 12 * (3 + 4)?"
    assert trace[2]["content"] == "84"
    requests = openai_stub.chat_requests()
    assert len(requests) == 8  # a tool call and a final answer per rollout
    for request in requests:
        assert request.model == "calc-model"
        assert request.authorization == "Bearer sk-test-key"
        assert (request.body["temperature"], request.body["max_tokens"]) == (0.3, 64)
        assert request.body["tools"][0]["function"]["name"] == "calculator"
