"""Hooks against real workers: the worker app module installs them; each finished rollout is
reported once by the worker that ran it, a pointer move by the process that moved it, and a hook
that raises breaks nothing."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lightning_queue import LightningClient, PromptTemplate, RolloutConfig, hooks
from tests.integration.conftest import WorkerPool


def read_lines(path: Path, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The file's JSON lines once it holds ``count`` of them (the workers write them after
    recording each outcome, so shortly after a wait returns)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.fixture
def hooks_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``HOOKS_LOG`` for the workers started after it (they inherit the environment) and for this process."""
    path = tmp_path / "hooks.jsonl"
    monkeypatch.setenv("HOOKS_LOG", str(path))
    yield path


def test_workers_report_each_finished_rollout_once_and_pointer_moves_are_reported_where_made(
    client: LightningClient, start_workers: Callable[..., Any], worker_pool: WorkerPool, hooks_log: Path,
) -> None:
    from algorithms import hooks_example

    start_workers("tests.integration.hooks_app:maybe_fail", count=2, app="tests.integration.hooks_app")
    enqueued: list[hooks.Enqueued] = []
    hooks.on_enqueue.connect(enqueued.append)
    hooks_example.install()
    try:
        a = client.add_resources({"prompt": PromptTemplate(template="a")}, message="baseline")
        client.set_pointer("prod", a.resources_id, reason="first release", actor="alice")
        inputs = [{"i": i, "fail": i == 3} for i in range(6)]
        rollouts = client.enqueue_rollouts(inputs, resources_id="prod", config=RolloutConfig(max_attempts=1))
        finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=60)
    finally:
        hooks.on_enqueue.disconnect(enqueued.append)
        hooks.on_success.disconnect(hooks_example.on_finished)
        hooks.on_failure.disconnect(hooks_example.on_finished)
        hooks.on_pointer_move.disconnect(hooks_example.on_pointer_move)
        hooks_example._installed = False  # so a later test in this process can install again

    # the broken hook (on start, success and failure) changed no outcome
    assert sorted((r.input["i"], r.status) for r in finished) == [
        (i, "failed" if i == 3 else "succeeded") for i in range(6)]
    assert [[r.rollout_id for r in e.rollouts] for e in enqueued] == [[r.rollout_id for r in rollouts]]

    lines = read_lines(hooks_log, 7)
    moves = [line for line in lines if line["event"] == "pointer_move"]
    assert moves == [{"event": "pointer_move", "pointer": "prod", "from": None, "to": a.resources_id, "by": "alice",
                      "op": "set_pointer", "reason": "first release"}]
    done = {line["rollout_id"]: line for line in lines if line["event"] != "pointer_move"}
    assert len(done) == len(lines) - 1 == 6  # each rollout once
    for r in finished:
        line = done[r.rollout_id]
        assert line["event"] == r.status and line["snapshot"] == f"{a.resources_id}@1"
        assert line["worker"] and line["pid"]
        if r.status == "succeeded":
            assert line["reward"] == r.reward and line["error"] is None
        else:
            assert line["error"] == "ValueError: asked to fail: 3"
    assert os.getpid() not in {line["pid"] for line in done.values()}  # written by the worker processes
    worker_pool.wait_for_log("hook on_success: broken raised; ignored")  # logged, not raised
