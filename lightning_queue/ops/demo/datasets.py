"""The small arithmetic dataset (JSON lines) the demo and the examples use, shipped with the package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def arithmetic(split: str | None = None) -> list[dict[str, Any]]:
    rows = load_jsonl(DATA / "arithmetic.jsonl")
    return [r for r in rows if split is None or r["split"] == split]
