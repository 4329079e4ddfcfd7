"""A worker app module with hooks, as a user writes one: the example's hooks installed at import,
plus a hook that always raises (it must not break a rollout), then the app.

    celery -A tests.integration.hooks_app worker   (LQ_AGENT=tests.integration.hooks_app:maybe_fail)
"""

from __future__ import annotations

from typing import Any

from algorithms.hooks_example import install
from lightning_queue import create_app, hooks, rollout


@rollout
def maybe_fail(task: dict[str, Any]) -> float:
    if task.get("fail"):
        raise ValueError(f"asked to fail: {task['i']}")
    return float(task["i"])


def broken(event: object) -> None:
    raise RuntimeError("a hook with a bug")


install()
hooks.on_start.connect(broken)
hooks.on_success.connect(broken)
hooks.on_failure.connect(broken)
app = create_app()
