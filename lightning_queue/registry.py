"""The snapshot registry: immutable, versioned resource snapshots on Redis.

One hash per ``resources_id`` holds the serialized resources and their
metadata; the ``latest`` pointer names the snapshot unpinned rollouts run with.
See :mod:`lightning_queue.keys` for the layout.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

import redis

from .connections import load_script
from .errors import (
    NoLatestResourcesError,
    ResourcesExistError,
    ResourcesNotFoundError,
    SnapshotCorruptedError,
)
from .keys import Keys
from .models import Resource, ResourcesUpdate, dump_resources, new_id, validate_resources

LATEST = "latest"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_snapshot(resources_id: str, fields: Mapping[bytes | str, bytes | str]) -> ResourcesUpdate:
    """Turn a snapshot hash into a :class:`ResourcesUpdate`; a bad payload raises
    :class:`SnapshotCorruptedError` naming the id."""
    data = {_text(k): v for k, v in fields.items()}
    try:
        payload = json.loads(data["resources"])["resources"]
        return ResourcesUpdate(
            resources_id=resources_id,
            version=int(data["version"]),
            create_time=float(data["create_time"]),
            update_time=float(data["update_time"]),
            resources=validate_resources(payload),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise SnapshotCorruptedError(resources_id, f"{type(exc).__name__}: {exc}") from exc


class SnapshotRegistry:
    """Stores and reads resource snapshots.

    Contract:

    * ``add_resources`` creates version 1 under a new id and moves ``latest``
      to it in one atomic step (a Lua script); an existing id raises
      :class:`ResourcesExistError` and writes nothing.
    * ``update_resources`` writes version n+1 under an existing id and moves
      ``latest`` to it, atomically; an unknown id raises
      :class:`ResourcesNotFoundError`.
    * ``get_latest_resources`` reads the pointer and the snapshot it names in
      one atomic step, so it never sees a pointer without its snapshot.
    * ``query_resources`` lists snapshots newest write first.
    """

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._add = load_script(client, "add_snapshot")
        self._update = load_script(client, "update_snapshot")
        self._get_pointer = load_script(client, "get_pointer")

    def _write_keys(self, resources_id: str) -> list[str]:
        k = self.keys
        return [k.snapshot(resources_id), k.snapshots, k.pointers, k.seq]

    def add_resources(
        self, resources: Mapping[str, Resource | Mapping[str, Any]], resources_id: str | None = None
    ) -> ResourcesUpdate:
        validated = validate_resources(resources)
        resources_id = resources_id or new_id("rs")
        now = time.time()
        if not self._add(keys=self._write_keys(resources_id), args=[resources_id, dump_resources(validated), repr(now)]):
            raise ResourcesExistError(resources_id)
        return ResourcesUpdate(
            resources_id=resources_id, version=1, create_time=now, update_time=now, resources=validated
        )

    def update_resources(
        self,
        resources_id: str,
        resources: Mapping[str, Resource | Mapping[str, Any]],
    ) -> ResourcesUpdate:
        validated = validate_resources(resources)
        now = time.time()
        status, version, create_time = self._update(
            keys=self._write_keys(resources_id), args=[resources_id, dump_resources(validated), repr(now), ""]
        )
        if status == 0:
            raise ResourcesNotFoundError(resources_id, hint="add it first with add_resources()")
        return ResourcesUpdate(
            resources_id=resources_id,
            version=int(version),
            create_time=float(create_time),
            update_time=now,
            resources=validated,
        )

    def get_resources_by_id(self, resources_id: str) -> ResourcesUpdate:
        fields = self.redis.hgetall(self.keys.snapshot(resources_id))
        if not fields:
            raise ResourcesNotFoundError(resources_id)
        return decode_snapshot(resources_id, fields)

    def get_latest_resources(self) -> ResourcesUpdate | None:
        """The snapshot ``latest`` names, or ``None`` before any was stored."""
        reply = self._get_pointer(keys=[self.keys.pointers], args=[LATEST, self.keys.snapshot("")])
        if not reply:
            return None
        resources_id = _text(reply[0])
        flat = reply[1:]
        if not flat:
            raise SnapshotCorruptedError(resources_id, "the latest pointer names a snapshot that is not stored")
        return decode_snapshot(resources_id, dict(zip(flat[::2], flat[1::2])))

    def resolve(self, resources_id: str | None) -> ResourcesUpdate:
        """The seed's rule: an explicit id gives that snapshot; ``None`` gives the latest now.

        Raises :class:`ResourcesNotFoundError` (or its subclass
        :class:`NoLatestResourcesError`) when there is nothing to run with.
        """
        if resources_id is not None:
            return self.get_resources_by_id(resources_id)
        latest = self.get_latest_resources()
        if latest is None:
            raise NoLatestResourcesError()
        return latest

    def exists(self, *resources_ids: str) -> list[bool]:
        pipe = self.redis.pipeline(transaction=False)
        for rid in resources_ids:
            pipe.exists(self.keys.snapshot(rid))
        return [bool(n) for n in pipe.execute()]

    def query_resources(self, offset: int = 0, limit: int = 50) -> list[ResourcesUpdate]:
        """Snapshots, newest write first, ``limit`` of them from ``offset``."""
        if offset < 0 or limit < 1:
            raise ValueError("offset must be >= 0 and limit >= 1")
        ids = [_text(i) for i in self.redis.zrevrange(self.keys.snapshots, offset, offset + limit - 1)]
        pipe = self.redis.pipeline(transaction=True)
        for rid in ids:
            pipe.hgetall(self.keys.snapshot(rid))
        return [decode_snapshot(rid, fields) for rid, fields in zip(ids, pipe.execute()) if fields]

    def count(self) -> int:
        return int(self.redis.zcard(self.keys.snapshots))
