"""broker/transport.py: what a worker refuses off a queue, where it goes, and closes that never raise."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

from lightning_queue import LightningClient, Rollout, Settings
from lightning_queue.broker.app import celery_config
from lightning_queue.broker.transport import (
    ACK_DELAY,
    DEAD_LETTER_KEEP_BYTES,
    SENTINEL_TRANSPORT,
    TAKE_MORE,
    TRANSPORT,
    Channel,
    QoS,
    screen,
    screened,
)

JSON = ("application/json",)
LIMIT = 1024 * 1024


@pytest.fixture
def good(fake_client: LightningClient) -> dict[str, Any]:
    """A rollout task message as the publisher sends it."""
    rollout = Rollout(input=1, queue="q")
    return json.loads(fake_client.publisher.build([rollout], [(None, None)]).by_queue["q"][0])


def changed(message: dict[str, Any], **fields: Any) -> bytes:
    return json.dumps({**message, **fields}).encode()


def test_task_messages_pass_as_sent_and_as_kombu_restores_them(good: dict[str, Any]) -> None:
    assert screen(json.dumps(good, separators=(",", ":")).encode(), LIMIT, JSON) is None
    assert screen(json.dumps(good).encode(), LIMIT, JSON) is None  # kombu's own separators


@pytest.mark.parametrize("make, reason", [
    (lambda m: b"this is not json", "not JSON"),
    (lambda m: b"\xff\xfe\x00garbage", "not JSON"),
    (lambda m: b"[1, 2, 3]", "a JSON list, not an object"),
    (lambda m: b'"a string"', "a JSON str, not an object"),
    (lambda m: b'{"hello": 1}', "no 'properties' object"),
    (lambda m: changed(m, properties="x"), "no 'properties' object"),
    (lambda m: changed(m, properties={**m["properties"], "delivery_tag": 5}), "delivery_tag"),
    (lambda m: changed(m, properties={**m["properties"], "delivery_info": None}), "delivery_info"),
    (lambda m: changed(m, headers=[1]), "'headers' is not an object"),
    (lambda m: changed(m, body="!!!not base64!!!"), "body is not base64"),
    (lambda m: changed(m, body=base64.b64encode(b"garbage{").decode()), "body is not JSON"),
    (lambda m: changed(m, body=7), "no 'body' string"),
    (lambda m: changed(m, properties={**m["properties"], "body_encoding": "rot13"}), "unknown body encoding"),
    (lambda m: changed(m, **{"content-type": "application/x-python-serialize"}), "content type"),
    (lambda m: changed(m, headers={**m["headers"], "junk": "x" * LIMIT}), "above the limit"),
])
def test_malformed_messages_are_refused_with_a_reason(good: dict[str, Any], make: Any, reason: str) -> None:
    refused = screen(make(good), LIMIT, JSON)
    assert refused is not None and reason in refused


def test_a_refused_message_goes_to_the_dead_letter_list(good: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    server = fakeredis.FakeRedis()
    channel = object.__new__(Channel)  # only what screening uses: no broker connection
    channel._pool, channel.sep = server.connection_pool, "\x06\x16"  # kombu's pool property reads _pool
    channel.lq_dead_letter_key, channel.lq_max_message_bytes, channel.lq_content_types = "p:dead-letters", LIMIT, JSON

    assert channel._screen(b"p-q", json.dumps(good).encode())
    with caplog.at_level(logging.ERROR):
        assert not channel._screen(b"p-q\x06\x166", b"[1, 2]")
        assert not channel._screen(b"p-q", b"y" * (LIMIT + 10))

    huge, array = (json.loads(e) for e in server.lrange("p:dead-letters", 0, -1))  # newest first
    assert (array["queue"], array["reason"], array["message"], array["truncated"]) == (
        "p-q", "a JSON list, not an object", "[1, 2]", False)
    assert huge["size"] == LIMIT + 10 and huge["truncated"] and len(huge["message"]) == DEAD_LETTER_KEEP_BYTES
    assert "refused a malformed message from queue 'p-q': a JSON list" in caplog.text
    assert "moved to p:dead-letters" in caplog.text


def test_a_hand_back_that_cannot_reach_redis_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Closed:
        do_restore = True

        def conn_or_acquire(self, client: Any = None) -> Any:
            # What kombu's channel does once collect() dropped the connection info (the worker exited on it).
            raise AttributeError("'NoneType' object has no attribute 'hostname'")

    qos = QoS(Closed())
    qos._delivered.update({"tag-1": object(), "tag-2": object()})
    with caplog.at_level(logging.WARNING):
        qos.restore_unacked_once()
    assert not qos._delivered
    assert "could not hand 2 unacked message(s) back" in caplog.text and "visibility timeout" in caplog.text


def test_redis_urls_use_the_hardened_transport() -> None:
    assert celery_config(Settings(redis_url="redis://h:1/0"))["broker_transport"] == TRANSPORT
    assert celery_config(Settings(redis_url="rediss://h:1/0"))["broker_transport"] == TRANSPORT
    sentinel = Settings(redis_url="sentinel://h:26379", sentinel_master="m")
    assert celery_config(sentinel)["broker_transport"] == SENTINEL_TRANSPORT
    options = celery_config(Settings(key_prefix="t1", max_message_bytes=5000))["broker_transport_options"]
    assert (options["lq_dead_letter_key"], options["lq_max_message_bytes"], options["lq_content_types"]) == (
        "t1:dead-letters", 5000, ["application/json"])
    other = celery_config(Settings(celery={"broker_url": "memory://"}))
    assert "broker_transport" not in other


def test_one_off_commands_share_one_client_per_connection_pool() -> None:
    # kombu built a new Redis client for every ack, unacked record and event: a tenth of a worker's main process.
    server = fakeredis.FakeRedis()
    channel = object.__new__(Channel)  # only what conn_or_acquire uses: no broker connection
    channel._pool, channel.global_keyprefix = server.connection_pool, "p:"
    channel.Client = channel._get_client()
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
        first.set("k", "v")
    assert server.get("p:k") == b"v"  # kombu's key prefix still applies
    given = fakeredis.FakeRedis()
    with channel.conn_or_acquire(given) as client:
        assert client is given
    other = fakeredis.FakeRedis()
    channel._pool = other.connection_pool  # the channel's pool was replaced: a client on the new one
    with channel.conn_or_acquire() as third:
        assert third is not first
        third.set("k", "w")
    assert other.get("p:k") == b"w"


class _Loop:
    """kombu's hub as the QoS sees it: its thread and its timers."""

    def __init__(self, thread: int) -> None:
        self._loop_thread = thread
        self.timers: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> None:
        self.timers.append((delay, callback))


