"""The fleet: each worker's health (stalled or not), each process's snapshot cache, and an overview."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from lightning_queue.ops.server.deps import ServicesDep, UserDep

router = APIRouter(tags=["workers"])


class WorkerOut(BaseModel):
    hostname: str
    pid: int
    concurrency: int
    active: int
    queues: list[str]
    consuming: list[str]
    queued: dict[str, int]
    last_received: float | None
    backlog_since: float | None
    updated: float
    stalled: bool
    reason: str | None


class Fleet(BaseModel):
    workers: list[WorkerOut]
    stalled: list[str] = Field(description="Hostnames of the stalled workers.")
    caches: dict[str, dict[str, Any]] = Field(description="Snapshot-cache stats by node@host:pid.")


class Overview(BaseModel):
    prefix: str
    queue: str
    statuses: dict[str, int]
    snapshots: int
    pointers: dict[str, str]
    experiments: int
    workers: int


@router.get("/workers", summary="Every live worker's health and every process's snapshot cache")
def fleet(services: ServicesDep, user: UserDep) -> Fleet:
    client = services.client
    health = client.worker_health()
    workers = [WorkerOut(hostname=h.hostname, pid=h.pid, concurrency=h.concurrency, active=h.active,
                         queues=h.queues, consuming=h.consuming, queued=h.queued, last_received=h.last_received,
                         backlog_since=h.backlog_since, updated=h.updated, stalled=h.stalled, reason=h.reason)
               for h in health]
    return Fleet(workers=workers, stalled=[w.hostname for w in workers if w.stalled], caches=client.cache_stats())


@router.get("/overview", summary="Counts for the page's header")
def overview(services: ServicesDep, user: UserDep) -> Overview:
    client = services.client
    return Overview(
        prefix=client.settings.key_prefix, queue=client.settings.queue, statuses=client.store.count_by_status(),
        snapshots=client.registry.count(), pointers=client.pointers(),
        experiments=int(client.redis.zcard(client.keys.experiments)),
        workers=len(list(client.redis.scan_iter(match=client.keys.worker_health_pattern, count=1000))),
    )
