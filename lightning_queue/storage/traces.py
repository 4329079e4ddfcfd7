"""How traces are stored and read: span batches in each attempt's spans list, and LLM usage rollups.

An attempt's trace lives in ``{p}:rollout:{id}:attempt:{n}:spans``, a list of *batches*: the
worker writes one when the attempt ends, in the same script as the attempt's outcome (no round
trip per span), and the LLM proxy one per call it forwards. The list expires with the rollout
(the scripts that expire a rollout expire it too, atomically).

Encoding (compact, and cheap to build span by span): a span is a JSON array of positional
fields, ``[span_id, parent_id, name, kind, start_ns, end_ns, status, status_message, attributes,
events, trace_id]`` (``trace_id`` null when it is the batch's); a batch is ``[1, trace_id,
[span, ...]]``. A batch is stored as that JSON behind a ``j`` byte, or zstd-compressed behind
``z`` from 1 KiB on (spans repeat their attribute names: a typical LLM-heavy trace shrinks
5-10x). Each span is encoded once, when it ends; the batch joins the encoded spans.

A trace that is the attempt's root span alone, carrying only what the records say (the
attributes of :func:`~lightning_queue.core.traces.attempt_attributes`, its status and final
reward), the common case of a short attempt, is not a list: :func:`compact_root` gives its ids,
times and status as a few short fields of the attempt hash (:data:`ROOT_FIELDS`, each under
Redis's ``hash-max-listpack-value``, so the hash stays a listpack), written by the same script in
place of the batch, and :meth:`Traces.query_spans` rebuilds the span from them and the records.
That saves the list's key, its expiry and the span's JSON: ~570 of a no-op rollout's bytes.

Usage (LLM calls, tokens, cost; :class:`~lightning_queue.core.traces.Usage`) is added, with each
batch, to the attempt hash and to the rollups of the attempt's snapshot version
(``{p}:usage:snapshot:{id}``) and experiment variant (``{p}:experiment:{name}:usage``), by the
same script: the counters are exact even when spans are dropped past the size limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from pydantic_core import to_json

from lightning_queue.core.errors import AttemptNotFoundError, RolloutNotFoundError
from lightning_queue.core.keys import Keys
from lightning_queue.core.models import OPEN_STATUSES, Rollout
from lightning_queue.core.traces import (
    ATTEMPT_SPAN,
    FINAL_REWARD,
    SPAN_KINDS,
    SPAN_STATUSES,
    STATUS,
    Span,
    SpanEvent,
    Usage,
    attempt_attributes,
)
from lightning_queue.storage.connections import text

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

FORMAT = 1
COMPRESS_AT = 1024
_PLAIN, _ZSTD, _ROOT = b"j", b"z", b"r"
_CONSUMER = SPAN_KINDS.index("consumer")  # the root span's kind (OpenTelemetry's SpanKind value)
ROOT_FIELDS = ("root", "root_parent", "root_time", "root_status", "root_reward")
"""The attempt-hash fields of a root-only trace (:func:`compact_root`): ``"{trace_id} {span_id}"``,
the parent span id (when it has one), ``"{start_ns} {end_ns} {status code}"``, the ``lq.status``
attribute (when it is not the attempt's status) and the ``lq.final_reward`` one (when set)."""
_LISTPACK_VALUE = 64  # Redis's hash-max-listpack-value default: a longer value turns the hash into a table
_ZSTD_LEVEL = 3  # written once per attempt on the worker's hot path: fast, still 5-10x on traces


# --------------------------------------------------------------------------- encoding


def _hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def span_entry(span: ReadableSpan, trace_id: str | None = None) -> list[Any]:
    """The stored form of a finished OpenTelemetry span (``trace_id``: the batch's, left out when equal)."""
    context = span.context
    assert context is not None
    own_trace = _hex_id(context.trace_id, 32)
    events = [[e.name, e.timestamp, dict(e.attributes) if e.attributes else None] for e in span.events]
    return [
        _hex_id(context.span_id, 16),
        _hex_id(span.parent.span_id, 16) if span.parent is not None else None,
        span.name,
        span.kind.value,
        span.start_time,
        span.end_time,
        span.status.status_code.value,
        span.status.description,
        dict(span.attributes) if span.attributes else None,
        events or None,
        None if own_trace == trace_id else own_trace,
    ]


def encode_entry(entry: list[Any]) -> bytes:
    return to_json(entry)


def encode_batch(trace_id: str, pieces: Sequence[bytes]) -> bytes:
    """A batch of encoded spans (:func:`encode_entry`), framed and compressed for storage."""
    raw = b"[%d,%s,[%s]]" % (FORMAT, to_json(trace_id), b",".join(pieces))
    if len(raw) < COMPRESS_AT:
        return _PLAIN + raw
    import zstandard

    return _ZSTD + zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)


