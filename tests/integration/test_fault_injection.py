"""The fault-injection script's Redis faults, in short runs: Redis restarted empty, and Redis down for longer
than any heartbeat or visibility timeout. (Kills, restarts and lost messages: test_bench.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fault_injection.py"
CLEAN = ("lost:                 0", "stuck:                0", "duplicated results:   0", "wrong snapshot:       0")

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="the script starts its own redis-server"),
]


def run_script(*args: str) -> str:
    run = subprocess.run([sys.executable, str(SCRIPT), "--workers", "2", "--gevent-workers", "0", "--timeout", "120",
                          *args], check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    for row in CLEAN:
        assert row in run.stdout, run.stdout
    return run.stdout


def test_a_wiped_redis_is_reported_and_what_it_held_is_run_again_on_the_new_snapshots() -> None:
    out = run_script("--faults", "wipe", "kill", "--wipe-interval", "4", "--duration", "12", "--rollouts", "30",
                     "--seed", "7")
    assert "restarted Redis empty" in out, out
    reported = int(out.split("reported lost:", 1)[1].split()[0])
    submitted = int(out.split("rollouts submitted:", 1)[1].split()[0])
    finished = int(out.split("finished:", 1)[1].split()[0])
    # Each rollout a wipe took was reported lost and enqueued again: the 30 asked for all finished.
    assert reported > 0 and submitted == 30 + reported and finished == 30, out


def test_an_outage_longer_than_every_timeout_loses_and_duplicates_nothing() -> None:
    out = run_script("--faults", "outage", "--outage-interval", "2", "--outage-seconds", "12", "--duration", "8",
                     "--rollouts", "20", "--seed", "8")
    assert "Redis down 12 s" in out, out
    assert "finished:             20 " in out, out
