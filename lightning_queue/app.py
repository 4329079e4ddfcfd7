"""The Celery app: Redis broker, JSON only, late acks, one rollout at a time per process.

``celery -A lightning_queue.app worker`` runs a worker for the agent named by
``LQ_AGENT``; a module of yours may instead call ``create_app(agent=...)`` and
be started with ``celery -A yourmodule worker``.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from celery import Celery, signals

from .agent import LitAgent
from .connections import broker_ssl_options, connect
from .errors import AgentNotConfiguredError, ConfigurationError
from .retention import register_retention
from .runner import TASK_NAME, register_tasks
from .settings import Settings

__all__ = ["TASK_NAME", "LightningCelery", "app", "celery_config", "create_app", "load_agent"]

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings every lightning-queue app uses."""
    return {
        "broker_url": settings.redis_url,
        "broker_transport_options": {
            # Every broker key under our prefix: several deployments share one Redis safely.
            "global_keyprefix": settings.keys.celery_prefix,
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for messages of vanished workers a few times per visibility timeout (kombu's
            # default sweeps every ~100 s), so they are redelivered soon after it expires.
            "unacked_restore_interval": max(1, min(30, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
        },
        # rediss://: kombu takes TLS options from here, not from the URL (see broker_ssl_options).
        **({"broker_use_ssl": ssl} if (ssl := broker_ssl_options(settings.redis_url)) else {}),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Messages carry ids only; JSON keeps them readable in Flower and refuses pickle.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        # Rollouts are long: ack after the run, requeue when the worker process dies,
        # and let each process hold one message only.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Results live in the rollout store, not a Celery result backend.
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # Flower sees every task: sent, started, succeeded, failed, retried.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "task_default_queue": settings.queue,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


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


class LightningCelery(Celery):
    """A Celery app that knows its lightning-queue settings and (on workers) its agent."""

    def __init__(self, settings: Settings, agent: LitAgent | str | None = None, **kwargs: Any) -> None:
        super().__init__("lightning_queue", set_as_current=False, **kwargs)
        self.lightning_settings = settings
        self._agent_spec = agent if agent is not None else settings.agent
        self._agent: LitAgent | None = agent if isinstance(agent, LitAgent) else None
        self._lightning_client: Any = None
        self.is_worker = False  # set in the worker's main process; its pool processes inherit it
        self.worker_hostname = ""
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
    def lightning(self) -> Any:
        """This process's :class:`~lightning_queue.client.LightningClient` (made on first use,
        so each forked worker process opens its own connections)."""
        if self._lightning_client is None:
            from .client import LightningClient

            # No start-up check here: a worker's pool process made while Redis restarts must not
            # die of it; its commands ride out the outage through the client's backoff instead.
            redis_client = connect(self.lightning_settings.redis_url, check=False)
            self._lightning_client = LightningClient(self.lightning_settings, app=self, redis_client=redis_client)
        return self._lightning_client


def create_app(settings: Settings | None = None, agent: LitAgent | str | None = None) -> LightningCelery:
    """Build a Celery app for lightning-queue, with the rollout and retention tasks registered
    (retention is scheduled for ``celery beat`` when ``gc_interval_seconds`` is set).

    ``settings`` defaults to :class:`Settings` read from the environment.
    ``agent`` (an agent or a ``"module:attr"`` string) is only needed on workers.
    """
    app = LightningCelery(settings or Settings(), agent=agent)
    register_tasks(app)
    register_retention(app)

    @signals.worker_init.connect(weak=False)
    def _check_agent(sender: Any = None, **_: Any) -> None:
        # Fail at start-up, not on the first rollout, when a worker has no usable agent.
        if getattr(sender, "app", None) is app:
            app.agent  # noqa: B018
            app.is_worker = True
            app.worker_hostname = sender.hostname

    @signals.worker_process_init.connect(weak=False)
    def _start_cache(**_: Any) -> None:
        # Each pool process builds its own client after the fork: a cache's listener
        # thread does not survive a fork, so nothing is inherited from the parent.
        if app.is_worker:
            from .cache import attach_cache

            app._lightning_client = None
            attach_cache(app.lightning, f"{app.worker_hostname}:{os.getpid()}")

    @signals.worker_process_shutdown.connect(weak=False)
    def _stop_cache(**_: Any) -> None:
        cache = getattr(app._lightning_client, "cache", None)
        if cache is not None:
            cache.close()
            log.info("snapshot cache stats: %s", cache.stats())

    return app


app: LightningCelery  # made by __getattr__ below, on first use


def __getattr__(name: str) -> Any:
    """``app``: the default app, configured from the environment (``celery -A lightning_queue.app
    worker``). Built on first use, not at import, so a bad ``LQ_*`` setting fails where the app is
    needed (the CLI says so in one line) rather than as a traceback on ``import lightning_queue``."""
    if name == "app":
        globals()["app"] = default = create_app()
        return default
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
