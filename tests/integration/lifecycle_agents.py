"""The agent the snapshot lifecycle tests run in real worker processes
(``LQ_AGENT=tests.integration.lifecycle_agents:agent``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_queue import PromptTemplate, Rollout, RolloutResult, rollout


@rollout
def agent(task: dict[str, Any], prompt: PromptTemplate, rollout: Rollout) -> RolloutResult:
    """Report the prompt template it was given, so the test sees which snapshot it ran with.

    With ``task["marker_dir"]`` it also leaves ``<rollout_id>.ran`` there: the workers share the
    file system with the test, so "the agent never ran this rollout" can be checked.
    """
    if task.get("marker_dir"):
        (Path(task["marker_dir"]) / f"{rollout.rollout_id}.ran").touch()
    return RolloutResult(reward=1.0, output=prompt.template)
