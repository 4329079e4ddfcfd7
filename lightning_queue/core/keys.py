"""The whole Redis keyspace of lightning-queue, under one configurable prefix.

Snapshot registry::

    {p}:snapshot:{resources_id}       hash   the current version: resources (payload), encoding, checksum,
                                             size, version, create_time, update_time, meta (JSON: message,
                                             author, tags), parent_id and parent_version (when it has a parent)
    {p}:snapshot:{resources_id}:v:{n} hash   an earlier version n, unchanged since it was replaced
    {p}:snapshots                     zset   resources_id -> sequence of its last write (newest = highest)
    {p}:pointers                      hash   pointer name ("latest", "prod", ...) -> resources_id
    {p}:pointer-history:{name}        list   the pointer's last moves, newest first (JSON: from, to, time, by
                                             (the actor), op, reason; entries of earlier releases have only
                                             from, to, time and by, which then held the operation)
    {p}:pointer-protection            hash   protected pointer name -> JSON (reason, by, time); such a pointer
                                             moves only when forced with a reason (checked in the moving script)
    {p}:seq                           string registry sequence: bumped by every write, move and delete
    {p}:epoch                         string the registry's epoch: a random id written once, by the first write
                                             (:mod:`lightning_queue.storage.epoch`); gone or changed = Redis
                                             lost its data
    {p}:snapshot-events               pub/sub JSON of each registry change (worker caches listen)
    {p}:cache-stats:{worker}:{pid}    string JSON stats of one worker process's snapshot cache (expires)

Rollout store::

    {p}:rollout:{rollout_id}             hash  the Rollout record, one field per set model field (see store.py); expires
                                               ``rollout_ttl_seconds`` after the rollout finishes
    {p}:rollout:{rollout_id}:attempt:{n} hash  attempt n (1-based) of that rollout; expires with it. A trace
                                               that is the root span alone is kept here as a few ``root*``
                                               fields instead of a spans list (storage/traces.py ROOT_FIELDS)
    {p}:rollout:{rollout_id}:attempt:{n}:spans
                                         list  that attempt's trace: span batches (the worker's, written with
                                               the finish; one per proxy call), see storage/traces.py; expires
                                               with the rollout
    {p}:rollouts                         zset  rollout_id -> enqueue time
    {p}:rollouts:status:{status}         zset  rollout_id -> enqueue time, one per status
    {p}:rollouts:mode:{mode}             zset  rollout_id -> enqueue time
    {p}:rollouts:resources:{id}          zset  rollouts pinned to, or run with, that snapshot
    {p}:rollouts:worker:{worker_id}      zset  rollouts that worker ran an attempt of
    {p}:rollouts:ended                   zset  rollout_id -> end time, every rollout that reached a final
                                               status (queries by end time read it)
    {p}:finished                         stream one entry per rollout reaching a final status (fields
                                               ``id``, ``status``), in that order: the resumable cursor of
                                               :meth:`RolloutStore.finished_rollouts` (the entry id is the
                                               cursor). Trimmed (approximately) to ``rollout_ttl_seconds``:
                                               an entry lives as long as the record it names; kept whole
                                               when rollouts are kept forever
    {p}:query:{token}                    zset  scratch of one query (the union of the indexes it walks):
                                               written and deleted inside one script, never seen outside
    {p}:events                           pub/sub channel; a finished rollout's id is published
    {p}:heartbeats                       zset  rollout_id -> deadline of its open attempt's heartbeat
                                               (the watchdog reads only the expired head)
    {p}:watchdog                         hash  the fleet's sweeps: ``last`` (Redis time of the last one) and
                                               ``hold`` (no attempt is presumed dead before this Redis time:
                                               set after a gap in the sweeps, i.e. an outage)
    {p}:pending                          zset  rollout_id -> when the reaper next looks for its task message;
                                               every queuing or requeuing rollout is in it (written with the
                                               record, removed by the claim; the reaper reads only the due head)
    {p}:delayed                          zset  rollout_id -> when its retry is due: the backoff of a requeued
                                               rollout, waited here (not in an ETA message held by a worker)

LLM usage rollups (calls, tokens, cost; see core/traces.py ``Usage``)::

    {p}:usage:snapshot:{resources_id}    hash  "{version}:{field}" -> total of that version's attempts;
                                               deleted with the snapshot
    {p}:experiment:{name}:usage          hash  "{variant}:{field}" -> total of that variant's attempts

Workers::

    {p}:worker:{hostname}                string JSON health of one worker's main process (last message
                                               received, active, concurrency, queues); expires

The last two index zsets and the stream are written by the Lua script that moves a rollout to a
final status, in the same atomic step (``lua/_finished_stream.lua``).
The ``rollouts*`` indexes outlive expired records: readers skip ids whose record is gone,
and retention (:mod:`lightning_queue.retention`) prunes them.

Experiments (:mod:`lightning_queue.experiments`)::

    {p}:experiments                               zset  experiment name -> create time
    {p}:experiment:{name}                         hash  spec (JSON: variants, weights, unit key, salt,
                                                        coverage...), status, bucket_version, revision, concluded,
                                                        start_time, stop_time, stop_reason, winner
    {p}:experiment:{name}:rollouts:{variant}      zset  rollout ids enqueued under that variant -> enqueue time
    {p}:experiment:{name}:units:{variant}         set   the units assigned to that variant
    {p}:experiment:{name}:tally:{variant}         hash  running counts of that variant's finished rollouts:
                                                        finished, succeeded, failed, cancelled, rewarded,
                                                        reward_sum, reward_sumsq, error:{type}
    {p}:experiment:{name}:rewards:{variant}       string one line "end_time reward latency" per finished
                                                        rollout (reward "nan" unless it succeeded with one)
    {p}:experiment:{name}:unit-rewards:{variant}  hash  unit -> "count sum last_end_time" of its rewards

The last three are written by the Lua script that moves a rollout of the experiment to a final
status, in the same atomic step (``lua/_experiment_tally.lua``), so a report reads aggregates
instead of every rollout record.

Prometheus aggregates, written by every final transition in the same atomic step
(``lua/_final_metrics.lua``); the exporter reads them in a bounded number of round trips::

    {p}:metrics                                hash  the whole queue: n:{status} rollouts finished per
                                                     final status, d:{i}/ds the duration histogram (bucket i
                                                     of core/metrics.py DURATION_BUCKETS, not cumulative; sum),
                                                     w:{i}/ws queue wait likewise, folded:snapshot and
                                                     folded:variant series folded into "other" so far
    {p}:metrics:snapshots                      zset  "{resources_id}:{version}" -> end time of its last finished
                                                     rollout: the snapshot versions with series of their own
                                                     (at most Settings.metrics_max_snapshot_versions)
    {p}:metrics:snapshot:{resources_id}:{version}
                                               hash  n:{status}, d:{i}, ds, and rn/rs/rmin/rmax (rewards: count,
                                                     sum, min, max) of the rollouts that ran with that version
    {p}:metrics:snapshot:other                 hash  the same, summed over the versions folded past the cap
    {p}:metrics:variants                       zset  "{experiment}:{variant}" -> end time of its last finished
                                                     rollout (at most Settings.metrics_max_variants)
    {p}:metrics:variant:{experiment}:{variant} hash  as a snapshot version's, for an experiment's variant
    {p}:metrics:variant:other                  hash  the same, summed over the variants folded past the cap

Training runs (:mod:`lightning_queue.training`)::

    {p}:training:{run}                            hash  what a run has decided so far, so a new process with
                                                        the run's name resumes it: its start, each round's
                                                        critiques and candidates, its beam, rollouts spent

Celery's broker keys (queues, unacked messages, pidbox) live under ``{p}:celery:``
through kombu's ``global_keyprefix`` transport option::

    {p}:celery:{queue}                 list  the queue's messages (priority 0, the default)
    {p}:celery:{queue}\x06\x16{n}       list  its priority sub-queue n (3, 6, 9), when priorities are used
    {p}:celery:unacked                 hash  messages workers took and have not acked yet (acks late:
                                             the rollouts running or about to)
    {p}:dead-letters                   list  messages workers refused as malformed (JSON, newest first:
                                             time, queue, worker, reason, size, the message's first 64 KiB)

Queue names become broker keys, so :func:`check_queue_name` refuses those that collide with
kombu's own keys under ``{p}:celery:``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lightning_queue.core.errors import InvalidQueueNameError
from lightning_queue.core.models import ROLLOUT_STATUSES

# kombu's Redis transport: a queue's priority sub-queues are "{queue}{sep}{step}" for each
# step but 0 (kombu.transport.redis.PRIORITY_STEPS and Channel.sep; a unit test keeps them equal).
CELERY_PRIORITY_STEPS = (0, 3, 6, 9)
CELERY_PRIORITY_SEP = "\x06\x16"

# Celery task names, defined once: workers register them, publishers name them.
ROLLOUT_TASK = "lightning_queue.rollout"
RETENTION_TASK = "lightning_queue.retention"

KEY_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
"""Key prefixes: 1-100 letters, digits, ``.``, ``_`` and ``-``. No ``:``, so one prefix's keys (all
``{prefix}:...``) never start with another prefix followed by ``:`` and the ACL rule ``~P:* &P:*``
matches exactly prefix ``P``'s keys and channels; no glob characters (``*?[]\\``), so ``{prefix}:*``
in SCAN and ACL patterns means what it says."""


QUEUE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""Queue names: 1-100 letters, digits and ``._-``, starting with a letter or digit (so never
kombu's ``_kombu.*`` keys, and never the priority separator)."""

