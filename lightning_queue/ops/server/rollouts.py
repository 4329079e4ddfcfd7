"""Rollouts: a filtered list with cursor paging, and one rollout's detail with its attempts.

The list takes the fields of :class:`~lightning_queue.core.queries.RolloutFilter` as query
parameters and pages with :meth:`RolloutStore.query_page`, so a filter means what it means for
``client.query_rollouts`` and ``lightning-queue rollouts list``. The cursor is the position of the
last entry read (score and id), so rollouts enqueued meanwhile never shift a page. A page reads at
most ``QUERY_SCAN_BUDGET`` index entries: with rare matches it may come back short, with a cursor
to go on from.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, ValidationError

from lightning_queue.core.errors import InvalidFilterError
from lightning_queue.core.models import Attempt, Rollout, RolloutMode, RolloutStatus, describe_validation_error
from lightning_queue.core.queries import OrderBy, RolloutFilter, parse_metadata
from lightning_queue.ops.server.deps import ServicesDep, UserDep

router = APIRouter(tags=["rollouts"])

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


@router.get("/rollouts", summary="Rollouts matching every filter, newest enqueued first, a page at a time")
def list_rollouts(
    services: ServicesDep, user: UserDep,
    status: Annotated[list[RolloutStatus] | None, Query(description="One or more statuses.")] = None,
    mode: RolloutMode | None = None,
    resources_id: Annotated[str | None, Query(max_length=200)] = None,
    worker_id: Annotated[str | None, Query(max_length=300)] = None,
    experiment: Annotated[str | None, Query(max_length=200)] = None,
    variant: Annotated[str | None, Query(max_length=200, description="With experiment: one variant.")] = None,
    queue: Annotated[str | None, Query(max_length=200)] = None,
    metadata: Annotated[list[str] | None, Query(max_length=500, description="key=value, top-level metadata "
                                                "equality (the value JSON when it parses); repeat for more.")] = None,
    enqueued_after: float | None = None,
    enqueued_before: float | None = None,
    ended_after: float | None = None,
    ended_before: float | None = None,
    order_by: OrderBy = "enqueue_time",
    newest_first: bool = True,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> RolloutPage:
    if experiment and not variant:
        services.experiments.get(experiment)  # 404 for an unknown experiment
    try:
        wanted = RolloutFilter(
            status=tuple(status) if status else None, mode=mode, resources_id=resources_id or None,
            worker_id=worker_id or None, experiment=experiment or None, variant=variant or None, queue=queue or None,
            metadata=parse_metadata(metadata or []), enqueued_after=enqueued_after, enqueued_before=enqueued_before,
            ended_after=ended_after, ended_before=ended_before, order_by=order_by, newest_first=newest_first)
    except ValidationError as exc:
        raise InvalidFilterError(describe_validation_error(exc)) from None
    page = services.client.query_page(wanted, cursor=cursor, limit=limit)
    return RolloutPage(items=[RolloutSummary.of(r) for r in page.rollouts], next_cursor=page.next_cursor)


@router.get("/rollouts/{rollout_id}", summary="A rollout with its attempts and trace")
def get_rollout(services: ServicesDep, user: UserDep, rollout_id: str) -> RolloutDetail:
    client = services.client
    rollout = client.get_rollout(rollout_id)
    attempts = client.get_attempts(rollout_id)
    return RolloutDetail(rollout=rollout, attempts=attempts, trace=rollout.result.trace if rollout.result else None)