class _Channel:
    unacked_key, unacked_index_key = "unacked", "unacked_index"
    do_restore = False  # at exit, the finalizer kombu registers must not restore anything

    def __init__(self, server: fakeredis.FakeRedis, loop: _Loop | None) -> None:
        self.server, self.connection, self.executes = server, SimpleNamespace(lq_loop=loop), 0

    def lq_take_more_from(self) -> str | None:
        return None  # no message here comes off a BRPOP

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        channel = self

        class Counted(fakeredis.FakeRedis):
            def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
                pipe = super().pipeline(transaction, shard_hint)
                execute = pipe.execute

                def counted(*args: Any, **kwargs: Any) -> Any:
                    channel.executes += 1
                    return execute(*args, **kwargs)

                pipe.execute = counted  # type: ignore[method-assign]
                return pipe

        yield Counted(connection_pool=self.server.connection_pool)


def _message(tag: str) -> Any:
    return SimpleNamespace(delivery_info={"exchange": "", "routing_key": "q"}, _raw={"tag": tag})


def test_an_ack_in_the_event_loop_is_written_with_the_next_delivery() -> None:
    server = fakeredis.FakeRedis()
    loop = _Loop(threading.get_ident())
    channel = _Channel(server, loop)
    qos = QoS(channel, prefetch_count=1)
    qos.append(_message("t1"), "t1")
    assert server.hexists("unacked", "t1") and channel.executes == 1
    qos.ack("t1")
    assert qos.can_consume()  # type: ignore[no-untyped-call]  # the prefetch slot is free at once
    assert server.hexists("unacked", "t1") and channel.executes == 1  # the write waits for the next delivery
    assert [delay for delay, _ in loop.timers] == [ACK_DELAY]  # ... at most this long
    qos.append(_message("t2"), "t2")
    assert channel.executes == 2  # t2's record and t1's ack: one MULTI/EXEC
    assert server.hkeys("unacked") == [b"t2"] and server.zrange("unacked_index", 0, -1) == [b"t2"]
    qos.ack("t2")
    _, flush = loop.timers[-1]
    flush()  # no delivery came: the timer writes it
    assert server.hlen("unacked") == 0 and server.zcard("unacked_index") == 0
    flush()  # nothing left: no round trip
    assert channel.executes == 3


