"""kombu's Redis transport, hardened so that nothing a broker holds or throws takes a worker down.

:func:`~lightning_queue.broker.app.celery_config` selects these classes through Celery's
``broker_transport`` for ``redis://``, ``rediss://`` and ``sentinel://`` URLs. They change
kombu's Redis transport (5.7) in three places, and nowhere else:

* **Malformed messages are refused, not fatal.** kombu decodes a message taken off a queue
  in the worker's event loop: a message that is not JSON, a JSON array, an envelope without
  ``properties``, a body that is not base64 raised out of the loop and the worker exited
  ("Unrecoverable error"). Every message a worker takes is screened first (:func:`screen`):
  one that kombu or Celery could not take (or bigger than ``settings.max_message_bytes``, or
  of a content type Celery does not accept) is logged, moved to the dead-letter list
  ``{p}:dead-letters`` for an operator to read, and skipped; the next message is taken as usual.
* **A lost connection while a worker holds messages is survived.** When the connection
  drops, Celery closes the broken connection (``Consumer.on_connection_error_after_connected``:
  ``collect()`` then ``close()``). The channel's close first reads the reply of its pending
  BRPOP, which raises on the dead socket, so ``collect()`` gave up before the channel was
  closed; ``collect()`` then dropped the transport's connection info, and ``close()``, closing
  the channel again, rebuilt its connection pool from it to hand the unacked messages back:
  ``AttributeError: 'NoneType' object has no attribute 'hostname'``, and the worker exited.
  That happens whenever the consumer still waits on a BRPOP while it holds messages, as it
  does with ETA messages (its prefetch limit is raised for them). Same family as
  celery/kombu#970 and celery/kombu#582 (closing a channel whose connection info is gone);
  no upstream fix in kombu 5.7. Here the pending read's connection error no longer aborts the
  close, and a hand-back that cannot reach Redis is logged, not raised: the messages stay in
  the unacked hash, and the process hands them back itself as soon as it consumes again (its
  next channel's ``basic_consume``). Until then nobody holds them; had the process died
  instead, kombu restores them after the visibility timeout (and the reaper,
  :func:`lightning_queue.worker.recovery.reap`, finds any rollout whose message is lost).
* Fanout (remote control) messages of the wrong shape are dropped with a warning.

And one change for speed: kombu builds a new redis-py client object for every ack, every
unacked-message record, every event and every restore (``Channel.conn_or_acquire``); building
one cost more of a worker's main process than the command it then sent (about a tenth of its
time with no-op tasks). Here each channel keeps one client for them, on the same connection pool.

Two more for the worker's main loop, which waited on two round trips per message (kombu's BRPOP
takes one message, then records it in the unacked hash and index with a MULTI/EXEC) and a third
per ack (a MULTI/EXEC removing the record):

* **An ack rides with the next write** (:class:`QoS`). An ack taken in the event loop (kombu's hub:
  acks late, Celery sends them through the loop) frees its prefetch slot at once; its removal is
  written with the next message's record, or ``ACK_DELAY`` seconds later when no message comes, and
  before the channel closes. A lost ack write (the worker killed within those milliseconds) leaves a
  message in the unacked hash, redelivered after the visibility timeout, whose rollout the claim
  then finds finished and drops. Without the hub (gevent, eventlet) acks are written at once.
* **Several messages per round trip** (:data:`TAKE_MORE`). The record of a message a BRPOP
  returned is written by one script that also, when the prefetch limit allows more, pops up to
  ``DELIVERY_BATCH`` more from the same list and records them in the same step (atomic: none of
  them is ever off the queue and unrecorded, which kombu's BRPOP-then-record allows for a moment).
  A backlog costs one round trip per batch instead of two per message; a single message costs what
  it did. Each is screened and delivered as if BRPOP had returned it. Queues consumed without acks
  take one message at a time.

Every message is still recorded as unacked before its task runs, so nothing a worker took is lost.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils import json as kombu_json

from lightning_queue.storage.scripts import script_source

log = logging.getLogger(__name__)

DEAD_LETTER_LIMIT = 10_000
"""Entries kept in the dead-letter list (the newest); older ones are dropped."""
DEAD_LETTER_KEEP_BYTES = 64 * 1024
"""Bytes of a refused message kept in its dead-letter entry."""
BODY_ENCODINGS = (None, "utf-8", "base64")
"""The body encodings kombu's virtual transport decodes."""
DELIVERY_BATCH = 64
"""The most messages one :data:`TAKE_MORE` pops after a BRPOP (within the prefetch limit)."""
TAKE_MORE = script_source("take_more")
"""``lua/take_more.lua``: the record of a BRPOP'd message and up to ``DELIVERY_BATCH`` more, in one step."""

