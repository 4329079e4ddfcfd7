"""The worker's Celery signal receivers, connected once, when this module is first imported.

Celery's signals are global; receivers connected per app would pile up with every app made
in a process (and fire for apps that are not workers). These are module-level functions
connected once; each acts only for the :class:`~lightning_queue.worker.app.WorkerApp` this
process works for, which ``worker_init`` records (pool processes inherit it through the fork).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

from lightning_queue.storage.liveness import HealthRecorder
from lightning_queue.worker.app import (
    WorkerApp,
    check_visibility_timeout,
    connections_needed,
    max_concurrency,
    pool_module,
)

log = logging.getLogger(__name__)

_worker_app: WorkerApp | None = None
"""The app of the worker running in this process (set in its main process by worker_init)."""


def worker_app() -> WorkerApp | None:
    """The app of the worker this process belongs to, or None outside a worker."""
    return _worker_app


def _sends_process_init(pool_cls: Any) -> bool:
    """Whether a worker with this pool (a class or a name like ``"threads"``) sends
    ``worker_process_init``: prefork does in each child, solo in the worker itself."""
    return pool_module(pool_cls) in ("celery.concurrency.prefork", "celery.concurrency.solo")


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if not isinstance(app, WorkerApp):
        return
    global _worker_app
    _worker_app = app
    # Fail at start-up, not on the first rollout, when a worker has no usable agent.
    app.agent  # noqa: B018
    app.hostname = sender.hostname
    warning = check_visibility_timeout(app.settings)
    if warning:
        log.warning("%s", warning)
    if not _sends_process_init(sender.pool_cls):
        # Thread, gevent and eventlet pools run rollouts in this very process and never send
        # worker_process_init: its context runs them, so it gets the cache, and a Redis client
        # with a connection for each (the ConnectionBudget step sizes the broker's pools).
        app.redis_connections = connections_needed(pool_module(sender.pool_cls), max_concurrency(sender))
        app.start_context(with_cache=True)


def _on_process_init(**_: Any) -> None:
    # Each pool process builds its own context after the fork: a cache's listener thread and
    # the parent's sockets do not survive one.
    if _worker_app is not None:
        _worker_app.start_context(with_cache=True)


def _on_process_shutdown(**_: Any) -> None:
    if _worker_app is not None:
        _worker_app.close_context()


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    if _worker_app is not None and _worker_app.context_pid == os.getpid():
        _worker_app.close_context()


def _on_task_received(sender: Any = None, **_: Any) -> None:
    # Liveness is judged by consumption: the main process notes every message it takes.
    app = _worker_app
    health: HealthRecorder | None = None if app is None else app.health
    if health is not None and getattr(sender, "app", None) is app:
        health.received()


# Connected once, when this module is first imported (lightning_queue.app imports it); the pools
# that send no worker_process_shutdown (threads, gevent) close their context at worker_shutdown.
signals.worker_init.connect(_on_worker_init)
signals.worker_process_init.connect(_on_process_init)
signals.worker_process_shutdown.connect(_on_process_shutdown)
signals.worker_shutdown.connect(_on_worker_shutdown)
signals.task_received.connect(_on_task_received)
