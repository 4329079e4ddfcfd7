"""Waiting for rollouts to finish: one algorithm, driven by a blocking loop and by an asyncio one.

:class:`Waiter` is the algorithm and does no I/O (sans-IO): it says what to do next
(:meth:`Waiter.next_step`: subscribe, read, listen or return) and is told what happened
(:meth:`~Waiter.received`, :meth:`~Waiter.replied`, :meth:`~Waiter.failed`).
:func:`wait` drives it with redis-py, :func:`wait_async` with ``redis.asyncio``; they differ
only in ``await``.

Why statuses are read again, and when:

* **On every subscription confirmation.** Notifications published while the waiter was not
  subscribed are lost: before its first subscription took effect, and while its connection
  was down. redis-py re-subscribes by itself when it reconnects, so the confirmation
  message (``subscribe``) is the one reliable sign that a gap just ended; the statuses of the
  unfinished rollouts are read after it, so every rollout that finished in the gap is seen.
* **After** :data:`RECONCILE_SECONDS` **of silence** (no full read and no notification for
  one of its rollouts), as a safety net for a notification lost in any other way. It costs
  one pipelined ``HGET status`` per unfinished rollout; while notifications keep arriving
  they show the subscription works, so a large wait is not re-read needlessly.

A rollout whose record is missing on any read (never created, expired, or Redis lost its
data) raises :class:`RolloutNotFoundError`: it will never finish. Every read also reads the
registry epoch (:mod:`lightning_queue.storage.epoch`): when the records vanished because Redis
lost its data (the epoch the client knew is gone or replaced), the error is the subclass
:class:`RegistryLostError`, which says so.

Redis unreachable: after a failed operation the subscription's connection is dropped too
(a read that timed out says little about it) and everything is retried: reconnect,
re-subscribe, wait for the confirmation, re-read; with exponential backoff, for at most
``retry_seconds`` in a row and never past the deadline. At the deadline, or once
that budget is spent, the wait raises :class:`RedisUnavailableError`: whether the rollouts
it had not seen finish have finished is then unknown, so a partial list would be a guess.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import redis
import redis.asyncio
import redis.client

from lightning_queue.core.errors import RedisAuthError, RedisUnavailableError, RolloutNotFoundError
from lightning_queue.core.keys import Keys
from lightning_queue.core.models import TERMINAL_STATUSES, Rollout, check_rollout_id
from lightning_queue.storage.connections import RedisUnreachableError, backoff_delay, text, waiting_client
from lightning_queue.storage.epoch import RegistryEpoch

RECONCILE_SECONDS = 5.0
"""Statuses are read again after this long without a full read or a notification, in case one was lost."""

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)

Decode = Callable[[Mapping[Any, Any], str], Rollout]
"""A stored record's fields and its rollout id -> the rollout."""


@dataclass(frozen=True)
class Subscribe:
    """Subscribe to ``channel``, then call :meth:`Waiter.subscribe_sent`."""

    channel: str


@dataclass(frozen=True)
class Read:
    """Run ``commands`` in one pipeline (no transaction); hand the replies to :meth:`Waiter.replied`."""

    commands: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Listen:
    """Wait up to ``timeout`` seconds for a pub/sub message; hand it and every message already
    received to :meth:`Waiter.received`."""

    timeout: float


@dataclass(frozen=True)
class Done:
    """Return ``rollouts``."""

    rollouts: list[Rollout]


Step = Subscribe | Read | Listen | Done


