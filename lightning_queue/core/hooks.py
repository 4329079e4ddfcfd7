"""Hooks: run your own code when rollouts are enqueued, start, succeed or fail, and when a pointer moves.

Each hook is a small typed registry; connect a function (as a decorator or a call) and it is
called with the event, in the process where the event happens::

    from lightning_queue import hooks

    @hooks.on_failure.connect
    def page_someone(event: hooks.RolloutFinished) -> None:
        print(event.rollout_id, event.error)

Where each fires (the one place the event happens):

* ``on_enqueue`` -- in the algorithm's process, by ``LightningClient.enqueue_rollouts`` once the
  rollouts are written and their messages sent (once per call, with the rollouts it created).
* ``on_start`` -- in the worker process, when an attempt starts running with its snapshot.
* ``on_success`` / ``on_failure`` -- in the worker process, once the rollout's final status
  (``succeeded`` / ``failed``) is recorded. An attempt that fails and is retried fires neither:
  these are about the rollout, not the Celery task (a rollout can fail while its task
  succeeds, which is why Celery's ``task_success``/``task_failure`` signals do not fit).
  Rollouts failed outside a running attempt (a lost worker detected by the watchdog, a hard
  time limit, a forced snapshot delete, a cancel) fire nothing.
* ``on_pointer_move`` -- in the process that moves it: ``set_pointer``, ``rollback``, a write
  moving ``latest``, a forced delete unsetting pointers, an experiment's promotion or rollback.

Worker-side hooks must be connected in a module the worker imports: the ``-A`` app module
(``workers/*.py``) is the place, at import time, next to the agent.

A hook that raises is logged (logger ``lightning_queue.core.hooks``) and the others still run:
a broken hook never breaks an enqueue, a rollout or a pointer move. Hooks run synchronously,
in the caller's thread; keep them quick, or hand the work to a thread or a queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from lightning_queue.core.models import Rollout

log = logging.getLogger(__name__)

E = TypeVar("E")


@dataclass(frozen=True)
class Enqueued:
    """Rollouts written and sent by one ``enqueue_rollouts`` call."""

    rollouts: Sequence[Rollout]


@dataclass(frozen=True)
class RolloutStarted:
    """Attempt ``attempt`` of a rollout started running with snapshot ``resources_id`` at ``version``."""

    rollout_id: str
    attempt: int
    resources_id: str
    version: int
    worker_id: str
    rollout: Rollout  # the record as the agent sees it


@dataclass(frozen=True)
class RolloutFinished:
    """A rollout reached its final status (``succeeded`` or ``failed``) after attempt ``attempt``."""

    rollout_id: str
    status: str
    attempt: int
    resources_id: str | None
    version: int | None
    worker_id: str
    reward: float | None = None
    error: str | None = None  # "Type: message" of a failure
    rollout: Rollout | None = None


@dataclass(frozen=True)
class PointerMoved:
    """A pointer moved from ``from_id`` to ``to_id`` (``None``: unset), ``by`` whom, by which ``op``, and why."""

    pointer: str
    from_id: str | None
    to_id: str | None
    by: str
    op: str
    reason: str
    time: float


class Hook(Generic[E]):
    """Functions called with one kind of event. Thread-safe to connect from anywhere."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._receivers: list[Callable[[E], object]] = []
        self._lock = threading.Lock()

    def connect(self, receiver: Callable[[E], object]) -> Callable[[E], object]:
        """Call ``receiver(event)`` on every event (connecting it twice calls it once). Returns it,
        so this works as a decorator."""
        with self._lock:
            if receiver not in self._receivers:
                self._receivers = [*self._receivers, receiver]
        return receiver

    def disconnect(self, receiver: Callable[[E], object]) -> None:
        with self._lock:
            self._receivers = [r for r in self._receivers if r is not receiver]

    @property
    def receivers(self) -> tuple[Callable[[E], object], ...]:
        return tuple(self._receivers)

    def fire(self, event: E) -> None:
        """Call every receiver; one that raises is logged and the others still run."""
        for receiver in self._receivers:  # a snapshot: connecting meanwhile replaces the list
            try:
                receiver(event)
            except Exception:
                log.exception("hook %s: %s raised; ignored", self.name,
                              getattr(receiver, "__qualname__", repr(receiver)))


on_enqueue: Hook[Enqueued] = Hook("on_enqueue")
on_start: Hook[RolloutStarted] = Hook("on_start")
on_success: Hook[RolloutFinished] = Hook("on_success")
on_failure: Hook[RolloutFinished] = Hook("on_failure")
on_pointer_move: Hook[PointerMoved] = Hook("on_pointer_move")
