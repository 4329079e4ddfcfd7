"""Agents the queue benchmark runs on its workers (``LQ_AGENT=bench_agents:<name>``).

Each stamps ``time.time()`` into its output, so the benchmark can tell when the
agent returned (result latency) and which rollouts ran at the same time in one
process (in-flight), from the records alone.
"""

from __future__ import annotations

import os
import time
from typing import Any

from lightning_queue import RolloutResult, rollout


@rollout
def noop(task: Any) -> RolloutResult:
    """Does nothing: what is left is the queue's own cost."""
    return RolloutResult(output={"end": time.time()})


@rollout
def sleeper(task: Any) -> RolloutResult:
    """Waits ``task["sleep"]`` seconds (default 50 ms), as an agent waiting on an LLM does
    (I/O-bound, no CPU), and reports when it ran and in which process."""
    start = time.time()
    time.sleep(task.get("sleep", 0.05))
    return RolloutResult(output={"start": start, "end": time.time(), "pid": os.getpid()})