def compact_root(entry: Sequence[Any] | None, trace_id: str, attributes: Mapping[str, Any]) -> bytes | None:
    """The script argument that stores the root span ``entry`` (:func:`span_entry`) of a trace that
    holds nothing else as attempt-hash fields (:data:`ROOT_FIELDS`), or None when the span says
    more than the records and those fields can: ``attributes`` (what the records rebuild,
    :func:`~lightning_queue.core.traces.attempt_attributes`) must be all it carries besides its
    status and a finite final reward, and it has no status message, events or trace of its own.
    (The finish script drops ``root_status`` again when the attempt's recorded status says the same.)"""
    if entry is None or len(entry) != 11:
        return None
    span_id, parent, name, kind, start, end, code, message, attrs, events, own_trace = entry
    if name != ATTEMPT_SPAN or kind != _CONSUMER or message is not None or events or own_trace is not None:
        return None
    rest = dict(attrs or {})
    status, reward = rest.pop(STATUS, None), rest.pop(FINAL_REWARD, None)
    if rest != attributes or not isinstance(status, str) or not status:
        return None
    fields = {"root": f"{trace_id} {span_id}", "root_time": f"{int(start)} {int(end)} {int(code)}",
              "root_status": status}
    if parent is not None:
        fields["root_parent"] = str(parent)
    if reward is not None:
        if type(reward) is not float or not math.isfinite(reward):
            return None
        fields["root_reward"] = repr(reward)
    if any(len(v) >= _LISTPACK_VALUE or "\n" in v for v in fields.values()):
        return None
    return _ROOT + "\n".join(f"{k}\n{v}" for k, v in fields.items()).encode()


def expand_root(root: Mapping[str, str], rollout: Mapping[str, Any], attempt: Mapping[str, str]
                ) -> tuple[str, list[Any]]:
    """The trace id and stored entry (:func:`span_entry`) of a root span kept as attempt-hash fields
    (:func:`compact_root`), rebuilt with ``rollout`` (its ``rollout_id``, ``mode``, ``metadata``) and the
    attempt's ``attempt_id``, ``sequence_id``, ``worker_id``, ``resources_id``, ``resources_version``,
    ``status``."""
    trace_id, _, span_id = root["root"].partition(" ")
    start, end, code = (int(v) for v in root["root_time"].split())
    version = attempt.get("resources_version")
    attributes = attempt_attributes(rollout["rollout_id"], attempt.get("attempt_id", ""),
                                    int(attempt.get("sequence_id", 0)), attempt.get("resources_id"),
                                    int(version) if version is not None else None, attempt.get("worker_id"),
                                    rollout.get("mode"), rollout.get("metadata") or {})
    attributes[STATUS] = root.get("root_status") or attempt.get("status")
    if "root_reward" in root:
        attributes[FINAL_REWARD] = float(root["root_reward"])
    return trace_id, [span_id, root.get("root_parent"), ATTEMPT_SPAN, _CONSUMER, start, end, code, None,
                      attributes, None, None]


def _spans(entries: Sequence[Sequence[Any]], trace_id: str, rollout_id: str, attempt_id: str,
           sequence_id: int) -> list[Span]:
    return [Span(
        span_id=e[0], parent_id=e[1], name=e[2], kind=SPAN_KINDS[e[3]], start_time=e[4] / 1e9,
        end_time=e[5] / 1e9, status=SPAN_STATUSES[e[6]], status_message=e[7], attributes=e[8] or {},
        events=[SpanEvent(name=n, time=t / 1e9, attributes=a or {}) for n, t, a in (e[9] or [])],
        trace_id=e[10] or trace_id, rollout_id=rollout_id, attempt_id=attempt_id, sequence_id=sequence_id,
    ) for e in entries]


def decode_batch(data: bytes, rollout_id: str = "", attempt_id: str = "", sequence_id: int = 0) -> list[Span]:
    """The spans of one stored batch. A batch that does not decode (damaged, or a format this
    version does not know) gives no spans rather than failing the whole read."""
    import zstandard

    try:
        if data[:1] == _ZSTD:
            raw = zstandard.ZstdDecompressor().decompress(data[1:])
        elif data[:1] == _PLAIN:
            raw = data[1:]
        else:
            return []
        version, trace_id, entries = json.loads(raw)
    except (zstandard.ZstdError, ValueError, TypeError, MemoryError):
        return []
    if version != FORMAT:
        return []
    return _spans(entries, trace_id, rollout_id, attempt_id, sequence_id)


