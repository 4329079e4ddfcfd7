"""The benchmarks run end to end (``--quick``, or a short fault-injection run) and print every row; the queue
benchmark's JSON report holds every section. No timing is asserted.

Marked ``bench``: left out of the default selection (about two minutes in all), run by ``.ci/run``
with ``python -m pytest -m bench``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_queue.py"
APO_SCRIPT = SCRIPT.with_name("bench_apo.py")

# Rows --quick prints (each measure's beginning), by section.
ROWS = {
    "e2e": [
        "end to end, no-op, 2 prefork procs, events on: lightning-queue",
        "end to end, no-op, 2 prefork procs, events on: bare Celery",
        "  ratio lightning-queue / bare Celery, events on",
        "CPU per rollout, lightning-queue: worker main / pool processes / Redis / caller",
        "CPU per rollout, bare Celery: worker main / pool processes / Redis / caller",
        "Redis memory growth per queued rollout (used_memory), lightning-queue",
        "Redis memory growth per finished rollout (used_memory), lightning-queue",
        "Redis memory growth per queued rollout (used_memory), bare Celery",
        "Redis memory growth per finished rollout (used_memory), bare Celery",
        "  MEMORY USAGE by key type per rollout",
        "round trips per rollout (Redis read events), lightning-queue",
        "round trips per rollout (Redis read events), bare Celery",
    ],
    "latency": [
        "enqueue to result, one at a time (25), lightning-queue",
        "enqueue to result, one at a time (25), bare Celery, apply_async(...).get()",
        "  ratio of p50s lightning-queue / bare Celery",
        "round trips of one rollout, enqueue to result (Redis read events, median), lightning-queue",
        "round trips of one rollout, enqueue to result (Redis read events, median), bare Celery",
    ],
    "steps": ["worker round trips per rollout, in process", "  claim + start (EVALSHA)", "  finish_attempt (EVALSHA)"],
    "enqueue": [
        "single enqueue, one at a time (4 x 25, median): enqueue_rollout",
        "single enqueue, one at a time (4 x 25, median): apply_async(ignore_result=True)",
        "  ratio enqueue_rollout / apply_async(ignore_result=True)",
        "batch enqueue of 300 (2 rounds, median): enqueue_rollouts",
        "  ratio enqueue_rollouts / apply_async loop",
    ],
    "inflight": [
        "in flight per process, 50 ms agents, --pool threads --concurrency 100: lightning-queue",
        "in flight per process, 50 ms agents, --pool threads --concurrency 100: bare Celery",
    ],
}


@pytest.mark.bench
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmark starts its own redis-server")
def test_bench_queue_quick_prints_every_row_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--timeout", "60"], check=False,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["errors"] == [], report["errors"]
    assert set(report["meta"]) >= {"redis", "python", "celery", "cpus", "quick", "sections", "load"}
    for row in report["rows"]:
        assert set(row) == {"section", "measure", "result", "target", "values"}, row
    for section, expected in ROWS.items():
        measures = [r["measure"] for r in report["rows"] if r["section"] == section]
        missing = [m for m in expected if not any(measure.startswith(m) for measure in measures)]
        assert not missing, f"{section}: rows missing {missing}\n{run.stdout}"
        # Printed as measured, before the closing table.
        assert all(f"{m}: " in run.stdout.split("\nmeasure ", 1)[0] for m in measures), section
    e2e = report["results"]["e2e"]["runs"]
    for side in ("lq", "bare"):
        assert len(e2e[side]) == 2  # rounds of each side, alternating
        for run_ in e2e[side]:
            assert run_["rate"] > 0 and run_["drained"] is True
            assert set(run_["cpu_us"]) == {"worker_main", "worker_pool", "redis", "caller"}
            assert run_["reads"] > 0 and run_["commands"]
    assert len(report["results"]["latency"]["latency_s"]["lq"]) == 25
    inflight = [r for r in report["rows"] if r["section"] == "inflight" and r["values"].get("side") == "lq"]
    assert inflight and inflight[0]["values"]["max"] >= 1


@pytest.mark.bench
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmark starts its own redis-server")
def test_bench_queue_wait_that_runs_out_says_what_did_not_finish(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # A deadline no rollout can meet: the section fails with a diagnosis instead of hanging; the run goes on.
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "latency,steps", "--json", str(out),
                          "--timeout", "0.001"], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is False
    [error] = report["errors"]
    assert error["section"] == "latency" and error["error"].startswith(
        "timed out: lightning-queue: one rollout did not finish within 0.001 s")
    assert "statuses: {" in error["error"] and "unacked" in error["error"], error["error"]
    assert any(r["section"] == "steps" for r in report["rows"]), "the next section still ran"
    assert "FAILED latency: timed out" in run.stdout


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
