"""The batch publisher: rollout task messages, built once per batch instead of once per rollout.

Celery's ``send_task`` costs about 0.2 ms per message (routing, re-declaring
the queue, signals, retry wrappers, one task-sent event each): at thousands
of rollouts per optimization step that was two thirds of an enqueue. Rollout
messages differ only in their ids, kwargs and time limits, so
:meth:`Publisher.publish` asks Celery for one message (``app.amqp.as_task_v2``,
the protocol-2 headers and body a worker expects) and copies it per rollout
into the envelope kombu's Redis transport stores (JSON, body base64, priority
0: the queue's own list). The messages go out with one LPUSH per queue and
chunk, in one pipeline, and their task-sent events as ``task.multi`` lists,
the form workers use for their own buffered events and that Flower reads.

A rollout enqueued under an OpenTelemetry span carries its ``traceparent`` (W3C trace context)
as a message header, so the attempts' root spans are children of that span.

It behaves as ``send_task`` does where instrumentation looks: Celery's
``before_task_publish`` receivers see (and may add to) each message's headers
before it is serialized, ``after_task_publish`` receivers are told once it is
sent, and ``task_routes`` decide the queue of rollouts enqueued without one.
A broker whose transport is not kombu's Redis (e.g. ``memory://``) gets every
message through ``send_task`` itself.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery.events import Event
from celery.events.event import get_exchange
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from pydantic_core import to_json

from lightning_queue.core.errors import PublishError
from lightning_queue.core.keys import ROLLOUT_TASK, check_queue_name
from lightning_queue.core.settings import Settings

if TYPE_CHECKING:
    from kombu.messaging import Producer

    from lightning_queue.core.models import Rollout

log = logging.getLogger(__name__)

# Task messages per LPUSH, and task-sent events per event message: big enough that a batch
# takes few commands, small enough that no single reply or payload is huge.
CHUNK = 1000

# A queued rollout is mostly its message, so the message holds what a worker reads and no more
# (~430 bytes less than send_task's, 1,130 -> ~700): Celery's protocol-2 headers that the worker
# reads with a default (celery.worker.request.Request, its task Context) or not at all are left out
# while they hold that default (``timelimit`` too when neither limit is set); so are the empty embed
# (callbacks, errbacks, chain, chord: read with ``embed or {}``), the ``reply_to`` property (for RPC
# results; rollouts have no result backend) and the kwargs that are None (the task's defaults).
# ``kwargsrepr`` stays: the worker's task-received event carries it, and Flower shows it.
DEFAULT_HEADERS: dict[str, Any] = {
    "lang": "py", "shadow": None, "eta": None, "expires": None, "group": None, "group_index": None, "retries": 0,
    "parent_id": None, "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    "timelimit": [None, None],
}
_EMBED: dict[str, Any] = {}

Limits = tuple[float | None, float | None]
"""A rollout's (hard, soft) time limits in seconds, as Celery's ``timelimit`` header holds them."""


def _delivery_tag() -> str:
    # Unique per message, in uuid4's text form as kombu makes it, without building a UUID object
    # (uuid.uuid4() was a tenth of a batch's cost).
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def task_kwargs(rollout: Rollout, registry_seq: int, registry_epoch: str = "") -> dict[str, Any]:
    """The rollout task's keyword arguments: ids only (Flower shows them). ``registry_seq`` and
    ``registry_epoch`` say how fresh, and of which registry, a worker cache's answer must be."""
    kwargs: dict[str, Any] = {"rollout_id": rollout.rollout_id}
    if rollout.resources_id is not None:
        kwargs["resources_id"] = rollout.resources_id
    if rollout.resources_version is not None:
        kwargs["resources_version"] = rollout.resources_version
    kwargs["registry_seq"] = registry_seq
    if registry_epoch:
        kwargs["registry_epoch"] = registry_epoch
    return kwargs


@dataclass
class TaskMessages:
    """A batch of rollout task messages, ready to send."""

    by_queue: dict[str, list[bytes]] = field(default_factory=dict)  # queue -> messages (kombu envelopes, JSON)
    sent_events: list[dict[str, Any]] = field(default_factory=list)  # task-sent events, in message order
    published: list[dict[str, Any]] = field(default_factory=list)  # after_task_publish arguments, when listened to


