"""broker/transport.py against a real Redis: messages a lost connection kept a worker from handing back."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from lightning_queue import Settings
from lightning_queue.broker.app import celery_config


def broker(settings: Settings) -> Connection:
    config = celery_config(settings)
    return Connection(settings.redis_url, transport=config["broker_transport"],
                      transport_options=config["broker_transport_options"])


def test_messages_a_lost_connection_kept_from_their_queue_go_back_when_the_worker_reconnects(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker received a message; Redis went away before the task started; kombu's hand-back at the
    # close failed, so the message stayed in the unacked hash and, with nobody holding it, waited out
    # the visibility timeout (an hour by default) while the worker itself was back after seconds.
    queue, r = f"{settings.key_prefix}-q", redis.Redis.from_url(settings.redis_url)
    unacked, listed = f"{settings.key_prefix}:celery:unacked", f"{settings.key_prefix}:celery:{queue}"
    with broker(settings) as first:
        channel: Any = first.default_channel
        channel.queue_declare(queue)
        channel.basic_publish(channel.prepare_message("m1"), "", queue)
        message = channel.basic_get(queue, no_ack=False)
        assert message is not None and r.hlen(unacked) == 1 and r.llen(listed) == 0

        def unreachable(self: Any, client: Any = None) -> None:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

        with monkeypatch.context() as patched:
            patched.setattr(kombu_redis.QoS, "restore_unacked", unreachable)
            channel.qos.restore_unacked()  # what the consumer's close does on the connection loss
        assert r.hlen(unacked) == 1 and r.llen(listed) == 0

    # The worker reconnects and consumes again: what it could not hand back goes back now.
    with broker(settings) as second:
        again: Any = second.default_channel
        again.basic_consume(queue, no_ack=False, callback=lambda *a: None, consumer_tag="c1")
        assert r.llen(listed) == 1 and r.hlen(unacked) == 0
