"""One agent that misbehaves as each task asks, for the live bad-input catalogue
(``LQ_AGENT=tests.integration.bad_agents:catalogue``): one worker fleet serves every case."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from lightning_queue import PromptTemplate, Rollout, RolloutResult, rollout


@rollout
def catalogue(task: dict[str, Any], prompt: PromptTemplate, rollout: Rollout) -> Any:
    """``task["do"]``: ``ok``, ``raise``, ``hang``, ``wrong_type``, ``render`` (formats the prompt
    with ``task["vars"]``), ``gate`` (waits until the file ``task["gate"]`` exists), ``nan`` (a NaN
    reward), ``inf_step`` (an infinite step reward), ``exit`` (``sys.exit(3)``), ``interrupt``
    (``KeyboardInterrupt``), ``ignore_term`` (ignores SIGTERM, leaves a ``.stubborn`` marker, then
    hangs) or ``ignore_soft`` (catches its soft time limit and goes on for ``task["after"]`` s)."""
    if "marker_dir" in task:
        (Path(task["marker_dir"]) / f"{rollout.rollout_id}.ran").touch()
    do = task["do"]
    if do == "raise":
        raise ValueError(f"the agent failed on purpose for {rollout.rollout_id}")
    if do == "hang":
        time.sleep(3600)
    if do == "wrong_type":
        return "a reward of 1"
    if do == "render":
        return RolloutResult(reward=1.0, output=prompt.format(**task["vars"]))
    if do == "nan":
        return float("nan")
    if do == "inf_step":
        return RolloutResult(reward=1.0, step_rewards=[0.5, float("inf")])
    if do == "exit":
        sys.exit(3)
    if do == "interrupt":
        raise KeyboardInterrupt
    if do == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (Path(task["marker_dir"]) / f"{rollout.rollout_id}.stubborn").touch()
        time.sleep(3600)
    if do == "ignore_soft":
        try:
            time.sleep(3600)
        except SoftTimeLimitExceeded:
            time.sleep(task["after"])
        return RolloutResult(reward=1.0, output={"ignored": "the soft time limit"})
    if do == "gate":
        deadline = time.monotonic() + 120
        while not Path(task["gate"]).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return RolloutResult(reward=1.0, output={"prompt": prompt.template})
