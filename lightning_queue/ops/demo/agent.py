"""An agent that needs no LLM, for the demo: a simulated model answers arithmetic.

The simulated model behaves the way the prompt asks, deterministically, so
prompt search has something real to find:

* it respects operator precedence only when told to think step by step
  (otherwise it works left to right, and gets ``2 + 3 * 4`` wrong);
* it answers with the bare number only when told to reply with only the final
  number (otherwise it wraps the answer in a sentence).

The grader gives 1.0 for exactly the right number, 0.5 for the right number
inside a sentence, 0.0 otherwise.

Run a worker for it:  lightning-queue worker --agent lightning_queue.ops.demo.agent:agent
"""

from __future__ import annotations

import ast
import operator
import random
import re
import time
from typing import Any

from lightning_queue.core.models import PromptTemplate, Rollout, RolloutResult
from lightning_queue.worker.agent import rollout
from lightning_queue.worker.tracing import emit_reward, llm_call

_BY_SYMBOL = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _left_to_right(expression: str) -> int:
    tokens = re.findall(r"\d+|[-+*]|//", expression)
    value = int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2], strict=False):
        value = _BY_SYMBOL[op](value, int(number))
    return value


def _with_precedence(expression: str) -> int:
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            value: int = _OPS[type(node.op)](walk(node.left), walk(node.right))
            return value
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"not simple arithmetic: {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def simulated_model(prompt: str) -> str:
    """Answer the arithmetic question in ``prompt`` the way the prompt asks."""
    match = re.search(r"[\d\s+\-*/]*\d", prompt.split(":")[-1])
    if not match:
        return "I cannot find a question."
    expression = match.group(0).strip()
    text = prompt.lower()
    value = _with_precedence(expression) if "step by step" in text else _left_to_right(expression)
    if "only the final number" in text:
        return str(value)
    return f"Let me see. Working it out, {expression} comes to {value}."


def grade(response: str, answer: int) -> float:
    if response.strip() == str(answer):
        return 1.0
    numbers = re.findall(r"-?\d+", response)
    return 0.5 if numbers and numbers[-1] == str(answer) else 0.0


MODEL = "simulated-arithmetic"


@rollout
def agent(task: dict[str, Any], prompt: PromptTemplate, rollout: Rollout) -> RolloutResult:
    text = prompt.format(question=task["question"])
    request = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    # Recorded in the attempt's trace as an LLM call (messages, tokens), as a real model's would be.
    with llm_call(request) as call:
        # A little latency, like a real model call, so rollouts overlap across workers.
        time.sleep(random.Random(rollout.rollout_id).uniform(0.02, 0.08))
        response = simulated_model(text)
        call.record({"model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": response}}],
                     "usage": {"prompt_tokens": len(text.split()), "completion_tokens": len(response.split())}})
    reward = grade(response, int(task["answer"]))
    emit_reward(reward, name="grade", primary=True)
    return RolloutResult(reward=reward, output={"prompt": text, "response": response})