class Waiter:
    """The state of one ``wait_for_rollouts`` call (see the module docstring for the algorithm).

    ``timeout`` is in seconds from now (``None``: no deadline). ``retry_seconds`` is how long
    Redis may stay unreachable before the wait gives up; ``server`` names it in that error (no
    password). ``decode`` turns a stored record into a :class:`Rollout`. ``on_finished`` is
    called once per rollout, as it is seen finished. ``epoch`` is the registry epoch as the
    waiting process knows it (told what each read finds; no I/O of its own).
    """

    def __init__(
        self,
        rollout_ids: Sequence[str],
        keys: Keys,
        decode: Decode,
        *,
        timeout: float | None,
        retry_seconds: float,
        server: str,
        on_finished: Callable[[Rollout], None] | None = None,
        reconcile_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        epoch: RegistryEpoch | None = None,
    ) -> None:
        self._ids = [check_rollout_id(rid) for rid in dict.fromkeys(rollout_ids)]
        self._wanted = set(self._ids)
        self._keys = keys
        self._epoch = epoch
        self._decode = decode
        self._clock = clock
        self._deadline = None if timeout is None else clock() + max(timeout, 0.0)
        self._retry_seconds = retry_seconds
        self._server = server
        self._on_finished = on_finished
        self._reconcile_seconds = RECONCILE_SECONDS if reconcile_seconds is None else reconcile_seconds
        self.channel = keys.events
        self._finished: dict[str, Rollout] = {}
        self._notified: dict[str, None] = {}  # finished, record not read yet (ordered, no duplicates)
        self._subscribe_sent = False
        self._subscribed = False  # a confirmation arrived since the last failure
        self._stale = True  # no full status read since the last (re-)subscription
        self._quiet_since = float("-inf")  # the last full read or notification for one of ours
        self._reading: tuple[Literal["statuses", "records"], list[str], float] | None = None
        self._unreachable_since: float | None = None
        self._failures = 0

    # -- what to do next -------------------------------------------------------------------

    def next_step(self) -> Step:
        now = self._clock()
        if len(self._finished) == len(self._ids):
            return Done(self.finished())
        expired = self._deadline is not None and now >= self._deadline
        if not self._subscribe_sent and not expired:
            return Subscribe(self.channel)
        # Read after the confirmation, so nothing finishes unseen between the read and the
        # subscription; once past the deadline nothing will be listened to, so read anyway.
        due = now - self._quiet_since >= self._reconcile_seconds
        if (self._stale and (self._subscribed or expired)) or (not self._stale and due and not expired):
            unfinished = [rid for rid in self._ids if rid not in self._finished and rid not in self._notified]
            if unfinished:
                return self._read("statuses", unfinished, now)
            self._stale, self._quiet_since = False, now
        if self._notified:
            return self._read("records", list(self._notified), now)
        if expired:
            return Done(self.finished())
        timeout = self._reconcile_seconds
        if not self._stale:
            timeout = self._quiet_since + self._reconcile_seconds - now
        if self._deadline is not None:
            timeout = min(timeout, self._deadline - now)
        return Listen(max(timeout, 0.0))

    def _read(self, kind: Literal["statuses", "records"], ids: list[str], now: float) -> Read:
        self._reading = (kind, ids, now)
        epoch = (("GET", self._keys.epoch),) if self._epoch is not None else ()
        if kind == "statuses":
            return Read((*epoch, *(("HGET", self._keys.rollout(rid), "status") for rid in ids)))
        return Read((*epoch, *(("HGETALL", self._keys.rollout(rid)) for rid in ids)))

    def finished(self) -> list[Rollout]:
        """The rollouts seen finished so far, in the order asked for."""
        return [self._finished[rid] for rid in self._ids if rid in self._finished]

    # -- what happened ---------------------------------------------------------------------

    def subscribe_sent(self) -> None:
        """The SUBSCRIBE went out; from now on the client re-subscribes by itself on reconnecting."""
        self._subscribe_sent = True

    def received(self, message: Mapping[str, Any] | None) -> None:
        """A pub/sub message: a subscription confirmation or a rollout's notification."""
        if message is None or text(message.get("channel") or b"") != self.channel:
            return
        kind = message["type"]
        if kind == "subscribe":
            self._subscribed, self._stale = True, True
            self._reachable()
        elif kind == "message":
            rid = text(message["data"])
            if rid in self._wanted and rid not in self._finished:
                self._notified[rid] = None
                self._quiet_since = max(self._quiet_since, self._clock())

    def replied(self, replies: Sequence[Any]) -> None:
        """The replies to the last :class:`Read`. Raises :class:`RolloutNotFoundError` for a
        record that is gone (:class:`RegistryLostError` when Redis lost its data)."""
        assert self._reading is not None, "replied() without a Read"
        kind, ids, started = self._reading
        self._reading = None
        self._reachable()
        if self._epoch is not None:
            raw, *replies = replies
            epoch = None if raw is None else text(raw)
            missing = [rid for rid, reply in zip(ids, replies, strict=True) if not reply]
            if missing or self._epoch.known is None:  # a record is gone: because Redis lost its data?
                self._epoch.saw(epoch, missing[0] if missing else None)
        if kind == "statuses":
            for rid, status in zip(ids, replies, strict=True):
                if status is None:
                    raise RolloutNotFoundError(rid)
                if text(status) in TERMINAL_STATUSES:
                    self._notified[rid] = None
            self._stale, self._quiet_since = False, max(self._quiet_since, started)
            return
        for rid, fields in zip(ids, replies, strict=True):
            self._notified.pop(rid, None)
            if not fields:
                raise RolloutNotFoundError(rid)
            rollout = self._decode(fields, rid)
            if rollout.is_finished and rid not in self._finished:
                self._finished[rid] = rollout
                if self._on_finished is not None:
                    self._on_finished(rollout)

    def failed(self, error: Exception) -> float:
        """An operation failed with a connection error or time-out: return how long to back off
        before the next step, or raise :class:`RedisUnavailableError` when the deadline has
        passed or Redis has been unreachable for ``retry_seconds``."""
        now = self._clock()
        self._reading = None
        self._subscribed, self._stale = False, True
        if isinstance(error, redis.AuthenticationError):
            raise RedisAuthError(self._server, error) from error
        if self._unreachable_since is None:
            self._unreachable_since = now
        self._failures += 1
        expired = self._deadline is not None and now >= self._deadline
        if expired or now - self._unreachable_since >= self._retry_seconds:
            # A client built by connect() already says where; name the cause once.
            cause = error.__cause__ if isinstance(error, RedisUnavailableError) and error.__cause__ else error
            raise RedisUnreachableError(self._server, cause) from error
        delay = min(backoff_delay(self._failures), self._retry_seconds - (now - self._unreachable_since))
        if self._deadline is not None:
            delay = min(delay, self._deadline - now)
        return max(delay, 0.0)

    def _reachable(self) -> None:
        self._unreachable_since, self._failures = None, 0


