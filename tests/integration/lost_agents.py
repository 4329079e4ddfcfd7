"""Agents for the lost-message tests (``tests/integration/test_lost.py``), run in real worker processes."""

from __future__ import annotations

from typing import Any

from lightning_queue import Rollout, rollout


@rollout
def fails_twice(task: dict[str, Any], rollout: Rollout) -> float:
    """Fails its first ``task.get("failures", 2)`` attempts, succeeds on the next."""
    if rollout.attempt_count <= task.get("failures", 2):
        raise ConnectionError(f"attempt {rollout.attempt_count} fails on purpose")
    return 1.0
