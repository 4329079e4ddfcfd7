"""Retention: bound what a long optimization run keeps in Redis.

Rollout records expire on their own (``rollout_ttl_seconds`` after they
finish, see :mod:`lightning_queue.store`). Snapshots do not: every prompt an
algorithm tries is a snapshot. The retention policy keeps the newest ``keep``
snapshots (by registry write order) and every snapshot a pointer names or a
queued/running rollout uses, and deletes the rest. Deletion is never forced,
so a snapshot that came into use after the policy looked is skipped (and
reported), never pulled from under a rollout. It also prunes index entries
left by expired rollout records.

Run it from code (:func:`apply_retention`, ``LightningClient.apply_retention``),
from the command line (``lightning-queue resources gc``), or on a schedule:
with ``LQ_GC_INTERVAL_SECONDS`` set, ``celery -A lightning_queue.app beat``
(or a worker started with ``-B``) sends the ``lightning_queue.retention`` task
(registered in :mod:`lightning_queue.worker.tasks`) to the default queue at that interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_queue.core.errors import ResourcesNotFoundError, SnapshotInUseError
from lightning_queue.core.models import ACTIVE_STATUSES
from lightning_queue.storage.connections import text
from lightning_queue.storage.registry import SnapshotRegistry
from lightning_queue.storage.store import RolloutStore

log = logging.getLogger(__name__)

_CHUNK = 1000


@dataclass
class RetentionReport:
    """What one application of the policy did (on a dry run: would do)."""

    keep: int
    dry_run: bool
    deleted: list[str] = field(default_factory=list)
    """Snapshots deleted, oldest first."""
    kept: dict[str, list[str]] = field(default_factory=dict)
    """Snapshots kept, newest first, each with why: ``newest``, ``pointer NAME``, ``used by N rollouts``."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Snapshots that were to be deleted but were not, with why (they came into use meanwhile)."""
    pruned: int = 0
    """Index entries of expired rollouts removed."""
    elapsed: float = 0.0

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"retention (keep {self.keep}): {verb} {len(self.deleted)} snapshot(s), kept {len(self.kept)}, "
            f"skipped {len(self.skipped)}, pruned {self.pruned} index entries of expired rollouts "
            f"in {self.elapsed:.3f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest ``keep`` snapshots, plus every one pointed at or in use."""

    keep: int

    def __post_init__(self) -> None:
        if self.keep < 0:
            raise ValueError(f"keep must be >= 0, not {self.keep}")

    def apply(self, registry: SnapshotRegistry, store: RolloutStore, dry_run: bool = False) -> RetentionReport:
        """Apply the policy once; see :func:`apply_retention`."""
        started = time.monotonic()
        report = RetentionReport(keep=self.keep, dry_run=dry_run)
        ids = registry.list_ids()  # newest write first
        reasons: dict[str, list[str]] = {rid: ["newest"] for rid in ids[: self.keep]}
        for name, target in sorted(registry.pointers().items()):
            reasons.setdefault(target, []).append(f"pointer {name}")
        for rid, count in sorted(in_use(store).items()):
            reasons.setdefault(rid, []).append(f"used by {count} queued/running rollout{'s' * (count != 1)}")
        report.kept = {rid: reasons[rid] for rid in ids if rid in reasons}
        for rid in reversed([rid for rid in ids if rid not in reasons]):
            if dry_run:
                report.deleted.append(rid)
                continue
            try:
                registry.delete_resources(rid, op="retention")
            except SnapshotInUseError as exc:  # came into use after we looked
                report.skipped[rid] = _in_use_reason(exc)
            except ResourcesNotFoundError:
                report.skipped[rid] = "already deleted"
            else:
                report.deleted.append(rid)
        report.pruned = store.prune_expired(dry_run=dry_run)
        report.elapsed = time.monotonic() - started
        return report


def apply_retention(
    registry: SnapshotRegistry, store: RolloutStore, keep: int, dry_run: bool = False
) -> RetentionReport:
    """Keep the newest ``keep`` snapshots (by registry write order) and every snapshot a
    pointer names or a queued/running rollout uses; delete the others, oldest first;
    prune index entries of expired rollouts.

    Each deletion is the registry's ordinary, non-forced, atomic delete: one that came
    into use since the policy looked is refused, and reported in ``skipped``. With
    ``dry_run`` nothing is written and the report says what would be done.
    """
    return RetentionPolicy(keep).apply(registry, store, dry_run)


def in_use(store: RolloutStore) -> dict[str, int]:
    """Snapshot ids that queued or running rollouts need, with how many rollouts: the one a
    rollout is pinned to and those its attempts ran with (what makes a delete refuse).
    Rollouts that follow a pointer need its target, which the pointer itself keeps."""
    redis, k = store.redis, store.keys
    pipe = redis.pipeline(transaction=True)
    for status in ACTIVE_STATUSES:
        pipe.zrange(k.rollouts_by_status(status), 0, -1)
    active = list(dict.fromkeys(text(rid) for members in pipe.execute() for rid in members))
    counts: dict[str, int] = {}
    for chunk in _chunks(active):
        pipe = redis.pipeline(transaction=False)
        for rid in chunk:
            pipe.hmget(k.rollout(rid), "resources_id", "attempt_count")
        records = pipe.execute()
        pipe = redis.pipeline(transaction=False)
        for rid, (_, attempts) in zip(chunk, records, strict=True):
            for n in range(1, int(attempts or 0) + 1):
                pipe.hget(k.attempt(rid, n), "resources_id")
        attempt_ids = iter(pipe.execute())
        for (pinned, attempts) in records:
            used = {text(pinned)} if pinned else set()
            used.update(text(a) for a in (next(attempt_ids) for _ in range(int(attempts or 0))) if a)
            for rid in used:
                counts[rid] = counts.get(rid, 0) + 1
    return counts


def _in_use_reason(exc: SnapshotInUseError) -> str:
    parts = []
    if exc.pointers:
        parts.append(f"pointer {', '.join(sorted(exc.pointers))}")
    if exc.rollout_ids:
        parts.append(f"used by {len(exc.rollout_ids)} queued/running rollouts")
    return "in use since the policy looked: " + "; ".join(parts)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