def test_an_ack_kept_for_the_next_delivery_is_written_at_close() -> None:
    server = fakeredis.FakeRedis()
    qos = QoS(_Channel(server, _Loop(threading.get_ident())), prefetch_count=2)
    qos.append(_message("t1"), "t1")
    qos.append(_message("t2"), "t2")
    qos.ack("t1")
    qos.restore_unacked_once()  # the channel closes (kombu would then hand t2 back: do_restore is off here)
    assert server.hkeys("unacked") == [b"t2"]


@pytest.mark.parametrize("in_loop_thread", [False, True])
def test_an_ack_outside_an_event_loop_is_written_at_once(in_loop_thread: bool) -> None:
    server = fakeredis.FakeRedis()
    # No hub (gevent, eventlet, a plain consumer), or an ack from another thread than the hub's.
    loop = _Loop(threading.get_ident() + 1) if in_loop_thread else None
    qos = QoS(_Channel(server, loop))
    qos.append(_message("t1"), "t1")
    qos.ack("t1")
    assert server.hlen("unacked") == 0


def test_an_ack_that_cannot_be_written_is_kept_for_later(caplog: pytest.LogCaptureFixture) -> None:
    state = fakeredis.FakeServer()
    server = fakeredis.FakeRedis(server=state)
    qos = QoS(_Channel(server, _Loop(threading.get_ident())))
    qos.append(_message("t1"), "t1")
    qos.ack("t1")
    state.connected = False  # fakeredis: every command raises ConnectionError
    with caplog.at_level(logging.WARNING):
        qos.flush_acks()
    assert "could not write 1 ack(s) now" in caplog.text
    state.connected = True
    qos.flush_acks()
    assert server.hlen("unacked") == 0


def test_take_more_pops_and_records_messages_in_one_step(good: dict[str, Any]) -> None:
    # Several messages per round trip after a BRPOP, each recorded as unacked as it leaves the queue.
    server = fakeredis.FakeRedis()
    messages = []
    for i in range(3):
        message = json.loads(json.dumps(good))
        message["properties"]["delivery_tag"] = f"tag-{i}"
        messages.append(message)
    server.lpush("p:q", *[json.dumps(m) for m in messages], b"not json")  # RPOP takes tag-0 first
    server.zadd("p:unacked_index", {"acked": 1.0})
    server.hset("p:unacked", "acked", "[]")
    take = server.register_script(TAKE_MORE)
    reply = take(keys=["p:q", "p:unacked_index", "p:unacked"], args=[2, 123.0, "first", "[1]", "acked"])
    assert [reply[0], reply[2]] == [b"tag-0", b"tag-1"] and json.loads(reply[1]) == messages[0]
    assert server.llen("p:q") == 2  # only as many as asked for
    # The BRPOP's message recorded and the kept ack removed in the same step.
    assert sorted(server.hkeys("p:unacked")) == [b"first", b"tag-0", b"tag-1"]
    assert server.zrange("p:unacked_index", 0, -1, withscores=True) == [
        (b"first", 123.0), (b"tag-0", 123.0), (b"tag-1", 123.0)]
    # kombu restores a record as [message, exchange, routing key]: the same as its own QoS.append writes.
    stored, exchange, routing_key = json.loads(server.hget("p:unacked", "tag-0"))
    info = messages[0]["properties"]["delivery_info"]
    assert (stored, exchange, routing_key) == (messages[0], info["exchange"], info["routing_key"])
    reply = take(keys=["p:q", "p:unacked_index", "p:unacked"], args=[16, 124.0, "", ""])
    assert reply == [b"tag-2", json.dumps(messages[2]).encode(), b"", b"not json"]  # not kombu's: unrecorded
    assert server.hlen("p:unacked") == 4 and server.llen("p:q") == 0


def test_a_screened_message_is_decoded_once_as_kombu_decodes_it(good: dict[str, Any]) -> None:
    from kombu.utils import json as kombu_json

    good["headers"]["stamp"] = {"__type__": "datetime", "__value__": "2026-11-29T08:00:00"}  # kombu's type tag
    raw = json.dumps(good).encode()
    reason, message = screened(raw, LIMIT, JSON)
    assert reason is None and message == kombu_json.loads(raw)
    assert message["headers"]["stamp"].year == 2026
    good["headers"]["stamp"] = {"__type__": "no-such-type", "__value__": 1}  # kombu's loads would raise
    reason, message = screened(json.dumps(good).encode(), LIMIT, JSON)
    assert reason is not None and reason.startswith("not JSON") and message is None
