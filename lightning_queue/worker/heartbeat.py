"""Heartbeats: while an attempt is open, its process keeps its heartbeat deadline fresh.

One daemon thread per worker process pushes the deadline of every attempt the process runs
forward every ``heartbeat_interval`` seconds. The claim that opens an attempt writes its
first deadline, so a rollout shorter than one interval costs no heartbeat command at all.
An attempt whose deadline passes is closed by the fleet's sweep
(:func:`lightning_queue.worker.recovery.sweep_unresponsive`).

Deadlines are wall-clock times written by the beating worker and compared by
the sweeping one: keep worker clocks in sync (NTP) to well under
``heartbeat_timeout``.

A process's own heartbeat thread cannot run while its agent holds the GIL (a long C call that
does not release it). So a prefork worker's main process beats too, for the attempts its pool
processes run, as long as each of those processes exists and is not stopped
(:func:`beat_for_pool`): an attempt is declared unresponsive only when its process is gone,
stopped (SIGSTOP, a debugger) or cut off from Redis. Thread, gevent and eventlet pools run
agents in the main process itself: there an agent holding the GIL stops every beat, and the
heartbeat timeout must exceed its longest such stretch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator

import psutil
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


_NOT_RUNNING = frozenset({psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


def process_runs(pid: int) -> bool:
    """Whether process ``pid`` exists and is not stopped, traced-stopped or a zombie."""
    try:
        return psutil.Process(pid).status() not in _NOT_RUNNING
    except psutil.Error:
        return False


def beat_for_pool(store: RolloutStore, worker_id: str, running: Iterable[tuple[str, int | None]]) -> int:
    """The worker's main process beats for the attempts its pool processes run: ``running`` is
    each rollout being run, with the pid of the process running it (None before a pool process
    accepted it). Beats, in one pipeline, for those whose process is another one that exists
    and is not stopped (a stopped process must be declared unresponsive); each only if the
    rollout's open attempt is ``worker_id``'s. Returns how many beats were sent."""
    own = os.getpid()
    ids = [rid for rid, pid in running if pid is not None and pid != own and process_runs(pid)]
    if ids:
        store.heartbeat_for_workers(ids, worker_id)
    return len(ids)
