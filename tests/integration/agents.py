"""Agents the integration tests run in real worker processes (``LQ_AGENT=tests.integration.agents:<name>``).

Agents that must behave differently on a later attempt keep a marker file per
rollout in ``task["marker_dir"]``: the worker processes share the file system
with the test, not memory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_queue import (
    LLM,
    PromptTemplate,
    Resource,
    Rollout,
    RolloutResult,
    rollout,
)


def _first_time(task: Mapping[str, Any], rollout_id: str, tag: str) -> bool:
    """True the first time this rollout gets here (creates the marker atomically)."""
    marker = Path(task["marker_dir"]) / f"{rollout_id}.{tag}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def _ran(task: Mapping[str, Any], rollout: Rollout) -> None:
    """Leave a trace that the agent body ran for this rollout (for 'never ran' checks)."""
    if task.get("marker_dir"):
        (Path(task["marker_dir"]) / f"{rollout.rollout_id}.ran").touch()


@rollout
def echo(task: dict[str, Any], prompt: PromptTemplate, rollout: Rollout) -> RolloutResult:
    """Report which prompt (so which snapshot) it ran with, and on which process; with a
    ``task["gate"]``, only once that file exists (for at most two minutes)."""
    _ran(task, rollout)
    time.sleep(task.get("sleep", 0))
    deadline = time.monotonic() + 120
    while "gate" in task and not Path(task["gate"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return RolloutResult(
        reward=1.0, output={"prompt": prompt.template, "input": task, "pid": os.getpid()}
    )


@rollout
def scored(task: dict[str, Any], prompt: PromptTemplate, rollout: Rollout) -> float:
    """Reward ``task["reward"]``; fails when ``task["fail"]`` is set (the metrics tests)."""
    if task.get("fail"):
        raise ValueError("asked to fail")
    return float(task["reward"])


@rollout
def failing(task: dict[str, Any], rollout: Rollout) -> float:
    raise ValueError(f"boom on {task['name']}")


@rollout
def flaky(task: dict[str, Any], rollout: Rollout) -> float:
    """Fails its first attempt, succeeds on the next."""
    if _first_time(task, rollout.rollout_id, "flaky"):
        raise ConnectionError("transient failure on the first attempt")
    return 0.5


@rollout
def sleeper(task: dict[str, Any], rollout: Rollout) -> float:
    time.sleep(task["sleep"])
    return 1.0


@rollout
def gated(task: dict[str, Any], rollout: Rollout) -> float:
    """Runs until the file ``task["gate"]`` exists (the test opens it when it has seen what it waits
    for), for at most ``task.get("hold", 120)`` seconds."""
    deadline = time.monotonic() + task.get("hold", 120)
    while not Path(task["gate"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return 1.0


@rollout
def stubborn(task: dict[str, Any], rollout: Rollout) -> float:
    """Ignores its soft time limit: only the hard limit (killing the process) stops it."""
    try:
        time.sleep(task["sleep"])
    except Exception:  # SoftTimeLimitExceeded
        time.sleep(task["sleep"])
    return 1.0


@rollout
def suicidal(task: dict[str, Any], rollout: Rollout) -> float:
    """Kills its own worker process on the first attempt (as an OOM kill would)."""
    if _first_time(task, rollout.rollout_id, "killed"):
        os.kill(os.getpid(), signal.SIGKILL)
    return 1.0


@rollout
def injected(
    task: dict[str, Any],
    main_llm: LLM,
    judge_llm: LLM,
    system_prompt: PromptTemplate,
    user_prompt: PromptTemplate,
    resources: Mapping[str, Resource],
    rollout: Rollout,
) -> RolloutResult:
    """Reports what the decorator injected into each parameter."""
    return RolloutResult(
        reward=1.0,
        output={
            "main_llm": main_llm.model,
            "judge_llm": judge_llm.model,
            "system_prompt": system_prompt.template,
            "user_prompt": user_prompt.template,
            "resources": sorted(resources),
            "rollout_id": rollout.rollout_id,
        },
    )


@rollout
async def async_echo(task: dict[str, Any], prompt: PromptTemplate, rollout: Rollout) -> RolloutResult:
    """An async agent: awaits several coroutines concurrently inside the worker."""

    async def step(i: int) -> int:
        await asyncio.sleep(0.05)
        return i * i

    squares = await asyncio.gather(*(step(i) for i in range(task["n"])))
    return RolloutResult(
        reward=float(sum(squares)),
        output={"text": prompt.format(**task), "squares": squares, "rollout_id": rollout.rollout_id},
    )


@rollout
def slow_first(task: dict[str, Any], rollout: Rollout) -> RolloutResult:
    """Hangs on its first attempt (long enough for the test to kill its worker), then is quick."""
    if _first_time(task, rollout.rollout_id, "slow"):
        (Path(task["marker_dir"]) / f"{rollout.rollout_id}.started").touch()
        time.sleep(task.get("first_sleep", 120))
    return RolloutResult(reward=1.0, output={"pid": os.getpid()})
