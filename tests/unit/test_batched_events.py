"""worker/bootsteps.py BatchedEvents: a worker's task events go out in batches on a timer, none lost."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.events.dispatcher import EventDispatcher

from lightning_queue.worker.bootsteps import EVENT_BUFFER_LIMIT, EVENT_FLUSH_SECONDS, BatchedEvents


@pytest.fixture
def celery_app() -> Celery:
    return Celery("t", broker="memory://", set_as_current=False)


class Hub:
    """The part of kombu's hub the step uses: timers, fired by hand."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Any, tuple[Any, ...]]] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> None:
        self.timers.append((delay, callback, args))

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for _, callback, args in timers:
            callback(*args)


class Consumer:
    def __init__(self, app: Any) -> None:
        self.hub = Hub()
        self.sent: list[list[dict[str, Any]]] = []
        self.event_dispatcher = EventDispatcher(app=app, enabled=True, hostname="w@h", buffer_group=["task"],
                                                on_send_buffered=lambda: None)
        self.event_dispatcher._publish = self.publish  # as Celery's dispatcher sends (one message per flush)

    def publish(self, event: Any, producer: Any, routing_key: str, **_: Any) -> None:
        self.sent.append(event if isinstance(event, list) else [event])

    def _flush_events(self) -> None:  # Celery's Consumer._flush_events
        self.event_dispatcher.flush()


def started(celery_app: Any) -> tuple[BatchedEvents, Consumer]:
    consumer = Consumer(celery_app)
    step = object.__new__(BatchedEvents)
    step.scheduled = False
    step.start(consumer)
    return step, consumer


def test_events_wait_for_one_timer_then_go_out_together(celery_app: Any) -> None:
    step, c = started(celery_app)
    for uuid in ("a", "b", "c"):
        c.event_dispatcher.send("task-received", uuid=uuid)
        c.event_dispatcher.send("task-succeeded", uuid=uuid)
    assert c.sent == []  # buffered: nothing sent per event
    assert [delay for delay, _, _ in c.hub.timers] == [EVENT_FLUSH_SECONDS]  # one timer for the lot
    c.hub.fire()
    [batch] = c.sent
    assert [(e["type"], e["uuid"]) for e in batch] == [
        ("task-received", "a"), ("task-succeeded", "a"), ("task-received", "b"), ("task-succeeded", "b"),
        ("task-received", "c"), ("task-succeeded", "c")]
    c.event_dispatcher.send("task-started", uuid="d")  # the next event schedules the next send
    assert len(c.hub.timers) == 1
    step.stop(c)  # stopping sends what is buffered
    assert [e["uuid"] for e in c.sent[-1]] == ["d"]


def test_a_full_buffer_goes_out_at_once(celery_app: Any) -> None:
    _, c = started(celery_app)
    for i in range(EVENT_BUFFER_LIMIT):
        c.event_dispatcher.send("task-received", uuid=str(i))
    assert len(c.sent) == 1 and len(c.sent[0]) == EVENT_BUFFER_LIMIT


def test_without_an_event_loop_events_are_left_as_celery_sends_them(celery_app: Any) -> None:
    c = Consumer(celery_app)
    c.hub = None  # type: ignore[assignment]  # e.g. a gevent pool
    step = object.__new__(BatchedEvents)
    step.scheduled = False
    before = c.event_dispatcher.on_send_buffered
    step.start(c)
    assert c.event_dispatcher.on_send_buffered is before
