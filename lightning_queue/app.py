"""The worker's entry point: ``celery -A lightning_queue.app worker`` runs a worker for the
agent named by ``LQ_AGENT``; a module of yours may instead call :func:`create_app` with its
agent and be started with ``celery -A yourmodule worker``.

Worker-side code: algorithms never import it (they use :class:`~lightning_queue.LightningClient`).
"""

from __future__ import annotations

from typing import Any

from lightning_queue.core.settings import Settings
from lightning_queue.worker import signals  # noqa: F401 - connects the worker's signal receivers, once
from lightning_queue.worker.agent import LitAgent
from lightning_queue.worker.app import WorkerApp, load_agent
from lightning_queue.worker.bootsteps import BatchedEvents, ConnectionBudget, FleetDuties
from lightning_queue.worker.tasks import register_tasks

__all__ = ["WorkerApp", "app", "create_app", "load_agent"]


def create_app(settings: Settings | None = None, agent: LitAgent | str | None = None) -> WorkerApp:
    """A worker app: the rollout and retention tasks registered (retention scheduled for
    ``celery beat`` when ``gc_interval_seconds`` is set), its broker connections sized for its
    pool, the fleet duties and batched task events added.

    ``settings`` defaults to :class:`Settings` read from the environment; ``agent`` (an agent
    or a ``"module:attr"`` string) defaults to ``settings.agent``. Making many apps in one
    process connects nothing global: the signal receivers are connected once, at import.
    """
    worker = WorkerApp(settings or Settings(), agent=agent)
    register_tasks(worker)
    worker.steps["worker"].add(ConnectionBudget)
    worker.steps["consumer"].add(FleetDuties)
    worker.steps["consumer"].add(BatchedEvents)
    return worker


app: WorkerApp  # made by __getattr__ below, on first use


def __getattr__(name: str) -> Any:
    """``app``: the default app, configured from the environment (``celery -A lightning_queue.app
    worker``). Built on first use, not at import, so a bad ``LQ_*`` setting fails where the app is
    needed (the CLI says so in one line) rather than as a traceback on import."""
    if name == "app":
        globals()["app"] = default = create_app()
        return default
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