ACK_DELAY = 0.02
"""Seconds an ack taken in the event loop waits for the next delivery's write before it is
written on its own."""


def screen(raw: bytes, max_bytes: int, content_types: Collection[str]) -> str | None:
    """Why a message taken off a queue cannot be delivered, or None when it can: it must be at
    most ``max_bytes``, a JSON object with kombu's envelope (``properties`` with a
    ``delivery_tag`` and ``delivery_info``, a string ``body`` in an encoding kombu decodes,
    ``headers`` an object), of one of ``content_types`` (empty: any), its body JSON when it
    says so."""
    return screened(raw, max_bytes, content_types)[0]


def screened(raw: bytes, max_bytes: int, content_types: Collection[str]) -> tuple[str | None, Any]:
    """:func:`screen`'s answer, and the message as kombu decodes it (None when refused), so a
    message is decoded once."""
    if len(raw) > max_bytes:
        return f"{len(raw)} bytes, above the limit of {max_bytes} (LQ_MAX_MESSAGE_BYTES)", None
    try:
        # kombu's decoding (its object hook revives the values it encoded with a type tag).
        message = json.loads(raw.decode(), object_hook=kombu_json.object_hook)
    except Exception as exc:  # noqa: BLE001 - not JSON, not UTF-8, or a type tag kombu would fail on
        return f"not JSON ({exc})", None
    reason = envelope_problem(message, content_types)
    return reason, None if reason is not None else message


def envelope_problem(message: Any, content_types: Collection[str]) -> str | None:
    """What :func:`screen` checks of a decoded message."""
    if not isinstance(message, dict):
        return f"a JSON {type(message).__name__}, not an object"
    properties = message.get("properties")
    if not isinstance(properties, dict):
        return "no 'properties' object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "no 'properties.delivery_tag' string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("exchange", "routing_key")):
        return "no 'properties.delivery_info' object with 'exchange' and 'routing_key'"
    if not isinstance(message.get("headers", {}), dict):
        return "'headers' is not an object"
    content_type = message.get("content-type")
    if content_types and content_type not in content_types:
        return f"content type {content_type!r} is not accepted (accepted: {', '.join(sorted(content_types))})"
    body, encoding = message.get("body"), properties.get("body_encoding")
    if not isinstance(body, str):
        return "no 'body' string"
    if encoding not in BODY_ENCODINGS:
        return f"unknown body encoding {encoding!r}"
    payload: str | bytes = body
    if encoding == "base64":
        try:
            payload = base64.b64decode(body)
        except (binascii.Error, ValueError) as exc:
            return f"body is not base64 ({exc})"
    if content_type == "application/json":
        try:
            json.loads(payload)
        except ValueError as exc:
            return f"body is not JSON ({exc})"
    return None


