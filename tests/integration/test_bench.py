"""The benchmarks run end to end (``--quick``, or a short fault-injection run) and print every row. No timing
is asserted.

Marked ``bench``: left out of the default selection (about two minutes in all), run by ``.ci/run``
with ``python -m pytest -m bench``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_queue.py"
APO_SCRIPT = SCRIPT.with_name("bench_apo.py")

ROWS = [
    "end to end, no-op, 2 prefork procs: lightning-queue",
    "end to end, no-op, 2 prefork procs: bare Celery",
    "ratio lightning-queue / bare Celery",
    "Redis server CPU per rollout",
    "Redis commands per rollout, every one (Lua-internal too), lightning-queue",
    "Redis commands per rollout, every one (Lua-internal too), bare Celery",
    "Redis memory per finished rollout, besides its payload",
    "bare Celery's result (celery-task-meta key)",
    "worker round trips per rollout",
    "claim + start (EVALSHA)",
    "finish_attempt (EVALSHA)",
    "Redis commands per rollout outside Lua scripts",
    "batch enqueue of 1,000: enqueue_rollouts",
    "plain apply_async loop of 1,000",
    "ratio enqueue_rollouts / apply_async loop",
    "result latency, agent return -> wait_for_rollouts",
    "bare Celery, task return -> AsyncResult.get",
    "scaling, no-op, 1 prefork process ",
    "scaling, no-op, 2 prefork processes",
    "scaling, no-op, 4 prefork processes",
    "scaling, 50 ms agents, 1 process, --pool threads",
    "scaling, 1 s agents, 1 process, --pool threads",
    "threads pool: rollouts all succeeded",
    "bare Celery, 50 ms task, --pool threads",
]


@pytest.mark.bench
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmark starts its own redis-server")
def test_bench_queue_quick_prints_every_row() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick"], check=False, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    table = run.stdout.split("\nmeasure", 1)[1]
    missing = [row for row in ROWS if row not in table]
    assert not missing, f"rows missing: {missing}\n{run.stdout}\n{run.stderr[-3000:]}"
    # The thread pool's worker process attached its snapshot cache (it never sends worker_process_init).
    threads = next(line for line in table.splitlines() if "threads pool: rollouts all succeeded" in line)
    assert "hits 0," not in threads and "(0 cache)" not in threads, threads


REAPER = SCRIPT.parent / "bench_reaper.py"
FAULTS = SCRIPT.parent / "fault_injection.py"


@pytest.mark.bench
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmark starts its own redis-server")
def test_bench_reaper_quick_prints_every_case() -> None:
    run = subprocess.run([sys.executable, str(REAPER), "--quick"], check=False, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    table = run.stdout.split("\ncase", 1)[1]
    cases = [line.split(".", 1)[0] for line in table.splitlines()[1:] if line.strip()]
    assert cases == ["1", "2", "3a", "3b", "4", "5", "6"], run.stdout
    assert "1. nothing due" in table and "0 entries looked at" in table


@pytest.mark.bench
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the script starts its own redis-server")
def test_fault_injection_short_run_loses_nothing() -> None:
    # No gevent worker: the test extra does not install gevent (the bench extra does).
    run = subprocess.run([sys.executable, str(FAULTS), "--rollouts", "40", "--duration", "12", "--workers", "2",
                          "--gevent-workers", "0", "--seed", "5", "--timeout", "120"],
                         check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    for row in ("lost:                 0", "stuck:                0", "duplicated results:   0",
                "wrong snapshot:       0"):
        assert row in run.stdout, run.stdout


APO_ROWS = [
    "sequential: runs that promoted the good edit",
    "sequential: rollouts spent when the improvement was accepted",
    "sequential: rollouts per accepted improvement, whole run",
    "paired: runs that promoted the good edit",
    "paired: rollouts spent when the improvement was accepted",
    "time per run, instant critic: waiting on the fleet",
    "time per run, instant critic: the optimizer's own work",
    "time per run, critic answering in 0.5 s: waiting on the fleet",
]


@pytest.mark.bench
def test_bench_apo_quick_prints_every_row_and_never_promotes_a_bad_edit() -> None:
    run = subprocess.run([sys.executable, str(APO_SCRIPT), "--quick"], check=False, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    table = run.stdout.split("\nmeasure", 1)[1]
    missing = [row for row in APO_ROWS if row not in table]
    assert not missing, f"rows missing: {missing}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert table.count("(0 promoted a bad one)") == 2, table