# ----------------------------------------------------------------------------- drivers


@dataclass
class _WaitLine:
    client: redis.Redis
    server: str
    pubsub: redis.client.PubSub
    stack: ExitStack  # closes the pub/sub and the client
    pid: int  # the process that made it: a forked child must not share its sockets


class WaitConnections:
    """The connections blocking waits on ``client``'s server use, kept from one wait to the next.

    A wait reads with a client whose connects and reads give up quickly
    (:func:`~lightning_queue.storage.connections.waiting_client`) and listens on a pub/sub
    connection. Making both for each wait cost two connection handshakes (HELLO, PING, CLIENT
    SETINFO...): ten round trips, more than the wait itself when rollouts are waited for one at a
    time. One set is kept idle between waits; a wait that finds it taken (another thread is
    waiting) makes its own and closes it after. Back in the idle slot, the pub/sub connection is
    unsubscribed (UNSUBSCRIBE is sent, its reply read by the next wait): nothing piles up for it.
    Whatever the next wait then reads first (notifications from before, the old confirmation)
    only costs it a read: every subscription confirmation makes the waiter read the statuses
    again, and the last one it reads is its own. A wait that ended with an error closes its set;
    a process forked from the one that made the set leaves it alone and makes its own.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._idle: _WaitLine | None = None
        self._closed = False

    @contextmanager
    def acquire(self) -> Iterator[tuple[redis.Redis, redis.client.PubSub, str]]:
        """A client, a pub/sub connection on it, and the server's URL for one wait."""
        with self._lock:
            line, self._idle = self._idle, None
        if line is not None and line.pid != os.getpid():
            line = None  # the parent's sockets: not closed here (that would end the parent's connections)
        if line is None:
            stack = ExitStack()
            client, server = stack.enter_context(waiting_client(self._client))
            pubsub = client.pubsub()
            stack.callback(pubsub.close)
            line = _WaitLine(client, server, pubsub, stack, os.getpid())
        kept = False
        try:
            yield line.client, line.pubsub, line.server
            kept = self._keep(line)
        finally:
            if not kept:
                line.stack.close()

    def _keep(self, line: _WaitLine) -> bool:
        if line.pubsub.connection is not None and line.pubsub.subscribed:
            try:
                line.pubsub.unsubscribe()
            except CONNECTION_ERRORS:
                return False
        with self._lock:
            if self._idle is None and not self._closed:
                self._idle = line
                return True
        return False

    def close(self) -> None:
        """Close the idle connections; waits after this make their own."""
        with self._lock:
            line, self._idle, self._closed = self._idle, None, True
        if line is not None:
            line.stack.close()


def wait(client: redis.Redis, waiter: Waiter, pubsub: redis.client.PubSub | None = None) -> list[Rollout]:
    """Run ``waiter`` with a blocking client, listening on ``pubsub`` (default: a pub/sub
    connection of its own, closed on return)."""
    own = pubsub is None
    if pubsub is None:
        pubsub = client.pubsub()
    try:
        while True:
            step = waiter.next_step()
            if isinstance(step, Done):
                return step.rollouts
            try:
                if isinstance(step, Subscribe):
                    pubsub.subscribe(step.channel)
                    waiter.subscribe_sent()
                elif isinstance(step, Read):
                    pipe = client.pipeline(transaction=False)
                    for command in step.commands:
                        pipe.execute_command(*command)
                    waiter.replied(pipe.execute())
                else:
                    message = pubsub.get_message(timeout=step.timeout)
                    while message is not None:  # take every message already here before reading
                        waiter.received(message)
                        message = pubsub.get_message(timeout=0)
            except CONNECTION_ERRORS as exc:
                if pubsub.connection is not None:  # re-establish the subscription too: it may be dead
                    pubsub.connection.disconnect()
                time.sleep(waiter.failed(exc))
    finally:
        if own:
            pubsub.close()


async def wait_async(client: redis.asyncio.Redis, waiter: Waiter) -> list[Rollout]:
    """Run ``waiter`` with an asyncio client. Cancelling it closes its pub/sub connection."""
    pubsub = client.pubsub()
    try:
        while True:
            step = waiter.next_step()
            if isinstance(step, Done):
                return step.rollouts
            try:
                if isinstance(step, Subscribe):
                    await pubsub.subscribe(step.channel)
                    waiter.subscribe_sent()
                elif isinstance(step, Read):
                    pipe = client.pipeline(transaction=False)
                    for command in step.commands:
                        pipe.execute_command(*command)
                    waiter.replied(await pipe.execute())
                else:
                    message = await pubsub.get_message(timeout=step.timeout)
                    while message is not None:
                        waiter.received(message)
                        message = await pubsub.get_message(timeout=0)
            except CONNECTION_ERRORS as exc:
                if pubsub.connection is not None:  # re-establish the subscription too: it may be dead
                    await pubsub.connection.disconnect(nowait=True)
                await asyncio.sleep(waiter.failed(exc))
    finally:
        await pubsub.aclose()
