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

from celery import Celery, bootsteps, signals

from lightning_queue.core.errors import AgentNotConfiguredError, ConfigurationError
from lightning_queue.core.settings import Settings
from lightning_queue.storage.connections import broker_ssl_options, connect
from lightning_queue.storage.retention import register_retention
from lightning_queue.worker.agent import LitAgent
from lightning_queue.worker.runner import TASK_NAME, register_tasks

__all__ = ["TASK_NAME", "LightningCelery", "app", "celery_config", "create_app", "load_agent"]

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings every lightning-queue app uses."""
    transport_options: dict[str, Any] = {
        # Every broker key under our prefix: several deployments share one Redis safely.
        "global_keyprefix": settings.keys.celery_prefix,
        "visibility_timeout": settings.visibility_timeout,
        # Sweep for messages of vanished workers a few times per visibility timeout (kombu's
        # default sweeps every ~100 s), so they are redelivered soon after it expires.
        "unacked_restore_interval": max(1, min(30, settings.visibility_timeout // 4)),
        "unacked_restore_throttle": 1,
    }
    if settings.sentinel_master:
        # kombu's sentinel:// transport asks the Sentinels for this primary (as connect() does).
        transport_options["master_name"] = settings.sentinel_master
    return {
        "broker_url": settings.redis_url,
        "broker_transport_options": transport_options,
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
        self.health: Any = None  # the main process's health.HealthRecorder, on workers
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
            from lightning_queue.client import LightningClient

            # No start-up check here: a worker's pool process made while Redis restarts must not
            # die of it; its commands ride out the outage through the client's backoff instead.
            settings = self.lightning_settings
            redis_client = connect(settings.redis_url, settings.sentinel_master, check=False,
                                   retry_seconds=settings.redis_retry_seconds)
            self._lightning_client = LightningClient(self.lightning_settings, app=self, redis_client=redis_client)
        return self._lightning_client


class FleetDuties(bootsteps.StartStopStep):
    """What every worker's main process does for the fleet, on the worker's own timer:
    sweep for unresponsive attempts (:mod:`lightning_queue.watchdog`) and record its
    consumption health (:mod:`lightning_queue.health`).

    A consumer bootstep, so it runs in each worker and restarts with the consumer
    after a lost connection; with every worker sweeping, the watchdog has no
    single point of failure. A failing tick is logged and the next one tries again.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None
        self.queues: list[str] | None = None

    def start(self, c: Any) -> None:
        app = c.app
        if not isinstance(app, LightningCelery):
            return
        if self.queues is None:
            # The queues it was started for: cancel_consumer later deselects them, and a
            # worker that stopped consuming one must still be judged on it.
            selected = app.amqp.queues.consume_from or app.amqp.queues
            self.queues = sorted(selected)
        settings = app.lightning_settings
        if app.health is None:
            from lightning_queue.storage.liveness import HealthRecorder

            app.health = HealthRecorder(app.lightning, c.hostname, ttl=3 * settings.sweep_interval + 5)
        self.tref = c.timer.call_repeatedly(settings.sweep_interval, self.tick, (c,), priority=10)

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def tick(self, c: Any) -> None:
        from celery.worker import state

        from lightning_queue.worker.heartbeat import run_sweep

        app: LightningCelery = c.app
        run_sweep(app.lightning)
        try:
            consuming = sorted(q.name for q in (c.task_consumer.queues if c.task_consumer else []))
            concurrency = int(getattr(c.controller, "concurrency", 0) or getattr(c.pool, "num_processes", 1) or 1)
            app.health.report(self.queues or [], consuming, len(state.active_requests), concurrency)
        except Exception as exc:  # noqa: BLE001 - a timer callback must not die
            log.error("worker health report failed: %s: %s", type(exc).__name__, exc)


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


def _sends_process_init(pool_cls: Any) -> bool:
    """Whether a worker with this pool (a class or a name like ``"threads"``) sends
    ``worker_process_init``: prefork does in each child, solo in the worker itself."""
    from celery import concurrency

    module = getattr(concurrency.get_implementation(pool_cls), "__module__", "")
    return module in ("celery.concurrency.prefork", "celery.concurrency.solo")


def create_app(settings: Settings | None = None, agent: LitAgent | str | None = None) -> LightningCelery:
    """Build a Celery app for lightning-queue, with the rollout and retention tasks registered
    (retention is scheduled for ``celery beat`` when ``gc_interval_seconds`` is set).

    ``settings`` defaults to :class:`Settings` read from the environment.
    ``agent`` (an agent or a ``"module:attr"`` string) is only needed on workers.
    """
    app = LightningCelery(settings or Settings(), agent=agent)
    register_tasks(app)
    register_retention(app)
    app.steps["consumer"].add(FleetDuties)

    @signals.worker_init.connect(weak=False)
    def _check_agent(sender: Any = None, **_: Any) -> None:
        # Fail at start-up, not on the first rollout, when a worker has no usable agent.
        if getattr(sender, "app", None) is app:
            app.agent  # noqa: B018
            app.is_worker = True
            app.worker_hostname = sender.hostname
            warning = check_visibility_timeout(app.lightning_settings)
            if warning:
                log.warning("%s", warning)
            if not _sends_process_init(sender.pool_cls):
                # Thread, gevent and eventlet pools run rollouts in this very process and never
                # send worker_process_init: without this their rollouts would all skip the cache.
                _start_cache()

    @signals.task_received.connect(weak=False)
    def _note_received(sender: Any = None, **_: Any) -> None:
        # Liveness is judged by consumption: the main process notes every message it takes.
        if getattr(sender, "app", None) is app and app.health is not None:
            app.health.received()

    @signals.worker_process_init.connect(weak=False)
    def _start_cache(**_: Any) -> None:
        # Each pool process builds its own client after the fork: a cache's listener
        # thread does not survive a fork, so nothing is inherited from the parent.
        if app.is_worker:
            from lightning_queue.worker.cache import attach_cache

            app._lightning_client = None
            attach_cache(app.lightning, f"{app.worker_hostname}:{os.getpid()}")

    @signals.worker_shutdown.connect(weak=False)  # the pools that send no worker_process_shutdown
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
