"""Rollouts: a filtered list with cursor paging, and one rollout's detail with its attempts.

A page is read from one index zset (newest enqueued first), chosen by the most selective filter
given; the other filters are checked against their own indexes (the same ones
:meth:`RolloutStore.query_rollouts` reads), so a filter means what it means there. The cursor is
the position of the last entry read (score and id), so rollouts enqueued meanwhile never shift a
page. A page reads at most ``SCAN_BUDGET`` index entries: with rare matches it may come back
short, with a cursor to go on from.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from lightning_queue.core.errors import InvalidCursorError
from lightning_queue.core.keys import Keys
from lightning_queue.core.models import Attempt, Rollout, RolloutMode, RolloutStatus
from lightning_queue.ops.server.deps import ServicesDep, UserDep
from lightning_queue.storage.connections import text
from lightning_queue.storage.store import decode_rollout

router = APIRouter(tags=["rollouts"])

SCAN_BUDGET = 2000
Position = tuple[float, str]


class RolloutSummary(BaseModel):
    rollout_id: str
    status: str
    mode: str | None
    resources_id: str | None
    resources_version: int | None
    enqueue_time: float
    start_time: float | None
    end_time: float | None
    attempt_count: int
    reward: float | None
    error_type: str | None
    experiment: str | None
    variant: str | None

    @classmethod
    def of(cls, r: Rollout) -> RolloutSummary:
        meta = r.metadata
        return cls(
            rollout_id=r.rollout_id, status=r.status, mode=r.mode, resources_id=r.resources_id,
            resources_version=r.resources_version, enqueue_time=r.enqueue_time, start_time=r.start_time,
            end_time=r.end_time, attempt_count=r.attempt_count, reward=r.reward,
            error_type=r.error.type if r.error else None,
            experiment=meta.get("experiment") if isinstance(meta.get("experiment"), str) else None,
            variant=meta.get("variant") if isinstance(meta.get("variant"), str) else None,
        )


class RolloutPage(BaseModel):
    items: list[RolloutSummary]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null at the end.")


class RolloutDetail(BaseModel):
    rollout: Rollout
    attempts: list[Attempt]
    trace: list[dict[str, Any]] | None = Field(description="The trace the agent reported (RolloutResult.trace).")
    spans: list[dict[str, Any]] | None = Field(None, description="The span tree, once traces are recorded.")


def encode_cursor(position: Position) -> str:
    return base64.urlsafe_b64encode(json.dumps([position[0], position[1]]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    try:
        score, member = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(member, str) or isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(cursor)
        return float(score), member
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursorError(cursor) from None


def _after(redis: Any, key: str, position: Position | None, count: int) -> list[tuple[str, float]]:
    """Up to ``count`` entries of ``key`` after ``position``, newest first (ties: greater id first)."""
    out: list[tuple[str, float]] = []
    offset = 0
    top: str | float = "+inf" if position is None else position[0]
    while len(out) < count:
        chunk = redis.zrevrangebyscore(key, top, "-inf", start=offset, num=count, withscores=True)
        if not chunk:
            break
        offset += len(chunk)
        for member, score in chunk:
            rid = text(member)
            if position is None or score < position[0] or rid < position[1]:
                out.append((rid, score))
    return out[:count]


def page_rollouts(
    redis: Any, keys: Keys, primary: list[str], others: list[list[str]], position: Position | None, limit: int
) -> tuple[list[Rollout], Position | None]:
    """The next ``limit`` rollouts in the union of the ``primary`` indexes that are in at least one
    index of each group of ``others``, after ``position``; and the position to go on from (None
    when the indexes hold nothing further)."""
    found: list[Rollout] = []
    scanned = 0
    while len(found) < limit and scanned < SCAN_BUDGET:
        want = min(max(limit - len(found), 20) * (2 if others else 1), SCAN_BUDGET - scanned)
        merged = sorted((entry for key in primary for entry in _after(redis, key, position, want)),
                        key=lambda e: (e[1], e[0]), reverse=True)[:want]
        if not merged:
            return found, None
        scanned += len(merged)
        ids = [rid for rid, _ in merged]
        pipe = redis.pipeline(transaction=False)
        for group in others:
            for key in group:
                for rid in ids:
                    pipe.zscore(key, rid)
        for rid in ids:
            pipe.hgetall(keys.rollout(rid))
        replies = pipe.execute()
        checks, records = replies[: len(replies) - len(ids)], replies[len(replies) - len(ids):]
        keep = [True] * len(ids)
        at = 0
        for group in others:
            in_group = [False] * len(ids)
            for _ in group:
                for i in range(len(ids)):
                    in_group[i] = in_group[i] or checks[at + i] is not None
                at += len(ids)
            keep = [k and g for k, g in zip(keep, in_group, strict=True)]
        for (rid, score), ok, fields in zip(merged, keep, records, strict=True):
            position = (score, rid)
            if ok and fields:
                found.append(decode_rollout(fields))
                if len(found) == limit:
                    return found, position
        if len(merged) < want:
            return found, None
    return found, position


@router.get("/rollouts", summary="Rollouts matching every filter, newest enqueued first, a page at a time")
def list_rollouts(
    services: ServicesDep, user: UserDep,
    status: Annotated[list[RolloutStatus] | None, Query(description="One or more statuses.")] = None,
    mode: RolloutMode | None = None,
    resources_id: Annotated[str | None, Query(max_length=200)] = None,
    worker_id: Annotated[str | None, Query(max_length=300)] = None,
    experiment: Annotated[str | None, Query(max_length=200)] = None,
    variant: Annotated[str | None, Query(max_length=200, description="With experiment: one variant.")] = None,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> RolloutPage:
    client = services.client
    k = client.keys
    groups: list[list[str]] = []
    if experiment:
        names = [variant] if variant else [v.name for v in services.experiments.get(experiment).variants]
        groups.append([k.experiment_rollouts(experiment, name) for name in names])
    if resources_id:
        groups.append([k.rollouts_by_resources(resources_id)])
    if worker_id:
        groups.append([k.rollouts_by_worker(worker_id)])
    if status:
        groups.append([k.rollouts_by_status(s) for s in dict.fromkeys(status)])
    if mode:
        groups.append([k.rollouts_by_mode(mode)])
    primary, others = (groups[0], groups[1:]) if groups else ([k.rollouts], [])
    position = decode_cursor(cursor) if cursor else None
    found, last = page_rollouts(client.redis, k, primary, others, position, limit)
    return RolloutPage(items=[RolloutSummary.of(r) for r in found],
                       next_cursor=encode_cursor(last) if last is not None else None)


@router.get("/rollouts/{rollout_id}", summary="A rollout with its attempts and trace")
def get_rollout(services: ServicesDep, user: UserDep, rollout_id: str) -> RolloutDetail:
    client = services.client
    rollout = client.get_rollout(rollout_id)
    attempts = client.get_attempts(rollout_id)
    return RolloutDetail(rollout=rollout, attempts=attempts, trace=rollout.result.trace if rollout.result else None)
