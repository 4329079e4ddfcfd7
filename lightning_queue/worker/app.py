"""The worker's Celery app class: the broker configuration, the worker's agent, and a
per-process :class:`~lightning_queue.worker.context.WorkerContext`.

:func:`lightning_queue.app.create_app` makes one with the tasks, the fleet duties and the
signal receivers; ``celery -A lightning_queue.app worker`` runs it for the agent named by
``LQ_AGENT``.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from celery import Celery

from lightning_queue.broker.app import celery_config
from lightning_queue.core.errors import AgentNotConfiguredError, ConfigurationError, ConnectionBudgetError
from lightning_queue.core.settings import Settings
from lightning_queue.storage.liveness import HealthRecorder
from lightning_queue.worker.agent import LitAgent
from lightning_queue.worker.context import WorkerContext

__all__ = ["WorkerApp", "apply_connection_budget", "check_visibility_timeout", "load_agent"]

log = logging.getLogger(__name__)


def load_agent(spec: str) -> LitAgent:
    """Import ``"package.module:attribute"`` and check it is an agent."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"agent {spec!r} must look like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import agent module {module_name!r}: {exc}. Run from the directory that holds it "
            "or add it to PYTHONPATH"
        ) from exc
    try:
        agent = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if isinstance(agent, type) and issubclass(agent, LitAgent):
        agent = agent()
    if not isinstance(agent, LitAgent):
        raise ConfigurationError(
            f"{spec} is a {type(agent).__name__}, not an agent: decorate a function with "
            "@lightning_queue.rollout or subclass lightning_queue.LitAgent"
        )
    return agent


class WorkerApp(Celery):  # type: ignore[misc]  # Celery ships no type information
    """A Celery app that runs rollouts: its settings, its agent (loaded on first use, so a
    module of yours can build the app before the agent is importable), and this process's
    :class:`WorkerContext` (made on first use, and again in each process after a fork)."""

    def __init__(self, settings: Settings, agent: LitAgent | str | None = None, **kwargs: Any) -> None:
        super().__init__("lightning_queue", set_as_current=False, **kwargs)
        self.settings = settings
        self._agent_spec = agent if agent is not None else settings.agent
        self._agent: LitAgent | None = agent if isinstance(agent, LitAgent) else None
        self._context: WorkerContext | None = None
        self.hostname = ""  # the worker's node name, once worker_init ran
        self.health: HealthRecorder | None = None  # the main process's health records
        self.conf.update(celery_config(settings))

    @property
    def agent(self) -> LitAgent:
        if self._agent is None:
            if not self._agent_spec:
                raise AgentNotConfiguredError(
                    "this worker has no agent: start it with `lightning-queue worker --agent module:attr`, "
                    "set LQ_AGENT, or build the app with create_app(agent=...)"
                )
            self._agent = load_agent(str(self._agent_spec))
        return self._agent

    @property
    def context(self) -> WorkerContext:
        """This process's context. Made on first use without a cache (the worker's main
        process); pool processes start theirs with one (:meth:`start_context`)."""
        if self._context is None or self._context.pid != os.getpid():
            self._context = WorkerContext.create(self.settings, self)
        return self._context

    @property
    def context_pid(self) -> int | None:
        return None if self._context is None else self._context.pid

    def start_context(self, with_cache: bool = False) -> WorkerContext:
        """Make this process's context now (after a fork, the parent's is dropped unclosed:
        its sockets and threads belong to the parent)."""
        if self._context is not None and self._context.pid == os.getpid():
            self._context.close()
        name = f"{self.hostname}:{os.getpid()}" if self.hostname else None
        self._context = WorkerContext.create(self.settings, self, cache_name=name, with_cache=with_cache)
        return self._context

    def close_context(self) -> None:
        if self._context is not None and self._context.pid == os.getpid():
            self._context.close()
        self._context = None


def check_visibility_timeout(settings: Settings) -> str | None:
    """A warning when this worker's settings let a rollout run longer than the broker's
    visibility timeout (the broker would then hand its message to a second worker, which
    drops it while the attempt still heartbeats, but the hand-over wastes a delivery and,
    if heartbeats stop, redelivers late), else None."""
    limit = settings.default_timeout_seconds
    if limit and limit + settings.hard_timeout_grace_seconds > settings.visibility_timeout:
        return (
            f"LQ_DEFAULT_TIMEOUT_SECONDS ({limit:g} s) plus LQ_HARD_TIMEOUT_GRACE_SECONDS "
            f"({settings.hard_timeout_grace_seconds:g} s) is above LQ_VISIBILITY_TIMEOUT "
            f"({settings.visibility_timeout} s): raise LQ_VISIBILITY_TIMEOUT above the longest rollout, on "
            "workers and clients alike"
        )
    if settings.heartbeat_deadline >= settings.visibility_timeout:
        return (
            f"the heartbeat timeout ({settings.heartbeat_deadline:g} s) is not below LQ_VISIBILITY_TIMEOUT "
            f"({settings.visibility_timeout} s): a redelivered message could find its attempt still counted "
            "alive and be dropped; lower LQ_HEARTBEAT_TIMEOUT or raise the visibility timeout"
        )
    return None


IN_PROCESS_POOLS = ("celery.concurrency.gevent", "celery.concurrency.eventlet", "celery.concurrency.thread")
"""Pools whose tasks run in the worker's own process (greenlets or threads), each acking its
message and sending retries through that process's broker connections."""
CONNECTION_HEADROOM = 10
"""Broker connections a worker needs besides one per concurrent task: its consumer (BRPOP and
pub/sub), events, remote control, restores (kombu's default pool size)."""


def apply_connection_budget(app: Celery, settings: Settings, pool_module: str, concurrency: int) -> int | None:
    """Size the broker connection pools for a worker whose pool is ``pool_module`` running
    ``concurrency`` tasks at once; return the size set (None: kombu's defaults suffice).

    A prefork or solo pool acks and publishes from the main process, one at a time: kombu's
    defaults (10) suffice. A gevent, eventlet or thread pool does so from every task at once:
    each channel's connection pool (transport option ``max_connections``) and Celery's
    producer pool (``broker_pool_limit``) get ``concurrency +`` :data:`CONNECTION_HEADROOM`,
    or a busy pool hits ``MaxConnectionsError`` (its acks fail). Limits the user set in
    ``LQ_CELERY`` are kept; one below what the pool needs raises :class:`ConnectionBudgetError`.
    """
    if pool_module not in IN_PROCESS_POOLS:
        return None
    need = concurrency + CONNECTION_HEADROOM
    pool = pool_module.rsplit(".", 1)[-1]
    chosen = settings.celery
    options = app.conf.broker_transport_options  # the dict itself: connections made since read it too
    chosen_options = chosen.get("broker_transport_options") or {}
    for setting, configured in (
        ("broker_transport_options.max_connections", chosen_options.get("max_connections")),
        ("broker_pool_limit", chosen.get("broker_pool_limit")),
    ):
        if configured is not None and int(configured) < need:
            raise ConnectionBudgetError(setting, int(configured), need, pool, concurrency)
    options.setdefault("max_connections", need)
    if chosen.get("broker_pool_limit") is None:
        app.conf.broker_pool_limit = need
    return need
