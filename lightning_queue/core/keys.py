"""The whole Redis keyspace of lightning-queue, under one configurable prefix.

Snapshot registry::

    {p}:snapshot:{resources_id}       hash   the current version: resources (payload), encoding, checksum,
                                             size, version, create_time, update_time
    {p}:snapshot:{resources_id}:v:{n} hash   an earlier version n, unchanged since it was replaced
    {p}:snapshots                     zset   resources_id -> sequence of its last write (newest = highest)
    {p}:pointers                      hash   pointer name ("latest", "prod", ...) -> resources_id
    {p}:pointer-history:{name}        list   the pointer's last moves, newest first (JSON: from, to, time, by)
    {p}:seq                           string registry sequence: bumped by every write, move and delete
    {p}:snapshot-events               pub/sub JSON of each registry change (worker caches listen)
    {p}:cache-stats:{worker}:{pid}    string JSON stats of one worker process's snapshot cache (expires)

Rollout store::

    {p}:rollout:{rollout_id}             hash  the Rollout record, one field per set model field (see store.py); expires
                                               ``rollout_ttl_seconds`` after the rollout finishes
    {p}:rollout:{rollout_id}:attempt:{n} hash  attempt n (1-based) of that rollout; expires with it
    {p}:rollout:{rollout_id}:attempt:{n}:spans
                                         list  that attempt's trace: span batches (the worker's, written with
                                               the finish; one per proxy call), see storage/traces.py; expires
                                               with the rollout
    {p}:rollouts                         zset  rollout_id -> enqueue time
    {p}:rollouts:status:{status}         zset  rollout_id -> enqueue time, one per status
    {p}:rollouts:mode:{mode}             zset  rollout_id -> enqueue time
    {p}:rollouts:resources:{id}          zset  rollouts pinned to, or run with, that snapshot
    {p}:rollouts:worker:{worker_id}      zset  rollouts that worker ran an attempt of
    {p}:events                           pub/sub channel; a finished rollout's id is published
    {p}:heartbeats                       zset  rollout_id -> deadline of its open attempt's heartbeat
                                               (the watchdog reads only the expired head)

LLM usage rollups (calls, tokens, cost; see core/traces.py ``Usage``)::

    {p}:usage:snapshot:{resources_id}    hash  "{version}:{field}" -> total of that version's attempts;
                                               deleted with the snapshot
    {p}:experiment:{name}:usage          hash  "{variant}:{field}" -> total of that variant's attempts

Workers::

    {p}:worker:{hostname}                string JSON health of one worker's main process (last message
                                               received, active, concurrency, queues); expires

The ``rollouts*`` indexes outlive expired records: readers skip ids whose record is gone,
and retention (:mod:`lightning_queue.retention`) prunes them.

Experiments (:mod:`lightning_queue.experiments`)::

    {p}:experiments                               zset  experiment name -> create time
    {p}:experiment:{name}                         hash  spec (JSON: variants, weights, unit key, salt,
                                                        coverage...), status, bucket_version, revision, concluded,
                                                        start_time, stop_time, stop_reason, winner
    {p}:experiment:{name}:rollouts:{variant}      zset  rollout ids enqueued under that variant -> enqueue time
    {p}:experiment:{name}:units:{variant}         set   the units assigned to that variant

Celery's broker keys (queues, unacked messages, pidbox) live under ``{p}:celery:``
through kombu's ``global_keyprefix`` transport option::

    {p}:celery:{queue}                 list  the queue's messages (priority 0, the default)
    {p}:celery:{queue}\x06\x16{n}       list  its priority sub-queue n (3, 6, 9), when priorities are used
    {p}:celery:unacked                 hash  messages workers took and have not acked yet (acks late:
                                             the rollouts running or about to)
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_queue.core.models import ROLLOUT_STATUSES

# kombu's Redis transport: a queue's priority sub-queues are "{queue}{sep}{step}" for each
# step but 0 (kombu.transport.redis.PRIORITY_STEPS and Channel.sep; a unit test keeps them equal).
CELERY_PRIORITY_STEPS = (0, 3, 6, 9)
CELERY_PRIORITY_SEP = "\x06\x16"

# Celery task names, defined once: workers register them, publishers name them.
ROLLOUT_TASK = "lightning_queue.rollout"
RETENTION_TASK = "lightning_queue.retention"



@dataclass(frozen=True)
class Keys:
    prefix: str = "lq"

    # -- snapshot registry --------------------------------------------------
    @property
    def snapshot_prefix(self) -> str:
        return f"{self.prefix}:snapshot:"

    def snapshot(self, resources_id: str) -> str:
        return f"{self.snapshot_prefix}{resources_id}"

    @property
    def snapshots(self) -> str:
        return f"{self.prefix}:snapshots"

    VERSION_INFIX = ":v:"

    def snapshot_version_prefix(self, resources_id: str) -> str:
        return f"{self.snapshot(resources_id)}{self.VERSION_INFIX}"

    def snapshot_version(self, resources_id: str, version: int) -> str:
        return f"{self.snapshot_version_prefix(resources_id)}{version}"

    @property
    def pointers(self) -> str:
        return f"{self.prefix}:pointers"

    @property
    def pointer_history_prefix(self) -> str:
        return f"{self.prefix}:pointer-history:"

    def pointer_history(self, name: str) -> str:
        return f"{self.pointer_history_prefix}{name}"

    @property
    def snapshot_events(self) -> str:
        return f"{self.prefix}:snapshot-events"

    @property
    def seq(self) -> str:
        return f"{self.prefix}:seq"

    # -- rollout store --------------------------------------------------------
    @property
    def rollout_prefix(self) -> str:
        return f"{self.prefix}:rollout:"

    def rollout(self, rollout_id: str) -> str:
        return f"{self.rollout_prefix}{rollout_id}"

    ATTEMPT_INFIX = ":attempt:"

    def attempt_prefix(self, rollout_id: str) -> str:
        return f"{self.rollout(rollout_id)}{self.ATTEMPT_INFIX}"

    def attempt(self, rollout_id: str, sequence_id: int) -> str:
        return f"{self.attempt_prefix(rollout_id)}{sequence_id}"

    SPANS_SUFFIX = ":spans"

    def attempt_spans(self, rollout_id: str, sequence_id: int) -> str:
        """The attempt's trace (the Lua scripts that expire a rollout derive it the same way)."""
        return f"{self.attempt(rollout_id, sequence_id)}{self.SPANS_SUFFIX}"

    # -- LLM usage rollups -----------------------------------------------------------
    def usage_by_version(self, resources_id: str) -> str:
        return f"{self.prefix}:usage:snapshot:{resources_id}"

    def usage_by_variant(self, experiment: str) -> str:
        return f"{self.experiment(experiment)}:usage"

    @property
    def rollouts(self) -> str:
        return f"{self.prefix}:rollouts"

    def rollouts_by_status(self, status: str) -> str:
        return f"{self.prefix}:rollouts:status:{status}"

    def all_status_indexes(self) -> list[str]:
        """The status index keys, in ``ROLLOUT_STATUSES`` order (Lua scripts rely on it)."""
        return [self.rollouts_by_status(s) for s in ROLLOUT_STATUSES]

    def rollouts_by_mode(self, mode: str) -> str:
        return f"{self.prefix}:rollouts:mode:{mode}"

    def rollouts_by_resources(self, resources_id: str) -> str:
        return f"{self.prefix}:rollouts:resources:{resources_id}"

    def rollouts_by_worker(self, worker_id: str) -> str:
        return f"{self.prefix}:rollouts:worker:{worker_id}"

    @property
    def rollout_index_pattern(self) -> str:
        """Glob matching every rollout index zset (``{p}:rollouts`` and ``{p}:rollouts:*``)."""
        return f"{self.prefix}:rollouts*"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def heartbeats(self) -> str:
        return f"{self.prefix}:heartbeats"

    # -- worker health ---------------------------------------------------------------
    def worker_health(self, hostname: str) -> str:
        return f"{self.prefix}:worker:{hostname}"

    @property
    def worker_health_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    # -- worker-side snapshot caches ---------------------------------------------------
    def cache_stats(self, process: str) -> str:
        return f"{self.prefix}:cache-stats:{process}"

    @property
    def cache_stats_pattern(self) -> str:
        return f"{self.prefix}:cache-stats:*"

    # -- experiments ---------------------------------------------------------------
    @property
    def experiments(self) -> str:
        return f"{self.prefix}:experiments"

    def experiment(self, name: str) -> str:
        return f"{self.prefix}:experiment:{name}"

    def experiment_rollouts(self, name: str, variant: str) -> str:
        return f"{self.experiment(name)}:rollouts:{variant}"

    def experiment_units(self, name: str, variant: str) -> str:
        return f"{self.experiment(name)}:units:{variant}"

    # -- celery -----------------------------------------------------------------
    @property
    def celery_prefix(self) -> str:
        return f"{self.prefix}:celery:"

    def celery_queue(self, queue: str, priority: int = 0) -> str:
        """The Redis list holding ``queue``'s messages of one priority step (what
        ``LLEN`` measures, and what a KEDA Redis trigger's ``listName`` must be)."""
        suffix = f"{CELERY_PRIORITY_SEP}{priority}" if priority else ""
        return f"{self.celery_prefix}{queue}{suffix}"

    def celery_queues(self, queue: str) -> dict[int, str]:
        """Every priority step of ``queue`` -> its list key."""
        return {step: self.celery_queue(queue, step) for step in CELERY_PRIORITY_STEPS}

    @property
    def celery_unacked(self) -> str:
        return f"{self.celery_prefix}unacked"

    @property
    def pattern(self) -> str:
        """Glob matching every key this prefix owns (used by tests to clean up)."""
        return f"{self.prefix}:*"
