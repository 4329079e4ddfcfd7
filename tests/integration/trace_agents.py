"""The agents of the trace tests (``LQ_AGENT=tests.integration.trace_agents:agent``): one agent,
so one shared fleet serves them all, doing what ``task["kind"]`` says."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from lightning_queue import LLM, PromptTemplate, RolloutResult, emit_reward, rollout
from workers import calc_agent


@rollout
def agent(task: dict[str, Any], llm: LLM, prompt: PromptTemplate | None = None) -> RolloutResult:
    kind = task.get("kind", "calc")
    if kind == "calc":  # the calculator agent as it is
        return calc_agent.agent.func(task, llm=llm, prompt=prompt)
    if kind == "asks_for_another":
        # The same agent, with its own idea of the model, sampling and key: through the proxy, the
        # snapshot's win.
        own = LLM(endpoint=llm.endpoint, model="model-the-agent-wants", api_key="sk-from-the-agent",
                  sampling_parameters={"temperature": 1.9, "top_p": 0.5})
        return calc_agent.agent.func(task, llm=own, prompt=prompt)
    if kind == "span_heavy":
        tracer = trace.get_tracer("span_heavy")
        for i in range(task["spans"]):
            with tracer.start_as_current_span(f"step {i}", attributes={"payload": "x" * 300}):
                pass
        emit_reward(0.25, name="heavy", primary=True)
        return RolloutResult(output={"spans": task["spans"]})
    raise ValueError(f"unknown kind {kind!r}")
