"""Datasets: task inputs with stable ids, from JSONL or any iterable, split into train and validation.

Every :class:`Example` carries an id that does not change from run to run or from process
to process: the input's own ``id`` field when it has one, else a hash of its JSON. The
ids name a run's rollouts (their idempotency keys), line up the rollouts of two candidates
on the same input for a paired comparison, and label the rows of a report. A split is a
pure function of the ids and a seed, so the same data always splits the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from lightning_queue.core.errors import InvalidDatasetError


@dataclass(frozen=True)
class Example:
    """One task input and its stable id."""

    id: str
    input: Any


def input_id(item: Any, id_field: str | None = "id") -> str:
    """The stable id of one input: ``str(item[id_field])`` when it is a mapping holding that
    field, else ``in-`` and 16 hex digits of the SHA-256 of its canonical JSON (sorted keys).
    Raises :class:`InvalidDatasetError` for an input that is not JSON (a rollout could not carry it)."""
    if id_field is not None and isinstance(item, Mapping) and item.get(id_field) is not None:
        return str(item[id_field])
    try:
        canonical = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidDatasetError(
            f"an input is not JSON ({exc}): {_shown(item)}; rollouts carry their input as JSON, so convert it "
            "to dicts, lists, strings, numbers, booleans and None"
        ) from None
    return "in-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _shown(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= 80 else text[:77] + "..."


class Dataset(Sequence[Example]):
    """An ordered, immutable list of :class:`Example`, each id given once.

    Build one with :meth:`of` (any iterable of inputs or examples) or :meth:`from_jsonl`.
    Identical inputs without an id field get ids ``<hash>``, ``<hash>-2``, ... in order.
    """

    def __init__(self, examples: Iterable[Example], name: str | None = None) -> None:
        self.examples: tuple[Example, ...] = tuple(examples)
        self.name = name
        seen: dict[str, int] = {}
        for position, example in enumerate(self.examples):
            if example.id in seen:
                where = f"dataset {name!r}: " if name else ""
                raise InvalidDatasetError(
                    f"{where}input id {example.id!r} is given twice (positions {seen[example.id]} and {position}); "
                    "ids must be unique: fix the id field, or drop the duplicate row"
                )
            seen[example.id] = position

    @classmethod
    def of(cls, items: Iterable[Any], *, id_field: str | None = "id", name: str | None = None) -> Dataset:
        """A dataset of ``items``: a :class:`Dataset` (returned as is), :class:`Example` objects, or
        plain inputs (ids as :func:`input_id` gives them)."""
        if isinstance(items, Dataset):
            return items
        if isinstance(items, (str, bytes, Mapping)):
            raise InvalidDatasetError(
                f"a dataset is a list (or any iterable) of inputs, got a {type(items).__name__}; wrap a single "
                "input in a list, or load a file with Dataset.from_jsonl(path)"
            )
        examples: list[Example] = []
        repeats: dict[str, int] = {}
        for item in items:
            if isinstance(item, Example):
                examples.append(item)
                continue
            explicit = id_field is not None and isinstance(item, Mapping) and item.get(id_field) is not None
            base = input_id(item, id_field)
            if explicit:
                examples.append(Example(base, item))
                continue
            repeats[base] = repeats.get(base, 0) + 1
            examples.append(Example(base if repeats[base] == 1 else f"{base}-{repeats[base]}", item))
        return cls(examples, name)

    @classmethod
    def from_jsonl(cls, path: str | Path, *, id_field: str | None = "id") -> Dataset:
        """One input per non-blank line of a JSON Lines file. Raises :class:`InvalidDatasetError`
        naming the line of a value that does not parse."""
        path = Path(path)
        rows = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise InvalidDatasetError(
                        f"{path}:{number} is not JSON ({exc}); write one JSON value (e.g. an object) per line"
                    ) from None
        return cls.of(rows, id_field=id_field, name=path.stem)

    # -- reading ----------------------------------------------------------------------------

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> Dataset: ...

    def __getitem__(self, index: int | slice) -> Example | Dataset:
        if isinstance(index, slice):
            return Dataset(self.examples[index], self.name)
        return self.examples[index]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return f"<Dataset {self.name!r} of {len(self)}>" if self.name else f"<Dataset of {len(self)}>"

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]

    @property
    def inputs(self) -> list[Any]:
        return [e.input for e in self.examples]

    def batch(self, index: int, size: int) -> Dataset:
        """The ``index``-th batch of ``size`` examples, going round the dataset (batch 0 starts at the
        first example; a batch that runs past the end continues at the start). An empty dataset
        gives empty batches."""
        if size < 1:
            raise InvalidDatasetError(f"a batch size must be at least 1, got {size}")
        if not self.examples:
            return Dataset((), self.name)
        n = len(self.examples)
        start = index * size
        return Dataset([self.examples[(start + i) % n] for i in range(min(size, n))], self.name)

    # -- splitting --------------------------------------------------------------------------

    def split(self, val_fraction: float = 0.2, *, seed: str = "") -> tuple[Dataset, Dataset]:
        """``(train, val)``: ``round(len * val_fraction)`` examples (at least one on each side) go to
        validation, chosen by a hash of ``seed`` and each id, so the split is the same on every run
        and machine, and changes with the seed only. Each part keeps the dataset's order."""
        if not 0 < val_fraction < 1:
            raise InvalidDatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if len(self.examples) < 2:
            raise InvalidDatasetError(
                f"splitting needs at least 2 examples, the dataset has {len(self.examples)}; add inputs, or pass "
                "the same data as both train and val"
            )
        n_val = min(len(self.examples) - 1, max(1, round(len(self.examples) * val_fraction)))
        order = sorted(self.examples, key=lambda e: hashlib.sha256(f"{seed}\x00{e.id}".encode()).digest())
        chosen = {e.id for e in order[:n_val]}
        train = [e for e in self.examples if e.id not in chosen]
        val = [e for e in self.examples if e.id in chosen]
        name = self.name or "dataset"
        return Dataset(train, f"{name}-train"), Dataset(val, f"{name}-val")


DatasetLike = Dataset | Sequence[Any] | Iterable[Any]
"""What the Trainer and algorithms accept: made into a :class:`Dataset` with :meth:`Dataset.of`."""