class SpanBatch:
    """The spans one attempt records, encoded as they end, within ``max_bytes`` (encoded JSON).

    Spans past the budget are dropped and counted; :meth:`add` with ``keep=True`` (the root
    span, the truncation marker) is never dropped, so the budget may be exceeded by those.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.pieces: list[bytes] = []
        self.size = 0
        self.dropped = 0
        self.dropped_bytes = 0

    def add(self, piece: bytes, keep: bool = False) -> bool:
        if not keep and self.size + len(piece) > self.max_bytes:
            self.dropped += 1
            self.dropped_bytes += len(piece)
            return False
        self.pieces.append(piece)
        self.size += len(piece)
        return True


# --------------------------------------------------------------------------- writing


def rollup_keys(keys: Keys, resources_id: str | None, version: int | None,
                metadata: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The rollups an attempt's usage is added to, as ``(hash key, field prefix)``: its snapshot
    version's, and its experiment variant's when the rollout was enqueued through one."""
    out = []
    if resources_id and version is not None:
        out.append((keys.usage_by_version(resources_id), f"{version}:"))
    experiment, variant = (metadata or {}).get("experiment"), (metadata or {}).get("variant")
    if isinstance(experiment, str) and isinstance(variant, str):
        out.append((keys.usage_by_variant(experiment), f"{variant}:"))
    return out


@dataclass(frozen=True)
class TraceWrite:
    """What one write of a trace carries: a span batch (empty: none), how many spans were
    dropped, the usage to add, and the rollups to add it to (the script's last two arguments)."""

    batch: bytes = b""
    dropped: int = 0
    usage: Usage | None = None
    rollups: Sequence[tuple[str, str]] = ()

    @property
    def args(self) -> list[bytes | str | int]:
        """The scripts' arguments (``record_trace`` in ``_trace_prelude.lua``): the batch, the
        spans dropped, the usage values space-separated, then each rollup's key and field prefix."""
        usage = self.usage
        if usage is None or usage == _NO_USAGE:
            return [self.batch, self.dropped, ""]
        values = " ".join(repr(getattr(usage, name)) for name in Usage.FIELDS)
        return [self.batch, self.dropped, values, *(part for rollup in self.rollups for part in rollup)]


_NO_USAGE = Usage()
_DEFAULT_MODE = Rollout.model_fields["mode"].default  # a record leaves its mode out at the default
_ROOT_ATTEMPT_FIELDS = ("attempt_id", "worker_id", "resources_id", "resources_version", "status")


# --------------------------------------------------------------------------- the proxy's view of an attempt


@dataclass(frozen=True)
class AttemptScope:
    """An attempt as the LLM proxy sees it: whether it may still call, and the concrete snapshot
    and rollups of its calls. ``reason`` says why a closed attempt may not."""

    rollout_id: str
    attempt_id: str
    sequence_id: int = 0
    is_open: bool = False
    reason: str = ""
    resources_id: str | None = None
    version: int | None = None
    metadata: Mapping[str, Any] | None = None

    @classmethod
    def parse(cls, rollout_id: str, attempt_id: str, reply: Sequence[Any]) -> AttemptScope:
        """From the ``attempt_scope`` script's reply."""
        if not reply:
            return cls(rollout_id, attempt_id, reason=f"rollout {rollout_id} does not exist (or expired)")
        status, seq, current, attempt_status, resources_id, version, metadata = (text(v) for v in reply)
        if current != attempt_id:
            return cls(rollout_id, attempt_id, reason=f"{attempt_id} is not the current attempt of rollout "
                       f"{rollout_id} (that is {current or 'none'}, attempt {seq})")
        if status not in OPEN_STATUSES or attempt_status != "running":
            return cls(rollout_id, attempt_id, int(seq),
                       reason=f"attempt {attempt_id} of rollout {rollout_id} is closed ({attempt_status})")
        return cls(rollout_id, attempt_id, int(seq), True, "", resources_id or None,
                   int(version) if version else None, json.loads(metadata) if metadata else {})

    def rollups(self, keys: Keys) -> list[tuple[str, str]]:
        return rollup_keys(keys, self.resources_id, self.version, self.metadata)


# --------------------------------------------------------------------------- reading


