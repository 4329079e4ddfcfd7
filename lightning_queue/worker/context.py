"""What one worker process works with: its connections, store, registry, cache, heartbeat and tracing.

Each process of a worker builds its own :class:`WorkerContext`: the main process (which
sweeps for unresponsive attempts, records hard time-outs and lost pool processes, and
reports the worker's health) and, after the fork, each pool process (which runs rollouts
and keeps a snapshot cache). Nothing is shared across a fork: sockets and threads do not
survive one. The algorithm side never sees a context.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from celery import Celery
from redis import Redis

from lightning_queue.broker.publisher import Publisher
from lightning_queue.core.models import ResourcesUpdate
from lightning_queue.core.settings import Settings
from lightning_queue.storage.connections import connect
from lightning_queue.storage.epoch import RegistryEpoch
from lightning_queue.storage.registry import LATEST, SnapshotRegistry
from lightning_queue.storage.store import RolloutStore
from lightning_queue.worker.cache import Held, SnapshotCache, start_cache
from lightning_queue.worker.heartbeat import Heartbeat
from lightning_queue.worker.tracing import Tracing

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """One worker process's view of the system. Build it with :meth:`create`."""

    settings: Settings
    redis: Redis
    registry: SnapshotRegistry
    store: RolloutStore
    publisher: Publisher
    heartbeat: Heartbeat
    cache: SnapshotCache | None = None
    pid: int = field(default_factory=os.getpid)
    tracing: Tracing = field(init=False)

    def __post_init__(self) -> None:
        self.tracing = Tracing(self.settings)

    @classmethod
    def create(
        cls,
        settings: Settings,
        celery: Celery,
        *,
        redis_client: Redis | None = None,
        cache_name: str | None = None,
        with_cache: bool = False,
        max_connections: int | None = None,
    ) -> WorkerContext:
        """A context for this process. No start-up check of the connection: a pool process
        made while Redis restarts must not die of it; its commands ride out the outage
        through the retry budget instead. ``with_cache`` starts a snapshot cache (none when
        ``settings.cache_max_bytes`` is 0) that reports its stats as ``cache_name``.
        ``max_connections`` bounds the Redis client's pool (None: redis-py's default)."""
        if redis_client is None:
            redis_client = connect(settings.redis_url, settings.sentinel_master, check=False,
                                   retry_seconds=settings.redis_retry_seconds, max_connections=max_connections)
        keys = settings.keys
        epoch = RegistryEpoch(redis_client, keys)
        registry = SnapshotRegistry(redis_client, keys, settings, epoch=epoch)
        store = RolloutStore(redis_client, keys, settings.rollout_ttl_seconds, settings.heartbeat_deadline,
                             epoch=epoch, outage_seconds=settings.sweep_outage_seconds,
                             message_grace=settings.message_grace_seconds, series_caps=settings.series_caps)
        cache = start_cache(registry, settings, cache_name) if with_cache else None
        return cls(settings=settings, redis=redis_client, registry=registry, store=store,
                   publisher=Publisher(celery, settings), heartbeat=Heartbeat(store, settings.heartbeat_interval),
                   cache=cache)

    def load_snapshot(self, ref: str | None, version: int | None = None, min_seq: int = 0) -> ResourcesUpdate:
        """The snapshot a rollout runs with (``None`` = latest), through this process's cache
        when it has one. ``min_seq`` is the registry sequence the answer must be at least as
        fresh as."""
        return self.load(ref, version, min_seq).snapshot

    def load(self, ref: str | None, version: int | None = None, min_seq: int = 0, epoch: str | None = None
             ) -> Held:
        """:meth:`load_snapshot`, with the registry epoch the snapshot was read in. ``epoch`` is
        the one the task message was enqueued in: the cache answers from memory only for it."""
        if self.cache is not None:
            return self.cache.take(ref or LATEST, version, min_seq, epoch)
        fetched = self.registry.fetch(ref or LATEST, version)
        return Held(fetched.snapshot, fetched.epoch)

    def peek_snapshot(self, ref: str | None, version: int | None, min_seq: int, epoch: str | None = None
                      ) -> Held | None:
        """What :meth:`load` would answer from memory, or None (no cache, or a miss); never
        touches Redis."""
        return None if self.cache is None else self.cache.peek(ref or LATEST, version, min_seq, epoch)

    def close(self) -> None:
        """Stop the cache's listener (logging its stats) and close the connections."""
        if self.cache is not None:
            self.cache.close()
            log.info("snapshot cache stats: %s", self.cache.stats())
        if self.pid == os.getpid():
            self.redis.close()