def text_of(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# What a close could not write, by unacked hash: delivery tags to hand back to their queues, and
# acks not yet written. The process writes them when it consumes again (QoS.restore_owed).
# Process-wide, since the channel that held them is gone by then.
_owed: dict[str, set[str]] = {}
_owed_acks: dict[str, set[str]] = {}
_owed_lock = threading.Lock()


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS whose hand-back of unacked messages at close never raises (what it could
    not hand back, it does when the process consumes again: :meth:`restore_owed`), and whose acks
    in the event loop are written with the next delivery's record (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._lq_acks: list[str] = []  # acked tags whose removal is not written yet (event loop only)
        self.lq_recorded: set[str] = set()  # tags TAKE_MORE recorded: their append writes nothing

    def _owed_key(self) -> str:
        return f"{getattr(self.channel, 'global_keyprefix', '')}{getattr(self.channel, 'unacked_key', '')}"

    def ack(self, delivery_tag: str) -> None:
        loop = getattr(self.channel.connection, "lq_loop", None)
        if loop is None or getattr(loop, "_loop_thread", None) != threading.get_ident():
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]  # no event loop (gevent, eventlet, a plain consumer), or another thread
            return
        if not self._lq_acks:
            loop.call_later(ACK_DELAY, self.flush_acks)
        self._lq_acks.append(delivery_tag)
        kombu_virtual.QoS.ack(self, delivery_tag)  # the slot is free now; the write follows

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.lq_recorded:  # TAKE_MORE recorded it
            self.lq_recorded.discard(delivery_tag)
            kombu_virtual.QoS.append(self, message, delivery_tag)
            return
        key, room = self.channel.lq_take_more_from(), 0
        if key is not None:
            # This message came off a BRPOP: its record can bring more from the same list.
            estimate = self.can_consume_max_estimate()  # type: ignore[no-untyped-call]
            room = DELIVERY_BATCH if estimate is None else min(estimate - 1, DELIVERY_BATCH)
        if room <= 0 and not self._lq_acks:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        delivery = message.delivery_info
        record = kombu_json.dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        acks, self._lq_acks = self._lq_acks, []
        try:
            if room > 0:
                assert key is not None
                self.channel.lq_take_more(key, room, delivery_tag, record, acks)
            else:
                # kombu's record of the delivered message, and the kept acks' removal, in one MULTI/EXEC.
                with self.pipe_or_acquire() as pipe:
                    pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                    pipe.hset(self.unacked_key, delivery_tag, record)
                    pipe.zrem(self.unacked_index_key, *acks).hdel(self.unacked_key, *acks)
                    pipe.execute()
        except BaseException:
            self._lq_acks[:0] = acks  # nothing was written: the acks wait for the next write
            raise
        kombu_virtual.QoS.append(self, message, delivery_tag)

    def flush_acks(self) -> None:
        """Write the kept acks now (a timer ``ACK_DELAY`` after the first, and at close). When Redis
        cannot be reached they are kept for the next write; their messages stay unacked meanwhile."""
        acks, self._lq_acks = self._lq_acks, []
        if not acks:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *acks).hdel(self.unacked_key, *acks).execute()
        except Exception as exc:  # noqa: BLE001 - an unwritten ack only means a later redelivery
            self._lq_acks[:0] = acks
            log.warning("could not write %d ack(s) now (%s: %s); they are written with the next delivery or "
                        "their messages are redelivered after the visibility timeout", len(acks),
                        type(exc).__name__, exc)

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        self.flush_acks()
        return super().restore_unacked_once(stderr)  # type: ignore[no-untyped-call]

    def restore_unacked(self, client: Any = None) -> Any:
        try:
            return super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except Exception as exc:  # noqa: BLE001 - a close must go on; the messages are safe in the unacked hash
            tags = {str(tag) for tag in self._delivered}
            self._delivered.clear()
            acks, self._lq_acks = self._lq_acks, []
            with _owed_lock:
                _owed.setdefault(self._owed_key(), set()).update(tags)
                _owed_acks.setdefault(self._owed_key(), set()).update(acks)
            log.warning("could not hand %d unacked message(s) back to the queue now (%s: %s); they stay in the "
                        "unacked hash until this process consumes again (or, should it not, the visibility "
                        "timeout passes)", len(tags), type(exc).__name__, exc)
            return []

    def restore_owed(self) -> int:
        """Write what an earlier close of this process could not: its acks, then the hand-back of
        its unacked messages to their queues (each in kombu's transaction on the unacked hash: one
        already restored by anyone is skipped). What it still cannot stays owed. Returns how many
        messages were handed back."""
        key = self._owed_key()
        with _owed_lock:
            tags, acks = _owed.pop(key, set()), _owed_acks.pop(key, set())
        if acks:
            self._lq_acks.extend(acks)
            self.flush_acks()  # keeps them for the next write when Redis is away again
        left = set(tags)
        try:
            for tag in tags:
                self.restore_by_tag(tag)  # type: ignore[no-untyped-call]
                left.discard(tag)
        except Exception as exc:  # noqa: BLE001 - consuming must go on; the next consume tries again
            log.warning("could not hand %d unacked message(s) back yet (%s: %s)", len(left), type(exc).__name__, exc)
        finally:
            if left:
                with _owed_lock:
                    _owed.setdefault(key, set()).update(left)
        if len(tags) > len(left):
            log.warning("handed %d unacked message(s) a lost connection had kept back to their queue",
                        len(tags) - len(left))
        return len(tags) - len(left)


class _ScreeningClient(kombu_redis.PrefixedStrictRedis):
    """The consumer's Redis client: each message its BRPOP returns is screened before kombu
    decodes it; a refused one reads as "nothing taken" (kombu then just waits for the next)."""

    def __init__(self, *args: Any, screen: Any, **kwargs: Any) -> None:
        self._lq_screen = screen
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        reply = super().parse_response(connection, command_name, **options)  # type: ignore[no-untyped-call]
        if command_name == "BRPOP" and reply and not self._lq_screen(*reply):
            return None
        return reply


