"""Rollout task messages, built once per batch instead of once per rollout.

Celery's ``send_task`` costs about 0.2 ms per message (routing, re-declaring
the queue, signals, retry wrappers, one task-sent event each): at thousands
of rollouts per optimization step that was two thirds of an enqueue. Rollout
messages differ only in their ids, kwargs and time limits, so
:func:`publish_rollouts` asks Celery for one message
(``app.amqp.as_task_v2``, the protocol-2 headers and body a worker expects)
and copies it per rollout into the envelope kombu's Redis transport stores
(JSON, body base64, priority 0: the queue's own list). The messages go out
with one LPUSH per queue and chunk, in one pipeline, and their task-sent
events as ``task.multi`` lists, the form workers use for their own buffered
events and that Flower reads. Not sent: Celery's ``before_task_publish`` /
``after_task_publish`` signals; nothing in lightning-queue listens to them, but
instrumentation hooked on them (tracing that injects headers, say) does not see
rollout messages.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery.events import Event
from celery.events.event import get_exchange
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from pydantic_core import to_json

from lightning_queue.worker.runner import TASK_NAME

if TYPE_CHECKING:
    from kombu import Producer

    from lightning_queue.core.models import Rollout
    from lightning_queue.worker.app import LightningCelery

# Task messages per LPUSH, and task-sent events per event message: big enough that a batch
# takes few commands, small enough that no single reply or payload is huge.
CHUNK = 1000

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _delivery_tag() -> str:
    # Unique per message, in uuid4's text form as kombu makes it, without building a UUID object
    # (uuid.uuid4() was a tenth of a batch's cost).
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def task_kwargs(rollout: Rollout, registry_seq: int) -> dict[str, Any]:
    """The rollout task's keyword arguments: ids only (Flower shows them)."""
    return {"rollout_id": rollout.rollout_id, "resources_id": rollout.resources_id,
            "resources_version": rollout.resources_version, "registry_seq": registry_seq}


@dataclass
class TaskMessages:
    """A batch of rollout task messages, ready to send."""

    by_queue: dict[str, list[bytes]] = field(default_factory=dict)  # queue -> messages (kombu envelopes, JSON)
    sent_events: list[dict[str, Any]] = field(default_factory=list)  # task-sent events, in message order


def build_messages(
    app: LightningCelery,
    rollouts: Sequence[Rollout],
    limits: Sequence[tuple[float | None, float | None]],
    registry_seq: int = 0,
    countdown: float | None = None,
) -> TaskMessages:
    """One task message per rollout: the one ``app.send_task(TASK_NAME, kwargs=...,
    task_id=rollout_id, queue=rollout.queue, time_limit=hard, soft_time_limit=soft,
    countdown=countdown)`` would send, with ``limits`` holding each rollout's ``(hard, soft)``
    limits. Needs no broker."""
    # As send_task calls it (ignore_result=None: the task's own setting decides). A countdown
    # becomes the same ``eta`` header for the whole batch: the worker holds the message until then.
    template = app.amqp.as_task_v2("template", TASK_NAME, reply_to=app.thread_oid, ignore_result=None,
                                   create_sent_event=bool(app.conf.task_send_sent_event), countdown=countdown)
    out = TaskMessages()
    hostname, pid, clock = anon_nodename(), os.getpid(), app.clock
    for rollout, (hard, soft) in zip(rollouts, limits, strict=True):
        rid, queue, kwargs = rollout.rollout_id, rollout.queue, task_kwargs(rollout, registry_seq)
        kwargsrepr = repr(kwargs)
        headers = {**template.headers, "id": rid, "root_id": rid, "timelimit": [hard, soft], "kwargsrepr": kwargsrepr}
        body = base64.b64encode(to_json([[], kwargs, _EMBED])).decode()
        message = {
            "body": body, "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
            "properties": {**template.properties, "correlation_id": rid, "delivery_mode": 2,
                           "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                           "body_encoding": "base64", "delivery_tag": _delivery_tag()},
        }
        out.by_queue.setdefault(queue, []).append(to_json(message))
        if template.sent_event is not None:
            out.sent_events.append(Event(
                "task-sent", hostname=hostname, utcoffset=utcoffset(), pid=pid, clock=clock.forward(),
                **{**template.sent_event, "uuid": rid, "root_id": rid, "kwargs": kwargsrepr, "queue": queue,
                   "exchange": "", "routing_key": queue},
            ))
    return out


def send_messages(app: LightningCelery, producer: Producer, batch: TaskMessages) -> None:
    """Push the messages through the producer channel's own Redis client (kombu's, which adds
    the broker key prefix) in one pipeline, then the task-sent events through ``producer`` in
    a second, in the order Celery sends them: two round trips whatever the batch's size."""
    for queue in batch.by_queue:
        producer.maybe_declare(app.amqp.queues[queue])  # cached: a round trip the first time only
    pipe = producer.channel.client.pipeline(transaction=False)
    for queue, messages in batch.by_queue.items():
        for start in range(0, len(messages), CHUNK):
            pipe.lpush(queue, *messages[start:start + CHUNK])  # BRPOP takes them in this order
    pipe.execute()
    if batch.sent_events:
        exchange = get_exchange(producer.connection, name=app.conf.event_exchange)
        hostname = batch.sent_events[0]["hostname"]
        with producer.batch():  # every chunk in one round trip
            for start in range(0, len(batch.sent_events), CHUNK):
                producer.publish(batch.sent_events[start:start + CHUNK], routing_key="task.multi",
                                 exchange=exchange.name, declare=[exchange], serializer=app.conf.event_serializer,
                                 headers={"hostname": hostname}, delivery_mode=1, retry=False)


def publish_rollouts(
    app: LightningCelery,
    producer: Producer,
    rollouts: Sequence[Rollout],
    limits: Sequence[tuple[float | None, float | None]],
    registry_seq: int = 0,
    countdown: float | None = None,
) -> None:
    """:func:`build_messages` and :func:`send_messages`."""
    send_messages(app, producer, build_messages(app, rollouts, limits, registry_seq, countdown))
