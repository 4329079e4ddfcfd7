"""``celery -A lightning_queue.app worker``: the worker app for the agent named by ``LQ_AGENT``.

The app lives in :mod:`lightning_queue.worker.app`; this module keeps the command every
deployment already uses working. It is worker-side code: algorithms never import it.
"""

from __future__ import annotations

from typing import Any

from lightning_queue.worker.app import create_app, load_agent

__all__ = ["app", "create_app", "load_agent"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from lightning_queue.worker import app as worker_app

        return worker_app.app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
