"""The snapshot registry: immutable, versioned resource snapshots and named pointers on Redis.

One hash per ``resources_id`` holds the current version's payload and its
metadata; each earlier version is kept, unchanged, under its own key. Named
pointers (``latest``, ``prod``, ``canary``...) name snapshots; every move is
recorded in a bounded history so it can be rolled back. Every change is one
Lua script, announced with a sequence number on the snapshot events channel
that worker caches listen to. See :mod:`lightning_queue.keys` for the layout.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from lightning_queue.core import hooks
from lightning_queue.core.diff import SnapshotDiff, diff_snapshots
from lightning_queue.core.errors import (
    NoLatestResourcesError,
    PointerError,
    ProtectedPointerError,
    ResourcesExistError,
    ResourcesNotFoundError,
    SnapshotCorruptedError,
    SnapshotDeletedError,
    SnapshotInUseError,
    VersionConflictError,
)
from lightning_queue.core.keys import Keys
from lightning_queue.core.models import (
    ErrorInfo,
    Resource,
    ResourcesUpdate,
    VersionMeta,
    default_actor,
    dump_resources,
    new_id,
    validate_resources,
)
from lightning_queue.core.settings import Settings
from lightning_queue.storage import codec
from lightning_queue.storage.connections import text
from lightning_queue.storage.epoch import RegistryEpoch, propose
from lightning_queue.storage.scripts import load_script

LATEST = "latest"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ResourcesLike = Mapping[str, Resource | Mapping[str, Any]]


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"rs-a@3"`` -> ``("rs-a", 3)``; ``"prod"`` -> ``("prod", None)`` (the current version).
    A version that is not a positive integer raises :class:`ResourcesNotFoundError`."""
    name, at, version = str(ref).partition("@")
    if not at:
        return _check_ref(name), None
    if not version.isdigit() or int(version) < 1:
        raise ResourcesNotFoundError(
            str(ref), hint="a version reference is 'resources_id@N' (or 'pointer@N') with N a version number >= 1")
    return _check_ref(name), int(version)


