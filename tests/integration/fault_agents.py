"""Agents for the fault tests (``tests/integration/test_faults.py``), run in real worker processes.

They coordinate with the test through files in ``task["marker_dir"]``: the
worker processes share the file system with the test, not memory.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

from lightning_queue import Rollout, RolloutResult, rollout


def _runs(task: dict[str, Any], rollout: Rollout) -> int:
    """Append this process to the rollout's run log; return how many runs came before."""
    log = Path(task["marker_dir"]) / f"{rollout.rollout_id}.runs"
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return len(log.read_text().splitlines()) - 1


@rollout
def held_first(task: dict[str, Any], rollout: Rollout) -> RolloutResult:
    """The first run writes its pid and holds until the test drops a ``go`` file, then reports
    reward 1; every later run reports reward 2 at once."""
    marker = Path(task["marker_dir"])
    if _runs(task, rollout) == 0:
        (marker / f"{rollout.rollout_id}.pid").write_text(str(os.getpid()))
        deadline = time.monotonic() + task.get("hold", 300)
        while not (marker / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return RolloutResult(reward=1.0, output={"pid": os.getpid(), "run": "first"})
    return RolloutResult(reward=2.0, output={"pid": os.getpid(), "run": "later"})


@rollout
def counted_sleeper(task: dict[str, Any], rollout: Rollout) -> RolloutResult:
    """Sleeps ``task["sleep"]`` seconds, logging each run."""
    _runs(task, rollout)
    time.sleep(task["sleep"])
    return RolloutResult(reward=1.0, output={"pid": os.getpid()})


@rollout
def gil_holder(task: dict[str, Any], rollout: Rollout) -> RolloutResult:
    """Holds the GIL for ``task["seconds"]`` in one C call (libc's sleep through ``ctypes.PyDLL``,
    which keeps the GIL, as a long computation in a C extension does): no other thread of its
    process, its heartbeat thread included, runs meanwhile. Logs each run; reports reward 1."""
    _runs(task, rollout)
    ctypes.PyDLL(None).sleep(int(task["seconds"]))
    return RolloutResult(reward=1.0, output={"pid": os.getpid()})
