"""The tracing and proxy benchmark runs end to end (``--quick``) and prints every row. No timing is
asserted (the numbers are in benchmarks/README.md); the proxy's calls must all be recorded.

Marked ``bench``: left out of the default selection, run by ``.ci/run`` with ``python -m pytest -m bench``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_traces.py"

ROWS = [
    "end to end, no-op, 2 prefork procs, LQ_TRACING=false",
    "end to end, no-op, 2 prefork procs, traced",
    "tracing overhead per no-op rollout, end to end",
    "worker time per no-op rollout",
    "Redis CPU per no-op rollout",
    "tracing in the worker process, no-op",
    "tracing in the worker process, calculator-like",
    "one chat call, p50: direct / through the proxy",
    "latency the proxy adds, p50",
    "latency the proxy adds, p95",
]


@pytest.mark.bench
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmark starts its own redis-server")
def test_bench_traces_quick_prints_every_row() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick"], check=False, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    table = run.stdout.split("\nmeasure", 1)[1]
    missing = [row for row in ROWS if row not in table]
    assert not missing, f"rows missing: {missing}\n{run.stdout}\n{run.stderr[-3000:]}"
    recorded = next(line for line in table.splitlines() if "proxy calls recorded" in line).split()
    assert recorded[-4] == recorded[-2], table  # "N of N"
