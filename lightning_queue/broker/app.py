"""The Celery binding both sides share: the configuration every lightning-queue app uses.

:func:`make_celery` gives a configured Celery app with no tasks and no signal receivers:
what an algorithm process needs to publish rollout messages and send remote-control
commands (``revoke``). The worker builds its app on the same configuration and adds its
tasks, bootsteps and receivers (:mod:`lightning_queue.worker.app`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from celery import Celery
from kombu.serialization import prepare_accept_content

from lightning_queue.broker.transport import SENTINEL_TRANSPORT, TRANSPORT
from lightning_queue.core.settings import Settings
from lightning_queue.storage.connections import broker_ssl_options


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings every lightning-queue app uses, then ``settings.celery`` (the user's
    own Celery settings, passed through: ``LQ_CELERY='{"worker_max_tasks_per_child": 100}'``)."""
    transport_options: dict[str, Any] = {
        # Every broker key under our prefix: several deployments share one Redis safely.
        "global_keyprefix": settings.keys.celery_prefix,
        "visibility_timeout": settings.visibility_timeout,
        # Sweep for messages of vanished workers a few times per visibility timeout (kombu's
        # default sweeps every ~100 s), so they are redelivered soon after it expires.
        "unacked_restore_interval": max(1, min(30, settings.visibility_timeout // 4)),
        "unacked_restore_throttle": 1,
        # lightning_queue.broker.transport: where refused messages go, and how big a message may be.
        "lq_dead_letter_key": settings.keys.dead_letters,
        "lq_max_message_bytes": settings.max_message_bytes,
    }
    if settings.sentinel_master:
        # kombu's sentinel:// transport asks the Sentinels for this primary (as connect() does).
        transport_options["master_name"] = settings.sentinel_master
    config: dict[str, Any] = {
        "broker_url": settings.redis_url,
        "broker_transport_options": transport_options,
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
        # Results live in the rollout store (LightningClient.get_rollout / wait_for_rollouts),
        # not in a Celery result backend: AsyncResult(id).get() has nothing to read.
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # Flower sees every task: sent, started, succeeded, failed, retried.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "task_default_queue": settings.queue,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    # rediss://: kombu takes TLS options from here, not from the URL (see broker_ssl_options).
    ssl = broker_ssl_options(settings.redis_url)
    if ssl:
        config["broker_use_ssl"] = ssl
    config.update(settings.celery)
    scheme = urlparse(str(config["broker_url"])).scheme
    if scheme in ("redis", "rediss", "sentinel"):
        # kombu's Redis transport, hardened: malformed messages and lost connections never take a
        # worker down (lightning_queue.broker.transport).
        config.setdefault("broker_transport", SENTINEL_TRANSPORT if scheme == "sentinel" else TRANSPORT)
        options = config["broker_transport_options"]
        options.setdefault("lq_content_types", sorted(prepare_accept_content(config["accept_content"])))
    return config


def make_celery(settings: Settings, **kwargs: Any) -> Celery:
    """A Celery app configured for ``settings``: no tasks, no signal receivers, never the
    current app. Cheap to make and to drop: nothing global is touched."""
    app = Celery("lightning_queue", set_as_current=False, **kwargs)
    app.conf.update(celery_config(settings))
    return app
