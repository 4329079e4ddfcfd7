"""Heartbeats: while an attempt is open, its process keeps its heartbeat deadline fresh.

One daemon thread per worker process pushes the deadline of every attempt the process runs
forward every ``heartbeat_interval`` seconds. The claim that opens an attempt writes its
first deadline, so a rollout shorter than one interval costs no heartbeat command at all.
An attempt whose deadline passes is closed by the fleet's sweep
(:func:`lightning_queue.worker.recovery.sweep_unresponsive`).

Deadlines are wall-clock times written by the beating worker and compared by
the sweeping one: keep worker clocks in sync (NTP) to well under
``heartbeat_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import redis

from lightning_queue.storage.store import RolloutStore

log = logging.getLogger(__name__)


class _Open:
    """The attempt a process is running, as the heartbeat thread sees it."""

    __slots__ = ("alive", "last_beat", "rollout_id", "sequence_id")

    def __init__(self, rollout_id: str, sequence_id: int) -> None:
        self.rollout_id = rollout_id
        self.sequence_id = sequence_id
        self.last_beat = time.monotonic()  # the claim was the first beat
        self.alive = True


class Heartbeat:
    """Keeps the heartbeats of the attempts this process runs fresh, from one daemon thread.

    One per process, started on first use (after the pool's fork: threads do
    not survive one). A prefork child runs one attempt at a time; a thread or
    gevent pool runs many at once in one process, so every open attempt is
    tracked. The rollout's own thread only registers and unregisters its
    attempt, so a short rollout pays nothing.
    """

    def __init__(self, store: RolloutStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self._open: dict[tuple[str, int], _Open] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def attempt(self, rollout_id: str, sequence_id: int) -> Iterator[None]:
        """Beat for attempt ``sequence_id`` of ``rollout_id`` while the block runs."""
        self._start()
        key = (rollout_id, sequence_id)
        with self._lock:
            self._open[key] = _Open(rollout_id, sequence_id)
        try:
            yield
        finally:
            with self._lock:
                self._open.pop(key, None)

    def open_attempts(self) -> list[tuple[str, int]]:
        """The attempts this process is beating for now."""
        with self._lock:
            return list(self._open)

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lq-heartbeat", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        # Wake twice per interval so a beat is never more than 1.5 intervals after the last.
        while True:
            time.sleep(self.interval / 2)
            now = time.monotonic()
            with self._lock:
                due = [o for o in self._open.values() if o.alive and now - o.last_beat >= self.interval]
            for current in due:
                self._beat(current)

    def _beat(self, current: _Open) -> None:
        try:
            current.alive = self.store.heartbeat(current.rollout_id, current.sequence_id)
            current.last_beat = time.monotonic()
        except redis.RedisError as exc:
            # Keep trying: if Redis stays away long enough the watchdog will close the attempt.
            log.warning("rollout %s: heartbeat failed (%s)", current.rollout_id, exc)
            return
        if not current.alive:
            log.warning(
                "rollout %s attempt %d is no longer open (declared unresponsive or lost, or cancelled); "
                "its result will be refused", current.rollout_id, current.sequence_id,
            )