class _Hardened:
    """What the hardened channels add to kombu's (see the module docstring)."""

    QoS = QoS
    lq_dead_letter_key: str | None = None
    lq_max_message_bytes: int = 1024 * 1024
    lq_content_types: Collection[str] = ()
    # kombu sets every attribute named here from the transport options.
    _lq_options = ("lq_dead_letter_key", "lq_max_message_bytes", "lq_content_types")

    # kombu's channel attributes this mixin uses.
    global_keyprefix: str
    sep: str
    pool: Any
    connection_errors: tuple[type[BaseException], ...]
    _in_poll: Any
    _lq_client: Any = None  # conn_or_acquire's client
    _lq_into: Any = None  # a pipeline one-off commands go into (commands_into)
    _lq_popped: str | None = None  # the list the last screened BRPOP reply came from
    _lq_take_more: Any = None  # TAKE_MORE, registered on this channel's pool
    _lq_taken: Sequence[tuple[str, str, bytes]] = ()  # (list, tag, message) TAKE_MORE took, to deliver
    _lq_noack: frozenset[str] = frozenset()  # queues consumed without acks
    qos: Any
    connection: Any

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """``client``, else this channel's client for one-off commands (kombu makes a new one per
        call). redis-py clients are thread-safe (each command takes a connection from the pool), so
        one serves every caller; it is made again when the channel's pool was replaced."""
        if client:
            yield client
            return
        if self._lq_into is not None:
            yield self._lq_into
            return
        cached = self._lq_client
        if cached is None or cached.connection_pool is not self.pool:
            cached = self._lq_client = self._create_client()  # type: ignore[attr-defined]
        yield cached

    @contextmanager
    def commands_into(self, pipeline: Any) -> Iterator[None]:
        """Within, the one-off commands of this channel (an event's PUBLISH, a message's LPUSH) are
        added to ``pipeline`` instead of sent; the caller executes it, one round trip for all. Only
        for a channel the caller holds alone (a producer acquired from the pool)."""
        previous, self._lq_into = self._lq_into, pipeline
        try:
            yield
        finally:
            self._lq_into = previous

    def _get_client(self) -> Any:
        super()._get_client()  # type: ignore[misc]  # kombu's check of the redis-py version
        return functools.partial(_ScreeningClient, global_keyprefix=self.global_keyprefix, screen=self._screen)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._lq_noack = self._lq_noack | {queue}
        tag = super().basic_consume(queue, no_ack, *args, **kwargs)  # type: ignore[misc]
        self.qos.restore_owed()  # connected again: write what a close could not
        return tag

    def _brpop_read(self, **options: Any) -> bool:
        self._lq_popped, self._lq_taken = None, ()
        try:
            delivered: bool = super()._brpop_read(**options)  # type: ignore[misc]  # raises Empty when none
        finally:
            self._lq_popped = None
        taken, self._lq_taken = self._lq_taken, ()
        if taken:
            self._deliver_taken(taken)
        return delivered

    def lq_take_more_from(self) -> str | None:
        """The list the message being recorded was just popped off by BRPOP, once (None for any
        other message, and for a queue consumed without acks)."""
        key, self._lq_popped = self._lq_popped, None
        if key is None or self.connection is None or key.rsplit(self.sep, 1)[0] in self._lq_noack:
            return None
        return key

    def lq_take_more(self, key: str, room: int, tag: str, record: str, acks: list[str]) -> None:
        """Write the record of the message BRPOP popped off ``key`` (and remove ``acks``), and pop up
        to ``room`` more, recorded in the same step: :data:`TAKE_MORE`. They are delivered once
        that message's delivery returns."""
        if self._lq_take_more is None or self._lq_take_more.registered_client.connection_pool is not self.pool:
            # A plain client: kombu's prefixed one prefixes only an EVALSHA's first key.
            self._lq_take_more = redis.Redis(connection_pool=self.pool).register_script(TAKE_MORE)
        prefix, qos = self.global_keyprefix, self.qos
        reply = self._lq_take_more(keys=[prefix + key, prefix + qos.unacked_index_key, prefix + qos.unacked_key],
                                   args=[room, time.time(), tag, record, *acks])
        self._lq_taken = [(key, text_of(reply[i]), reply[i + 1]) for i in range(0, len(reply), 2)]

    def _deliver_taken(self, taken: Sequence[tuple[str, str, bytes]]) -> None:
        """Screen and deliver the messages :meth:`lq_take_more` took, as if BRPOP had returned each."""
        qos = self.qos
        for i, (key, tag, raw) in enumerate(taken):
            try:
                message = self._screened(key, raw)
                if message is None:
                    if tag:
                        qos._remove_from_indices(tag).execute()
                    continue
                if tag:
                    qos.lq_recorded.add(tag)
                self.connection._deliver(message, key.rsplit(self.sep, 1)[0])
            except BaseException:
                # Not delivered: hand the rest back to their queue now (they are recorded as unacked).
                for _, rest, _ in taken[i + 1:]:
                    if rest:
                        qos.restore_by_tag(rest, leftmost=True)
                raise

    def _screen(self, key: bytes | str, raw: bytes | str) -> bool:
        return self._screened(key, raw) is not None

    def _screened(self, key: bytes | str, raw: bytes | str) -> Any:
        """The message as kombu decodes it, or None when refused (then dead-lettered)."""
        data = raw.encode() if isinstance(raw, str) else raw
        reason, message = screened(data, self.lq_max_message_bytes, self.lq_content_types)
        if reason is None:
            self._lq_popped = key.decode() if isinstance(key, bytes) else key
            return message
        queue = (key.decode(errors="replace") if isinstance(key, bytes) else key).rsplit(self.sep, 1)[0]
        self._dead_letter(queue, reason, data)
        return None

    def _dead_letter(self, queue: str, reason: str, data: bytes) -> None:
        entry = {
            "time": time.time(), "queue": queue, "reason": reason, "size": len(data),
            "host": socket.gethostname(), "pid": os.getpid(),
            "message": data[:DEAD_LETTER_KEEP_BYTES].decode(errors="replace"),
            "truncated": len(data) > DEAD_LETTER_KEEP_BYTES,
        }
        key = self.lq_dead_letter_key
        where = f"moved to {key}" if key else "dropped"
        if key:
            try:
                # A plain client: the dead-letter list is not under kombu's key prefix.
                with redis.Redis(connection_pool=self.pool).pipeline(transaction=True) as pipe:
                    pipe.lpush(key, json.dumps(entry))
                    pipe.ltrim(key, 0, DEAD_LETTER_LIMIT - 1)
                    pipe.execute()
            except Exception as exc:  # noqa: BLE001 - refusing the message must not fail on its record
                where = f"dropped (could not write {key}: {exc})"
        log.error("refused a malformed message from queue %r: %s (%d bytes); %s", queue, reason, len(data), where)

    def close(self) -> None:
        # kombu's close first reads the reply of a pending BRPOP; on a dead connection that raised
        # and aborted the close half way (see the module docstring). The connection is gone: go on.
        if self._in_poll:
            try:
                self._brpop_read()
            except Empty:
                pass
            except self.connection_errors as exc:
                log.debug("closing a channel whose pending BRPOP lost its connection: %r", exc)
                self._in_poll = None
        super().close()  # type: ignore[misc]

    def _deliver_fanout_message(self, message: Any, exchange: Any) -> Any:
        reason = envelope_problem(message, self.lq_content_types)
        if reason is not None:
            log.warning("dropped a malformed broadcast message on exchange %r: %s: %.200r", exchange, reason, message)
            return False
        return super()._deliver_fanout_message(message, exchange)  # type: ignore[misc]


class Channel(_Hardened, kombu_redis.Channel):
    # kombu's option names and ours (its annotation is the tuple of its own names).
    from_transport_options = kombu_redis.Channel.from_transport_options + _Hardened._lq_options  # type: ignore[assignment]


class SentinelChannel(_Hardened, kombu_redis.SentinelChannel):
    from_transport_options = (
        kombu_redis.SentinelChannel.from_transport_options + _Hardened._lq_options  # type: ignore[assignment]
    )


class _OnLoop:
    """Remembers the event loop (kombu's hub) the transport was registered with: acks taken in
    its thread are written with the next delivery (:class:`QoS`)."""

    lq_loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]
        self.lq_loop = loop


class Transport(_OnLoop, kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel` (for ``redis://`` and ``rediss://``)."""

    Channel = Channel


class SentinelTransport(_OnLoop, kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport with :class:`SentinelChannel` (for ``sentinel://``)."""

    Channel = SentinelChannel


TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"
