"""Reading the aggregates every final transition writes (``lua/_final_metrics.lua``; keys in
:mod:`lightning_queue.core.keys`): finished rollouts by status, duration and queue-wait histograms,
and reward summaries, for the whole queue, per snapshot version and per experiment variant.

Cost of :func:`read_final_metrics`, whatever the number of rollouts: two pipelined round trips (the
totals and the two series indexes, then one ``HGETALL`` per series), at most
``Settings.metrics_max_snapshot_versions + metrics_max_variants + 2`` hashes. No rollout record is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from lightning_queue.core.keys import Keys
from lightning_queue.core.metrics import DURATION_BUCKETS, OTHER, QUEUE_WAIT_BUCKETS
from lightning_queue.storage.connections import text


@dataclass(frozen=True)
class Histogram:
    """Counts per bucket (``counts[i]`` for values <= ``bounds[i]``, not cumulative; the last is +Inf) and
    the sum of the values."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count of values <= le)`` pairs, +Inf last: Prometheus's bucket form."""
        out, running = [], 0
        for bound, n in zip((*(repr(b) for b in self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    @classmethod
    def of(cls, fields: Mapping[str, str], name: str, total: str, bounds: tuple[float, ...]) -> Histogram:
        counts = tuple(int(float(fields.get(f"{name}:{i}", 0))) for i in range(1, len(bounds) + 2))
        return cls(bounds, counts, float(fields.get(total, 0.0)))


@dataclass(frozen=True)
class Series:
    """The aggregates of one set of finished rollouts (the queue, a snapshot version, a variant)."""

    finished: dict[str, int]
    """Rollouts per final status."""
    duration: Histogram
    """Start of the first attempt to the final status, of the rollouts that started."""
    reward_count: int = 0
    reward_sum: float = 0.0
    reward_min: float | None = None
    reward_max: float | None = None

    @classmethod
    def of(cls, raw: Mapping[bytes, bytes] | Mapping[str, str]) -> Series:
        fields = {text(k): text(v) for k, v in raw.items()}
        return cls(
            finished={k.removeprefix("n:"): int(float(v)) for k, v in fields.items() if k.startswith("n:")},
            duration=Histogram.of(fields, "d", "ds", DURATION_BUCKETS),
            reward_count=int(float(fields.get("rn", 0))),
            reward_sum=float(fields.get("rs", 0.0)),
            reward_min=float(fields["rmin"]) if "rmin" in fields else None,
            reward_max=float(fields["rmax"]) if "rmax" in fields else None,
        )


@dataclass(frozen=True)
class FinalMetrics:
    """What :func:`read_final_metrics` read. ``snapshots`` is keyed by ``(resources_id, version)``
    and ``variants`` by ``(experiment, variant)``; the series folded past a cap are summed in
    ``(OTHER, OTHER)`` (present once anything was folded), and ``folded`` counts them by kind
    (``snapshot``, ``variant``)."""

    totals: Series
    queue_wait: Histogram
    snapshots: dict[tuple[str, str], Series] = field(default_factory=dict)
    variants: dict[tuple[str, str], Series] = field(default_factory=dict)
    folded: dict[str, int] = field(default_factory=dict)


def read_final_metrics(client: redis.Redis, keys: Keys) -> FinalMetrics:
    """The aggregates, in two pipelined round trips (see the module doc). Raises ``redis.RedisError``
    when Redis cannot be read."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.metrics)
    pipe.zrange(keys.metrics_snapshots, 0, -1)
    pipe.zrange(keys.metrics_variants, 0, -1)
    totals_raw, snapshot_members, variant_members = pipe.execute()
    snapshots = [text(m) for m in snapshot_members] + [OTHER]
    variants = [text(m) for m in variant_members] + [OTHER]
    pipe = client.pipeline(transaction=False)
    for member in snapshots:
        pipe.hgetall(keys.metrics_snapshot(member))
    for member in variants:
        pipe.hgetall(keys.metrics_variant(member))
    replies = pipe.execute()
    totals = {text(k): text(v) for k, v in totals_raw.items()}

    def labels(member: str, version_last: bool) -> tuple[str, str]:
        if member == OTHER:
            return (OTHER, OTHER)
        # "{resources_id}:{version}" (an id may hold ':'); "{experiment}:{variant}" (names hold none).
        a, _, b = member.rpartition(":") if version_last else member.partition(":")
        return (a, b)

    return FinalMetrics(
        totals=Series.of(totals),
        queue_wait=Histogram.of(totals, "w", "ws", QUEUE_WAIT_BUCKETS),
        snapshots={labels(m, True): Series.of(raw) for m, raw in zip(snapshots, replies[:len(snapshots)], strict=True)
                   if raw},
        variants={labels(m, False): Series.of(raw) for m, raw in zip(variants, replies[len(snapshots):], strict=True)
                  if raw},
        folded={k.removeprefix("folded:"): int(v) for k, v in totals.items() if k.startswith("folded:")},
    )
