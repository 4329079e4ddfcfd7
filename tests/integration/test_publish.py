"""Rollout task messages built in a batch are the messages Celery's ``send_task`` would send."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from lightning_queue import LightningClient, RolloutConfig
from lightning_queue.broker.publisher import DEFAULT_HEADERS, task_kwargs
from lightning_queue.core.keys import ROLLOUT_TASK as TASK_NAME


def _normalized(raw: bytes) -> dict[str, Any]:
    """A stored broker message with what differs between any two messages blanked out, and what
    a worker reads with a default left out where it holds that default (the batch publisher leaves
    it out: see DEFAULT_HEADERS in broker/publisher.py)."""
    message = json.loads(raw)
    headers, properties = message["headers"], message["properties"]
    for field in ("id", "root_id", "kwargsrepr", "origin"):
        headers[field] = "*"
    for field, default in DEFAULT_HEADERS.items():
        if field in headers and headers[field] == default:
            del headers[field]
    properties["correlation_id"] = properties["delivery_tag"] = "*"
    properties.pop("reply_to", None)
    args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
    message["body"] = [args, sorted(k for k, v in kwargs.items() if v is not None),
                       {k: v for k, v in (embed or {}).items() if v is not None}]
    return message


def _events(pubsub: Any, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next ``count`` Celery events published (a ``task.multi`` message carries several)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "pmessage":
            body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
            events += body if isinstance(body, list) else [body]
    return events


def test_batch_messages_match_send_task(client: LightningClient) -> None:
    queue = f"{client.settings.key_prefix}-sink"  # no worker listens there
    pubsub = client.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(f"{client.settings.keys.celery_prefix}*celeryev*")  # what Flower reads
    limited = RolloutConfig(timeout_seconds=5)
    ours = client.enqueue_rollouts([1, 2], config=limited, queue=queue, check_resources=False)
    grace = client.settings.hard_timeout_grace_seconds
    theirs = ours[0].model_copy(update={"rollout_id": "ro-reference"})
    with client.celery.producer_or_acquire() as producer:
        client.celery.send_task(TASK_NAME, kwargs=task_kwargs(theirs, 0, client.epoch.known or ""),
                                task_id=theirs.rollout_id, queue=queue,
                             producer=producer, soft_time_limit=5, time_limit=5 + grace)
    key = client.settings.keys.celery_prefix + queue
    stored = client.redis.lrange(key, 0, -1)  # LPUSH: newest first
    assert len(stored) == 3
    reference, second, first = stored
    # Workers take them oldest first (BRPOP), in enqueue order.
    assert [json.loads(m)["headers"]["id"] for m in (first, second)] == [r.rollout_id for r in ours]
    assert _normalized(first) == _normalized(reference)
    kwargs = json.loads(base64.b64decode(json.loads(first)["body"]))[1]
    assert kwargs == task_kwargs(ours[0], kwargs["registry_seq"], kwargs["registry_epoch"])
    assert kwargs["registry_epoch"] == client.epoch.known  # the registry the records were written in
    # Their task-sent events: the same fields as send_task's, one per message.
    events = _events(pubsub, 3)
    pubsub.close()
    assert [e["uuid"] for e in events] == [ours[0].rollout_id, ours[1].rollout_id, "ro-reference"]
    varying = {"uuid", "root_id", "kwargs", "timestamp", "clock"}
    mine, reference_event = events[0], events[2]
    assert {k: v for k, v in mine.items() if k not in varying} == {
        k: v for k, v in reference_event.items() if k not in varying}
    assert set(mine) == set(reference_event) and mine["type"] == "task-sent"


def test_one_rollout_is_enqueued_in_two_round_trips(client: LightningClient, monkeypatch: Any) -> None:
    # Its record (one MULTI/EXEC), then its message and its task-sent event (one pipeline): as few as
    # apply_async's own two (its message, its event).
    from redis.connection import AbstractConnection

    queue = f"{client.settings.key_prefix}-sink"
    pubsub = client.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(f"{client.settings.keys.celery_prefix}*celeryev*")
    client.enqueue_rollout(0, queue=queue, check_resources=False)  # warm: connections, queue declared
    _events(pubsub, 1)
    sent: list[bytes] = []
    original = AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else command)
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    rollout = client.enqueue_rollout(1, queue=queue, check_resources=False)
    monkeypatch.undo()
    assert len(sent) == 2, [s[:60] for s in sent]
    assert b"LPUSH" in sent[1] and b"PUBLISH" in sent[1]
    [event] = _events(pubsub, 1)
    assert (event["type"], event["uuid"]) == ("task-sent", rollout.rollout_id)
