"""Monitoring: what Flower cannot know, read from Redis at scrape time.

Flower shows Celery's view (tasks, workers); this module shows the queue's:
rollouts per status and per snapshot, which pointers name which snapshot,
queue depth per priority, messages held by workers, the worker snapshot
caches' hits, misses and load time, and what finished rollouts came to
(finished by status, duration and queue-wait histograms, rewards) for the
queue, per snapshot version and per experiment variant. One read
(:func:`read_overview`) serves both the Prometheus exporter
(:class:`LightningCollector`, served by ``lightning-queue exporter``) and the
terminal view (``lightning-queue status``).

Cost per scrape, whatever the number of rollouts: one pipeline of ``ZCARD`` /
``LLEN`` / ``HLEN`` / ``HGETALL pointers`` / ``ZREVRANGE snapshots`` (and the retry
schedule's ``ZCARD`` and the dead-letter list's ``LLEN``) and one
pipeline of ``ZCARD`` per snapshot shown (at most ``max_snapshots`` plus the
pointer targets); then the aggregates the final transitions keep
(:func:`~lightning_queue.storage.metrics.read_final_metrics`: two pipelined
round trips, one hash per series, at most the series caps of
:class:`~lightning_queue.core.settings.Settings`). Rollout records are never read. The worker cache stats are
found with a ``SCAN`` (:meth:`LightningClient.cache_stats`), so they are read
at most once per ``cache_stats_every`` seconds (workers only report that
often anyway) and the last reading is served in between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from lightning_queue.core.errors import redacted_url
from lightning_queue.core.models import ROLLOUT_STATUSES, TERMINAL_STATUSES
from lightning_queue.storage.connections import text
from lightning_queue.storage.metrics import FinalMetrics, Histogram, Series, read_final_metrics

if TYPE_CHECKING:
    from lightning_queue.client import LightningClient

log = logging.getLogger(__name__)

DEFAULT_EXPORTER_PORT = 9808


# ------------------------------------------------------------------------------- hooks


def experiment_traffic_per_variant(client: LightningClient) -> Iterable[Metric]:
    """Experiment traffic: ``lq_experiment_rollouts{experiment, variant, status}``, the
    rollouts enqueued under each variant of each experiment (A/B or canary).

    Cost: one ``HGETALL`` per experiment and one ``ZCARD`` per variant, in two
    pipelines; rollout records are never read.
    """
    from lightning_queue.experiments.manager import Experiments

    experiments = Experiments(client).all()
    pipe = client.redis.pipeline(transaction=False)
    labels = []
    for exp in experiments:
        for variant in exp.variants:
            pipe.zcard(client.keys.experiment_rollouts(exp.name, variant.name))
            labels.append([client.keys.prefix, exp.name, variant.name, exp.status])
    counts = pipe.execute() if labels else []
    family = GaugeMetricFamily("lq_experiment_rollouts", "Rollouts enqueued under each variant of each experiment.",
                               labels=["prefix", "experiment", "variant", "status"])
    for label, n in zip(labels, counts, strict=True):
        family.add_metric(label, n)
    yield family


def worker_liveness(client: LightningClient) -> dict[str, str]:
    """Each worker node's liveness judged by consumption (:mod:`lightning_queue.health`):
    ``node -> "consuming"`` or ``"stalled"`` (up, but it stopped taking messages)."""
    return {h.hostname: "stalled" if h.stalled else "consuming" for h in client.worker_health()}


# ------------------------------------------------------------------------------- one read


@dataclass(frozen=True)
class Overview:
    """The queue's state at one moment, read by :func:`read_overview`.

    ``rollouts_by_status`` and ``rollouts_by_resources`` count index entries:
    finished rollouts stay counted until their record expires and retention
    prunes the index (``LQ_ROLLOUT_TTL_SECONDS``).
    """

    rollouts_by_status: Mapping[str, int]
    queue_depth: dict[str, dict[int, int]]  # queue -> priority step -> messages waiting
    unacked: int  # messages taken by workers and not yet acked (acks late: running rollouts)
    pointers: dict[str, str]  # pointer name -> resources_id
    snapshots: int
    rollouts_by_resources: dict[str, int]  # the newest snapshots and every pointer target
    registry_seq: int
    retries_waiting: int = 0  # requeued rollouts waiting their backoff in the retry schedule
    dead_letters: int = 0  # malformed messages workers refused and set aside
    time: float = field(default_factory=time.time)

    def pointers_naming(self, resources_id: str) -> list[str]:
        return sorted(name for name, rid in self.pointers.items() if rid == resources_id)


def read_overview(client: LightningClient, queues: Sequence[str], max_snapshots: int = 50) -> Overview:
    """Read the queue's state in two pipelined round trips (see the module doc for the cost).
    The first (statuses, queues, pointers, snapshots) is one MULTI/EXEC, so its counts are
    consistent with each other (a rollout moving between statuses is counted once); the
    per-snapshot counts are read a moment later.

    ``rollouts_by_resources`` covers the ``max_snapshots`` most recently
    written snapshots plus every snapshot a pointer names. Raises
    ``redis.RedisError`` when Redis cannot be read.
    """
    if max_snapshots < 1:
        raise ValueError("max_snapshots must be >= 1")
    k = client.keys
    pipe = client.redis.pipeline(transaction=True)
    for status in ROLLOUT_STATUSES:
        pipe.zcard(k.rollouts_by_status(status))
    for queue in queues:
        for key in k.celery_queues(queue).values():
            pipe.llen(key)
    pipe.hlen(k.celery_unacked)
    pipe.hgetall(k.pointers)
    pipe.zcard(k.snapshots)
    pipe.zrevrange(k.snapshots, 0, max_snapshots - 1)
    pipe.get(k.seq)
    pipe.zcard(k.delayed)
    pipe.llen(k.dead_letters)
    replies = iter(pipe.execute())

    by_status: dict[str, int] = {status: int(next(replies)) for status in ROLLOUT_STATUSES}
    depth = {queue: {step: int(next(replies)) for step in k.celery_queues(queue)} for queue in queues}
    unacked = int(next(replies))
    pointers = {text(name): text(rid) for name, rid in next(replies).items()}
    snapshots = int(next(replies))
    newest_ids = [text(rid) for rid in next(replies)]
    seq = int(next(replies) or 0)
    retries_waiting, dead_letters = int(next(replies)), int(next(replies))

    shown = list(dict.fromkeys([*newest_ids, *sorted(set(pointers.values()))]))
    pipe = client.redis.pipeline(transaction=False)
    for rid in shown:
        pipe.zcard(k.rollouts_by_resources(rid))
    by_resources = dict(zip(shown, (int(n) for n in pipe.execute()), strict=True))
    return Overview(by_status, depth, unacked, pointers, snapshots, by_resources, seq, retries_waiting, dead_letters)


class CacheStatsReader:
    """:meth:`LightningClient.cache_stats` (or another ``read`` of the workers' reports),
    read at most once per ``every`` seconds (it SCANs for the workers' reports; they
    report only that often)."""

    def __init__(self, client: LightningClient, every: float,
                 read: Callable[[LightningClient], dict[str, Any]] | None = None) -> None:
        self.client = client
        self.every = every
        self._reader = read or (lambda c: c.cache_stats())
        self._read_at = float("-inf")
        self._stats: dict[str, Any] = {}
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._read_at >= self.every:
                self._stats = self._reader(self.client)
                self._read_at = time.monotonic()
            return self._stats


@dataclass(frozen=True)
class FleetCache:
    """The worker snapshot caches summed over the processes that report."""

    processes: int
    hits: int
    misses: int
    loads: int
    load_seconds: float

    @property
    def hit_ratio(self) -> float:
        gets = self.hits + self.misses
        return self.hits / gets if gets else 0.0

    @property
    def mean_load_seconds(self) -> float:
        return self.load_seconds / self.loads if self.loads else 0.0

    @classmethod
    def of(cls, stats: dict[str, dict[str, Any]]) -> FleetCache:
        values = list(stats.values())
        return cls(
            processes=len(values),
            hits=sum(int(s.get("hits", 0)) for s in values),
            misses=sum(int(s.get("misses", 0)) for s in values),
            loads=sum(int(s.get("load_count", 0)) for s in values),
            load_seconds=sum(float(s.get("load_seconds_total", 0.0)) for s in values),
        )


def node_of(process: str) -> str:
    """The Celery node name of a cache-stats process key (``node@host:pid`` -> ``node@host``)."""
    return process.rpartition(":")[0] or process


# ------------------------------------------------------------------------------- Prometheus


class LightningCollector(Collector):
    """A Prometheus collector that reads Redis at each scrape (see the module doc for the cost).

    Metrics (every name starts ``lq_``; the key prefix is the ``prefix`` label of each; the full table,
    with PromQL, is in docs/operations.md#monitoring):

    * ``lq_up`` 1 when Redis answered this scrape, else 0 (and nothing else is reported)
    * ``lq_rollouts{status}`` rollouts in each status index
    * ``lq_rollouts_by_resources{resources_id}`` rollouts pinned to or run with each snapshot
    * ``lq_pointer{pointer, resources_id}`` 1 for the snapshot each pointer names (join on resources_id)
    * ``lq_snapshots``; ``lq_registry_writes_total`` registry changes (the registry sequence, which only grows)
    * ``lq_queue_messages{queue, priority}`` messages waiting, per kombu priority sub-queue
    * ``lq_queue_unacked`` messages taken by workers and not acked yet (rollouts running or about to)
    * ``lq_retries_waiting`` requeued rollouts waiting their backoff in the retry schedule
    * ``lq_dead_letters`` malformed messages workers refused, in ``{p}:dead-letters``
    * from the aggregates every final transition updates (counted in Redis, so they survive exporter
      restarts and count every rollout): ``lq_rollouts_finished_total{status}``, the histograms
      ``lq_rollout_duration_seconds`` and ``lq_rollout_queue_wait_seconds``; per snapshot version
      (``resources_id``, ``version``) and per experiment variant (``experiment``, ``variant``):
      ``lq_{snapshot,variant}_rollouts_finished_total{status}``, ``lq_{snapshot,variant}_rollout_duration_seconds``
      (histogram), ``lq_{snapshot,variant}_reward`` (summary: ``_sum``, ``_count``) and its ``_min``/``_max``
      gauges; past the caps (``Settings.metrics_max_snapshot_versions``, ``metrics_max_variants``) the least
      recently finished are summed in the series labelled ``other``, counted by ``lq_metrics_series_folded_total{kind}``
    * per worker host (``worker`` = Celery's ``node@host``, summed over its live pool processes; no PID
      label, so pool restarts do not make new series): ``lq_snapshot_cache_hits_total``,
      ``lq_snapshot_cache_misses_total``, ``lq_snapshot_load_seconds`` (summary: ``_sum``, ``_count``),
      ``lq_snapshot_cache_bytes``, ``lq_snapshot_cache_entries``; ``lq_worker_processes`` the processes reporting
    * ``lq_worker_stalled{worker}`` 1 for a worker that is up but stopped consuming (see :mod:`.health`)
    * ``lq_experiment_rollouts{experiment, variant, status}`` from :func:`experiment_traffic_per_variant`
    """

    def __init__(
        self,
        client: LightningClient,
        queues: Sequence[str] | None = None,
        *,
        max_snapshots: int = 50,
        cache_stats_every: float | None = None,
        experiment_traffic: Callable[[LightningClient], Iterable[Metric]] = experiment_traffic_per_variant,
    ) -> None:
        self.client = client
        self.queues = list(queues or [client.settings.queue])
        self.max_snapshots = max_snapshots
        every = client.settings.cache_stats_interval_seconds if cache_stats_every is None else cache_stats_every
        self.cache_stats = CacheStatsReader(client, every)
        self.liveness = CacheStatsReader(client, every, read=worker_liveness)
        self.experiment_traffic = experiment_traffic

    def describe(self) -> Iterable[Metric]:
        return ()  # no read of Redis when the collector is registered

    def collect(self) -> Iterable[Metric]:
        prefix = self.client.keys.prefix
        up = GaugeMetricFamily("lq_up", "1 when Redis answered this scrape, else 0.", labels=["prefix"])
        try:
            overview = read_overview(self.client, self.queues, self.max_snapshots)
            final = read_final_metrics(self.client.redis, self.client.keys)
            stats = self.cache_stats.read()
        except redis.RedisError as exc:
            log.warning("scrape: cannot read Redis at %s: %s", redacted_url(self.client.settings.redis_url), exc)
            up.add_metric([prefix], 0)
            yield up
            return
        up.add_metric([prefix], 1)
        yield up
        yield from self._overview_metrics(prefix, overview)
        yield from final_metrics(prefix, final)
        yield from self._cache_metrics(prefix, stats)
        stalled = GaugeMetricFamily("lq_worker_stalled", "1 for a worker that is up but stopped consuming while "
                                    "messages wait (liveness judged by consumption), else 0.",
                                    labels=["prefix", "worker"])
        for worker, state in sorted(self.liveness.read().items()):
            stalled.add_metric([prefix, worker], 1 if state == "stalled" else 0)
        yield stalled
        try:
            yield from self.experiment_traffic(self.client)
        except Exception:  # a broken hook must not take the other metrics down
            log.exception("scrape: the experiment traffic hook failed")

    @staticmethod
    def _overview_metrics(prefix: str, o: Overview) -> Iterable[Metric]:
        by_status = GaugeMetricFamily("lq_rollouts", "Rollouts per status (finished ones until they expire).",
                                      labels=["prefix", "status"])
        for status, n in o.rollouts_by_status.items():
            by_status.add_metric([prefix, status], n)
        yield by_status
        by_resources = GaugeMetricFamily("lq_rollouts_by_resources",
                                         "Rollouts pinned to or run with each snapshot (newest snapshots and "
                                         "pointer targets).", labels=["prefix", "resources_id"])
        for rid, n in o.rollouts_by_resources.items():
            by_resources.add_metric([prefix, rid], n)
        yield by_resources
        pointer = GaugeMetricFamily("lq_pointer", "1 for the snapshot each pointer names.",
                                    labels=["prefix", "pointer", "resources_id"])
        for name, rid in sorted(o.pointers.items()):
            pointer.add_metric([prefix, name, rid], 1)
        yield pointer
        yield _gauge("lq_snapshots", "Snapshots in the registry.", prefix, o.snapshots)
        writes = CounterMetricFamily("lq_registry_writes", "Registry changes so far (snapshot writes, pointer moves, "
                                     "deletes): the registry sequence, which only grows.", labels=["prefix"])
        writes.add_metric([prefix], o.registry_seq)
        yield writes
        depth = GaugeMetricFamily("lq_queue_messages", "Messages waiting in each Celery queue, per priority step.",
                                  labels=["prefix", "queue", "priority"])
        for queue, steps in o.queue_depth.items():
            for step, n in steps.items():
                depth.add_metric([prefix, queue, str(step)], n)
        yield depth
        yield _gauge("lq_queue_unacked", "Messages workers took and have not acked (rollouts running or about to).",
                     prefix, o.unacked)
        yield _gauge("lq_retries_waiting", "Requeued rollouts waiting their backoff in the retry schedule.", prefix,
                     o.retries_waiting)
        yield _gauge("lq_dead_letters", "Malformed messages workers refused and set aside in {prefix}:dead-letters.",
                     prefix, o.dead_letters)

    @staticmethod
    def _cache_metrics(prefix: str, stats: dict[str, dict[str, Any]]) -> Iterable[Metric]:
        yield _gauge("lq_worker_processes", "Worker processes that reported snapshot-cache stats recently.",
                     prefix, len(stats))
        by_node: dict[str, dict[str, dict[str, Any]]] = {}
        for process, s in stats.items():
            by_node.setdefault(node_of(process), {})[process] = s
        labels = ["prefix", "worker"]
        hits = CounterMetricFamily("lq_snapshot_cache_hits", "Snapshot-cache hits of the worker's live pool "
                                   "processes (summed per worker host).", labels=labels)
        misses = CounterMetricFamily("lq_snapshot_cache_misses", "Snapshot-cache misses of the worker's live pool "
                                     "processes (summed per worker host).", labels=labels)
        loads = SummaryMetricFamily("lq_snapshot_load_seconds", "Time the worker's processes spent loading "
                                    "snapshots from Redis (cache misses), and how many loads.", labels=labels)
        size = GaugeMetricFamily("lq_snapshot_cache_bytes", "Bytes in the worker's snapshot caches.", labels=labels)
        entries = GaugeMetricFamily("lq_snapshot_cache_entries", "Snapshots in the worker's snapshot caches.",
                                    labels=labels)
        for node, processes in sorted(by_node.items()):
            fleet = FleetCache.of(processes)
            hits.add_metric([prefix, node], fleet.hits)
            misses.add_metric([prefix, node], fleet.misses)
            loads.add_metric([prefix, node], fleet.loads, fleet.load_seconds)
            size.add_metric([prefix, node], sum(float(s.get("bytes", 0)) for s in processes.values()))
            entries.add_metric([prefix, node], sum(float(s.get("entries", 0)) for s in processes.values()))
        yield from (hits, misses, loads, size, entries)


def final_metrics(prefix: str, m: FinalMetrics) -> Iterable[Metric]:
    """The Prometheus families of the aggregates the final transitions keep (see :class:`LightningCollector`)."""
    finished = CounterMetricFamily("lq_rollouts_finished", "Rollouts that reached each final status.",
                                   labels=["prefix", "status"])
    for status in sorted(TERMINAL_STATUSES):
        finished.add_metric([prefix, status], m.totals.finished.get(status, 0))
    yield finished
    yield _histogram("lq_rollout_duration_seconds", "Rollout duration: start of its first attempt to its final "
                     "status (rollouts that started).", ["prefix"], [([prefix], m.totals.duration)])
    yield _histogram("lq_rollout_queue_wait_seconds", "Time from enqueue to the start of the first attempt.",
                     ["prefix"], [([prefix], m.queue_wait)])
    yield from _series_metrics("snapshot", "snapshot version it ran with", ["resources_id", "version"], prefix,
                               m.snapshots)
    yield from _series_metrics("variant", "experiment variant", ["experiment", "variant"], prefix, m.variants)
    folded = CounterMetricFamily("lq_metrics_series_folded", "Series (snapshot versions, variants) folded into the "
                                 "'other' series past their cap.", labels=["prefix", "kind"])
    for kind in ("snapshot", "variant"):
        folded.add_metric([prefix, kind], m.folded.get(kind, 0))
    yield folded


def _series_metrics(kind: str, per: str, names: list[str], prefix: str,
                    series: Mapping[tuple[str, str], Series]) -> Iterable[Metric]:
    labels = ["prefix", *names]
    finished = CounterMetricFamily(f"lq_{kind}_rollouts_finished", f"Rollouts finished per {per} and final status.",
                                   labels=[*labels, "status"])
    reward = SummaryMetricFamily(f"lq_{kind}_reward", f"Rewards of succeeded rollouts per {per}.", labels=labels)
    low = GaugeMetricFamily(f"lq_{kind}_reward_min", f"Lowest reward per {per}.", labels=labels)
    high = GaugeMetricFamily(f"lq_{kind}_reward_max", f"Highest reward per {per}.", labels=labels)
    for key, s in sorted(series.items()):
        values = [prefix, *key]
        for status, n in sorted(s.finished.items()):
            finished.add_metric([*values, status], n)
        reward.add_metric(values, s.reward_count, s.reward_sum)
        if s.reward_min is not None and s.reward_max is not None:
            low.add_metric(values, s.reward_min)
            high.add_metric(values, s.reward_max)
    yield finished
    yield _histogram(f"lq_{kind}_rollout_duration_seconds", f"Rollout duration per {per}.", labels,
                     [([prefix, *key], s.duration) for key, s in sorted(series.items())])
    yield from (reward, low, high)


def _histogram(name: str, documentation: str, labels: list[str],
               rows: Iterable[tuple[list[str], Histogram]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, h in rows:
        family.add_metric(values, h.cumulative(), h.sum)
    return family


def _gauge(name: str, documentation: str, prefix: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["prefix"])
    gauge.add_metric([prefix], value)
    return gauge


def exporter_registry(collector: LightningCollector) -> CollectorRegistry:
    """A registry holding only ``collector`` (no process metrics of the exporter itself)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


# ------------------------------------------------------------------------------- the exporter


class Exporter:
    """The Prometheus endpoint of ``lightning-queue exporter``: an HTTP server thread
    serving ``/metrics`` from a :class:`LightningCollector`. Starts even when Redis is down
    (``lq_up`` is then 0)."""

    def __init__(
        self,
        client: LightningClient,
        port: int = DEFAULT_EXPORTER_PORT,
        address: str = "127.0.0.1",
        queues: Sequence[str] | None = None,
        max_snapshots: int = 50,
    ) -> None:
        from prometheus_client import start_http_server

        self.client = client
        self.collector = LightningCollector(client, queues, max_snapshots=max_snapshots)
        self._server, self._thread = start_http_server(port, address, registry=exporter_registry(self.collector))
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
