"""The change stream: server-sent events driven by Redis pub/sub, never by polling.

It listens to the two channels lightning-queue already publishes on: the rollout events
channel (a finished rollout's id, from the script that finished it) and the snapshot events
channel (every registry change, with its sequence number). Rollouts that finish together are
sent as one ``rollouts`` event (gathered for ``BATCH_SECONDS``), so a busy fleet costs the page a
few events a second, not one per rollout. The first event, ``hello``, is sent once the
subscription is confirmed. After a lost Redis connection the stream subscribes again and sends
``resync``: what happened meanwhile was not seen, so the page reads again. A stream ends after
``ServerConfig.stream_seconds`` (the browser's EventSource reconnects at once), so no
connection is held forever.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from lightning_queue.core.keys import Keys
from lightning_queue.ops.server.deps import ServicesDep, UserDep
from lightning_queue.storage.connections import backoff_delay, text

router = APIRouter(tags=["events"])

BATCH_SECONDS = 0.2
SHOWN_IDS = 100


def _events(batch: list[dict[str, Any]], keys: Keys) -> list[ServerSentEvent]:
    rollouts = [text(m["data"]) for m in batch if text(m["channel"]) == keys.events]
    registry = []
    for m in batch:
        if text(m["channel"]) == keys.snapshot_events:
            try:
                registry.append(json.loads(m["data"]))
            except ValueError:
                registry.append({"op": "unknown"})
    out = []
    if rollouts:
        out.append(ServerSentEvent(json.dumps({"count": len(rollouts), "ids": rollouts[:SHOWN_IDS]}), event="rollouts"))
    if registry:
        out.append(ServerSentEvent(json.dumps(registry), event="registry"))
    return out


async def change_stream(
    connection: Callable[[], redis.asyncio.Redis], keys: Keys, seconds: float
) -> AsyncIterator[ServerSentEvent]:
    """The events of one stream, for ``seconds``; see the module's docstring."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    failures, subscribed = 0, False
    while loop.time() < deadline:
        pubsub = connection().pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.events, keys.snapshot_events)
            # Sent once listening: whatever happens after the page saw it reaches the page.
            if not subscribed:
                yield ServerSentEvent(json.dumps({"prefix": keys.prefix}), event="hello", retry=2000)
            elif failures:
                yield ServerSentEvent("{}", event="resync")
            failures, subscribed = 0, True
            while loop.time() < deadline:
                message = await pubsub.get_message(timeout=min(1.0, max(0.0, deadline - loop.time())))
                if message is None:
                    continue
                batch = [message]
                end = loop.time() + BATCH_SECONDS
                while (left := end - loop.time()) > 0:
                    more = await pubsub.get_message(timeout=left)
                    if more is not None:
                        batch.append(more)
                for event in _events(batch, keys):
                    yield event
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            failures += 1
            yield ServerSentEvent(json.dumps({"retry_in": backoff_delay(failures)}), event="offline")
            await asyncio.sleep(min(backoff_delay(failures), max(0.0, deadline - loop.time())))
        finally:
            await pubsub.aclose()
    yield ServerSentEvent("{}", event="bye")


@router.get("/events", summary="Server-sent events: finished rollouts and registry changes, as they happen",
            response_description="text/event-stream: hello, rollouts {count, ids}, registry [changes], resync, "
            "offline, bye")
async def events(request: Request, services: ServicesDep, user: UserDep) -> EventSourceResponse:
    connection: Callable[[], redis.asyncio.Redis] = request.app.state.async_redis
    stream = change_stream(connection, services.client.keys, services.config.stream_seconds)
    return EventSourceResponse(stream, ping=15, headers={"Cache-Control": "no-store"})
