"""The asyncio client: the same API as :class:`~lightning_queue.client.LightningClient`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Unpack

from lightning_queue.client import LightningClient, ResourcesLike
from lightning_queue.core.diff import SnapshotDiff
from lightning_queue.core.models import (
    Attempt,
    ResolveMode,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutRequest,
)
from lightning_queue.core.queries import (
    CancelReport,
    FilterFields,
    FinishedPage,
    FinishedRollout,
    RolloutFilter,
    RolloutPage,
)
from lightning_queue.core.settings import Settings
from lightning_queue.core.traces import Span, Triplet, Usage
from lightning_queue.storage.connections import connect_async, server_url
from lightning_queue.storage.liveness import WorkerHealth
from lightning_queue.storage.registry import DeleteReport, PointerMove, Protection
from lightning_queue.storage.retention import RetentionReport
from lightning_queue.storage.waiting import wait_async

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from celery import Celery


class AsyncLightningClient:
    """The same API as :class:`LightningClient`, for asyncio code; use it with ``async with``
    (or call :meth:`close`).

    :meth:`wait_for_rollouts`, the one call that can last indefinitely, runs natively on
    ``redis.asyncio`` pub/sub (its own subscription, no thread): cancelling it (e.g. with
    ``asyncio.wait_for``) stops it at once and closes its connection.

    Every other call is a few bounded round trips, so it runs the synchronous client's
    method in a worker thread (``asyncio.to_thread``): each operation then has one
    implementation (the registry's and store's Lua scripts and pipelines, and publishing,
    which goes through Celery/kombu and has no asyncio API), and a thread is held at most
    for the round trips plus the Redis retry budget (``Settings.redis_retry_seconds``),
    after which the call raises :class:`RedisUnavailableError`. Cancelling such a call
    stops waiting for it; the round trips it started complete in their thread.

    ``redis_client`` is the synchronous client for those calls and ``async_redis_client``
    the asyncio one for waits; by default both are built from ``settings``. Building the
    client checks that Redis answers (a blocking PING, as :class:`LightningClient` does).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis_client: redis.Redis | None = None,
        async_redis_client: redis.asyncio.Redis | None = None,
        celery: Celery | None = None,
    ) -> None:
        self.sync = LightningClient(settings, redis_client=redis_client, celery=celery)
        self.settings = self.sync.settings
        if async_redis_client is None:
            async_redis_client = connect_async(self.settings.redis_url, self.settings.sentinel_master)
            self._server = self.settings.redis_url
        else:
            self._server = server_url(async_redis_client)
        self.redis = async_redis_client

    async def __aenter__(self) -> AsyncLightningClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close both clients' connections (without a thread: it cannot wait behind other calls).
        Waits still running in other tasks are not stopped by it: cancel them."""
        await self.redis.aclose()
        self.sync.close()

    # -- resources ------------------------------------------------------------------------

    async def add_resources(
        self, resources: ResourcesLike, resources_id: str | None = None, *, message: str | None = None,
        author: str | None = None, tags: Sequence[str] | None = None, parent: str | None = None,
        make_latest: bool = True,
    ) -> ResourcesUpdate:
        """Store a new snapshot (version 1) and make it the latest (unless ``make_latest=False``),
        atomically, with its metadata. See :meth:`LightningClient.add_resources`."""
        return await asyncio.to_thread(self.sync.add_resources, resources, resources_id, message=message,
                                       author=author, tags=tags, parent=parent, make_latest=make_latest)

    async def add_resources_batch(
        self, items: Iterable[ResourcesLike | tuple[str, ResourcesLike]], *, message: str | None = None,
        author: str | None = None, tags: Sequence[str] | None = None, make_latest: bool = True,
    ) -> list[ResourcesUpdate]:
        """Add many snapshots in one pipelined round trip (the last becomes latest, unless
        ``make_latest=False``). ``items`` may be any iterable (consumed here, not in the thread)."""
        return await asyncio.to_thread(self.sync.add_resources_batch, list(items), message=message, author=author,
                                       tags=tags, make_latest=make_latest)

    async def update_resources(
        self, resources_id: str, resources: ResourcesLike, expected_version: int | None = None, *,
        message: str | None = None, author: str | None = None, tags: Sequence[str] | None = None,
        parent: str | None = None,
    ) -> ResourcesUpdate:
        """Store the next version under an existing id and make it the latest, atomically; with
        ``expected_version``, a compare-and-set raising :class:`VersionConflictError`.
        See :meth:`LightningClient.update_resources`."""
        return await asyncio.to_thread(self.sync.update_resources, resources_id, resources, expected_version,
                                       message=message, author=author, tags=tags, parent=parent)

    async def diff(self, a: str, b: str | None = None) -> SnapshotDiff:
        """What changed from ``a`` to ``b``. See :meth:`LightningClient.diff`."""
        return await asyncio.to_thread(self.sync.diff, a, b)

    async def get_resources_by_id(self, resources_id: str, version: int | None = None) -> ResourcesUpdate:
        """A snapshot by id or pointer name; ``version`` reads an earlier version. Raises
        :class:`ResourcesNotFoundError` for an unknown id."""
        return await asyncio.to_thread(self.sync.get_resources_by_id, resources_id, version)

    async def get_latest_resources(self) -> ResourcesUpdate | None:
        """The snapshot ``latest`` points at, or None when there is none."""
        return await asyncio.to_thread(self.sync.get_latest_resources)

    async def query_resources(self, offset: int = 0, limit: int = 50) -> list[ResourcesUpdate]:
        """Snapshots, newest written first, ``limit`` from ``offset``."""
        return await asyncio.to_thread(self.sync.query_resources, offset, limit)

    async def delete_resources(
        self, resources_id: str, force: bool = False, *, actor: str | None = None
    ) -> DeleteReport:
        """Delete a snapshot; refused (:class:`SnapshotInUseError`) while pointers or unfinished
        rollouts use it, unless ``force``."""
        return await asyncio.to_thread(self.sync.delete_resources, resources_id, force, actor=actor)

    async def apply_retention(self, keep: int | None = None, dry_run: bool = False) -> RetentionReport:
        """Delete old snapshots, keeping the newest ``keep`` and every one in use.
        See :meth:`LightningClient.apply_retention`."""
        return await asyncio.to_thread(self.sync.apply_retention, keep, dry_run)

    async def cache_stats(self) -> dict[str, dict[str, Any]]:
        """The snapshot-cache stats each live worker process last reported, by ``node@host:pid``."""
        return await asyncio.to_thread(self.sync.cache_stats)

    async def worker_health(self, stall_threshold_seconds: float | None = None) -> list[WorkerHealth]:
        """Every live worker's consumption health. See :meth:`LightningClient.worker_health`."""
        return await asyncio.to_thread(self.sync.worker_health, stall_threshold_seconds)

    # -- pointers -------------------------------------------------------------------------

    async def set_pointer(
        self, name: str, target: str, expected: str | None = None, *, actor: str | None = None,
        reason: str | None = None, force: bool = False,
    ) -> str:
        """Point ``name`` at a snapshot (compare-and-set with ``expected``); return the id it names.
        See :meth:`LightningClient.set_pointer` (protected pointers, actor, reason)."""
        return await asyncio.to_thread(self.sync.set_pointer, name, target, expected, actor=actor, reason=reason,
                                       force=force)

    async def get_pointer(self, name: str) -> str | None:
        """The snapshot id ``name`` points at, or None."""
        return await asyncio.to_thread(self.sync.get_pointer, name)

    async def pointers(self) -> dict[str, str]:
        """Every pointer and the snapshot id it names."""
        return await asyncio.to_thread(self.sync.pointers)

    async def rollback(
        self, pointer: str = "latest", *, actor: str | None = None, reason: str | None = None, force: bool = False,
    ) -> PointerMove:
        """Move ``pointer`` back to its previous target in one atomic step."""
        return await asyncio.to_thread(self.sync.rollback, pointer, actor=actor, reason=reason, force=force)

    async def protect_pointer(self, name: str, reason: str, *, actor: str | None = None) -> Protection:
        """Protect ``name``. See :meth:`LightningClient.protect_pointer`."""
        return await asyncio.to_thread(self.sync.protect_pointer, name, reason, actor=actor)

    async def unprotect_pointer(self, name: str) -> Protection | None:
        """Lift ``name``'s protection; return it (``None`` if it had none)."""
        return await asyncio.to_thread(self.sync.unprotect_pointer, name)

    async def protections(self) -> dict[str, Protection]:
        """Every protected pointer, with why, by whom and since when."""
        return await asyncio.to_thread(self.sync.protections)

    async def pointer_history(self, pointer: str = "latest", limit: int = 20) -> list[PointerMove]:
        """The pointer's last ``limit`` moves, newest first."""
        return await asyncio.to_thread(self.sync.pointer_history, pointer, limit)

    # -- rollouts -------------------------------------------------------------------------

    async def enqueue_rollout(
        self,
        input: Any,
        *,
        resources_id: str | None = None,
        resolve: ResolveMode | None = None,
        mode: RolloutMode | None = "train",
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        queue: str | None = None,
        check_resources: bool = True,
        rollout_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Rollout:
        """Enqueue one rollout. See :meth:`LightningClient.enqueue_rollout`."""
        return await asyncio.to_thread(
            self.sync.enqueue_rollout, input, resources_id=resources_id, resolve=resolve, mode=mode, config=config,
            metadata=metadata, queue=queue, check_resources=check_resources, rollout_id=rollout_id,
            idempotency_key=idempotency_key,
        )

    async def enqueue_rollouts(
        self,
        inputs: Iterable[Any | RolloutRequest],
        *,
        resources_id: str | None = None,
        resolve: ResolveMode | None = None,
        mode: RolloutMode | None = "train",
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        queue: str | None = None,
        check_resources: bool = True,
    ) -> list[Rollout]:
        """Enqueue a batch of rollouts in a constant number of round trips (``inputs`` is consumed
        here, not in the thread). See :meth:`LightningClient.enqueue_rollouts` for the
        semantics: atomic records, idempotent ids, :class:`EnqueueError` on a failed publish."""
        return await asyncio.to_thread(
            self.sync.enqueue_rollouts, list(inputs), resources_id=resources_id, resolve=resolve, mode=mode,
            config=config, metadata=metadata, queue=queue, check_resources=check_resources,
        )

    async def wait_for_rollouts(
        self,
        rollout_ids: Sequence[str],
        timeout: float | None = None,
        on_finished: Callable[[Rollout], None] | None = None,
    ) -> list[Rollout]:
        """Wait until every rollout has finished, or ``timeout`` seconds pass (``None``: no limit).

        Returns the finished rollouts in the order of ``rollout_ids`` (each once); on time-out,
        only those that had finished. ``on_finished`` is called (in the event loop) once per
        rollout as it is seen finished. Natively asyncio: cancelling the call ends it and
        closes its pub/sub connection.

        Raises :class:`RolloutNotFoundError` when a rollout's record does not exist, at the
        start or later (it expired, or Redis lost its data). Raises
        :class:`RedisUnavailableError` when Redis is unreachable at the deadline or for longer
        than ``Settings.redis_retry_seconds`` in a row; the call returns or raises within about
        half a second of its deadline even then. The algorithm (and why it cannot miss a
        completion) is :mod:`lightning_queue.storage.waiting`'s, shared with
        :meth:`LightningClient.wait_for_rollouts`.
        """
        waiter = self.sync.store.waiter(rollout_ids, timeout, on_finished,
                                        retry_seconds=self.settings.redis_retry_seconds, server=self._server)
        return await wait_async(self.redis, waiter)

    async def get_rollout(self, rollout_id: str) -> Rollout:
        """The rollout; raises :class:`RolloutNotFoundError` for an unknown or expired id."""
        return await asyncio.to_thread(self.sync.get_rollout, rollout_id)

    async def get_rollouts(self, rollout_ids: Sequence[str]) -> list[Rollout]:
        """The rollouts, in the order given, in one round trip; raises
        :class:`RolloutNotFoundError` for an unknown or expired id."""
        return await asyncio.to_thread(self.sync.get_rollouts, list(rollout_ids))

    async def get_attempts(self, rollout_id: str) -> list[Attempt]:
        """Every attempt of the rollout, first to last."""
        return await asyncio.to_thread(self.sync.get_attempts, rollout_id)

    async def query_rollouts(
        self,
        filter: RolloutFilter | None = None,
        *,
        offset: int = 0,
        limit: int = 100,
        **fields: Unpack[FilterFields],
    ) -> list[Rollout]:
        """Rollouts matching every filter given. See :meth:`LightningClient.query_rollouts`."""
        status = fields.get("status")
        if status is not None and not isinstance(status, str):
            fields["status"] = list(status)  # an iterator is read here, not in the worker thread
        return await asyncio.to_thread(functools.partial(
            self.sync.query_rollouts, filter, offset=offset, limit=limit, **fields))

    async def query_page(
        self, filter: RolloutFilter | None = None, *, cursor: str | None = None, limit: int = 100
    ) -> RolloutPage:
        """One page of matching rollouts and the next cursor. See :meth:`LightningClient.query_page`."""
        return await asyncio.to_thread(functools.partial(self.sync.query_page, filter, cursor=cursor, limit=limit))

    async def finished_rollouts(
        self, after: str | None = None, *, limit: int = 100, block_seconds: float = 0.0,
        filter: RolloutFilter | None = None,
    ) -> FinishedPage:
        """The rollouts finished after the cursor ``after``, and the next cursor (the wait,
        ``block_seconds`` at most, holds a thread). See :meth:`LightningClient.finished_rollouts`."""
        return await asyncio.to_thread(functools.partial(
            self.sync.finished_rollouts, after, limit=limit, block_seconds=block_seconds, filter=filter))

    async def iter_finished_rollouts(
        self, after: str | None = None, *, idle_seconds: float = 5.0, batch: int = 100,
        filter: RolloutFilter | None = None,
    ) -> AsyncIterator[FinishedRollout]:
        """Each finished rollout after ``after``, until none arrived for ``idle_seconds``.
        See :meth:`LightningClient.iter_finished_rollouts`."""
        cursor = after
        loop = asyncio.get_running_loop()
        idle_until = loop.time() + idle_seconds
        while (left := idle_until - loop.time()) > 0:
            page = await self.finished_rollouts(cursor, limit=batch, block_seconds=min(left, 1.0), filter=filter)
            if page.cursor != cursor:
                idle_until = loop.time() + idle_seconds
            cursor = page.cursor
            for item in page.items:
                yield item

    async def cancel_rollouts(
        self, filter: RolloutFilter | None = None, *, dry_run: bool = True, batch: int = 100,
        terminate: bool = True,
    ) -> CancelReport:
        """Cancel (or, on a dry run, list) the unfinished rollouts matching ``filter``.
        See :meth:`LightningClient.cancel_rollouts`."""
        return await asyncio.to_thread(functools.partial(
            self.sync.cancel_rollouts, filter, dry_run=dry_run, batch=batch, terminate=terminate))

    async def cancel_rollout(self, rollout_id: str, terminate: bool = True) -> str:
        """Cancel a rollout that has not finished; return its status afterwards.
        See :meth:`LightningClient.cancel_rollout`."""
        return await asyncio.to_thread(self.sync.cancel_rollout, rollout_id, terminate)

    # -- traces and LLM usage -----------------------------------------------------------------

    async def query_spans(self, rollout_id: str, attempt_id: str | None = None) -> list[Span]:
        """The spans of one attempt of the rollout, or of every attempt (``attempt_id=None``).
        See :meth:`LightningClient.query_spans`."""
        return await asyncio.to_thread(self.sync.query_spans, rollout_id, attempt_id)

    async def get_triplets(self, rollout_id: str, attempt_id: str | None = None) -> list[Triplet]:
        """One (prompt, response, reward) triplet per LLM call of an attempt (default: the last).
        See :meth:`LightningClient.get_triplets`."""
        return await asyncio.to_thread(self.sync.get_triplets, rollout_id, attempt_id)

    async def get_usage(self, rollout_id: str) -> Usage:
        """The rollout's LLM calls, tokens and cost, over all its attempts."""
        return await asyncio.to_thread(self.sync.get_usage, rollout_id)

    async def usage_by_version(self, resources_id: str) -> dict[int, Usage]:
        """What each version of a snapshot cost, by version. See :meth:`LightningClient.usage_by_version`."""
        return await asyncio.to_thread(self.sync.usage_by_version, resources_id)

    async def usage_by_variant(self, experiment: str) -> dict[str, Usage]:
        """What each variant of an experiment cost, by variant."""
        return await asyncio.to_thread(self.sync.usage_by_variant, experiment)