# kombu's Redis transport keeps these under the same prefix as the queue lists (its unacked
# hash, index and mutex; Celery's remote-control and event exchanges): a queue of that name
# would be a list where a worker expects a hash, and every worker would fail on its next message.
RESERVED_QUEUE_NAMES = frozenset({"unacked", "unacked_index", "unacked_mutex"})
RESERVED_QUEUE_SUFFIXES = (".pidbox",)
RESERVED_QUEUE_PREFIXES = ("celeryev",)


def check_queue_name(name: str) -> str:
    """Return ``name`` if it can name a rollout queue, else raise :class:`InvalidQueueNameError`."""
    if not isinstance(name, str) or not re.match(QUEUE_NAME_PATTERN, name):
        raise InvalidQueueNameError(name, "use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if name in RESERVED_QUEUE_NAMES or name.endswith(RESERVED_QUEUE_SUFFIXES) \
            or name.startswith(RESERVED_QUEUE_PREFIXES):
        raise InvalidQueueNameError(name, "the broker keeps its own keys under that name, pick another")
    return name


@dataclass(frozen=True)
class Keys:
    """Every key and channel of one prefix (see :data:`KEY_PREFIX_PATTERN` for what a prefix may hold)."""

    prefix: str = "lq"

    def __post_init__(self) -> None:
        if not KEY_PREFIX_PATTERN.match(self.prefix):
            raise ValueError(
                f"key prefix {self.prefix!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (no ':', so no prefix can reach into another's keys)"
            )

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
    def pointer_protection(self) -> str:
        return f"{self.prefix}:pointer-protection"

    @property
    def snapshot_events(self) -> str:
        return f"{self.prefix}:snapshot-events"

    @property
    def seq(self) -> str:
        return f"{self.prefix}:seq"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    # -- rollout store --------------------------------------------------------
    ROLLOUT_INFIX = ":rollout:"

    @property
    def rollout_prefix(self) -> str:
        return f"{self.prefix}{self.ROLLOUT_INFIX}"

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
    def rollouts_ended(self) -> str:
        return f"{self.prefix}{self.ENDED_SUFFIX}"

    # The final-transition scripts (lua/_finished_stream.lua) derive these two from the rollout
    # key's prefix, as the experiment tally does; scripts.py spells the suffixes in.
    ENDED_SUFFIX = ":rollouts:ended"
    FINISHED_SUFFIX = ":finished"

    @property
    def finished(self) -> str:
        return f"{self.prefix}{self.FINISHED_SUFFIX}"

    def query_scratch(self, token: str) -> str:
        return f"{self.prefix}:query:{token}"

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

    @property
    def watchdog(self) -> str:
        return f"{self.prefix}:watchdog"

    @property
    def pending(self) -> str:
        return f"{self.prefix}:pending"

    @property
    def delayed(self) -> str:
        return f"{self.prefix}:delayed"

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

    EXPERIMENT_INFIX = ":experiment:"
    # The tally script (lua/_experiment_tally.lua) gets these spelled in by scripts.py.
    TALLY_INFIX = ":tally:"
    REWARDS_INFIX = ":rewards:"
    UNIT_REWARDS_INFIX = ":unit-rewards:"

    def experiment(self, name: str) -> str:
        return f"{self.prefix}{self.EXPERIMENT_INFIX}{name}"

    def experiment_rollouts(self, name: str, variant: str) -> str:
        return f"{self.experiment(name)}:rollouts:{variant}"

    def experiment_units(self, name: str, variant: str) -> str:
        return f"{self.experiment(name)}:units:{variant}"

    def experiment_tally(self, name: str, variant: str) -> str:
        return f"{self.experiment(name)}{self.TALLY_INFIX}{variant}"

    def experiment_rewards(self, name: str, variant: str) -> str:
        return f"{self.experiment(name)}{self.REWARDS_INFIX}{variant}"

    def experiment_unit_rewards(self, name: str, variant: str) -> str:
        return f"{self.experiment(name)}{self.UNIT_REWARDS_INFIX}{variant}"

    # -- Prometheus aggregates --------------------------------------------------------
    # The final-transition scripts (lua/_final_metrics.lua) get these spelled in by scripts.py.
    METRICS_INFIX = ":metrics"
    METRICS_SNAPSHOTS_SUFFIX = ":snapshots"
    METRICS_SNAPSHOT_SUFFIX = ":snapshot:"
    METRICS_VARIANTS_SUFFIX = ":variants"
    METRICS_VARIANT_SUFFIX = ":variant:"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}{self.METRICS_INFIX}"

    @property
    def metrics_snapshots(self) -> str:
        return f"{self.metrics}{self.METRICS_SNAPSHOTS_SUFFIX}"

    def metrics_snapshot(self, member: str) -> str:
        """A snapshot version's aggregates: ``member`` is ``"{resources_id}:{version}"`` or ``"other"``."""
        return f"{self.metrics}{self.METRICS_SNAPSHOT_SUFFIX}{member}"

    @property
    def metrics_variants(self) -> str:
        return f"{self.metrics}{self.METRICS_VARIANTS_SUFFIX}"

    def metrics_variant(self, member: str) -> str:
        """A variant's aggregates: ``member`` is ``"{experiment}:{variant}"`` or ``"other"``."""
        return f"{self.metrics}{self.METRICS_VARIANT_SUFFIX}{member}"

    # -- training runs -----------------------------------------------------------
    def training_run(self, name: str) -> str:
        return f"{self.prefix}:training:{name}"

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
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead-letters"

    @property
    def pattern(self) -> str:
        """Glob matching every key this prefix owns (used by tests to clean up)."""
        return f"{self.prefix}:*"
