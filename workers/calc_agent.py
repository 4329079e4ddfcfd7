"""A calculator agent: an LLM that answers arithmetic questions with a calculator tool.

Copy this file to start your own agent. It uses only the public API of
``lightning_queue`` and talks to any OpenAI-compatible chat endpoint (vLLM,
Ollama, llama.cpp, OpenAI...) named by the snapshot's :class:`LLM`.

Task input: ``{"question": "What is 12 * (3 + 4)?", "answer": 84}``.
Reward: 1.0 when the last number of the final answer equals ``answer``, else 0.0.

Traced: each model call is an LLM span (``llm_call``: model, messages, tokens, cost), each
calculator call a tool span (plain OpenTelemetry), and the rewards are emitted as the run
ends (``correct``, the primary one, and ``answered``); a worker stores them with the attempt
(``lightning-queue rollouts trace ID`` shows the tree).

Run a worker for it (from the directory that holds ``workers/``)::

    LQ_REDIS_URL=redis://127.0.0.1:6379/0 celery -A workers.calc_agent worker -Q lightning_queue

or with the generic app: ``LQ_AGENT=workers.calc_agent:agent celery -A lightning_queue.app worker``.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import httpx
from opentelemetry import trace

from lightning_queue import LLM, PromptTemplate, RolloutResult, create_app, emit_reward, llm_call, rollout

MAX_TURNS = 5
"""Model calls per rollout; a model still calling tools after that gets reward 0."""

REQUEST_TIMEOUT_SECONDS = 60.0

DEFAULT_PROMPT = PromptTemplate(
    template=(
        "Answer the question. Use the calculator tool for any arithmetic, "
        "then give the final answer as a number.\n\nQuestion: {question}"
    )
)

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression: numbers, + - * / ** %, parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * 12"}},
            "required": ["expression"],
        },
    },
}


class LLMRequestError(RuntimeError):
    """The chat endpoint could not be reached or answered with an error."""


# --------------------------------------------------------------------------- calculator


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or cannot be evaluated."""


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_MAX_EXPRESSION_LENGTH = 500
# Bounds on powers: the model writes the expressions, and 9 ** 9 ** 9 would hold a worker for minutes.
_MAX_EXPONENT = 1000
_MAX_POWER_BITS = 100_000


def calculate(expression: str) -> int | float:
    """Evaluate arithmetic without ``eval``: numbers, ``+ - * / ** %``, parentheses, unary minus.

    Raises :class:`CalculatorError` for anything else (names, calls, attributes...)
    and for division by zero or an oversized power.
    """
    if len(expression) > _MAX_EXPRESSION_LENGTH:
        raise CalculatorError(f"expression longer than {_MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from exc
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large") from None


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > _MAX_EXPONENT:
                raise CalculatorError(f"exponent {right} is larger than {_MAX_EXPONENT}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > _MAX_POWER_BITS:
                raise CalculatorError("result too large")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex):  # (-8) ** 0.5
            raise CalculatorError("the result is not a real number")
        return value
    raise CalculatorError(f"unsupported element {type(node).__name__}: only numbers and + - * / ** % are allowed")


def format_number(value: int | float) -> str:
    """``6 / 3`` gives ``"2"``, not ``"2.0"``: what a person would write."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return format(value, ".12g")
    return str(value)


# --------------------------------------------------------------------------- reward

_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (``1,234.5`` reads as 1234.5), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


def score(answer: str | None, expected: Any) -> float:
    """1.0 when the last number of ``answer`` equals ``expected`` (a number or a string), else 0.0."""
    got = last_number(answer) if answer else None
    want = float(expected) if isinstance(expected, (int, float)) else last_number(str(expected))
    if got is None or want is None:
        return 0.0
    return 1.0 if math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9) else 0.0


# --------------------------------------------------------------------------- the agent


tracer = trace.get_tracer("calc_agent")


def chat(http: httpx.Client, llm: LLM, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """One chat completion, recorded as an LLM span; returns the assistant message. Raises
    :class:`LLMRequestError`."""
    url = llm.endpoint.rstrip("/") + "/chat/completions"
    body = {**llm.sampling_parameters, "model": llm.model, "messages": messages, "tools": [CALCULATOR_TOOL]}
    headers = {"Authorization": f"Bearer {llm.api_key.get_secret_value()}"} if llm.api_key else {}
    with llm_call(body, llm) as call:
        try:
            response = http.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise LLMRequestError(f"cannot reach the LLM endpoint {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise LLMRequestError(f"POST {url} answered HTTP {response.status_code}: {response.text[:500]}")
        try:
            completion = response.json()
            message: dict[str, Any] = completion["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMRequestError(
                f"POST {url} answered something that is not a chat completion: {response.text[:500]}"
            ) from exc
        call.record(completion)
    return message


def run_tool(call: dict[str, Any]) -> str:
    """The tool message content for one tool call, recorded as a tool span; a bad call is
    reported to the model, not raised."""
    function = call.get("function") or {}
    attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": str(function.get("name")),
                  "gen_ai.tool.call.id": str(call.get("id"))}
    with tracer.start_as_current_span(f"tool {function.get('name')}", attributes=attributes) as span:
        if function.get("name") != "calculator":
            result = f"error: unknown tool {function.get('name')!r}; the only tool is 'calculator'"
        else:
            try:
                arguments = json.loads(function.get("arguments") or "{}")
                result = format_number(calculate(str(arguments["expression"])))
            except (ValueError, KeyError, TypeError) as exc:
                result = f"error: {exc}"
        span.set_attribute("calc_agent.tool.result", result)
    return result


@rollout(name="calc_agent")
def agent(task: dict[str, Any], llm: LLM, prompt: PromptTemplate | None = None) -> RolloutResult:
    """Ask the model, run its calculator calls, and score its final answer."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": (prompt or DEFAULT_PROMPT).format(question=task["question"])}
    ]
    answer: str | None = None
    with httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS) as http:
        for _ in range(MAX_TURNS):
            message = chat(http, llm, messages)
            tool_calls = message.get("tool_calls") or []
            assistant: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
            if tool_calls:
                assistant["tool_calls"] = tool_calls
            messages.append(assistant)
            if not tool_calls:
                answer = message.get("content") or ""
                break
            for call in tool_calls:
                messages.append({"role": "tool", "tool_call_id": call.get("id"), "content": run_tool(call)})
    correct = score(answer, task["answer"])
    emit_reward(correct, name="correct", primary=True)
    emit_reward(1.0 if answer else 0.0, name="answered")
    return RolloutResult(reward=correct, output={"answer": answer}, trace=messages)


app = create_app(agent=agent)
"""``celery -A workers.calc_agent worker`` runs this agent (settings from ``LQ_*``)."""