class Publisher:
    """Sends rollout task messages for one Celery app. Used by the client (enqueue) and by the
    worker's recovery (requeue): the one path every rollout message takes.

    Thread-safe as Celery's producer pool is: each call acquires its own producer.
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def queue_for(self, queue: str | None) -> str:
        """The queue a rollout goes to: ``queue`` when given, else what ``task_routes`` route the
        rollout task to (routes keyed by task name; a routing function sees no arguments), else
        ``settings.queue``. Raises :class:`InvalidQueueNameError` for a name that cannot be a
        broker queue (:func:`~lightning_queue.core.keys.check_queue_name`)."""
        if queue:
            return check_queue_name(queue)
        routed = self.app.amqp.router.route({}, ROLLOUT_TASK, (), {})
        destination = routed.get("queue")
        name = getattr(destination, "name", destination)
        return check_queue_name(str(name)) if name else self.settings.queue

    def limits(self, rollout: Rollout) -> Limits:
        """The rollout's (hard, soft) time limits: its own ``timeout_seconds`` or
        ``settings.default_timeout_seconds`` as the soft one, the hard one the grace later.
        Warns when the hard limit outlasts the broker's visibility timeout."""
        settings = self.settings
        soft = rollout.config.timeout_seconds or settings.default_timeout_seconds
        hard = soft + settings.hard_timeout_grace_seconds if soft else None
        if hard and hard > settings.visibility_timeout:
            log.warning(
                "rollout %s may run %.0f s, longer than the visibility timeout (%d s): the broker would hand it "
                "to a second worker meanwhile; raise LQ_VISIBILITY_TIMEOUT on workers and clients",
                rollout.rollout_id, hard, settings.visibility_timeout,
            )
        return hard, soft or None

    def publish(self, rollouts: Sequence[Rollout], registry_seq: int = 0, countdown: float | None = None,
                *, registry_epoch: str = "") -> None:
        """Send one task message per rollout (ids only), to each rollout's queue.

        ``registry_seq`` and ``registry_epoch`` tell worker caches how recent a registry state,
        and of which registry, the rollouts need (see :mod:`lightning_queue.worker.cache`);
        ``countdown`` delays the messages (Celery's ``eta``). Raises :class:`PublishError` when
        the broker did not take them; the caller decides what becomes of the rollouts.
        """
        if not rollouts:
            return
        limits = [self.limits(r) for r in rollouts]
        try:
            with self.app.producer_or_acquire() as producer:
                if hasattr(producer.channel, "client"):
                    self._send(producer, self.build(rollouts, limits, registry_seq, countdown, registry_epoch))
                else:
                    self._send_one_by_one(producer, rollouts, limits, registry_seq, countdown, registry_epoch)
        except Exception as exc:
            raise PublishError([r.rollout_id for r in rollouts], exc) from exc

    def build(
        self,
        rollouts: Sequence[Rollout],
        limits: Sequence[Limits],
        registry_seq: int = 0,
        countdown: float | None = None,
        registry_epoch: str = "",
    ) -> TaskMessages:
        """One task message per rollout: the one ``app.send_task(ROLLOUT_TASK, kwargs=...,
        task_id=rollout_id, queue=rollout.queue, time_limit=hard, soft_time_limit=soft,
        countdown=countdown)`` would send. Needs no broker."""
        app = self.app
        # As send_task calls it (ignore_result=None: the task's own setting decides). A countdown
        # becomes the same ``eta`` header for the whole batch: the worker holds the message until then.
        template = app.amqp.as_task_v2("template", ROLLOUT_TASK, reply_to=app.thread_oid, ignore_result=None,
                                       create_sent_event=bool(app.conf.task_send_sent_event), countdown=countdown)
        base_headers = {k: v for k, v in template.headers.items()
                        if k not in DEFAULT_HEADERS or v != DEFAULT_HEADERS[k]}
        base_properties = {k: v for k, v in template.properties.items() if k != "reply_to"}
        before = bool(signals.before_task_publish.receivers)
        after = bool(signals.after_task_publish.receivers)
        out = TaskMessages()
        hostname, pid, clock = anon_nodename(), os.getpid(), app.clock
        for rollout, (hard, soft) in zip(rollouts, limits, strict=True):
            rid, queue, kwargs = rollout.rollout_id, rollout.queue, task_kwargs(rollout, registry_seq, registry_epoch)
            kwargsrepr = repr(kwargs)
            headers = {**base_headers, "id": rid, "root_id": rid, "kwargsrepr": kwargsrepr}
            if hard is not None or soft is not None:  # none: the worker's own limits, as when absent
                headers["timelimit"] = [hard, soft]
            if rollout.traceparent:
                headers["traceparent"] = rollout.traceparent  # W3C trace context, as OpenTelemetry's Celery tooling
            properties = {**base_properties, "correlation_id": rid, "delivery_mode": 2,
                          "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                          "body_encoding": "base64", "delivery_tag": _delivery_tag()}
            body = ((), kwargs, _EMBED)
            if before:
                # What send_task tells its receivers; they may add headers (trace context, say).
                signals.before_task_publish.send(
                    sender=ROLLOUT_TASK, body=body, exchange="", routing_key=queue,
                    declare=[app.amqp.queues[queue]], headers=headers, properties=properties, retry_policy=None,
                )
            message = {"body": base64.b64encode(to_json([[], kwargs, _EMBED])).decode(),
                       "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
                       "properties": properties}
            out.by_queue.setdefault(queue, []).append(to_json(message))
            if after:
                out.published.append({"sender": ROLLOUT_TASK, "body": body, "headers": headers, "exchange": "",
                                      "routing_key": queue})
            if template.sent_event is not None:
                out.sent_events.append(Event(
                    "task-sent", hostname=hostname, utcoffset=utcoffset(), pid=pid, clock=clock.forward(),
                    **{**template.sent_event, "uuid": rid, "root_id": rid, "kwargs": kwargsrepr, "queue": queue,
                       "exchange": "", "routing_key": queue},
                ))
        return out

    def _send(self, producer: Producer, batch: TaskMessages) -> None:
        """Push the messages through the producer channel's own Redis client (kombu's, which adds
        the broker key prefix) and their task-sent events after them, in one pipeline: one round
        trip whatever the batch's size (two on a channel that cannot take the events into the
        pipeline, i.e. not lightning-queue's transport)."""
        app = self.app
        for queue in batch.by_queue:
            producer.maybe_declare(app.amqp.queues[queue])  # cached: a round trip the first time only
        channel = producer.channel
        pipe = channel.client.pipeline(transaction=False)
        for queue, messages in batch.by_queue.items():
            for start in range(0, len(messages), CHUNK):
                pipe.lpush(queue, *messages[start:start + CHUNK])  # BRPOP takes them in this order
        commands_into = getattr(channel, "commands_into", None)
        if batch.sent_events and commands_into is not None:
            with commands_into(pipe):
                self._send_events(producer, batch.sent_events)
            pipe.execute()
        else:
            pipe.execute()
            if batch.sent_events:
                with producer.batch():  # every chunk in one round trip
                    self._send_events(producer, batch.sent_events)
        for published in batch.published:
            signals.after_task_publish.send(**published)

    def _send_events(self, producer: Producer, events: list[dict[str, Any]]) -> None:
        """The task-sent events as ``task.multi`` lists (as workers send theirs; Flower reads them)."""
        app = self.app
        exchange = get_exchange(producer.connection, name=app.conf.event_exchange)
        hostname = events[0]["hostname"]
        for start in range(0, len(events), CHUNK):
            producer.publish(events[start:start + CHUNK], routing_key="task.multi", exchange=exchange.name,
                             declare=[exchange], serializer=app.conf.event_serializer, headers={"hostname": hostname},
                             delivery_mode=1, retry=False)

    def _send_one_by_one(
        self, producer: Producer, rollouts: Sequence[Rollout], limits: Sequence[Limits], registry_seq: int,
        countdown: float | None, registry_epoch: str,
    ) -> None:
        for rollout, (hard, soft) in zip(rollouts, limits, strict=True):
            headers = {"traceparent": rollout.traceparent} if rollout.traceparent else None
            self.app.send_task(ROLLOUT_TASK, kwargs=task_kwargs(rollout, registry_seq, registry_epoch),
                               task_id=rollout.rollout_id,
                               queue=rollout.queue, time_limit=hard, soft_time_limit=soft, countdown=countdown,
                               producer=producer, headers=headers)
