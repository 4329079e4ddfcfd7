"""The rollout store: rollout and attempt records on Redis, and their status machine.

Statuses::

    queuing -> preparing -> running -> succeeded | failed
                                    \\-> requeuing -> preparing ... (retry while attempts remain)
    any non-final status -> cancelled

Attempt statuses: ``preparing -> running -> succeeded | failed | timeout``, or
closed from outside: ``worker_lost`` (its message came back and its heartbeat
had expired), ``unresponsive`` (the watchdog found its heartbeat expired),
``cancelled``. Only the rollout's current, open attempt may record an outcome
(fencing): a late report from a closed or superseded attempt is refused.

Every transition is one Lua script, so readers never see a rollout in two
status indexes or a finished rollout without its result. A rollout that
reaches a final status has its id published on the events channel, which
:meth:`RolloutStore.wait_for_rollouts` listens to, appended to the
finished-rollouts stream (:meth:`RolloutStore.finished_rollouts`) and the
end-time index, and (when a TTL is set) its record and attempts expire that
many seconds later, all in the same step.

Layout: a record holds one hash field per model field, except the rollout id
(its key's) and the fields at their default (``metadata``, ``error``, ``result``
when empty, ``mode`` ``train``, ``resolve`` ``following``; ``config`` stores only
what differs from :class:`RolloutConfig`'s defaults), and a result
is stored without its ``None`` fields, once: on the rollout when the outcome
is accepted (:meth:`RolloutStore.get_attempts` gives it to the attempt that
finished the rollout), on the attempt when it was refused because the
rollout had been cancelled. So a typical finished record and its attempt
keep every value under Redis's ``hash-max-listpack-value`` (64 bytes) and
stay compact listpacks (about half the memory of a hash table). The snapshot the
last started attempt ran with (``ran_resources_id``, ``ran_resources_version``) is
one field, ``ran`` = ``"{version}:{resources_id}"``, written by the claim or the
start script (and read in that form by the final-transition scripts).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Unpack, cast

import redis

from lightning_queue.core.errors import (
    ExperimentNotFoundError,
    InvalidCursorError,
    InvalidFilterError,
    RegistryLostError,
    RolloutNotFoundError,
    UnresponsiveAttemptError,
    WorkerLostError,
)
from lightning_queue.core.keys import Keys
from lightning_queue.core.metrics import SeriesCaps
from lightning_queue.core.models import (
    ROLLOUT_STATUSES,
    Attempt,
    ErrorInfo,
    Rollout,
    RolloutConfig,
    RolloutResult,
    RolloutStatus,
    check_rollout_id,
    new_id,
)
from lightning_queue.core.policy import NextStatus, next_status
from lightning_queue.core.queries import (
    FilterFields,
    FinishedPage,
    FinishedRollout,
    RolloutFilter,
    RolloutPage,
)
from lightning_queue.core.traces import Usage
from lightning_queue.storage.connections import text
from lightning_queue.storage.epoch import RegistryEpoch, RegistryMark, propose
from lightning_queue.storage.pending import PendingIndex
from lightning_queue.storage.scripts import load_script
from lightning_queue.storage.traces import ROOT_FIELDS, TraceWrite
from lightning_queue.storage.waiting import WaitConnections, Waiter, wait

log = logging.getLogger(__name__)

# Fields stored as plain strings (Lua scripts read and write them); the rest are JSON.
_PLAIN_ROLLOUT_FIELDS = frozenset(
    {"rollout_id", "status", "queue", "resources_id", "resources_version", "resolve", "attempt_count",
     "enqueue_time", "start_time", "end_time", "published", "missing", "resends", "traceparent", "ran"}
)
# Fields of the record that are bookkeeping, not model fields: ``published`` (idempotent enqueue sent the
# message), ``missing`` and ``resends`` (the reaper found the task message missing; see storage/pending.py).
_BOOKKEEPING_FIELDS = ("published", "missing", "resends")
_PLAIN_ATTEMPT_FIELDS = frozenset(
    {"rollout_id", "sequence_id", "attempt_id", "worker_id", "status", "start_time", "end_time",
     "resources_id", "resources_version"}
)



# JSON fields left out while they hold their default (decoding restores it), so that a
# typical record's values all stay under Redis's ``hash-max-listpack-value`` (64 bytes) and
# Redis keeps the hash as a compact listpack instead of a hash table (about half the memory).
# ``input`` is always stored (``None`` is not its default), ``mode`` unless it is its default.
# (``config`` and ``result`` are written by :func:`encode_rollout` in their own compact forms.)
_OMITTED_WHEN_DEFAULT: dict[str, Any] = {"metadata": {}, "error": None, "mode": Rollout.model_fields["mode"].default}
_DEFAULT_RESOLVE = Rollout.model_fields["resolve"].default  # a plain field, left out at its default too


def _encode(data: Mapping[str, Any], plain: frozenset[str]) -> dict[str, str]:
    # A plain field that is None is left out (the Lua scripts test for its absence); a JSON
    # field keeps its None as ``null``, or ``input=None``/``mode=None`` would not read back.
    out = {}
    for key, value in data.items():
        if key in plain:
            if value is not None:
                out[key] = str(value)
        elif key not in _OMITTED_WHEN_DEFAULT or value != _OMITTED_WHEN_DEFAULT[key]:
            out[key] = json.dumps(value, separators=(",", ":"))
    return out


def _decode(fields: Mapping[bytes | str, bytes | str], plain: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, raw_value in fields.items():
        key, value = text(raw_key), text(raw_value)
        out[key] = value if key in plain else json.loads(value)
    return out


def encode_config(config: RolloutConfig) -> str:
    """The stored form of a config: only the fields that differ from the defaults (``{}``
    for a default config); decoding validates it over the defaults."""
    return config.model_dump_json(exclude_defaults=True)


def encode_result(result: RolloutResult) -> str:
    """The stored form of a result: its ``None`` fields left out (``output``'s own content is
    kept as it is), so a short result stays a short string."""
    return result.model_dump_json(exclude_none=True)



def encode_rollout(rollout: Rollout) -> dict[str, str]:
    # The rollout id is the key's (decode_rollout takes it from the caller).
    out = _encode(rollout.model_dump(mode="json", exclude={"rollout_id", "config", "result", "ran_resources_id",
                                                           "ran_resources_version"}), _PLAIN_ROLLOUT_FIELDS)
    if out.get("resolve") == _DEFAULT_RESOLVE:
        del out["resolve"]
    config = encode_config(rollout.config)
    if config != "{}":
        out["config"] = config
    if rollout.result is not None:
        out["result"] = encode_result(rollout.result)
    ran = _encode_ran(rollout.ran_resources_id, rollout.ran_resources_version)
    if ran is not None:
        out["ran"] = ran
    return out


def _encode_ran(resources_id: str | None, version: int | None) -> str | None:
    """The ``ran`` field: ``"{version}:{resources_id}"`` (the version first: an id may hold ``:``)."""
    return None if resources_id is None or version is None else f"{version}:{resources_id}"


def decode_rollout(fields: Mapping[bytes | str, bytes | str], rollout_id: str) -> Rollout:
    """Rollout ``rollout_id`` from its record's fields (the id is its key's; records written before
    that was so also hold it as a field)."""
    data = {"rollout_id": rollout_id, **_decode(fields, _PLAIN_ROLLOUT_FIELDS)}
    ran = data.pop("ran", None)
    if ran is not None:
        version, _, data["ran_resources_id"] = ran.partition(":")
        data["ran_resources_version"] = int(version)
    for bookkeeping in _BOOKKEEPING_FIELDS:  # idempotent enqueue's and the reaper's, not part of the model
        data.pop(bookkeeping, None)
    return Rollout.model_validate(data)


def decode_attempt(fields: Mapping[bytes | str, bytes | str], rollout_id: str, sequence_id: int) -> Attempt:
    """Attempt ``sequence_id`` of ``rollout_id`` from its hash: its key says whose and which it is
    (hashes written before that was so also hold them as fields)."""
    # A root-only trace's fields (storage/traces.py ROOT_FIELDS) are the trace's, read by query_spans.
    data = {"rollout_id": rollout_id, "sequence_id": sequence_id,
            **_decode({k: v for k, v in fields.items() if text(k) not in ROOT_FIELDS},
                      _PLAIN_ATTEMPT_FIELDS | _TRACE_ATTEMPT_FIELDS)}
    # Written by the trace scripts (_trace_prelude.lua): usage counters and the trace's bookkeeping.
    counters = {name: data.pop(name) for name in _TRACE_ATTEMPT_FIELDS if name in data}
    usage = Usage.from_fields(counters)
    if usage != Usage():
        data["usage"] = usage
    data["spans_dropped"] = int(counters.get("spans_dropped", 0))
    return Attempt.model_validate(data)


_TRACE_ATTEMPT_FIELDS = frozenset({*Usage.FIELDS, "spans_dropped", "proxy_bytes"})
_OPEN_ATTEMPT = frozenset({"preparing", "running"})  # an attempt in these has no end time yet


QUERY_SCAN_BUDGET = 2000
"""Records one :meth:`RolloutStore.query_page` call reads at most (to check what no index holds)."""
QUERY_INDEX_BUDGET = 20_000
"""Index entries one :meth:`RolloutStore.query_page` call examines at most, in Redis (a ZSCORE per
other filter each: about a millisecond per thousand)."""


def make_filter(filter: RolloutFilter | None = None, **fields: Unpack[FilterFields]) -> RolloutFilter:
    """``filter`` (or an empty one) with the keyword fields given (not None) laid over it."""
    given = {name: value for name, value in fields.items() if value is not None}
    if filter is None:
        return RolloutFilter(**given)
    return RolloutFilter(**{**filter.model_dump(exclude_unset=True), **given}) if given else filter


def encode_cursor(position: tuple[float, str]) -> str:
    """A query page's cursor: the position (score, rollout id) of the last entry it examined, opaque."""
    return base64.urlsafe_b64encode(json.dumps([position[0], position[1]]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The position a cursor of :func:`encode_cursor` holds; :class:`InvalidCursorError` otherwise."""
    try:
        score, member = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(member, str) or isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(cursor)
        return float(score), member
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursorError(cursor) from None


_STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


def check_stream_cursor(cursor: str) -> str:
    """``cursor`` if it is a stream entry id (``{ms}-{seq}``), else :class:`InvalidCursorError`."""
    if not isinstance(cursor, str) or not _STREAM_ID.match(cursor):
        raise InvalidCursorError(str(cursor))
    return cursor


@dataclass(frozen=True)
class _IndexWalk:
    """What one ``query_rollouts.lua`` call returned: the entries in every indexed group, the last
    entry it examined (matching or not), how many it examined, and whether the index ran out."""

    entries: list[tuple[str, float]]
    last: tuple[float, str] | None
    examined: int
    exhausted: bool


@dataclass(frozen=True)
class StartWith:
    """The snapshot to start a claimed attempt with at once (see :meth:`RolloutStore.claim`):
    ``resources_id``/``version``, resolved by the worker from the reference the task message
    names (``requested_id``: the rollout's ``resources_id``; ``requested_version``: its pinned
    version, None when it follows its reference)."""

    requested_id: str | None
    requested_version: int | None
    resources_id: str
    version: int
    epoch: str
    """The registry epoch the snapshot was read in: the attempt starts with it only if the
    registry is still of that epoch (else ``(resources_id, version)`` may hold other content)."""


@dataclass(frozen=True)
class Claim:
    """What :meth:`RolloutStore.claim` decided."""

    outcome: Literal["claimed", "missing", "finished", "lost", "duplicate", "held"]
    sequence_id: int = 0
    status: str | None = None
    rollout: Rollout | None = None
    """``claimed``: the record as the claim left it (``preparing`` or ``running``, on this attempt)."""
    started: bool = False
    """``claimed``: the attempt is already ``running`` with the snapshot given to the claim."""
    attempt_id: str = ""
    """``claimed``: the new attempt's id."""


class RolloutStore:
    """Rollout and attempt records, their indexes, and completion notifications.

    Contract:

    * ``create_rollouts`` writes every record and index entry of a batch in one
      MULTI/EXEC round trip: all or none are visible. Every rollout enters the pending
      index (``{p}:pending``, due ``message_grace`` seconds later) with its record, and
      again whenever an attempt ends ``requeuing``; the claim takes it out. The reaper
      (:mod:`lightning_queue.storage.pending`) looks for the task messages of its due entries.
    * ``claim``, ``start_attempt``, ``finish_attempt`` and ``terminate`` are
      each one atomic Lua script. A final status (succeeded, failed,
      cancelled) is never left again; a cancelled rollout stays cancelled
      even if its attempt finishes afterwards.
    * A rollout reaching a final status (by any path) has its record and
      every attempt set to expire ``rollout_ttl_seconds`` later, atomically
      with that transition (``None``: kept forever); in the same step its
      experiment's tally and the Prometheus aggregates are updated
      (``lua/_experiment_tally.lua``, ``lua/_final_metrics.lua``).
    * ``claim`` (when it starts the attempt) and ``start_attempt`` write the
      concrete snapshot on the record too (``Rollout.ran_resources_id``,
      ``ran_resources_version``), so batch reads tell what each rollout ran.
    * A rollout reaching a final status is appended once to ``{p}:finished`` (and
      ``{p}:rollouts:ended``) in the same script as the transition: the stream holds
      every finished rollout exactly once, in the order they finished.
    * Lookups of an unknown or expired id raise :class:`RolloutNotFoundError`.
    * Queries return newest enqueued first unless told otherwise, read the indexes
      server-side (one script per page), and skip ids whose record has expired
      (dropping them from the indexes they read).
    """

    def __init__(
        self, client: redis.Redis, keys: Keys, rollout_ttl_seconds: int | None = None, heartbeat_timeout: float = 30.0,
        epoch: RegistryEpoch | None = None, outage_seconds: float | None = None, message_grace: float = 30.0,
        series_caps: SeriesCaps | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.rollout_ttl_seconds = rollout_ttl_seconds
        self.heartbeat_timeout = heartbeat_timeout
        # A pause of the fleet's sweeps longer than this is an outage (Settings.sweep_outage_seconds).
        self.outage_seconds = heartbeat_timeout / 2 if outage_seconds is None else outage_seconds
        self.epoch = epoch if epoch is not None else RegistryEpoch(client, keys)
        self.message_grace = message_grace
        self.pending = PendingIndex(client, keys, message_grace)
        self._ttl_arg = rollout_ttl_seconds or ""
        # Caps on the per snapshot version and per variant metric series the final transitions keep.
        self._caps_arg = (series_caps or SeriesCaps()).arg
        self._waits = WaitConnections(client)
        self._create = load_script(client, "create_rollouts", "_epoch_prelude")
        self._mark_published = load_script(client, "mark_published")
        self._heartbeat = load_script(client, "heartbeat")
        self._heartbeat_worker = load_script(client, "heartbeat_worker")
        self._release_lost = load_script(client, "release_lost")
        self._claim = load_script(client, "claim_rollout", "_rollout_prelude")
        self._start = load_script(client, "start_rollout", "_rollout_prelude")
        self._finish = load_script(client, "finish_attempt", "_rollout_prelude", "_experiment_tally", "_final_metrics",
                                   "_finished_stream", "_trace_prelude")
        self._lease = load_script(client, "lease_expired")
        self._query = load_script(client, "query_rollouts")
        self._terminate = load_script(client, "terminate_rollout", "_rollout_prelude", "_experiment_tally",
                                      "_final_metrics", "_finished_stream")

    # -- writes -----------------------------------------------------------------------

    def create_rollouts(self, rollouts: Sequence[Rollout]) -> RegistryMark:
        """Write the batch; return the registry sequence number and epoch at that moment (task
        messages carry them, so worker caches know how fresh, and of which registry, an answer
        must be). Creates the registry epoch when there is none, in the same transaction (the
        mark says so: a caller that knew an epoch then knows Redis lost its data)."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(k.seq)
        pipe.set(k.epoch, propose(), nx=True)
        pipe.get(k.epoch)
        # One ZADD per index for the whole batch (index key -> {id: score}), not one per rollout.
        indexes: dict[str, dict[str, float]] = {}
        for rollout in rollouts:
            rid, score = rollout.rollout_id, rollout.enqueue_time
            pipe.hset(k.rollout(rid), mapping=cast("Mapping[Any, str]", encode_rollout(rollout)))
            for key in self._index_keys(rollout):
                indexes.setdefault(key, {})[rid] = score
        for key, members in indexes.items():
            pipe.zadd(key, members)
        pipe.zadd(k.pending, {r.rollout_id: r.enqueue_time + self.message_grace for r in rollouts})
        seq, created, epoch, *_ = pipe.execute()
        return RegistryMark(int(seq or 0), text(epoch), bool(created))

    def _index_keys(self, rollout: Rollout) -> list[str]:
        """The indexes a new rollout enters (main, status, mode, resources)."""
        k = self.keys
        keys = [k.rollouts, k.rollouts_by_status(rollout.status)]
        if rollout.mode:
            keys.append(k.rollouts_by_mode(rollout.mode))
        if rollout.resources_id:
            keys.append(k.rollouts_by_resources(rollout.resources_id))
        return keys

    def create_rollouts_if_absent(
        self, rollouts: Sequence[Rollout]
    ) -> tuple[RegistryMark, dict[str, tuple[Rollout, bool]]]:
        """Write the rollouts whose id is not taken yet, in one atomic script; return the registry
        sequence and epoch (see :meth:`create_rollouts`) and, by id, the stored record of each
        rollout that already existed (left as it is) with whether its message was marked sent
        (:meth:`mark_published`). For caller-chosen ids, so a retried enqueue never creates a
        rollout twice. Raises :class:`RegistryLostError`, writing nothing, when Redis lost its
        data since this store's process last looked (see :mod:`lightning_queue.storage.epoch`)."""
        k = self.keys
        items = []
        for rollout in rollouts:
            rid = rollout.rollout_id
            items.append(json.dumps({"id": rid, "key": k.rollout(rid), "score": repr(rollout.enqueue_time),
                                     "check": repr(rollout.enqueue_time + self.message_grace),
                                     "fields": encode_rollout(rollout), "indexes": self._index_keys(rollout)}))
        reply = self._create(keys=[k.seq, k.epoch, k.pending], args=[self.epoch.expected(), propose(), *items])
        if text(reply[0]) == "epoch":  # nothing written: Redis lost its data since this process last looked
            self.epoch.saw(text(reply[1]) or None)
        existing = {}
        for rollout, fields in zip(rollouts, reply[2:], strict=True):
            if fields:
                stored = dict(zip(fields[::2], fields[1::2], strict=True))
                published = b"published" in stored or "published" in stored
                existing[rollout.rollout_id] = (decode_rollout(stored, rollout.rollout_id), published)
        return RegistryMark(int(reply[0] or 0), text(reply[1])), existing

    def mark_published(self, rollout_ids: Sequence[str]) -> None:
        """Record that these rollouts' task messages were sent (records that expired are not recreated)."""
        if rollout_ids:
            self._mark_published(keys=[self.keys.rollout(rid) for rid in rollout_ids], args=[repr(time.time())])

    def claim(self, rollout: Rollout | str, worker_id: str, start: StartWith | None = None) -> Claim:
        """Open the next attempt of the rollout (a record or an id) for ``worker_id``, in one
        atomic script that also returns the record as it leaves it (no separate read).

        With ``start`` (the worker resolved the snapshot before claiming, from what the task
        message says the rollout asks for) the attempt opens directly as ``running`` with that
        snapshot, as :meth:`start_attempt` would, when the record asks for the same reference;
        otherwise it opens ``preparing`` and ``Claim.started`` is False.

        The new attempt's first heartbeat is written with it (deadline
        ``heartbeat_timeout`` from now), so a rollout shorter than one
        heartbeat interval costs no heartbeat command.

        If the rollout still has an open attempt, the broker delivered its
        message again. While that attempt's heartbeat is fresh its worker is
        alive (the visibility timeout ran out while it worked): the outcome is
        ``duplicate`` and nothing is written; the caller drops the message. So
        is it (outcome ``held``) when the heartbeat expired while the watchdog
        holds off after an outage (:meth:`close_unresponsive`), or before any
        sweep noticed one (the fleet's last sweep is more than ``outage_seconds``
        old): its worker may be alive and not have beaten again yet; if it is
        not, the sweep closes the attempt once the hold ends and sends the
        rollout again.
        Once the heartbeat expired the worker is presumed dead: that attempt is
        closed as ``worker_lost`` (:meth:`finish_attempt` from outside, fenced
        on the expired heartbeat) with the retry policy's decision
        (:func:`lightning_queue.core.policy.next_status`), and the claim is made
        again; the outcome is ``lost`` when the policy allows no further attempt.
        """
        rollout_id = check_rollout_id(rollout if isinstance(rollout, str) else rollout.rollout_id)
        k = self.keys
        while True:
            now = time.time()
            keys = [*k.all_status_indexes(), k.rollout(rollout_id), k.rollouts_by_worker(worker_id), k.heartbeats,
                    k.watchdog, k.pending, k.delayed]
            attempt_id = new_id("at")
            args: list[Any] = [rollout_id, worker_id, repr(now), attempt_id, k.attempt_prefix(rollout_id),
                               repr(now + self.heartbeat_timeout)]
            if start is not None:
                keys += [k.rollouts_by_resources(start.resources_id), k.epoch]
                args += ["1", start.requested_id or "",
                         "" if start.requested_version is None else start.requested_version,
                         start.resources_id, start.version, start.epoch]
            else:
                args += ["0", "", "", "", "", ""]
            args.append(repr(self.outage_seconds))
            reply = self._claim(keys=keys, args=args)
            outcome = text(reply[0])
            if outcome == "finished":
                return Claim("finished", status=text(reply[1]))
            if outcome == "missing":
                return Claim("missing")
            if outcome in ("duplicate", "held"):
                return Claim(cast('Literal["duplicate", "held"]', outcome), sequence_id=int(reply[1]))
            if outcome == "expired":
                seq = int(reply[1])
                config = RolloutConfig.model_validate_json(text(reply[2]) or "{}")
                error = ErrorInfo.from_exception(WorkerLostError(), with_traceback=False)
                closed = self.finish_attempt(rollout_id, seq, "worker_lost", next_status(config, seq, "worker_lost"),
                                             error=error, outside=now)
                if closed == "alive":  # it beat between the two scripts: a live duplicate after all
                    return Claim("duplicate", sequence_id=seq)
                if closed == "failed":
                    return Claim("lost", sequence_id=seq)
                continue  # requeuing (or closed by someone else meanwhile): claim the next attempt
            fields = reply[3]
            record = decode_rollout(dict(zip(fields[::2], fields[1::2], strict=True)), rollout_id)
            return Claim("claimed", sequence_id=int(reply[1]), rollout=record, started=bool(int(reply[2])),
                         attempt_id=attempt_id)

    def start_attempt(
        self, rollout_id: str, sequence_id: int, resources_id: str, version: int, epoch: str | None = None
    ) -> bool:
        """Mark the attempt running with this concrete snapshot. False: do not run it
        (the rollout was cancelled, or the attempt superseded).

        ``epoch`` is the registry epoch the snapshot was read in: when the registry is no longer
        of that epoch (Redis lost its data, so ``(resources_id, version)`` may now hold other
        content), nothing is written and :class:`RegistryLostError` is raised; read the snapshot
        again. ``None`` checks nothing."""
        k = self.keys
        args: list[Any] = [rollout_id, sequence_id, resources_id, version]
        if epoch is not None:
            args.append(epoch)
        reply = self._start(
            keys=[*k.all_status_indexes(), k.rollout(rollout_id), k.attempt(rollout_id, sequence_id),
                  k.rollouts_by_resources(resources_id), k.epoch],
            args=args,
        )
        if isinstance(reply, list):
            raise RegistryLostError(epoch or "", text(reply[1]) or None, rollout_id)
        return bool(reply)

    def finish_attempt(
        self,
        rollout_id: str,
        sequence_id: int,
        attempt_status: str,
        next_status: NextStatus,
        error: ErrorInfo | None = None,
        result: RolloutResult | None = None,
        outside: float | None = None,
        trace: TraceWrite | None = None,
    ) -> str:
        """Record the attempt's outcome and move the rollout to ``next_status`` (the retry
        policy's decision, :func:`lightning_queue.core.policy.next_status`), atomically; return
        the rollout's status afterwards. A rollout left ``requeuing`` enters the pending index
        (its retry's message is looked for ``message_grace`` seconds later), in the same step.

        ``trace`` (the attempt's spans and the LLM usage they record) is written in the same
        script, whatever the outcome (a refused outcome's trace is kept too: the agent did
        run), unless the rollout's record is gone; it expires with the rollout.

        ``'stale'``: the outcome was refused, nothing written (the attempt was
        superseded, or already closed as lost, unresponsive or timed out). A
        rollout already final keeps its status (a cancelled one keeps the late
        outcome on the attempt only), so it never flips from failed to succeeded.

        ``outside`` (a time) closes the attempt from outside its worker: only if
        it is still the open attempt and its heartbeat expired by then;
        ``'alive'`` when it beat since (nothing written).
        """
        call = self._finish_call(rollout_id, sequence_id, attempt_status, next_status, error, result, outside, trace)
        return text(self._finish(keys=call["keys"], args=call["args"]))

    def _finish_call(
        self, rollout_id: str, sequence_id: int, attempt_status: str, next_status: NextStatus,
        error: ErrorInfo | None, result: RolloutResult | None, outside: float | None,
        trace: TraceWrite | None = None,
    ) -> dict[str, list[Any]]:
        """The keys and arguments of one ``finish_attempt`` script call."""
        k = self.keys
        now = time.time()
        return {
            "keys": [*k.all_status_indexes(), k.rollout(rollout_id), k.attempt(rollout_id, sequence_id), k.events,
                     k.heartbeats, k.pending],
            "args": [rollout_id, sequence_id, attempt_status, repr(now),
                     error.model_dump_json() if error else "", encode_result(result) if result else "",
                     next_status, self._ttl_arg, k.attempt_prefix(rollout_id),
                     "" if outside is None else repr(outside), repr(now + self.message_grace), self._caps_arg,
                     *(trace.args if trace is not None else ())],
        }

    def terminate(self, rollout_id: str, status: Literal["cancelled", "failed"], error: ErrorInfo | None = None) -> str:
        """End a rollout that has not finished; return its status afterwards.

        A rollout already finished is left as it is. Raises
        :class:`RolloutNotFoundError` for an unknown id.
        """
        reply = text(self._terminate_call(rollout_id, status, error))
        if reply == "missing":
            raise RolloutNotFoundError(rollout_id)
        return reply

    def _terminate_call(self, rollout_id: str, status: str, error: ErrorInfo | None,
                        client: redis.client.Pipeline | None = None) -> Any:
        """Run ``terminate_rollout.lua`` for one rollout (on ``client``, a pipeline, when given)."""
        k = self.keys
        check_rollout_id(rollout_id)
        return self._terminate(
            keys=[*k.all_status_indexes(), k.rollout(rollout_id), k.events, k.heartbeats],
            args=[rollout_id, status, repr(time.time()), error.model_dump_json() if error else "",
                  self._ttl_arg, k.attempt_prefix(rollout_id), self._caps_arg],
            client=client,
        )

    def cancel_batch(self, rollout_ids: Sequence[str]) -> list[tuple[str | None, str]]:
        """Cancel each rollout as :meth:`terminate` does; return, for each, its status before
        (None: no record) and after. The whole batch is one MULTI/EXEC, so each "before" is the
        status the cancel found: ``("running", "cancelled")`` was cancelled by this call,
        ``("succeeded", "succeeded")`` had finished first."""
        pipe = self.redis.pipeline(transaction=True)
        for rid in rollout_ids:
            check_rollout_id(rid)
            pipe.hget(self.keys.rollout(rid), "status")
            self._terminate_call(rid, "cancelled", None, client=pipe)
        replies = pipe.execute()
        return [(None if before is None else text(before), text(after))
                for before, after in zip(replies[::2], replies[1::2], strict=True)]

    def heartbeat(self, rollout_id: str, sequence_id: int) -> bool:
        """Push the open attempt's heartbeat deadline ``heartbeat_timeout`` ahead (one script).
        False: the attempt is no longer open (finished, cancelled, declared unresponsive or
        lost), so there is nothing to keep alive."""
        k = self.keys
        return bool(self._heartbeat(keys=[k.rollout(rollout_id), k.heartbeats],
                                    args=[rollout_id, sequence_id, repr(time.time() + self.heartbeat_timeout)]))

    def heartbeat_for_workers(self, rollout_ids: Sequence[str], worker_id: str) -> list[bool]:
        """Push the deadline of each rollout's open attempt ``heartbeat_timeout`` ahead if that
        attempt is ``worker_id``'s (one script each, in one pipeline): what a worker's main
        process does for the attempts its live pool processes run. False where the rollout has
        no open attempt of that worker."""
        k = self.keys
        deadline = repr(time.time() + self.heartbeat_timeout)
        pipe = self.redis.pipeline(transaction=False)
        for rid in rollout_ids:
            self._heartbeat_worker(keys=[k.rollout(rid), k.heartbeats], args=[rid, worker_id, k.attempt_prefix(rid),
                                   deadline], client=pipe)
        return [bool(reply) for reply in pipe.execute()]

    def release_lost(self, rollout_id: str, worker_id: str) -> bool:
        """The process of ``worker_id`` running the rollout's open attempt died: drop that
        attempt's heartbeat (one script), so the redelivered message claims the rollout at once
        and marks the attempt ``worker_lost``. False: the open attempt is not that worker's."""
        k = self.keys
        return bool(self._release_lost(keys=[k.rollout(rollout_id), k.heartbeats],
                                       args=[rollout_id, worker_id, k.attempt_prefix(rollout_id)]))

    def close_unresponsive(
        self, limit: int = 100, now: float | None = None, outage_seconds: float | None = None
    ) -> list[tuple[str, str, int]]:
        """Close open attempts whose heartbeat deadline passed (at most ``limit``) as
        ``unresponsive``, each with the retry policy's decision: its rollout goes to
        ``requeuing`` (the caller must publish it again) or ``failed``. Returns
        ``(rollout_id, next status, sequence_id)`` for each rollout moved.

        Outages are waited out: attempts cannot beat while Redis is unreachable, so a long
        outage lets deadlines pass while their workers live. Each sweep notes the time (Redis's
        clock) in :attr:`Keys.watchdog`; when the last sweep of the fleet is more than
        ``outage_seconds`` old (default: the store's ``outage_seconds``), no sweep could run, i.e.
        Redis was unreachable or stopped that long, and nothing is closed for one heartbeat
        timeout: the live workers beat first. The claim honours the same hold.

        Two round trips, O(expired), not a scan: one script takes the expired head of the
        heartbeat index with the records' attempt counts and configs, leasing each entry for
        half a heartbeat timeout so concurrent sweeps take distinct entries; then one pipeline
        of :meth:`finish_attempt` calls, each fenced on the leased deadline, so an attempt that
        beat meanwhile (or that another path closed) is left alone. A sweep that dies between
        the two leaves its entries to come due again when the lease ends.
        """
        k = self.keys
        now = time.time() if now is None else now
        lease = now + self.heartbeat_timeout / 2
        gap = self.outage_seconds if outage_seconds is None else outage_seconds
        reply = self._lease(keys=[k.heartbeats, k.watchdog],
                            args=[repr(now), limit, repr(lease), k.rollout_prefix, repr(gap),
                                  repr(self.heartbeat_timeout)])
        if text(reply[0]) == "hold":
            if int(reply[2]):
                log.warning(
                    "no sweep of this fleet ran for over %g s (Redis was unreachable, stopped or restarted, or no "
                    "worker ran): no attempt is declared unresponsive for the next %s s, so live workers can beat "
                    "first", gap, text(reply[1]))
            return []
        flat = reply[1:]
        if not flat:
            return []
        error = ErrorInfo.from_exception(UnresponsiveAttemptError(self.heartbeat_timeout), with_traceback=False)
        decided: list[tuple[str, int, NextStatus]] = []
        for i in range(0, len(flat), 3):
            rid, seq = text(flat[i]), int(text(flat[i + 1]) or 0)
            config = RolloutConfig.model_validate_json(text(flat[i + 2]) or "{}")
            decided.append((rid, seq, next_status(config, seq, "unresponsive")))
        pipe = self.redis.pipeline(transaction=False)
        for rid, seq, status in decided:
            call = self._finish_call(rid, seq, "unresponsive", status, error, None, lease)
            self._finish(keys=call["keys"], args=call["args"], client=pipe)
        return [(rid, text(reply), seq) for (rid, seq, _), reply in zip(decided, pipe.execute(), strict=True)
                if text(reply) in ("requeuing", "failed")]

    # -- reads --------------------------------------------------------------------------

    def get_rollout(self, rollout_id: str) -> Rollout:
        """The rollout; :class:`RolloutNotFoundError` for an unknown id, :class:`InvalidRolloutIdError`
        for one that cannot be a rollout id (it could address another key)."""
        fields = self.redis.hgetall(self.keys.rollout(check_rollout_id(rollout_id)))
        if not fields:
            raise RolloutNotFoundError(rollout_id)
        return decode_rollout(fields, rollout_id)

    def get_rollouts(self, rollout_ids: Sequence[str]) -> list[Rollout]:
        """The rollouts, in the order given, read in one round trip."""
        out = []
        for rid in rollout_ids:
            check_rollout_id(rid)
        for rid, rollout in zip(rollout_ids, self._read(rollout_ids), strict=True):
            if rollout is None:
                raise RolloutNotFoundError(rid)
            out.append(rollout)
        return out

    def read_rollouts(self, rollout_ids: Sequence[str]) -> list[Rollout | None]:
        """The rollouts, in the order given, read in one round trip; None where the record is
        gone (never existed, or expired)."""
        return self._read(rollout_ids)

    def _read(self, rollout_ids: Sequence[str]) -> list[Rollout | None]:
        # One round trip; None where the record is gone (never existed, or expired).
        pipe = self.redis.pipeline(transaction=False)
        for rid in rollout_ids:
            pipe.hgetall(self.keys.rollout(rid))
        return [decode_rollout(fields, rid) if fields else None
                for rid, fields in zip(rollout_ids, pipe.execute(), strict=True)]

    def forget(self, rollout_ids: Sequence[str], index_keys: Iterable[str] = ()) -> int:
        """Drop ids whose record has expired from the main, status and end-time indexes and from
        ``index_keys``; return how many entries were removed. Only for ids known to be
        gone: a record never comes back once it has expired."""
        if not rollout_ids:
            return 0
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for key in dict.fromkeys([k.rollouts, *k.all_status_indexes(), k.rollouts_ended, *index_keys]):
            pipe.zrem(key, *rollout_ids)
        return sum(pipe.execute())

    def prune_expired(self, dry_run: bool = False, chunk: int = 500) -> int:
        """Remove the entries of expired rollouts from every rollout index under the prefix
        (main, status, mode, resources and worker zsets); return how many were removed
        (on a dry run: found). Each index is read ``chunk`` members at a time, with one
        pipelined EXISTS per chunk; an index left empty disappears."""
        k = self.keys
        removed = 0
        for raw in self.redis.scan_iter(match=k.rollout_index_pattern, count=1000, _type="ZSET"):
            key = text(raw)
            if key != k.rollouts and not key.startswith(f"{k.rollouts}:"):
                continue  # another deployment's key whose prefix happens to extend ours
            start = 0
            while members := [text(m) for m in cast("list[bytes]", self.redis.zrange(key, start, start + chunk - 1))]:
                pipe = self.redis.pipeline(transaction=False)
                for rid in members:
                    pipe.exists(k.rollout(rid))
                gone = [rid for rid, alive in zip(members, pipe.execute(), strict=True) if not alive]
                dropped = len(gone) if dry_run or not gone else int(self.redis.zrem(key, *gone))
                removed += dropped
                start += len(members) - (0 if dry_run else dropped)
        return removed

    def get_attempts(self, rollout_id: str) -> list[Attempt]:
        """Every attempt of the rollout, first to last. The result of the attempt that
        finished the rollout is stored once, on the rollout, and read from there."""
        count, result, start, end = self.redis.hmget(self.keys.rollout(check_rollout_id(rollout_id)),
                                                     ["attempt_count", "result", "start_time", "end_time"])
        if count is None and not self.redis.exists(self.keys.rollout(rollout_id)):
            raise RolloutNotFoundError(rollout_id)
        pipe = self.redis.pipeline(transaction=False)
        for seq in range(1, int(count or 0) + 1):
            pipe.hgetall(self.keys.attempt(rollout_id, seq))
        attempts: list[tuple[int, dict[bytes | str, bytes | str]]] = [
            (seq, {text(k): v for k, v in fields.items()}) for seq, fields in enumerate(pipe.execute(), 1) if fields]
        for _, fields in attempts:
            if "start_time" not in fields and start is not None:  # the attempt that started the rollout
                fields["start_time"] = start
        if attempts:
            last = attempts[-1][1]
            if result is not None and "result" not in last:
                last["result"] = result
            # The attempt that finished the rollout ends with it (finish_attempt.lua stores that time once).
            if "end_time" not in last and end is not None and text(last.get("status", b"")) not in _OPEN_ATTEMPT:
                last["end_time"] = end
        return [decode_attempt(fields, rollout_id, seq) for seq, fields in attempts]

    def statuses(self, rollout_ids: Sequence[str]) -> dict[str, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for rid in rollout_ids:
            pipe.hget(self.keys.rollout(check_rollout_id(rid)), "status")
        return {rid: (text(s) if s is not None else None) for rid, s in zip(rollout_ids, pipe.execute(), strict=True)}

    def query_rollouts(
        self,
        filter: RolloutFilter | None = None,
        *,
        offset: int = 0,
        limit: int = 100,
        **fields: Unpack[FilterFields],
    ) -> list[Rollout]:
        """Rollouts matching every filter given (a :class:`RolloutFilter`, or its fields as
        keywords laid over it: those left None keep the filter's), ``limit`` of them after
        skipping ``offset`` matches; newest enqueued first unless ``order_by``/``newest_first`` say
        otherwise. ``status`` may be one status or several; ``resources_id`` matches rollouts
        pinned to that snapshot or that ran an attempt with it.

        Reads :meth:`query_page` pages until it has ``offset + limit`` matches or the indexes
        hold nothing further (see there for what is filtered where). Ids whose record has expired
        are skipped and removed from the indexes read, so paging with ``offset`` stays
        consistent. For long listings, page with :meth:`query_page`'s cursor instead: an offset
        re-reads every skipped match.
        """
        if offset < 0 or limit < 1:
            raise ValueError("offset must be >= 0 and limit >= 1")
        wanted = make_filter(filter, **fields)
        found: list[Rollout] = []
        cursor: str | None = None
        while len(found) < offset + limit:
            page = self.query_page(wanted, cursor=cursor, limit=min(offset + limit - len(found), 1000))
            found += page.rollouts
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        return found[offset : offset + limit]

    def query_page(
        self, filter: RolloutFilter | None = None, *, cursor: str | None = None, limit: int = 100,
        scan_budget: int = QUERY_SCAN_BUDGET, index_budget: int = QUERY_INDEX_BUDGET,
    ) -> RolloutPage:
        """The next page of rollouts matching ``filter`` after ``cursor`` (None: from the start),
        and the cursor of the page after it (None when the indexes hold nothing further).

        The indexed filters (statuses, mode, snapshot, worker, experiment and variant, and the
        time range of the sort key) are applied in Redis by one script (``lua/query_rollouts.lua``)
        that walks one of their index zsets in order from the cursor and checks each entry against
        the others, returning the ids in all of them; the records of those ids are then read in
        one round trip and checked for the rest (metadata, queue, the other time range; and the
        status again, as the record has it now). A page examines at most ``index_budget`` index
        entries and reads at most ``scan_budget`` records: when matches are rare it may come back
        short, or empty, with a cursor to go on from. The cursor is the position of the last
        entry examined (score and id), so rollouts enqueued meanwhile never shift a page. Ids
        whose record has expired are skipped and dropped from the indexes read.
        Raises :class:`InvalidCursorError` for a cursor this method did not hand out, and
        :class:`ExperimentNotFoundError` for an experiment (without a variant) that does not exist.
        """
        if limit < 1 or scan_budget < 1:
            raise ValueError("limit and scan_budget must be >= 1")
        wanted = filter if filter is not None else RolloutFilter()
        position = decode_cursor(cursor) if cursor else None
        groups = self._index_groups(wanted)
        found: list[Rollout] = []
        read = examined = 0
        while len(found) < limit and read < scan_budget and examined < index_budget:
            walked = self._index_page(groups, wanted, position, min(max(limit - len(found), 20), scan_budget - read),
                                      index_budget - examined)
            read += len(walked.entries)
            examined += walked.examined
            gone = []
            for (rid, score), rollout in zip(walked.entries, self._read([rid for rid, _ in walked.entries]),
                                             strict=True):
                position = (score, rid)
                if rollout is None:
                    gone.append(rid)
                elif wanted.matches(rollout):
                    found.append(rollout)
                    if len(found) == limit:
                        break
            if gone:
                self.forget(gone, [key for keys, _ in groups for key in keys])
            if len(found) == limit:
                break
            if walked.last is not None:
                position = walked.last
            if walked.exhausted:
                return RolloutPage(rollouts=found, next_cursor=None)
        return RolloutPage(rollouts=found, next_cursor=encode_cursor(position) if position is not None else None)

    def _index_groups(self, wanted: RolloutFilter) -> list[tuple[list[str], bool]]:
        """The index zsets a query reads, by group (a rollout must be in one index of every group),
        each with whether its scores are the sort key; the first group's are."""
        k = self.keys
        by_end = wanted.order_by == "end_time"
        groups: list[list[str]] = []
        if by_end:
            groups.append([k.rollouts_ended])
        if wanted.experiment is not None:
            variants = [wanted.variant] if wanted.variant is not None else self._variants(wanted.experiment)
            groups.append([k.experiment_rollouts(wanted.experiment, v) for v in variants])
        if wanted.resources_id is not None:
            groups.append([k.rollouts_by_resources(wanted.resources_id)])
        if wanted.worker_id is not None:
            groups.append([k.rollouts_by_worker(wanted.worker_id)])
        if wanted.status is not None:
            groups.append([k.rollouts_by_status(s) for s in wanted.status])
        if wanted.mode is not None:
            groups.append([k.rollouts_by_mode(wanted.mode)])
        if wanted.by_end_time and not by_end:
            # Finished ones only, scored by an index of enqueue times (the first group).
            groups = [*(groups or [[k.rollouts]]), [k.rollouts_ended]]
        # Every index is scored by enqueue time but the end-time one.
        return [(keys, (keys == [k.rollouts_ended]) == by_end) for keys in groups or [[k.rollouts]]]

    def _variants(self, experiment: str) -> list[str]:
        """The variant names of an experiment, from its stored spec (experiments/manager.py)."""
        raw = self.redis.hget(self.keys.experiment(experiment), "spec")
        if raw is None:
            raise ExperimentNotFoundError(experiment)
        return [str(v["name"]) for v in json.loads(text(raw)).get("variants", [])]

    def _index_page(
        self, groups: list[tuple[list[str], bool]], wanted: RolloutFilter, position: tuple[float, str] | None,
        count: int, budget: int,
    ) -> _IndexWalk:
        low, high = wanted.sort_range()
        reply = self._query(
            keys=[self.keys.query_scratch(new_id("q")), *(key for keys, _ in groups for key in keys)],
            args=[len(groups), *(v for keys, sorts in groups for v in (len(keys), int(sorts))),
                  "desc" if wanted.newest_first else "asc",
                  "" if low is None else repr(low), "" if high is None else repr(high),
                  "" if position is None else repr(position[0]), "" if position is None else position[1],
                  count, budget],
        )
        exhausted, member, score, examined, *flat = reply
        return _IndexWalk(
            entries=[(text(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)],
            last=(float(score), text(member)) if text(member) else None,
            examined=int(examined), exhausted=bool(int(exhausted)))

    # -- the finished-rollouts cursor -----------------------------------------------------------

    def finished_rollouts(
        self, after: str | None = None, *, limit: int = 100, block_seconds: float = 0.0,
        filter: RolloutFilter | None = None,
    ) -> FinishedPage:
        """The rollouts that reached a final status after the cursor ``after`` (None: the oldest
        entry kept), in the order they did, at most ``limit`` of them; and the cursor to pass next.

        Every final transition (succeeded, failed, cancelled; by a worker, a cancel, the watchdog,
        the reaper or a forced snapshot delete) appends the rollout to the ``{p}:finished`` stream
        in the same atomic step, once. A rollout therefore appears exactly once in the stream, and
        a reader that passes each page's cursor back never sees an entry twice or misses one; a
        process that saves the cursor of each item *after* handling it, and resumes from the saved
        cursor, handles each rollout at least once (exactly once unless it dies between handling an
        item and saving its cursor). Entries older than ``rollout_ttl_seconds`` are trimmed with
        the records they name: a cursor older than that resumes at the oldest entry kept.

        ``block_seconds`` > 0 waits up to that long for a first entry when there is none yet
        (XREAD BLOCK: woken by the write, not by polling); 0 returns at once. ``filter`` leaves out
        entries whose record does not match it, or has expired (``resources_id`` and ``worker_id``
        cannot be checked on a record: refused); the returned cursor still moves past them.
        Raises :class:`InvalidCursorError` for a cursor that is not a stream entry id.
        """
        if limit < 1 or block_seconds < 0:
            raise ValueError("limit must be >= 1 and block_seconds >= 0")
        if filter is not None and filter.index_only:
            raise InvalidFilterError(f"the finished-rollouts cursor cannot filter by {', '.join(filter.index_only)} "
                             "(not in the record); filter the rollouts it returns with query_rollouts instead")
        start = check_stream_cursor(after) if after else "0-0"
        options: dict[str, Any] = {"count": limit}
        if block_seconds > 0:
            options["block"] = max(1, round(block_seconds * 1000))
        reply = cast("list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]",
                     self.redis.xread({self.keys.finished: start}, **options))
        entries = [(text(eid), {text(f): text(v) for f, v in fields.items()}) for eid, fields in reply[0][1]] \
            if reply else []
        records = self._read([fields["id"] for _, fields in entries])
        items = [
            FinishedRollout(cursor=eid, rollout_id=fields["id"], status=cast("RolloutStatus", fields["status"]),
                            rollout=rollout)
            for (eid, fields), rollout in zip(entries, records, strict=True)
            if filter is None or (rollout is not None and filter.matches(rollout))
        ]
        return FinishedPage(items=items, cursor=entries[-1][0] if entries else after)

    def iter_finished_rollouts(
        self, after: str | None = None, *, idle_seconds: float = 5.0, batch: int = 100,
        filter: RolloutFilter | None = None,
    ) -> Iterator[FinishedRollout]:
        """Each finished rollout after ``after``, as :meth:`finished_rollouts` reads them, until
        none arrived for ``idle_seconds`` (then the iterator ends: every wait is bounded). Save
        ``item.cursor`` after handling each item to resume after it."""
        cursor = after
        idle_until = time.monotonic() + idle_seconds
        while (left := idle_until - time.monotonic()) > 0:
            page = self.finished_rollouts(cursor, limit=batch, block_seconds=left, filter=filter)
            if page.cursor != cursor:
                idle_until = time.monotonic() + idle_seconds
            cursor = page.cursor
            yield from page.items

    def count_by_status(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=True)
        for s in ROLLOUT_STATUSES:
            pipe.zcard(self.keys.rollouts_by_status(s))
        return dict(zip(ROLLOUT_STATUSES, pipe.execute(), strict=True))

    # -- waiting ------------------------------------------------------------------------

    def wait_for_rollouts(
        self,
        rollout_ids: Sequence[str],
        timeout: float | None = None,
        on_finished: Callable[[Rollout], None] | None = None,
        retry_seconds: float = 10.0,
    ) -> list[Rollout]:
        """Block until every rollout has finished, or ``timeout`` seconds pass (``None``: no limit).

        Returns the finished rollouts in the order of ``rollout_ids`` (each once); on
        time-out, only those that had finished. Woken by the notification each final
        transition publishes, not by polling. The statuses are read after the
        subscription is confirmed and again whenever it is re-established after a
        dropped connection (and every few seconds, in case a notification was lost), so
        no rollout that finishes before or during the call is missed. Notifications that
        arrived together are read in one round trip. ``on_finished`` is called once per
        rollout, as it is seen finished.

        Raises :class:`RolloutNotFoundError` when a rollout's record does not exist, at the
        start or on any later read (it expired, or Redis lost its data): it would never
        finish. Raises :class:`RedisUnavailableError` when Redis is unreachable at the
        deadline (what the unseen rollouts did is then unknown), or for longer than
        ``retry_seconds`` in a row; shorter outages are ridden out. Its own connections give
        up on a silent server after a fraction of a second
        (:data:`~lightning_queue.storage.connections.WAIT_IO_TIMEOUT`), so the call returns
        or raises within about that much of its deadline. See
        :mod:`lightning_queue.storage.waiting`.
        """
        with self._waits.acquire() as (client, pubsub, server):
            return wait(client, self.waiter(rollout_ids, timeout, on_finished, retry_seconds=retry_seconds,
                                            server=server), pubsub)

    def close(self) -> None:
        """Close the connections kept for waits (:meth:`wait_for_rollouts` keeps one set between
        calls); a later wait makes its own."""
        self._waits.close()

    def waiter(
        self,
        rollout_ids: Sequence[str],
        timeout: float | None,
        on_finished: Callable[[Rollout], None] | None,
        *,
        retry_seconds: float,
        server: str,
    ) -> Waiter:
        """The state of one wait on these rollouts (this store's keys and record format), for
        :func:`~lightning_queue.storage.waiting.wait` or
        :func:`~lightning_queue.storage.waiting.wait_async` to run. ``server`` names Redis in
        errors."""
        return Waiter(rollout_ids, self.keys, decode_rollout, timeout=timeout, retry_seconds=retry_seconds,
                      server=server, on_finished=on_finished, epoch=self.epoch)
