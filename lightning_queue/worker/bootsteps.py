"""Fleet duties: what every worker's main process does for the fleet, on the worker's own timer."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.worker import state

from lightning_queue.core.errors import RegistryLostError
from lightning_queue.core.keys import ROLLOUT_TASK
from lightning_queue.storage.liveness import HealthRecorder
from lightning_queue.worker import recovery
from lightning_queue.worker.app import WorkerApp, apply_connection_budget, max_concurrency, pool_module
from lightning_queue.worker.heartbeat import beat_for_pool

log = logging.getLogger(__name__)

EVENT_FLUSH_SECONDS = 0.05
"""How long a worker's task events (what Flower shows) wait in its buffer before they are sent."""
EVENT_BUFFER_LIMIT = 200
"""Buffered task events that are sent at once, without waiting for :data:`EVENT_FLUSH_SECONDS`."""


class BatchedEvents(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery ships no type information
    """Send the worker's task events (received, started, succeeded, failed: Flower's view) in
    batches every :data:`EVENT_FLUSH_SECONDS`, not one publish per event loop turn.

    Celery buffers a worker's task events and sends the buffer as one ``task.multi`` message
    (which Flower reads like single events) at the next turn of the event loop: with short tasks
    that was a Redis round trip, waited on by the worker's main process, for nearly every event,
    about 2.4 per task, the largest single cost of the main process. Here the first buffered
    event schedules the send :data:`EVENT_FLUSH_SECONDS` later (or at once when
    :data:`EVENT_BUFFER_LIMIT` events are waiting), so Flower sees them up to that much later.
    Runs after Celery's ``Events`` step (which makes the dispatcher at each consumer start) and
    flushes what is buffered when the consumer stops.
    """

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.scheduled = False

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if c.hub is None or dispatcher is None or not dispatcher.on_send_buffered:
            return  # no event loop (e.g. a gevent pool): Celery sends each event as it comes
        self.scheduled = False
        dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        dispatcher.on_send_buffered = lambda: self.schedule(c)

    def schedule(self, c: Any) -> None:
        if not self.scheduled:
            self.scheduled = True
            c.hub.call_later(EVENT_FLUSH_SECONDS, self.flush, c)

    def flush(self, c: Any) -> None:
        self.scheduled = False
        try:
            c._flush_events()
        except Exception as exc:  # noqa: BLE001 - a timer callback must not die; Celery keeps the buffer
            log.warning("sending task events failed: %s: %s", type(exc).__name__, exc)

    def stop(self, c: Any) -> None:
        self.flush(c)


class ConnectionBudget(bootsteps.Step):  # type: ignore[misc]  # Celery ships no type information
    """Size the broker connection pools for this worker's pool and concurrency
    (:func:`lightning_queue.worker.app.apply_connection_budget`) before its consumer connects; a
    budget the user set too low stops the worker at start with a :class:`ConnectionBudgetError`
    (a worker step: an error raised by a ``worker_init`` receiver would only be logged)."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        app = parent.app
        if not isinstance(app, WorkerApp):
            return
        pool, concurrency = pool_module(parent.pool_cls), max_concurrency(parent)
        need = apply_connection_budget(app, app.settings, pool, concurrency)
        if need:
            log.info("Redis and broker connection pools sized for a %s pool of %d: %d connections each",
                     pool.rsplit(".", 1)[-1], concurrency, need)


class FleetDuties(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery ships no type information
    """Every sweep interval: sweep for unresponsive attempts
    (:func:`lightning_queue.worker.recovery.sweep_unresponsive`), look for lost task messages
    (:func:`lightning_queue.worker.recovery.reap`), record this worker's consumption health
    (:mod:`lightning_queue.storage.liveness`) and check the registry epoch
    (:mod:`lightning_queue.storage.epoch`: Redis losing its data is logged); every
    ``retry_poll_interval``, send the retries whose backoff is over
    (:func:`lightning_queue.worker.recovery.send_due_retries`); every heartbeat interval, beat for
    the attempts this worker's pool processes run while they are alive and not stopped
    (:func:`lightning_queue.worker.heartbeat.beat_for_pool`: an agent holding the GIL cannot beat
    itself).

    A consumer bootstep, so it runs in each worker and restarts with the consumer after a lost
    connection; with every worker sweeping, the watchdog has no single point of failure. A
    failing tick is logged and the next one tries again.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None
        self.beat_tref: Any = None
        self.retries_tref: Any = None
        self.queues: list[str] | None = None

    def start(self, c: Any) -> None:
        app = c.app
        if not isinstance(app, WorkerApp):
            return
        if self.queues is None:
            # The queues it was started for: cancel_consumer later deselects them, and a
            # worker that stopped consuming one must still be judged on it.
            selected = app.amqp.queues.consume_from or app.amqp.queues
            self.queues = sorted(selected)
        settings = app.settings
        if app.health is None:
            ctx = app.context
            app.health = HealthRecorder(ctx.redis, ctx.settings.keys, c.hostname, ttl=3 * settings.sweep_interval + 5)
        self.tref = c.timer.call_repeatedly(settings.sweep_interval, self.tick, (c,), priority=10)
        self.beat_tref = c.timer.call_repeatedly(settings.heartbeat_interval, self.beat, (c,), priority=10)
        self.retries_tref = c.timer.call_repeatedly(settings.retry_poll_interval, self.send_retries, (c,),
                                                    priority=10)

    def stop(self, c: Any) -> None:
        for tref in (self.tref, self.beat_tref, self.retries_tref):
            if tref is not None:
                tref.cancel()
        self.tref = self.beat_tref = self.retries_tref = None

    def beat(self, c: Any) -> None:
        app: WorkerApp = c.app
        try:
            running = [(r.kwargs.get("rollout_id") or r.id, r.worker_pid) for r in list(state.active_requests)
                       if r.task_name == ROLLOUT_TASK]
            if running:
                beat_for_pool(app.context.store, c.hostname, running)
        except Exception as exc:  # noqa: BLE001 - a timer callback must not die
            log.warning("heartbeat for the pool's attempts failed: %s: %s", type(exc).__name__, exc)

    def send_retries(self, c: Any) -> None:
        app: WorkerApp = c.app
        try:
            recovery.send_due_retries(app.context)
        except Exception as exc:  # noqa: BLE001 - a timer callback must not die
            log.error("sending due retries failed: %s: %s", type(exc).__name__, exc)

    def tick(self, c: Any) -> None:
        app: WorkerApp = c.app
        try:
            app.context.store.epoch.check()
        except RegistryLostError as exc:
            log.error("%s", exc)  # once: the check adopts the new registry
        except Exception as exc:  # noqa: BLE001 - a timer callback must not die
            log.error("registry epoch check failed: %s: %s", type(exc).__name__, exc)
        try:
            recovery.sweep_unresponsive(app.context)
        except Exception as exc:  # noqa: BLE001 - a timer callback must not die
            log.error("unresponsive-attempt sweep failed: %s: %s", type(exc).__name__, exc)
        try:
            recovery.reap(app.context)
        except Exception as exc:  # noqa: BLE001 - a timer callback must not die
            log.error("lost-message sweep failed: %s: %s", type(exc).__name__, exc)
        try:
            consuming = sorted(q.name for q in (c.task_consumer.queues if c.task_consumer else []))
            concurrency = int(getattr(c.controller, "concurrency", 0) or getattr(c.pool, "num_processes", 1) or 1)
            if app.health is not None:
                app.health.report(self.queues or [], consuming, len(state.active_requests), concurrency)
        except Exception as exc:  # noqa: BLE001 - a timer callback must not die
            log.error("worker health report failed: %s: %s", type(exc).__name__, exc)
