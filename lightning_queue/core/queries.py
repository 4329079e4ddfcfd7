"""Rollout queries: the filter every query, page, cursor and bulk cancel takes, and what they return.

One :class:`RolloutFilter` serves :meth:`~lightning_queue.client.LightningClient.query_rollouts`,
its paged form, the finished-rollouts cursor, the bulk cancel, ``lightning-queue rollouts list`` and
``cancel``, and the dashboard's ``GET /api/rollouts``, so a filter means the same thing everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lightning_queue.core.errors import InvalidFilterError
from lightning_queue.core.models import Rollout, RolloutMode, RolloutStatus

OrderBy = Literal["enqueue_time", "end_time"]
MetadataValue = str | int | float | bool | None
Time = Annotated[float, Field(allow_inf_nan=False)]
"""Unix seconds (finite)."""


class FilterFields(TypedDict, total=False):
    """:class:`RolloutFilter`'s fields as keyword arguments of the query methods, laid over a
    filter given with them (``None``: keep the filter's). Spelled once for the store, the client
    and the async client."""

    status: str | Iterable[str] | None
    mode: str | None
    resources_id: str | None
    worker_id: str | None
    experiment: str | None
    variant: str | None
    queue: str | None
    metadata: Mapping[str, Any] | None
    enqueued_after: float | None
    enqueued_before: float | None
    ended_after: float | None
    ended_before: float | None
    order_by: OrderBy | None
    newest_first: bool | None


class RolloutFilter(BaseModel):
    """Which rollouts, in which order. Every field given must match (AND); a list of statuses
    matches any of them (OR).

    Served from the index zsets, server-side (one script walks one of them from the cursor and
    keeps the ids in the others): ``status``, ``mode``, ``resources_id``, ``worker_id``,
    ``experiment``/``variant``, and the time range of the sort key. Checked on each decoded record,
    a bounded page at a time: ``metadata``, ``queue``, and the time range of the other key.
    ``end_time`` ordering and the ``ended_*`` bounds only see finished rollouts (those that
    reached a final status since the ``{p}:rollouts:ended`` index exists).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: tuple[RolloutStatus, ...] | None = Field(
        None, description="One or more statuses (any of them matches).")
    mode: RolloutMode | None = None
    resources_id: str | None = Field(
        None, description="Pinned to, or ran an attempt with, this snapshot id.")
    worker_id: str | None = Field(None, description="Ran an attempt on this worker.")
    experiment: str | None = Field(None, description="Enqueued through this experiment.")
    variant: str | None = Field(None, description="With experiment: enqueued under this variant.")
    queue: str | None = Field(None, description="Sent to this Celery queue.")
    metadata: dict[str, MetadataValue] = Field(
        default_factory=dict, description="Top-level metadata keys that must equal these values.")
    enqueued_after: Time | None = Field(None, description="Enqueued at or after this time (Unix seconds).")
    enqueued_before: Time | None = Field(None, description="Enqueued before this time (Unix seconds).")
    ended_after: Time | None = Field(None, description="Finished at or after this time (only finished rollouts).")
    ended_before: Time | None = Field(None, description="Finished before this time (only finished rollouts).")
    order_by: OrderBy = "enqueue_time"
    newest_first: bool = True

    @field_validator("status", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        if value is not None:
            value = tuple(dict.fromkeys(value))
            return value or None
        return value

    @model_validator(mode="after")
    def _coherent(self) -> RolloutFilter:
        if self.variant is not None and self.experiment is None:
            raise ValueError("variant needs experiment: name the experiment the variant belongs to")
        return self

    @property
    def by_end_time(self) -> bool:
        """Only finished rollouts can match (ordered, or bounded, by end time)."""
        return self.order_by == "end_time" or self.ended_after is not None or self.ended_before is not None

    def sort_range(self) -> tuple[float | None, float | None]:
        """The ``[after, before)`` range of the sort key."""
        if self.order_by == "end_time":
            return self.ended_after, self.ended_before
        return self.enqueued_after, self.enqueued_before

    @property
    def index_only(self) -> list[str]:
        """The fields given that only the indexes can answer (not in the record): ``resources_id``
        (it counts the snapshots attempts ran with) and ``worker_id``."""
        return [name for name in ("resources_id", "worker_id") if getattr(self, name) is not None]

    def matches(self, rollout: Rollout) -> bool:
        """Whether the record matches every field that can be read off it: all but
        :attr:`index_only`, which this does not check."""
        r = rollout
        meta = r.metadata
        checks = (
            self.status is None or r.status in self.status,
            self.mode is None or r.mode == self.mode,
            self.queue is None or r.queue == self.queue,
            self.experiment is None or meta.get("experiment") == self.experiment,
            self.variant is None or meta.get("variant") == self.variant,
            all(key in meta and meta[key] == value for key, value in self.metadata.items()),
            _within(r.enqueue_time, self.enqueued_after, self.enqueued_before),
            not self.by_end_time or (r.end_time is not None and _within(r.end_time, self.ended_after,
                                                                         self.ended_before)),
        )
        return all(checks)


def parse_metadata(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs as a metadata filter: each value JSON when it parses (``n=3``,
    ``ok=true``), else the string (``user=alice``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidFilterError(f"metadata filter {pair!r} is not key=value; write e.g. user=alice")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, (dict, list)):
            value = raw
        out[key] = value
    return out


def _within(value: float, after: float | None, before: float | None) -> bool:
    return (after is None or value >= after) and (before is None or value < before)


class RolloutPage(BaseModel):
    """One page of a query: the rollouts, and the cursor of the next page (None: nothing further)."""

    rollouts: list[Rollout]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; None at the end.")


class FinishedRollout(BaseModel):
    """One entry of the finished-rollouts stream."""

    cursor: str = Field(description="The stream entry's id: pass it as `after` to resume after this entry.")
    rollout_id: str
    status: RolloutStatus
    rollout: Rollout | None = Field(description="The record; None when it expired before it was read.")


class FinishedPage(BaseModel):
    """What one read of the finished-rollouts stream returned."""

    items: list[FinishedRollout]
    cursor: str | None = Field(
        description="Where the next read starts: the last entry read (entries a filter left out included), "
        "or the `after` given when nothing new was read.")


class CancelReport(BaseModel):
    """What a bulk cancel did (or, on a dry run, would do)."""

    dry_run: bool
    matched: list[str] = Field(description="The unfinished rollouts the filter matched, in query order.")
    cancelled: list[str] = Field(default_factory=list)
    already_finished: list[str] = Field(default_factory=list, description="Finished before their cancel ran.")
    not_found: list[str] = Field(default_factory=list, description="Expired or deleted before their cancel ran.")
