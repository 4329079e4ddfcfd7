"""The finished-rollouts cursor against real workers: an algorithm process killed mid-run (SIGKILL)
and started again with its saved cursor reads every finished rollout exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lightning_queue import PromptTemplate
from lightning_queue.ops.fleet import worker_env
from tests.integration.conftest import REPO_ROOT

DEADLINE = 60.0  # only a bug makes a wait below reach it


def lines(journal: Path) -> list[list[str]]:
    return [line.split() for line in journal.read_text().splitlines()] if journal.exists() else []


def wait_for_lines(journal: Path, count: int, process: subprocess.Popen[str]) -> None:
    """Until the journal holds ``count`` lines (the process writes and fsyncs each one), or the deadline."""
    deadline = time.monotonic() + DEADLINE
    while len(lines(journal)) < count:
        assert process.poll() is None, process.communicate(timeout=5)
        assert time.monotonic() < deadline, f"the journal reached {len(lines(journal))} lines, not {count}"
        time.sleep(0.02)


def test_a_killed_algorithm_resumes_after_its_cursor_and_reads_each_rollout_once(
    shared_workers: Any, tmp_path: Path
) -> None:
    share = shared_workers("tests.integration.agents:echo", count=2)
    client = share.client
    client.add_resources({"prompt": PromptTemplate(template="p {x}")}, "rs-cursor")
    first = client.enqueue_rollouts([{"x": i} for i in range(30)], resources_id="rs-cursor")
    assert len(client.wait_for_rollouts([r.rollout_id for r in first], timeout=DEADLINE)) == 30

    journal = tmp_path / "journal"
    command = [sys.executable, "-m", "algorithms.finished_log", str(journal), "--idle", "2", "--pace", "0.1"]
    env = worker_env(share.settings, None, [str(REPO_ROOT)])
    algorithm = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    try:
        wait_for_lines(journal, 8, algorithm)
        algorithm.send_signal(signal.SIGKILL)  # mid-run: nothing survives but the journal
        algorithm.wait(10)
    finally:
        if algorithm.poll() is None:
            algorithm.kill()
    assert algorithm.returncode == -signal.SIGKILL
    handled_before = len(lines(journal))
    assert 8 <= handled_before < 30  # killed mid-run

    # While it is down, more rollouts finish: one fails, one is cancelled before it runs.
    second = client.enqueue_rollouts([{"x": i} for i in range(30, 40)], resources_id="rs-cursor")
    cancelled = client.enqueue_rollouts([{"x": "late"}], queue=f"{share.settings.queue}-nobody")[0]
    assert client.cancel_rollout(cancelled.rollout_id) == "cancelled"
    assert len(client.wait_for_rollouts([r.rollout_id for r in second], timeout=DEADLINE)) == 10

    restarted = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=DEADLINE,
                               check=False)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr

    journal_ids = [line[1] for line in lines(journal)]
    expected = [r.rollout_id for r in first + second] + [cancelled.rollout_id]
    assert len(journal_ids) == len(set(journal_ids)) == 41  # each once, none lost
    assert set(journal_ids) == set(expected)
    assert f"{41 - handled_before} finished rollouts appended" in restarted.stdout
    # In the order they finished: the stream's order, which the cursors (stream ids) carry.
    cursors = [line[0] for line in lines(journal)]
    assert cursors == sorted(cursors, key=lambda c: tuple(int(p) for p in c.split("-")))
    statuses = {line[1]: line[2] for line in lines(journal)}
    assert statuses[cancelled.rollout_id] == "cancelled"
    assert {statuses[r.rollout_id] for r in first + second} == {"succeeded"}
