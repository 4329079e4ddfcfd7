"""The asyncio client: the same API as :class:`~lightning_queue.client.LightningClient`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from lightning_queue.client import LightningClient
from lightning_queue.core.settings import Settings


class AsyncLightningClient:
    """The same API as :class:`LightningClient`, for asyncio code.

    Each call runs the synchronous client's method in a worker thread
    (``asyncio.to_thread``): the Redis work is short round trips, and
    ``wait_for_rollouts`` blocks only its own thread, never the event loop.
    """

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        self.sync = LightningClient(settings, **kwargs)

    async def __aenter__(self) -> AsyncLightningClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _in_thread(name: str) -> Callable[..., Any]:
    method = getattr(LightningClient, name)

    async def call(self: AsyncLightningClient, *args: Any, **kwargs: Any) -> Any:
        if args and name in ("enqueue_rollouts", "add_resources_batch"):
            args = (list(args[0]), *args[1:])  # consume a generator here, not in the thread
        return await asyncio.to_thread(getattr(self.sync, name), *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = method.__doc__
    return call


for _name in (
    "close", "add_resources", "add_resources_batch", "update_resources", "get_resources_by_id",
    "get_latest_resources", "query_resources", "delete_resources", "set_pointer", "get_pointer", "pointers",
    "rollback", "pointer_history", "enqueue_rollout", "enqueue_rollouts", "wait_for_rollouts", "get_rollout",
    "get_rollouts", "get_attempts", "query_rollouts", "cancel_rollout", "apply_retention", "cache_stats",
    "worker_health",
):
    setattr(AsyncLightningClient, _name, _in_thread(_name))
