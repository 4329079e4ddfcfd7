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

from celery import Celery, concurrency

from lightning_queue.broker.app import celery_config
from lightning_queue.core.errors import AgentNotConfiguredError, ConfigurationError, ConnectionBudgetError
from lightning_queue.core.settings import Settings
from lightning_queue.storage.liveness import HealthRecorder
from lightning_queue.worker.agent import LitAgent
from lightning_queue.worker.context import WorkerContext

__all__ = [
    "WorkerApp", "apply_connection_budget", "check_visibility_timeout", "connections_needed", "load_agent",
    "max_concurrency", "pool_module",
]

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
        # Connections this process's Redis client may open (None: redis-py's default, 100): set
        # for pools that run many tasks in one process (connections_needed).
        self.redis_connections: int | None = None
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
            self._context = WorkerContext.create(self.settings, self, max_connections=self.redis_connections)
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
        self._context = WorkerContext.create(self.settings, self, cache_name=name, with_cache=with_cache,
                                             max_connections=self.redis_connections)
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
"""Pools whose tasks run in the worker's own process (greenlets or threads), each using that
process's Redis client and broker connections at once."""
CONNECTION_HEADROOM = 10
"""Connections a worker process needs besides one per concurrent task: its consumer (BRPOP and
pub/sub), events, remote control, restores, heartbeats, the snapshot cache's listener."""


def pool_module(pool_cls: Any) -> str:
    """The module of a worker's pool class (given as a class or a name like ``"threads"``)."""
    return str(getattr(concurrency.get_implementation(pool_cls), "__module__", ""))


def max_concurrency(worker: Any) -> int:
    """The most tasks a worker (Celery's ``WorkController``) runs at once: its concurrency, or its
    autoscale maximum (``auto`` counts as the CPUs)."""
    counts = [worker.concurrency, getattr(worker, "max_concurrency", None)]
    known = [int(c) for c in counts if isinstance(c, int) or (isinstance(c, str) and c.isdigit())]
    return max(known or [os.cpu_count() or 1])


def connections_needed(pool: str, concurrency: int) -> int | None:
    """Connections one worker process needs to each Redis pool it uses, for a ``pool`` (module
    name) running ``concurrency`` tasks at once; None when the defaults suffice.

    A prefork or solo pool runs one task per process and acks and publishes from the main
    process, one at a time: redis-py's (100) and kombu's (10) defaults suffice. A gevent,
    eventlet or thread pool runs every task in one process: each task may hold a connection of
    the process's Redis client, of each kombu channel pool (its ack) and of Celery's producer
    pool (its retry) at once, so each needs ``concurrency +`` :data:`CONNECTION_HEADROOM`, or a
    busy pool hits ``MaxConnectionsError`` (failed acks, results not recorded)."""
    return concurrency + CONNECTION_HEADROOM if pool in IN_PROCESS_POOLS else None


def apply_connection_budget(app: WorkerApp, settings: Settings, pool: str, concurrency: int) -> int | None:
    """Size the broker connection pools (kombu's ``max_connections`` transport option, Celery's
    ``broker_pool_limit``) and this process's Redis client for :func:`connections_needed`; return
    the size (None: defaults kept). Limits the user set in ``LQ_CELERY`` are kept; one below what
    the pool needs raises :class:`ConnectionBudgetError`."""
    need = connections_needed(pool, concurrency)
    if need is None:
        return None
    chosen = settings.celery
    chosen_options = chosen.get("broker_transport_options") or {}
    for setting, configured in (
        ("broker_transport_options.max_connections", chosen_options.get("max_connections")),
        ("broker_pool_limit", chosen.get("broker_pool_limit")),
    ):
        if configured is not None and int(configured) < need:
            raise ConnectionBudgetError(setting, int(configured), need, pool.rsplit(".", 1)[-1], concurrency)
    # The dict itself: connections made since read it too.
    app.conf.broker_transport_options.setdefault("max_connections", need)
    if chosen.get("broker_pool_limit") is None:
        app.conf.broker_pool_limit = need
    app.redis_connections = need
    return need