class Traces:
    """Reads traces and usage back (the client's side; the proxy writes through
    :func:`scope_call` and :func:`record_call_args` on its asyncio connection)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    def attempt_ids(self, rollout_id: str) -> list[str]:
        """The rollout's attempt ids, first to last (attempt ``n`` is ``[n - 1]``); raises
        :class:`RolloutNotFoundError`."""
        count = self.redis.hget(self.keys.rollout(rollout_id), "attempt_count")
        if count is None and not self.redis.exists(self.keys.rollout(rollout_id)):
            raise RolloutNotFoundError(rollout_id)
        pipe = self.redis.pipeline(transaction=False)
        for seq in range(1, int(count or 0) + 1):
            pipe.hget(self.keys.attempt(rollout_id, seq), "attempt_id")
        return [text(a) if a is not None else "" for a in pipe.execute()]

    def query_spans(self, rollout_id: str, attempt_id: str | None = None) -> list[Span]:
        """The spans of one attempt of the rollout (``attempt_id``), or of all its attempts (None),
        attempt by attempt, each in the order recorded. Raises :class:`RolloutNotFoundError` for an
        unknown or expired rollout and :class:`AttemptNotFoundError` for an attempt it does not have."""
        ids = self.attempt_ids(rollout_id)
        if attempt_id is not None and attempt_id not in ids:
            raise AttemptNotFoundError(rollout_id, attempt_id, ids)
        wanted = [(seq, aid) for seq, aid in enumerate(ids, 1) if attempt_id is None or aid == attempt_id]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.keys.rollout(rollout_id), ["mode", "metadata"])
        for seq, _ in wanted:
            pipe.lrange(self.keys.attempt_spans(rollout_id, seq), 0, -1)
            pipe.hmget(self.keys.attempt(rollout_id, seq), [*ROOT_FIELDS, *_ROOT_ATTEMPT_FIELDS])
        replies = pipe.execute()
        mode, metadata = (text(v) if v is not None else None for v in replies[0])
        rollout = {"rollout_id": rollout_id, "mode": json.loads(mode) if mode else _DEFAULT_MODE,
                   "metadata": json.loads(metadata) if metadata else {}}
        spans: list[Span] = []
        for i, (seq, aid) in enumerate(wanted):
            batches, fields = replies[1 + 2 * i], replies[2 + 2 * i]
            for batch in batches:
                spans.extend(decode_batch(batch, rollout_id, aid, seq))
            values = dict(zip((*ROOT_FIELDS, *_ROOT_ATTEMPT_FIELDS), fields, strict=True))
            if values["root"] is not None:  # the worker's root-only trace, written last (with the outcome)
                present = {k: text(v) for k, v in values.items() if v is not None}
                trace_id, entry = expand_root(present, rollout, {**present, "sequence_id": str(seq)})
                spans.extend(_spans([entry], trace_id, rollout_id, aid, seq))
        return spans

    def usage(self, rollout_id: str) -> Usage:
        """The LLM usage of every attempt of the rollout (``attempts``: how many it had)."""
        n = len(self.attempt_ids(rollout_id))
        pipe = self.redis.pipeline(transaction=False)
        for seq in range(1, n + 1):
            pipe.hmget(self.keys.attempt(rollout_id, seq), list(Usage.FIELDS))
        total = Usage(attempts=n)
        for values in pipe.execute():
            total = total + Usage.from_fields({f: v for f, v in zip(Usage.FIELDS, values, strict=True)
                                               if v is not None and f != "attempts"})
        return total

    def usage_by_version(self, resources_id: str) -> dict[int, Usage]:
        """Each version of the snapshot that ran attempts -> their usage, by version."""
        return {int(k): v for k, v in sorted(self._rollup(self.keys.usage_by_version(resources_id)).items(),
                                             key=lambda kv: int(kv[0]))}

    def usage_by_variant(self, experiment: str) -> dict[str, Usage]:
        """Each variant of the experiment that ran attempts -> their usage."""
        return self._rollup(self.keys.usage_by_variant(experiment))

    def _rollup(self, key: str) -> dict[str, Usage]:
        fields = {text(k): text(v) for k, v in self.redis.hgetall(key).items()}
        groups: dict[str, dict[str, str]] = {}
        for name, value in fields.items():
            group, _, field = name.rpartition(":")
            groups.setdefault(group, {})[field] = value
        return {group: Usage.from_fields(values) for group, values in groups.items()}


def scope_call(keys: Keys, rollout_id: str) -> tuple[list[str], list[str]]:
    """The keys and arguments of the ``attempt_scope`` script (read by :meth:`AttemptScope.parse`)."""
    return [keys.rollout(rollout_id)], [keys.attempt_prefix(rollout_id)]


def record_call_args(keys: Keys, scope: AttemptScope, write: TraceWrite, max_bytes: int
                     ) -> tuple[list[str], list[Any]]:
    """The keys and arguments of the ``record_llm_call`` script: one proxied call of the attempt,
    within ``max_bytes`` of proxy batches per attempt."""
    return ([keys.rollout(scope.rollout_id), keys.attempt(scope.rollout_id, scope.sequence_id)],
            [max_bytes, *write.args])
