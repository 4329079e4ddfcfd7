"""The dashboard benchmark runs end to end on a small experiment and prints every row. No timing is asserted.

Marked ``bench``: run by ``.ci/run`` with ``python -m pytest -m bench``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_dashboard.py"
ROWS = ["write 2,000 finished rollouts", "live report from the aggregates", "GET /api/v1/experiments/{name}",
        "page in Chromium", "the report read from every rollout record"]


@pytest.mark.bench
def test_bench_dashboard_prints_every_row(redis_url: str) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--rollouts", "2000", "--repeat", "2"], check=False,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "LQ_REDIS_URL": redis_url})
    assert run.returncode == 0, run.stdout + run.stderr
    missing = [r for r in ROWS if r not in run.stdout]
    assert not missing, f"rows missing: {missing}\n{run.stdout}\n{run.stderr[-3000:]}"
