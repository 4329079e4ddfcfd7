"""An experiment: its variants, and the deterministic assignment of units to them.

An :class:`Experiment` names two or more variants (the first is the control),
each a snapshot id or a pointer with a weight. Enqueuing through it
(:meth:`Experiments.enqueue`) assigns every task to a variant by its *unit*
(a field of the input or metadata, e.g. a user id, or a function of the
input), pins the rollout to that variant's snapshot, tags it with
``metadata={"experiment", "variant", "unit"}``, and indexes it per variant so
reports read only the experiment's rollouts. Workers need nothing new.

Assignment is a pure function of (salt, bucket version, unit): a BLAKE2b hash
to one of :data:`BUCKETS` buckets; the variants own contiguous bucket ranges
in their fixed order, so the same unit always gets the same variant on every
machine, and changing the weights moves only the units in the buckets that
change owner (50/50 -> 60/40 moves 10%). Coverage uses a second, independent
hash: raising it only adds units, and a unit outside coverage gets the
fallback (default: the control's snapshot) and is not part of the experiment.
Starting again with a new bucket version re-buckets every unit.

A **paired** experiment runs every input under every variant (blocked on the
input) and is compared with paired tests; on small evaluation sets it has far
more power than a split (see :mod:`lightning_queue.stats` and the README).

Statuses: ``draft -> running <-> stopped``. Every change of an experiment is
atomic: a WATCH/MULTI/EXEC read-modify-write of its hash (retried on a
concurrent change), or, to stop it together with a pointer move (promotion,
canary rollback), the ``experiment_conclude`` Lua script.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from lightning_queue.core.errors import ExperimentUnitError, InvalidExperimentError

BUCKETS = 10_000
"""Assignment granularity: weights are honoured to 1/10,000."""

ExperimentStatus = Literal["draft", "running", "stopped"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_name(value: str, what: str) -> str:
    if not is_name(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return value


def is_name(value: object) -> bool:
    """Whether ``value`` can name an experiment, a variant or a snapshot: no ``:``, so it never
    addresses a key derived from another name (``a:rollouts:b`` would be experiment ``a``'s)."""
    return isinstance(value, str) and _NAME.match(value) is not None


# ----------------------------------------------------------------------------- assignment


def bucket(salt: str, version: int, unit: str, space: str = "variant") -> int:
    """The unit's bucket in ``[0, BUCKETS)``: BLAKE2b of salt, version and unit.

    Stable across processes, machines and Python versions (never Python's
    ``hash()``, which is salted per process). ``space`` separates independent
    draws: ``"variant"`` picks the variant, ``"coverage"`` decides inclusion.
    """
    data = "\x1f".join((space, salt, str(version), unit)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") % BUCKETS


def bucket_bounds(weights: Sequence[float]) -> list[int]:
    """The upper bucket bound of each variant: variant ``i`` owns ``[bounds[i-1], bounds[i])``.

    Ranges are contiguous in the variants' fixed order, so a weight change only
    moves the buckets between the old and new bounds.
    """
    total = float(sum(weights))
    bounds, running = [], 0.0
    for w in weights:
        running += w
        bounds.append(round(BUCKETS * running / total))
    bounds[-1] = BUCKETS
    return bounds


def unit_value(value: Any) -> str:
    """A unit as the string that is hashed: strings as they are, anything else as
    canonical JSON (sorted keys), so ``7`` and ``"7"`` are the same user only if
    the caller makes them so."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


_MISSING = object()


def lookup(unit_key: str, input: Any, metadata: Mapping[str, Any]) -> Any:
    """The value at a dotted ``unit_key`` (``input.user.id``, ``metadata.user``; plain
    ``input`` is the whole input), or a sentinel when it is missing."""
    root, *path = unit_key.split(".")
    value: Any = input if root == "input" else metadata
    for part in path:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


# ----------------------------------------------------------------------------- the model


class Variant(BaseModel):
    """One arm: a snapshot (``resources_id``: an id, or a pointer resolved when each
    rollout is enqueued) and its share of the units."""

    name: str
    resources_id: str
    weight: float = Field(1.0, ge=0)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value, "variant name")

    @field_validator("resources_id")
    @classmethod
    def _valid_reference(cls, value: str) -> str:
        return _check_name(value, "resources_id (a snapshot id or pointer name)")


class Experiment(BaseModel):
    """An experiment's definition and state (stored in Redis; see :mod:`lightning_queue.keys`).

    The first variant is the control. ``unit_key`` is a dotted path into the
    task input (``input.user_id``) or the enqueue metadata
    (``metadata.user``); plain ``input`` (the default) makes every distinct
    input its own unit. ``coverage`` is the share of units in the experiment;
    the others run with ``fallback`` (default: the control's snapshot).
    ``paired`` experiments run every input under every variant and ignore the
    weights and the coverage. ``reassigned`` is set once units have been assigned under more
    than one set of weights or bucket version (a canary's steps, a re-bucketed
    restart): the counts then no longer follow one configured split, so the
    report skips the sample-ratio check.
    """

    name: str
    variants: list[Variant] = Field(min_length=2)
    unit_key: str = "input"
    salt: str = ""
    coverage: float = Field(1.0, gt=0, le=1)
    fallback: str | None = None
    paired: bool = False
    description: str = ""
    status: ExperimentStatus = "draft"
    bucket_version: int = Field(1, ge=1)
    revision: int = 0
    reassigned: bool = False
    concluded: bool = False
    create_time: float = Field(default_factory=time.time)
    start_time: float | None = None
    stop_time: float | None = None
    stop_reason: str | None = None
    winner: str | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value, "experiment name")

    @field_validator("unit_key")
    @classmethod
    def _unit_key(cls, value: str) -> str:
        if value.split(".")[0] not in ("input", "metadata") or "" in value.split("."):
            raise ValueError(f"unit_key {value!r} must be 'input', 'input.<field>...' or 'metadata.<field>...'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if not self.paired and sum(v.weight for v in self.variants) <= 0:
            raise ValueError("at least one variant needs a positive weight")
        if not self.salt:
            self.salt = self.name  # a fixed default: renaming would re-bucket, so it is stored
        return self

    @property
    def control(self) -> Variant:
        return self.variants[0]

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise InvalidExperimentError(
            f"experiment {self.name!r} has no variant {name!r}; its variants are "
            + ", ".join(v.name for v in self.variants)
        )

    @property
    def weights(self) -> dict[str, float]:
        return {v.name: v.weight for v in self.variants}

    def in_coverage(self, unit: str) -> bool:
        return bucket(self.salt, self.bucket_version, unit, "coverage") < round(self.coverage * BUCKETS)

    def assign(self, unit: Any) -> str | None:
        """The variant ``unit`` gets, or ``None`` when it is outside coverage. Pure: the
        same definition gives the same answer in every process."""
        key = unit_value(unit)
        if not self.in_coverage(key):
            return None
        b = bucket(self.salt, self.bucket_version, key)
        for variant, bound in zip(self.variants, bucket_bounds([v.weight for v in self.variants]), strict=True):
            if b < bound:
                return variant.name
        raise AssertionError("the last bound is BUCKETS")  # pragma: no cover

    def unit_of(self, input: Any, metadata: Mapping[str, Any] | None = None) -> str:
        value = lookup(self.unit_key, input, metadata or {})
        if value is _MISSING or value is None:
            raise ExperimentUnitError(self.name, self.unit_key, input)
        return unit_value(value)


def parse_experiment(data: Mapping[str, Any]) -> Experiment:
    """Validate an experiment definition, raising one :class:`InvalidExperimentError` naming each bad field."""
    try:
        return Experiment.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'experiment'}: {e['msg']}" for e in exc.errors())
        raise InvalidExperimentError(f"invalid experiment {data.get('name')!r}: {problems}") from None