def check_name(name: str, what: str) -> str:
    """Ids and pointer names are short and colon-free, so they cannot address any key but their
    own (``rs-a:v:1`` would be version 1 of ``rs-a``)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise PointerError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _check_ref(ref: str) -> str:
    # A reference that cannot be an id or a pointer name names nothing, and must not be used in a key.
    if not isinstance(ref, str) or not _NAME.match(ref):
        raise ResourcesNotFoundError(
            str(ref), hint="ids and pointer names hold only letters, digits, '.', '_' and '-' (1-128 of them, "
            "starting with a letter or digit)")
    return ref


def _check_new_id(resources_id: str) -> str:
    # The script refuses the names of existing pointers; "latest" is refused even before it exists.
    check_name(resources_id, "resources_id")
    if resources_id == LATEST:
        raise ResourcesExistError(resources_id)
    return resources_id


def decode_snapshot(resources_id: str, fields: Mapping[bytes | str, bytes | str]) -> ResourcesUpdate:
    """Turn a snapshot hash into a :class:`ResourcesUpdate`; a bad payload raises
    :class:`SnapshotCorruptedError` naming the id."""
    data = {text(k): v for k, v in fields.items()}
    try:
        payload = data["resources"]
        raw = codec.decode(
            payload if isinstance(payload, bytes) else payload.encode(),
            text(data.get("encoding", codec.PLAIN)),
            text(data["checksum"]) if "checksum" in data else None,
            resources_id,
        )
        return ResourcesUpdate(
            resources_id=resources_id,
            version=int(data["version"]),
            create_time=float(data["create_time"]),
            update_time=float(data["update_time"]),
            resources=validate_resources(json.loads(raw)["resources"]),
            # versions written before metadata existed have none of these fields
            **_stored_meta(data),
        )
    except SnapshotCorruptedError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise SnapshotCorruptedError(resources_id, f"{type(exc).__name__}: {exc}") from exc


def _stored_meta(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "meta" in data:
        meta = json.loads(data["meta"])
        out.update(message=meta.get("message", ""), author=meta.get("author") or None,
                   tags=tuple(meta.get("tags", ())))
    if data.get("parent_id"):
        out.update(parent_id=text(data["parent_id"]), parent_version=int(data["parent_version"]))
    return out


@dataclass(frozen=True)
class Fetched:
    """A snapshot as read, with the registry sequence number and epoch at the read (for caches)."""

    snapshot: ResourcesUpdate
    seq: int
    size: int
    pointer: str | None = None
    epoch: str = ""


@dataclass(frozen=True)
class PointerMove:
    """One move of a pointer: ``by`` who (the actor: ``user@host`` unless given), ``op`` the
    operation (``set_pointer``, ``rollback``, ``promote {experiment}``...) and ``reason`` why.
    Moves recorded by earlier releases have only ``by``, which then held the operation."""

    pointer: str
    from_id: str | None
    to_id: str | None
    time: float
    by: str
    op: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Protection:
    """Why a pointer is protected, by whom and since when (see :meth:`SnapshotRegistry.protect_pointer`)."""

    pointer: str
    reason: str
    by: str
    time: float

    @classmethod
    def decode(cls, pointer: str, raw: bytes | str) -> Protection:
        data = json.loads(raw)
        return cls(pointer, data.get("reason", ""), data.get("by", ""), float(data.get("time", 0)))


def announce_move(pointer: str, from_id: str | None, to_id: str | None, by: str, op: str, reason: str,
                  at: float) -> None:
    """Fire :data:`hooks.on_pointer_move` (a hook that raises is logged, never raised here)."""
    hooks.on_pointer_move.fire(hooks.PointerMoved(pointer, from_id, to_id, by, op, reason, at))


def check_force(force: bool, reason: str | None) -> str:
    """Forcing a protected pointer needs a reason (it goes into the pointer's history)."""
    reason = (reason or "").strip()
    if force and not reason:
        raise PointerError("force=True moves a protected pointer only with a reason (`--reason` on the command line): "
                           "say why, it is recorded in the pointer's history")
    if len(reason) > 500:
        raise PointerError(f"the reason is {len(reason)} characters long; keep it under 500")
    return reason


def _protected(reply: Any, pointer: str) -> ProtectedPointerError:
    protection = Protection.decode(pointer, reply)
    return ProtectedPointerError(pointer, protection.reason, protection.by)


@dataclass(frozen=True)
class DeleteReport:
    resources_id: str
    moved_pointers: list[str]
    failed_rollouts: list[str]


class SnapshotRegistry:
    """Stores and reads resource snapshots and pointers.

    Contract:

    * ``add_resources`` creates version 1 under a new id and moves ``latest``
      to it in one atomic step; a taken id (or a pointer's name) raises
      :class:`ResourcesExistError` and writes nothing.
    * ``update_resources`` writes version n+1 under an existing id and moves
      ``latest`` to it, atomically, keeping version n readable. With
      ``expected_version`` it is a compare-and-set: if another writer got
      there first, nothing is written and :class:`VersionConflictError`
      carries the current version.
    * Wherever a snapshot is read or run with (``get_resources_by_id``,
      ``resolve``, ``fetch``, a pointer's target, enqueue, an agent's default),
      a pointer name is accepted and followed; ids and pointer names never
      collide. Reading a pointer and the snapshot it names is one atomic step.
      Writes and deletes take ids, so a pointer moving meanwhile cannot
      redirect them.
    * Pointers only ever name snapshots that exist: a move to a missing id is
      refused, and deleting a snapshot a pointer names is refused (or, forced,
      unsets the pointer in the same step).
    * ``query_resources`` lists snapshots newest write first.
    * Every version carries its metadata (:class:`VersionMeta`: message, author, tags, parent),
      written in the same atomic step as the payload and kept with the version.
    * A protected pointer (:meth:`protect_pointer`) is moved (set, rolled back, promoted to)
      only with ``force=True`` and a reason; otherwise :class:`ProtectedPointerError` and nothing
      changes. The check is in the script that moves it. A snapshot a protected pointer names
      cannot be deleted, even forced.
    * Every pointer move records who (``by``, default :func:`default_actor`), the operation and why.
    """

    def __init__(
        self, client: redis.Redis, keys: Keys, settings: Settings | None = None, epoch: RegistryEpoch | None = None
    ) -> None:
        self.redis = client
        self.keys = keys
        self.epoch = epoch if epoch is not None else RegistryEpoch(client, keys)
        settings = settings or Settings(key_prefix=keys.prefix)
        self.compress_threshold = settings.compress_threshold_bytes
        self.max_bytes = settings.max_snapshot_bytes
        self.history_length = settings.pointer_history_length
        self.rollout_ttl_seconds = settings.rollout_ttl_seconds  # for rollouts a forced delete fails
        self.series_caps = settings.series_caps  # and the metric aggregates their failure updates
        self._write = load_script(client, "write_snapshot", "_registry_prelude", "_epoch_prelude")
        self._get = load_script(client, "get_snapshot")
        self._set_pointer = load_script(client, "set_pointer", "_registry_prelude")
        self._rollback = load_script(client, "rollback_pointer", "_registry_prelude")
        self._delete = load_script(client, "delete_snapshot", "_rollout_prelude", "_experiment_tally",
                                   "_final_metrics", "_finished_stream",
                                   "_registry_prelude")
        self._protect = load_script(client, "protect_pointer")

    # -- writes -------------------------------------------------------------------------

    def _write_call(
        self, mode: str, resources_id: str, resources: ResourcesLike, expected_version: int | None, op: str,
        meta: VersionMeta, parent: str | None, client: Any = None, make_latest: bool = True,
    ) -> tuple[Any, dict[str, Resource], float]:
        parent_id, parent_version = parse_ref(parent) if parent else ("", None)
        validated = validate_resources(resources)
        encoded = codec.encode(dump_resources(validated).encode(), self.compress_threshold, self.max_bytes,
                               resources_id)
        now = time.time()
        k = self.keys
        reply = self._write(
            keys=[k.snapshot(resources_id), k.snapshots, k.pointers, k.seq, k.snapshot_events, k.epoch],
            args=[resources_id, encoded.data, encoded.encoding, encoded.checksum, encoded.size, repr(now), mode,
                  "" if expected_version is None else expected_version, meta.author, self.history_length,
                  k.pointer_history_prefix, k.snapshot_version_prefix(resources_id), self.epoch.expected(),
                  propose(), "1" if make_latest else "0",
                  meta.model_dump_json(include={"message", "author", "tags"}), parent_id,
                  "" if parent_version is None else parent_version, k.snapshot_prefix, op],
            client=client,
        )
        return reply, validated, now

    def _written(self, reply: Any, resources_id: str, validated: dict[str, Resource], now: float,
                 expected_version: int | None, meta: VersionMeta, op: str) -> ResourcesUpdate:
        status = text(reply[0])
        if status == "epoch":  # nothing written: Redis lost its data since this process last looked
            self.epoch.saw(text(reply[1]) or None)
        if status in ("exists", "name_taken"):
            raise ResourcesExistError(resources_id)
        if status == "missing":
            raise ResourcesNotFoundError(resources_id, hint="add it first with add_resources()")
        if status == "conflict":
            raise VersionConflictError(resources_id, expected_version or 0, int(reply[1]))
        if status == "no_parent":
            at = f"@{text(reply[2])}" if text(reply[2]) else ""
            raise ResourcesNotFoundError(f"{text(reply[1])}{at}", hint="the parent named is not stored; nothing "
                                         "was written")
        self.epoch.saw(text(reply[3]))  # adopted when this process knew none
        if text(reply[6]) == "1":
            announce_move(LATEST, text(reply[7]) or None, resources_id, meta.author, op, "", now)
        parent_id = text(reply[4]) or None
        return ResourcesUpdate(resources_id=resources_id, version=int(reply[1]), create_time=float(reply[2]),
                               update_time=now, resources=validated, message=meta.message,
                               author=meta.author or None, tags=meta.tags, parent_id=parent_id,
                               parent_version=int(reply[5]) if parent_id else None)

    @staticmethod
    def _meta(message: str | None, author: str | None, tags: Sequence[str] | None) -> VersionMeta:
        if isinstance(tags, str):  # one tag given as a string would otherwise become one tag per letter
            tags = [tags]
        return VersionMeta.build(message=message or "", author=default_actor() if author is None else author,
                                 tags=tuple(tags or ()))

    def add_resources(
        self, resources: ResourcesLike, resources_id: str | None = None, *, message: str | None = None,
        author: str | None = None, tags: Sequence[str] | None = None, parent: str | None = None,
        make_latest: bool = True, op: str = "add_resources",
    ) -> ResourcesUpdate:
        """Store version 1 of a new snapshot and, unless ``make_latest=False``, point ``latest`` at
        it, in one atomic step.

        ``message``, ``author`` (default :func:`default_actor`) and ``tags`` are stored with the
        version; ``parent`` (``id``, ``pointer`` or ``id@version``) names what it derives from and
        must exist (else :class:`ResourcesNotFoundError`, nothing written). Bad metadata raises
        :class:`InvalidVersionMetadataError` before anything is sent."""
        meta = self._meta(message, author, tags)
        resources_id = _check_new_id(resources_id or new_id("rs"))
        reply, validated, now = self._write_call("add", resources_id, resources, None, op, meta, parent,
                                                 make_latest=make_latest)
        return self._written(reply, resources_id, validated, now, None, meta, op)

    def add_resources_batch(
        self, items: Sequence[ResourcesLike | tuple[str, ResourcesLike]], *, message: str | None = None,
        author: str | None = None, tags: Sequence[str] | None = None, make_latest: bool = True,
        op: str = "add_resources",
    ) -> list[ResourcesUpdate]:
        """Add many snapshots in one pipeline; each is its own atomic add (``make_latest``: as
        :meth:`add_resources`).

        Two round trips whatever the batch size: redis-py's SCRIPT EXISTS
        check, then the pipeline.

        Items are resources mappings or ``(resources_id, resources)`` pairs.
        The last one added ends up ``latest`` (unless ``make_latest=False``). If an id is taken, the others
        are still added and :class:`ResourcesExistError` names the first taken id. ``message``,
        ``author`` and ``tags`` are stored with every one of them.
        """
        meta = self._meta(message, author, tags)
        pipe = self.redis.pipeline(transaction=False)
        staged = []
        for item in items:
            rid, resources = item if isinstance(item, tuple) else (new_id("rs"), item)
            _check_new_id(rid)
            _, validated, now = self._write_call("add", rid, resources, None, op, meta, None, client=pipe,
                                                 make_latest=make_latest)
            staged.append((rid, validated, now))
        out, error = [], None
        for (rid, validated, now), reply in zip(staged, pipe.execute(), strict=True):
            try:
                out.append(self._written(reply, rid, validated, now, None, meta, op))
            except ResourcesExistError as exc:
                error = error or exc
        if error:
            raise error
        return out

    def update_resources(
        self,
        resources_id: str,
        resources: ResourcesLike,
        expected_version: int | None = None,
        *,
        message: str | None = None,
        author: str | None = None,
        tags: Sequence[str] | None = None,
        parent: str | None = None,
        op: str = "update_resources",
    ) -> ResourcesUpdate:
        """Store version n+1 (see the class contract), with its metadata as in :meth:`add_resources`;
        the parent defaults to version n."""
        meta = self._meta(message, author, tags)
        _check_ref(resources_id)
        reply, validated, now = self._write_call("update", resources_id, resources, expected_version, op, meta,
                                                 parent)
        return self._written(reply, resources_id, validated, now, expected_version, meta, op)

    # -- reads --------------------------------------------------------------------------

    def fetch(self, ref: str, version: int | None = None) -> Fetched:
        """Resolve ``ref`` (pointer name or id) and read it, atomically; ``version``
        picks an earlier version (default: the current one). A ``ref`` that cannot be an id or a
        pointer name (it holds ``:``...) raises :class:`ResourcesNotFoundError`."""
        _check_ref(ref)
        k = self.keys
        reply = self._get(
            keys=[k.pointers, k.seq, k.epoch],
            args=[ref, "" if version is None else version, k.snapshot_prefix, k.VERSION_INFIX],
        )
        status = text(reply[0])
        if status == "missing":
            if text(reply[2]):  # cannot happen through this API: pointers only name stored snapshots
                raise SnapshotCorruptedError(text(reply[1]), f"pointer {ref!r} names it but it is not stored")
            if ref == LATEST:
                raise NoLatestResourcesError()
            raise ResourcesNotFoundError(ref)
        if status == "no_version":
            raise ResourcesNotFoundError(
                f"{text(reply[1])}@{version}",
                hint=f"version {version} is not stored (the current version is {text(reply[2])}; earlier "
                "versions are removed when the snapshot is deleted)",
            )
        resources_id, seq, pointer, epoch = text(reply[1]), int(reply[2]), text(reply[3]) or None, text(reply[4])
        flat = reply[5:]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        snapshot = decode_snapshot(resources_id, fields)
        return Fetched(snapshot, seq, int(fields.get(b"size", 0) or 0), pointer, epoch)

    def get_resources_by_id(self, resources_id: str, version: int | None = None) -> ResourcesUpdate:
        """The snapshot (a pointer name is followed); :class:`ResourcesNotFoundError` if none."""
        return self.fetch(resources_id, version).snapshot

    def get_latest_resources(self) -> ResourcesUpdate | None:
        """The snapshot ``latest`` names, or ``None`` before any was stored."""
        try:
            return self.fetch(LATEST).snapshot
        except NoLatestResourcesError:
            return None

    def resolve(self, ref: str | None, version: int | None = None) -> ResourcesUpdate:
        """The seed's rule: an explicit id (or pointer) gives that snapshot; ``None``
        gives the latest now. Raises :class:`ResourcesNotFoundError` (or
        :class:`NoLatestResourcesError`) when there is nothing to run with."""
        return self.fetch(ref or LATEST, version).snapshot

    def current_versions(self, refs: Sequence[str]) -> dict[str, tuple[str, int] | None]:
        """Each reference resolved to (resources_id, current version), or None; one round trip.
        A reference that cannot be an id or a pointer name raises :class:`ResourcesNotFoundError`."""
        for ref in refs:
            _check_ref(ref)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.keys.pointers)
        for ref in refs:
            pipe.hget(self.keys.snapshot(ref), "version")
        pointers_raw, *versions = pipe.execute()
        pointers = {text(n): text(t) for n, t in pointers_raw.items()}
        out: dict[str, tuple[str, int] | None] = {}
        via_pointer = []
        for ref, version in zip(refs, versions, strict=True):
            if ref in pointers:
                via_pointer.append(ref)
            else:
                out[ref] = (ref, int(version)) if version is not None else None
        if via_pointer:  # rare: a second trip for the targets' versions
            pipe = self.redis.pipeline(transaction=False)
            for ref in via_pointer:
                pipe.hget(self.keys.snapshot(pointers[ref]), "version")
            for ref, version in zip(via_pointer, pipe.execute(), strict=True):
                out[ref] = (pointers[ref], int(version)) if version is not None else None
        return out

    def query_resources(self, offset: int = 0, limit: int = 50) -> list[ResourcesUpdate]:
        """Snapshots, newest write first, ``limit`` of them from ``offset``."""
        if offset < 0 or limit < 1:
            raise ValueError("offset must be >= 0 and limit >= 1")
        ids = [text(i) for i in self.redis.zrevrange(self.keys.snapshots, offset, offset + limit - 1)]
        pipe = self.redis.pipeline(transaction=True)
        for rid in ids:
            pipe.hgetall(self.keys.snapshot(rid))
        return [decode_snapshot(rid, fields) for rid, fields in zip(ids, pipe.execute(), strict=True) if fields]

    def diff(self, a: str, b: str | None = None) -> SnapshotDiff:
        """What changed from ``a`` to ``b`` (see :func:`lightning_queue.core.diff.diff_snapshots`).
        Each is ``id``, ``pointer``, ``id@N`` or ``pointer@N``; without ``b``, ``a`` is compared with
        the version before it. Raises :class:`ResourcesNotFoundError` for a version not stored."""
        a_ref, a_version = parse_ref(a)
        first = self.fetch(a_ref, a_version).snapshot
        if b is not None:
            b_ref, b_version = parse_ref(b)
            return diff_snapshots(first, self.fetch(b_ref, b_version).snapshot)
        if first.version == 1:
            raise ResourcesNotFoundError(f"{first.resources_id}@0", hint=f"{first.ref} is the first version: name "
                                         "two versions or snapshots to compare")
        return diff_snapshots(self.fetch(first.resources_id, first.version - 1).snapshot, first)

    def versions(self, ref: str, limit: int = 100) -> list[ResourcesUpdate]:
        """A snapshot's versions, newest first, ``limit`` of them, with their metadata (one round trip
        after resolving ``ref``)."""
        current = self.fetch(ref).snapshot
        rid = current.resources_id
        numbers = list(range(current.version - 1, max(0, current.version - limit), -1))
        pipe = self.redis.pipeline(transaction=False)
        for n in numbers:
            pipe.hgetall(self.keys.snapshot_version(rid, n))
        out = [current]
        for fields in pipe.execute():
            if fields:
                out.append(decode_snapshot(rid, {**fields, b"create_time": repr(current.create_time).encode()}))
        return out

    def list_ids(self) -> list[str]:
        """Every snapshot id, newest write first."""
        return [text(i) for i in self.redis.zrevrange(self.keys.snapshots, 0, -1)]

    def count(self) -> int:
        return int(self.redis.zcard(self.keys.snapshots))

    # -- pointers -------------------------------------------------------------------------

    def pointers(self) -> dict[str, str]:
        """Every pointer and the id it names."""
        return {text(n): text(t) for n, t in self.redis.hgetall(self.keys.pointers).items()}

    def get_pointer(self, name: str) -> str | None:
        target = self.redis.hget(self.keys.pointers, check_name(name, "pointer name"))
        return text(target) if target is not None else None

    def set_pointer(
        self, name: str, target: str, *, expected: str | None = None, by: str | None = None,
        op: str = "set_pointer", reason: str | None = None, force: bool = False,
    ) -> str:
        """Point ``name`` at ``target`` (an id, or another pointer's current target);
        return the id it now names. ``expected`` makes it a compare-and-set on the
        current target. A protected pointer raises :class:`ProtectedPointerError` unless
        ``force=True`` with a ``reason``. The move is recorded with ``by`` (default
        :func:`default_actor`), ``op`` and ``reason``."""
        check_name(name, "pointer name")
        _check_ref(target)
        reason = check_force(force, reason)
        actor, now = by or default_actor(), time.time()
        k = self.keys
        reply = self._set_pointer(
            keys=[k.pointers, k.seq, k.snapshot_events, k.pointer_protection],
            args=[name, target, repr(now), actor, self.history_length,
                  k.pointer_history_prefix, k.snapshot_prefix, expected or "", "1" if force else "0", op, reason],
        )
        status = text(reply[0])
        if status == "protected":
            raise _protected(reply[1], name)
        if status == "missing":
            raise ResourcesNotFoundError(text(reply[1]), hint=f"pointer {name!r} was not moved")
        if status == "name_taken":
            raise PointerError(f"{name!r} is the id of a snapshot; pick another pointer name")
        if status == "conflict":
            current = text(reply[1]) or None
            raise PointerError(f"pointer {name!r} names {current!r}, not the expected {expected!r}; it was not moved")
        announce_move(name, text(reply[2]) or None, text(reply[1]), actor, op, reason, now)
        return text(reply[1])

    def rollback(
        self, name: str = LATEST, *, by: str | None = None, op: str = "rollback", reason: str | None = None,
        force: bool = False,
    ) -> PointerMove:
        """Move ``name`` back to the target it had before its last move, atomically.

        A second rollback undoes the first (like ``cd -``); use
        :meth:`pointer_history` and :meth:`set_pointer` to go further back. A protected pointer
        needs ``force=True`` and a ``reason`` (else :class:`ProtectedPointerError`).
        """
        check_name(name, "pointer name")
        reason = check_force(force, reason)
        by = by or default_actor()
        k = self.keys
        now = time.time()
        reply = self._rollback(
            keys=[k.pointers, k.seq, k.snapshot_events, k.pointer_protection],
            args=[name, repr(now), by, self.history_length, k.pointer_history_prefix, k.snapshot_prefix,
                  "1" if force else "0", op, reason],
        )
        status = text(reply[0])
        if status == "protected":
            raise _protected(reply[1], name)
        if status == "nothing":
            raise PointerError(f"pointer {name!r} has no earlier target to roll back to")
        if status == "gone":
            raise PointerError(
                f"cannot roll {name!r} back: its previous target {text(reply[1])!r} has been deleted; "
                "pick a target from `resources history` and set it"
            )
        announce_move(name, text(reply[2]) or None, text(reply[1]), by, op, reason, now)
        return PointerMove(name, text(reply[2]) or None, text(reply[1]), now, by, op, reason)

    def pointer_history(self, name: str = LATEST, limit: int = 20) -> list[PointerMove]:
        """The pointer's last moves, newest first."""
        entries = self.redis.lrange(self.keys.pointer_history(check_name(name, "pointer name")), 0, limit - 1)
        moves = []
        for raw in entries:
            entry = json.loads(raw)
            moves.append(PointerMove(name, entry["from"] or None, entry["to"] or None, float(entry["time"]),
                                     entry["by"], entry.get("op", ""), entry.get("reason", "")))
        return moves

    def protect_pointer(self, name: str, reason: str, *, by: str | None = None) -> Protection:
        """Protect pointer ``name``: from now on it moves only with ``force=True`` and a reason,
        and the snapshot it names cannot be deleted. ``latest`` cannot be protected (every write
        moves it). Protecting again replaces the reason. The pointer must exist (checked in the
        same atomic step); else :class:`PointerError`."""
        check_name(name, "pointer name")
        if name == LATEST:
            raise PointerError("'latest' cannot be protected: every write moves it; protect a pointer such as 'prod'")
        reason = check_force(True, reason)
        protection = Protection(name, reason, by or default_actor(), time.time())
        k = self.keys
        reply = self._protect(keys=[k.pointers, k.pointer_protection], args=[
            name, json.dumps({"reason": protection.reason, "by": protection.by, "time": protection.time})])
        if text(reply[0]) == "missing":
            raise PointerError(f"there is no pointer {name!r} to protect; set it first (`resources pointer`)")
        return protection

    def unprotect_pointer(self, name: str) -> Protection | None:
        """Lift the protection of ``name``; return the one lifted (``None`` if it had none)."""
        check_name(name, "pointer name")
        k = self.keys
        reply = self._protect(keys=[k.pointers, k.pointer_protection], args=[name, ""])
        return Protection.decode(name, reply[1]) if text(reply[1]) else None

    def protections(self) -> dict[str, Protection]:
        """Every protected pointer and its protection."""
        return {text(n): Protection.decode(text(n), raw)
                for n, raw in self.redis.hgetall(self.keys.pointer_protection).items()}

    # -- deletion -------------------------------------------------------------------------

    def delete_resources(
        self, resources_id: str, *, force: bool = False, by: str | None = None, op: str = "delete",
    ) -> DeleteReport:
        """Delete a snapshot and all its versions, atomically.

        Refused with :class:`SnapshotInUseError` (listing why) while pointers
        name it or queued/running rollouts use it. ``force=True`` deletes
        anyway: those pointers are unset (``latest`` falls back to the newest
        remaining snapshot) and those rollouts fail with a "snapshot deleted"
        error (and expire like any finished rollout), in the same atomic step.
        A protected pointer naming it refuses the delete, forced or not (:class:`ProtectedPointerError`).
        """
        _check_ref(resources_id)
        k = self.keys
        error = ErrorInfo.from_exception(SnapshotDeletedError(resources_id), with_traceback=False).model_dump_json()
        actor, now = by or default_actor(), time.time()
        reply = self._delete(
            keys=[*k.all_status_indexes(), k.snapshot(resources_id), k.snapshots, k.pointers, k.seq,
                  k.snapshot_events, k.rollouts_by_resources(resources_id), k.events, k.usage_by_version(resources_id),
                  k.pointer_protection],
            args=[resources_id, "1" if force else "0", repr(now), error, k.rollout_prefix,
                  k.pointer_history_prefix, self.history_length, actor,
                  k.snapshot_version_prefix(resources_id), self.rollout_ttl_seconds or "", k.ATTEMPT_INFIX,
                  self.series_caps.arg, op],
        )
        status = text(reply[0])
        if status == "protected":
            protection = Protection.decode(text(reply[1]), reply[2])
            raise ProtectedPointerError(protection.pointer, protection.reason, protection.by, operation="delete")
        if status == "missing":
            raise ResourcesNotFoundError(resources_id)
        report = json.loads(reply[1])
        pointers = report["pointers"] if isinstance(report["pointers"], list) else []
        rollouts = report["rollouts"] if isinstance(report["rollouts"], list) else []
        if status == "in_use":
            raise SnapshotInUseError(resources_id, pointers, rollouts)
        for name in pointers:
            to = self.get_pointer(LATEST) if name == LATEST else None  # latest fell back to the newest left
            announce_move(name, resources_id, to, actor, op, f"snapshot {resources_id} deleted", now)
        return DeleteReport(resources_id, pointers, rollouts)


class SnapshotWriter(Protocol):
    """What :func:`retry_on_conflict` needs: a registry or a client."""

    def get_resources_by_id(self, resources_id: str, version: int | None = None) -> ResourcesUpdate: ...

    def update_resources(
        self, resources_id: str, resources: ResourcesLike, expected_version: int | None = None
    ) -> ResourcesUpdate: ...


def retry_on_conflict(
    registry_or_client: SnapshotWriter,
    resources_id: str,
    change: Callable[[ResourcesUpdate], ResourcesLike],
    attempts: int = 10,
) -> ResourcesUpdate:
    """Read-modify-write a snapshot safely under concurrent writers.

    Reads the current version, calls ``change(snapshot)`` for the new
    resources, and writes them with compare-and-set; on
    :class:`VersionConflictError` it reads again and retries, up to
    ``attempts`` times (then the last conflict is raised).
    """
    last: VersionConflictError | None = None
    for _ in range(attempts):
        current = registry_or_client.get_resources_by_id(resources_id)
        try:
            return registry_or_client.update_resources(
                resources_id, change(current), expected_version=current.version
            )
        except VersionConflictError as exc:
            last = exc
    assert last is not None
    raise last
