"""What changed between two snapshot versions: one entry per changed leaf, text diffed by words and
as a unified diff. The one implementation behind ``LightningClient.diff``, ``lightning-queue
resources diff`` and the dashboard's diff view; pure functions over the models.

Secrets (``SecretStr`` fields such as ``LLM.api_key``) are compared by value but shown masked:
a changed key is reported as changed, never shown, and gets no text diff.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic_core import to_jsonable_python

from lightning_queue.core.models import Resource, ResourcesUpdate

MASK = "**********"
_TOKENS = re.compile(r"\s+|\w+|[^\w\s]")


class Segment(BaseModel):
    """A piece of a changed text: kept, removed or added."""

    op: Literal["equal", "delete", "insert"]
    text: str


class Change(BaseModel):
    """One leaf that differs; ``path`` is dotted from the resource name (``main_llm.model``).
    A changed text has ``segments`` (word diff) and ``unified`` (a unified diff, line by line)."""

    path: str
    kind: Literal["added", "removed", "changed"]
    old: Any = None
    new: Any = None
    secret: bool = False
    segments: list[Segment] | None = None
    unified: str | None = None

    @property
    def resource(self) -> str:
        """The name of the resource the leaf belongs to."""
        return re.split(r"[.\[]", self.path, maxsplit=1)[0]


class SnapshotRef(BaseModel):
    resources_id: str
    version: int

    def __str__(self) -> str:
        return f"{self.resources_id}@{self.version}"


class SnapshotDiff(BaseModel):
    """What changed from ``left`` to ``right`` (two versions of one snapshot, or two snapshots)."""

    left: SnapshotRef
    right: SnapshotRef
    changes: list[Change]

    def by_resource(self) -> dict[str, list[Change]]:
        """The changes grouped by resource name, in path order."""
        out: dict[str, list[Change]] = {}
        for change in self.changes:
            out.setdefault(change.resource, []).append(change)
        return out


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, BaseModel):
        value = {name: getattr(value, name) for name in type(value).model_fields}
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, (list, tuple)) and value:
        for i, item in enumerate(value):
            _flatten(item, f"{path}[{i}]", out)
    else:
        out[path] = value


def _shown(value: Any) -> Any:
    return MASK if isinstance(value, SecretStr) else to_jsonable_python(value)


def _plain(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def word_diff(old: str, new: str) -> list[Segment]:
    """``old`` to ``new`` as kept, removed and added runs of words (whitespace kept)."""
    a, b = _TOKENS.findall(old), _TOKENS.findall(new)
    out: list[Segment] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(Segment(op="equal", text="".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(Segment(op="delete", text="".join(a[i1:i2])))
        if j2 > j1:
            out.append(Segment(op="insert", text="".join(b[j1:j2])))
    return out


def unified_diff(old: str, new: str, old_name: str = "old", new_name: str = "new", context: int = 3) -> str:
    """``old`` to ``new`` as a unified diff (:func:`difflib.unified_diff`), each line ending in a newline."""
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True), old_name, new_name,
                                 n=context)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def diff_resources(old: Mapping[str, Resource], new: Mapping[str, Resource], old_name: str = "old",
                   new_name: str = "new") -> list[Change]:
    """Every leaf of ``new`` that is not in ``old``, is not in ``new`` any more, or differs; by path.
    ``old_name``/``new_name`` label the unified diffs (``rs-a@1``...)."""
    left: dict[str, Any] = {}
    right: dict[str, Any] = {}
    _flatten(dict(old), "", left)
    _flatten(dict(new), "", right)
    changes = []
    for path in sorted(left.keys() | right.keys()):
        secret = isinstance(left.get(path), SecretStr) or isinstance(right.get(path), SecretStr)
        if path not in right:
            changes.append(Change(path=path, kind="removed", old=_shown(left[path]), secret=secret))
        elif path not in left:
            changes.append(Change(path=path, kind="added", new=_shown(right[path]), secret=secret))
        elif _plain(left[path]) != _plain(right[path]):
            a, b = left[path], right[path]
            text = isinstance(a, str) and isinstance(b, str)
            changes.append(Change(path=path, kind="changed", old=_shown(a), new=_shown(b), secret=secret,
                                  segments=word_diff(a, b) if text else None,
                                  unified=unified_diff(a, b, f"{old_name} {path}", f"{new_name} {path}")
                                  if text else None))
    return changes


def diff_snapshots(left: ResourcesUpdate, right: ResourcesUpdate) -> SnapshotDiff:
    """What changed from ``left`` to ``right``."""
    a = SnapshotRef(resources_id=left.resources_id, version=left.version)
    b = SnapshotRef(resources_id=right.resources_id, version=right.version)
    return SnapshotDiff(left=a, right=b, changes=diff_resources(left.resources, right.resources, str(a), str(b)))
