"""Snapshots (list, versions, diff) and pointers (targets, history, set, rollback)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from lightning_queue.core.diff import SnapshotDiff
from lightning_queue.core.diff import diff_snapshots as compare
from lightning_queue.core.models import ResourcesUpdate
from lightning_queue.ops.server.deps import ServicesDep, UserDep, actor
from lightning_queue.storage.connections import text
from lightning_queue.storage.registry import PointerMove

router = APIRouter(tags=["snapshots"])

Version = Annotated[int, Query(ge=1, le=2**31)]


class SnapshotSummary(BaseModel):
    resources_id: str
    version: int
    create_time: float
    update_time: float
    resource_types: dict[str, str] = Field(description="Resource name -> its resource_type.")
    pointers: list[str] = Field(description="Pointers naming this snapshot.")


class SnapshotPage(BaseModel):
    items: list[SnapshotSummary]
    total: int
    offset: int


class VersionMetaOut(BaseModel):
    message: str = ""
    author: str | None = None
    tags: list[str] = Field(default_factory=list)
    parent_id: str | None = None
    parent_version: int | None = None

    @classmethod
    def of(cls, snapshot: ResourcesUpdate) -> VersionMetaOut:
        return cls(message=snapshot.message, author=snapshot.author, tags=list(snapshot.tags),
                   parent_id=snapshot.parent_id, parent_version=snapshot.parent_version)


class Snapshot(VersionMetaOut):
    resources_id: str
    version: int
    current_version: int
    create_time: float
    update_time: float
    resources: dict[str, Any] = Field(description="Each resource as JSON; secrets show as '**********'.")
    pointers: list[str]


class VersionInfo(VersionMetaOut):
    version: int
    update_time: float | None
    size: int | None


class VersionList(BaseModel):
    resources_id: str
    current: int
    versions: list[VersionInfo] = Field(description="Newest first.")


class Pointer(BaseModel):
    name: str
    target: str | None


class PointerMoveOut(BaseModel):
    pointer: str
    from_id: str | None
    to_id: str | None
    time: float
    by: str = Field(description="Who moved it (moves recorded by earlier releases: the operation).")
    op: str = Field("", description="The operation: set_pointer, rollback, promote {experiment}...")
    reason: str = ""

    @classmethod
    def of(cls, move: PointerMove) -> PointerMoveOut:
        return cls(pointer=move.pointer, from_id=move.from_id, to_id=move.to_id, time=move.time, by=move.by,
                   op=move.op, reason=move.reason)


class SetPointer(BaseModel):
    target: str = Field(min_length=1, max_length=200, description="A snapshot id, or a pointer to copy.")
    expected: str | None = Field(None, max_length=200, description="Move only if it names this id now.")
    reason: str | None = Field(None, max_length=500, description="Why (recorded in the pointer's history).")
    force: bool = Field(False, description="Move even a protected pointer (needs a reason).")


def _pointers_by_target(pointers: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, target in sorted(pointers.items()):
        out.setdefault(target, []).append(name)
    return out


def _snapshot(snapshot: ResourcesUpdate, current: int, pointers: list[str]) -> Snapshot:
    return Snapshot(
        resources_id=snapshot.resources_id, version=snapshot.version, current_version=current,
        create_time=snapshot.create_time, update_time=snapshot.update_time, pointers=pointers,
        resources={name: resource.model_dump(mode="json") for name, resource in snapshot.resources.items()},
        **VersionMetaOut.of(snapshot).model_dump(),
    )


@router.get("/snapshots", summary="Snapshots, newest write first")
def list_snapshots(
    services: ServicesDep, user: UserDep,
    offset: Annotated[int, Query(ge=0, le=10**6)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> SnapshotPage:
    registry = services.client.registry
    snapshots = registry.query_resources(offset, limit)
    by_target = _pointers_by_target(registry.pointers())
    items = [
        SnapshotSummary(resources_id=s.resources_id, version=s.version, create_time=s.create_time,
                        update_time=s.update_time, pointers=by_target.get(s.resources_id, []),
                        resource_types={n: r.resource_type for n, r in s.resources.items()})
        for s in snapshots
    ]
    return SnapshotPage(items=items, total=registry.count(), offset=offset)


@router.get("/snapshots/{resources_id}", summary="A snapshot (a pointer name is followed), at a version")
def get_snapshot(services: ServicesDep, user: UserDep, resources_id: str, version: Version | None = None) -> Snapshot:
    registry = services.client.registry
    current = registry.fetch(resources_id).snapshot
    snapshot = current if version is None else registry.fetch(current.resources_id, version).snapshot
    pointers = _pointers_by_target(registry.pointers()).get(current.resources_id, [])
    return _snapshot(snapshot, current.version, pointers)


@router.get("/snapshots/{resources_id}/versions", summary="A snapshot's versions, newest first")
def list_versions(
    services: ServicesDep, user: UserDep, resources_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> VersionList:
    client = services.client
    current = client.registry.fetch(resources_id).snapshot
    rid, keys = current.resources_id, client.keys
    numbers = list(range(current.version - 1, max(0, current.version - limit), -1))
    pipe = client.redis.pipeline(transaction=False)
    for n in numbers:
        pipe.hmget(keys.snapshot_version(rid, n), ["update_time", "size", "meta", "parent_id", "parent_version"])
    pipe.hget(keys.snapshot(rid), "size")
    *earlier, size = pipe.execute()
    versions = [VersionInfo(version=current.version, update_time=current.update_time,
                            size=int(text(size)) if size else None, **VersionMetaOut.of(current).model_dump())]
    for n, (updated, stored, meta, parent_id, parent_version) in zip(numbers, earlier, strict=True):
        # only the metadata, not the payload: a long history stays cheap to list
        stored_meta = json.loads(meta) if meta else {}
        versions.append(VersionInfo(version=n, update_time=float(text(updated)) if updated else None,
                                    size=int(text(stored)) if stored else None,
                                    message=stored_meta.get("message", ""), author=stored_meta.get("author") or None,
                                    tags=stored_meta.get("tags", []), parent_id=text(parent_id) if parent_id else None,
                                    parent_version=int(parent_version) if parent_id else None))
    return VersionList(resources_id=rid, current=current.version, versions=versions)


@router.get("/snapshots/{resources_id}/diff", summary="What changed between two versions (or two snapshots)")
def diff_snapshots(
    services: ServicesDep, user: UserDep, resources_id: str,
    from_version: Annotated[int | None, Query(ge=1, le=2**31, description="Default: the one before to_version.")]
    = None,
    to_version: Annotated[int | None, Query(ge=1, le=2**31, description="Default: the current one.")] = None,
    against: Annotated[str | None, Query(max_length=200, description="Compare with this snapshot's "
                                         "to_version (default: its current) instead.")] = None,
) -> SnapshotDiff:
    registry = services.client.registry
    current = registry.fetch(resources_id).snapshot
    if against:
        other = registry.fetch(against).snapshot
        right = other if to_version is None else registry.fetch(other.resources_id, to_version).snapshot
        left = current if from_version is None else registry.fetch(current.resources_id, from_version).snapshot
    else:
        right = current if to_version is None else registry.fetch(current.resources_id, to_version).snapshot
        before = from_version if from_version is not None else max(1, right.version - 1)
        left = registry.fetch(current.resources_id, before).snapshot
    return compare(left, right)


@router.get("/pointers", summary="Every pointer and the snapshot it names", tags=["pointers"])
def list_pointers(services: ServicesDep, user: UserDep) -> list[Pointer]:
    return [Pointer(name=n, target=t) for n, t in sorted(services.client.pointers().items())]


@router.get("/pointers/{name}/history", summary="A pointer's moves, newest first", tags=["pointers"])
def pointer_history(
    services: ServicesDep, user: UserDep, name: str, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[PointerMoveOut]:
    return [PointerMoveOut.of(m) for m in services.client.pointer_history(name, limit)]


@router.put("/pointers/{name}", summary="Point a pointer at a snapshot (compare-and-set with expected)",
            tags=["pointers"])
def set_pointer(services: ServicesDep, user: UserDep, name: str, body: SetPointer) -> Pointer:
    target = services.client.registry.set_pointer(name, body.target, expected=body.expected, by=actor(user),
                                                  reason=body.reason, force=body.force)
    return Pointer(name=name, target=target)


@router.post("/pointers/{name}/rollback", summary="Move a pointer back to its previous target",
             tags=["pointers"])
def rollback_pointer(services: ServicesDep, user: UserDep, name: str) -> PointerMoveOut:
    return PointerMoveOut.of(services.client.registry.rollback(name, by=actor(user)))
